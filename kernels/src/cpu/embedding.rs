//! Embedding gather and its backward, a scatter-add.

use super::Float;
use rayon::prelude::*;

/// `out[i, :] = table[ids[i], :]`; ids are range-checked by the caller. Any element type: a
/// 16-bit table is gathered as stored, never widened whole.
pub fn gather<T: Copy + Send + Sync>(table: &[T], dim: usize, ids: &[u32], out: &mut [T]) {
    out.par_chunks_mut(dim)
        .zip(ids.par_iter())
        .for_each(|(o, &id)| o.copy_from_slice(&table[id as usize * dim..(id as usize + 1) * dim]));
}

/// `dtable[ids[i], :] += dout[i, :]`.
///
/// Repeated ids would race if tokens were split across threads, so the tokens are grouped by id
/// with a counting sort (CSR: `start[id]..start[id+1]` indexes `tokens`) and each table row is
/// owned by one task. Tokens of a row are summed in input order: deterministic for any thread count.
pub fn scatter_add<T: Float>(dout: &[T], dim: usize, ids: &[u32], dtable: &mut [T]) {
    let vocab = dtable.len() / dim.max(1);
    let (start, tokens) = group_by_id(ids, vocab);
    dtable.par_chunks_mut(dim).enumerate().for_each(|(v, row)| {
        for &t in &tokens[start[v] as usize..start[v + 1] as usize] {
            let src = &dout[t as usize * dim..(t as usize + 1) * dim];
            for (d, &s) in row.iter_mut().zip(src) {
                *d += s;
            }
        }
    });
}

/// Token positions grouped by id with a counting sort: `start (vocab + 1)` and `tokens`, so
/// `tokens[start[id]..start[id + 1]]` are the positions holding `id`, in input order.
pub fn group_by_id(ids: &[u32], vocab: usize) -> (Vec<u32>, Vec<u32>) {
    let mut start = vec![0u32; vocab + 1];
    for &id in ids {
        start[id as usize + 1] += 1;
    }
    for v in 0..vocab {
        start[v + 1] += start[v];
    }
    let mut next = start.clone();
    let mut tokens = vec![0u32; ids.len()];
    for (i, &id) in ids.iter().enumerate() {
        tokens[next[id as usize] as usize] = i as u32;
        next[id as usize] += 1;
    }
    (start, tokens)
}
