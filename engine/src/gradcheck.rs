//! Finite-difference gradient checking, public so that a new loss variant or op can be checked
//! the same way the built-ins are.
//!
//! The scalar checked is `L = sum(f(x) * r)` with fixed, irregular weights `r`, so every output
//! element contributes with a distinct weight. The analytic gradient of `L` comes from the tape;
//! the numeric one from central differences `(L(x + eps) - L(x - eps)) / 2 eps`, in f64.

use crate::{DType, Device, Error, Tape, Tensor};

/// Step and tolerance: `|analytic - numeric| <= atol + rtol * |numeric|`.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub eps: f64,
    pub atol: f64,
    pub rtol: f64,
}

impl Default for Tolerance {
    /// For f64 inputs of order 1: central differences err by O(eps^2) plus rounding
    /// O(1e-16 / eps), both far below these bounds.
    fn default() -> Self {
        Tolerance {
            eps: 1e-6,
            atol: 1e-6,
            rtol: 1e-5,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GradCheckError {
    #[error(transparent)]
    Engine(#[from] Error),
    #[error("gradient checks need f64 inputs; input {input} is {dtype:?}")]
    NotF64 { input: usize, dtype: DType },
    #[error("input {input} got no gradient")]
    MissingGradient { input: usize },
    #[error("input {input}, element {index}: analytic {analytic:.9e} vs numeric {numeric:.9e}")]
    Mismatch {
        input: usize,
        index: usize,
        analytic: f64,
        numeric: f64,
    },
}

/// The fixed projection weights: irregular, nonzero, of order 1.
fn weights(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| (1.37 * i as f64 + 0.3).cos() + 0.2)
        .collect()
}

/// Checks the gradient of `f` with respect to every input (all must be f64 on the CPU).
pub fn check(
    f: &dyn Fn(&[Tensor]) -> crate::Result<Tensor>,
    inputs: &[Tensor],
    tol: Tolerance,
) -> Result<(), GradCheckError> {
    for (i, x) in inputs.iter().enumerate() {
        if x.dtype() != DType::F64 {
            return Err(GradCheckError::NotF64 {
                input: i,
                dtype: x.dtype(),
            });
        }
    }
    let tape = Tape::new();
    let tracked: Vec<Tensor> = inputs.iter().map(|t| tape.track(t)).collect();
    let out = f(&tracked)?;
    let r = weights(out.numel());
    let rt = Tensor::from_vec(r.clone(), out.shape().clone(), &Device::Cpu)?;
    let loss = out.mul(&rt)?.sum_all()?;
    let grads = tape.backward(&loss)?;
    let objective = |xs: &[Tensor]| -> Result<f64, GradCheckError> {
        let y = f(xs)?.to_f64_vec()?;
        Ok(y.iter().zip(&r).map(|(a, b)| a * b).sum())
    };
    for (i, x) in inputs.iter().enumerate() {
        let g = grads
            .get(&tracked[i])
            .ok_or(GradCheckError::MissingGradient { input: i })?;
        let g = g.to_f64_vec()?;
        let base = x.to_f64_vec()?;
        for j in 0..base.len() {
            let at = |delta: f64| -> Result<f64, GradCheckError> {
                let mut v = base.clone();
                v[j] += delta;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(v, x.shape().clone(), &Device::Cpu)?;
                objective(&xs)
            };
            let numeric = (at(tol.eps)? - at(-tol.eps)?) / (2.0 * tol.eps);
            if (g[j] - numeric).abs() > tol.atol + tol.rtol * numeric.abs() {
                return Err(GradCheckError::Mismatch {
                    input: i,
                    index: j,
                    analytic: g[j],
                    numeric,
                });
            }
        }
    }
    Ok(())
}
