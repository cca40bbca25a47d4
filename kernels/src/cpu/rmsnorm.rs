//! RMSNorm over the last axis: `y = x * rstd * w`, `rstd = 1 / sqrt(mean(x^2) + eps)`.

use super::Float;
use rayon::prelude::*;

super::simd! {
/// `x, y: (rows, cols)`, `w: (cols)`, `rstd: (rows)` saved for the backward pass.
pub fn rmsnorm<T: Float>(x: &[T], w: &[T], eps: f64, y: &mut [T], rstd: &mut [T]) {
    let cols = w.len();
    y.par_chunks_mut(cols)
        .zip(rstd.par_iter_mut())
        .enumerate()
        .for_each(|(r, (yr, rs))| {
            let xr = &x[r * cols..(r + 1) * cols];
            let ms = super::dot(xr, xr).to_f64() / cols as f64;
            *rs = T::from_f64(1.0 / (ms + eps).sqrt());
            for ((yi, &xi), &wi) in yr.iter_mut().zip(xr).zip(w) {
                *yi = xi * *rs * wi;
            }
        });
}
}

super::simd! {
/// With `g = dy * w`: `dx = rstd * g - x * rstd^3 * sum(g * x) / cols`, and
/// `dw = sum_rows(dy * x * rstd)` (written only when `dw` is given: a frozen norm skips it).
pub fn rmsnorm_backward<T: Float>(
    x: &[T],
    w: &[T],
    rstd: &[T],
    dy: &[T],
    dx: &mut [T],
    dw: Option<&mut [T]>,
) {
    let cols = w.len();
    dx.par_chunks_mut(cols).enumerate().for_each(|(r, dxr)| {
        let (xr, dyr) = (&x[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
        let rs = rstd[r];
        let mut gx = T::zero();
        for i in 0..cols {
            gx += dyr[i] * w[i] * xr[i];
        }
        let k = rs * rs * rs * gx / T::from_f64(cols as f64);
        for i in 0..cols {
            dxr[i] = rs * dyr[i] * w[i] - xr[i] * k;
        }
    });
    if let Some(dw) = dw {
        // Parallel over column bands; each band sums rows in order (deterministic).
        let band = 64.min(cols.max(1));
        dw.par_chunks_mut(band).enumerate().for_each(|(b, dwb)| {
            dwb.fill(T::zero());
            let c0 = b * band;
            for r in 0..rstd.len() {
                let rs = rstd[r];
                let o = r * cols + c0;
                for (j, d) in dwb.iter_mut().enumerate() {
                    *d += dy[o + j] * x[o + j] * rs;
                }
            }
        });
    }
}
}
