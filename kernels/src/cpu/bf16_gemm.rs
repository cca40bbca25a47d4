//! bf16 × bf16 → f32 GEMM on CPUs with AVX512-BF16 (`vdpbf16ps`: AMD Zen 4/5, Intel since
//! Cooper Lake): 16-bit weights and activations multiplied as stored, with no widened f32 copy
//! of either, at twice the f32 FMA's multiply-adds per instruction. Products of two bf16 values
//! are exact in f32, so the result differs from the widened f32 GEMM only in summation order
//! and the instruction's rounding of each pair sum.
//!
//! `vdpbf16ps` multiplies pairs of bf16 along k and adds both products to one f32 lane, so the
//! operands are packed as k-pairs (one u32 a pair, element `2p` in the low half): A in
//! micro-panels of `MR` rows, B in panels of `NR` columns; an odd k is padded with a zero. The
//! micro-kernel keeps an `MR x NR` tile of C in 16 zmm registers and, per k-pair, loads two
//! vectors of B and broadcasts one pair of each A row.
//!
//! Either operand may also be f32: it is rounded to bf16 (to nearest, ties to even) while it is
//! packed, once per element, as PyTorch's CPU autocast rounds the activation it feeds a bf16
//! weight. The result is the product of the rounded values, accumulated in f32.

use super::matmul::{GemmDims, Operand, matmul};
use super::{Float, Line};
use half::bf16;
use rayon::prelude::*;
use std::cell::{Cell, RefCell};
use std::thread::LocalKey;

/// Rows of a micro-tile.
pub(crate) const MR: usize = 8;
/// Columns of a micro-tile: two zmm vectors of 16 f32.
pub(crate) const NR: usize = 32;
/// Panels of B per task (at most), and k-pairs per pass over them: 4 x 32 columns x 1024
/// pairs is 512 KiB of B, which stays in L2 (1-2 MiB on Zen 4/5 and Sapphire Rapids on) while
/// the task streams the matching slices of A. 1024 rather than 512 pairs: a k of 1536 (a
/// Qwen2-1.5B up-projection's) is one pass instead of two, 83% -> 93% of the bf16 peak (Zen 5).
const PANELS_PER_TASK: usize = 4;
pub(crate) const KC: usize = 1024;

thread_local! {
    /// This thread's packed k-blocks of A (on the calling thread) and panels of B (on each
    /// task's thread), kept from call to call rather than allocated, zero-filled and freed
    /// by every product. Each keeps the size of the largest product its thread has run (A:
    /// rows x 1024 pairs x 4 bytes, 4 MiB for 1024 rows; B: at most 512 KiB).
    static A_PACK: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
    static B_PACK: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
}

/// `with_buffer` in whole `Line`s, as `len` u32 pairs of bf16: the micro-kernel loads B's
/// panels a zmm at a time, and none of those loads spans two lines.
fn with_words<R>(
    slot: &'static LocalKey<Cell<Vec<Line>>>,
    len: usize,
    f: impl FnOnce(&mut [u32]) -> R,
) -> R {
    with_buffer(slot, len.div_ceil(16), |lines| {
        f(&mut bytemuck::cast_slice_mut::<Line, u32>(lines)[..len])
    })
}

/// Runs `f` on `len` elements of this thread's buffer `slot`, grown as needed. The elements
/// hold whatever an earlier call left: every caller writes all it reads. Taken out of the slot
/// for the call, so a nested call on the same thread (rayon may run another product's task
/// while this one waits) gets a buffer of its own rather than a panic.
pub(crate) fn with_buffer<T: Copy + Default, R>(
    slot: &'static LocalKey<Cell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    let mut buf = slot.take();
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    let r = f(&mut buf[..len]);
    slot.set(buf);
    r
}

/// An output written by several tasks at disjoint parts: a batch item's tiles here and in
/// `fma_gemm`, a batch's matrices in `matmul`.
pub(crate) struct SharedOut<T = f32>(pub(crate) *mut T);
// SAFETY: tasks write only the parts they own (disjoint tiles or matrices); the pointer
// outlives the parallel loops that share it, which join before the kernels (`packed_gemm` here
// and in `fma_gemm`, `matmul::matmul_raw`) return.
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The element `offset` past the start (a method, so that a closure captures the whole
    /// `SharedOut`, not its raw pointer field).
    ///
    /// # Safety
    /// `offset` must lie inside the caller's buffer.
    pub(crate) unsafe fn at(&self, offset: usize) -> *mut T {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(offset) }
    }
}

/// An element the kernel packs: bf16 as stored, f32 rounded to bf16.
pub trait Bf16Source: Copy + Send + Sync {
    /// Whether the element is stored as bf16 bits.
    const BF16: bool;
    /// The bf16 bits, in the low half.
    fn bf16_bits(self) -> u32;
    /// The value as f32: a bf16 widened (exactly), an f32 rounded to bf16 first when `round`
    /// and left as it is otherwise.
    fn widened(self, round: bool) -> f32;
    /// `dst[i]` = the bf16 bits of `src[i]`: one contiguous pass the compiler vectorises.
    #[inline(always)]
    fn bits_into(src: &[Self], dst: &mut [u16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.bf16_bits() as u16;
        }
    }
    /// The bf16 bits as they are stored, when no rounding is needed (a bf16 source).
    #[inline(always)]
    fn stored_bits(_src: &[Self]) -> Option<&[u16]> {
        None
    }
}

impl Bf16Source for bf16 {
    const BF16: bool = true;
    #[inline(always)]
    fn widened(self, _round: bool) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn bf16_bits(self) -> u32 {
        self.to_bits() as u32
    }
    #[inline(always)]
    fn stored_bits(src: &[Self]) -> Option<&[u16]> {
        Some(bytemuck::cast_slice(src))
    }
}

impl Bf16Source for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn widened(self, round: bool) -> f32 {
        if round {
            f32::from_bits(self.bf16_bits() << 16)
        } else {
            self
        }
    }
    /// Rounded to nearest, ties to even, from the f32 bits without a branch (a select for NaN,
    /// which stays a quiet NaN), so packing loops stay cheap: `half`'s conversion, branchy per
    /// element, cost a fifth of a 1024 x 576 x 576 product. The same bits as `half`'s.
    #[inline(always)]
    fn bf16_bits(self) -> u32 {
        let b = self.to_bits();
        let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
        let quiet_nan = (b >> 16) | 0x40;
        if b & 0x7fff_ffff > 0x7f80_0000 {
            quiet_nan
        } else {
            rounded
        }
    }
}

