//! Packed f32 GEMM on CPUs with AVX2 and FMA: what multiplies 16-bit weights where the CPU has
//! no AVX512-BF16 (AMD Zen 2/3, Intel before Cooper Lake). There the weights were widened to
//! f32 copies every product and handed to the `gemm` crate, together with a rounded copy of
//! the activation; on a Zen 3 machine that made `--dtype bf16` 1.5x slower than f32. Where
//! the CPU has AVX2 but no AVX-512 it is also the f32 GEMM of large products
//! (`matmul::prefers_fma_kernel`).
//!
//! BLIS's layout: A in micro-panels of `MR` = 6 rows, B in panels of `NR` = 16 columns, both
//! f32, k in blocks of at most `KC`; a 6 x 16 tile of C lives in 12 ymm registers, and per k
//! the micro-kernel loads two vectors of B and broadcasts each of the six A values (12 FMAs
//! against 8 loads: two FMA pipes stay busy). A bf16 operand is widened (exactly: a shift)
//! while it is packed, so a weight is read from memory at 2 bytes an element and never copied
//! whole; with `round`, an f32 operand is rounded to bf16 as it is packed, once per element,
//! as PyTorch's CPU autocast rounds the activation it feeds a bf16 weight. The product is then
//! that of the rounded values accumulated in f32: what the AVX512-BF16 kernel computes, in
//! another summation order.

use super::Line;
use super::bf16_gemm::{
    Bf16Source as Source, Extra, SharedOut, extra_micro_panels, panels_per_task, prologue,
    with_buffer,
};
use super::matmul::{GemmDims, Operand};
use core::arch::x86_64::*;
use rayon::prelude::*;
use std::cell::Cell;
use std::thread::LocalKey;

/// Rows of a micro-tile.
pub(super) const MR: usize = 6;
/// Columns of a micro-tile: two ymm vectors of 8 f32.
pub(super) const NR: usize = 16;
/// k values per block. Every block past the first reads and writes all of C again (megabytes:
/// from L3 or memory), so fewer, longer blocks win even though a panel of B (768 x 16 f32,
/// 48 KiB) then streams from L2 rather than staying in L1: measured on Zen 3, 768 against 256
/// made the SmolLM2 products 3-12% faster (its 576-deep ones run in one block, the 1536-deep
/// in two) and the LM head's 12%.
const KC: usize = 768;
/// Micro-panels of A per row block: 12 x 6 rows x 768 k x 4 bytes = 216 KiB, which stays in L2
/// (512 KiB on Zen 2/3) beside the task's panel of B that its tiles pass.
const MC_PANELS: usize = 12;

thread_local! {
    /// This thread's packed k-block of A (on the calling thread) and panels of B (on each
    /// task's thread), kept from call to call rather than allocated for every product. Each
    /// keeps the size of the largest product its thread has run (A: rows x 768 x 4 bytes, 3 MiB
    /// for 1024 rows; B: at most 4 panels of (768 + rank) x 16 f32, about 200 KiB).
    static A_PACK: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
    static B_PACK: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on `len` f32 of this thread's buffer `slot` (`bf16_gemm::with_buffer`, in whole
/// lines).
pub(super) fn with_floats<R>(
    slot: &'static LocalKey<Cell<Vec<Line>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    with_buffer(slot, len.div_ceil(16), |lines| {
        f(&mut bytemuck::cast_slice_mut::<Line, f32>(lines)[..len])
    })
}

/// Whether this CPU runs the kernel: AVX2 and FMA (checked once).
pub fn available() -> bool {
    use std::arch::is_x86_feature_detected as has;
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| has!("avx2") && has!("fma"))
}

