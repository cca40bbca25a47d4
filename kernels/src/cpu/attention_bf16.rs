//! Causal attention under bf16 autocast: the five products of flash attention (`Q K^T` and
//! `P V` forward; `Q K^T`, `dO V^T`, `P^T dO`, `dS^T Q` and `dS K` backward) run bf16 x bf16 -> f32
//! on the AVX512-BF16 micro-kernel of `bf16_gemm`, at twice the f32 FMA's rate, as PyTorch's
//! CPU autocast runs scaled-dot-product attention on bf16 tensors. Softmax, its running max and
//! sum, the rescaling of the output, `dS = P (dP - delta)` and every accumulation stay in f32.
//!
//! Rounded to bf16: q, k, v and dO once each (packed once per call, in the layouts the products
//! read), and every tile of probabilities P and of dS before the product that reads it. The
//! f32 kernels of `attention` are the reference (`attention_reference` for the forward).
//!
//! Tiles are `BR = 64` query rows by `BC = 64` keys, the micro-kernel's 8 x 32 blocks inside.
//! The forward runs a task per (batch, head, query block), as the f32 forward does; the
//! backward a task per (batch, K/V head), which owns dK and dV of that head and dQ of its query
//! heads (the f32 kernel's `PerKvHead` split), so no two tasks write the same row. With fewer
//! such tasks than threads it declines, and the caller runs the f32 backward's finer split.
//!
//! Layouts, with `dp = ceil(D / 2)` pairs along the head dimension (u32 bf16 pairs, as
//! `bf16_gemm` packs them):
//! - "rows over D" (`rows_over_d`): per (batch, head), micro-panels of 8 rows, `(dp, 8)` each;
//!   the left operand of a product over D (`Q K^T`, `dO V^T`).
//! - "lanes over D" (`lanes_over_d`): per (batch, head), panels of 32 rows as lanes, `(dp, 32)`
//!   each; the right operand of a product over D.
//! - "D over rows" (`d_over_rows`): per (batch, head) and per block of 64 rows, panels of 32
//!   columns of D, `(32 pairs of rows, 32)` each; the right operand of a product over rows
//!   (`P V`, `P^T dO`, `dS^T Q`, `dS K`).

use super::LineAligned;
use super::attention::{AttnDims, softmax_corrections};
use super::bf16_gemm::{
    Bf16Source, KC, MR, NR, available, pack_k_major, pack_lane_major, tile_kernel,
};
use super::float::exp_f32;
use rayon::prelude::*;

/// Query rows per tile.
const BR: usize = 64;
/// Keys per tile.
const BC: usize = 64;
// Blocks of 64 query rows packed "D over rows" (`d_over_rows`, by BC) are read per query
// tile (by BR): the two must agree.
const _: () = assert!(BR == BC);

/// Whether the forward kernel takes these shapes here: the CPU has AVX512-BF16 and a head's
/// pairs fit one packed k-block (D <= 2048; the f32 kernel has no such bound).
pub fn forward_applies(dims: &AttnDims) -> bool {
    available() && dims.head_dim.div_ceil(2) <= KC
}

/// Whether the backward kernel takes these shapes here: as the forward, and with at least as
/// many (batch, K/V head) tasks as threads. With fewer (one sequence with few K/V heads on
/// many cores) the f32 kernel's two-pass split keeps every core busy, recomputing the
/// probabilities from the same saved statistics.
pub fn backward_applies(dims: &AttnDims) -> bool {
    forward_applies(dims) && dims.batch * dims.kv_heads >= rayon::current_num_threads()
}

/// One tensor packed for the products, `(heads, per_head)` u32 with the layout's geometry.
/// Kept in whole cache lines, so its panels (right operands, loaded a zmm at a time) start
/// on 64-byte boundaries, as `bf16_gemm`'s packing buffers do.
struct Packed {
    data: LineAligned<u32>,
    per_head: usize,
}

impl Packed {
    /// `heads * per_head` zeros, filled by `fill` (panels of `chunk` u32, with their index).
    fn new(
        heads: usize,
        per_head: usize,
        chunk: usize,
        fill: impl Fn(usize, &mut [u32]) + Sync,
    ) -> Packed {
        // Zeroed by the pool (lanes past the rows and pairs past a short block stay zero):
        // `vec!` on reused heap memory zero-fills on this thread alone.
        let mut data = LineAligned::zeros(heads * per_head);
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, panel)| fill(i, panel));
        Packed { data, per_head }
    }

    fn head(&self, bh: usize) -> &[u32] {
        &self.data[bh * self.per_head..(bh + 1) * self.per_head]
    }
}

/// `x (heads, n, D)` as micro-panels of 8 rows over D: `(heads, ceil(n / 8), dp, 8)`.
fn rows_over_d(x: &[f32], heads: usize, n: usize, d: usize) -> Packed {
    panels_over_d(x, heads, n, d, MR)
}

/// `x (heads, n, D)` as panels of 32 rows (lanes) over D: `(heads, ceil(n / 32), dp, 32)`.
fn lanes_over_d(x: &[f32], heads: usize, n: usize, d: usize) -> Packed {
    panels_over_d(x, heads, n, d, NR)
}

