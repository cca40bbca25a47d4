//! Causal scaled-dot-product attention with GQA, tiled flash-style on the CPU.
//!
//! Layout: `q, o: (B, Hq, T, D)`, `k, v: (B, Hkv, S, D)`, `lse: (B, Hq, T)`. Query head `h` reads
//! K/V head `h / (Hq / Hkv)` by index; repeated K/V are never materialised. Query row `i` sees
//! keys `j <= i + (S - T)` (the offset lets a KV cache hold earlier positions).
//!
//! Memory: the forward pass keeps one `(Br, Bc)` score tile and `(Br, D)` accumulators per
//! task and saves only the row log-sum-exp, so memory is O(T·D), never O(T²) per head. The
//! backward pass recomputes each probability `p = exp(q·k·scale - lse)` from that saved lse.

use super::{Float, axpy, dot};
use rayon::prelude::*;

/// Shape of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    /// Query length T.
    pub q_len: usize,
    /// Key length S (>= T when a cache holds earlier positions).
    pub kv_len: usize,
    pub head_dim: usize,
}

/// Tile sizes. Tests use small tiles to exercise tile edges on small shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    /// Query rows per task.
    pub br: usize,
    /// Keys per tile.
    pub bc: usize,
}

impl Default for Tiles {
    fn default() -> Self {
        // 64 keys x 64 dims of f32 is 16 KiB: a K tile and a V tile stay in a 48 KiB L1.
        Tiles { br: 64, bc: 64 }
    }
}

impl AttnDims {
    fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
    fn offset(&self) -> usize {
        self.kv_len - self.q_len
    }
    /// Index of row `i` of query head `h` in batch `b`, in units of rows of length D.
    fn q_row(&self, b: usize, h: usize, i: usize) -> usize {
        (b * self.q_heads + h) * self.q_len + i
    }
    fn kv_row(&self, b: usize, hk: usize, j: usize) -> usize {
        (b * self.kv_heads + hk) * self.kv_len + j
    }
    /// Panics on inconsistent sizes; the engine validates user shapes before calling.
    fn check(&self) {
        assert!(self.kv_heads > 0 && self.q_heads.is_multiple_of(self.kv_heads));
        assert!(self.kv_len >= self.q_len);
    }
}

