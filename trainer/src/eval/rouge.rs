//! ROUGE-1/2/L exactly as Google's `rouge-score` computes them (`RougeScorer(["rouge1",
//! "rouge2", "rougeL"], use_stemmer=True)`): lower-case, every run of characters other than
//! [a-z0-9] becomes a space, tokens longer than 3 characters are Porter-stemmed (NLTK's
//! variant), n-gram overlap is clipped by count, ROUGE-L is the sentence-level LCS. Checked
//! against the Python package on known pairs (`fixtures/rouge_vectors.json`).

use super::porter;
use std::collections::HashMap;

/// Precision, recall and F1 of one ROUGE type.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

impl Score {
    fn new(precision: f64, recall: f64) -> Score {
        let fmeasure = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        Score {
            precision,
            recall,
            fmeasure,
        }
    }
}

/// ROUGE-1, ROUGE-2 and ROUGE-L of a prediction against its target.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Rouge {
    pub rouge1: Score,
    pub rouge2: Score,
    pub rouge_l: Score,
}

/// rouge-score's default tokenizer with `use_stemmer=True`.
pub fn tokenize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let spaced: String = lower
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                ' '
            }
        })
        .collect();
    spaced
        .split_ascii_whitespace()
        .map(|t| {
            if t.len() > 3 {
                porter::stem(t)
            } else {
                t.to_string()
            }
        })
        .collect()
}

/// Scores `prediction` against `target`.
pub fn score(target: &str, prediction: &str) -> Rouge {
    let (t, p) = (tokenize(target), tokenize(prediction));
    Rouge {
        rouge1: ngram_score(&t, &p, 1),
        rouge2: ngram_score(&t, &p, 2),
        rouge_l: lcs_score(&t, &p),
    }
}

fn ngrams(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    for g in tokens.windows(n) {
        *counts.entry(g).or_insert(0) += 1;
    }
    counts
}

fn ngram_score(target: &[String], prediction: &[String], n: usize) -> Score {
    let (t, p) = (ngrams(target, n), ngrams(prediction, n));
    let overlap: usize = t
        .iter()
        .map(|(g, &c)| c.min(p.get(g).copied().unwrap_or(0)))
        .sum();
    let t_count: usize = t.values().sum();
    let p_count: usize = p.values().sum();
    Score::new(
        overlap as f64 / p_count.max(1) as f64,
        overlap as f64 / t_count.max(1) as f64,
    )
}

fn lcs_score(target: &[String], prediction: &[String]) -> Score {
    if target.is_empty() || prediction.is_empty() {
        return Score::default();
    }
    // One row of the LCS table at a time: (|prediction| + 1).
    let mut prev = vec![0usize; prediction.len() + 1];
    let mut row = prev.clone();
    for t in target {
        for (j, p) in prediction.iter().enumerate() {
            row[j + 1] = if t == p {
                prev[j] + 1
            } else {
                row[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut row);
    }
    let lcs = prev[prediction.len()] as f64;
    Score::new(lcs / prediction.len() as f64, lcs / target.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Vectors {
        stems: Vec<(String, String)>,
        pairs: Vec<Pair>,
    }

    #[derive(serde::Deserialize)]
    struct Pair {
        target: String,
        prediction: String,
        rouge1: [f64; 3],
        rouge2: [f64; 3],
        #[serde(rename = "rougeL")]
        rouge_l: [f64; 3],
    }

    fn vectors() -> Vectors {
        let text = include_str!("../../fixtures/rouge_vectors.json");
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn porter_matches_nltk_on_4097_words() {
        let v = vectors();
        let wrong: Vec<_> = v
            .stems
            .iter()
            .filter(|(w, s)| porter::stem(w) != *s)
            .map(|(w, s)| format!("{w}: nltk {s}, ours {}", porter::stem(w)))
            .collect();
        assert!(
            wrong.is_empty(),
            "{} differ: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(20)]
        );
        assert!(v.stems.len() > 4000);
    }

    #[test]
    fn rouge_matches_rouge_score_on_known_pairs() {
        let v = vectors();
        for p in &v.pairs {
            let r = score(&p.target, &p.prediction);
            for (name, ours, theirs) in [
                ("rouge1", r.rouge1, p.rouge1),
                ("rouge2", r.rouge2, p.rouge2),
                ("rougeL", r.rouge_l, p.rouge_l),
            ] {
                let ours = [ours.precision, ours.recall, ours.fmeasure];
                for k in 0..3 {
                    assert!(
                        (ours[k] - theirs[k]).abs() < 1e-12,
                        "{name} of {:?} vs {:?}: ours {ours:?}, rouge-score {theirs:?}",
                        p.target,
                        p.prediction
                    );
                }
            }
        }
        assert!(v.pairs.len() > 300);
    }

    #[test]
    fn hand_checked_values() {
        // "cell cycle" vs "regulation of cell cycle": 2 of 4 predicted unigrams, all of the
        // target; LCS 2.
        let r = score("cell cycle", "regulation of cell cycle");
        assert_eq!(r.rouge1.precision, 0.5);
        assert_eq!(r.rouge1.recall, 1.0);
        assert!((r.rouge_l.fmeasure - 2.0 / 3.0).abs() < 1e-15);
        assert_eq!(r.rouge2.recall, 1.0);
        // Stemming joins inflections.
        assert_eq!(
            score("signaling pathways", "signal pathway")
                .rouge1
                .fmeasure,
            1.0
        );
        assert_eq!(score("", "x").rouge_l, Score::default());
    }
}