fn panels_over_d(x: &[f32], heads: usize, n: usize, d: usize, lanes: usize) -> Packed {
    let (dp, blocks) = (d.div_ceil(2), n.div_ceil(lanes));
    let per_head = blocks * dp * lanes;
    Packed::new(heads, per_head, dp * lanes, |i, panel| {
        let (h, blk) = (i / blocks, i % blocks);
        let first = blk * lanes;
        // SAFETY: the callers checked `available()`, which covers the packers' features.
        unsafe {
            pack_lane_major(
                panel,
                lanes,
                &x[(h * n + first) * d..],
                d,
                d,
                lanes.min(n - first),
            )
        };
    })
}

/// `x (heads, n, D)` as, per block of 64 rows, panels of 32 columns of D over the block's row
/// pairs: `(heads, ceil(n / 64), ceil(D / 32), 32, 32)`; a short last block's panels hold its
/// `ceil(rows / 2)` pairs first.
fn d_over_rows(x: &[f32], heads: usize, n: usize, d: usize) -> Packed {
    let (blocks, dpanels) = (n.div_ceil(BC), d.div_ceil(NR));
    let slot = BC / 2 * NR;
    let per_head = blocks * dpanels * slot;
    Packed::new(heads, per_head, slot, |i, panel| {
        let (h, rest) = (i / (blocks * dpanels), i % (blocks * dpanels));
        let (blk, pd) = (rest / dpanels, rest % dpanels);
        let (r0, c0) = (blk * BC, pd * NR);
        let rows = BC.min(n - r0);
        // SAFETY: the callers checked `available()`.
        unsafe {
            pack_k_major(
                &mut panel[..rows.div_ceil(2) * NR],
                NR,
                &x[(h * n + r0) * d + c0..],
                d,
                NR.min(d - c0),
                rows,
            )
        };
    })
}

/// One of the layouts above: `(x (heads, n, D), heads, n, D)` to its packed form.
type Layout = fn(&[f32], usize, usize, usize) -> Packed;

/// Packs `(layout, x, heads, n)` for each job, all in one parallel region: a thread done with
/// its share of one packing takes panels of another, where a fork-join per packing left it
/// waiting at each one's end (eleven a layer with the backward's, about 8% of the kernels'
/// time in rayon's sleep and wake-up).
fn pack_all<const N: usize>(d: usize, jobs: [(Layout, &[f32], usize, usize); N]) -> [Packed; N] {
    let packed: Vec<Packed> = jobs
        .into_par_iter()
        .map(|(layout, x, heads, n)| layout(x, heads, n, d))
        .collect();
    // cannot fail: one packed tensor a job.
    packed.try_into().ok().expect("one packed tensor a job")
}

/// `c (m, n)` with row stride `ldc` `=` (or `+=` with `acc`) `a . b` for `a` packed as
/// micro-panels of 8 rows over `kp` pairs (`ceil(m / 8)` of them, each `kp * 8`, at stride
/// `a_stride`) and `b` as panels of 32 columns over the same pairs (at stride `b_stride`).
///
/// # Safety
/// `available()` must hold, and `c` must be valid for `(m - 1) * ldc + n` elements.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    (m, n, kp): (usize, usize, usize),
    a: &[u32],
    a_stride: usize,
    b: &[u32],
    b_stride: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    for blk in 0..m.div_ceil(MR) {
        let ap = &a[blk * a_stride..][..kp * MR];
        for pj in 0..n.div_ceil(NR) {
            let bp = &b[pj * b_stride..][..kp * NR];
            let (rows, cols) = (MR.min(m - blk * MR), NR.min(n - pj * NR));
            // SAFETY: the caller vouches for the CPU and for c; the tile at (blk * 8, pj * 32)
            // of rows x cols lies inside the m x n block.
            unsafe {
                tile_kernel(
                    kp,
                    ap,
                    bp,
                    None,
                    c.add(blk * MR * ldc + pj * NR),
                    ldc,
                    rows,
                    cols,
                    acc,
                )
            };
        }
    }
}

/// The `(rows, cols)` tile (row stride `BC`) of a product over D: rows `i0..` of `a` packed
/// "rows over D" times rows `j0..` of `b` packed "lanes over D" (`S = Q Kᵀ`, `dP = dO Vᵀ`).
///
/// # Safety
/// `available()` must hold; `out` holds `BR * BC` values.
unsafe fn tile_over_d(
    (a, i0, rows): (&[u32], usize, usize),
    (b, j0, cols): (&[u32], usize, usize),
    dp: usize,
    out: &mut [f32],
) {
    assert!(out.len() >= BR * BC);
    let (a, b) = (&a[i0 / MR * dp * MR..], &b[j0 / NR * dp * NR..]);
    // SAFETY: the caller vouches for the CPU; out holds the rows x cols tile at stride BC.
    unsafe {
        product(
            (rows, cols, dp),
            a,
            dp * MR,
            b,
            dp * NR,
            out.as_mut_ptr(),
            BC,
            false,
        )
    }
}

