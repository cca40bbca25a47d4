//! Batched GEMM through the `gemm` crate (runtime-dispatched AVX2/AVX-512/NEON micro-kernels).
//!
//! Transposed operands cost nothing: `gemm` takes row and column strides, so a transposed
//! operand is the same buffer read with swapped strides.

use super::Float;
use super::bf16_gemm::SharedOut;
use gemm::Parallelism;
use std::cell::Cell;
use std::mem::MaybeUninit;
use std::time::Instant;

/// One matrix operand: a buffer holding `batch` matrices laid out row-major, either as stored
/// (`rows x cols`) or read transposed.
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a, T> {
    pub data: &'a [T],
    /// Read the stored matrix transposed.
    pub trans: bool,
    /// Elements between consecutive matrices of the batch; 0 broadcasts one matrix to all.
    pub batch_stride: usize,
}

/// Sizes of `C (batch, m, n) = op(A) (batch, m, k) . op(B) (batch, k, n)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

thread_local! {
    /// While profiling: (seconds, flops) of the `matmul` calls this thread made.
    static COUNTERS: Cell<Option<(f64, f64)>> = const { Cell::new(None) };
}

/// Starts (zeroed) or stops counting the time and flops of this thread's `matmul` calls, and
/// returns what was counted since it started: the GEMM share of a profiled step.
pub fn gemm_counters(on: bool) -> (f64, f64) {
    COUNTERS.with(|c| c.replace(on.then_some((0.0, 0.0))).unwrap_or_default())
}

/// `c = op(a) . op(b)`, or `c += op(a) . op(b)` when `accumulate`. `c` is contiguous
/// `(batch, m, n)`. Panics if a buffer is too short: the engine checks shapes first.
pub fn matmul<T: Float>(
    dims: GemmDims,
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    c: &mut [T],
    accumulate: bool,
) {
    let out = SharedOut(c.as_mut_ptr());
    // SAFETY: `c` is a live slice, readable and writable over its length, borrowed mutably
    // for the call.
    counted(dims, || unsafe {
        matmul_raw(dims, a, b, out, c.len(), accumulate)
    })
}

/// `c = op(a) . op(b)` into memory that need not be initialised: every element of the first
/// `batch * m * n` is written and none is read, so an output buffer is not zero-filled first
/// (a serial pass over up to megabytes, per product, that the kernel would overwrite).
pub fn matmul_uninit<T: Float>(
    dims: GemmDims,
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    c: &mut [MaybeUninit<T>],
) {
    let out = SharedOut(c.as_mut_ptr().cast::<T>());
    // SAFETY: `c` is writable over its length; without accumulation no path reads it (the
    // `gemm` crate with `read_dst` false, `fma_gemm`, and the fill of a k = 0 product only
    // write).
    counted(dims, || unsafe {
        matmul_raw(dims, a, b, out, c.len(), false)
    })
}

/// Runs a GEMM of `dims`, adding its time and flops to this thread's counters while they are
/// on (every CPU GEMM kernel goes through here, f32 and bf16 alike).
pub(crate) fn counted<R>(dims: GemmDims, gemm: impl FnOnce() -> R) -> R {
    if COUNTERS.with(Cell::get).is_none() {
        return gemm();
    }
    let t0 = Instant::now();
    let out = gemm();
    let GemmDims { batch, m, n, k } = dims;
    let flops = 2.0 * (batch * m * n * k) as f64;
    let seconds = t0.elapsed().as_secs_f64();
    COUNTERS.with(|c| c.set(c.get().map(|(s, f)| (s + seconds, f + flops))));
    out
}

