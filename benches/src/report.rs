//! The roofline, the record written per kernel, and the printed table.

use bft_kernels::cpu::peak::{memory_bandwidth, peak_bf16_flops, peak_f32_flops};
use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Peak {
    pub gflops: f64,
    pub gbps: f64,
    /// The `vdpbf16ps` peak; NaN where the CPU lacks AVX512-BF16 (no bf16 rows then).
    pub bf16_gflops: f64,
}

impl Peak {
    pub fn measure(quick: bool) -> Peak {
        let secs = if quick { 1.0 } else { 3.0 };
        Peak {
            gflops: peak_f32_flops(secs) / 1e9,
            gbps: memory_bandwidth(256 << 20) / 1e9,
            bf16_gflops: peak_bf16_flops(secs).map_or(f64::NAN, |f| f / 1e9),
        }
    }

    /// No roofline (device backends).
    pub fn unmeasured() -> Peak {
        Peak {
            gflops: f64::NAN,
            gbps: f64::NAN,
            bf16_gflops: f64::NAN,
        }
    }

    /// Re-measures the FLOP peak briefly and keeps the larger value. On a VM the two vCPUs
    /// are sometimes SMT siblings of one core (halving the FMA peak) and sometimes not, so
    /// compute-bound rows re-measure right before they run; a peak is a ceiling, so the
    /// highest value seen is the estimate.
    pub fn refresh_flops(&mut self) {
        self.gflops = self.gflops.max(peak_f32_flops(0.5) / 1e9);
    }

    /// As `refresh_flops`, for the bf16 peak.
    pub fn refresh_bf16_flops(&mut self) {
        if let Some(f) = peak_bf16_flops(0.5) {
            self.bf16_gflops = self.bf16_gflops.max(f / 1e9);
        }
    }
}

/// One benchmark result. `pct_of_peak` is against FLOP/s for compute-bound kernels and
/// against bandwidth for memory-bound ones. `max_rel_err` is the validation error:
/// `max |fast - ref| / max |ref|` over the output.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub kernel: String,
    pub backend: &'static str,
    pub dtype: &'static str,
    pub shape: String,
    pub time_us: f64,
    pub gflops: f64,
    pub gbps: f64,
    pub pct_of_peak: f64,
    pub max_rel_err: f64,
    /// The roofline this row's percentage is against (GFLOP/s or GB/s).
    pub roofline: f64,
    /// Peak bytes of engine tensor storage during the run, where measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_bytes: Option<usize>,
}

pub fn print_header() {
    println!(
        "{:<34} {:<34} {:>11} {:>9} {:>8} {:>7} {:>9} {:>10}",
        "kernel", "shape", "time", "GFLOP/s", "GB/s", "%peak", "rel err", "peak mem"
    );
    println!("{}", "-".repeat(130));
}

pub fn print_row(r: &Record) {
    let time = if r.time_us >= 1e4 {
        format!("{:.2} ms", r.time_us / 1e3)
    } else {
        format!("{:.1} us", r.time_us)
    };
    let mem = r
        .peak_bytes
        .map(|b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64))
        .unwrap_or_default();
    let pct = if r.pct_of_peak.is_finite() {
        format!("{:.1}%", r.pct_of_peak)
    } else {
        "n/a".into()
    };
    println!(
        "{:<34} {:<34} {:>11} {:>9.1} {:>8.1} {:>7} {:>9.1e} {:>10}",
        r.kernel, r.shape, time, r.gflops, r.gbps, pct, r.max_rel_err, mem
    );
}
