//! The fused LM-head loss: logits are produced a piece at a time and never stored for all
//! tokens. For 8k tokens of a 151,936-word vocabulary, full f32 logits would take 5 GB; a piece
//! lives in a scratch buffer the caller owns.
//!
//! Pass 1 (forward): per chunk of rows, over tiles of the vocabulary, `Z = X W_tileᵀ` and each
//! row's running maximum, sum of exponentials and target logit, giving its log-sum-exp at the
//! end. When the hidden states need a gradient it also forms, tile by tile,
//! `U = (softmax(Z) - onehot(y)) W` (rows, C): the loss's coefficients are constants, so
//! `dX = coef * U` later needs no second pass over the vocabulary.
//! Pass 2 (only for a trainable head): per chunk of rows over the whole vocabulary, recompute
//! `Z`, turn it into `G = coef (softmax(Z) - onehot(y))` and accumulate `dW += G^T X`.

use super::bf16_gemm::WeightProduct;
use super::matmul::{GemmDims, Operand, matmul};
use super::softmax::logsumexp;
use super::{Float, max_of, sum_of};
use rayon::prelude::*;

/// Sizes: `x (rows, hidden)` holds only the rows that have a target; `w (vocab, hidden)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadDims {
    pub rows: usize,
    pub hidden: usize,
    pub vocab: usize,
}

/// Rows per chunk so that one chunk of logits takes about `budget_bytes` (at least 1 row).
pub fn chunk_rows(vocab: usize, elem_bytes: usize, budget_bytes: usize) -> usize {
    (budget_bytes / (vocab * elem_bytes).max(1)).max(1)
}

/// `logits (n, V) = x_chunk (n, C) . w^T`, with `n` rows starting at `r0`; the weight may be
/// stored in another type than the activations (a bf16 head under autocast).
fn logits_chunk<T: Float + WeightProduct<W>, W>(
    dims: HeadDims,
    x: &[T],
    w: &[W],
    r0: usize,
    n: usize,
    z: &mut [T],
) {
    let c = dims.hidden;
    let g = GemmDims {
        batch: 1,
        m: n,
        n: dims.vocab,
        k: c,
    };
    let xo = Operand {
        data: &x[r0 * c..(r0 + n) * c],
        trans: false,
        batch_stride: 0,
    };
    let wo = Operand {
        data: w,
        trans: true,
        batch_stride: 0,
    };
    T::weight_product(g, xo, wo, &mut z[..n * dims.vocab], false);
}

/// Turns logits rows in place into `scale[i] * (softmax(z_i) - onehot(y_i))`.
fn softmax_minus_onehot<T: Float>(
    z: &mut [T],
    v: usize,
    lse: &[T],
    targets: &[u32],
    scale: impl Fn(usize) -> T + Sync,
) {
    z.par_chunks_mut(v)
        .enumerate()
        .for_each(|(i, row)| softmax_minus_onehot_row(row, lse[i], scale(i), targets[i] as usize));
}

super::simd! {
/// One row of `softmax_minus_onehot`, on the calling thread (see `simd!` for why).
fn softmax_minus_onehot_row<T: Float>(row: &mut [T], lse: T, a: T, target: usize) {
    row.iter_mut().for_each(|e| *e -= lse);
    T::exp_in_place(row);
    row.iter_mut().for_each(|e| *e *= a);
    // The target term is subtracted on its own so its precision is not lost in the (tiny)
    // probability it is combined with.
    row[target] -= a;
}
}