/// `matmul` on an output given as a pointer.
///
/// # Safety
/// `c` must be valid for writes of `c_len` elements, and for reads too when `accumulate`; no
/// other thread may touch them during the call.
unsafe fn matmul_raw<T: Float>(
    dims: GemmDims,
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    c: SharedOut<T>,
    c_len: usize,
    accumulate: bool,
) {
    let GemmDims { batch, m, n, k } = dims;
    assert!(c_len >= batch * m * n, "matmul: output buffer too short");
    if batch == 0 || m == 0 || n == 0 {
        return;
    }
    assert!(a.data.len() >= (batch - 1) * a.batch_stride + m * k);
    assert!(b.data.len() >= (batch - 1) * b.batch_stride + k * n);
    if k == 0 {
        if !accumulate {
            // SAFETY: the caller's contract covers batch * m * n <= c_len writes.
            unsafe { std::ptr::write_bytes(c.0, 0, batch * m * n) };
        }
        return;
    }
    // SAFETY: the caller's contract is `fma_f32`'s.
    if unsafe { fma_f32(dims, a, b, c.0, c_len, accumulate) } {
        return;
    }
    // Stored A is (m, k), or (k, m) when transposed; (row stride, col stride) of op(A).
    let (a_rs, a_cs) = if a.trans {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (b_rs, b_cs) = if b.trans {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    // Big products parallelise inside gemm; many small ones parallelise over the batch.
    let big = m * n * k >= 64 * 64 * 64;
    let one = |i: usize, par: Parallelism| {
        let ap = a.data[i * a.batch_stride..].as_ptr();
        let bp = b.data[i * b.batch_stride..].as_ptr();
        // SAFETY: the asserts above guarantee each operand holds m*k (resp. k*n) elements at
        // its batch offset, and the caller's `c` holds batch*m*n elements, so matrix i's m*n
        // lie inside it; strides stay inside those ranges. Without `accumulate` (`read_dst`
        // false) the crate only writes the output.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.at(i * m * n),
                1,
                n as isize,
                accumulate,
                ap,
                a_cs,
                a_rs,
                bp,
                b_cs,
                b_rs,
                T::one(),
                T::one(),
                false,
                false,
                false,
                par,
            )
        }
    };
    if big || batch == 1 {
        (0..batch).for_each(|i| one(i, Parallelism::Rayon(0)));
    } else {
        use rayon::prelude::*;
        (0..batch)
            .into_par_iter()
            .for_each(|i| one(i, Parallelism::None));
    }
}

/// Whether f32 products go to `fma_gemm`'s hand-written kernel instead of the `gemm` crate:
/// on CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 2/3, Intel before Skylake-X), where the
/// crate reached 62-85% of the FMA peak from run to run on a Zen 3 EPYC and a training step
/// with the hand-written kernel (bf16 weights, widened as packed) ran faster than the f32 one.
/// Where the CPU has AVX-512 the crate's AVX-512 kernels stay.
pub fn prefers_fma_kernel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static PREFERS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *PREFERS.get_or_init(|| {
            super::fma_gemm::available() && !std::arch::is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Products the hand-written kernel takes when `prefers_fma_kernel()`: n and k at least 64, m
/// at least 16. A LoRA down-projection's gradient `dA = du^T x` (m = the rank, 16 to 48) ran
/// 8-31% faster there than in the `gemm` crate on Zen 3; with a narrow n or k (the rank-16
/// products of the forward and of dx) the crate was as fast or faster.
fn fma_shape(dims: GemmDims) -> bool {
    dims.m >= 16 && dims.n >= 64 && dims.k >= 64
}

/// `s` as what it is when `T` is f32; None for other types.
#[cfg(target_arch = "x86_64")]
fn f32s<T: Float>(s: &[T]) -> Option<&[f32]> {
    use std::any::TypeId;
    // SAFETY: T is f32 (the same TypeId): the slice is read as what it is.
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) })
}

/// `f32s` for a slice written too.
#[cfg(target_arch = "x86_64")]
fn f32s_mut<T: Float>(s: &mut [T]) -> Option<&mut [f32]> {
    use std::any::TypeId;
    // SAFETY: T is f32 (the same TypeId): the slice is read and written as what it is.
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) })
}

