//! Every file format `bft` parses that a user hands it (safetensors, GGUF, `adapter_config.json`,
//! `config.json`, training JSONL, `--config` TOML) fed valid bytes with random mutations (bytes
//! overwritten, cut short, bytes inserted): each reader returns a value or an error, never
//! panics and never hangs.

use bft_engine::{DType, Device, Tensor};
use bft_model::lora::parse_adapter_config;
use bft_model::weights::write_safetensors;
use bft_model::{GgufFile, LoraConfig, ModelConfig, SafetensorsDir, Transformer, WeightSource};
use bft_tests::{case_path, mutation, no_panic_no_hang};
use proptest::prelude::*;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn valid_safetensors() -> Vec<u8> {
    let p = case_path("valid.safetensors");
    let a = Tensor::from_vec(
        vec![1.0f32, -2.0, 3.5, 0.25, 8.0, -1.0],
        [2, 3],
        &Device::Cpu,
    )
    .unwrap();
    let b = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], [4], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    write_safetensors(&p, &[("a".to_string(), &a), ("b".to_string(), &b)]).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).ok();
    bytes
}

/// A small GGUF v3 file by hand: a llama config, a three-token BPE tokenizer, one F32 and one
/// Q8_0 tensor.
fn valid_gguf() -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(2u64.to_le_bytes()); // tensors
    let meta_u32: [(&str, u32); 7] = [
        ("general.alignment", 32),
        ("llama.embedding_length", 4),
        ("llama.feed_forward_length", 8),
        ("llama.block_count", 1),
        ("llama.attention.head_count", 2),
        ("llama.attention.head_count_kv", 1),
        ("llama.context_length", 64),
    ];
    out.extend((meta_u32.len() as u64 + 4).to_le_bytes());
    for (k, v) in meta_u32 {
        string(&mut out, k);
        out.extend(4u32.to_le_bytes());
        out.extend(v.to_le_bytes());
    }
    for (k, v) in [
        ("general.architecture", "llama"),
        ("tokenizer.ggml.model", "gpt2"),
    ] {
        string(&mut out, k);
        out.extend(8u32.to_le_bytes());
        string(&mut out, v);
    }
    for (k, items) in [
        ("tokenizer.ggml.tokens", &["a", "b", "ab"][..]),
        ("tokenizer.ggml.merges", &["a b"][..]),
    ] {
        string(&mut out, k);
        out.extend(9u32.to_le_bytes());
        out.extend(8u32.to_le_bytes());
        out.extend((items.len() as u64).to_le_bytes());
        for s in items {
            string(&mut out, s);
        }
    }
    // token_embd (3, 4) F32 at offset 0; a Q8_0 block of 32 after it (offset 64, aligned).
    string(&mut out, "token_embd.weight");
    out.extend(2u32.to_le_bytes());
    out.extend(4u64.to_le_bytes());
    out.extend(3u64.to_le_bytes());
    out.extend(0u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    string(&mut out, "output_norm.weight");
    out.extend(1u32.to_le_bytes());
    out.extend(32u64.to_le_bytes());
    out.extend(8u32.to_le_bytes());
    out.extend(64u64.to_le_bytes());
    out.resize(out.len().div_ceil(32) * 32, 0);
    for i in 0..12 {
        out.extend((i as f32 * 0.5).to_le_bytes());
    }
    out.resize(out.len() + 16, 0);
    out.extend(half::f16::from_f32(0.1).to_le_bytes());
    out.extend((0..32).map(|i| i as u8));
    out
}

const ADAPTER_CONFIG: &str = r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2,
  "lora_alpha": 4.0, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
  "bias": "none", "fan_in_fan_out": false, "use_rslora": false, "use_dora": false,
  "modules_to_save": null, "layers_to_transform": null, "rank_pattern": {}, "alpha_pattern": {}}"#;

const MODEL_CONFIG: &str = r#"{"model_type": "qwen2", "hidden_size": 8, "intermediate_size": 12,
  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 11,
  "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true,
  "max_position_embeddings": 128}"#;

