//! CPU kernels: rayon for parallel loops, the `gemm` crate for matrix products, hand-written
//! cache-friendly loops for the rest. Every kernel is generic over [`Float`] so the same code
//! runs in f32 (training) and f64 (finite-difference gradient checks).

/// Compiles each wrapped function once more for AVX-512 and once for AVX2+FMA, and calls the
/// widest one the CPU has (checked once): the build targets baseline x86-64, where the
/// compiler vectorises elementwise loops (exp, sigmoid, norms, the optimizer) 4 lanes wide;
/// AVX-512 does 16. The clones compute the same values: Rust never contracts a multiply and an
/// add into an FMA on its own or reorders a float sum, so only the instructions differ.
///
/// Only code inlined into the wrapped function gets the wider instructions. A closure handed
/// to rayon is a function of its own, compiled for baseline x86-64 wherever it is written (so
/// SwiGLU's loop ran 3x slower inside a `simd!` function). A parallel kernel is therefore a
/// plain function whose closures call a `simd!` function with the loop: a chunk, rows or a task.
macro_rules! simd {
    ($($item:item)*) => {
        $(
            #[multiversion::multiversion(targets(
                "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
                "x86_64+avx2+fma",
            ))]
            $item
        )*
    };
}
pub(crate) use simd;

/// `n` zeros (`T::default()`) for an op's output buffer, written by the pool's threads in
/// chunks once `n` is large. `vec!` zero-fills on the calling thread when the allocator hands
/// back reused heap memory (every step, in training): megabytes an op, during which the other
/// threads of the pool sat idle (Zen 3, 2 threads: the second thread idle about 7% of an f32
/// step, a serial `memset` the largest part).
pub fn zeroed<T: Default + Copy + Send + Sync>(n: usize) -> Vec<T> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    /// Elements per task; a buffer of fewer than two tasks' worth is filled on this thread.
    const CHUNK: usize = 1 << 16;
    if n < 2 * CHUNK {
        return vec![T::default(); n];
    }
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .for_each(|c| c.fill(MaybeUninit::new(T::default())));
    // SAFETY: the loop above wrote all n elements.
    unsafe { v.set_len(n) };
    v
}

/// A cache line of f32. Buffers made of these start on a 64-byte boundary, so a kernel that
/// walks them a zmm (64 bytes) at a time along rows of whole lines never touches two lines at
/// once; a `Vec` of f32 or u32 starts where the allocator puts it (16, 32 or 48 bytes past a
/// line about half of the time), which split every such access.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
pub(crate) struct Line([f32; 16]);

// SAFETY: sixteen f32 and nothing else (repr(C), 64 bytes, no padding): all-zero bytes are
// a valid `Line` and so is any bit pattern, which is what `Zeroable` and `Pod` require.
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: as above; `Line` is `Copy` and `'static`.
unsafe impl bytemuck::Pod for Line {}

/// `len` zeros of `T` in whole `Line`s (zeroed by the pool where large, as `zeroed`).
pub(crate) struct LineAligned<T> {
    lines: Vec<Line>,
    len: usize,
    _elem: std::marker::PhantomData<T>,
}

impl<T: bytemuck::Pod> LineAligned<T> {
    pub(crate) fn zeros(len: usize) -> Self {
        LineAligned {
            lines: zeroed((len * std::mem::size_of::<T>()).div_ceil(64)),
            len,
            _elem: std::marker::PhantomData,
        }
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for LineAligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }
}

impl<T: bytemuck::Pod> std::ops::DerefMut for LineAligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

/// An output element that a kernel writes once and never reads: `T` itself (a buffer the
/// caller has), or `MaybeUninit<T>`, the spare capacity of a fresh `Vec` (see [`written`]). A
/// new op output is then not zero-filled first only to be overwritten, a second pass over each
/// output byte (about 1.7 GB in a SmolLM2 training step of batch 4 x 256).
pub trait Slot<T>: Send {
    fn put(&mut self, v: T);
}

impl<T: Send> Slot<T> for T {
    #[inline(always)]
    fn put(&mut self, v: T) {
        *self = v;
    }
}

impl<T: Send> Slot<T> for std::mem::MaybeUninit<T> {
    #[inline(always)]
    fn put(&mut self, v: T) {
        self.write(v);
    }
}