/// `c = op(a) . op(b)` (plus `extra`'s unrounded f32 product), or `c += ..` when `accumulate`,
/// with the conventions of `matmul::matmul` (`c` contiguous `(batch, m, n)`); with `round`,
/// f32 operands are rounded to bf16 as they are packed. Returns false, writing nothing, when
/// the CPU lacks AVX2 or FMA.
///
/// # Safety
/// `c` must be valid for writes of `c_len` f32, and for reads too when `accumulate`; no other
/// thread may touch it during the call. Without `accumulate` every element of the first
/// `batch * m * n` is written before any is read.
///
/// # Panics
/// If a buffer is too short, or if `extra` comes with a batch other than one or a `k` of 0.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn packed_gemm<A: Source, B: Source>(
    dims: GemmDims,
    a: Operand<'_, A>,
    b: Operand<'_, B>,
    round: bool,
    extra: Option<Extra<'_>>,
    c: *mut f32,
    c_len: usize,
    accumulate: bool,
) -> bool {
    if !available() {
        return false;
    }
    // SAFETY: the caller's contract is `prologue`'s.
    if !unsafe { prologue(dims, &a, &b, extra, c, c_len, accumulate) } {
        return true;
    }
    let GemmDims { batch, m, n, k } = dims;
    let k2 = extra.map_or(0, |e| e.k);
    let (mb, nb) = (m.div_ceil(MR), n.div_ceil(NR));
    let threads = rayon::current_num_threads();
    let per_task = panels_per_task(nb, threads);
    let groups = nb.div_ceil(per_task);
    // Too few column groups to keep every thread busy (a narrow product): the row blocks are
    // split between tasks too, each packing its own copy of its panels.
    let row_blocks = mb.div_ceil(MC_PANELS);
    let row_splits = threads.div_ceil(groups).min(row_blocks).max(1);
    let blocks_per_split = row_blocks.div_ceil(row_splits);
    let kc_max = k.div_ceil(k.div_ceil(KC));
    with_floats(&A_PACK, mb * kc_max * MR, |apack| {
        let a2pack = extra_micro_panels(extra, m, MR);
        for i in 0..batch {
            let (ad, bd) = (&a.data[i * a.batch_stride..], &b.data[i * b.batch_stride..]);
            // SAFETY: i * m * n < batch * m * n <= c_len, inside the caller's buffer.
            let out = SharedOut(unsafe { c.add(i * m * n) });
            // Blocks of equal size: a short last block would pay a pass over C for little work.
            for k0 in (0..k).step_by(kc_max) {
                let kc = kc_max.min(k - k0);
                let acc = accumulate || k0 > 0;
                apack[..mb * kc * MR]
                    .par_chunks_mut(kc * MR)
                    .enumerate()
                    .for_each(|(blk, panel)| {
                        let (first, valid) = (blk * MR, MR.min(m - blk * MR));
                        // SAFETY: `available()` found AVX2 and FMA.
                        unsafe {
                            if a.trans {
                                pack_k_major(panel, MR, &ad[k0 * m + first..], m, valid, kc, round);
                            } else {
                                pack_lanes(panel, MR, &ad[first * k + k0..], k, kc, valid, round);
                            }
                        }
                    });
                let (apack, a2pack, out) = (&apack, &a2pack, &out);
                // The extra product is added once, by the last k-block's tiles.
                let extra = extra.filter(|_| k0 + kc == k);
                (0..groups * row_splits).into_par_iter().for_each(|task| {
                    let (group, split) = (task / row_splits, task % row_splits);
                    let panels = group * per_task..nb.min((group + 1) * per_task);
                    let rows = (split * blocks_per_split * MC_PANELS).min(mb)
                        ..((split + 1) * blocks_per_split * MC_PANELS).min(mb);
                    with_floats(&B_PACK, per_task * (kc_max + k2) * NR, |bpack| {
                        let (bpack, b2pack) = bpack.split_at_mut(per_task * kc_max * NR);
                        for (slot, pj) in panels.clone().enumerate() {
                            let panel = &mut bpack[slot * kc * NR..(slot + 1) * kc * NR];
                            let (first, valid) = (pj * NR, NR.min(n - pj * NR));
                            // SAFETY: `available()` found AVX2 and FMA.
                            unsafe {
                                if b.trans {
                                    pack_lanes(
                                        panel,
                                        NR,
                                        &bd[first * k + k0..],
                                        k,
                                        kc,
                                        valid,
                                        round,
                                    );
                                } else {
                                    pack_k_major(
                                        panel,
                                        NR,
                                        &bd[k0 * n + first..],
                                        n,
                                        valid,
                                        kc,
                                        round,
                                    );
                                }
                            }
                            if let Some(e) = extra {
                                // (k2, NR) f32 panel of the extra right operand.
                                let panel = &mut b2pack[slot * k2 * NR..(slot + 1) * k2 * NR];
                                // SAFETY: as above; e.b holds n rows of k2 (asserted).
                                unsafe {
                                    pack_lanes(panel, NR, &e.b[first * k2..], k2, k2, valid, false)
                                };
                            }
                        }
                        // A row block of A (in L2) meets each of the task's panels in turn (in
                        // L1 while the block's micro-panels pass it).
                        for rb in rows.clone().step_by(MC_PANELS) {
                            for (slot, pj) in panels.clone().enumerate() {
                                let bp = &bpack[slot * kc * NR..(slot + 1) * kc * NR];
                                let b2 = &b2pack[slot * k2 * NR..(slot + 1) * k2 * NR];
                                let cols = NR.min(n - pj * NR);
                                for blk in rb..(rb + MC_PANELS).min(rows.end) {
                                    let ap = &apack[blk * kc * MR..(blk + 1) * kc * MR];
                                    let a2 = &a2pack[blk * k2 * MR..(blk + 1) * k2 * MR];
                                    let plus = extra.map(|_| (a2, b2, k2));
                                    let tile_rows = MR.min(m - blk * MR);
                                    // SAFETY: `available()` found AVX2 and FMA; the panels hold
                                    // kc (k2) rows of MR (NR) values; the tile at row blk * MR,
                                    // column pj * NR, `tile_rows x cols` with stride n, lies
                                    // inside this batch item's outputs, and no other task
                                    // writes it (tasks own disjoint panels or disjoint rows).
                                    unsafe {
                                        let tile = out.0.add(blk * MR * n + pj * NR);
                                        tile_kernel(kc, ap, bp, plus, tile, n, tile_rows, cols, acc)
                                    }
                                }
                            }
                        }
                    })
                });
            }
        }
    });
    true
}

