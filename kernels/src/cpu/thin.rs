//! Both input gradients of a product with a thin inner dimension, `y = u . b^T` with
//! `u (m, r)`, `b (n, r)` and `r` small (a LoRA up-projection: r is the rank), in one pass over
//! the upstream gradient `g (m, n)`:
//!
//! `du = g . b` (m, r) and `db = g^T . u` (n, r).
//!
//! As two GEMMs, each reads all of `g` (the layer's output size, megabytes) for a few flops per
//! element, so both are bound by memory. Here every element of `g` is loaded once and used for
//! both: `du[i] += g[i, j] b[j]` and `db[j] += g[i, j] u[i]`, with `b[j]` and `u[i]` as
//! 16-lane vectors (`r` is padded to a multiple of 16 with zeros) and four rows of `g` at a
//! time, so each `b[j]` and `db[j]` is loaded once for four rows.
//!
//! Rows go to tasks in fixed blocks, each with its own partial `db`; the partials are summed in
//! block order, so the result does not depend on the thread count.

use super::matmul::{GemmDims, counted};
use super::{Float, LineAligned};
use rayon::prelude::*;

/// Lanes of one vector of the rank dimension.
const L: usize = 16;
/// Rows of `g` the inner loop takes at a time (eight made LLVM keep the accumulators in memory:
/// 12x slower).
const ROWS: usize = 4;
/// Row blocks (tasks), each with a partial `db` to add up: a fixed count, so the sum's order
/// does not depend on the thread count, and a small one, so adding the partials stays cheap.
const BLOCKS: usize = 8;

/// `du (m, r) = g . b` and `db (n, r) = g^T . u` for row-major `g (m, n)`, `b (n, r)`,
/// `u (m, r)`; both outputs are overwritten. Panics if a buffer is shorter than its shape.
/// A profiled step counts it with the GEMMs (it is two products' flops).
pub fn thin_product_grads<T: Float>(
    (m, n, r): (usize, usize, usize),
    g: &[T],
    b: &[T],
    u: &[T],
    du: &mut [T],
    db: &mut [T],
) {
    let dims = GemmDims {
        batch: 1,
        m,
        n,
        k: 2 * r,
    };
    counted(dims, || grads((m, n, r), (g, b, u), du, db))
}

fn grads<T: Float>(
    (m, n, r): (usize, usize, usize),
    (g, b, u): (&[T], &[T], &[T]),
    du: &mut [T],
    db: &mut [T],
) {
    assert!(
        g.len() >= m * n
            && b.len() >= n * r
            && u.len() >= m * r
            && du.len() >= m * r
            && db.len() >= n * r,
        "thin_product_grads: buffer too short"
    );
    let (du, db) = (&mut du[..m * r], &mut db[..n * r]);
    if r == 0 {
        return;
    }
    if m == 0 || n == 0 {
        du.fill(T::zero());
        db.fill(T::zero());
        return;
    }
    // The rank padded to whole vectors: (n, rp) and (m, rp) copies with zero lanes past r,
    // aligned so that each row of rp values is whole cache lines.
    let rp = r.div_ceil(L) * L;
    let pad = |src: &[T], rows: usize| {
        let mut out = LineAligned::zeros(rows * rp);
        for (o, s) in out.chunks_mut(rp).zip(src.chunks(r)) {
            o[..r].copy_from_slice(s);
        }
        out
    };
    let (bp, up) = (pad(&b[..n * r], n), pad(&u[..m * r], m));
    // One partial db (n, rp) per block of rows; du rows written by their block.
    let block = m.div_ceil(BLOCKS).next_multiple_of(ROWS);
    let partials: Vec<LineAligned<T>> = du
        .par_chunks_mut(block * r)
        .enumerate()
        .map(|(blk, du)| {
            let rows = blk * block..(blk * block + block).min(m);
            let mut dbp = LineAligned::zeros(n * rp);
            thin_rows(
                (n, r, rp),
                &g[rows.start * n..rows.end * n],
                &bp,
                &up[rows.start * rp..rows.end * rp],
                du,
                &mut dbp,
            );
            dbp
        })
        .collect();
    // db = the partials' sum in block order, parallel over bands of its rows.
    const BAND: usize = 256;
    db.par_chunks_mut(BAND * r)
        .enumerate()
        .for_each(|(band, out)| add_partials(&partials, band * BAND, (r, rp), out));
}

/// Whether the one pass is the faster way on this CPU. Not where `matmul::prefers_fma_kernel()`
/// (AVX2 without AVX-512), where a 16-lane vector takes two registers and the four rows' values
/// spill: on a Zen 3 EPYC `bft-bench`'s `lora grads` rows measured it at 1,413 µs against 949
/// for the two products (two rows a step, tried, still came out 8-23% slower than the two).
pub fn preferred() -> bool {
    !super::matmul::prefers_fma_kernel()
}

super::simd! {
/// `out` = rows `j0..` of the sum of the padded partials `(n, rp)`, unpadded to `r` columns.
fn add_partials<T: Float>(partials: &[LineAligned<T>], j0: usize, (r, rp): (usize, usize), out: &mut [T]) {
    for (jr, o) in out.chunks_mut(r).enumerate() {
        let j = j0 + jr;
        o.fill(T::zero());
        for p in partials {
            for (x, &v) in o.iter_mut().zip(&p[j * rp..j * rp + r]) {
                *x += v;
            }
        }
    }
}
}

