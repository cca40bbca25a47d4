//! Reductions over one axis of a tensor viewed as `(outer, dim, inner)`.

use super::Float;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceKind {
    Sum,
    Max,
}

/// Reduces `x (outer, dim, inner)` to `out (outer, inner)`. For `Max`, `argmax` receives the
/// index (first on ties) that the backward pass routes the gradient to.
pub fn reduce<T: Float>(
    kind: ReduceKind,
    x: &[T],
    (outer, dim, inner): (usize, usize, usize),
    out: &mut [T],
    argmax: &mut [u32],
) {
    assert_eq!(x.len(), outer * dim * inner);
    assert_eq!(out.len(), outer * inner);
    if kind == ReduceKind::Max {
        assert_eq!(argmax.len(), outer * inner);
    }
    if outer * inner == 0 {
        return;
    }
    let run = |o: usize, orow: &mut [T], arow: &mut [u32]| {
        let xo = &x[o * dim * inner..(o + 1) * dim * inner];
        match kind {
            ReduceKind::Sum => {
                // Accumulate whole rows of `inner` so the inner loop is contiguous.
                orow.fill(T::zero());
                for d in 0..dim {
                    for (acc, &v) in orow.iter_mut().zip(&xo[d * inner..(d + 1) * inner]) {
                        *acc += v;
                    }
                }
            }
            ReduceKind::Max => {
                orow.fill(T::neg_infinity());
                arow.fill(0);
                for d in 0..dim {
                    for (i, &v) in xo[d * inner..(d + 1) * inner].iter().enumerate() {
                        if v > orow[i] || (d == 0) {
                            orow[i] = v;
                            arow[i] = d as u32;
                        }
                    }
                }
            }
        }
    };
    if kind == ReduceKind::Max {
        out.par_chunks_mut(inner)
            .zip(argmax.par_chunks_mut(inner))
            .enumerate()
            .for_each(|(o, (orow, arow))| run(o, orow, arow));
    } else {
        out.par_chunks_mut(inner)
            .enumerate()
            .for_each(|(o, orow)| run(o, orow, &mut []));
    }
}

/// Argmax over the last axis of `x (rows, cols)`; ties resolve to the first index.
pub fn argmax_last<T: Float>(x: &[T], cols: usize, out: &mut [u32]) {
    out.par_iter_mut().enumerate().for_each(|(r, o)| {
        let row = &x[r * cols..(r + 1) * cols];
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = i;
            }
        }
        *o = best as u32;
    });
}

/// Backward of a reduction over the middle axis of `(outer, dim, inner)`: `Sum` broadcasts
/// `g (outer, inner)` along the axis; `Max` routes it to the saved argmax and zeros the rest.
pub fn reduce_backward<T: Float>(
    kind: ReduceKind,
    g: &[T],
    argmax: &[u32],
    (outer, dim, inner): (usize, usize, usize),
    dx: &mut [T],
) {
    assert_eq!(dx.len(), outer * dim * inner);
    if dx.is_empty() {
        return;
    }
    dx.par_chunks_mut(dim * inner)
        .enumerate()
        .for_each(|(o, dxo)| {
            let go = &g[o * inner..(o + 1) * inner];
            match kind {
                ReduceKind::Sum => dxo
                    .chunks_mut(inner)
                    .for_each(|row| row.copy_from_slice(go)),
                ReduceKind::Max => {
                    dxo.fill(T::zero());
                    for (i, &gi) in go.iter().enumerate() {
                        dxo[argmax[o * inner + i] as usize * inner + i] = gi;
                    }
                }
            }
        });
}
