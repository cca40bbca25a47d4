//! Elementwise binary ops with `b` broadcast over the leading dims of `a`.

use super::{Float, Slot};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryKind {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryKind {
    #[inline]
    fn apply<T: Float>(self, x: T, y: T) -> T {
        match self {
            BinaryKind::Add => x + y,
            BinaryKind::Sub => x - y,
            BinaryKind::Mul => x * y,
            BinaryKind::Div => x / y,
        }
    }
}

/// `out[r, j] = a[r, j] (op) b[j]` where `a` is `(rows, b.len())` row-major. `b.len() == a.len()`
/// is plain elementwise. Every element of `out` is written.
pub fn binary<T: Float, O: Slot<T>>(kind: BinaryKind, a: &[T], b: &[T], out: &mut [O]) {
    assert_eq!(a.len(), out.len());
    assert!(
        !b.is_empty() && a.len().is_multiple_of(b.len()),
        "binary: b must tile a"
    );
    let n = b.len();
    let chunk = n * super::rows_per_task(a.len() / n, n);
    out.par_chunks_mut(chunk)
        .zip(a.par_chunks(chunk))
        .for_each(|(o, x)| binary_rows(kind, x, b, o));
}

super::simd! {
/// `binary` on whole rows of `a`, on the calling thread (a `simd!` function of its own: see
/// the macro for why the loop is not in the closure).
fn binary_rows<T: Float, O: Slot<T>>(kind: BinaryKind, a: &[T], b: &[T], out: &mut [O]) {
    for (orow, xrow) in out.chunks_mut(b.len()).zip(a.chunks(b.len())) {
        for ((oi, &xi), &yi) in orow.iter_mut().zip(xrow).zip(b) {
            oi.put(kind.apply(xi, yi));
        }
    }
}
}

/// `a += b` elementwise, in parallel chunks: gradient accumulation, where a tensor used by
/// several ops (a layer input feeding q, k, v and their adapters) sums its gradients.
pub fn add_assign<T: Float>(a: &mut [T], b: &[T]) {
    assert_eq!(a.len(), b.len(), "add_assign: lengths differ");
    const CHUNK: usize = 1 << 14;
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(x, y)| add_chunk(x, y));
}

super::simd! {
fn add_chunk<T: Float>(a: &mut [T], b: &[T]) {
    a.iter_mut().zip(b).for_each(|(x, &y)| *x += y);
}
}

/// `out[j] = sum_r a[r, j]`: the gradient of a broadcast operand. `a` is `(rows, out.len())`.
pub fn sum_rows<T: Float>(a: &[T], out: &mut [T]) {
    let n = out.len();
    assert!(n > 0 && a.len().is_multiple_of(n));
    out.fill(T::zero());
    // Row order is fixed, so the result is deterministic whatever the thread count.
    for row in a.chunks(n) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o += x;
        }
    }
}