super::simd! {
/// One block of rows: `du (rows, r)` written, `dbp (n, rp)` accumulated; `g (rows, n)`,
/// `up (rows, rp)`, `bp (n, rp)`.
fn thin_rows<T: Float>(
    (n, r, rp): (usize, usize, usize),
    g: &[T],
    bp: &[T],
    up: &[T],
    du: &mut [T],
    dbp: &mut [T],
) {
    let rows = up.len() / rp;
    let mut i = 0;
    while i < rows {
        let q = (rows - i).min(ROWS);
        for c in (0..rp).step_by(L) {
            let acc = if q == ROWS {
                rows_chunk::<T, ROWS>(n, &g[i * n..], bp, &up[i * rp..], rp, c, dbp)
            } else {
                let mut acc = [[T::zero(); L]; ROWS];
                for qq in 0..q {
                    let a = rows_chunk::<T, 1>(n, &g[(i + qq) * n..], bp, &up[(i + qq) * rp..], rp, c, dbp);
                    acc[qq] = a[0];
                }
                acc
            };
            // Lanes c..c + L of rows i..i + q, as far as they lie inside r.
            let lanes = L.min(r.saturating_sub(c));
            for (qq, a) in acc.iter().enumerate().take(q) {
                du[(i + qq) * r + c..][..lanes].copy_from_slice(&a[..lanes]);
            }
        }
        i += q;
    }
}
}

/// Lanes `c..c + L` of `du` for `Q` rows of `g` (each `n` long, rows `n` apart), returned in
/// the first `Q` of `ROWS` slots;
/// `dbp[j][c..c + L] += sum_q g[q, j] u[q][c..c + L]` for every j. Inlined into the `simd!`
/// caller, so its fixed-size loops compile to vector registers.
#[inline(always)]
fn rows_chunk<T: Float, const Q: usize>(
    n: usize,
    g: &[T],
    bp: &[T],
    up: &[T],
    rp: usize,
    c: usize,
    dbp: &mut [T],
) -> [[T; L]; ROWS] {
    let mut acc = [[T::zero(); L]; ROWS];
    let mut uq = [[T::zero(); L]; Q];
    for (q, uq) in uq.iter_mut().enumerate() {
        uq.copy_from_slice(&up[q * rp + c..][..L]);
    }
    let g_rows: [&[T]; Q] = std::array::from_fn(|q| &g[q * n..q * n + n]);
    let (bp, dbp) = (&bp[..n * rp], &mut dbp[..n * rp]);
    for (j, (bj, dbj)) in bp
        .chunks_exact(rp)
        .zip(dbp.chunks_exact_mut(rp))
        .enumerate()
    {
        let (bj, dbj) = (&bj[c..c + L], &mut dbj[c..c + L]);
        let gq: [T; Q] = std::array::from_fn(|q| g_rows[q][j]);
        // Fused multiply-adds: the `simd!` builds have FMA, so each is one instruction.
        for q in 0..Q {
            for t in 0..L {
                acc[q][t] = gq[q].mul_add(bj[t], acc[q][t]);
            }
        }
        for t in 0..L {
            let mut s = dbj[t];
            for q in 0..Q {
                s = gq[q].mul_add(uq[q][t], s);
            }
            dbj[t] = s;
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f64> {
        (0..len)
            .map(|i| {
                (((i as u64 + 1) * (seed * 2 + 1) * 2_654_435_761) % 1000) as f64 / 500.0 - 1.0
            })
            .collect()
    }

    /// Both gradients equal the f64 triple loops, for ranks below, at and above one vector
    /// and row counts that leave partial quads and partial blocks, in f64 and f32.
    #[test]
    fn both_gradients_match_the_triple_loops() {
        for (m, n, r) in [
            (1, 1, 1),
            (5, 3, 2),
            (7, 19, 16),
            (130, 37, 17),
            (67, 40, 48),
            (4, 5, 0),
        ] {
            let (g, b, u) = (data(m * n, 1), data(n * r, 2), data(m * r, 3));
            let mut want_du = vec![0.0; m * r];
            let mut want_db = vec![0.0; n * r];
            for i in 0..m {
                for j in 0..n {
                    for t in 0..r {
                        want_du[i * r + t] += g[i * n + j] * b[j * r + t];
                        want_db[j * r + t] += g[i * n + j] * u[i * r + t];
                    }
                }
            }
            let (mut du, mut db) = (vec![f64::NAN; m * r], vec![f64::NAN; n * r]);
            thin_product_grads((m, n, r), &g, &b, &u, &mut du, &mut db);
            for (got, want) in [(&du, &want_du), (&db, &want_db)] {
                for (x, y) in got.iter().zip(want.iter()) {
                    assert!(
                        (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
                        "{m}x{n}x{r}: {x} vs {y}"
                    );
                }
            }
            let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let (mut du32, mut db32) = (vec![f32::NAN; m * r], vec![f32::NAN; n * r]);
            thin_product_grads((m, n, r), &f(&g), &f(&b), &f(&u), &mut du32, &mut db32);
            for (got, want) in [(&du32, &want_du), (&db32, &want_db)] {
                for (&x, &y) in got.iter().zip(want.iter()) {
                    let tol = 1e-5 * (n.max(m) as f64) * (1.0 + y.abs());
                    assert!((x as f64 - y).abs() <= tol, "f32 {m}x{n}x{r}: {x} vs {y}");
                }
            }
        }
    }

    /// The row blocks' partial sums are added in block order, whatever the thread count.
    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        let (m, n, r) = (300, 23, 16);
        let (g, b, u) = (data(m * n, 4), data(n * r, 5), data(m * r, 6));
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let (g, b, u) = (f(&g), f(&b), f(&u));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            pool.install(|| {
                let (mut du, mut db) = (vec![0f32; m * r], vec![0f32; n * r]);
                thin_product_grads((m, n, r), &g, &b, &u, &mut du, &mut db);
                (du, db)
            })
        };
        assert_eq!(run(1), run(3));
    }
}
