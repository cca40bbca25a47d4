//! Rotary position embedding, HF's rotate-half convention:
//! `out[..h] = x1 cos - x2 sin`, `out[h..] = x2 cos + x1 sin` with `x1 = x[..h]`, `x2 = x[h..]`.

use super::{Float, Slot};
use rayon::prelude::*;

/// `x, out: (rows, t, d)`; `cos, sin: (t, d / 2)`. `inverse` applies the transpose rotation,
/// which is the backward pass (a rotation's inverse is its transpose).
pub fn rope<T: Float, O: Slot<T>>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    t: usize,
    d: usize,
    inverse: bool,
    out: &mut [O],
) {
    // Whole (t, d) rows with tables for all t positions: every output element is written (the
    // engine's fresh outputs rely on it).
    assert!(
        d.is_multiple_of(2)
            && x.len() == out.len()
            && x.len().is_multiple_of((t * d).max(1))
            && cos.len() >= t * d / 2
            && sin.len() >= t * d / 2,
        "rope: shapes do not fit"
    );
    let sign = if inverse { -T::one() } else { T::one() };
    out.par_chunks_mut(t * d)
        .zip(x.par_chunks(t * d))
        .for_each(|(o, xr)| rope_row((cos, sin), d, sign, xr, o));
}

super::simd! {
/// `rope` on one `(t, d)` row, on the calling thread (see `simd!` for why).
fn rope_row<T: Float, O: Slot<T>>((cos, sin): (&[T], &[T]), d: usize, sign: T, x: &[T], out: &mut [O]) {
    let h = d / 2;
    for ((xv, ov), (c, s)) in x
        .chunks(d)
        .zip(out.chunks_mut(d))
        .zip(cos.chunks(h).zip(sin.chunks(h)))
    {
        let (x1, x2) = xv.split_at(h);
        let (o1, o2) = ov.split_at_mut(h);
        // Zipped, so no index is bounds-checked and the loop vectorises.
        let halves = o1.iter_mut().zip(o2).zip(x1.iter().zip(x2));
        for (((o1, o2), (&a, &b)), (&c, &s)) in halves.zip(c.iter().zip(s)) {
            let si = sign * s;
            o1.put(a * c - b * si);
            o2.put(b * c + a * si);
        }
    }
}
}

/// Tables `(t, d / 2)` for positions `offset..offset + t`: `angle = pos * inv_freq[i]`.
/// Angles are computed in f64: at position 100k an f32 product loses most of its phase.
pub fn rope_tables(inv_freq: &[f64], t: usize, offset: usize) -> (Vec<f64>, Vec<f64>) {
    let h = inv_freq.len();
    let (mut cos, mut sin) = (vec![0.0; t * h], vec![0.0; t * h]);
    for p in 0..t {
        for (i, &f) in inv_freq.iter().enumerate() {
            let a = (p + offset) as f64 * f;
            cos[p * h + i] = a.cos();
            sin[p * h + i] = a.sin();
        }
    }
    (cos, sin)
}

/// Llama's default inverse frequencies `theta^(-2i/d)` for `i in 0..d/2`.
pub fn default_inv_freq(theta: f64, d: usize) -> Vec<f64> {
    (0..d / 2)
        .map(|i| theta.powf(-(2.0 * i as f64) / d as f64))
        .collect()
}