/// Pass 1: `lse[i]` and `target_logit[i]` for every row, and when `unit_grad` is given,
/// `unit_grad (rows, C) = (softmax(Z) - onehot(y)) W`. Rows go `chunk` at a time, and within a
/// chunk the vocabulary goes `tile` words at a time with a running maximum and sum per row (as
/// flash attention runs over keys): the tile's logits `x Wᵀ`, their exponentials shifted by the
/// running maximum, and their product with the tile's rows of W added to `unit_grad`, whose
/// rows are rescaled when their maximum moves. At the end a row's sum normalises it and the
/// target's row of W is subtracted. `z` is the caller's scratch for one tile of one chunk, at
/// least `min(chunk, rows) * min(tile, vocab)` long: the only vocabulary-sized memory the loss
/// uses.
///
/// A tile of logits stays in cache for the pass over it and the product that reads it, where a
/// chunk of logits over the whole vocabulary (64 MiB) went to memory and back twice, and all of
/// a chunk's rows meet each packed tile of W, where each chunk of rows packed all of W again
/// for each of its two products. `w` may be stored as bf16 with f32 activations: both products
/// then round the other operand to bf16 once and accumulate in f32.
pub fn lm_head_forward<T: Float + WeightProduct<W>, W: Sync>(
    dims: HeadDims,
    (chunk, tile): (usize, usize),
    (x, w, targets): (&[T], &[W], &[u32]),
    z: &mut [T],
    lse: &mut [T],
    target_logit: &mut [T],
    mut unit_grad: Option<&mut [T]>,
) {
    let (v, c) = (dims.vocab, dims.hidden);
    let (chunk, tile) = (chunk.max(1), tile.clamp(1, v.max(1)));
    assert!(
        z.len() >= chunk.min(dims.rows) * tile,
        "lm_head_forward: scratch too short"
    );
    assert!(w.len() >= v * c && x.len() >= dims.rows * c && targets.len() >= dims.rows);
    let grad = unit_grad.is_some();
    for r0 in (0..dims.rows).step_by(chunk) {
        let n = chunk.min(dims.rows - r0);
        let rows = r0..r0 + n;
        // Per row: the running maximum (kept in `lse` until the end), the running sum of
        // exponentials under it, and the factor the tile just rescaled them by.
        lse[rows.clone()].fill(T::neg_infinity());
        let (mut sum, mut rescale) = (vec![T::zero(); n], vec![T::one(); n]);
        for v0 in (0..v).step_by(tile) {
            let vt = tile.min(v - v0);
            let wt = &w[v0 * c..(v0 + vt) * c];
            // (n, C) . (vt, C)^T -> (n, vt)
            let zt = &mut z[..n * vt];
            T::weight_product(
                GemmDims {
                    batch: 1,
                    m: n,
                    n: vt,
                    k: c,
                },
                Operand {
                    data: &x[r0 * c..(r0 + n) * c],
                    trans: false,
                    batch_stride: 0,
                },
                Operand {
                    data: wt,
                    trans: true,
                    batch_stride: 0,
                },
                zt,
                false,
            );
            zt.par_chunks_mut(vt)
                .zip(lse[rows.clone()].par_iter_mut())
                .zip(sum.par_iter_mut().zip(rescale.par_iter_mut()))
                .zip(
                    target_logit[rows.clone()]
                        .par_iter_mut()
                        .zip(&targets[rows.clone()]),
                )
                .for_each(|(((row, m), (s, a)), (t, &y))| {
                    let y = y as usize;
                    if (v0..v0 + vt).contains(&y) {
                        *t = row[y - v0];
                    }
                    *a = tile_pass(row, m, s, grad);
                });
            if let Some(u) = unit_grad.as_deref_mut() {
                let ut = &mut u[r0 * c..(r0 + n) * c];
                if v0 > 0 {
                    ut.par_chunks_mut(c)
                        .zip(&rescale)
                        .filter(|(_, a)| **a != T::one())
                        .for_each(|(row, &a)| row.iter_mut().for_each(|e| *e *= a));
                }
                // (n, vt) . (vt, C) -> (n, C), added to the rows' running sums.
                T::weight_product(
                    GemmDims {
                        batch: 1,
                        m: n,
                        n: c,
                        k: vt,
                    },
                    Operand {
                        data: zt,
                        trans: false,
                        batch_stride: 0,
                    },
                    Operand {
                        data: wt,
                        trans: false,
                        batch_stride: 0,
                    },
                    ut,
                    v0 > 0,
                );
            }
        }
        for (l, &s) in lse[rows.clone()].iter_mut().zip(&sum) {
            *l += s.ln();
        }
        if let Some(u) = unit_grad.as_deref_mut() {
            // softmax . W = (running sum) / sum, minus the target's row of W.
            u[r0 * c..(r0 + n) * c]
                .par_chunks_mut(c)
                .zip(&sum)
                .zip(&targets[rows])
                .for_each(|((row, &s), &y)| {
                    let wy = &w[y as usize * c..(y as usize + 1) * c];
                    T::minus_scaled_row(row, T::one() / s, wy);
                });
        }
    }
}

super::simd! {
/// One row of a vocabulary tile: updates the row's running maximum `m` and sum `s` of
/// exponentials, and returns the factor the old sum was rescaled by (1 when the maximum did not
/// move, 0 on a row's first finite tile). With `keep`, the row's logits become their
/// exponentials under the new maximum (zeros while no logit is finite).
fn tile_pass<T: Float>(row: &mut [T], m: &mut T, s: &mut T, keep: bool) -> T {
    let m_new = max_of(row).max(*m);
    if !m_new.is_finite() {
        // All -inf so far (no word is possible yet), or a non-finite logit: the result is
        // NaN or -inf, as the two-pass loss gives.
        *s = if m_new == T::neg_infinity() { *s } else { T::nan() };
        *m = m_new;
        row.iter_mut().for_each(|e| *e = T::zero());
        return T::one();
    }
    let a = if *m == T::neg_infinity() { T::zero() } else { (*m - m_new).exp() };
    let tile_sum = if keep {
        row.iter_mut().for_each(|e| *e -= m_new);
        T::exp_in_place(row);
        sum_of(row)
    } else {
        (logsumexp(row) - m_new).exp()
    };
    *s = *s * a + tile_sum;
    *m = m_new;
    a
}
}