/// `c (m, D) +=` a packed tile (`m` rows as micro-panels of `kp` pairs at stride `a_stride`)
/// times a block of 64 rows packed "D over rows" (`P V`, `Pᵀ dO`, `dSᵀ Q`, `dS K`).
///
/// # Safety
/// `available()` must hold.
unsafe fn accumulate_over_rows(
    (m, kp): (usize, usize),
    (a, a_stride): (&[u32], usize),
    b: &[u32],
    d: usize,
    c: &mut [f32],
) {
    assert!(c.len() >= m * d);
    // SAFETY: the caller vouches for the CPU; c holds m x d.
    unsafe {
        product(
            (m, d, kp),
            a,
            a_stride,
            b,
            BC / 2 * NR,
            c.as_mut_ptr(),
            d,
            true,
        )
    }
}

/// Packs the `(rows, cols)` f32 tile `s` (row stride `BC`) as the left operand of a product
/// over its columns: micro-panels of 8 rows, `ceil(cols / 2)` pairs each, at stride
/// `BC / 2 * 8` in `out`.
///
/// # Safety
/// `available()` must hold.
unsafe fn pack_rows(s: &[f32], rows: usize, cols: usize, out: &mut [u32]) {
    for blk in 0..rows.div_ceil(MR) {
        let panel = &mut out[blk * BC / 2 * MR..][..cols.div_ceil(2) * MR];
        // SAFETY: the caller vouches for the CPU.
        unsafe {
            pack_lane_major(
                panel,
                MR,
                &s[blk * MR * BC..],
                BC,
                cols,
                MR.min(rows - blk * MR),
            )
        };
    }
}

/// Packs the transpose of the `(rows, cols)` f32 tile `s` (row stride `BC`) as the left operand
/// of a product over its rows: micro-panels of 8 columns, `ceil(rows / 2)` pairs each, at
/// stride `BR / 2 * 8` in `out`. Two rows at a time: their values, rounded, interleaved into
/// pairs, fill row p of every micro-panel (eight pairs each) in one vectorised pass, where
/// `pack_k_major` (eight lanes, pair by pair) made this the backward's largest cost.
///
/// # Safety
/// The CPU must have the features this is compiled with (`available()` checks them).
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
unsafe fn pack_columns(s: &[f32], rows: usize, cols: usize, out: &mut [u32]) {
    const ZERO: [f32; BC] = [0.0; BC];
    let stride = BR / 2 * MR;
    // Columns in whole micro-panels: lanes past `cols` carry whatever the tile buffer holds
    // there (values of earlier tiles); they are keys past the tile, whose outputs are never
    // stored.
    let width = cols.next_multiple_of(MR);
    let mut pairs = [0u32; BC];
    for p in 0..rows.div_ceil(2) {
        let lo = &s[2 * p * BC..][..width];
        let hi = if 2 * p + 1 < rows {
            &s[(2 * p + 1) * BC..][..width]
        } else {
            &ZERO[..width]
        };
        for ((o, &x), &y) in pairs.iter_mut().zip(lo).zip(hi) {
            *o = x.bf16_bits() | y.bf16_bits() << 16;
        }
        for (blk, chunk) in pairs[..width].chunks_exact(MR).enumerate() {
            out[blk * stride + p * MR..][..MR].copy_from_slice(chunk);
        }
    }
}

/// Rows of the score tile whose statistics are formed together: one zmm of 16 lanes holds one
/// statistic (max, sum, correction) of 16 rows.
const GROUP: usize = 16;
// The forward takes its BR query rows in whole groups.
const _: () = assert!(BR.is_multiple_of(GROUP));

/// The lanes of 16-column chunk `c` that lie before `vis` (a row's visible keys).
#[inline(always)]
fn chunk_mask(vis: usize, c: usize) -> u16 {
    match vis.saturating_sub(16 * c) {
        0 => 0,
        v if v >= 16 => u16::MAX,
        v => (1u16 << v) - 1,
    }
}

/// `exp_f32` on each of 16 lanes: a fixed-length lane loop the compiler turns into zmm
/// instructions inside the callers' AVX-512 functions.
#[inline(always)]
fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    // SAFETY: __m512 and [f32; 16] are the same 64 bytes.
    let mut v: [f32; 16] = unsafe { std::mem::transmute(x) };
    for e in v.iter_mut() {
        *e = exp_f32(*e);
    }
    // SAFETY: as above.
    unsafe { std::mem::transmute(v) }
}

