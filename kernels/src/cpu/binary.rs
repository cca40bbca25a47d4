//! Elementwise binary ops with `b` broadcast over the leading dims of `a`.

use super::Float;
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

super::simd! {
/// `out[r, j] = a[r, j] (op) b[j]` where `a` is `(rows, b.len())` row-major. `b.len() == a.len()`
/// is plain elementwise. The match on `kind` sits outside the inner loop so each arm vectorises.
pub fn binary<T: Float>(kind: BinaryKind, a: &[T], b: &[T], out: &mut [T]) {
    assert_eq!(a.len(), out.len());
    assert!(
        !b.is_empty() && a.len().is_multiple_of(b.len()),
        "binary: b must tile a"
    );
    let n = b.len();
    let chunk = n * super::rows_per_task(a.len() / n, n);
    out.par_chunks_mut(chunk)
        .zip(a.par_chunks(chunk))
        .for_each(|(o, x)| {
            for (orow, xrow) in o.chunks_mut(n).zip(x.chunks(n)) {
                for ((oi, &xi), &yi) in orow.iter_mut().zip(xrow).zip(b) {
                    *oi = kind.apply(xi, yi);
                }
            }
        });
}
}

super::simd! {
/// `a += b` elementwise, in parallel chunks: gradient accumulation, where a tensor used by
/// several ops (a layer input feeding q, k, v and their adapters) sums its gradients.
pub fn add_assign<T: Float>(a: &mut [T], b: &[T]) {
    assert_eq!(a.len(), b.len(), "add_assign: lengths differ");
    const CHUNK: usize = 1 << 14;
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, &y)| *x += y));
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
