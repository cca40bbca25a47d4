//! LayerNorm over the last axis (BERT's): `y = (x - mean) * rstd * w + b`,
//! `rstd = 1 / sqrt(var + eps)` with the biased variance, as PyTorch computes it.

use super::Float;
use rayon::prelude::*;

/// `x, y: (rows, cols)`, `w, b: (cols)`; `mean, rstd: (rows)` are saved for the backward pass.
/// The row statistics are accumulated in f64 whatever `T` is.
pub fn layernorm<T: Float>(
    x: &[T],
    w: &[T],
    b: &[T],
    eps: f64,
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
) {
    let cols = w.len();
    y.par_chunks_mut(cols)
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .enumerate()
        .for_each(|(r, (yr, (m, rs)))| {
            let xr = &x[r * cols..(r + 1) * cols];
            let mu = xr.iter().map(|&v| v.to_f64()).sum::<f64>() / cols as f64;
            // Two passes: E[(x - mu)^2] does not cancel catastrophically as E[x^2] - mu^2 can.
            let var = xr.iter().map(|&v| (v.to_f64() - mu).powi(2)).sum::<f64>() / cols as f64;
            let inv = 1.0 / (var + eps).sqrt();
            *m = T::from_f64(mu);
            *rs = T::from_f64(inv);
            let (mu, inv) = (T::from_f64(mu), T::from_f64(inv));
            for (((yi, &xi), &wi), &bi) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *yi = (xi - mu) * inv * wi + bi;
            }
        });
}

/// With `xhat = (x - mean) * rstd` and `g = dy * w`:
/// `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`; `dw = sum_rows(dy * xhat)` and
/// `db = sum_rows(dy)`, written only when given (a frozen norm skips them).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<T: Float>(
    x: &[T],
    w: &[T],
    mean: &[T],
    rstd: &[T],
    dy: &[T],
    dx: &mut [T],
    dw: Option<&mut [T]>,
    db: Option<&mut [T]>,
) {
    let cols = w.len();
    let n = T::from_f64(cols as f64);
    dx.par_chunks_mut(cols).enumerate().for_each(|(r, dxr)| {
        let (xr, dyr) = (&x[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
        let (mu, rs) = (mean[r], rstd[r]);
        let (mut sg, mut sgx) = (T::zero(), T::zero());
        for i in 0..cols {
            let g = dyr[i] * w[i];
            sg += g;
            sgx += g * (xr[i] - mu) * rs;
        }
        let (mg, mgx) = (sg / n, sgx / n);
        for i in 0..cols {
            let xhat = (xr[i] - mu) * rs;
            dxr[i] = rs * (dyr[i] * w[i] - mg - xhat * mgx);
        }
    });
    // Parallel over column bands; each band sums rows in order (deterministic).
    let band = 64.min(cols.max(1));
    if let Some(dw) = dw {
        dw.par_chunks_mut(band).enumerate().for_each(|(k, dwb)| {
            dwb.fill(T::zero());
            let c0 = k * band;
            for r in 0..rstd.len() {
                let o = r * cols + c0;
                for (j, d) in dwb.iter_mut().enumerate() {
                    *d += dy[o + j] * (x[o + j] - mean[r]) * rstd[r];
                }
            }
        });
    }
    if let Some(db) = db {
        db.par_chunks_mut(band).enumerate().for_each(|(k, dbb)| {
            dbb.fill(T::zero());
            let c0 = k * band;
            for r in 0..rstd.len() {
                for (j, d) in dbb.iter_mut().enumerate() {
                    *d += dy[r * cols + c0 + j];
                }
            }
        });
    }
}