/// Eight values from `src` as f32: bf16 widened, f32 rounded to bf16 when `round`.
///
/// # Safety
/// The CPU must have AVX2; `src` must be readable for eight elements.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load8<S: Source>(src: *const S, round: bool) -> __m256 {
    // SAFETY: the caller vouches for eight readable elements of S (16 or 32 bytes).
    unsafe {
        if S::BF16 {
            let h = _mm_loadu_si128(src.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        } else {
            let v = _mm256_loadu_ps(src.cast());
            if round { round8(v) } else { v }
        }
    }
}

/// Eight f32 rounded to bf16 (to nearest, ties to even; a NaN stays a quiet NaN) and widened
/// back: the bits of `Bf16Source::bf16_bits`, eight at a time.
#[target_feature(enable = "avx2")]
#[inline]
fn round8(v: __m256) -> __m256 {
    let b = _mm256_castps_si256(v);
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
    let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
    let rounded = _mm256_and_si256(_mm256_add_epi32(b, bias), high);
    let quiet = _mm256_and_si256(_mm256_or_si256(b, _mm256_set1_epi32(0x0040_0000)), high);
    let magnitude = _mm256_and_si256(b, _mm256_set1_epi32(0x7fff_ffff));
    let nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f80_0000));
    _mm256_castsi256_ps(_mm256_blendv_epi8(rounded, quiet, nan))
}