/// Whether this CPU runs the kernel (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        // Every CPU with AVX512-BF16 has the rest; they are checked because the kernels
        // (packing, the bf16 attention's tasks) are compiled with all of them enabled.
        *HAS.get_or_init(|| {
            has!("avx512bf16")
                && has!("avx512f")
                && has!("avx512bw")
                && has!("avx512vl")
                && has!("avx2")
                && has!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether `matmul_bf16` runs on this CPU: the AVX512-BF16 kernel, or where the CPU lacks it,
/// the AVX2 + FMA kernel of `fma_gemm` (the same rounded values, multiplied in f32 after being
/// widened in its packing). Without either the caller widens whole operands itself.
pub fn supported() -> bool {
    available() || fma_available()
}

#[cfg(target_arch = "x86_64")]
fn fma_available() -> bool {
    super::fma_gemm::available()
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_available() -> bool {
    false
}

/// `c = op(a) . op(b)`, or `c += op(a) . op(b)` when `accumulate`, with the conventions of
/// `matmul::matmul` (`c` contiguous `(batch, m, n)`). Returns false, writing nothing, when the
/// CPU has neither AVX512-BF16 nor AVX2 and FMA (`supported()`): the caller then takes the f32
/// path. Panics if a buffer is too short.
pub fn matmul_bf16<A: Bf16Source, B: Bf16Source>(
    dims: GemmDims,
    a: Operand<'_, A>,
    b: Operand<'_, B>,
    c: &mut [f32],
    accumulate: bool,
) -> bool {
    // SAFETY: `c` is a live slice of f32, readable and writable over its length.
    unsafe { either_kernel(dims, a, b, None, c.as_mut_ptr(), c.len(), accumulate) }
}

/// The AVX512-BF16 kernel where the CPU has it, else the AVX2 + FMA one, counted as one product
/// over the joint inner dimension (with `extra`'s). False, writing nothing, without either.
///
/// # Safety
/// As `packed_gemm`.
unsafe fn either_kernel<A: Bf16Source, B: Bf16Source>(
    dims: GemmDims,
    a: Operand<'_, A>,
    b: Operand<'_, B>,
    extra: Option<Extra<'_>>,
    c: *mut f32,
    c_len: usize,
    accumulate: bool,
) -> bool {
    let counted_dims = GemmDims {
        k: dims.k + extra.map_or(0, |e| e.k),
        ..dims
    };
    if available() {
        // SAFETY: the caller's contract is `packed_gemm`'s.
        super::matmul::counted(counted_dims, || unsafe {
            packed_gemm(dims, a, b, extra, c, c_len, accumulate)
        });
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if super::fma_gemm::available() {
        // SAFETY: as above; the two kernels share their contract.
        return super::matmul::counted(counted_dims, || unsafe {
            super::fma_gemm::packed_gemm(dims, a, b, true, extra, c, c_len, accumulate)
        });
    }
    false
}

/// A second product added to the first in f32 as the tiles are stored: `a (m, k) . b (n, k)^T`,
/// both row-major f32, for a batch of one. A LoRA up-projection `u B^T` (k = the rank) lands
/// on its frozen product in the same pass over the output, instead of a pass of its own that
/// reads and writes the whole output again. Its values are not rounded.
#[derive(Clone, Copy, Debug)]
pub struct Extra<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub k: usize,
}

/// `c = op(a) . op(b)` (plus `extra`'s product) as `matmul_bf16` does without accumulating,
/// into memory that need not be initialised (a `Vec`'s spare capacity): a fresh output is then
/// not zero-filled first, which cost a pass over every frozen projection's output. Every one of
/// the first `batch * m * n` elements is written. Returns false, writing nothing, without
/// `supported()`. Panics if a buffer is too short, or if `extra` comes with a batch other
/// than one or an inner dimension of 0.
pub fn matmul_bf16_uninit<A: Bf16Source, B: Bf16Source>(
    dims: GemmDims,
    a: Operand<'_, A>,
    b: Operand<'_, B>,
    extra: Option<Extra<'_>>,
    c: &mut [std::mem::MaybeUninit<f32>],
) -> bool {
    // SAFETY: `c` is writable over its length, and without accumulation the kernels only
    // write it.
    unsafe { either_kernel(dims, a, b, extra, c.as_mut_ptr().cast(), c.len(), false) }
}

/// `c = op(a) . op(b)` for an activation `a` of type `Self` and a weight `b` stored as `W`: the
/// one product interface of kernels whose weight may be 16-bit (the fused LM head).
pub trait WeightProduct<W>: Sized {
    fn weight_product(
        dims: GemmDims,
        a: Operand<'_, Self>,
        b: Operand<'_, W>,
        c: &mut [Self],
        accumulate: bool,
    );

    /// `row[i] = row[i] * scale - w[i]`, the weight widened exactly (the fused LM head's
    /// target term).
    fn minus_scaled_row(row: &mut [Self], scale: Self, w: &[W]);
}

impl<T: Float> WeightProduct<T> for T {
    fn weight_product(
        dims: GemmDims,
        a: Operand<'_, T>,
        b: Operand<'_, T>,
        c: &mut [T],
        accumulate: bool,
    ) {
        matmul(dims, a, b, c, accumulate)
    }

    fn minus_scaled_row(row: &mut [T], scale: T, w: &[T]) {
        row.iter_mut()
            .zip(w)
            .for_each(|(r, &w)| *r = *r * scale - w);
    }
}

impl WeightProduct<bf16> for f32 {
    /// Autocast: `a` is rounded to bf16 once and the product accumulates in f32, through the
    /// AVX512-BF16 kernel, the AVX2 + FMA one (`supported()`) or, on other CPUs, the f32 GEMM of
    /// the rounded, widened operands
    /// (the same values, summed in another order).
    fn weight_product(
        dims: GemmDims,
        a: Operand<'_, f32>,
        b: Operand<'_, bf16>,
        c: &mut [f32],
        accumulate: bool,
    ) {
        if !matmul_bf16(dims, a, b, c, accumulate) {
            widened_product(dims, a, b, c, accumulate);
        }
    }

    fn minus_scaled_row(row: &mut [f32], scale: f32, w: &[bf16]) {
        row.iter_mut()
            .zip(w)
            .for_each(|(r, w)| *r = *r * scale - w.to_f32());
    }
}

/// What `WeightProduct<bf16> for f32` does where the kernel declines: `a` rounded to bf16 and
/// both operands widened, then the f32 GEMM (copies of both: callers with a large weight
/// should widen it once themselves, as the engine's LM head does).
fn widened_product(
    dims: GemmDims,
    a: Operand<'_, f32>,
    b: Operand<'_, bf16>,
    c: &mut [f32],
    accumulate: bool,
) {
    let rounded: Vec<f32> = a
        .data
        .iter()
        .map(|x| bf16::from_bits(x.bf16_bits() as u16).to_f32())
        .collect();
    let wide: Vec<f32> = b.data.iter().map(|x| x.to_f32()).collect();
    let (a, b) = (
        Operand {
            data: &rounded[..],
            ..a
        },
        Operand {
            data: &wide[..],
            trans: b.trans,
            batch_stride: b.batch_stride,
        },
    );
    matmul(dims, a, b, c, accumulate)
}

impl WeightProduct<bf16> for f64 {
    /// The reference of the product for finite-difference checks: the weight widened, exactly.
    fn weight_product(
        dims: GemmDims,
        a: Operand<'_, f64>,
        b: Operand<'_, bf16>,
        c: &mut [f64],
        accumulate: bool,
    ) {
        let wide: Vec<f64> = b.data.iter().map(|x| x.to_f64()).collect();
        let b = Operand {
            data: &wide[..],
            trans: b.trans,
            batch_stride: b.batch_stride,
        };
        matmul(dims, a, b, c, accumulate)
    }

    fn minus_scaled_row(row: &mut [f64], scale: f64, w: &[bf16]) {
        row.iter_mut()
            .zip(w)
            .for_each(|(r, w)| *r = *r * scale - w.to_f64());
    }
}

/// The kernel behind `matmul_bf16` and `matmul_bf16_uninit`, writing `c (batch, m, n)`.
///
/// # Safety
/// `c` must be valid for writes of `c_len` f32, and for reads too when `accumulate`; no other
/// thread may touch it during the call. Without `accumulate` every element of the first
/// `batch * m * n` is written before any is read.
unsafe fn packed_gemm<A: Bf16Source, B: Bf16Source>(
    dims: GemmDims,
    a: Operand<'_, A>,
    b: Operand<'_, B>,
    extra: Option<Extra<'_>>,
    c: *mut f32,
    c_len: usize,
    accumulate: bool,
) {
    // SAFETY: the caller's contract is `prologue`'s.
    if !unsafe { prologue(dims, &a, &b, extra, c, c_len, accumulate) } {
        return;
    }
    let GemmDims { batch, m, n, k } = dims;
    let k2 = extra.map_or(0, |e| e.k);
    let kp = k.div_ceil(2);
    let (mb, nb) = (m.div_ceil(MR), n.div_ceil(NR));
    let per_task = panels_per_task(nb, rayon::current_num_threads());
    let kc_max = kp.div_ceil(kp.div_ceil(KC));
    // One k-block of A, (mb, kc, MR), shared by every task; each task packs its own panels of
    // B into a buffer of its own, so neither operand is ever packed whole (an LM head's B is
    // vocabulary-sized) and a task's panels go straight from memory into its cache.
    with_words(&A_PACK, mb * kc_max * MR, |apack| {
        let a2pack = extra_micro_panels(extra, m, MR);
        for i in 0..batch {
            let (ad, bd) = (&a.data[i * a.batch_stride..], &b.data[i * b.batch_stride..]);
            // SAFETY: i * m * n < batch * m * n <= c_len, inside the caller's buffer.
            let out = SharedOut(unsafe { c.add(i * m * n) });
            // k in blocks of at most KC pairs, so a task's panels of B stay in L2 at any k; the
            // blocks are of equal size (a short last block would pay a whole pass over C and
            // the parallel loop's start for little work).
            for p0 in (0..kp).step_by(kc_max) {
                let kc = kc_max.min(kp - p0);
                // This block's k values: k0..k0 + len (k0 even, so pairs stay aligned).
                let (k0, len) = (2 * p0, (2 * kc).min(k - 2 * p0));
                let acc = accumulate || p0 > 0;
                // Lanes past m (n) and the pad past an odd k stay zero.
                apack[..mb * kc * MR]
                    .par_chunks_mut(kc * MR)
                    .enumerate()
                    .for_each(|(blk, panel)| {
                        let (first, valid) = (blk * MR, MR.min(m - blk * MR));
                        // SAFETY: `available()` found AVX2, AVX-512F and AVX-512BW.
                        unsafe {
                            if a.trans {
                                pack_k_major(panel, MR, &ad[k0 * m + first..], m, valid, len);
                            } else {
                                pack_lane_major(panel, MR, &ad[first * k + k0..], k, len, valid);
                            }
                        }
                    });
                let (apack, a2pack, out) = (&apack, &a2pack, &out);
                // The extra product is added once, by the last k-block's tiles.
                let extra = extra.filter(|_| p0 + kc == kp);
                (0..nb.div_ceil(per_task)).into_par_iter().for_each(|task| {
                    with_words(&B_PACK, per_task * kc_max * NR, |bpack| {
                        let mut b2pack = vec![0f32; per_task * k2 * NR];
                        let panels = task * per_task..nb.min((task + 1) * per_task);
                        if let Some(e) = extra {
                            // (k2, NR) f32 panels of the extra right operand; columns past n zero.
                            for (slot, pj) in panels.clone().enumerate() {
                                let panel = &mut b2pack[slot * k2 * NR..(slot + 1) * k2 * NR];
                                panel.fill(0.0);
                                for j in 0..NR.min(n - pj * NR) {
                                    let col = &e.b[(pj * NR + j) * k2..][..k2];
                                    for (p, &v) in col.iter().enumerate() {
                                        panel[p * NR + j] = v;
                                    }
                                }
                            }
                        }
                        for (slot, pj) in panels.clone().enumerate() {
                            let panel = &mut bpack[slot * kc * NR..(slot + 1) * kc * NR];
                            let (first, valid) = (pj * NR, NR.min(n - pj * NR));
                            // SAFETY: `available()` found AVX2, AVX-512F and AVX-512BW.
                            unsafe {
                                if b.trans {
                                    pack_lane_major(
                                        panel,
                                        NR,
                                        &bd[first * k + k0..],
                                        k,
                                        len,
                                        valid,
                                    );
                                } else {
                                    pack_k_major(panel, NR, &bd[k0 * n + first..], n, valid, len);
                                }
                            }
                        }
                        // Each of the task's panels (in L2) meets every micro-panel of A (from
                        // the last-level cache).
                        for (slot, pj) in panels.enumerate() {
                            let bp = &bpack[slot * kc * NR..(slot + 1) * kc * NR];
                            let b2 = &b2pack[slot * k2 * NR..(slot + 1) * k2 * NR];
                            let cols = NR.min(n - pj * NR);
                            for blk in 0..mb {
                                let ap = &apack[blk * kc * MR..(blk + 1) * kc * MR];
                                let rows = MR.min(m - blk * MR);
                                let a2 = &a2pack[blk * k2 * MR..(blk + 1) * k2 * MR];
                                let plus = extra.map(|_| (a2, b2, k2));
                                // SAFETY: `available()` said the CPU has AVX-512F and AVX512-BF16;
                                // the panels hold kc pairs of MR (NR) lanes; the tile at row
                                // blk * MR and column pj * NR, `rows x cols` with stride n, lies
                                // inside this batch item's m * n outputs, and no other task writes
                                // it (tasks own disjoint panels, so disjoint columns).
                                #[cfg(target_arch = "x86_64")]
                                unsafe {
                                    let tile = out.0.add(blk * MR * n + pj * NR);
                                    tile_kernel(kc, ap, bp, plus, tile, n, rows, cols, acc)
                                }
                            }
                        }
                    })
                });
            }
        }
    })
}

/// What both packed kernels (this one and `fma_gemm`'s) check and settle before packing:
/// buffer lengths (panicking if one is short), an `extra` only with a batch of one and k > 0,
/// and the empty cases. Returns whether there is a product left to compute; for k = 0 it has
/// written the zeros (unless accumulating).
///
/// # Safety
/// `c` must be valid for writes of `c_len` f32.
pub(crate) unsafe fn prologue<A, B>(
    dims: GemmDims,
    a: &Operand<'_, A>,
    b: &Operand<'_, B>,
    extra: Option<Extra<'_>>,
    c: *mut f32,
    c_len: usize,
    accumulate: bool,
) -> bool {
    let GemmDims { batch, m, n, k } = dims;
    assert!(
        c_len >= batch * m * n,
        "packed GEMM: output buffer too short"
    );
    if batch == 0 || m == 0 || n == 0 {
        return false;
    }
    assert!(a.data.len() >= (batch - 1) * a.batch_stride + m * k);
    assert!(b.data.len() >= (batch - 1) * b.batch_stride + k * n);
    if let Some(e) = extra {
        assert!(
            batch == 1 && k > 0,
            "packed GEMM: an extra product needs batch 1 and k > 0"
        );
        assert!(e.a.len() >= m * e.k && e.b.len() >= n * e.k);
    }
    if k == 0 {
        if !accumulate {
            // SAFETY: the caller vouches for c_len >= batch * m * n writable elements.
            unsafe { std::ptr::write_bytes(c, 0, batch * m * n) };
        }
        return false;
    }
    true
}

/// The extra product's left operand `(m, k2)` as f32 micro-panels `(m / mr rounded up, k2,
/// mr)`, packed once per call; rows past m are zero. Empty without `extra`.
pub(crate) fn extra_micro_panels(extra: Option<Extra<'_>>, m: usize, mr: usize) -> Vec<f32> {
    let Some(e) = extra else {
        return Vec::new();
    };
    let k2 = e.k;
    let mut packed = vec![0f32; m.div_ceil(mr) * k2 * mr];
    for (blk, panel) in packed.chunks_mut(k2 * mr).enumerate() {
        for r in 0..mr.min(m - blk * mr) {
            let row = &e.a[(blk * mr + r) * k2..][..k2];
            for (p, &v) in row.iter().enumerate() {
                panel[p * mr + r] = v;
            }
        }
    }
    packed
}

/// How many of `nb` column panels one task takes: as many as PANELS_PER_TASK allows without
/// leaving a thread idle at the end. The busiest of `threads` threads gets about
/// `ceil(tasks / threads) * per_task` panels; the smallest such load wins, the larger count on
/// ties. A 576-column product has 18 panels: in 9 tasks of 2, one of 2 threads does 10 panels
/// while the other does 8 (a tenth of the product lost); in 6 tasks of 3 both do 9.
pub(crate) fn panels_per_task(nb: usize, threads: usize) -> usize {
    let load = |per: usize| nb.div_ceil(per).div_ceil(threads.max(1)) * per;
    (1..=PANELS_PER_TASK)
        .rev()
        .min_by_key(|&per| load(per))
        .unwrap_or(1)
}

/// Packs `valid` lanes whose `len` k values are contiguous runs of `src` (lane l at
/// `l * stride`) into `panel (len / 2 rounded up, lanes)`; other lanes and the pad past an odd
/// `len` are zero. `lanes` is a multiple of 8.
///
/// Eight lanes at a time: their rows are copied (bf16) or rounded (f32) into this thread's row
/// buffer in one vectorised pass each, then written out transposed in blocks of eight pairs by
/// eight lanes, eight vector stores a block. The element-at-a-time scatter this replaces cost
/// a fifth of a 1024 x 576 x 576 product. The row buffer is kept from call to call: a 32 KiB
/// buffer zero-filled per call cost 4-15% of the SmolLM2 products (Zen 5). Reading bf16 rows
/// in place instead of copying them was no faster for small weights and 10% slower for an LM
/// head's, which comes from memory (eight interleaved streams, not one sequential one).
///
/// # Safety
/// The CPU must have AVX2, AVX-512F and AVX-512BW (`available()` checks them).
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx2,avx512f,avx512bw")
)]
pub(crate) unsafe fn pack_lane_major<S: Bf16Source>(
    panel: &mut [u32],
    lanes: usize,
    src: &[S],
    stride: usize,
    len: usize,
    valid: usize,
) {
    /// Where a lane past `valid` reads its (zero) pairs.
    static ZERO: [u16; 2 * KC] = [0; 2 * KC];
    thread_local! {
        /// Eight lanes' rows as bf16 bits.
        static ROWS: RefCell<[[u16; 2 * KC]; 8]> = const { RefCell::new([[0; 2 * KC]; 8]) };
    }
    let kp = len.div_ceil(2);
    assert!(kp <= KC && lanes.is_multiple_of(8) && panel.len() >= kp * lanes);
    // Pairs whose both halves lie inside the rows, in whole blocks of eight; the rest (and an
    // odd `len`'s zero pad) are written one at a time.
    let blocks = (len / 2) - (len / 2) % 8;
    ROWS.with_borrow_mut(|buf| {
        for g in (0..lanes).step_by(8) {
            let mut rows: [&[u16]; 8] = [&ZERO[..len]; 8];
            for (r, (row, scratch)) in rows.iter_mut().zip(buf.iter_mut()).enumerate() {
                let l = g + r;
                if l < valid {
                    let s = &src[l * stride..l * stride + len];
                    S::bits_into(s, &mut scratch[..len]);
                    *row = &scratch[..len];
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller vouches for AVX2; every row holds `len >= 2 * blocks` values,
            // and panel rows 0..blocks, lanes g..g + 8, are written (checked slices).
            unsafe {
                transpose_blocks(&rows, blocks, panel, lanes, g)
            };
            let scalar_from = if cfg!(target_arch = "x86_64") {
                blocks
            } else {
                0
            };
            for p in scalar_from..kp {
                for (r, row) in rows.iter().enumerate() {
                    let hi = row.get(2 * p + 1).copied().unwrap_or(0);
                    panel[p * lanes + g + r] = row[2 * p] as u32 | (hi as u32) << 16;
                }
            }
        }
    });
}

/// `panel[p * lanes + g + r]` = pair p of `rows[r]` (bf16 values 2p and 2p + 1, as one u32)
/// for p < `blocks` (a multiple of 8): 8 x 8 transposes of u32 pairs in AVX2 registers.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_blocks(
    rows: &[&[u16]; 8],
    blocks: usize,
    panel: &mut [u32],
    lanes: usize,
    g: usize,
) {
    use std::arch::x86_64::*;
    for p in (0..blocks).step_by(8) {
        // SAFETY: p + 8 <= blocks, so each load reads eight pairs (16 u16) inside its row,
        // which holds at least 2 * blocks values.
        let r: [__m256i; 8] = std::array::from_fn(|i| unsafe {
            _mm256_loadu_si256(rows[i][2 * p..2 * p + 16].as_ptr().cast())
        });

        // (r0[0], r1[0], r0[1], r1[1] | r0[4], r1[4], r0[5], r1[5]) and so on per pair of rows.
        let t = [
            _mm256_unpacklo_epi32(r[0], r[1]),
            _mm256_unpackhi_epi32(r[0], r[1]),
            _mm256_unpacklo_epi32(r[2], r[3]),
            _mm256_unpackhi_epi32(r[2], r[3]),
            _mm256_unpacklo_epi32(r[4], r[5]),
            _mm256_unpackhi_epi32(r[4], r[5]),
            _mm256_unpacklo_epi32(r[6], r[7]),
            _mm256_unpackhi_epi32(r[6], r[7]),
        ];
        // Rows 0-3 (4-7) of columns j and j + 4 in each 128-bit half, column order 0, 1, 2, 3.
        let u = [
            _mm256_unpacklo_epi64(t[0], t[2]),
            _mm256_unpackhi_epi64(t[0], t[2]),
            _mm256_unpacklo_epi64(t[1], t[3]),
            _mm256_unpackhi_epi64(t[1], t[3]),
            _mm256_unpacklo_epi64(t[4], t[6]),
            _mm256_unpackhi_epi64(t[4], t[6]),
            _mm256_unpacklo_epi64(t[5], t[7]),
            _mm256_unpackhi_epi64(t[5], t[7]),
        ];
        for j in 0..4 {
            let low = _mm256_permute2x128_si256::<0x20>(u[j], u[j + 4]);
            let high = _mm256_permute2x128_si256::<0x31>(u[j], u[j + 4]);
            for (col, v) in [(j, low), (j + 4, high)] {
                let o = (p + col) * lanes + g;
                // SAFETY: the checked slice holds the eight u32 the store writes.
                unsafe { _mm256_storeu_si256(panel[o..o + 8].as_mut_ptr().cast(), v) };
            }
        }
    }
}

/// Packs `valid` lanes whose k values are strided (lane l, index kk at `kk * stride + l`) into
/// `panel (kp, lanes)`; other lanes and the pad past an odd k are zero.
///
/// # Safety
/// The CPU must have AVX2, AVX-512F and AVX-512BW (`available()` checks them).
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx2,avx512f,avx512bw")
)]
pub(crate) unsafe fn pack_k_major<S: Bf16Source>(
    panel: &mut [u32],
    lanes: usize,
    src: &[S],
    stride: usize,
    valid: usize,
    k: usize,
) {
    // The two k rows of a pair, rounded in vectorised passes (lanes is at most NR).
    let (mut lo, mut hi) = ([0u16; NR], [0u16; NR]);
    for (p, out) in panel.chunks_exact_mut(lanes).enumerate() {
        #[cfg(target_arch = "x86_64")]
        if lanes == NR && valid == NR && 2 * p + 1 < k {
            let (l, h) = (2 * p * stride, (2 * p + 1) * stride);
            if let (Some(lo), Some(hi)) = (
                S::stored_bits(&src[l..l + NR]),
                S::stored_bits(&src[h..h + NR]),
            ) {
                // SAFETY: the caller vouches for AVX-512F and BW; both rows hold NR = 32
                // values and `out` NR pairs.
                unsafe { interleave_32(lo, hi, out) };
                continue;
            }
        }
        S::bits_into(
            &src[2 * p * stride..2 * p * stride + valid],
            &mut lo[..valid],
        );
        if 2 * p + 1 < k {
            let h = (2 * p + 1) * stride;
            S::bits_into(&src[h..h + valid], &mut hi[..valid]);
        } else {
            hi[..valid].fill(0);
        }
        for ((o, &x), &y) in out.iter_mut().zip(&lo[..valid]).zip(&hi[..valid]) {
            *o = x as u32 | ((y as u32) << 16);
        }
        out[valid..].fill(0);
    }
}

