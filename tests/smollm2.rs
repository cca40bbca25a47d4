//! A real model end to end: SmolLM2-135M-Instruct's GGUF (Q4_1 and Q8_0 weights, its embedded
//! BPE tokenizer and chat template) answers a question by greedy decoding with a KV cache.

use bft_engine::DType;
use bft_model::{
    ChatTemplate, GgufFile, Message, Sampling, Transformer, generate, tokenizer_from_gguf,
};

#[test]
fn smollm2_gguf_says_paris_is_the_capital_of_france() {
    let path = bft_tests::smollm2_gguf();
    let g = GgufFile::open(&path).unwrap();
    let cfg = g.config().unwrap();
    assert_eq!(
        (
            cfg.layers,
            cfg.hidden,
            cfg.heads,
            cfg.kv_heads,
            cfg.head_dim,
            cfg.vocab
        ),
        (30, 576, 9, 3, 64, 49152)
    );
    assert!(cfg.tie_word_embeddings && cfg.rope_theta == 100_000.0);
    let model = Transformer::load(&g, cfg, DType::F32).unwrap();
    let tok = tokenizer_from_gguf(&g).unwrap();
    let template = ChatTemplate::new(
        g.chat_template().expect("chat template"),
        "<|im_start|>",
        "<|im_end|>",
    )
    .unwrap();
    let question = Message {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    };
    let prompt = template.render(&[question], true).unwrap();
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
    let ids = tok
        .encode(prompt.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    let im_end = tok
        .token_to_id("<|im_end|>")
        .expect("<|im_end|> is a special token");
    // Special tokens are single ids, not split into pieces.
    assert_eq!(ids.iter().filter(|&&i| i == im_end).count(), 2, "{ids:?}");
    let out = generate(
        &model,
        &ids,
        &[im_end],
        Sampling {
            max_new_tokens: 24,
            ..Default::default()
        },
        |_| true,
    )
    .unwrap();
    let answer = tok.decode(&out, true).unwrap();
    println!("answer: {answer}");
    assert!(answer.contains("Paris"), "answer: {answer:?}");
}

#[test]
fn gguf_converts_to_an_hf_directory_that_loads_back_identically() {
    use bft_engine::{Device, Tensor};
    let path = bft_tests::smollm2_gguf();
    let from_gguf = bft_model::load_model(&path, DType::F32).unwrap();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bft-convert-{}", std::process::id()));
    let hf_config = GgufFile::open(&path).unwrap().hf_config().unwrap();
    bft_model::save_hf_dir(&from_gguf, &hf_config, &dir, DType::F32).unwrap();
    let from_dir = bft_model::load_model(&dir, DType::F32).unwrap();
    assert_eq!(from_dir.model.config, from_gguf.model.config);
    assert_eq!(from_dir.stop_ids, from_gguf.stop_ids);
    let text = "<|im_start|>user\nHi<|im_end|>\n";
    let (a, b) = (
        from_gguf.tokenizer.encode(text, false).unwrap(),
        from_dir.tokenizer.encode(text, false).unwrap(),
    );
    assert_eq!(a.get_ids(), b.get_ids());
    let ids = Tensor::from_vec(a.get_ids().to_vec(), [1, a.get_ids().len()], &Device::Cpu).unwrap();
    let (la, lb) = (
        from_gguf.model.logits(&ids).unwrap(),
        from_dir.model.logits(&ids).unwrap(),
    );
    assert_eq!(la.to_vec::<f32>().unwrap(), lb.to_vec::<f32>().unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn only_assistant_replies_and_their_end_tokens_are_targets() {
    use bft_trainer::data::{Conversation, encode};
    let m = bft_model::load_model(&bft_tests::smollm2_gguf(), DType::F32).unwrap();
    let template = m.template.as_ref().unwrap();
    let msg = |role: &str, content: &str| Message {
        role: role.into(),
        content: content.into(),
    };
    let conv = Conversation {
        messages: vec![
            msg("user", "Capital of France?"),
            msg("assistant", "Paris."),
            msg("user", "And of Italy?"),
            msg("assistant", "Rome."),
        ],
        line: 1,
    };
    let e = encode(&conv, &m.tokenizer, template, "<|im_end|>", 4096).unwrap();
    assert_eq!(e.ids.len(), e.target_mask.len());
    let targets: Vec<u32> = e
        .ids
        .iter()
        .zip(&e.target_mask)
        .filter(|(_, t)| **t)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(
        m.tokenizer.decode(&targets, false).unwrap(),
        "Paris.<|im_end|>Rome.<|im_end|>"
    );
    // The whole rendering is what HF's template gives; the system prompt comes from the template.
    let all = m.tokenizer.decode(&e.ids, false).unwrap();
    assert!(
        all.starts_with("<|im_start|>system\n") && all.ends_with("Rome.<|im_end|>\n"),
        "{all:?}"
    );
    let cut = encode(&conv, &m.tokenizer, template, "<|im_end|>", 10).unwrap();
    assert_eq!((cut.ids.len(), cut.target_mask.len()), (10, 10));
}

/// Token ids of whole conversations and of generation prompts equal what HF transformers'
/// `apply_chat_template` gives with the tokenizer and template it reads from the same GGUF
/// (`fixtures/make_chat_ids.py`): multi-turn, a system message, Unicode, whitespace and
/// Jinja-like text.
#[test]
fn chat_token_ids_equal_hf_apply_chat_template() {
    use bft_trainer::data::{Conversation, encode};
    #[derive(serde::Deserialize)]
    struct Case {
        messages: Vec<Message>,
        ids: Vec<u32>,
        prompt_ids: Vec<u32>,
    }
    let cases: Vec<Case> = serde_json::from_str(include_str!("fixtures/chat_ids.json")).unwrap();
    let m = bft_model::load_model(&bft_tests::smollm2_gguf(), DType::F32).unwrap();
    let template = m.template.as_ref().unwrap();
    for (i, c) in cases.iter().enumerate() {
        let conv = Conversation {
            messages: c.messages.clone(),
            line: i + 1,
        };
        let e = encode(&conv, &m.tokenizer, template, &m.eos_token, 4096).unwrap();
        assert_eq!(e.ids, c.ids, "conversation {i}");
        let prompt = bft_trainer::eval::prompt_ids(&m, &c.messages[..c.messages.len() - 1]);
        assert_eq!(prompt.unwrap(), c.prompt_ids, "prompt of conversation {i}");
    }
    assert_eq!(cases.len(), 5);
}