/// Forward: writes `o` and `lse`.
pub fn attention_forward<T: Float>(
    dims: AttnDims,
    tiles: Tiles,
    scale: f64,
    (q, k, v): (&[T], &[T], &[T]),
    o: &mut [T],
    lse: &mut [T],
) {
    dims.check();
    let (t, d, br, bc) = (dims.q_len, dims.head_dim, tiles.br, tiles.bc);
    let scale = T::from_f64(scale);
    let blocks = t.div_ceil(br);
    // One task per (batch, head, query block); blocks near the diagonal do less work, and
    // rayon's work stealing evens that out.
    let mut tasks: Vec<(usize, &mut [T], &mut [T])> = Vec::new();
    for (bh, (ob, lb)) in o.chunks_mut(t * d).zip(lse.chunks_mut(t)).enumerate() {
        for (qb, (obr, lbr)) in ob.chunks_mut(br * d).zip(lb.chunks_mut(br)).enumerate() {
            tasks.push((bh * blocks + qb, obr, lbr));
        }
    }
    tasks.into_par_iter().for_each(|(task, ot, lt)| {
        let (bh, qb) = (task / blocks, task % blocks);
        let (b, h) = (bh / dims.q_heads, bh % dims.q_heads);
        let hk = h / dims.group();
        let rows = lt.len();
        let i0 = qb * br;
        // Running max and sum of exponentials per row; `ot` is the unnormalised accumulator.
        let mut m = vec![T::neg_infinity(); rows];
        let mut l = vec![T::zero(); rows];
        let mut s = vec![T::zero(); bc];
        ot.fill(T::zero());
        let key_end = (i0 + rows - 1 + dims.offset() + 1).min(dims.kv_len);
        for j0 in (0..key_end).step_by(bc) {
            let j1 = (j0 + bc).min(key_end);
            for r in 0..rows {
                let i = i0 + r;
                let visible = (i + dims.offset() + 1).min(j1);
                if visible <= j0 {
                    continue;
                }
                let qr = &q[dims.q_row(b, h, i) * d..][..d];
                let mut tile_max = T::neg_infinity();
                for j in j0..visible {
                    let kr = &k[dims.kv_row(b, hk, j) * d..][..d];
                    let sj = dot(qr, kr) * scale;
                    s[j - j0] = sj;
                    tile_max = tile_max.max(sj);
                }
                let m_new = m[r].max(tile_max);
                // Rescale what was accumulated under the old max (exp(-inf) = 0 on the first tile).
                let alpha = (m[r] - m_new).exp();
                let orow = &mut ot[r * d..(r + 1) * d];
                if alpha != T::one() {
                    orow.iter_mut().for_each(|x| *x *= alpha);
                }
                l[r] *= alpha;
                for j in j0..visible {
                    let p = (s[j - j0] - m_new).exp();
                    l[r] += p;
                    axpy(p, &v[dims.kv_row(b, hk, j) * d..][..d], orow);
                }
                m[r] = m_new;
            }
        }
        for r in 0..rows {
            let inv = T::one() / l[r];
            ot[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
            lt[r] = m[r] + l[r].ln();
        }
    });
}

/// Backward: given `do` and the forward's `o` and `lse`, writes `dq`, `dk`, `dv` (overwritten).
///
/// Two passes so no two tasks write the same row: pass 1 owns a key block of one K/V head and
/// loops over every query row (of every query head in its group) that sees it, producing dK and
/// dV; pass 2 owns a query block and produces dQ. Each recomputes the probabilities it needs.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Float>(
    dims: AttnDims,
    tiles: Tiles,
    scale: f64,
    (q, k, v): (&[T], &[T], &[T]),
    (o, lse, dout): (&[T], &[T], &[T]),
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    dims.check();
    let (t, sl, d) = (dims.q_len, dims.kv_len, dims.head_dim);
    let off = dims.offset();
    let sc = T::from_f64(scale);
    // delta_i = rowsum(dO_i * O_i) = sum_j p_ij dp_ij, the softmax-backward correction.
    let delta: Vec<T> = (0..dims.batch * dims.q_heads * t)
        .into_par_iter()
        .map(|r| dot(&dout[r * d..(r + 1) * d], &o[r * d..(r + 1) * d]))
        .collect();

    // Pass 1: dK, dV per (batch, kv head, key block).
    let kblocks = sl.div_ceil(tiles.bc);
    let mut tasks: Vec<(usize, &mut [T], &mut [T])> = Vec::new();
    for (bh, (dkb, dvb)) in dk.chunks_mut(sl * d).zip(dv.chunks_mut(sl * d)).enumerate() {
        for (kb, (dkt, dvt)) in dkb
            .chunks_mut(tiles.bc * d)
            .zip(dvb.chunks_mut(tiles.bc * d))
            .enumerate()
        {
            tasks.push((bh * kblocks + kb, dkt, dvt));
        }
    }
    tasks.into_par_iter().for_each(|(task, dkt, dvt)| {
        let (bh, kb) = (task / kblocks, task % kblocks);
        let (b, hk) = (bh / dims.kv_heads, bh % dims.kv_heads);
        let j0 = kb * tiles.bc;
        let cols = dkt.len() / d;
        dkt.fill(T::zero());
        dvt.fill(T::zero());
        // First query row that sees key j0.
        let i_start = j0.saturating_sub(off);
        for h in hk * dims.group()..(hk + 1) * dims.group() {
            for i in i_start..t {
                let qi = dims.q_row(b, h, i);
                let (qr, dor) = (&q[qi * d..][..d], &dout[qi * d..][..d]);
                let visible = (i + off + 1).min(j0 + cols);
                for j in j0..visible {
                    let kvi = dims.kv_row(b, hk, j);
                    let p = (dot(qr, &k[kvi * d..][..d]) * sc - lse[qi]).exp();
                    let dp = dot(dor, &v[kvi * d..][..d]);
                    let ds = p * (dp - delta[qi]);
                    let c = j - j0;
                    axpy(p, dor, &mut dvt[c * d..(c + 1) * d]);
                    axpy(ds * sc, qr, &mut dkt[c * d..(c + 1) * d]);
                }
            }
        }
    });

    // Pass 2: dQ per (batch, query head, query block). Blocks are cut per head so a block
    // never straddles two heads when T is not a multiple of Br.
    let mut tasks: Vec<(usize, usize, &mut [T])> = Vec::new();
    for (bh, dqh) in dq.chunks_mut(t * d).enumerate() {
        for (qb, dqt) in dqh.chunks_mut(tiles.br * d).enumerate() {
            tasks.push((bh, qb, dqt));
        }
    }
    tasks.into_par_iter().for_each(|(bh, qb, dqt)| {
        let (b, h) = (bh / dims.q_heads, bh % dims.q_heads);
        let hk = h / dims.group();
        dqt.fill(T::zero());
        for r in 0..dqt.len() / d {
            let i = qb * tiles.br + r;
            let qi = dims.q_row(b, h, i);
            let (qr, dor) = (&q[qi * d..][..d], &dout[qi * d..][..d]);
            let dqr = &mut dqt[r * d..(r + 1) * d];
            for j in 0..(i + off + 1).min(sl) {
                let kvi = dims.kv_row(b, hk, j);
                let kr = &k[kvi * d..][..d];
                let p = (dot(qr, kr) * sc - lse[qi]).exp();
                let ds = p * (dot(dor, &v[kvi * d..][..d]) - delta[qi]);
                axpy(ds * sc, kr, dqr);
            }
        }
    });
}