/// Packs `valid` lanes whose `len` k values are contiguous runs of `src` (lane l at
/// `l * stride`) into `panel (len, lanes)`; lanes past `valid` are zero. `lanes` is MR or NR.
///
/// Eight lanes and eight k at a time, transposed in registers (the scalar scatter it replaces
/// stores one element an instruction); a six-lane panel takes the first six of eight lanes.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_lanes<S: Source>(
    panel: &mut [f32],
    lanes: usize,
    src: &[S],
    stride: usize,
    len: usize,
    valid: usize,
    round: bool,
) {
    assert!(panel.len() >= len * lanes && valid <= lanes && valid > 0);
    assert!(src.len() >= (valid - 1) * stride + len);
    let whole = len - len % 8;
    for g in (0..lanes).step_by(8) {
        let width = (lanes - g).min(8);
        // SAFETY: lanes g..g + 8 clamp to 6 for MR; the mask keeps the stores inside the row.
        let mask = unsafe { lane_mask(width) };
        for p in (0..whole).step_by(8) {
            // SAFETY: lane l < valid reads src[l * stride + p..+ 8], inside src (asserted,
            // p + 8 <= len); other lanes are zero.
            let r: [__m256; 8] = std::array::from_fn(|i| {
                if g + i < valid {
                    unsafe { load8(src.as_ptr().add((g + i) * stride + p), round) }
                } else {
                    _mm256_setzero_ps()
                }
            });
            let cols = transpose8(r);
            for (j, col) in cols.into_iter().enumerate() {
                let o = (p + j) * lanes + g;
                // A six-lane row is stored eight wide where the two extra values land in the
                // next row, which a later store (rows go in order) or the tail loop overwrites:
                // masked stores made packing A a third slower on Zen 3. Only the panel's last
                // row is masked.
                // SAFETY: the first `width` values from o lie inside the panel (p + j < len,
                // g + width <= lanes), and all eight where o + 8 <= len * lanes.
                unsafe {
                    if width == 8 || o + 8 <= len * lanes {
                        _mm256_storeu_ps(panel.as_mut_ptr().add(o), col);
                    } else {
                        _mm256_maskstore_ps(panel.as_mut_ptr().add(o), mask, col);
                    }
                }
            }
        }
    }
    for p in whole..len {
        let row = &mut panel[p * lanes..(p + 1) * lanes];
        for (l, v) in row.iter_mut().enumerate() {
            *v = if l < valid {
                src[l * stride + p].widened(round)
            } else {
                0.0
            };
        }
    }
}

/// A mask of the first `width` (at most 8) lanes of a ymm vector.
///
/// # Safety
/// The CPU must have AVX.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn lane_mask(width: usize) -> __m256i {
    const ONES: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    // SAFETY: 8 - min(width, 8) + 8 <= 16: the load stays inside ONES.
    unsafe { _mm256_loadu_si256(ONES.as_ptr().add(8 - width.min(8)).cast()) }
}

/// `out[j]` = lane j of every `r[i]`: an 8 x 8 transpose of f32.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // (r0[0], r1[0], r0[1], r1[1] | r0[4], r1[4], r0[5], r1[5]) and the high halves.
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (x, y) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(x, y)
        } else {
            _mm256_unpackhi_ps(x, y)
        }
    });
    // Rows 0-3 (4-7) of columns j and j + 4, one column per 128-bit half.
    let s = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    std::array::from_fn(|j| {
        if j < 4 {
            _mm256_permute2f128_ps::<0x20>(s[j], s[j + 4])
        } else {
            _mm256_permute2f128_ps::<0x31>(s[j - 4], s[j])
        }
    })
}

/// Packs `valid` lanes whose k values are strided (lane l, index p at `p * stride + l`) into
/// `panel (len, lanes)`; lanes past `valid` are zero.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_k_major<S: Source>(
    panel: &mut [f32],
    lanes: usize,
    src: &[S],
    stride: usize,
    valid: usize,
    len: usize,
    round: bool,
) {
    assert!(panel.len() >= len * lanes && valid <= lanes && valid > 0);
    assert!(src.len() >= (len - 1) * stride + valid);
    for (p, row) in panel[..len * lanes].chunks_exact_mut(lanes).enumerate() {
        let s = &src[p * stride..p * stride + valid];
        if valid == 16 && lanes == 16 {
            // SAFETY: `s` and `row` hold 16 values each.
            unsafe {
                _mm256_storeu_ps(row.as_mut_ptr(), load8(s.as_ptr(), round));
                _mm256_storeu_ps(row.as_mut_ptr().add(8), load8(s.as_ptr().add(8), round));
            }
            continue;
        }
        for (d, &x) in row.iter_mut().zip(s) {
            *d = x.widened(round);
        }
        row[valid..].fill(0.0);
    }
}

