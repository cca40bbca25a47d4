//! `bft-bench`: the kernel benchmark suite.
//!
//! For every kernel: validate against a plain f64 reference, then time it at shapes from real
//! model configs, and report time, GFLOP/s, GB/s and the percentage of this machine's measured
//! roofline (a peak-FMA loop and a memory-copy probe), as a table and as JSON records.

mod cases;
mod cuda_cases;
mod reference;
mod report;
mod timing;
mod wgpu_cases;

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};
use report::{Peak, Record};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    Cpu,
    Cuda,
    Wgpu,
}

/// Times every kernel against this machine's measured roofline.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Small shapes and short timing loops (about a minute on 2 cores); what CI runs.
    #[arg(long)]
    quick: bool,
    /// Which backend's kernels to time.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// Only kernels whose name contains this text (e.g. `gemm`, `attention`).
    #[arg(long)]
    filter: Option<String>,
    /// Also write the records as a JSON array to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let threads = rayon::current_num_threads();
    println!("CPU: {}", bft_kernels::cpu::cpu_model());
    let mut peak = if args.backend != Backend::Cpu {
        Peak::unmeasured()
    } else {
        println!("kernels: {}", bft_kernels::cpu::kernels_picked());
        eprintln!("measuring the roofline on {threads} threads...");
        let peak = Peak::measure(args.quick);
        let bf16 = if peak.bf16_gflops.is_nan() {
            String::new()
        } else {
            format!(", {:.1} GFLOP/s bf16 (vdpbf16ps loop)", peak.bf16_gflops)
        };
        println!(
            "peak: {:.1} GFLOP/s f32 (FMA loop, {threads} threads){bf16}, {:.1} GB/s (copy, read+write)\n",
            peak.gflops, peak.gbps
        );
        peak
    };
    let cases = match args.backend {
        Backend::Wgpu => {
            let g = bft_kernels::wgpu::gpu(0)?;
            println!(
                "wgpu adapter: {} (no measured roofline: no %peak)\n",
                g.describe()
            );
            wgpu_cases::all(&g, args.quick)
        }
        Backend::Cuda => {
            let d = bft_kernels::cuda::cuda(0)?;
            println!(
                "CUDA device: {} (no measured roofline: no %peak)\n",
                d.describe()
            );
            cuda_cases::all(&d, args.quick)
        }
        _ => cases::all(args.quick),
    };
    let mut records: Vec<Record> = Vec::new();
    report::print_header();
    for case in cases {
        if args
            .filter
            .as_deref()
            .is_some_and(|f| !case.name.contains(f))
        {
            continue;
        }
        let record = case.run(&mut peak, args.quick)?;
        cases::check_error(&record)?;
        report::print_row(&record);
        records.push(record);
    }
    if records.is_empty() {
        bail!(
            "no kernel matches --filter {:?}",
            args.filter.unwrap_or_default()
        );
    }
    if let Some(path) = &args.json {
        let out = serde_json::json!({ "peak": peak, "threads": threads, "records": records });
        // `peak.gflops` is the highest FMA peak seen during the run; each record carries the
        // roofline its percentage used.
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
