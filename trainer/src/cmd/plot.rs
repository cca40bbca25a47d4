//! `bft plot DIR`: redraws a run's loss curve (DIR/loss.svg) from its metrics, e.g. while it is
//! running.

use anyhow::Result;
use std::path::Path;

pub fn run(dir: &Path) -> Result<()> {
    if !dir.join("metrics.jsonl").exists() {
        anyhow::bail!("{} has no metrics.jsonl", dir.display());
    }
    let out = bft_trainer::plot::plot_run(dir, &dir.display().to_string())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