/// Reference attention that materialises the full score matrix, for tests and benchmarks.
pub fn attention_reference<T: Float>(
    dims: AttnDims,
    scale: f64,
    (q, k, v): (&[T], &[T], &[T]),
    o: &mut [T],
) {
    let (t, d) = (dims.q_len, dims.head_dim);
    for b in 0..dims.batch {
        for h in 0..dims.q_heads {
            let hk = h / dims.group();
            for i in 0..t {
                let qr = &q[dims.q_row(b, h, i) * d..][..d];
                let n = i + dims.offset() + 1;
                let s: Vec<f64> = (0..n)
                    .map(|j| dot(qr, &k[dims.kv_row(b, hk, j) * d..][..d]).to_f64() * scale)
                    .collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                let orow = &mut o[dims.q_row(b, h, i) * d..][..d];
                for (c, out) in orow.iter_mut().enumerate() {
                    let acc: f64 = (0..n)
                        .map(|j| (s[j] - mx).exp() / z * v[dims.kv_row(b, hk, j) * d + c].to_f64())
                        .sum();
                    *out = T::from_f64(acc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: f64) -> Vec<f64> {
        (0..n).map(|i| ((i as f64 + seed) * 0.731).sin()).collect()
    }

    #[test]
    fn tiled_forward_matches_reference_across_tile_edges() {
        for (t, s, tiles) in [
            (7, 7, Tiles { br: 3, bc: 2 }),
            (5, 9, Tiles { br: 4, bc: 4 }),
            (1, 1, Tiles::default()),
        ] {
            let dims = AttnDims {
                batch: 2,
                q_heads: 4,
                kv_heads: 2,
                q_len: t,
                kv_len: s,
                head_dim: 5,
            };
            let q = data(2 * 4 * t * 5, 0.0);
            let (k, v) = (data(2 * 2 * s * 5, 1.0), data(2 * 2 * s * 5, 2.0));
            let (mut o, mut lse, mut r) =
                (vec![0.0; q.len()], vec![0.0; 2 * 4 * t], vec![0.0; q.len()]);
            attention_forward(dims, tiles, 0.4, (&q, &k, &v), &mut o, &mut lse);
            attention_reference(dims, 0.4, (&q, &k, &v), &mut r);
            for (a, b) in o.iter().zip(&r) {
                assert!((a - b).abs() < 1e-12, "t={t} s={s}: {a} vs {b}");
            }
        }
    }
}