/// A new buffer of `n` elements, written by `fill` into uninitialised memory.
///
/// # Safety
/// `fill` must write every one of the `n` elements.
pub unsafe fn written<T>(n: usize, fill: impl FnOnce(&mut [std::mem::MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the caller's contract: `fill` wrote all n elements.
    unsafe { v.set_len(n) };
    v
}

pub mod attention;
pub mod attention_bf16;
pub mod bf16_gemm;
pub mod binary;
pub mod cast;
pub mod embedding;
#[cfg(target_arch = "x86_64")]
pub mod fma_gemm;
#[cfg(target_arch = "x86_64")]
mod fma_tile;
pub mod layernorm;
pub mod layout;
pub mod lm_head;
pub mod matmul;
pub mod nll;
pub mod optim;
pub mod peak;
pub mod reduce;
pub mod rmsnorm;
pub mod rope;
pub mod softmax;
pub mod thin;
pub mod unary;
pub mod weights;

mod float;
pub use float::{Float, dot, max_of, sum_of};

/// Rows per rayon task for row-wise kernels: large enough to amortise scheduling, small enough
/// to balance 2..64 cores on the row counts of real models.
pub(crate) fn rows_per_task(rows: usize, cols: usize) -> usize {
    // Aim for roughly 32 KiB of f32 input per task.
    (8192 / cols.max(1)).clamp(1, rows.max(1))
}

/// The CPU's model name, from /proc/cpuinfo where there is one: benchmarks print it, since
/// what is fast differs between CPU kinds.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The GEMM kernels this CPU runs, in words (benchmarks and `bft info` print it).
pub fn kernels_picked() -> String {
    let bf16 = if bf16_gemm::available() {
        "hand-written AVX512-BF16 (vdpbf16ps)"
    } else if bf16_gemm::supported() {
        "hand-written AVX2+FMA (no AVX512-BF16 here: bf16 widened to f32 as it is packed, the \
         activation rounded to bf16 first)"
    } else {
        "unavailable on this CPU (neither AVX512-BF16 nor AVX2+FMA): products with a bf16 \
         weight widen both operands to f32, the activation rounded to bf16 first"
    };
    let f32 = if matmul::prefers_fma_kernel() {
        "hand-written AVX2+FMA (6x16 tiles, attention's tiles too; the `gemm` crate for other \
         products with n or k under 64 or m under 16)"
            .to_string()
    } else {
        format!("`gemm` crate ({})", f32_isa())
    };
    format!(
        "f32 GEMM {f32}; bf16 GEMM {bf16}; elementwise and row kernels {}",
        simd_isa()
    )
}

/// The clone of the `simd!` kernels this CPU runs (the macro's targets, widest first).
fn simd_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx2") && has!("fma") {
            return "AVX-512";
        }
        if has!("avx2") && has!("fma") {
            return "AVX2+FMA";
        }
    }
    "baseline"
}

/// The widest vector ISA the `gemm` crate dispatches to here.
fn f32_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "AVX-512";
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "AVX2+FMA";
        }
    }
    "scalar or NEON"
}

#[cfg(test)]
mod tests {
    use super::{LineAligned, written};

    /// Line-aligned buffers start on 64 bytes and hold exactly `len` zeros, for f32, f64 and
    /// u32 at lengths around a line and past the pool's parallel zeroing.
    #[test]
    fn line_aligned_buffers_start_on_a_line() {
        for len in [0, 1, 15, 16, 17, 1000, 3 << 20] {
            let a = LineAligned::<f32>::zeros(len);
            let b = LineAligned::<f64>::zeros(len);
            let c = LineAligned::<u32>::zeros(len);
            assert!(a.len() == len && a.iter().all(|&x| x == 0.0));
            assert!(b.len() == len && b.iter().all(|&x| x == 0.0));
            assert!(c.len() == len && c.iter().all(|&x| x == 0));
            for p in [
                a.as_ptr() as usize,
                b.as_ptr() as usize,
                c.as_ptr() as usize,
            ] {
                assert_eq!(p % 64, 0, "len {len}");
            }
        }
    }