/// One `rows x cols` (at most `MR x NR`) tile of C from packed panels of `kc` k values, plus,
/// with `plus`, the product of a `(k2, MR)` and a `(k2, NR)` panel.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `ap` holds `kc * MR` and `bp` `kc * NR` values, `bp`
/// 32-byte aligned; `c` points at `(rows - 1) * ldc + cols` writable elements (readable too when
/// `accumulate`) no other thread touches.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_kernel(
    kc: usize,
    ap: &[f32],
    bp: &[f32],
    plus: Option<(&[f32], &[f32], usize)>,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    assert!(ap.len() >= kc * MR && bp.len() >= kc * NR);
    // The tile's lines of C are asked for now, to be in cache when the k loop ends (each row
    // of a wide C, an LM head's logits, lies on a page of its own).
    for r in 0..rows {
        // SAFETY: a prefetch never faults; the address is inside the tile (r < rows).
        unsafe {
            let row = c.add(r * ldc);
            _mm_prefetch::<_MM_HINT_T0>(row.cast());
            if cols > 8 {
                _mm_prefetch::<_MM_HINT_T0>(row.add(cols - 1).cast());
            }
        }
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    // SAFETY: the panels hold kc rows (asserted above).
    unsafe { steps(&mut acc, ap.as_ptr(), bp.as_ptr(), kc) };
    if let Some((a2, b2, k2)) = plus {
        assert!(a2.len() >= k2 * MR && b2.len() >= k2 * NR);
        // SAFETY: as above, for k2 rows; b2 is a 64-byte aligned slice of panels too.
        unsafe { steps(&mut acc, a2.as_ptr(), b2.as_ptr(), k2) };
    }
    // SAFETY: the caller's contract on `c` is `store_tile`'s.
    unsafe { store_tile(&acc, c, ldc, (rows, cols), accumulate, 1.0) };
}

/// Writes the first `rows x cols` of a tile's accumulators at `c` (rows `ldc` apart), times
/// `scale`, added to what is there when `accumulate`; lanes past `cols` are left alone.
///
/// # Safety
/// The CPU must have AVX2; `c` points at `(rows - 1) * ldc + cols` writable elements (readable
/// too when `accumulate`) no other thread touches.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn store_tile(
    acc: &[[__m256; 2]; MR],
    c: *mut f32,
    ldc: usize,
    (rows, cols): (usize, usize),
    accumulate: bool,
    scale: f32,
) {
    let factor = _mm256_set1_ps(scale);
    for (r, acc_r) in acc.iter().enumerate().take(rows) {
        for (h, &v) in acc_r.iter().enumerate() {
            let lanes = cols.saturating_sub(h * 8).min(8);
            if lanes == 0 {
                continue;
            }
            let v = if scale == 1.0 {
                v
            } else {
                _mm256_mul_ps(v, factor)
            };
            // SAFETY: the loads and stores touch only the first `lanes` elements from
            // r * ldc + h * 8, inside the tile (r < rows, h * 8 + lanes <= cols).
            unsafe {
                let dst = c.add(r * ldc + h * 8);
                if lanes == 8 {
                    let v = if accumulate {
                        _mm256_add_ps(v, _mm256_loadu_ps(dst))
                    } else {
                        v
                    };
                    _mm256_storeu_ps(dst, v);
                } else {
                    let mask = lane_mask(lanes);
                    let v = if accumulate {
                        _mm256_add_ps(v, _mm256_maskload_ps(dst, mask))
                    } else {
                        v
                    };
                    _mm256_maskstore_ps(dst, mask, v);
                }
            }
        }
    }
}

