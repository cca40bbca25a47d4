//! Data movement: permutation (transpose) copies and slab copies for narrow/cat.

use rayon::prelude::*;

/// Copies `x` (contiguous, shape `dims`) into `out` with axes permuted: `out` has shape
/// `dims[perm[0]], dims[perm[1]], ...`. When the last axis stays last, whole rows are copied.
pub fn permute<T: Copy + Send + Sync>(x: &[T], dims: &[usize], perm: &[usize], out: &mut [T]) {
    let rank = dims.len();
    assert_eq!(perm.len(), rank);
    assert_eq!(x.len(), out.len());
    if x.is_empty() {
        return;
    }
    let mut in_strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * dims[i + 1];
    }
    let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    // Input stride of each output axis.
    let src_strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    // Copy runs of `run` contiguous elements when the innermost axis is unchanged.
    let (run, outer_rank) = if rank > 0 && perm[rank - 1] == rank - 1 {
        (dims[rank - 1], rank - 1)
    } else {
        (1, rank)
    };
    out.par_chunks_mut(run).enumerate().for_each(|(chunk, o)| {
        let mut rem = chunk;
        let mut src = 0;
        for ax in (0..outer_rank).rev() {
            src += (rem % out_dims[ax]) * src_strides[ax];
            rem /= out_dims[ax];
        }
        o.copy_from_slice(&x[src..src + run]);
    });
}

/// Copies `src (outer, src_dim, inner)` into `dst (outer, dst_dim, inner)` at offset `at` along
/// the middle axis: the kernel behind both narrow (read a slab) and cat (write a slab).
pub fn copy_slab<T: Copy + Send + Sync>(
    src: &[T],
    src_dim: usize,
    src_at: usize,
    dst: &mut [T],
    dst_dim: usize,
    dst_at: usize,
    (outer, len, inner): (usize, usize, usize),
) {
    let run = len * inner;
    if run == 0 {
        return;
    }
    dst.par_chunks_mut(dst_dim * inner)
        .take(outer)
        .enumerate()
        .for_each(|(o, drow)| {
            let s = o * src_dim * inner + src_at * inner;
            drow[dst_at * inner..dst_at * inner + run].copy_from_slice(&src[s..s + run]);
        });
}