/// `row`'s first `chunks` chunks of 16 columns: `exp(x * scale - shift)` where the column is
/// before `vis`, 0 after it; returns the 16 lanes' partial sums of what it wrote. Whole
/// masked chunks, so a diagonal tile's ragged rows take no scalar tail.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn exp_row(
    row: &mut [f32],
    chunks: usize,
    vis: usize,
    scale: f32,
    shift: f32,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let (vscale, vshift) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
    let row = &mut row[..16 * chunks];
    let mut sum = _mm512_setzero_ps();
    for c in 0..chunks {
        let k = chunk_mask(vis, c);
        // SAFETY: c < chunks, so the chunk lies inside `row`.
        unsafe {
            let at = row.as_mut_ptr().add(16 * c);
            let e = if k == 0 {
                _mm512_setzero_ps()
            } else {
                let x = _mm512_loadu_ps(at);
                _mm512_maskz_mov_ps(k, exp16(_mm512_fmsub_ps(x, vscale, vshift)))
            };
            _mm512_storeu_ps(at, e);
            sum = _mm512_add_ps(sum, e);
        }
    }
    sum
}

/// Reduces each of 16 vectors across its lanes with `$op`, lane i of the result being vector
/// i's: 45 shuffles and ops in a tree for 16 rows, where reducing row by row was a chain of 15
/// dependent scalar ops each (the forward's largest cost outside its products).
macro_rules! reduce16 {
    ($name:ident, $op:ident) => {
        /// # Safety
        /// AVX-512F.
        #[target_feature(enable = "avx512f")]
        unsafe fn $name(v: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
            use std::arch::x86_64::*;
            // Pairs of rows: per 128-bit block, [a0+a2, b0+b2, a1+a3, b1+b3].
            let w: [__m512; 8] = std::array::from_fn(|i| {
                let (a, b) = (v[2 * i], v[2 * i + 1]);
                $op(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
            });
            // Quads: per block, rows 4j..4j + 4 reduced over the block's four columns.
            let x: [__m512; 4] = std::array::from_fn(|j| {
                let (a, b) = (_mm512_castps_pd(w[2 * j]), _mm512_castps_pd(w[2 * j + 1]));
                $op(
                    _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                    _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
                )
            });
            // Across the four blocks: first pairs of blocks, then the two halves.
            let z = |a: __m512, b: __m512| {
                $op(
                    _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                    _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
                )
            };
            let (z0, z1) = (z(x[0], x[1]), z(x[2], x[3]));
            z(z0, z1)
        }
    };
}
reduce16!(rows_max, _mm512_max_ps);
reduce16!(rows_sum, _mm512_add_ps);

/// The online-softmax step of up to 16 rows of a score tile `s` (row stride `BC`, `cols`
/// keys of which row i sees `vis[i]`): their running maxima `m` and sums `l` take the tile in,
/// the tile becomes `exp(S * scale - m)` (0 past `vis`), and the returned factors are what the
/// rows' accumulated outputs must be multiplied by (0 on a row's first tile).
///
/// Panics unless `n = vis.len()` is 1 to 16 and `s` holds `(n - 1) * BC + cols` rounded up
/// to 16 values.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn softmax_group(
    s: &mut [f32],
    vis: &[usize],
    cols: usize,
    scale: f32,
    m: &mut [f32; GROUP],
    l: &mut [f32; GROUP],
) -> [f32; GROUP] {
    use std::arch::x86_64::*;
    let (n, chunks) = (vis.len(), cols.div_ceil(16));
    assert!((1..=GROUP).contains(&n) && s.len() >= (n - 1) * BC + chunks * 16);
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut part = [ninf; GROUP];
    for (i, (pm, &vis)) in part.iter_mut().zip(vis).enumerate() {
        for c in 0..chunks {
            // SAFETY: row i's chunk c lies inside `s` (asserted).
            let x = unsafe {
                _mm512_mask_loadu_ps(ninf, chunk_mask(vis, c), s.as_ptr().add(i * BC + 16 * c))
            };
            *pm = _mm512_max_ps(*pm, x);
        }
    }
    // SAFETY (this and the loads and stores below): AVX-512F; m and l hold 16 lanes.
    unsafe {
        // The scale is positive: the max of the scaled scores is the scaled max. A row that
        // sees no key of this tile keeps its max (-inf * scale is -inf).
        let m_old = _mm512_loadu_ps(m.as_ptr());
        let m_new = _mm512_max_ps(m_old, _mm512_mul_ps(rows_max(part), _mm512_set1_ps(scale)));
        // What was accumulated under the old max shrinks by exp(m_old - m_new); nothing was on
        // a row's first tile (m_old = -inf), where the difference may be NaN.
        let first = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m_old, ninf);
        let alpha = _mm512_mask_mov_ps(
            exp16(_mm512_sub_ps(m_old, m_new)),
            first,
            _mm512_setzero_ps(),
        );
        let shift: [f32; GROUP] = std::mem::transmute(m_new);
        let mut sums = [_mm512_setzero_ps(); GROUP];
        for (i, (sum, &vis)) in sums.iter_mut().zip(vis).enumerate() {
            *sum = exp_row(&mut s[i * BC..], chunks, vis, scale, shift[i]);
        }
        let l_new = _mm512_fmadd_ps(_mm512_loadu_ps(l.as_ptr()), alpha, rows_sum(sums));
        _mm512_storeu_ps(l.as_mut_ptr(), l_new);
        _mm512_storeu_ps(m.as_mut_ptr(), m_new);
        std::mem::transmute(alpha)
    }
}

