//! Data movement: permutation (transpose) copies and slab copies for narrow/cat.

use rayon::prelude::*;

/// Copies `x` (contiguous, shape `dims`) into `out` with axes permuted: `out` has shape
/// `dims[perm[0]], dims[perm[1]], ...`. When the last axis stays last, whole rows are copied.
pub fn permute<T: Copy + Send + Sync, O: super::Slot<T>>(
    x: &[T],
    dims: &[usize],
    perm: &[usize],
    out: &mut [O],
) {
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
    // Tasks of many runs, each walking its runs with an odometer over the output's outer
    // axes, rather than a task and a division per axis for every run (a run is one 64-float
    // attention head here): the attention transposes' backward in a profiled step 7.1 -> 5.8 ms.
    let runs_per_task = (RUNS_BYTES / (run * std::mem::size_of::<T>()).max(1)).max(1);
    let (out_dims, src_strides) = (&out_dims[..outer_rank], &src_strides[..outer_rank]);
    out.par_chunks_mut(run * runs_per_task)
        .enumerate()
        .for_each(|(task, o)| {
            // The multi-index of the task's first run, and its source offset.
            let mut idx = vec![0usize; outer_rank];
            let mut rem = task * runs_per_task;
            let mut src = 0;
            for ax in (0..outer_rank).rev() {
                idx[ax] = rem % out_dims[ax];
                src += idx[ax] * src_strides[ax];
                rem /= out_dims[ax];
            }
            for o in o.chunks_mut(run) {
                o.iter_mut()
                    .zip(&x[src..src + run])
                    .for_each(|(o, &v)| o.put(v));
                // Next run: the innermost outer axis steps, carrying into the ones above.
                for ax in (0..outer_rank).rev() {
                    idx[ax] += 1;
                    src += src_strides[ax];
                    if idx[ax] < out_dims[ax] {
                        break;
                    }
                    src -= idx[ax] * src_strides[ax];
                    idx[ax] = 0;
                }
            }
        });
}

/// About how many bytes of runs one `permute` task copies.
const RUNS_BYTES: usize = 64 << 10;

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
    // Many rows a task, as in `permute`: a LoRA factor's slab is 16 floats a row.
    let row = dst_dim * inner;
    let rows_per_task = (RUNS_BYTES / (run * std::mem::size_of::<T>()).max(1)).max(1);
    dst[..outer * row]
        .par_chunks_mut(row * rows_per_task)
        .enumerate()
        .for_each(|(task, rows)| {
            for (r, drow) in rows.chunks_mut(row).enumerate() {
                let o = task * rows_per_task + r;
                let s = o * src_dim * inner + src_at * inner;
                drow[dst_at * inner..dst_at * inner + run].copy_from_slice(&src[s..s + run]);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element lands where the permuted index says, for runs of whole rows and of single
    /// elements, over enough runs that several tasks each walk many of them.
    #[test]
    fn permute_matches_the_index_formula() {
        for (dims, perm) in [
            (vec![3, 50, 7, 64], vec![0, 2, 1, 3]),
            (vec![5, 300, 40], vec![2, 0, 1]),
            (vec![2, 3, 4, 5], vec![3, 1, 0, 2]),
            (vec![1, 1], vec![1, 0]),
        ] {
            let n: usize = dims.iter().product();
            let x: Vec<u32> = (0..n as u32).collect();
            let mut out = vec![u32::MAX; n];
            permute(&x, &dims, &perm, &mut out);
            let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
            for (o, &v) in out.iter().enumerate() {
                // The output multi-index, then the input offset it reads.
                let (mut rem, mut idx) = (o, vec![0; dims.len()]);
                for ax in (0..dims.len()).rev() {
                    idx[ax] = rem % out_dims[ax];
                    rem /= out_dims[ax];
                }
                let mut src = 0;
                for (ax, &d) in dims.iter().enumerate() {
                    let at = perm.iter().position(|&p| p == ax).expect("a permutation");
                    src = src * d + idx[at];
                }
                assert_eq!(v as usize, src, "{dims:?} {perm:?} at {o}");
            }
        }
    }

    /// A slab lands at its offset in every row, over more rows than one task takes, and the
    /// rest of each row is left alone.
    #[test]
    fn copy_slab_writes_each_row_at_its_offset() {
        let (outer, src_dim, dst_dim, inner, len) = (5000, 48, 20, 1, 16);
        let src: Vec<u32> = (0..(outer * src_dim * inner) as u32).collect();
        let mut dst = vec![u32::MAX; outer * dst_dim * inner];
        copy_slab(&src, src_dim, 32, &mut dst, dst_dim, 3, (outer, len, inner));
        for (o, row) in dst.chunks(dst_dim).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let want = if (3..3 + len).contains(&j) {
                    (o * src_dim + 32 + j - 3) as u32
                } else {
                    u32::MAX
                };
                assert_eq!(v, want, "row {o}, column {j}");
            }
        }
    }
}
