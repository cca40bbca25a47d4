//! Per-token negative log-likelihood over full logits rows: the unfused reference that the
//! fused LM-head loss is checked against. It needs the whole `(tokens, vocab)` logits.

use super::Float;
use super::softmax::logsumexp;
use rayon::prelude::*;

/// `loss[i] = lse(z_i) - z_i[y_i]`, computed from the log-sum-exp (never `-log` of a rounded
/// probability). `lse` is saved for the backward pass.
pub fn nll<T: Float>(logits: &[T], vocab: usize, targets: &[u32], loss: &mut [T], lse: &mut [T]) {
    loss.par_iter_mut()
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(i, (l, s))| {
            let row = &logits[i * vocab..(i + 1) * vocab];
            *s = logsumexp(row);
            *l = *s - row[targets[i] as usize];
        });
}

/// `dlogits[i] = dloss[i] * (softmax(z_i) - onehot(y_i))`.
pub fn nll_backward<T: Float>(
    logits: &[T],
    vocab: usize,
    targets: &[u32],
    lse: &[T],
    dloss: &[T],
    dlogits: &mut [T],
) {
    dlogits
        .par_chunks_mut(vocab)
        .enumerate()
        .for_each(|(i, d)| {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let g = dloss[i];
            for (o, &z) in d.iter_mut().zip(row) {
                *o = g * (z - lse[i]).exp();
            }
            // The target term is subtracted separately so it keeps full precision.
            d[targets[i] as usize] -= g;
        });
}