const JSONL: &str = concat!(
    r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does TP53 do?"}, {"role": "assistant", "content": "It suppresses tumors."}]}"#,
    "\n",
    r#"{"messages": [{"role": "user", "content": "Name the gene for insulin."}, {"role": "assistant", "content": "INS"}]}"#,
    "\n",
    r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye"}]}"#,
    "\n",
);

const TOML: &str = "model = \"smollm2\"\nlr = 2e-4\nbatch_size = 2\nlora_targets = [\"q\", \"v\"]\n\
                    checkpointing = true\n[extra]\nkey = 1\n";

/// A command with the kinds of options `bft train` has, for the TOML layering.
fn cli() -> clap::Command {
    use clap::{Arg, ArgAction, Command};
    Command::new("bft").subcommand(
        Command::new("train")
            .arg(Arg::new("model").long("model"))
            .arg(Arg::new("lr").long("lr"))
            .arg(Arg::new("batch-size").long("batch-size"))
            .arg(Arg::new("lora-targets").long("lora-targets"))
            .arg(
                Arg::new("checkpointing")
                    .long("checkpointing")
                    .action(ArgAction::SetTrue),
            )
            .arg(Arg::new("config").long("config")),
    )
}

fn write_case(name: &str, bytes: &[u8]) -> PathBuf {
    let p = case_path(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Opens a safetensors file and reads every tensor it lists.
fn read_safetensors(p: &Path) -> Result<usize, bft_model::Error> {
    let st = SafetensorsDir::open_file(p)?;
    let names: Vec<String> = st.names().iter().map(|s| s.to_string()).collect();
    for n in &names {
        st.tensor(n)?;
    }
    Ok(names.len())
}

#[test]
fn the_valid_files_parse() {
    let p = write_case("st", &valid_safetensors());
    assert_eq!(read_safetensors(&p).unwrap(), 2);
    let g = GgufFile::open(&write_case("m.gguf", &valid_gguf())).unwrap();
    assert_eq!(g.hf_config().unwrap()["hidden_size"], 4);
    assert_eq!(
        g.tensor("model.embed_tokens.weight")
            .unwrap()
            .unwrap()
            .dims(),
        [3, 4]
    );
    assert_eq!(g.tensor("model.norm.weight").unwrap().unwrap().dims(), [32]);
    let tok = bft_model::tokenizer_from_gguf(&g).unwrap();
    assert_eq!(tok.get_vocab_size(true), 3);
    assert_eq!(parse_adapter_config(ADAPTER_CONFIG).unwrap().rank, 2);
    assert_eq!(ModelConfig::from_json(MODEL_CONFIG).unwrap().layers, 1);
    let data = write_case("data.jsonl", JSONL.as_bytes());
    assert_eq!(
        bft_trainer::data::read_jsonl(&data, false)
            .unwrap()
            .conversations
            .len(),
        3
    );
    // The valid TOML has a table the command lacks: refused, naming the file and line 6.
    let toml = write_case("config.toml", TOML.as_bytes());
    let argv = |p: &Path| -> Vec<OsString> {
        ["bft", "train", "--config"]
            .iter()
            .map(OsString::from)
            .chain([p.as_os_str().to_owned()])
            .collect()
    };
    let err = bft_trainer::config_file::with_config(&cli(), argv(&toml)).unwrap_err();
    assert!(
        err.to_string().ends_with(&format!(
            "{}:6: `extra` is not an option of `bft train` (see bft train --help)",
            toml.display()
        )),
        "{err}"
    );
    let ok = write_case(
        "config.toml",
        TOML.split("[extra]").next().unwrap().as_bytes(),
    );
    let layered = bft_trainer::config_file::with_config(&cli(), argv(&ok)).unwrap();
    let layered: Vec<String> = layered
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        &layered[..6],
        [
            "bft",
            "train",
            "--batch-size=2",
            "--checkpointing",
            "--lora-targets=q,v",
            "--lr=0.0002"
        ]
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn mutated_safetensors_are_read_or_refused(m in mutation()) {
        let p = write_case("st", &m.apply(&valid_safetensors()));
        let q = p.clone();
        no_panic_no_hang(Duration::from_secs(20), move || read_safetensors(&q).map(|_| ()).ok());
        std::fs::remove_file(&p).ok();
    }

    #[test]
    fn mutated_gguf_files_are_read_or_refused(m in mutation()) {
        let p = write_case("m.gguf", &m.apply(&valid_gguf()));
        let q = p.clone();
        no_panic_no_hang(Duration::from_secs(20), move || {
            let Ok(g) = GgufFile::open(&q) else { return };
            g.hf_config().ok();
            g.config().ok();
            g.tensor("model.embed_tokens.weight").ok();
            g.tensor("model.norm.weight").ok();
            bft_model::tokenizer_from_gguf(&g).ok();
        });
        std::fs::remove_file(&p).ok();
    }

    #[test]
    fn mutated_adapter_configs_are_parsed_or_refused(m in mutation()) {
        let text = String::from_utf8_lossy(&m.apply(ADAPTER_CONFIG.as_bytes())).into_owned();
        let parsed = no_panic_no_hang(Duration::from_secs(20), move || parse_adapter_config(&text));
        if let Ok(cfg) = parsed {
            prop_assert!(cfg.rank >= 1 && cfg.alpha.is_finite() && cfg.alpha > 0.0);
            prop_assert!((0.0..1.0).contains(&cfg.dropout) && !cfg.targets.is_empty());
        }
    }

    #[test]
    fn mutated_model_configs_are_parsed_or_refused(m in mutation()) {
        let text = String::from_utf8_lossy(&m.apply(MODEL_CONFIG.as_bytes())).into_owned();
        let parsed = no_panic_no_hang(Duration::from_secs(20), move || ModelConfig::from_json(&text));
        if let Ok(cfg) = parsed {
            prop_assert!(cfg.layers >= 1 && cfg.vocab >= 1 && cfg.hidden >= 1);
            prop_assert!(cfg.rms_eps.is_finite() && cfg.rms_eps > 0.0);
        }
    }

    #[test]
    fn mutated_jsonl_is_read_or_refused(m in mutation(), skip in any::<bool>()) {
        let p = write_case("data.jsonl", &m.apply(JSONL.as_bytes()));
        let q = p.clone();
        let read = no_panic_no_hang(Duration::from_secs(20), move || {
            bft_trainer::data::read_jsonl(&q, skip).map(|d| (d.conversations.len(), d.skipped))
        });
        match read {
            Ok((n, skipped)) => prop_assert!(n + skipped <= JSONL.len()),
            // A refusal names the file (and the line where there is one).
            Err(e) => prop_assert!(e.to_string().contains(&p.display().to_string()), "{}", e),
        }
        std::fs::remove_file(&p).ok();
    }

    #[test]
    fn mutated_toml_configs_are_layered_or_refused(m in mutation()) {
        let p = write_case("config.toml", &m.apply(TOML.as_bytes()));
        let argv: Vec<OsString> = ["bft", "train", "--config"]
            .iter()
            .map(OsString::from)
            .chain([p.clone().into_os_string()])
            .collect();
        let layered = no_panic_no_hang(Duration::from_secs(20), move || {
            bft_trainer::config_file::with_config(&cli(), argv).map(|a| a.len())
        });
        if let Err(e) = layered {
            prop_assert!(e.to_string().contains(&p.display().to_string()), "{}", e);
        }
        std::fs::remove_file(&p).ok();
    }

    /// A tiny model loads a mutated adapter file (config valid): it is applied whole or
    /// refused, and a refused load leaves the model without adapters.
    #[test]
    fn mutated_adapter_weights_are_applied_or_refused(m in mutation()) {
        let dir = case_path("adapter");
        std::fs::create_dir_all(&dir).unwrap();
        let mut model = tiny_model();
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: LoraConfig::parse_targets("q,v").unwrap(),
        };
        model.attach_lora(&cfg, 1).unwrap();
        model.save_peft(&cfg, "tiny", &dir).unwrap();
        let st = dir.join("adapter_model.safetensors");
        let bytes = m.apply(&std::fs::read(&st).unwrap());
        std::fs::write(&st, bytes).unwrap();
        let d = dir.clone();
        let (loaded, adapters) = no_panic_no_hang(Duration::from_secs(20), move || {
            let mut fresh = tiny_model();
            let r = fresh.load_peft(&d).map(|_| ());
            (r, fresh.lora_tensors().len())
        });
        prop_assert_eq!(adapters, if loaded.is_ok() { 4 } else { 0 });
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// A gene-embeddings file as `bft embed` writes it: three genes, four dimensions.
fn valid_embeddings() -> Vec<u8> {
    let p = case_path("emb.safetensors");
    bft_trainer::eval::ggi::GeneEmbeddings {
        genes: vec!["TP53".into(), "BRCA1".into(), "INS".into()],
        dim: 4,
        data: (0..12).map(|i| i as f32 / 12.0).collect(),
    }
    .write(&p, &[("encoder", "minilm".into())])
    .unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).ok();
    bytes
}

const GENES: &str = "# genes\nTP53\nBRCA1\n\nINS  # insulin\n";
const GGI_TEXT: &str = "TP53 BRCA1\nINS TP53\nBRCA1 INS\n";
const GGI_LABELS: &str = "1\n0\n1\n";
const TEXTS: &str = "{\"text\": \"TP53 is a tumor suppressor.\"}\n{\"text\": \"insulin\"}\n";

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Embeddings files: read whole (rows x dim matching the genes, all finite) or refused
    /// naming the file.
    #[test]
    fn mutated_embeddings_are_read_or_refused(m in mutation()) {
        let p = write_case("emb.safetensors", &m.apply(&valid_embeddings()));
        let q = p.clone();
        let read = no_panic_no_hang(Duration::from_secs(20), move || {
            bft_trainer::eval::ggi::GeneEmbeddings::read(&q)
        });
        match read {
            Ok(e) => {
                prop_assert_eq!(e.data.len(), e.genes.len() * e.dim);
                prop_assert!(e.data.iter().all(|v| v.is_finite()));
            }
            Err(e) => prop_assert!(e.to_string().contains(&p.display().to_string()), "{}", e),
        }
        std::fs::remove_file(&p).ok();
    }

    /// Gene lists, GGI pair files and text files: parsed, or refused naming the file.
    #[test]
    fn mutated_gene_lists_pairs_and_texts_are_parsed_or_refused(
        g in mutation(), t in mutation(), l in mutation(), x in mutation(), jsonl in any::<bool>()
    ) {
        let text = |m: &bft_tests::Mutation, s: &str| String::from_utf8_lossy(&m.apply(s.as_bytes())).into_owned();
        let (genes, pairs, labels, texts) = (text(&g, GENES), text(&t, GGI_TEXT), text(&l, GGI_LABELS), text(&x, TEXTS));
        let r = no_panic_no_hang(Duration::from_secs(20), move || {
            let known: std::collections::HashSet<String> =
                ["TP53", "BRCA1", "INS"].map(String::from).into();
            (
                bft_trainer::embed::parse_gene_list(&genes, "g.txt", &known).map(|v| v.len()),
                bft_trainer::eval::ggi::parse_pairs(&pairs, &labels, "p.txt", "l.txt")
                    .map(|p| (p.genes.len(), p.labels.len())),
                bft_trainer::embed::parse_texts(&texts, "t.jsonl", jsonl).map(|v| v.len()),
            )
        });
        match r.0 {
            Ok(n) => prop_assert!((1..=3).contains(&n)),
            Err(e) => prop_assert!(e.to_string().starts_with("g.txt"), "{}", e),
        }
        match r.1 {
            Ok((a, b)) => prop_assert_eq!(a, b),
            Err(e) => prop_assert!(e.to_string().contains("p.txt") || e.to_string().contains("l.txt"), "{}", e),
        }
        if let Err(e) = r.2 {
            prop_assert!(e.to_string().starts_with("t.jsonl"), "{}", e);
        }
    }
}

fn tiny_model() -> Transformer {
    Transformer::random(ModelConfig::from_json(MODEL_CONFIG).unwrap(), 3, DType::F32).unwrap()
}