    /// A kernel's output of `len` elements written by `fill` through `written` (into memory a
    /// freed buffer of NaN just gave back) against the same kernel's output into a zeroed
    /// buffer (`plain`): equal bit for bit and finite, so every element was written.
    fn check_written(
        len: usize,
        fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
        plain: impl FnOnce(&mut [f32]),
    ) {
        drop(vec![f32::NAN; len]);
        // SAFETY: the kernels under test write every element (what this test checks).
        let fresh = unsafe { written(len, fill) };
        let mut zeroed = vec![0f32; len];
        plain(&mut zeroed);
        assert!(
            fresh
                .iter()
                .zip(&zeroed)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert!(fresh.iter().all(|v| v.is_finite()));
    }

    /// The kernels whose outputs the engine takes fresh (`written`), over several tasks' worth
    /// of elements with a short last task.
    #[test]
    fn fresh_outputs_are_written_whole() {
        let data =
            |n: usize, s: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * s).sin()).collect() };
        let (rows, cols) = (70, 576);
        let n = rows * cols;
        let (x, y, z) = (data(n, 0.37), data(n, 0.11), data(n, 0.23));
        let w = data(cols, 0.5);
        check_written(
            n,
            |o| super::unary::swiglu(&x, &y, o),
            |o| super::unary::swiglu(&x, &y, o),
        );
        // Both outputs of the backward, each checked while the other is fresh memory too.
        let bwd = |first: bool, o: &mut [_], other: &mut [_]| {
            let (dg, du) = if first { (o, other) } else { (other, o) };
            super::unary::swiglu_backward(&x, &y, &z, dg, du)
        };
        let bwd_plain = |first: bool, o: &mut [f32], other: &mut [f32]| {
            let (dg, du) = if first { (o, other) } else { (other, o) };
            super::unary::swiglu_backward(&x, &y, &z, dg, du)
        };
        for first in [true, false] {
            let mut spare = Vec::<f32>::with_capacity(n);
            check_written(
                n,
                |o| bwd(first, o, &mut spare.spare_capacity_mut()[..n]),
                |o| bwd_plain(first, o, &mut vec![0f32; n]),
            );
        }
        for kind in [
            super::binary::BinaryKind::Add,
            super::binary::BinaryKind::Mul,
        ] {
            // b broadcast over rows of a.
            check_written(
                n,
                |o| super::binary::binary(kind, &x, &w, o),
                |o| super::binary::binary(kind, &x, &w, o),
            );
        }
        let h = |n| vec![0f32; n];
        check_written(
            n,
            |o| super::rmsnorm::rmsnorm(&x, &w, 1e-5, o, &mut h(rows)),
            |o| super::rmsnorm::rmsnorm(&x, &w, 1e-5, o, &mut h(rows)),
        );
        check_written(
            n,
            |o| super::rmsnorm::add_rmsnorm((&x, &y), &w, 1e-5, &mut h(n), o, &mut h(rows)),
            |o| super::rmsnorm::add_rmsnorm((&x, &y), &w, 1e-5, &mut h(n), o, &mut h(rows)),
        );
        let rstd = data(rows, 0.3)
            .iter()
            .map(|v| v.abs() + 0.5)
            .collect::<Vec<_>>();
        check_written(
            n,
            |o| super::rmsnorm::rmsnorm_backward(&x, &w, &rstd, &y, o, None),
            |o| super::rmsnorm::rmsnorm_backward(&x, &w, &rstd, &y, o, None),
        );
        // 70 heads of (t, d) = (9, 64).
        let (t, d) = (9, 64);
        let (cos, sin) = (data(t * d / 2, 0.7), data(t * d / 2, 0.9));
        let m = 70 * t * d;
        check_written(
            m,
            |o| super::rope::rope(&x[..m], &cos, &sin, t, d, true, o),
            |o| super::rope::rope(&x[..m], &cos, &sin, t, d, true, o),
        );
        // (2, 35, 9, 64) -> (2, 9, 35, 64), whole rows; and a last axis moved.
        for perm in [[0, 2, 1, 3], [3, 1, 2, 0]] {
            let dims = [2, 35, 9, 64];
            check_written(
                m,
                |o| super::layout::permute(&x[..m], &dims, &perm, o),
                |o| super::layout::permute(&x[..m], &dims, &perm, o),
            );
        }
    }

    /// Every element is zero on both sides of the parallel threshold and with a short last
    /// chunk, in memory that a freed buffer of non-zero values just gave back to the allocator.
    #[test]
    fn zeroed_buffers_hold_only_zeros() {
        for n in [0, 5, (1 << 17) - 1, 1 << 17, 3 * (1 << 16) + 7] {
            drop(vec![f32::NAN; n]);
            let v = super::zeroed::<f32>(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|x| x.to_bits() == 0), "n = {n}");
        }
    }
}
