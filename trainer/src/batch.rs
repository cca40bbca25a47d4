//! Batches of encoded samples: padded ids, next-token targets and the matching mask, and a
//! seeded, length-grouped order that depends only on (seed, epoch), so the data position of a
//! resumed run is recomputed from its step.

use crate::data::Encoded;
use bft_engine::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;

/// One micro-batch, laid out for `LossBatch`.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `(B, T)` token ids, right-padded.
    pub ids: Tensor,
    /// `(B * T)`: the token each position predicts (the next one).
    pub targets: Vec<u32>,
    /// `(B * T)`: whether that prediction is trained on.
    pub mask: Vec<bool>,
    /// Number of `true` entries in `mask`.
    pub target_tokens: usize,
    pub samples: usize,
}

/// Pads `samples` to the longest and shifts targets by one position.
pub fn make_batch(samples: &[&Encoded], pad_id: u32) -> bft_engine::Result<Batch> {
    let t = samples
        .iter()
        .map(|s| s.ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let (mut ids, mut targets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for s in samples {
        let n = s.ids.len();
        ids.extend(
            s.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, t - n)),
        );
        for p in 0..t {
            let next = p + 1 < n;
            targets.push(if next { s.ids[p + 1] } else { 0 });
            mask.push(next && s.target_mask[p + 1]);
        }
    }
    let target_tokens = mask.iter().filter(|&&m| m).count();
    Ok(Batch {
        ids: Tensor::from_vec(ids, [samples.len(), t], &Device::Cpu)?,
        targets,
        mask,
        target_tokens,
        samples: samples.len(),
    })
}

/// The batches of one epoch, as sample indices: shuffled with `seed + epoch`, then grouped by
/// length within windows of 16 batches (less padding), and the batch order shuffled again.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_add(epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
    );
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let mut batches = Vec::new();
    for window in order.chunks(batch_size.max(1) * 16) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(w.chunks(batch_size.max(1)).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_next_tokens_under_the_shifted_mask() {
        let a = Encoded {
            ids: vec![5, 6, 7, 8],
            target_mask: vec![false, false, true, true],
        };
        let b = Encoded {
            ids: vec![1, 2],
            target_mask: vec![false, true],
        };
        let batch = make_batch(&[&a, &b], 0).unwrap();
        assert_eq!(
            batch.ids.to_vec::<u32>().unwrap(),
            vec![5, 6, 7, 8, 1, 2, 0, 0]
        );
        assert_eq!(batch.targets, vec![6, 7, 8, 0, 2, 0, 0, 0]);
        assert_eq!(
            batch.mask,
            vec![false, true, true, false, true, false, false, false]
        );
        assert_eq!((batch.target_tokens, batch.samples), (3, 2));
    }

    #[test]
    fn order_is_a_seeded_permutation_grouped_by_length() {
        let lengths: Vec<usize> = (0..100).map(|i| (i * 37) % 91).collect();
        let e = epoch_batches(&lengths, 4, 7, 0);
        let mut all: Vec<usize> = e.concat();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(e, epoch_batches(&lengths, 4, 7, 0));
        assert_ne!(e, epoch_batches(&lengths, 4, 7, 1));
        // Within a batch lengths are sorted (descending): grouped by length.
        assert!(
            e.iter()
                .all(|b| b.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]))
        );
    }
}
