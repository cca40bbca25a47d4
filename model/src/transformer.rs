//! The decoder-only model: token embeddings, `layers` decoder blocks, a final RMSNorm and the
//! LM head (the embedding matrix itself when `tie_word_embeddings`).

use crate::block::KvCache;
use crate::weights::WeightSource;
use crate::{Block, Error, ModelConfig, Result};
use bft_engine::ops::{CheckpointFn, rope_tables_from};
use bft_engine::{DType, Device, Tensor};
use std::sync::Arc;

/// A Llama/Qwen2 model's weights and the forward pass over them.
#[derive(Clone, Debug)]
pub struct Transformer {
    pub config: ModelConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    /// `None` when tied to `embed`.
    lm_head: Option<Tensor>,
    /// Recompute each layer in the backward pass of `hidden_train` instead of keeping its
    /// activations.
    pub checkpointing: bool,
}

impl Transformer {
    /// Reads every tensor the config calls for from `source`, checks its shape, and converts it
    /// to `dtype` (f32 for training on CPU).
    pub fn load(
        source: &dyn WeightSource,
        config: ModelConfig,
        dtype: DType,
    ) -> Result<Transformer> {
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            Ok(crate::weights::checked_tensor(source, name, shape)?.to_dtype(dtype)?)
        };
        let (v, c) = (config.vocab, config.hidden);
        let embed = get("model.embed_tokens.weight", &[v, c])?;
        let blocks = (0..config.layers)
            .map(|i| {
                let tensors = config
                    .block()
                    .tensor_shapes()
                    .iter()
                    .map(|(name, shape)| get(&format!("model.layers.{i}.{name}"), shape))
                    .collect::<Result<Vec<_>>>()?;
                Block::from_tensors(config.block(), tensors)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = get("model.norm.weight", &[c])?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(get("lm_head.weight", &[v, c])?)
        };
        Ok(Transformer {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            checkpointing: false,
        })
    }

    /// Random weights (normal, std 0.2; norms near 1), for tests and benchmarks.
    pub fn random(config: ModelConfig, seed: u64, dtype: DType) -> Result<Transformer> {
        let dev = Device::Cpu;
        let (v, c) = (config.vocab, config.hidden);
        let blocks = (0..config.layers)
            .map(|i| {
                Block::random(
                    config.block(),
                    seed.wrapping_add(1000 * (i as u64 + 1)),
                    dtype,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = Tensor::randn([c], 0.1, seed + 1, dtype, &dev)?.add(&Tensor::ones(
            [c],
            dtype,
            &dev,
        )?)?;
        let lm_head = (!config.tie_word_embeddings)
            .then(|| Tensor::randn([v, c], 0.2, seed + 2, dtype, &dev))
            .transpose()?;
        Ok(Transformer {
            embed: Tensor::randn([v, c], 0.5, seed, dtype, &dev)?,
            blocks,
            norm,
            lm_head,
            checkpointing: false,
            config,
        })
    }

    /// Every tensor under its HF name, in a fixed order (for saving and for LoRA targeting).
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (i, b) in self.blocks.iter().enumerate() {
            for ((name, _), t) in self.config.block().tensor_shapes().iter().zip(b.tensors()) {
                v.push((format!("model.layers.{i}.{name}"), t));
            }
        }
        v.push(("model.norm.weight".to_string(), &self.norm));
        if let Some(h) = &self.lm_head {
            v.push(("lm_head.weight".to_string(), h));
        }
        v
    }

    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    pub fn blocks_mut(&mut self) -> &mut [Block] {
        &mut self.blocks
    }

    /// The `(V, C)` LM head: `lm_head.weight`, or the embedding matrix when tied.
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Final hidden states `(B, T, C)` (after the last norm) for token ids `(B, T)` at
    /// positions `0..T`.
    pub fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        self.hidden_impl(ids, None, None, None)
    }

    /// Hidden states in training mode: LoRA dropout drawn from `dropout_seed`, and each layer
    /// checkpointed when `checkpointing` is set (gradients are identical either way).
    pub fn hidden_train(&self, ids: &Tensor, dropout_seed: u64) -> Result<Tensor> {
        let t = self.check_ids(ids)?;
        let (cos, sin) = self.rope(t, 0)?;
        let mut x = self.embed_tokens(ids)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let seed =
                dropout_seed.wrapping_add((i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
            x = if self.checkpointing {
                let (b, cos, sin) = (block.clone(), cos.clone(), sin.clone());
                let f: CheckpointFn = Arc::new(move |xs: &[Tensor]| {
                    b.with_params(&xs[1..])
                        .forward_train(&xs[0], &cos, &sin, seed)
                        .map_err(|e| match e {
                            Error::Engine(e) => e,
                            other => bft_engine::Error::Backward(other.to_string()),
                        })
                });
                let mut inputs = vec![x];
                inputs.extend(block.params());
                Tensor::checkpoint(&inputs, f)?
            } else {
                block.forward_train(&x, &cos, &sin, seed)?
            };
        }
        Ok(x.rms_norm(&self.norm, self.config.rms_eps)?)
    }

    /// Every base weight, mutable, in `named_tensors` order: what full-parameter training
    /// tracks and updates.
    pub fn params_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = vec![&mut self.embed];
        for b in &mut self.blocks {
            v.extend(b.tensors_mut().iter_mut());
        }
        v.push(&mut self.norm);
        if let Some(h) = &mut self.lm_head {
            v.push(h);
        }
        v
    }

    fn check_ids(&self, ids: &Tensor) -> Result<usize> {
        let [_, t] = *ids.dims() else {
            return Err(Error::Config(format!(
                "token ids must be (B, T), got {:?}",
                ids.dims()
            )));
        };
        if ids.dtype() != DType::U32 {
            return Err(Error::Config(format!(
                "token ids must be u32, got {:?}",
                ids.dtype()
            )));
        }
        Ok(t)
    }

    /// The type of the activations: the weights' type, except that 16-bit weights run under
    /// autocast: f32 activations, and every product with a 16-bit weight rounds its f32
    /// operand once and returns f32 (the engine's promotion rule), so norms, residuals,
    /// attention and the loss all see f32.
    pub fn activation_dtype(&self) -> DType {
        match self.embed.dtype() {
            d if d.is_half() => DType::F32,
            d => d,
        }
    }

    /// The embedding rows of `ids`, in the activation type (a 16-bit table's rows widened,
    /// the table itself never).
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embed.embedding(ids)?;
        if x.dtype() == self.activation_dtype() {
            return Ok(x);
        }
        Ok(x.to_dtype(self.activation_dtype())?)
    }

