//! The optimizer's kernels: one fused AdamW update per parameter and the sum of squares behind
//! the global gradient norm. Not ops: they are never recorded on a tape.

use super::Float;

/// One AdamW update's scalars, the bias corrections already folded in by the caller.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied as `p -= lr * wd * p` before the Adam update.
    pub weight_decay: f64,
    /// `1 - beta1^t` and `1 - beta2^t` for step `t` (1-based).
    pub bias1: f64,
    pub bias2: f64,
    /// Multiplies every gradient first (the clipping factor; 1 without clipping).
    pub grad_scale: f64,
}

impl AdamWStep {
    /// The scalars as the device kernels take them, in their order: lr, beta1, beta2,
    /// 1 - beta1, 1 - beta2 (rounded once from f64), eps, weight decay, the two bias
    /// corrections, the gradient scale.
    pub fn kernel_scalars(&self) -> [f32; 10] {
        [
            self.lr,
            self.beta1,
            self.beta2,
            1.0 - self.beta1,
            1.0 - self.beta2,
            self.eps,
            self.weight_decay,
            self.bias1,
            self.bias2,
            self.grad_scale,
        ]
        .map(|x| x as f32)
    }
}

super::simd! {
/// `p`, `m`, `v` updated in place from `g` (all of one length). The moments are f32 (the
/// specification); the arithmetic is f64, so f64 parameters match PyTorch's f64 AdamW.
pub fn adamw<T: Float>(p: &mut [T], g: &[T], m: &mut [f32], v: &mut [f32], h: &AdamWStep) {
    debug_assert!(p.len() == g.len() && p.len() == m.len() && p.len() == v.len());
    for j in 0..p.len() {
        let mut w = Float::to_f64(p[j]);
        let gj = Float::to_f64(g[j]) * h.grad_scale;
        w -= h.lr * h.weight_decay * w;
        m[j] = (h.beta1 * m[j] as f64 + (1.0 - h.beta1) * gj) as f32;
        v[j] = (h.beta2 * v[j] as f64 + (1.0 - h.beta2) * gj * gj) as f32;
        let (mh, vh) = (m[j] as f64 / h.bias1, v[j] as f64 / h.bias2);
        w -= h.lr * mh / (vh.sqrt() + h.eps);
        p[j] = T::from_f64(w);
    }
}
}

/// `sum(x^2)` in f64.
pub fn sum_squares<T: Float>(x: &[T]) -> f64 {
    x.iter().map(|&v| Float::to_f64(v) * Float::to_f64(v)).sum()
}

/// Per tensor, the f64 sum of its run of f32 partial sums: `groups[i]` partials belong to
/// tensor `i`, in order (how the device kernels leave a global norm's pieces).
pub fn add_partials(groups: &[usize], partials: &[f32]) -> Vec<f64> {
    let mut at = 0;
    groups
        .iter()
        .map(|&k| {
            let s = partials[at..at + k].iter().map(|&p| p as f64).sum();
            at += k;
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_step_moves_by_lr_against_the_gradient_sign() {
        // At step 1 the bias-corrected ratio m^/sqrt(v^) is g/|g|: a step of exactly lr.
        let h = AdamWStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 0.0,
            weight_decay: 0.0,
            bias1: 0.1,
            bias2: 0.001,
            grad_scale: 0.5,
        };
        let (mut p, mut m, mut v) = (vec![1.0f64, -2.0], vec![0.0f32; 2], vec![0.0f32; 2]);
        adamw(&mut p, &[3.0, -0.25], &mut m, &mut v, &h);
        assert!(
            (p[0] - 0.9).abs() < 1e-7 && (p[1] + 1.9).abs() < 1e-7,
            "{p:?}"
        );
        assert_eq!(m, vec![0.15, -0.0125]);
        assert_eq!(sum_squares(&[3.0f32, 4.0]), 25.0);
    }
}