/// `matmul` through `fma_gemm` for f32 operands of a large enough product on a CPU that
/// prefers it; false (nothing written) otherwise.
///
/// # Safety
/// As `matmul_raw`'s.
unsafe fn fma_f32<T: Float>(
    dims: GemmDims,
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    c: *mut T,
    c_len: usize,
    accumulate: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let (Some(ad), Some(bd)) = (f32s(a.data), f32s(b.data)) else {
            return false;
        };
        if !fma_shape(dims) || !prefers_fma_kernel() {
            return false;
        }
        let op = |o: Operand<'_, T>, data| Operand {
            data,
            trans: o.trans,
            batch_stride: o.batch_stride,
        };
        // SAFETY: T is f32 (`f32s` read both operands as f32), and the caller's contract on
        // `c` is `packed_gemm`'s, which writes every element before reading any without
        // `accumulate`.
        unsafe {
            super::fma_gemm::packed_gemm(
                dims,
                op(a, ad),
                op(b, bd),
                false,
                None,
                c.cast::<f32>(),
                c_len,
                accumulate,
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dims, a, b, c, c_len, accumulate);
        false
    }
}

/// `c = a . op(w)` plus `extra`'s product, all f32 (a batch of one), into memory that need not be
/// initialised, through `fma_gemm` where `prefers_fma_kernel()` and the product is large
/// enough: a LoRA up-projection lands on its frozen f32 product in the same pass over the
/// output. False, writing nothing, otherwise (the caller runs two products).
pub fn matmul_plus_f32(
    dims: GemmDims,
    a: Operand<'_, f32>,
    w: Operand<'_, f32>,
    extra: super::bf16_gemm::Extra<'_>,
    c: &mut [std::mem::MaybeUninit<f32>],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !(fma_shape(dims) && prefers_fma_kernel() && dims.batch == 1) {
            return false;
        }
        let counted_dims = GemmDims {
            k: dims.k + extra.k,
            ..dims
        };
        // SAFETY: `c` is writable over its length, and without accumulation the kernel only
        // writes it.
        counted(counted_dims, || unsafe {
            super::fma_gemm::packed_gemm(
                dims,
                a,
                w,
                false,
                Some(extra),
                c.as_mut_ptr().cast(),
                c.len(),
                false,
            )
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dims, a, w, extra, c);
        false
    }
}

/// `c (m, n) = beta * op(a) . op(b)`, or `c += beta * op(a) . op(b)` when `accumulate`, on the
/// calling thread: for tiles inside tasks that are already parallel (flash attention).
/// Operands are contiguous: `a` is `(m, k)` (`(k, m)` if `ta`), `b` is `(k, n)` (`(n, k)` if `tb`).
#[allow(clippy::too_many_arguments)]
pub fn gemm_tile<T: Float>(
    (m, n, k): (usize, usize, usize),
    a: &[T],
    ta: bool,
    b: &[T],
    tb: bool,
    c: &mut [T],
    accumulate: bool,
    beta: T,
) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "gemm_tile: buffer too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(T::zero());
        }
        return;
    }
    if tile_f32((m, n, k), (a, ta), (b, tb), c, accumulate, beta) {
        return;
    }
    let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the assert above guarantees the three buffers hold the m*k, k*n and m*n elements
    // the strides address.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// `gemm_tile` by `fma_tile` for f32 operands on a CPU that prefers the hand-written kernels
/// (`prefers_fma_kernel`); false (nothing written) otherwise.
fn tile_f32<T: Float>(
    dims: (usize, usize, usize),
    (a, ta): (&[T], bool),
    (b, tb): (&[T], bool),
    c: &mut [T],
    accumulate: bool,
    beta: T,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let (Some(a), Some(b), Some(c)) = (f32s(a), f32s(b), f32s_mut(c)) else {
            return false;
        };
        let beta = beta.to_f64() as f32;
        prefers_fma_kernel()
            && super::fma_tile::tile_product(dims, a, ta, b, tb, c, accumulate, beta)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dims, a, ta, b, tb, c, accumulate, beta);
        false
    }
}