/// Pass 2, for a trainable head: `dw += G^T X` with `G[i] = coef[i] * (softmax(z_i) - onehot(y_i))`
/// rebuilt chunk by chunk in the scratch `z` (as for pass 1).
pub fn lm_head_backward_head<T: Float>(
    dims: HeadDims,
    chunk: usize,
    (x, w, targets): (&[T], &[T], &[u32]),
    (lse, coef): (&[T], &[T]),
    z: &mut [T],
    dw: &mut [T],
) {
    let (v, c) = (dims.vocab, dims.hidden);
    assert!(
        z.len() >= chunk.min(dims.rows) * v,
        "lm_head_backward_head: scratch too short"
    );
    for r0 in (0..dims.rows).step_by(chunk) {
        let n = chunk.min(dims.rows - r0);
        logits_chunk(dims, x, w, r0, n, z);
        softmax_minus_onehot(
            &mut z[..n * v],
            v,
            &lse[r0..r0 + n],
            &targets[r0..r0 + n],
            |i| coef[r0 + i],
        );
        // (V, n) . (n, C) -> (V, C), accumulated over chunks.
        let gd = GemmDims {
            batch: 1,
            m: v,
            n: c,
            k: n,
        };
        let gt = Operand {
            data: &z[..n * v],
            trans: true,
            batch_stride: 0,
        };
        let xo = Operand {
            data: &x[r0 * c..(r0 + n) * c],
            trans: false,
            batch_stride: 0,
        };
        matmul(gd, gt, xo, dw, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_passes_match_full_logits() {
        let dims = HeadDims {
            rows: 7,
            hidden: 5,
            vocab: 11,
        };
        let x: Vec<f64> = (0..35).map(|i| (i as f64 * 0.37).sin()).collect();
        let w: Vec<f64> = (0..55).map(|i| (i as f64 * 0.71).cos()).collect();
        let y: Vec<u32> = (0..7).map(|i| (i * 3 % 11) as u32).collect();
        let coef: Vec<f64> = (0..7).map(|i| 0.1 * i as f64 - 0.2).collect();
        // lse, target logits and (with `grad`) the unit gradient, chunk by chunk and tile by tile.
        let forward = |chunk: usize, tile: usize, grad: bool| {
            let (mut lse, mut t, mut u) = (vec![0.0; 7], vec![0.0; 7], vec![0.0; 35]);
            let mut z = vec![0.0; chunk * 11];
            let unit = grad.then_some(&mut u[..]);
            lm_head_forward(
                dims,
                (chunk, tile),
                (&x, &w, &y),
                &mut z,
                &mut lse,
                &mut t,
                unit,
            );
            (lse, t, u, z)
        };
        let run = |chunk, tile| {
            let (lse, t, u, mut z) = forward(chunk, tile, true);
            let mut dw = vec![0.0; 55];
            lm_head_backward_head(dims, chunk, (&x, &w, &y), (&lse, &coef), &mut z, &mut dw);
            [lse, t, u, dw].concat()
        };
        // One chunk and one tile, against chunks of 2 rows (the last partial) over tiles of 4
        // words (the last partial), and others down to single words (where a row's running
        // maximum moves at many tiles and its sums are rescaled).
        let one = run(7, 11);
        for (chunk, tile) in [(2, 4), (3, 11), (7, 1), (1, 5)] {
            for (a, b) in one.iter().zip(&run(chunk, tile)) {
                assert!((a - b).abs() < 1e-12, "chunk {chunk}, tile {tile}");
            }
            // Without the gradient: the same log-sum-exps and target logits.
            let (lse, t, ..) = forward(chunk, tile, false);
            for (a, b) in lse.iter().chain(&t).zip(&one[..14]) {
                assert!(
                    (a - b).abs() < 1e-12,
                    "no gradient: chunk {chunk}, tile {tile}"
                );
            }
        }
        // Row 0 by hand: lse of z = x0 . W^T, and u0 = (softmax(z) - onehot(y0)) W.
        let z: Vec<f64> = (0..11)
            .map(|j| (0..5).map(|k| x[k] * w[j * 5 + k]).sum())
            .collect();
        let lse0 = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        assert!((one[0] - lse0).abs() < 1e-12 && (one[7] - z[0]).abs() < 1e-12);
        for k in 0..5 {
            let u0: f64 = (0..11)
                .map(|j| ((z[j] - lse0).exp() - if j == 0 { 1.0 } else { 0.0 }) * w[j * 5 + k])
                .sum();
            assert!((one[14 + k] - u0).abs() < 1e-12);
        }
    }
}
