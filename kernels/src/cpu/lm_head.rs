//! The fused LM-head loss: logits are produced one row chunk at a time and never stored for all
//! tokens. For 8k tokens of a 151,936-word vocabulary, full f32 logits would take 5 GB; a chunk
//! of `rows` takes `rows * vocab * 4` bytes, in a scratch buffer the caller owns.
//!
//! Pass 1 (forward): per chunk, `Z = X W^T` (rows, V), then each row's log-sum-exp and target
//! logit. When the hidden states need a gradient it also forms, while the chunk is live,
//! `U = (softmax(Z) - onehot(y)) W` (rows, C): the loss's coefficients are constants, so
//! `dX = coef * U` later needs no second pass over the vocabulary.
//! Pass 2 (only for a trainable head): recompute `Z`, turn it into
//! `G = coef (softmax(Z) - onehot(y))` and accumulate `dW += G^T X`.

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

super::simd! {
/// A row of logits turned in place into `softmax(z) - onehot(target)`; returns its log-sum-exp.
/// The shifted exponentials are taken once and kept, then scaled by the inverse of their sum:
/// `logsumexp` followed by `softmax_minus_onehot_row` took every exponential twice (42 million
/// a training step of SmolLM2, 864 rows of 49,152 logits). A row without a finite maximum takes
/// that path, whose results (NaN, or -inf for an all -inf row) it keeps.
fn softmax_minus_onehot_lse<T: Float>(row: &mut [T], target: usize) -> T {
    let m = max_of(row);
    if !m.is_finite() {
        let lse = logsumexp(row);
        softmax_minus_onehot_row(row, lse, T::one(), target);
        return lse;
    }
    row.iter_mut().for_each(|e| *e -= m);
    T::exp_in_place(row);
    let s = sum_of(row);
    let inv = T::one() / s;
    row.iter_mut().for_each(|e| *e *= inv);
    row[target] -= T::one();
    m + s.ln()
}
}

/// Pass 1: `lse[i]` and `target_logit[i]` for every row, `chunk` rows at a time, and when
/// `unit_grad` is given, `unit_grad (rows, C) = (softmax(Z) - onehot(y)) W`. `z` is the caller's
/// scratch for one chunk of logits, at least `min(chunk, rows) * vocab` long: the only
/// vocabulary-sized memory the loss uses. `w` may be stored as bf16 with f32 activations: both
/// of its products then round the other operand to bf16 once and accumulate in f32.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_forward<T: Float + WeightProduct<W>, W>(
    dims: HeadDims,
    chunk: usize,
    (x, w, targets): (&[T], &[W], &[u32]),
    z: &mut [T],
    lse: &mut [T],
    target_logit: &mut [T],
    mut unit_grad: Option<&mut [T]>,
) {
    let (v, c) = (dims.vocab, dims.hidden);
    assert!(
        z.len() >= chunk.min(dims.rows) * v,
        "lm_head_forward: scratch too short"
    );
    for r0 in (0..dims.rows).step_by(chunk) {
        let n = chunk.min(dims.rows - r0);
        logits_chunk(dims, x, w, r0, n, z);
        let grad = unit_grad.is_some();
        // Each row's log-sum-exp, its target logit, and (for the gradient) the row turned
        // into softmax - onehot, in one task: the row (V floats) is still in this core's L2
        // for the second pass, where a pass over the whole chunk would read it from memory.
        z[..n * v]
            .par_chunks_mut(v)
            .zip(lse[r0..r0 + n].par_iter_mut())
            .zip(target_logit[r0..r0 + n].par_iter_mut())
            .zip(&targets[r0..r0 + n])
            .for_each(|(((row, l), t), &y)| {
                *t = row[y as usize];
                *l = if grad {
                    softmax_minus_onehot_lse(row, y as usize)
                } else {
                    logsumexp(row)
                };
            });
        if let Some(u) = unit_grad.as_deref_mut() {
            // (n, V) . (V, C) -> (n, C)
            let gd = GemmDims {
                batch: 1,
                m: n,
                n: c,
                k: v,
            };
            let go = Operand {
                data: &z[..n * v],
                trans: false,
                batch_stride: 0,
            };
            let wo = Operand {
                data: w,
                trans: false,
                batch_stride: 0,
            };
            T::weight_product(gd, go, wo, &mut u[r0 * c..(r0 + n) * c], false);
        }
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

    /// The one-exponential row pass equals `logsumexp` then `softmax_minus_onehot_row`, within
    /// rounding for finite rows and exactly (NaN and -inf kept) for rows without a finite max.
    #[test]
    fn one_pass_softmax_row_matches_the_two_passes() {
        let finite: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let rows = [
            finite,
            vec![f32::NEG_INFINITY; 5],
            vec![1.0, f32::INFINITY, 0.5],
            vec![1.0, f32::NAN, 2.0],
        ];
        for row in rows {
            let target = 1;
            let (mut one, mut two) = (row.clone(), row.clone());
            let lse1 = softmax_minus_onehot_lse(&mut one, target);
            let lse2 = logsumexp(&two);
            softmax_minus_onehot_row(&mut two, lse2, 1.0, target);
            let same = |a: f32, b: f32, tol: f32| {
                (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol * b.abs().max(1e-3)
            };
            assert!(same(lse1, lse2, 1e-6), "{lse1} vs {lse2}");
            for (a, b) in one.iter().zip(&two) {
                assert!(same(*a, *b, 1e-5), "{a} vs {b}");
            }
        }
    }

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
        let run = |chunk| {
            let (mut lse, mut t, mut z, mut u) = (
                vec![0.0; 7],
                vec![0.0; 7],
                vec![0.0; chunk * 11],
                vec![0.0; 35],
            );
            lm_head_forward(
                dims,
                chunk,
                (&x, &w, &y),
                &mut z,
                &mut lse,
                &mut t,
                Some(&mut u),
            );
            let mut dw = vec![0.0; 55];
            lm_head_backward_head(dims, chunk, (&x, &w, &y), (&lse, &coef), &mut z, &mut dw);
            [lse, t, u, dw].concat()
        };
        let (one, many) = (run(7), run(2));
        for (a, b) in one.iter().zip(&many) {
            assert!((a - b).abs() < 1e-12);
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
