//! `bft sweep`: trains every variant x learning rate x seed of a sweep file, evaluates each
//! run and writes report.md and report.html (`bft_trainer::sweep`).

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    /// The sweep file (TOML): model, data, evaluation suites and the grid of variants, seeds and
    /// learning rates. Without it, the built-in default sweep (`--print-config` shows it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The sweep's directory: runs/<run>/ (metrics, adapter, result.json), report.md,
    /// report.html. Started again, it continues: finished runs are skipped, an interrupted one
    /// resumes from its checkpoint.
    #[arg(long, default_value = "bft-sweep")]
    pub output: PathBuf,
    /// Two variants, one seed, 4 steps and a few items of each suite: the whole pipeline in
    /// about a minute.
    #[arg(long)]
    pub quick: bool,
    /// Print the built-in default sweep file and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Model cache (default: $BFT_CACHE or ~/.cache/bft).
    #[arg(long)]
    pub cache: Option<PathBuf>,
}

pub fn run(a: SweepArgs) -> Result<()> {
    use bft_trainer::sweep::{ConsoleProgress, DEFAULT_CONFIG, Registry, run_file};
    if a.print_config {
        print!("{DEFAULT_CONFIG}");
        return Ok(());
    }
    let cache = crate::cli::cache_dir(a.cache.as_deref())?;
    let results = run_file(
        a.config.as_deref(),
        a.quick,
        &a.output,
        &cache,
        &Registry::default(),
        &mut ConsoleProgress::default(),
    )?;
    // The report's introduction and main table; the rest is in the files.
    let md = std::fs::read_to_string(a.output.join("report.md")).unwrap_or_default();
    println!("{}", md.split("\n## Gene-set").next().unwrap_or_default());
    eprintln!(
        "{} runs; report: {} and {}",
        results.len(),
        a.output.join("report.md").display(),
        a.output.join("report.html").display()
    );
    Ok(())
}
