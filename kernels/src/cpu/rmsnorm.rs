//! RMSNorm over the last axis: `y = x * rstd * w`, `rstd = 1 / sqrt(mean(x^2) + eps)`.

use super::Float;
use rayon::prelude::*;

/// One row: `y = x * rstd * w`, returning `rstd`.
#[inline(always)]
fn norm_row<T: Float>(x: &[T], w: &[T], eps: f64, y: &mut [T]) -> T {
    let ms = super::dot(x, x).to_f64() / w.len() as f64;
    let rs = T::from_f64(1.0 / (ms + eps).sqrt());
    for ((yi, &xi), &wi) in y.iter_mut().zip(x).zip(w) {
        *yi = xi * rs * wi;
    }
    rs
}

super::simd! {
/// `x, y: (rows, cols)`, `w: (cols)`, `rstd: (rows)` saved for the backward pass.
pub fn rmsnorm<T: Float>(x: &[T], w: &[T], eps: f64, y: &mut [T], rstd: &mut [T]) {
    let cols = w.len();
    y.par_chunks_mut(cols)
        .zip(rstd.par_iter_mut())
        .enumerate()
        .for_each(|(r, (yr, rs))| *rs = norm_row(&x[r * cols..(r + 1) * cols], w, eps, yr));
}
}

super::simd! {
/// A block's residual add and the norm after it in one pass over each row: `h = x + delta`,
/// then `rmsnorm(h)` into `y` and `rstd`, the values of the two kernels one after the other.
pub fn add_rmsnorm<T: Float>(
    (x, delta): (&[T], &[T]),
    w: &[T],
    eps: f64,
    h: &mut [T],
    y: &mut [T],
    rstd: &mut [T],
) {
    let cols = w.len();
    h.par_chunks_mut(cols)
        .zip(y.par_chunks_mut(cols))
        .zip(rstd.par_iter_mut())
        .enumerate()
        .for_each(|(r, ((hr, yr), rs))| {
            let row = r * cols..(r + 1) * cols;
            for ((hi, &a), &b) in hr.iter_mut().zip(&x[row.clone()]).zip(&delta[row]) {
                *hi = a + b;
            }
            *rs = norm_row(hr, w, eps, yr);
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