    /// RoPE tables for positions `offset..offset + t`, on the model's device.
    fn rope(&self, t: usize, offset: usize) -> Result<(Tensor, Tensor)> {
        let dtype = self.activation_dtype();
        let (cos, sin) = rope_tables_from(&self.config.inv_freq(), t, offset, dtype)?;
        let dev = self.embed.device();
        Ok((cos.to_device(&dev)?, sin.to_device(&dev)?))
    }

    /// This model with every weight (and adapter) copied to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Transformer> {
        let mv = |t: &Tensor| t.to_device(device);
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                let params = b.params().iter().map(mv).collect::<Result<Vec<_>, _>>()?;
                Ok(b.with_params(&params))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer {
            config: self.config.clone(),
            embed: mv(&self.embed)?,
            blocks,
            norm: mv(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(mv).transpose()?,
            checkpointing: self.checkpointing,
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.embed.device()
    }

    /// One empty KV cache per layer, for `hidden_cached`.
    pub fn new_cache(&self) -> Vec<KvCache> {
        vec![KvCache::default(); self.blocks.len()]
    }

    /// Hidden states for `ids (B, T)` continuing the positions held in `cache` (one per layer),
    /// which then grows by T: incremental decoding.
    pub fn hidden_cached(&self, ids: &Tensor, cache: &mut [KvCache]) -> Result<Tensor> {
        self.check_cache(cache)?;
        self.hidden_impl(ids, Some(cache), None, None)
    }

    /// `hidden_cached` whose first position is `first_position` instead of the cache's
    /// length: a row prefilled alone whose cache will be stacked behind `first_position`
    /// positions of left padding (RoPE angles then match the padded batch's).
    pub fn hidden_cached_at(
        &self,
        ids: &Tensor,
        cache: &mut [KvCache],
        first_position: usize,
    ) -> Result<Tensor> {
        self.check_cache(cache)?;
        self.hidden_impl(ids, Some(cache), None, Some(first_position))
    }

    /// `hidden_cached` for left-padded rows: row `b`'s first `pad[b]` positions (counted from
    /// the start of the cache) are padding that no position attends to. The hidden states of
    /// the real positions are those of the unpadded row, up to rounding.
    pub fn hidden_cached_padded(
        &self,
        ids: &Tensor,
        cache: &mut [KvCache],
        pad: &[usize],
    ) -> Result<Tensor> {
        self.check_cache(cache)?;
        self.hidden_impl(ids, Some(cache), Some(pad), None)
    }

    /// A KV cache must hold one layer cache per block.
    fn check_cache(&self, cache: &[KvCache]) -> Result<()> {
        if cache.len() != self.blocks.len() {
            return Err(Error::Config(format!(
                "{} caches for {} layers",
                cache.len(),
                self.blocks.len()
            )));
        }
        Ok(())
    }

    fn hidden_impl(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut [KvCache]>,
        pad: Option<&[usize]>,
        first_position: Option<usize>,
    ) -> Result<Tensor> {
        let t = self.check_ids(ids)?;
        let offset = first_position.unwrap_or_else(|| cache.as_ref().map_or(0, |c| c[0].len()));
        let (cos, sin) = self.rope(t, offset)?;
        let mut x = self.embed_tokens(ids)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let c = cache.as_deref_mut().map(|c| &mut c[i]);
            x = block.forward_cached(&x, &cos, &sin, c, pad)?;
        }
        Ok(x.rms_norm(&self.norm, self.config.rms_eps)?)
    }

