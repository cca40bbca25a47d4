//! Text generation with a KV cache: greedy, or temperature with top-p (nucleus) sampling.

use crate::block::KvCache;
use crate::{Result, Transformer};
use bft_engine::{Device, Tensor};
use rand::{Rng, SeedableRng};

/// How the next token is chosen.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f64,
    /// Sample only from the smallest set of tokens whose probabilities sum to at least this.
    pub top_p: f64,
    pub seed: u64,
    pub max_new_tokens: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 256,
        }
    }
}

/// Continues `prompt` until a token in `stop_ids`, `max_new_tokens`, or `on_token` returning
/// false (it sees every new token, e.g. to print it or to check stop strings). Returns the new
/// tokens, without the stop token.
pub fn generate(
    model: &Transformer,
    prompt: &[u32],
    stop_ids: &[u32],
    sampling: Sampling,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(sampling.seed);
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    while out.len() < sampling.max_new_tokens && !input.is_empty() {
        let ids = Tensor::from_vec(input.clone(), [1, input.len()], &Device::Cpu)?;
        let h = model.hidden_cached(&ids, &mut cache)?;
        let c = model.config.hidden;
        // Only the last position's logits are needed: (1, C) . (V, C)^T
        let last = h.narrow(1, input.len() - 1, 1)?.reshape([1, c])?;
        let logits = last.matmul_t(model.head(), false, true)?.to_f64_vec()?;
        let next = pick(&logits, sampling, &mut rng);
        if stop_ids.contains(&next) {
            break;
        }
        out.push(next);
        if !on_token(next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}

/// Greedy continuations of several prompts at once (one batched forward per token, sharing
/// the weight reads), each stopped at a token in `stop_ids` or after `max_new_tokens`; the
/// batch ends when every row has stopped. Prompts of different lengths are left-padded and the
/// padding masked out of attention (sort prompts by length to keep it small). Returns each
/// row's new tokens without the stop token: the same tokens `generate` gives one prompt at a
/// time, up to the rounding differences of batched GEMMs.
pub fn generate_batch(
    model: &Transformer,
    prompts: &[Vec<u32>],
    stop_ids: &[u32],
    max_new_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    generate_batch_until(model, prompts, stop_ids, max_new_tokens, |_, _| false)
}

/// `generate_batch`, where a row also stops once `row_done(row, tokens so far)` holds (e.g. a
/// caller that reads only the first line of each reply).
pub fn generate_batch_until(
    model: &Transformer,
    prompts: &[Vec<u32>],
    stop_ids: &[u32],
    max_new_tokens: usize,
    mut row_done: impl FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    let Some(t) = prompts.iter().map(Vec::len).max() else {
        return Ok(Vec::new());
    };
    if prompts.iter().any(Vec::is_empty) {
        return Err(crate::Error::Config(
            "generate_batch needs non-empty prompts".into(),
        ));
    }
    let pad: Vec<usize> = prompts.iter().map(|p| t - p.len()).collect();
    let padded = pad.iter().any(|&p| p > 0);
    let c = model.config.hidden;
    // The last position of each row: (B, C) . (V, C)^T -> (B, V)
    let last_logits = |h: &Tensor, rows: usize, width: usize| -> Result<Vec<f64>> {
        let last = h.narrow(1, width - 1, 1)?.reshape([rows, c])?;
        Ok(last.matmul_t(model.head(), false, true)?.to_f64_vec()?)
    };
    // The prompts. Rows of different lengths run one by one through the fused causal attention
    // (the same work as a batch: prefill is bound by arithmetic, not weight reads) and their
    // caches are stacked with the padding on the left.
    let (mut cache, mut logits) = if padded {
        let mut caches = Vec::with_capacity(b);
        let mut logits = Vec::new();
        for (p, &n) in prompts.iter().zip(&pad) {
            let mut one = model.new_cache();
            let ids = Tensor::from_vec(p.clone(), [1, p.len()], &Device::Cpu)?;
            // At the positions the row has behind its padding, as decoding will continue it.
            let h = model.hidden_cached_at(&ids, &mut one, n)?;
            logits.extend(last_logits(&h, 1, p.len())?);
            caches.push(one);
        }
        let stacked = (0..model.new_cache().len())
            .map(|l| KvCache::stack_left_padded(caches.iter().map(|c| &c[l]), &pad))
            .collect::<Result<Vec<_>>>()?;
        (stacked, logits)
    } else {
        let mut cache = model.new_cache();
        let ids = Tensor::from_vec(prompts.concat(), [b, t], &Device::Cpu)?;
        let h = model.hidden_cached(&ids, &mut cache)?;
        let logits = last_logits(&h, b, t)?;
        (cache, logits)
    };
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for step in 0..max_new_tokens {
        let v = logits.len() / b;
        let mut input = Vec::with_capacity(b);
        for (r, row) in logits.chunks(v).enumerate() {
            let next = greedy(row);
            if !done[r] {
                if stop_ids.contains(&next) {
                    done[r] = true;
                } else {
                    out[r].push(next);
                    done[r] = row_done(r, &out[r]);
                }
            }
            input.push(next);
        }
        if done.iter().all(|&d| d) || step + 1 == max_new_tokens {
            break;
        }
        let ids = Tensor::from_vec(input, [b, 1], &Device::Cpu)?;
        let h = if padded {
            model.hidden_cached_padded(&ids, &mut cache, &pad)?
        } else {
            model.hidden_cached(&ids, &mut cache)?
        };
        logits = last_logits(&h, b, 1)?;
    }
    Ok(out)
}

/// The most likely token (the first on ties).
fn greedy(logits: &[f64]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold(0, |b, (i, &v)| if v > logits[b] { i } else { b }) as u32
}

fn pick(logits: &[f64], s: Sampling, rng: &mut impl Rng) -> u32 {
    let argmax = || greedy(logits);
    if s.temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i as u32, ((z - m) / s.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    // Keep the nucleus: the most likely tokens until their mass reaches top_p.
    let mut mass = 0.0;
    let keep = probs.iter().take_while(|p| {
        let before = mass;
        mass += p.1 / total;
        before < s.top_p
    });
    let kept: Vec<(u32, f64)> = keep.copied().collect();
    let kept_total: f64 = kept.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f64>() * kept_total;
    for (id, p) in &kept {
        r -= p;
        if r <= 0.0 {
            return *id;
        }
    }
    kept.last().map_or_else(argmax, |p| p.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of prompts gives each prompt's one-at-a-time greedy continuation, including
    /// rows that stop early while others go on.
    #[test]
    fn batched_greedy_equals_one_at_a_time() {
        let text = r#"{"model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 23, "tie_word_embeddings": true, "rope_theta": 10000.0}"#;
        let config = crate::ModelConfig::from_json(text).unwrap();
        let model = Transformer::random(config, 7, bft_engine::DType::F64).unwrap();
        let prompts = vec![vec![1, 5, 9], vec![2, 2, 3], vec![7, 0, 11], vec![4, 4, 4]];
        let sampling = Sampling {
            max_new_tokens: 12,
            ..Default::default()
        };
        let single: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| generate(&model, p, &[], sampling, |_| true).unwrap())
            .collect();
        // Stop on a token one row emits part-way, so rows end at different steps.
        let stop = single[0][4];
        let expect: Vec<Vec<u32>> = single
            .iter()
            .map(|s| s.iter().copied().take_while(|&x| x != stop).collect())
            .collect();
        let got = generate_batch(&model, &prompts, &[stop], 12).unwrap();
        assert_eq!(got, expect);
        assert!(generate_batch(&model, &[vec![1], vec![]], &[], 3).is_err());
    }

    /// Prompts of different lengths, left-padded and masked, continue exactly as they do one at
    /// a time (f64, so rounding cannot flip a greedy choice); `row_done` stops single rows.
    #[test]
    fn padded_batches_equal_one_at_a_time() {
        let text = r#"{"model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 23, "tie_word_embeddings": true, "rope_theta": 10000.0}"#;
        let config = crate::ModelConfig::from_json(text).unwrap();
        let model = Transformer::random(config, 7, bft_engine::DType::F64).unwrap();
        let prompts = vec![
            vec![1, 5, 9, 3, 3, 8],
            vec![2],
            vec![7, 0, 11],
            vec![4, 4, 4, 4, 1],
        ];
        let sampling = Sampling {
            max_new_tokens: 10,
            ..Default::default()
        };
        let single: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| generate(&model, p, &[], sampling, |_| true).unwrap())
            .collect();
        assert_eq!(generate_batch(&model, &prompts, &[], 10).unwrap(), single);
        // Greedy tokens of a tiny model can survive a wrong position; the logits cannot. Each
        // row's logits after its prompt and one more token equal the unpadded row's.
        let t = prompts.iter().map(Vec::len).max().unwrap();
        let pad: Vec<usize> = prompts.iter().map(|p| t - p.len()).collect();
        let caches: Vec<Vec<KvCache>> = prompts
            .iter()
            .zip(&pad)
            .map(|(p, &n)| {
                let mut c = model.new_cache();
                let ids = Tensor::from_vec(p.clone(), [1, p.len()], &Device::Cpu).unwrap();
                model.hidden_cached_at(&ids, &mut c, n).unwrap();
                c
            })
            .collect();
        let mut stacked: Vec<KvCache> = (0..caches[0].len())
            .map(|l| KvCache::stack_left_padded(caches.iter().map(|c| &c[l]), &pad).unwrap())
            .collect();
        let next: Vec<u32> = single.iter().map(|s| s[0]).collect();
        let ids = Tensor::from_vec(next.clone(), [prompts.len(), 1], &Device::Cpu).unwrap();
        let batched = model
            .hidden_cached_padded(&ids, &mut stacked, &pad)
            .unwrap();
        let batched = batched.to_vec::<f64>().unwrap();
        let c = model.config.hidden;
        for (r, p) in prompts.iter().enumerate() {
            let mut whole = p.clone();
            whole.push(next[r]);
            let ids = Tensor::from_vec(whole.clone(), [1, whole.len()], &Device::Cpu).unwrap();
            let h = model.hidden(&ids).unwrap().to_vec::<f64>().unwrap();
            let alone = &h[(whole.len() - 1) * c..];
            for (a, b) in batched[r * c..(r + 1) * c].iter().zip(alone) {
                assert!((a - b).abs() < 1e-10, "row {r}: {a} vs {b}");
            }
        }
        // Row 2 stops after 3 tokens; the others are unaffected.
        let got =
            generate_batch_until(&model, &prompts, &[], 10, |r, t| r == 2 && t.len() == 3).unwrap();
        assert_eq!(got[2], single[2][..3]);
        assert_eq!(
            (&got[0], &got[1], &got[3]),
            (&single[0], &single[1], &single[3])
        );
    }

    #[test]
    fn greedy_takes_the_max_and_top_p_keeps_the_nucleus() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let logits = [0.0, 3.0, 1.0, 2.9];
        assert_eq!(pick(&logits, Sampling::default(), &mut rng), 1);
        // With top_p tiny only the most likely token remains.
        let s = Sampling {
            temperature: 1.0,
            top_p: 1e-9,
            ..Default::default()
        };
        assert!((0..50).all(|_| pick(&logits, s, &mut rng) == 1));
        // With top_p = 1 and a high temperature every token appears.
        let s = Sampling {
            temperature: 100.0,
            top_p: 1.0,
            ..Default::default()
        };
        let mut seen = [false; 4];
        (0..200).for_each(|_| seen[pick(&logits, s, &mut rng) as usize] = true);
        assert!(seen.iter().all(|&x| x));
    }
}