/// Straightforward triple loop, the reference the benchmark validates `matmul` against.
pub fn matmul_reference<T: Float>(
    dims: GemmDims,
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    c: &mut [T],
) {
    let GemmDims { batch, m, n, k } = dims;
    for bi in 0..batch {
        let (ab, bb) = (
            &a.data[bi * a.batch_stride..],
            &b.data[bi * b.batch_stride..],
        );
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if a.trans {
                        ab[p * m + i]
                    } else {
                        ab[i * k + p]
                    };
                    let bv = if b.trans {
                        bb[j * k + p]
                    } else {
                        bb[p * n + j]
                    };
                    s += av.to_f64() * bv.to_f64();
                }
                c[bi * m * n + i * n + j] = T::from_f64(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Empty products (a zero batch included) leave `c` alone instead of underflowing a size.
    #[test]
    fn empty_products_are_no_ops() {
        let empty: [f32; 0] = [];
        let op = |data| Operand {
            data,
            trans: false,
            batch_stride: 0,
        };
        for (batch, m, n, k) in [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5)] {
            let mut c = [7.0f32; 1];
            matmul(
                GemmDims { batch, m, n, k },
                op(&empty),
                op(&empty),
                &mut c,
                false,
            );
            assert_eq!(c, [7.0]);
        }
    }

    /// Into uninitialised memory every element is written, on every route: the `gemm` crate
    /// (one big product, a batch of small ones), the hand-written kernel where the CPU takes
    /// it (f32, m >= 16, n and k >= 64), and k = 0. Spare capacity poisoned with NaN comes back
    /// equal, bit for bit, to what `matmul` writes over ones.
    #[test]
    fn the_uninitialised_output_is_written_whole() {
        for (batch, m, n, k, ta, tb) in [
            (1, 70, 90, 80, false, true),
            (1, 33, 130, 100, true, false),
            (3, 5, 7, 3, false, false),
            (1, 64, 70, 70, true, true),
            (2, 9, 11, 0, false, false),
        ] {
            let a: Vec<f32> = (0..batch * m * k)
                .map(|i| (i as f32 * 0.37).sin())
                .collect();
            let b: Vec<f32> = (0..batch * k * n)
                .map(|i| (i as f32 * 0.91).cos())
                .collect();
            let dims = GemmDims { batch, m, n, k };
            let op = |data, trans, batch_stride| Operand {
                data,
                trans,
                batch_stride,
            };
            let (ao, bo) = (op(&a[..], ta, m * k), op(&b[..], tb, k * n));
            let mut want = vec![1.0f32; batch * m * n];
            matmul(dims, ao, bo, &mut want, false);
            let mut got: Vec<f32> = Vec::with_capacity(batch * m * n);
            got.spare_capacity_mut().fill(MaybeUninit::new(f32::NAN));
            matmul_uninit(dims, ao, bo, got.spare_capacity_mut());
            // SAFETY: the kernel wrote all batch * m * n elements (NaN poison would show).
            unsafe { got.set_len(batch * m * n) };
            assert_eq!(got, want, "({batch},{m},{n},{k}) ta={ta} tb={tb}");
        }
    }

    #[test]
    fn all_transpose_combinations_match_reference() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f64> = (0..2 * m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..2 * k * n).map(|i| (i as f64 * 0.91).cos()).collect();
        for ta in [false, true] {
            for tb in [false, true] {
                let dims = GemmDims { batch: 2, m, n, k };
                let ao = Operand {
                    data: &a,
                    trans: ta,
                    batch_stride: m * k,
                };
                let bo = Operand {
                    data: &b,
                    trans: tb,
                    batch_stride: 0,
                };
                let (mut c, mut r) = (vec![0.0; 2 * m * n], vec![0.0; 2 * m * n]);
                matmul(dims, ao, bo, &mut c, false);
                matmul_reference(dims, ao, bo, &mut r);
                for (x, y) in c.iter().zip(&r) {
                    assert!((x - y).abs() < 1e-12, "ta={ta} tb={tb}: {x} vs {y}");
                }
                // Accumulate adds on top of what is there.
                matmul(dims, ao, bo, &mut c, true);
                for (x, y) in c.iter().zip(&r) {
                    assert!((x - 2.0 * y).abs() < 1e-12);
                }
            }
        }
    }
}