    /// Logits `(B, T, V)`: materialises the full vocabulary (for evaluation and parity tests;
    /// training goes through the fused loss on `hidden` instead).
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.hidden(ids)?.matmul_t(self.head(), false, true)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{SafetensorsDir, write_safetensors};

    fn config(tied: bool) -> ModelConfig {
        let text = format!(
            r#"{{"model_type": "qwen2", "hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 2,
               "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 31,
               "tie_word_embeddings": {tied}, "rope_theta": 10000.0}}"#
        );
        ModelConfig::from_json(&text).unwrap()
    }

    fn refs(p: &[(String, Tensor)]) -> Vec<(String, &Tensor)> {
        p.iter().map(|(n, t)| (n.clone(), t)).collect()
    }

    fn open_err(dir: &std::path::Path) -> String {
        match SafetensorsDir::open(dir) {
            Ok(_) => panic!("{} must not open", dir.display()),
            Err(e) => e.to_string(),
        }
    }

    fn ids() -> Tensor {
        Tensor::from_vec(
            (0..10u32).map(|i| i * 3 % 31).collect(),
            [2, 5],
            &Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn save_load_round_trip_tied_and_untied_single_and_sharded() {
        for tied in [true, false] {
            let m = Transformer::random(config(tied), 3, DType::F32).unwrap();
            let want = m.logits(&ids()).unwrap().to_vec::<f32>().unwrap();
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().to_path_buf();
            // Single file.
            write_safetensors(&dir.join("model.safetensors"), &m.named_tensors()).unwrap();
            let loaded = Transformer::load(
                &SafetensorsDir::open(&dir).unwrap(),
                config(tied),
                DType::F32,
            )
            .unwrap();
            assert_eq!(
                loaded.logits(&ids()).unwrap().to_vec::<f32>().unwrap(),
                want
            );
            // Two shards plus an index, stored in bf16 (loaded back to f32).
            std::fs::remove_file(dir.join("model.safetensors")).unwrap();
            let named = m.named_tensors();
            let half: Vec<(String, Tensor)> = named
                .iter()
                .map(|(n, t)| (n.clone(), t.to_dtype(DType::BF16).unwrap()))
                .collect();
            let (a, b) = half.split_at(half.len() / 2);
            write_safetensors(&dir.join("s1.safetensors"), &refs(a)).unwrap();
            write_safetensors(&dir.join("s2.safetensors"), &refs(b)).unwrap();
            let map: Vec<String> = a
                .iter()
                .map(|(n, _)| format!("\"{n}\": \"s1.safetensors\""))
                .chain(
                    b.iter()
                        .map(|(n, _)| format!("\"{n}\": \"s2.safetensors\"")),
                )
                .collect();
            std::fs::write(
                dir.join("model.safetensors.index.json"),
                format!("{{\"weight_map\": {{{}}}}}", map.join(",")),
            )
            .unwrap();
            let sharded = Transformer::load(
                &SafetensorsDir::open(&dir).unwrap(),
                config(tied),
                DType::F32,
            )
            .unwrap();
            let got = sharded.logits(&ids()).unwrap().to_vec::<f32>().unwrap();
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(err < 0.2, "bf16 round trip drifted by {err}");
        }
    }

    #[test]
    fn cached_decoding_equals_the_full_forward() {
        let m = Transformer::random(config(false), 5, DType::F64).unwrap();
        let full = m.hidden(&ids()).unwrap();
        let mut cache = m.new_cache();
        let first = m
            .hidden_cached(&ids().narrow(1, 0, 3).unwrap(), &mut cache)
            .unwrap();
        let rest: Vec<Tensor> = (3..5)
            .map(|p| {
                m.hidden_cached(&ids().narrow(1, p, 1).unwrap(), &mut cache)
                    .unwrap()
            })
            .collect();
        let inc = Tensor::cat(&[first, rest[0].clone(), rest[1].clone()], 1).unwrap();
        let (a, b) = (full.to_vec::<f64>().unwrap(), inc.to_vec::<f64>().unwrap());
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-12));
        assert_eq!(cache[0].len(), 5);
    }

    #[test]
    fn checkpointing_gives_identical_gradients_with_lora_dropout() {
        use crate::LoraConfig;
        let mut m = Transformer::random(config(false), 6, DType::F64).unwrap();
        let lora = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.3,
            targets: LoraConfig::parse_targets("all").unwrap(),
        };
        m.attach_lora(&lora, 1).unwrap();
        for (i, t) in m.lora_tensors_mut().into_iter().enumerate() {
            *t = t
                .add(
                    &Tensor::randn(t.dims().to_vec(), 0.2, i as u64, DType::F64, &Device::Cpu)
                        .unwrap(),
                )
                .unwrap();
        }
        let run = |m: &mut Transformer, checkpointing: bool, seed: u64| {
            m.checkpointing = checkpointing;
            let tape = bft_engine::Tape::new();
            for t in m.lora_tensors_mut() {
                *t = tape.track(t);
            }
            let h = m.hidden_train(&ids(), seed).unwrap();
            let loss = h.mul(&h).unwrap().sum_all().unwrap();
            let g = tape.backward(&loss).unwrap();
            let grads: Vec<Vec<f64>> = m
                .lora_tensors()
                .iter()
                .map(|(_, t)| g.get(t).unwrap().to_vec::<f64>().unwrap())
                .collect();
            for t in m.lora_tensors_mut() {
                *t = t.stop_gradient();
            }
            (loss.to_scalar().unwrap(), grads)
        };
        let plain = run(&mut m, false, 7);
        let recomputed = run(&mut m, true, 7);
        assert_eq!(
            plain, recomputed,
            "checkpointing must not change the gradients"
        );
        // Dropout is live: another seed gives another loss, and training mode differs from eval.
        assert_ne!(run(&mut m, false, 8).0, plain.0);
        let eval = m.hidden(&ids()).unwrap();
        assert_ne!(
            eval.mul(&eval)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap(),
            plain.0
        );
        assert_eq!(m.params_mut().len(), m.named_tensors().len());
    }

    #[test]
    fn truncated_missing_and_misshapen_weights_are_errors_naming_file_and_tensor() {
        let m = Transformer::random(config(true), 3, DType::F32).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let path = dir.join("model.safetensors");
        write_safetensors(&path, &m.named_tensors()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = open_err(&dir);
        assert!(
            e.contains("model.safetensors") && e.contains("not a valid safetensors file"),
            "{e}"
        );
        std::fs::write(&path, b"garbage").unwrap();
        assert!(SafetensorsDir::open(&dir).is_err());
        // A tensor missing, and one with the wrong shape.
        let mut named = m.named_tensors();
        named.retain(|(n, _)| n != "model.norm.weight");
        write_safetensors(&path, &named).unwrap();
        let e = Transformer::load(
            &SafetensorsDir::open(&dir).unwrap(),
            config(true),
            DType::F32,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("missing tensor model.norm.weight") && e.contains("model.safetensors"),
            "{e}"
        );
        let wrong = Tensor::zeros([3], DType::F32, &Device::Cpu).unwrap();
        let mut named = m.named_tensors();
        named
            .iter_mut()
            .find(|(n, _)| n == "model.norm.weight")
            .unwrap()
            .1 = &wrong;
        write_safetensors(&path, &named).unwrap();
        let e = Transformer::load(
            &SafetensorsDir::open(&dir).unwrap(),
            config(true),
            DType::F32,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("model.norm.weight") && e.contains("[12]") && e.contains("[3]"),
            "{e}"
        );
        // A directory that is gone.
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(open_err(&dir).contains("no model.safetensors"));
    }
}