/// `out[i] = lo[i] | hi[i] << 16` for 32 lanes of bf16 bits: two rows of a bf16 weight made
/// into k-pairs with two `vpermt2w` instead of a copy of each row and a scalar loop.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn interleave_32(lo: &[u16], hi: &[u16], out: &mut [u32]) {
    use std::arch::x86_64::*;
    /// Lane i of the result takes lo[i / 2] for even i and hi[i / 2] for odd i; the second
    /// vector continues from pair 16. Indices 32 and up pick from `hi`.
    const FIRST: [u16; 32] = {
        let mut t = [0u16; 32];
        let mut i = 0;
        while i < 32 {
            t[i] = (i / 2) as u16 + if i % 2 == 1 { 32 } else { 0 };
            i += 1;
        }
        t
    };
    const SECOND: [u16; 32] = {
        let mut t = [0u16; 32];
        let mut i = 0;
        while i < 32 {
            t[i] = FIRST[i] + 16;
            i += 1;
        }
        t
    };
    let (lo, hi, out) = (&lo[..32], &hi[..32], &mut out[..32]);
    // SAFETY: every load reads 32 u16 (64 bytes) inside a checked slice of that length, and
    // each store writes 16 u32 inside `out`'s 32.
    unsafe {
        let a = _mm512_loadu_si512(lo.as_ptr().cast());
        let b = _mm512_loadu_si512(hi.as_ptr().cast());
        let i0 = _mm512_loadu_si512(FIRST.as_ptr().cast());
        let i1 = _mm512_loadu_si512(SECOND.as_ptr().cast());
        _mm512_storeu_si512(out.as_mut_ptr().cast(), _mm512_permutex2var_epi16(a, i0, b));
        _mm512_storeu_si512(
            out.as_mut_ptr().add(16).cast(),
            _mm512_permutex2var_epi16(a, i1, b),
        );
    }
}