/// `acc[r] += a[p * MR + r] * b[p * NR..(p + 1) * NR]` for p < `count`: the k loop.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `a` is readable for `count * MR` f32 and `b` for
/// `count * NR`, 32-byte aligned.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn steps(acc: &mut [[__m256; 2]; MR], a: *const f32, b: *const f32, count: usize) {
    for p in 0..count {
        // SAFETY: p < count, so both loads lie inside b's p-th row of NR values (aligned: rows
        // are 64 bytes) and the broadcasts inside a's p-th row of MR.
        unsafe {
            let b0 = _mm256_load_ps(b.add(p * NR));
            let b1 = _mm256_load_ps(b.add(p * NR + 8));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(p * MR + r));
                acc_r[0] = _mm256_fmadd_ps(x, b0, acc_r[0]);
                acc_r[1] = _mm256_fmadd_ps(x, b1, acc_r[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matmul::matmul_reference;
    use half::bf16;

    fn op<T>(data: &[T], trans: bool, batch_stride: usize) -> Operand<'_, T> {
        Operand {
            data,
            trans,
            batch_stride,
        }
    }

    /// Values in [-1, 1) that are not bf16 values (their low 16 bits are not zero), so a
    /// missing or double rounding shows.
    fn rand_f32(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005) | 1;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `packed_gemm` into `c` (a copy of `init`), or None where the CPU lacks AVX2 and FMA.
    fn run<A: Source, B: Source>(
        dims: GemmDims,
        a: Operand<'_, A>,
        b: Operand<'_, B>,
        round: bool,
        extra: Option<Extra<'_>>,
        init: &[f32],
        accumulate: bool,
    ) -> Option<Vec<f32>> {
        let mut c = init.to_vec();
        // SAFETY: `c` is a live, initialised buffer of its length.
        let ran = unsafe {
            packed_gemm(
                dims,
                a,
                b,
                round,
                extra,
                c.as_mut_ptr(),
                c.len(),
                accumulate,
            )
        };
        ran.then_some(c)
    }

    /// Checks `got` against `want` (f64, plus `init` when accumulating) to the accuracy of an
    /// f32 sum of k products: 2e-6 sqrt(k) of the sum of their magnitudes `mag`.
    fn assert_close(got: &[f32], want: &[f64], mag: &[f64], k: usize, what: &str) {
        for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(mag).enumerate() {
            let tol = 2e-6 * (k as f64).sqrt() * (s + 1.0);
            assert!((g as f64 - w).abs() <= tol, "{what} [{i}]: {g} vs {w}");
        }
    }

    /// f64 `op(a) . op(b)` and the same product of magnitudes.
    fn reference(dims: GemmDims, a: (&[f64], bool), b: (&[f64], bool)) -> (Vec<f64>, Vec<f64>) {
        let GemmDims { batch, m, n, k } = dims;
        let (mut want, mut mag) = (vec![0f64; batch * m * n], vec![0f64; batch * m * n]);
        let abs = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
        let (aa, ab) = (abs(a.0), abs(b.0));
        let (sa, sb) = (m * k, k * n);
        matmul_reference(dims, op(a.0, a.1, sa), op(b.0, b.1, sb), &mut want);
        matmul_reference(dims, op(&aa, a.1, sa), op(&ab, b.1, sb), &mut mag);
        (want, mag)
    }

    /// Every edge of the blocking: m and n off the 6 x 16 tile, k = 1, k past one and several
    /// KC blocks with a short last one, m past one row block of MC_PANELS micro-panels, a
    /// narrow n whose row blocks are split between tasks, batches, every transpose, and
    /// accumulation; f32 operands exact and rounded, bf16 weights widened. Against the f64
    /// product of the values the kernel is meant to multiply.
    #[test]
    fn matches_the_f64_reference_on_every_edge() {
        if !available() {
            eprintln!("AVX2 + FMA not on this CPU: nothing to run");
            return;
        }
        let mut seed = 1;
        for (batch, m, n, k) in [
            (1, 1, 1, 1),
            (1, 6, 16, 8),
            (1, 7, 17, 9),
            (2, 13, 70, 257),
            (1, 150, 40, 3 * KC + 5),
            (1, 300, 16, 31),
            (3, 5, 7, 2),
        ] {
            for (ta, tb, acc) in [
                (false, true, false),
                (false, false, true),
                (true, false, false),
                (true, true, true),
            ] {
                seed += 1;
                let dims = GemmDims { batch, m, n, k };
                let what = format!("({batch},{m},{n},{k}) ta {ta} tb {tb} acc {acc}");
                let a = rand_f32(batch * m * k, seed);
                let w: Vec<bf16> = rand_f32(batch * k * n, seed + 50)
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect();
                let init: Vec<f32> = (0..batch * m * n).map(|i| (i % 7) as f32 * 0.25).collect();
                let plus = |v: Vec<f64>| -> Vec<f64> {
                    v.iter()
                        .zip(&init)
                        .map(|(x, &c)| x + if acc { c as f64 } else { 0.0 })
                        .collect()
                };
                let wide: Vec<f64> = w.iter().map(|x| x.to_f64()).collect();
                let (ao, wo) = (op(&a[..], ta, m * k), op(&w[..], tb, k * n));
                // f32 times a bf16 weight, the activation rounded (autocast).
                let rounded: Vec<f64> = a.iter().map(|&x| bf16::from_f32(x).to_f64()).collect();
                let (want, mag) = reference(dims, (&rounded, ta), (&wide, tb));
                let got = run(dims, ao, wo, true, None, &init, acc).unwrap();
                assert_close(&got, &plus(want), &mag, k, &format!("autocast {what}"));
                // f32 times f32, exact: the kernel as a plain f32 GEMM.
                let b = rand_f32(batch * k * n, seed + 90);
                let (a64, b64): (Vec<f64>, Vec<f64>) = (
                    a.iter().map(|&x| x as f64).collect(),
                    b.iter().map(|&x| x as f64).collect(),
                );
                let (want, mag) = reference(dims, (&a64, ta), (&b64, tb));
                let got = run(dims, ao, op(&b[..], tb, k * n), false, None, &init, acc).unwrap();
                assert_close(&got, &plus(want), &mag, k, &format!("f32 {what}"));
                // bf16 times f32 (the weight on the left), rounded.
                let b_rounded: Vec<f64> = b.iter().map(|&x| bf16::from_f32(x).to_f64()).collect();
                let w_left: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
                let (want, mag) = reference(dims, (&rounded, ta), (&b_rounded, tb));
                let got = run(
                    dims,
                    op(&w_left[..], ta, m * k),
                    op(&b[..], tb, k * n),
                    true,
                    None,
                    &init,
                    acc,
                )
                .unwrap();
                assert_close(&got, &plus(want), &mag, k, &format!("bf16 x f32 {what}"));
            }
        }
    }

    /// The extra product (a LoRA up-projection) lands once, unrounded, on the last k block,
    /// into an uninitialised-looking output (NaN-filled: every element must be written).
    #[test]
    fn an_extra_product_is_added_once_and_unrounded() {
        if !available() {
            return;
        }
        for (m, n, k, k2) in [(7, 33, 3 * KC + 1, 5), (150, 16, 40, 16), (1, 1, 1, 1)] {
            let x = rand_f32(m * k, 3);
            let w: Vec<bf16> = rand_f32(n * k, 4).into_iter().map(bf16::from_f32).collect();
            let (u, bu) = (rand_f32(m * k2, 5), rand_f32(n * k2, 6));
            let dims = GemmDims { batch: 1, m, n, k };
            let extra = Extra {
                a: &u,
                b: &bu,
                k: k2,
            };
            let got = run(
                dims,
                op(&x[..], false, 0),
                op(&w[..], true, 0),
                true,
                Some(extra),
                &vec![f32::NAN; m * n],
                false,
            )
            .unwrap();
            let xr: Vec<f64> = x.iter().map(|&v| bf16::from_f32(v).to_f64()).collect();
            let wr: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
            let (mut want, mut mag) = reference(dims, (&xr, false), (&wr, true));
            let d2 = GemmDims { k: k2, ..dims };
            let (u64s, b64s): (Vec<f64>, Vec<f64>) = (
                u.iter().map(|&v| v as f64).collect(),
                bu.iter().map(|&v| v as f64).collect(),
            );
            let (w2, m2) = reference(d2, (&u64s, false), (&b64s, true));
            for i in 0..m * n {
                want[i] += w2[i];
                mag[i] += m2[i];
            }
            assert_close(&got, &want, &mag, k + k2, &format!("({m},{n},{k},{k2})"));
        }
    }

    /// The vector rounding gives the scalar rounding's bits (`half`'s, checked in `bf16_gemm`)
    /// on ties either way, subnormals, values rounding to infinity, infinities and NaNs.
    #[test]
    fn the_vector_rounding_matches_the_scalar_one() {
        if !available() {
            return;
        }
        let mut bits = crate::cpu::bf16_gemm::rounding_probes(1 << 16);
        bits.resize(bits.len().next_multiple_of(8), 0);
        for chunk in bits.chunks_exact(8) {
            let x: Vec<f32> = chunk.iter().map(|&b| f32::from_bits(b)).collect();
            let mut got = [0f32; 8];
            // SAFETY: `available()` found AVX2; `x` holds eight values, `got` eight.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), load8(x.as_ptr(), true)) };
            for (g, v) in got.iter().zip(&x) {
                assert_eq!(
                    g.to_bits(),
                    v.widened(true).to_bits(),
                    "{:#010x}",
                    v.to_bits()
                );
            }
        }
    }
}