/// Forward under autocast: writes `o` and `lse` as `attention::attention_forward` does, the
/// products in bf16. Returns false, writing nothing, where `forward_applies` is false.
pub fn attention_forward_bf16(
    dims: AttnDims,
    scale: f64,
    (q, k, v): (&[f32], &[f32], &[f32]),
    o: &mut [f32],
    lse: &mut [f32],
) -> bool {
    if !forward_applies(&dims) {
        return false;
    }
    dims.check();
    let (t, s, d) = (dims.q_len, dims.kv_len, dims.head_dim);
    let (bq, bkv) = (dims.batch * dims.q_heads, dims.batch * dims.kv_heads);
    let [qa, kb, vr] = pack_all(
        d,
        [
            (rows_over_d, q, bq, t),
            (lanes_over_d, k, bkv, s),
            (d_over_rows, v, bkv, s),
        ],
    );
    let packed = Operands { qa, kb, vr };
    let mut tasks: Vec<(usize, usize, &mut [f32], &mut [f32])> = Vec::new();
    for (bh, (ob, lb)) in o.chunks_mut(t * d).zip(lse.chunks_mut(t)).enumerate() {
        for (qb, (obr, lbr)) in ob.chunks_mut(BR * d).zip(lb.chunks_mut(BR)).enumerate() {
            tasks.push((bh, qb, obr, lbr));
        }
    }
    tasks.into_par_iter().for_each(|(bh, qb, ot, lt)| {
        // SAFETY: `available()` found every feature the task is compiled with.
        unsafe { forward_task(dims, scale as f32, &packed, (bh, qb), ot, lt) }
    });
    true
}

/// The forward's packed operands.
struct Operands {
    qa: Packed,
    kb: Packed,
    vr: Packed,
}

/// One forward task: query block `qb` of (batch, head) `bh`.
///
/// # Safety
/// `available()` must hold.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn forward_task(
    dims: AttnDims,
    scale: f32,
    ops: &Operands,
    (bh, qb): (usize, usize),
    ot: &mut [f32],
    lt: &mut [f32],
) {
    let (d, off, dp) = (dims.head_dim, dims.offset(), dims.head_dim.div_ceil(2));
    let hk = (bh / dims.q_heads) * dims.kv_heads + (bh % dims.q_heads) / dims.group();
    let (rows, i0) = (lt.len(), qb * BR);
    let (qa, kb, vr) = (ops.qa.head(bh), ops.kb.head(hk), ops.vr.head(hk));
    let slot = BC / 2 * NR;
    let dpanels = d.div_ceil(NR);
    let mut m = [f32::NEG_INFINITY; BR];
    let mut l = [0f32; BR];
    // On cache lines: the tile's rows (64 f32, four lines) are read and written a zmm at a time.
    let mut s = LineAligned::<f32>::zeros(BR * BC);
    let mut pa = vec![0u32; BR / MR * BC / 2 * MR];
    ot.fill(0.0);
    let key_end = (i0 + rows + off).min(dims.kv_len);
    for j0 in (0..key_end).step_by(BC) {
        let cols = BC.min(key_end - j0);
        // S = Q K^T: (rows, cols) over D.
        // SAFETY: `available()` holds.
        unsafe { tile_over_d((qa, i0, rows), (kb, j0, cols), dp, &mut s) };
        for g0 in (0..rows).step_by(GROUP) {
            let n = GROUP.min(rows - g0);
            let vis: [usize; GROUP] =
                std::array::from_fn(|i| (i0 + g0 + i + off + 1).saturating_sub(j0).min(cols));
            // cannot fail: BR is a multiple of GROUP, so g0 + GROUP <= BR.
            let (mg, lg) = (
                m[g0..].first_chunk_mut::<GROUP>().expect("a whole group"),
                l[g0..].first_chunk_mut::<GROUP>().expect("a whole group"),
            );
            // SAFETY: `available()` holds; s holds BR x BC with BC a multiple of 16.
            let alpha = unsafe { softmax_group(&mut s[g0 * BC..], &vis[..n], cols, scale, mg, lg) };
            for (r, &a) in (g0..g0 + n).zip(&alpha) {
                if a != 1.0 {
                    ot[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= a);
                }
            }
        }
        // O += P V: P rounded to bf16 as it is packed; V's pairs of keys from j0.
        // SAFETY: `available()` holds.
        unsafe {
            pack_rows(&s, rows, cols, &mut pa);
            let v_block = &vr[j0 / BC * dpanels * slot..];
            accumulate_over_rows((rows, cols.div_ceil(2)), (&pa, BC / 2 * MR), v_block, d, ot)
        };
    }
    for r in 0..rows {
        let inv = 1.0 / l[r];
        ot[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
        lt[r] = m[r] + l[r].ln();
    }
}

/// Backward under autocast: `dq`, `dk`, `dv` (overwritten) as `attention::attention_backward`
/// writes them, the products in bf16 and the probabilities recomputed from `lse`. Returns
/// false, writing nothing, where `backward_applies` is false.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_bf16(
    dims: AttnDims,
    scale: f64,
    (q, k, v): (&[f32], &[f32], &[f32]),
    (o, lse, dout): (&[f32], &[f32], &[f32]),
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> bool {
    if !backward_applies(&dims) {
        return false;
    }
    let (bq, bkv) = (dims.batch * dims.q_heads, dims.batch * dims.kv_heads);
    dims.check();
    let (t, s, d) = (dims.q_len, dims.kv_len, dims.head_dim);
    // The softmax-backward correction, in f32, beside the packings.
    let (delta, [qa, doa, kb, vb, qr, dor, kr]) = rayon::join(
        || softmax_corrections(dout, o, d),
        || {
            pack_all(
                d,
                [
                    (rows_over_d, q, bq, t),
                    (rows_over_d, dout, bq, t),
                    (lanes_over_d, k, bkv, s),
                    (lanes_over_d, v, bkv, s),
                    (d_over_rows, q, bq, t),
                    (d_over_rows, dout, bq, t),
                    (d_over_rows, k, bkv, s),
                ],
            )
        },
    );
    let ops = BackwardOperands {
        qa,
        doa,
        kb,
        vb,
        qr,
        dor,
        kr,
        lse,
        delta: &delta,
    };
    let g = dims.group();
    let tasks: Vec<_> = dq
        .chunks_mut(g * t * d)
        .zip(dk.chunks_mut(s * d).zip(dv.chunks_mut(s * d)))
        .enumerate()
        .collect();
    tasks.into_par_iter().for_each(|(bh, (dqg, (dkh, dvh)))| {
        // SAFETY: `available()` found every feature the task is compiled with.
        unsafe { kv_head_task(dims, scale as f32, &ops, bh, dqg, dkh, dvh) }
    });
    true
}

/// The backward's packed operands and f32 row statistics.
struct BackwardOperands<'a> {
    qa: Packed,
    doa: Packed,
    kb: Packed,
    vb: Packed,
    qr: Packed,
    dor: Packed,
    kr: Packed,
    lse: &'a [f32],
    delta: &'a [f32],
}

