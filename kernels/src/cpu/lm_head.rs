//! The fused LM-head loss: logits are produced one row chunk at a time and never stored for all
//! tokens. For 8k tokens of a 151,936-word vocabulary, full f32 logits would take 5 GB; a chunk
//! of `rows` takes `rows * vocab * 4` bytes.
//!
//! Pass 1 (forward): per chunk, `Z = X W^T` (rows, V), then each row's log-sum-exp and target
//! logit. Pass 2 (backward): per chunk, recompute `Z`, turn it in place into
//! `G = a (softmax(Z) - onehot(y))` with a per-row coefficient `a`, then `dX = G W` and, only
//! when the head is trainable, `dW += G^T X`.

use super::Float;
use super::matmul::{GemmDims, Operand, matmul};
use super::softmax::logsumexp;
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

/// `logits (n, V) = x_chunk (n, C) . w^T`, with `n` rows starting at `r0`.
fn logits_chunk<T: Float>(dims: HeadDims, x: &[T], w: &[T], r0: usize, n: usize, z: &mut [T]) {
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
    matmul(g, xo, wo, &mut z[..n * dims.vocab], false);
}

/// Pass 1: `lse[i]` and `target_logit[i]` for every row; `chunk` rows at a time.
pub fn lm_head_forward<T: Float>(
    dims: HeadDims,
    chunk: usize,
    (x, w, targets): (&[T], &[T], &[u32]),
    lse: &mut [T],
    target_logit: &mut [T],
) {
    let v = dims.vocab;
    let mut z = vec![T::zero(); chunk.min(dims.rows) * v];
    for r0 in (0..dims.rows).step_by(chunk) {
        let n = chunk.min(dims.rows - r0);
        logits_chunk(dims, x, w, r0, n, &mut z);
        lse[r0..r0 + n]
            .par_iter_mut()
            .zip(target_logit[r0..r0 + n].par_iter_mut())
            .enumerate()
            .for_each(|(i, (l, t))| {
                let row = &z[i * v..(i + 1) * v];
                *l = logsumexp(row);
                *t = row[targets[r0 + i] as usize];
            });
    }
}

/// Pass 2: `dx = G W` (overwritten) and, when given, `dw += G^T X`, with
/// `G[i] = coef[i] * (softmax(z_i) - onehot(y_i))` rebuilt chunk by chunk.
pub fn lm_head_backward<T: Float>(
    dims: HeadDims,
    chunk: usize,
    (x, w, targets): (&[T], &[T], &[u32]),
    (lse, coef): (&[T], &[T]),
    dx: &mut [T],
    mut dw: Option<&mut [T]>,
) {
    let (v, c) = (dims.vocab, dims.hidden);
    let mut z = vec![T::zero(); chunk.min(dims.rows) * v];
    for r0 in (0..dims.rows).step_by(chunk) {
        let n = chunk.min(dims.rows - r0);
        logits_chunk(dims, x, w, r0, n, &mut z);
        z[..n * v]
            .par_chunks_mut(v)
            .enumerate()
            .for_each(|(i, row)| {
                let (a, s) = (coef[r0 + i], lse[r0 + i]);
                row.iter_mut().for_each(|e| *e -= s);
                T::exp_in_place(row);
                row.iter_mut().for_each(|e| *e *= a);
                // The target term is subtracted on its own so its precision is not lost in the
                // (tiny) probability it is combined with.
                row[targets[r0 + i] as usize] -= a;
            });
        let g = &z[..n * v];
        // (n, V) . (V, C) -> (n, C)
        let gd = GemmDims {
            batch: 1,
            m: n,
            n: c,
            k: v,
        };
        let go = Operand {
            data: g,
            trans: false,
            batch_stride: 0,
        };
        let wo = Operand {
            data: w,
            trans: false,
            batch_stride: 0,
        };
        matmul(gd, go, wo, &mut dx[r0 * c..(r0 + n) * c], false);
        if let Some(dw) = dw.as_deref_mut() {
            // (V, n) . (n, C) -> (V, C), accumulated over chunks.
            let gd = GemmDims {
                batch: 1,
                m: v,
                n: c,
                k: n,
            };
            let gt = Operand {
                data: g,
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
        let run = |chunk| {
            let (mut lse, mut t) = (vec![0.0; 7], vec![0.0; 7]);
            lm_head_forward(dims, chunk, (&x, &w, &y), &mut lse, &mut t);
            let (mut dx, mut dw) = (vec![0.0; 35], vec![0.0; 55]);
            lm_head_backward(
                dims,
                chunk,
                (&x, &w, &y),
                (&lse, &coef),
                &mut dx,
                Some(&mut dw),
            );
            [lse, t, dx, dw].concat()
        };
        let (one, many) = (run(7), run(2));
        for (a, b) in one.iter().zip(&many) {
            assert!((a - b).abs() < 1e-12);
        }
        // Row 0 by hand: lse of x0 . W^T.
        let z: Vec<f64> = (0..11)
            .map(|j| (0..5).map(|k| x[k] * w[j * 5 + k]).sum())
            .collect();
        let lse0 = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        assert!((one[0] - lse0).abs() < 1e-12 && (one[7] - z[0]).abs() < 1e-12);
    }
}
