//! Roofline probes: the machine's measured f32 FMA peak and memory bandwidth, so benchmark
//! percentages are against what this machine really does, not a datasheet.

use rayon::prelude::*;
use std::time::Instant;

/// Independent FMA chains per thread: enough to cover FMA latency (4 cycles) times two pipes.
const CHAINS: usize = 12;

/// Best measured f32 FLOP/s over all threads, using the widest FMA the CPU has.
pub fn peak_f32_flops(seconds: f64) -> f64 {
    best_rate(seconds, fma_loop)
}

/// Best measured bf16 FLOP/s (`vdpbf16ps`: 32 multiply-adds an instruction), or `None` when the
/// CPU lacks AVX512-BF16: the ceiling of `bf16_gemm`.
pub fn peak_bf16_flops(seconds: f64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if super::bf16_gemm::available() {
        // SAFETY: `available` checked AVX-512F and AVX512-BF16, the loop's target features.
        return Some(best_rate(seconds, |iters, seed| unsafe {
            x86::dpbf16(iters, seed)
        }));
    }
    let _ = seconds;
    None
}

/// The best of three timed runs of `work(iters, seed)` (which returns the FLOPs it did) on
/// every thread at once.
fn best_rate(seconds: f64, work: impl Fn(usize, f32) -> f64 + Sync) -> f64 {
    let threads = rayon::current_num_threads();
    let iters = calibrate(seconds / 3.0, &work);
    (0..3)
        .map(|_| {
            let t0 = Instant::now();
            let flops: f64 = (0..threads)
                .into_par_iter()
                .map(|i| work(iters, i as f32))
                .sum();
            flops / t0.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn calibrate(seconds: f64, work: &impl Fn(usize, f32) -> f64) -> usize {
    let mut iters = 1 << 16;
    loop {
        let t0 = Instant::now();
        std::hint::black_box(work(iters, 1.0));
        let dt = t0.elapsed().as_secs_f64();
        if dt > 0.02 {
            return ((iters as f64) * seconds / dt).max(1.0) as usize;
        }
        iters *= 4;
    }
}

/// Runs `iters` rounds of CHAINS independent vector FMAs; returns the FLOPs done.
fn fma_loop(iters: usize, seed: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU reports AVX-512F, which this function's target feature requires.
            return unsafe { x86::fma512(iters, seed) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU reports AVX2 and FMA, which this function's target features require.
            return unsafe { x86::fma256(iters, seed) };
        }
    }
    scalar_fma(iters, seed)
}

fn scalar_fma(iters: usize, seed: f32) -> f64 {
    let mut acc = [seed; CHAINS];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    (iters * CHAINS * 2) as f64
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) fn fma512(iters: usize, seed: f32) -> f64 {
        let mut acc = [_mm512_set1_ps(seed); CHAINS];
        let (m, a) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, m, a);
            }
        }
        std::hint::black_box(acc);
        (iters * CHAINS * 16 * 2) as f64
    }

    /// CHAINS independent `vdpbf16ps` accumulators: each instruction is 16 lanes of two
    /// multiply-adds.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn dpbf16(iters: usize, seed: f32) -> f64 {
        let mut acc = [_mm512_set1_ps(seed); CHAINS];
        // SAFETY: __m512i and __m512bh are both 64 bytes of lanes; the transmute relabels them.
        let (x, y): (__m512bh, __m512bh) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3f80_3f80)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3380_3380)),
            )
        };
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, x, y);
            }
        }
        std::hint::black_box(acc);
        (iters * CHAINS * 16 * 4) as f64
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn fma256(iters: usize, seed: f32) -> f64 {
        let mut acc = [_mm256_set1_ps(seed); CHAINS];
        let (m, a) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, m, a);
            }
        }
        std::hint::black_box(acc);
        (iters * CHAINS * 8 * 2) as f64
    }
}

/// Best measured copy bandwidth in bytes/s (read + write counted) over 12 copies of buffers
/// well beyond the last-level cache.
pub fn memory_bandwidth(bytes: usize) -> f64 {
    let n = bytes / 4;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let chunk = n.div_ceil(rayon::current_num_threads() * 4).max(1);
    (0..12)
        .map(|_| {
            let t0 = Instant::now();
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
            std::hint::black_box(&dst);
            (2 * n * 4) as f64 / t0.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}