/// dK and dV of (batch, K/V head) `bkv` and dQ of its query heads, each probability tile
/// formed once.
///
/// # Safety
/// `available()` must hold.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn kv_head_task(
    dims: AttnDims,
    scale: f32,
    ops: &BackwardOperands<'_>,
    bkv: usize,
    dqg: &mut [f32],
    dkh: &mut [f32],
    dvh: &mut [f32],
) {
    let (t, sl, d, off) = (dims.q_len, dims.kv_len, dims.head_dim, dims.offset());
    let (dp, dpanels, slot) = (d.div_ceil(2), d.div_ceil(NR), BC / 2 * NR);
    let g = dims.group();
    let (b, hk) = (bkv / dims.kv_heads, bkv % dims.kv_heads);
    dqg.fill(0.0);
    dkh.fill(0.0);
    dvh.fill(0.0);
    let (kb, vb, kr) = (ops.kb.head(bkv), ops.vb.head(bkv), ops.kr.head(bkv));
    let (mut p, mut ds) = (
        LineAligned::<f32>::zeros(BR * BC),
        LineAligned::<f32>::zeros(BR * BC),
    );
    // Packed tiles: P^T and dS^T as left operands over query rows, dS over keys.
    let mut pt = vec![0u32; BC / MR * BR / 2 * MR];
    let mut dst = vec![0u32; BC / MR * BR / 2 * MR];
    let mut dsa = vec![0u32; BR / MR * BC / 2 * MR];
    for j0 in (0..sl).step_by(BC) {
        let cols = BC.min(sl - j0);
        let first_block = j0.saturating_sub(off) / BR;
        for (gh, dqh) in dqg.chunks_mut(t * d).enumerate() {
            let bh = b * dims.q_heads + hk * g + gh;
            let (qa, doa, qr, dor) = (
                ops.qa.head(bh),
                ops.doa.head(bh),
                ops.qr.head(bh),
                ops.dor.head(bh),
            );
            for i0 in (first_block * BR..t).step_by(BR) {
                let rows = BR.min(t - i0);
                let qi = bh * t + i0;
                // SAFETY (every block below): `available()` holds; p and ds hold BR x BC, the
                // dK and dV tiles cols x D, the dQ tile rows x D.
                unsafe {
                    // S = Q K^T and dP = dO V^T, both (rows, cols) over D.
                    tile_over_d((qa, i0, rows), (kb, j0, cols), dp, &mut p);
                    tile_over_d((doa, i0, rows), (vb, j0, cols), dp, &mut ds);
                }
                // P = exp(S * scale - lse), 0 where masked; dS = P (dP - delta) * scale (the
                // scale of both dK and dQ, applied once here).
                for r in 0..rows {
                    let vis = (i0 + r + off + 1).saturating_sub(j0).min(cols);
                    let (pr, dsr) = (&mut p[r * BC..(r + 1) * BC], &mut ds[r * BC..r * BC + cols]);
                    let (l, dl) = (ops.lse[qi + r], ops.delta[qi + r]);
                    // SAFETY: `available()` holds; a row of BC values holds cols rounded up to
                    // 16.
                    unsafe { exp_row(pr, cols.div_ceil(16), vis, scale, l) };
                    for (x, &pv) in dsr.iter_mut().zip(pr.iter()) {
                        *x = pv * (*x - dl) * scale;
                    }
                }
                let (dkt, dvt) = (
                    &mut dkh[j0 * d..(j0 + cols) * d],
                    &mut dvh[j0 * d..(j0 + cols) * d],
                );
                let qblock = i0 / BR * dpanels * slot;
                // SAFETY: as above.
                unsafe {
                    // dV += P^T dO and dK += dS^T Q: (cols, D) over the tile's query rows.
                    pack_columns(&p, rows, cols, &mut pt);
                    pack_columns(&ds, rows, cols, &mut dst);
                    let kp = rows.div_ceil(2);
                    accumulate_over_rows((cols, kp), (&pt, BR / 2 * MR), &dor[qblock..], d, dvt);
                    accumulate_over_rows((cols, kp), (&dst, BR / 2 * MR), &qr[qblock..], d, dkt);
                    // dQ += dS K: (rows, D) over the tile's keys.
                    pack_rows(&ds, rows, cols, &mut dsa);
                    let dqt = &mut dqh[i0 * d..(i0 + rows) * d];
                    let k_block = &kr[j0 / BC * dpanels * slot..];
                    accumulate_over_rows(
                        (rows, cols.div_ceil(2)),
                        (&dsa, BC / 2 * MR),
                        k_block,
                        d,
                        dqt,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::attention::{
        Tiles, attention_backward, attention_forward, attention_reference,
    };
    use super::*;

    fn data(n: usize, seed: f32, amp: f32) -> Vec<f32> {
        (0..n)
            .map(|i| amp * ((i as f32 + seed) * 0.731).sin())
            .collect()
    }

    /// Lane i of a 16-row reduction is row i's maximum or sum, for rows whose largest and
    /// smallest lanes sit in every position (so a wrong shuffle would show).
    #[test]
    fn row_reductions_put_row_i_in_lane_i() {
        if !available() {
            return;
        }
        use std::arch::x86_64::*;
        let rows: [[f32; 16]; 16] = std::array::from_fn(|i| {
            std::array::from_fn(|j| ((i * 7 + j * 5) % 16) as f32 * 0.5 + i as f32 * 100.0)
        });
        // SAFETY: `available()` found AVX-512F; each row is 16 f32.
        let (max, sum): ([f32; 16], [f32; 16]) = unsafe {
            let v: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(rows[i].as_ptr()));
            (
                std::mem::transmute::<__m512, [f32; 16]>(rows_max(v)),
                std::mem::transmute::<__m512, [f32; 16]>(rows_sum(v)),
            )
        };
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(
                max[i],
                row.iter().copied().fold(f32::MIN, f32::max),
                "row {i}"
            );
            assert_eq!(sum[i], row.iter().sum::<f32>(), "row {i}");
        }
    }

    /// Shapes with partial tiles (T, S not multiples of 64 or 8; D not a multiple of 32; an odd
    /// D), grouped heads and a KV offset.
    const SHAPES: [(usize, usize, usize, usize, usize, usize); 5] = [
        (2, 6, 2, 70, 70, 64),
        (1, 4, 4, 13, 29, 40),
        (2, 3, 1, 130, 130, 32),
        (1, 2, 1, 65, 200, 17),
        (1, 1, 1, 1, 1, 8),
    ];

    fn dims_of((batch, hq, hkv, t, s, d): (usize, usize, usize, usize, usize, usize)) -> AttnDims {
        AttnDims {
            batch,
            q_heads: hq,
            kv_heads: hkv,
            q_len: t,
            kv_len: s,
            head_dim: d,
        }
    }

    /// A shape's inputs (q, k, v, dO) and the forward's f32 output and row statistics.
    struct Inputs {
        dims: AttnDims,
        scale: f64,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        dout: Vec<f32>,
        o: Vec<f32>,
        lse: Vec<f32>,
    }

    fn inputs(shape: (usize, usize, usize, usize, usize, usize)) -> Inputs {
        let dims = dims_of(shape);
        let (t, s, d) = (dims.q_len, dims.kv_len, dims.head_dim);
        let nq = dims.batch * dims.q_heads * t * d;
        let nk = dims.batch * dims.kv_heads * s * d;
        let (q, k, v) = (data(nq, 0.0, 1.5), data(nk, 1.0, 1.5), data(nk, 2.0, 1.0));
        let scale = 1.0 / (d as f64).sqrt();
        let (mut o, mut lse) = (vec![0f32; nq], vec![0f32; dims.batch * dims.q_heads * t]);
        attention_forward(
            dims,
            Tiles::default(),
            scale,
            (&q, &k, &v),
            &mut o,
            &mut lse,
        );
        let dout = data(nq, 3.0, 1.0);
        Inputs {
            dims,
            scale,
            q,
            k,
            v,
            dout,
            o,
            lse,
        }
    }

    /// The bf16 backward of `x` into fresh NaN-filled gradients, and whether it ran.
    fn bf16_backward(x: &Inputs) -> (bool, [Vec<f32>; 3]) {
        let (mut dq, mut dk, mut dv) = (
            vec![f32::NAN; x.q.len()],
            vec![f32::NAN; x.k.len()],
            vec![f32::NAN; x.v.len()],
        );
        let ran = attention_backward_bf16(
            x.dims,
            x.scale,
            (&x.q, &x.k, &x.v),
            (&x.o, &x.lse, &x.dout),
            &mut dq,
            &mut dk,
            &mut dv,
        );
        (ran, [dq, dk, dv])
    }

    /// The forward against the f64 reference: within what rounding q, k, v and P to bf16
    /// (8 significant bits) allows, about 1e-2 on outputs of size 1.
    #[test]
    fn forward_matches_the_reference_to_bf16_accuracy() {
        if !available() {
            eprintln!("AVX512-BF16 not on this CPU: the f32 kernels run instead");
            return;
        }
        for shape in SHAPES {
            let x = inputs(shape);
            let (mut o, mut lse) = (vec![f32::NAN; x.o.len()], vec![f32::NAN; x.lse.len()]);
            let qkv = (&x.q[..], &x.k[..], &x.v[..]);
            assert!(attention_forward_bf16(
                x.dims, x.scale, qkv, &mut o, &mut lse
            ));
            let wide = |v: &[f32]| v.iter().map(|&e| e as f64).collect::<Vec<_>>();
            let mut want = vec![0f64; x.o.len()];
            attention_reference(
                x.dims,
                x.scale,
                (&wide(&x.q), &wide(&x.k), &wide(&x.v)),
                &mut want,
            );
            let worst = o
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0f64, f64::max);
            assert!(worst < 2e-2, "{shape:?}: output off by {worst}");
            let worst_lse = lse
                .iter()
                .zip(&x.lse)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst_lse < 2e-2, "{shape:?}: lse off by {worst_lse}");
        }
    }

    /// The backward against the f32 kernel's gradients, each within 2% of that gradient's
    /// largest magnitude (plus 1e-2 on inputs of size 1), from the same forward statistics.
    #[test]
    fn backward_matches_the_f32_kernel_to_bf16_accuracy() {
        if !available() {
            return;
        }
        // On one thread, so that every shape has enough (batch, K/V head) tasks.
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for shape in SHAPES {
            let x = inputs(shape);
            let grads = |bf16: bool| {
                if bf16 {
                    let (ran, g) = one.install(|| bf16_backward(&x));
                    assert!(ran, "{shape:?}");
                    return g;
                }
                let (mut dq, mut dk, mut dv) = (
                    vec![0f32; x.q.len()],
                    vec![0f32; x.k.len()],
                    vec![0f32; x.v.len()],
                );
                attention_backward(
                    x.dims,
                    Tiles::default(),
                    x.scale,
                    (&x.q, &x.k, &x.v),
                    (&x.o, &x.lse, &x.dout),
                    &mut dq,
                    &mut dk,
                    &mut dv,
                );
                [dq, dk, dv]
            };
            let (got, want) = (grads(true), grads(false));
            for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                let big = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                let worst = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                // The floor: dP (from bf16 dO and V) and delta (from f32 dO and O) round
                // differently, so a gradient that is exactly 0 in f32 (one key: P = 1, dS = 0)
                // is about 1e-3 here, as under PyTorch's bf16 attention.
                assert!(
                    worst <= 2e-2 * big + 1e-2,
                    "{shape:?} {name}: off by {worst} (largest {big})"
                );
            }
        }
    }

    /// A head too wide for one packed k-block is left to the f32 kernels, not refused.
    #[test]
    fn a_head_wider_than_a_k_block_is_declined() {
        let dims = dims_of((1, 1, 1, 2, 2, 2 * KC + 2));
        assert!(!forward_applies(&dims) && !backward_applies(&dims));
        let n = 2 * (2 * KC + 2);
        let x = vec![0.5f32; n];
        let (mut o, mut lse) = (vec![f32::NAN; n], vec![f32::NAN; 2]);
        assert!(!attention_forward_bf16(
            dims,
            0.1,
            (&x, &x, &x),
            &mut o,
            &mut lse
        ));
        assert!(o.iter().chain(&lse).all(|v| v.is_nan()));
    }

    /// With fewer (batch, K/V head) tasks than threads the backward declines, writing
    /// nothing, so the engine runs the f32 kernel's finer split.
    #[test]
    fn the_backward_declines_when_tasks_are_fewer_than_threads() {
        if !available() {
            return;
        }
        let x = inputs((1, 2, 1, 9, 9, 16));
        let two = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (ran, [dq, dk, dv]) = two.install(|| bf16_backward(&x));
        assert!(!ran);
        assert!(dq.iter().chain(&dk).chain(&dv).all(|x| x.is_nan()));
    }
}
