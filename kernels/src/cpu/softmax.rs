//! Softmax and log-softmax over the last axis, via the max-shifted log-sum-exp.

use super::{Float, max_of, sum_of};
use rayon::prelude::*;

super::simd! {
/// `log(sum(exp(row)))`, shifted by the row max so it never overflows. Exponentials are taken
/// in stack chunks so the vectorised `exp_in_place` applies without a heap buffer.
pub fn logsumexp<T: Float>(row: &[T]) -> T {
    let m = max_of(row);
    if m == T::neg_infinity() {
        return m;
    }
    let mut buf = [T::zero(); 256];
    let mut s = T::zero();
    for chunk in row.chunks(buf.len()) {
        let b = &mut buf[..chunk.len()];
        b.iter_mut().zip(chunk).for_each(|(o, &v)| *o = v - m);
        T::exp_in_place(b);
        s += sum_of(b);
    }
    m + s.ln()
}
}

/// `y = softmax(x)` (or `log_softmax(x)` when `log`), rows of length `cols`. One `exp` per
/// element: the shifted exponentials are written to `y` and normalised in place.
pub fn softmax<T: Float>(x: &[T], cols: usize, log: bool, y: &mut [T]) {
    y.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .for_each(|(yr, xr)| softmax_row(xr, log, yr));
}

super::simd! {
/// `softmax` of one row, on the calling thread (see `simd!` for why).
fn softmax_row<T: Float>(xr: &[T], log: bool, yr: &mut [T]) {
    if log {
        let lse = logsumexp(xr);
        yr.iter_mut().zip(xr).for_each(|(o, &v)| *o = v - lse);
    } else {
        let m = max_of(xr);
        yr.iter_mut().zip(xr).for_each(|(o, &v)| *o = v - m);
        T::exp_in_place(yr);
        let inv = T::one() / sum_of(yr);
        yr.iter_mut().for_each(|o| *o *= inv);
    }
}
}

/// Backward from the forward output `y`:
/// softmax `dx = y * (dy - sum(dy * y))`; log-softmax `dx = dy - exp(y) * sum(dy)`.
pub fn softmax_backward<T: Float>(y: &[T], dy: &[T], cols: usize, log: bool, dx: &mut [T]) {
    dx.par_chunks_mut(cols)
        .zip(y.par_chunks(cols).zip(dy.par_chunks(cols)))
        .for_each(|(dxr, (yr, dyr))| softmax_backward_row(yr, dyr, log, dxr));
}

super::simd! {
/// `softmax_backward` of one row, on the calling thread.
fn softmax_backward_row<T: Float>(yr: &[T], dyr: &[T], log: bool, dxr: &mut [T]) {
    if log {
        let s = sum_of(dyr);
        for ((o, &y), &g) in dxr.iter_mut().zip(yr).zip(dyr) {
            *o = g - y.exp() * s;
        }
    } else {
        let s = super::dot(dyr, yr);
        for ((o, &y), &g) in dxr.iter_mut().zip(yr).zip(dyr) {
            *o = y * (g - s);
        }
    }
}
}
