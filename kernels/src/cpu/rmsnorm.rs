//! RMSNorm over the last axis: `y = x * rstd * w`, `rstd = 1 / sqrt(mean(x^2) + eps)`.

use super::{Float, Slot, sum_of};
use rayon::prelude::*;

/// One row: `y = x * rstd * w`, returning `rstd`.
#[inline(always)]
fn norm_row<T: Float, O: Slot<T>>(x: &[T], w: &[T], eps: f64, y: &mut [O]) -> T {
    let ms = super::dot(x, x).to_f64() / w.len() as f64;
    let rs = T::from_f64(1.0 / (ms + eps).sqrt());
    for ((yi, &xi), &wi) in y.iter_mut().zip(x).zip(w) {
        yi.put(xi * rs * wi);
    }
    rs
}

/// `x, y: (rows, cols)`, `w: (cols)`, `rstd: (rows)` saved for the backward pass.
pub fn rmsnorm<T: Float, O: Slot<T>>(x: &[T], w: &[T], eps: f64, y: &mut [O], rstd: &mut [T]) {
    let cols = w.len();
    // Whole rows: every element of `y` is written (the engine's fresh outputs rely on it).
    assert!(
        x.len() == y.len() && y.len() == rstd.len() * cols,
        "rmsnorm: lengths differ"
    );
    let rows = super::rows_per_task(rstd.len(), cols);
    y.par_chunks_mut(rows * cols)
        .zip(x.par_chunks(rows * cols).zip(rstd.par_chunks_mut(rows)))
        .for_each(|(y, (x, rstd))| rmsnorm_rows(x, w, eps, y, rstd));
}

super::simd! {
/// `rmsnorm` of whole rows, on the calling thread (see `simd!` for why).
fn rmsnorm_rows<T: Float, O: Slot<T>>(x: &[T], w: &[T], eps: f64, y: &mut [O], rstd: &mut [T]) {
    let cols = w.len();
    for ((xr, yr), rs) in x.chunks(cols).zip(y.chunks_mut(cols)).zip(rstd) {
        *rs = norm_row(xr, w, eps, yr);
    }
}
}

/// A block's residual add and the norm after it in one pass over each row: `h = x + delta`,
/// then `rmsnorm(h)` into `y` and `rstd`, the values of the two kernels one after the other.
pub fn add_rmsnorm<T: Float, O: Slot<T>>(
    (x, delta): (&[T], &[T]),
    w: &[T],
    eps: f64,
    h: &mut [T],
    y: &mut [O],
    rstd: &mut [T],
) {
    let cols = w.len();
    let len = rstd.len() * cols;
    assert!(
        [x.len(), delta.len(), h.len(), y.len()]
            .iter()
            .all(|&l| l == len),
        "add_rmsnorm: lengths differ"
    );
    let rows = super::rows_per_task(rstd.len(), cols);
    let n = rows * cols;
    h.par_chunks_mut(n)
        .zip(y.par_chunks_mut(n))
        .zip(rstd.par_chunks_mut(rows))
        .zip(x.par_chunks(n).zip(delta.par_chunks(n)))
        .for_each(|(((h, y), rstd), (x, delta))| add_rmsnorm_rows((x, delta), w, eps, h, y, rstd));
}

super::simd! {
/// `add_rmsnorm` of whole rows, on the calling thread.
fn add_rmsnorm_rows<T: Float, O: Slot<T>>(
    (x, delta): (&[T], &[T]),
    w: &[T],
    eps: f64,
    h: &mut [T],
    y: &mut [O],
    rstd: &mut [T],
) {
    let cols = w.len();
    let rows = h.chunks_mut(cols).zip(y.chunks_mut(cols)).zip(rstd);
    for (((hr, yr), rs), (xr, dr)) in rows.zip(x.chunks(cols).zip(delta.chunks(cols))) {
        for ((hi, &a), &b) in hr.iter_mut().zip(xr).zip(dr) {
            *hi = a + b;
        }
        *rs = norm_row(hr, w, eps, yr);
    }
}
}

/// With `g = dy * w`: `dx = rstd * g - x * rstd^3 * sum(g * x) / cols`, and
/// `dw = sum_rows(dy * x * rstd)` (written only when `dw` is given: a frozen norm skips it).
pub fn rmsnorm_backward<T: Float, O: Slot<T>>(
    x: &[T],
    w: &[T],
    rstd: &[T],
    dy: &[T],
    dx: &mut [O],
    dw: Option<&mut [T]>,
) {
    let cols = w.len();
    let len = rstd.len() * cols;
    assert!(
        x.len() == len && dy.len() == len && dx.len() == len,
        "rmsnorm_backward: lengths differ"
    );
    let rows = super::rows_per_task(rstd.len(), cols);
    let n = rows * cols;
    dx.par_chunks_mut(n)
        .zip(
            x.par_chunks(n)
                .zip(dy.par_chunks(n))
                .zip(rstd.par_chunks(rows)),
        )
        .for_each(|(dx, ((x, dy), rstd))| rmsnorm_backward_rows(x, w, rstd, dy, dx));
    if let Some(dw) = dw {
        // Parallel over column bands; each band sums rows in order (deterministic).
        let band = 64.min(cols.max(1));
        dw.par_chunks_mut(band)
            .enumerate()
            .for_each(|(b, dwb)| rmsnorm_dw_band(x, rstd, dy, cols, b * band, dwb));
    }
}

super::simd! {
/// `dx` of whole rows, on the calling thread (see `simd!` for why).
fn rmsnorm_backward_rows<T: Float, O: Slot<T>>(x: &[T], w: &[T], rstd: &[T], dy: &[T], dx: &mut [O]) {
    let cols = w.len();
    let rows = x.chunks(cols).zip(dy.chunks(cols)).zip(dx.chunks_mut(cols));
    for (((xr, dyr), dxr), &rs) in rows.zip(rstd) {
        // sum(dy * w * x) over 16 lanes: a running sum would be one dependent chain.
        let mut acc = [T::zero(); 16];
        let (dc, wc, xc) = (dyr.chunks_exact(16), w.chunks_exact(16), xr.chunks_exact(16));
        let tail: T = (dc.remainder().iter().zip(wc.remainder()).zip(xc.remainder()))
            .map(|((&d, &w), &x)| d * w * x)
            .fold(T::zero(), |s, v| s + v);
        for ((d, w), x) in dc.zip(wc).zip(xc) {
            for i in 0..16 {
                acc[i] += d[i] * w[i] * x[i];
            }
        }
        let k = rs * rs * rs * (sum_of(&acc) + tail) / T::from_f64(cols as f64);
        for (((o, &d), &w), &x) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
            o.put(rs * d * w - x * k);
        }
    }
}
}

super::simd! {
/// `dw[c0..c0 + band] = sum_r dy[r, c] * x[r, c] * rstd[r]`, rows in order.
fn rmsnorm_dw_band<T: Float>(x: &[T], rstd: &[T], dy: &[T], cols: usize, c0: usize, dwb: &mut [T]) {
    dwb.fill(T::zero());
    for (r, &rs) in rstd.iter().enumerate() {
        let o = r * cols + c0;
        for ((d, &g), &xv) in dwb.iter_mut().zip(&dy[o..]).zip(&x[o..]) {
            *d += g * xv * rs;
        }
    }
}
}