/// One `rows x cols` (at most `MR x NR`) tile of C from packed panels, plus, with `plus`,
/// the f32 product of a `(k2, MR)` and a `(k2, NR)` panel.
///
/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16; `ap` holds `kp * MR` and `bp` `kp * NR` pairs;
/// `c` points at `(rows - 1) * ldc + cols` writable elements no other thread touches.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile_kernel(
    kp: usize,
    ap: &[u32],
    bp: &[u32],
    plus: Option<(&[f32], &[f32], usize)>,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(ap.len() >= kp * MR && bp.len() >= kp * NR);
    // Ask for the tile's lines of C now: they are written (and read, when accumulating) only
    // after the k loop, by which time they are in cache. Each row of a tile lies on its own
    // page when C is wide (an LM head's logits), so without this every store of the tile
    // missed and waited for its line.
    for r in 0..rows {
        // SAFETY: a prefetch never faults; the address is inside the tile (r < rows).
        unsafe {
            let row = c.add(r * ldc);
            _mm_prefetch::<_MM_HINT_T0>(row.cast());
            if cols > 16 {
                _mm_prefetch::<_MM_HINT_T0>(row.add(16).cast());
            }
        }
    }
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kp {
        // SAFETY: p < kp, so both 16-lane loads lie inside bp's p-th row of NR pairs, and
        // the broadcast reads inside ap's p-th row of MR pairs. __m512i and __m512bh are both
        // 64 bytes of lanes; the transmute only relabels them.
        unsafe {
            let b0: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                bp.as_ptr().add(p * NR).cast(),
            ));
            let b1: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                bp.as_ptr().add(p * NR + 16).cast(),
            ));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let a: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *ap.get_unchecked(p * MR + r) as i32,
                ));
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], a, b0);
                acc_r[1] = _mm512_dpbf16_ps(acc_r[1], a, b1);
            }
        }
    }
    if let Some((a2, b2, k2)) = plus {
        assert!(a2.len() >= k2 * MR && b2.len() >= k2 * NR);
        for p in 0..k2 {
            // SAFETY: p < k2, so both 16-lane loads lie inside b2's p-th row of NR values.
            let (b0, b1) = unsafe {
                (
                    _mm512_loadu_ps(b2.as_ptr().add(p * NR)),
                    _mm512_loadu_ps(b2.as_ptr().add(p * NR + 16)),
                )
            };
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(a2[p * MR + r]);
                acc_r[0] = _mm512_fmadd_ps(a, b0, acc_r[0]);
                acc_r[1] = _mm512_fmadd_ps(a, b1, acc_r[1]);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate().take(rows) {
        for (h, v) in acc_r.iter().enumerate() {
            let lanes = cols.saturating_sub(h * 16).min(16);
            if lanes == 0 {
                continue;
            }
            let mask: __mmask16 = if lanes == 16 {
                0xffff
            } else {
                (1u16 << lanes) - 1
            };
            // SAFETY: the masked load and store touch only the first `lanes` elements from
            // r * ldc + h * 16, which lie inside the tile (r < rows, h * 16 + lanes <= cols).
            unsafe {
                let dst = c.add(r * ldc + h * 16);
                let v = if accumulate {
                    _mm512_add_ps(*v, _mm512_maskz_loadu_ps(mask, dst))
                } else {
                    *v
                };
                _mm512_mask_storeu_ps(dst, mask, v);
            }
        }
    }
}

/// f32 bit patterns that probe a rounding to bf16: `spread` values scattered over all bits,
/// then ties either way, just past ties, subnormals, the largest finite values (rounding to
/// infinity), infinities and NaNs of both signs.
#[cfg(test)]
pub(crate) fn rounding_probes(spread: u32) -> Vec<u32> {
    let mut bits: Vec<u32> = (0..spread).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
    for hi in [
        0x0000u32, 0x0001, 0x3f80, 0x3f81, 0x7f7f, 0x7f80, 0x7fc0, 0x8001, 0xff80,
    ] {
        for lo in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff] {
            bits.push(hi << 16 | lo);
        }
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matmul::matmul_reference;

    fn op<T>(data: &[T], trans: bool, batch_stride: usize) -> Operand<'_, T> {
        Operand {
            data,
            trans,
            batch_stride,
        }
    }

    fn rand_bf16(n: usize, seed: u64) -> Vec<bf16> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            })
            .collect()
    }

    /// Every shape edge (m, n, k not multiples of the tile, k odd, k = 1), transposes, batches
    /// and accumulation, against the f64 product of the same bf16 values. Tolerance: the f32
    /// accumulation of k exact products, 2e-6 * sqrt(k) relative to the sum of |products|.
    #[test]
    fn matches_the_f64_reference_on_every_edge() {
        if !supported() {
            eprintln!("neither AVX512-BF16 nor AVX2 + FMA on this CPU: the kernel declines");
            let z = [bf16::ZERO; 4];
            let op = Operand {
                data: &z[..],
                trans: false,
                batch_stride: 0,
            };
            let dims = GemmDims {
                batch: 1,
                m: 2,
                n: 2,
                k: 2,
            };
            assert!(!matmul_bf16(dims, op, op, &mut [0.0; 4], false));
            return;
        }
        let mut seed = 1;
        for (batch, m, n, k) in [
            (1, 1, 1, 1),
            (1, 8, 32, 2),
            (1, 9, 33, 3),
            (2, 17, 70, 129),
            (1, 64, 576, 576),
            (3, 5, 7, 1),
            (1, 130, 40, 64),
            // Several k blocks of KC pairs, the last one short and odd.
            (2, 9, 70, 2 * KC + 77),
        ] {
            for (ta, tb, acc) in [
                (false, true, false),
                (false, false, true),
                (true, false, false),
                (true, true, true),
            ] {
                seed += 1;
                let a = rand_bf16(batch * m * k, seed);
                let b = rand_bf16(batch * k * n, seed + 100);
                let wa: Vec<f64> = a.iter().map(|v| v.to_f64()).collect();
                let wb: Vec<f64> = b.iter().map(|v| v.to_f64()).collect();
                let init: Vec<f32> = (0..batch * m * n).map(|i| (i % 7) as f32 * 0.25).collect();
                let mut c = init.clone();
                let dims = GemmDims { batch, m, n, k };
                assert!(matmul_bf16(
                    dims,
                    op(&a[..], ta, m * k),
                    op(&b[..], tb, k * n),
                    &mut c,
                    acc
                ));
                let mut want = vec![0f64; batch * m * n];
                matmul_reference(
                    dims,
                    op(&wa[..], ta, m * k),
                    op(&wb[..], tb, k * n),
                    &mut want,
                );
                // |a||b| summed: the scale a product's rounding is relative to.
                let aa: Vec<f64> = wa.iter().map(|v| v.abs()).collect();
                let ab: Vec<f64> = wb.iter().map(|v| v.abs()).collect();
                let mut mag = vec![0f64; batch * m * n];
                matmul_reference(
                    dims,
                    op(&aa[..], ta, m * k),
                    op(&ab[..], tb, k * n),
                    &mut mag,
                );
                for i in 0..batch * m * n {
                    let w = want[i] + if acc { init[i] as f64 } else { 0.0 };
                    let tol = 2e-6 * (k as f64).sqrt() * (mag[i] + 1.0);
                    assert!(
                        (c[i] as f64 - w).abs() <= tol,
                        "({batch},{m},{n},{k}) ta {ta} tb {tb} acc {acc} [{i}]: {} vs {w}",
                        c[i]
                    );
                }
            }
        }
    }

    /// Into uninitialised memory the kernel writes every element (spare capacity poisoned
    /// with NaN comes back equal to the initialised path's output), an inner dimension of 0
    /// included.
    #[test]
    fn the_uninitialised_output_is_written_whole() {
        if !supported() {
            return;
        }
        for (batch, m, n, k) in [(2, 9, 70, 129), (1, 17, 33, 0)] {
            let a = rand_bf16(batch * m * k, 11);
            let b = rand_bf16(batch * k * n, 12);
            let dims = GemmDims { batch, m, n, k };
            let (ao, bo) = (op(&a[..], false, m * k), op(&b[..], true, k * n));
            let mut want = vec![1.0f32; batch * m * n];
            assert!(matmul_bf16(dims, ao, bo, &mut want, false));
            let mut got: Vec<f32> = Vec::with_capacity(batch * m * n);
            got.spare_capacity_mut()
                .fill(std::mem::MaybeUninit::new(f32::NAN));
            assert!(matmul_bf16_uninit(
                dims,
                ao,
                bo,
                None,
                got.spare_capacity_mut()
            ));
            // SAFETY: the kernel wrote all batch * m * n elements (NaN poison would show).
            unsafe { got.set_len(batch * m * n) };
            assert_eq!(got, want, "({batch},{m},{n},{k})");
        }
    }

    /// The packing buffers are kept from product to product and not cleared: a small product
    /// with partial panels and an odd k, after a large one filled the buffers with other
    /// values, gives the same bits as on fresh buffers (computed first, on another thread).
    #[test]
    fn kept_packing_buffers_leave_no_trace() {
        if !supported() {
            return;
        }
        let (m, n, k) = (5, 37, 13);
        let a = rand_bf16(m * k, 31);
        let b32: Vec<f32> = rand_bf16(k * n, 32).iter().map(|v| v.to_f32()).collect();
        let run = |ta, tb| {
            let mut c = vec![0f32; m * n];
            let (ao, bo) = (op(&a[..], ta, 0), op(&b32[..], tb, 0));
            assert!(matmul_bf16(
                GemmDims { batch: 1, m, n, k },
                ao,
                bo,
                &mut c,
                false
            ));
            c
        };
        let cases = [(false, false), (false, true), (true, false), (true, true)];
        let fresh: Vec<Vec<f32>> = std::thread::scope(|s| {
            s.spawn(|| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                pool.install(|| cases.map(|(ta, tb)| run(ta, tb)).to_vec())
            })
            .join()
            .unwrap()
        });
        // Fill this thread's buffers (and the pool's) with a large product of other values.
        let (bm, bn, bk) = (64, 256, 2 * KC + 3);
        let (ba, bb) = (rand_bf16(bm * bk, 33), rand_bf16(bk * bn, 34));
        for (ta, tb) in cases {
            let mut c = vec![0f32; bm * bn];
            let dims = GemmDims {
                batch: 1,
                m: bm,
                n: bn,
                k: bk,
            };
            assert!(matmul_bf16(
                dims,
                op(&ba[..], ta, 0),
                op(&bb[..], tb, 0),
                &mut c,
                false
            ));
        }
        for ((ta, tb), want) in cases.into_iter().zip(&fresh) {
            assert_eq!(&run(ta, tb), want, "ta {ta} tb {tb}");
        }
    }

    /// The packing buffers hand out 64-byte aligned words at every length, as they grow and
    /// when reused.
    #[test]
    fn packing_buffers_start_on_a_cache_line() {
        for len in [1, 15, 16, 17, 1000, 5, 40_000, 3] {
            with_words(&B_PACK, len, |w| {
                assert_eq!(w.len(), len);
                assert_eq!(w.as_ptr() as usize % 64, 0, "len {len}");
            });
        }
    }

    /// An extra f32 product lands once on the output, with every edge: partial tiles, one or
    /// several k-blocks, an f32 or bf16 activation; against the f64 sum of both products.
    #[test]
    fn an_extra_product_is_added_once() {
        if !supported() {
            return;
        }
        for (m, n, k, k2) in [
            (9, 70, 129, 16),
            (17, 33, 2 * KC + 77, 3),
            (64, 576, 576, 48),
        ] {
            let a: Vec<f32> = rand_bf16(m * k, 21).iter().map(|v| v.to_f32()).collect();
            let b = rand_bf16(n * k, 22);
            let a2: Vec<f32> = (0..m * k2)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let b2: Vec<f32> = (0..n * k2)
                .map(|i| ((i * 53) % 89) as f32 / 44.0 - 1.0)
                .collect();
            let dims = GemmDims { batch: 1, m, n, k };
            let mut got: Vec<f32> = Vec::with_capacity(m * n);
            got.spare_capacity_mut()
                .fill(std::mem::MaybeUninit::new(f32::NAN));
            let extra = Extra {
                a: &a2,
                b: &b2,
                k: k2,
            };
            assert!(matmul_bf16_uninit(
                dims,
                op(&a[..], false, 0),
                op(&b[..], true, 0),
                Some(extra),
                got.spare_capacity_mut()
            ));
            // SAFETY: the kernel wrote all m * n elements (NaN poison would show).
            unsafe { got.set_len(m * n) };
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut mag) = (0f64, 1f64);
                    for p in 0..k {
                        let x = a[i * k + p] as f64 * b[j * k + p].to_f64();
                        want += x;
                        mag += x.abs();
                    }
                    for p in 0..k2 {
                        let x = a2[i * k2 + p] as f64 * b2[j * k2 + p] as f64;
                        want += x;
                        mag += x.abs();
                    }
                    let g = got[i * n + j] as f64;
                    assert!(
                        (g - want).abs() <= 2e-6 * ((k + k2) as f64).sqrt() * mag,
                        "({m},{n},{k},{k2}) [{i},{j}]: {g} vs {want}"
                    );
                }
            }
        }
    }

    /// Tasks of column panels share the panels evenly between threads where they can.
    #[test]
    fn panels_are_shared_evenly() {
        // (panels, threads) -> panels a task.
        for (nb, threads, want) in [
            (18, 2, 3),
            (6, 2, 3),
            (48, 2, 4),
            (1536, 2, 4),
            (18, 16, 2),
            (1, 4, 1),
            (7, 2, 4),
        ] {
            assert_eq!(
                panels_per_task(nb, threads),
                want,
                "{nb} panels, {threads} threads"
            );
        }
    }

    /// An f32 operand is rounded to bf16 as it is packed: the result is bit for bit the one of
    /// the pre-rounded bf16 operand, on either side and in either orientation.
    #[test]
    fn an_f32_operand_is_rounded_once_in_packing() {
        if !supported() {
            eprintln!("neither AVX512-BF16 nor AVX2 + FMA on this CPU: nothing to compare");
            return;
        }
        let (m, n, k) = (19, 45, 67);
        let a32: Vec<f32> = rand_bf16(m * k, 3)
            .iter()
            .zip(rand_bf16(m * k, 4))
            // Values between bf16 neighbours, so the rounding matters.
            .map(|(x, y)| x.to_f32() + y.to_f32() * 1e-3)
            .collect();
        let a16: Vec<bf16> = a32.iter().map(|&x| bf16::from_f32(x)).collect();
        let b = rand_bf16(k * n, 5);
        let dims = GemmDims { batch: 1, m, n, k };
        for (ta, tb) in [(false, true), (true, false)] {
            let (mut got, mut want) = (vec![0f32; m * n], vec![0f32; m * n]);
            assert!(matmul_bf16(
                dims,
                op(&a32[..], ta, 0),
                op(&b[..], tb, 0),
                &mut got,
                false
            ));
            assert!(matmul_bf16(
                dims,
                op(&a16[..], ta, 0),
                op(&b[..], tb, 0),
                &mut want,
                false
            ));
            assert_eq!(got, want, "ta {ta} tb {tb}");
        }
        // And as the right-hand operand: b^T . a^T = (a . b)^T.
        let (mut got, mut want) = (vec![0f32; n * m], vec![0f32; n * m]);
        let t = GemmDims {
            batch: 1,
            m: n,
            n: m,
            k,
        };
        assert!(matmul_bf16(
            t,
            op(&b[..], true, 0),
            op(&a32[..], true, 0),
            &mut got,
            false
        ));
        assert!(matmul_bf16(
            t,
            op(&b[..], true, 0),
            op(&a16[..], true, 0),
            &mut want,
            false
        ));
        assert_eq!(got, want);
    }

    /// The packing's f32 rounding gives `half`'s bits on every kind of value: ties either way,
    /// just past ties, subnormals, the largest finite values (rounding to infinity), infinities
    /// and NaNs of both signs.
    #[test]
    fn the_packing_rounds_f32_as_half_does() {
        for b in rounding_probes(1 << 20) {
            let x = f32::from_bits(b);
            assert_eq!(
                x.bf16_bits(),
                bf16::from_f32(x).to_bits() as u32,
                "{b:#010x}"
            );
        }
    }

    /// `WeightProduct<bf16> for f32` (the kernel where the CPU has it) and the widened f32
    /// GEMM it falls back to (run here on any CPU): both give the f64 product of the rounded
    /// activation and the weight, to f32 accumulation accuracy.
    #[test]
    fn the_autocast_weight_product_is_the_product_of_the_rounded_values() {
        let (m, n, k) = (13, 70, 129);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 333.3 - 1.5)
            .collect();
        let w = rand_bf16(n * k, 9);
        let dims = GemmDims { batch: 1, m, n, k };
        let ar: Vec<f64> = a.iter().map(|&x| bf16::from_f32(x).to_f64()).collect();
        let wr: Vec<f64> = w.iter().map(|x| x.to_f64()).collect();
        let mut want = vec![0f64; m * n];
        matmul_reference(dims, op(&ar[..], false, 0), op(&wr[..], true, 0), &mut want);
        let (mut trait_c, mut fallback_c) = (vec![0.5f32; m * n], vec![0.5f32; m * n]);
        let (ao, wo) = (op(&a[..], false, 0), op(&w[..], true, 0));
        f32::weight_product(dims, ao, wo, &mut trait_c, true);
        widened_product(dims, ao, wo, &mut fallback_c, true);
        for c in [&trait_c, &fallback_c] {
            for (got, want) in c.iter().zip(&want) {
                assert!(
                    (*got as f64 - 0.5 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
        }
    }
}
