//! The all-MiniLM-L6-v2 sentence encoder against sentence-transformers
//! (`model/fixtures/make_minilm_parity.py`): 30 biomedical texts, short and long, one past the
//! 256-token limit, embedded in length-sorted padded batches.

use bft_model::SentenceEncoder;
use serde::Deserialize;

#[derive(Deserialize)]
struct Item {
    text: String,
    tokens: usize,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct Fixture {
    items: Vec<Item>,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../model/fixtures/minilm_parity.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

#[test]
fn minilm_matches_sentence_transformers() {
    let enc = SentenceEncoder::load(&bft_tests::minilm_dir()).unwrap();
    assert_eq!((enc.dim(), enc.max_tokens), (384, 256));
    let f = fixture();
    assert!(f.items.len() >= 20);
    let texts: Vec<&str> = f.items.iter().map(|i| i.text.as_str()).collect();
    let mut reported = Vec::new();
    let got = enc.embed(&texts, |n| reported.push(n)).unwrap();
    assert_eq!(reported.last(), Some(&texts.len()));
    let mut worst = 1.0f64;
    for (item, g) in f.items.iter().zip(&got) {
        assert_eq!(
            enc.tokenize(&item.text).unwrap().len(),
            item.tokens,
            "{}",
            item.text
        );
        let norm = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "not unit length: {norm}");
        let c = cosine(g, &item.embedding);
        assert!(c >= 0.9999, "cosine {c} for {:?}", item.text);
        worst = worst.min(c);
    }
    eprintln!("{} texts, worst cosine {worst:.7}", got.len());
    // Alone or in a batch with longer texts (padding), a text's embedding is the same.
    let alone = enc
        .embed(&texts[texts.len() - 3..texts.len() - 2], |_| {})
        .unwrap();
    assert!(cosine(&alone[0], &got[texts.len() - 3]) > 0.999_999);
}
