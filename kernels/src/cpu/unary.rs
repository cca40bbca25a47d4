//! Elementwise unary ops and their derivatives.

use super::Float;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryKind {
    Exp,
    Log,
    Sigmoid,
    Silu,
    Neg,
    /// The exact (erf) GELU of BERT: `x * Phi(x)`, Phi the standard normal CDF.
    Gelu,
}

/// The logistic function; its exp is the vectorisable one, so loops over it (SiLU, SwiGLU)
/// vectorise instead of calling libm per element.
#[inline(always)]
pub fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp_fast())
}

/// The standard normal CDF, `(1 + erf(x / sqrt 2)) / 2`.
#[inline(always)]
pub fn normal_cdf<T: Float>(x: T) -> T {
    let half = T::from_f64(0.5);
    half * (T::one() + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

super::simd! {
/// `out = f(x)`; a parallel map over fixed-size chunks.
pub fn unary<T: Float>(kind: UnaryKind, x: &[T], out: &mut [T]) {
    fn map<T: Float>(x: &[T], out: &mut [T], f: impl Fn(T) -> T + Sync) {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x)));
    }
    match kind {
        UnaryKind::Exp => map(x, out, |v| v.exp()),
        UnaryKind::Log => map(x, out, |v| v.ln()),
        UnaryKind::Sigmoid => map(x, out, sigmoid),
        UnaryKind::Silu => map(x, out, |v| v * sigmoid(v)),
        UnaryKind::Neg => map(x, out, |v| -v),
        UnaryKind::Gelu => map(x, out, |v| v * normal_cdf(v)),
    }
}
}

super::simd! {
/// `dx = dy * f'(x)`, given the forward input `x` and output `y` (whichever the derivative needs).
pub fn unary_backward<T: Float>(kind: UnaryKind, x: &[T], y: &[T], dy: &[T], dx: &mut [T]) {
    fn zip3<T: Float>(x: &[T], y: &[T], dy: &[T], dx: &mut [T], f: impl Fn(T, T, T) -> T + Sync) {
        dx.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
            let s = c * CHUNK;
            for (i, o) in o.iter_mut().enumerate() {
                *o = f(x[s + i], y[s + i], dy[s + i]);
            }
        });
    }
    match kind {
        UnaryKind::Exp => zip3(x, y, dy, dx, |_, y, g| g * y),
        UnaryKind::Log => zip3(x, y, dy, dx, |x, _, g| g / x),
        UnaryKind::Sigmoid => zip3(x, y, dy, dx, |_, y, g| g * y * (T::one() - y)),
        UnaryKind::Silu => zip3(x, y, dy, dx, |x, _, g| {
            let s = sigmoid(x);
            g * s * (T::one() + x * (T::one() - s))
        }),
        UnaryKind::Neg => zip3(x, y, dy, dx, |_, _, g| -g),
        // d/dx x Phi(x) = Phi(x) + x phi(x), phi the standard normal density.
        UnaryKind::Gelu => zip3(x, y, dy, dx, |x, _, g| {
            let density = (x * x * T::from_f64(-0.5)).exp()
                * T::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt());
            g * (normal_cdf(x) + x * density)
        }),
    }
}
}

super::simd! {
/// `out = alpha * x`.
pub fn scale<T: Float>(alpha: T, x: &[T], out: &mut [T]) {
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &x)| *o = alpha * x));
}
}

super::simd! {
/// SwiGLU: `out = silu(gate) * up`, fused so the MLP stores one activation instead of three.
pub fn swiglu<T: Float>(gate: &[T], up: &[T], out: &mut [T]) {
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let s = c * CHUNK;
        for (i, o) in o.iter_mut().enumerate() {
            let g = gate[s + i];
            *o = g * sigmoid(g) * up[s + i];
        }
    });
}
}

super::simd! {
/// SwiGLU backward: `dgate = dy * up * silu'(gate)`, `dup = dy * silu(gate)`.
pub fn swiglu_backward<T: Float>(gate: &[T], up: &[T], dy: &[T], dgate: &mut [T], dup: &mut [T]) {
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, (dg, du))| {
            let s = c * CHUNK;
            for i in 0..dg.len() {
                let (g, u, d) = (gate[s + i], up[s + i], dy[s + i]);
                let sg = sigmoid(g);
                dg[i] = d * u * sg * (T::one() + g * (T::one() - sg));
                du[i] = d * g * sg;
            }
        });
}
}
