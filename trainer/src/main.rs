//! `bft`: the trainer binary. Training, scoring and evaluation subcommands arrive with the
//! trainer issue; today it reports what this build can run on.

use anyhow::Result;
use clap::{Parser, Subcommand};

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
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Info => info(),
    }
}

fn info() -> Result<()> {
    use bft_engine::{Device, Op};
    println!("bft {}", env!("CARGO_PKG_VERSION"));
    println!(
        "backends: {} (CUDA and wgpu are not built yet)",
        Device::Cpu
    );
    println!(
        "cpu threads: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let ops: Vec<String> = Op::ALL.iter().map(|op| format!("{op:?}")).collect();
    println!("ops: {}", ops.join(", "));
    Ok(())
}
