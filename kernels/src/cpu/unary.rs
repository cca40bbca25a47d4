//! Elementwise unary ops and their derivatives.

use super::{Float, Slot};
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

/// `out = f(x)`; a parallel map over fixed-size chunks.
pub fn unary<T: Float>(kind: UnaryKind, x: &[T], out: &mut [T]) {
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| unary_chunk(kind, x, o));
}

super::simd! {
/// `unary` on one chunk, on the calling thread (see `simd!` for why).
fn unary_chunk<T: Float>(kind: UnaryKind, x: &[T], out: &mut [T]) {
    #[inline(always)]
    fn map<T: Float>(x: &[T], out: &mut [T], f: impl Fn(T) -> T) {
        out.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x));
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

/// `dx = dy * f'(x)`, given the forward input `x` and output `y` (whichever the derivative needs).
pub fn unary_backward<T: Float>(kind: UnaryKind, x: &[T], y: &[T], dy: &[T], dx: &mut [T]) {
    dx.par_chunks_mut(CHUNK)
        .zip(
            x.par_chunks(CHUNK)
                .zip(y.par_chunks(CHUNK))
                .zip(dy.par_chunks(CHUNK)),
        )
        .for_each(|(dx, ((x, y), dy))| unary_backward_chunk(kind, x, y, dy, dx));
}

super::simd! {
/// `unary_backward` on one chunk, on the calling thread.
fn unary_backward_chunk<T: Float>(kind: UnaryKind, x: &[T], y: &[T], dy: &[T], dx: &mut [T]) {
    #[inline(always)]
    fn zip3<T: Float>(x: &[T], y: &[T], dy: &[T], dx: &mut [T], f: impl Fn(T, T, T) -> T) {
        for (((o, &x), &y), &g) in dx.iter_mut().zip(x).zip(y).zip(dy) {
            *o = f(x, y, g);
        }
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

/// `out = alpha * x`.
pub fn scale<T: Float>(alpha: T, x: &[T], out: &mut [T]) {
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| scale_chunk(alpha, x, o));
}

super::simd! {
fn scale_chunk<T: Float>(alpha: T, x: &[T], out: &mut [T]) {
    out.iter_mut().zip(x).for_each(|(o, &x)| *o = alpha * x);
}
}

/// SwiGLU: `out = silu(gate) * up`, fused so the MLP stores one activation instead of three.
pub fn swiglu<T: Float, O: Slot<T>>(gate: &[T], up: &[T], out: &mut [O]) {
    // Equal lengths: every output element is written (the engine's fresh outputs rely on it).
    assert!(
        gate.len() == out.len() && up.len() == out.len(),
        "swiglu: lengths differ"
    );
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| swiglu_chunk(g, u, o));
}

super::simd! {
/// `swiglu` on one chunk, on the calling thread.
fn swiglu_chunk<T: Float, O: Slot<T>>(gate: &[T], up: &[T], out: &mut [O]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        o.put(g * sigmoid(g) * u);
    }
}
}

/// SwiGLU backward: `dgate = dy * up * silu'(gate)`, `dup = dy * silu(gate)`.
pub fn swiglu_backward<T: Float, O: Slot<T>>(
    gate: &[T],
    up: &[T],
    dy: &[T],
    dgate: &mut [O],
    dup: &mut [O],
) {
    let n = dy.len();
    assert!(
        [gate.len(), up.len(), dgate.len(), dup.len()]
            .iter()
            .all(|&l| l == n),
        "swiglu_backward: lengths differ"
    );
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(
            gate.par_chunks(CHUNK)
                .zip(up.par_chunks(CHUNK))
                .zip(dy.par_chunks(CHUNK)),
        )
        .for_each(|((dg, du), ((g, u), d))| swiglu_backward_chunk((g, u, d), dg, du));
}

super::simd! {
/// `swiglu_backward` on one chunk, on the calling thread.
fn swiglu_backward_chunk<T: Float, O: Slot<T>>((gate, up, dy): (&[T], &[T], &[T]), dgate: &mut [O], dup: &mut [O]) {
    let n = dgate.len();
    let (dup, gate, up, dy) = (&mut dup[..n], &gate[..n], &up[..n], &dy[..n]);
    for i in 0..n {
        let (g, u, d) = (gate[i], up[i], dy[i]);
        let sg = sigmoid(g);
        dgate[i].put(d * u * sg * (T::one() + g * (T::one() - sg)));
        dup[i].put(d * g * sg);
    }
}
}
