//! LoRA (DESIGN.md §4): low-rank adapters on chosen projections, B = 0 at init, scale
//! alpha / r, base frozen; saved and loaded in PEFT's format (`adapter_model.safetensors` +
//! `adapter_config.json`, PEFT's tensor names) so PEFT can load what `bft` trains.

use crate::block::{Linear, LoraPair};
use crate::weights::{SafetensorsDir, WeightSource, write_safetensors};
use crate::{Error, Result, Transformer};
use bft_engine::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::path::Path;

/// Which projections get adapters, and their rank and scale.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Stored in the adapter config (PEFT's `lora_dropout`).
    pub dropout: f64,
    pub targets: Vec<Linear>,
}

impl LoraConfig {
    /// Parses target lists such as `q,k,v,o,gate,up,down`, `q_proj,v_proj` or `all`.
    pub fn parse_targets(spec: &str) -> Result<Vec<Linear>> {
        if spec.trim() == "all" {
            return Ok(Linear::ALL.to_vec());
        }
        let mut out = Vec::new();
        for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let base = name.strip_suffix("_proj").unwrap_or(name);
            let l = Linear::ALL
                .into_iter()
                .find(|l| l.module().strip_suffix("_proj") == Some(base))
                .ok_or_else(|| {
                    Error::Config(format!(
                        "unknown LoRA target `{name}` (expected q, k, v, o, gate, up, down or all)"
                    ))
                })?;
            if !out.contains(&l) {
                out.push(l);
            }
        }
        if out.is_empty() {
            return Err(Error::Config("no LoRA target modules given".into()));
        }
        out.sort();
        Ok(out)
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    fn check(&self) -> Result<()> {
        if self.rank == 0 || !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Config(format!(
                "LoRA needs rank >= 1 and 0 <= dropout < 1 (got r={}, dropout={})",
                self.rank, self.dropout
            )));
        }
        Ok(())
    }
}

/// PEFT's name for a LoRA factor: `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`.
fn peft_name(layer: usize, l: Linear, factor: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{factor}.weight",
        l.path()
    )
}

/// Adapters keep f32 master weights over 16-bit base weights (mixed precision: the frozen model
/// is stored in 16 bits, the trained parameters and their optimizer state are not); over f32 or
/// f64 bases they take the base's type.
fn adapter_dtype(base: DType) -> DType {
    if base.is_half() { DType::F32 } else { base }
}

impl Transformer {
    /// Attaches fresh adapters as PEFT initialises them: A Kaiming-uniform (bound
    /// `1/sqrt(in)`), B zero, so the model's output is unchanged until training moves B.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        cfg.check()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dtype = adapter_dtype(self.head().dtype());
        for block in self.blocks_mut() {
            for &l in &cfg.targets {
                let w = block.tensors()[weight_of(l)].dims().to_vec();
                let bound = 1.0 / (w[1] as f64).sqrt();
                let a: Vec<f64> = (0..cfg.rank * w[1])
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                // Adapters live where their base weight does.
                let dev = block.tensors()[weight_of(l)].device();
                let a = Tensor::from_vec(a, [cfg.rank, w[1]], &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(&dev)?;
                let b = Tensor::zeros([w[0], cfg.rank], dtype, &dev)?;
                block.set_lora(
                    l,
                    Some(LoraPair {
                        a,
                        b,
                        scale: cfg.scale(),
                        dropout: cfg.dropout,
                    }),
                )?;
            }
        }
        Ok(())
    }

    /// Every adapter factor under its PEFT name, in a fixed order.
    pub fn lora_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut v = Vec::new();
        for (i, block) in self.blocks().iter().enumerate() {
            for l in Linear::ALL {
                if let Some(p) = block.lora(l) {
                    v.push((peft_name(i, l, 'A'), &p.a));
                    v.push((peft_name(i, l, 'B'), &p.b));
                }
            }
        }
        v
    }

    /// Mutable adapter factors in `lora_tensors` order: what the optimizer updates and what a
    /// training step tracks on its tape.
    pub fn lora_tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = Vec::new();
        for p in self
            .blocks_mut()
            .iter_mut()
            .flat_map(|b| b.lora_pairs_mut())
        {
            v.push(&mut p.a);
            v.push(&mut p.b);
        }
        v
    }

    /// Folds all adapters into the base weights (`bft merge`).
    pub fn merge_lora(&mut self) -> Result<()> {
        self.blocks_mut()
            .iter_mut()
            .try_for_each(|b| b.merge_lora())
    }

    /// Writes the adapters in PEFT's format into `dir`.
    pub fn save_peft(&self, cfg: &LoraConfig, base_model: &str, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.to_owned(),
            error: e,
        })?;
        let tensors: Vec<(String, Tensor)> = self
            .lora_tensors()
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        write_safetensors(&dir.join("adapter_model.safetensors"), &refs)?;
        let targets: Vec<&str> = cfg.targets.iter().map(|l| l.module()).collect();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": cfg.rank,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        });
        let p = dir.join("adapter_config.json");
        std::fs::write(&p, serde_json::to_string_pretty(&config).expect("JSON"))
            .map_err(|e| Error::Io { path: p, error: e })
    }

    /// Loads a PEFT LoRA adapter directory onto this model (replacing any adapters).
    pub fn load_peft(&mut self, dir: &Path) -> Result<LoraConfig> {
        let p = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::Io {
            path: p.clone(),
            error: e,
        })?;
        let bad = |m: String| Error::Config(format!("{}: {m}", p.display()));
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if v["peft_type"].as_str() != Some("LORA") {
            return Err(bad(format!(
                "peft_type {} is not supported (LORA only)",
                v["peft_type"]
            )));
        }
        for (key, ok) in [
            ("use_dora", false),
            ("use_rslora", false),
            ("fan_in_fan_out", false),
        ] {
            if v[key].as_bool().unwrap_or(false) != ok {
                return Err(bad(format!("`{key}: true` is not supported")));
            }
        }
        let targets = match &v["target_modules"] {
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(","),
            serde_json::Value::String(s) => s.clone(),
            other => return Err(bad(format!("target_modules {other} is not supported"))),
        };
        let cfg = LoraConfig {
            rank: v["r"].as_u64().ok_or_else(|| bad("missing r".into()))? as usize,
            alpha: v["lora_alpha"]
                .as_f64()
                .ok_or_else(|| bad("missing lora_alpha".into()))?,
            dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
            targets: LoraConfig::parse_targets(&targets).map_err(|e| bad(e.to_string()))?,
        };
        cfg.check()?;
        let src = SafetensorsDir::open_file(&dir.join("adapter_model.safetensors"))?;
        let (dtype, dev) = (adapter_dtype(self.head().dtype()), self.head().device());
        let layers = self.blocks().len();
        for i in 0..layers {
            for &l in &cfg.targets {
                let get = |f: char| -> Result<Tensor> {
                    let name = peft_name(i, l, f);
                    let t = src.tensor(&name)?.ok_or_else(|| {
                        Error::Weights(format!("{}: missing {name}", src.describe()))
                    })?;
                    Ok(t.to_dtype(dtype)?.to_device(&dev)?)
                };
                let pair = LoraPair {
                    a: get('A')?,
                    b: get('B')?,
                    scale: cfg.scale(),
                    dropout: cfg.dropout,
                };
                self.blocks_mut()[i].set_lora(l, Some(pair))?;
            }
        }
        Ok(cfg)
    }
}

fn weight_of(l: Linear) -> usize {
    [1, 2, 3, 4, 6, 7, 8][l as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelConfig;

    fn model() -> Transformer {
        let cfg = ModelConfig::from_json(
            r#"{"model_type": "llama", "hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 2,
               "num_attention_heads": 6, "num_key_value_heads": 3, "vocab_size": 29}"#,
        )
        .unwrap();
        Transformer::random(cfg, 4, DType::F64).unwrap()
    }

    fn ids() -> Tensor {
        Tensor::from_vec(vec![1u32, 5, 9, 28, 3], [1, 5], &Device::Cpu).unwrap()
    }

    fn logits(m: &Transformer) -> Vec<f64> {
        m.logits(&ids()).unwrap().to_vec::<f64>().unwrap()
    }

    /// Over a bf16 base the adapters keep f32 masters, the fresh adapter changes nothing, and a
    /// loss reaches the f32 masters with f32 gradients (mixed precision).
    #[test]
    fn adapters_over_a_16_bit_base_are_f32_masters() {
        let cfg = ModelConfig::from_json(
            r#"{"model_type": "llama", "hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 2,
               "num_attention_heads": 6, "num_key_value_heads": 3, "vocab_size": 29}"#,
        )
        .unwrap();
        let mut m = Transformer::random(cfg, 4, DType::BF16).unwrap();
        let base = m.logits(&ids()).unwrap().to_f64_vec().unwrap();
        let lora = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: LoraConfig::parse_targets("all").unwrap(),
        };
        m.attach_lora(&lora, 1).unwrap();
        assert!(
            m.lora_tensors()
                .iter()
                .all(|(_, t)| t.dtype() == DType::F32)
        );
        assert_eq!(m.logits(&ids()).unwrap().to_f64_vec().unwrap(), base);
        let tape = bft_engine::Tape::new();
        for t in m.lora_tensors_mut() {
            *t = tape.track(t);
        }
        let loss = m
            .logits(&ids())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = tape.backward(&loss).unwrap();
        let (_, a0) = &m.lora_tensors()[0];
        let g = grads.get(a0).expect("the first A gets a gradient");
        assert_eq!(g.dtype(), DType::F32);
    }

    #[test]
    fn fresh_adapter_is_a_no_op_and_merge_equals_the_adapter_path() {
        let mut m = model();
        let base = logits(&m);
        let cfg = LoraConfig {
            rank: 3,
            alpha: 6.0,
            dropout: 0.0,
            targets: LoraConfig::parse_targets("all").unwrap(),
        };
        m.attach_lora(&cfg, 1).unwrap();
        assert_eq!(logits(&m), base, "B = 0 at init");
        assert_eq!(m.lora_tensors().len(), 2 * 7 * 2);
        // Move B away from 0, then compare the low-rank path with merged weights.
        for (i, t) in m.lora_tensors_mut().into_iter().enumerate() {
            *t = t
                .add(
                    &Tensor::randn(t.dims().to_vec(), 0.3, i as u64, DType::F64, &Device::Cpu)
                        .unwrap(),
                )
                .unwrap();
        }
        let adapted = logits(&m);
        assert!(adapted.iter().zip(&base).any(|(a, b)| (a - b).abs() > 1e-3));
        m.merge_lora().unwrap();
        assert!(m.lora_tensors().is_empty());
        let merged = logits(&m);
        assert!(
            merged
                .iter()
                .zip(&adapted)
                .all(|(a, b)| (a - b).abs() < 1e-10)
        );
    }

    #[test]
    fn peft_round_trip_and_only_adapters_get_gradients() {
        let mut m = model();
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.05,
            targets: LoraConfig::parse_targets("q_proj,v,down").unwrap(),
        };
        m.attach_lora(&cfg, 2).unwrap();
        for t in m.lora_tensors_mut() {
            *t = t
                .add(&Tensor::full(0.1, t.dims().to_vec(), DType::F64, &Device::Cpu).unwrap())
                .unwrap();
        }
        let dir = std::env::temp_dir().join(format!("bft-peft-{}", std::process::id()));
        m.save_peft(&cfg, "tiny", &dir).unwrap();
        let mut fresh = model();
        let loaded = fresh.load_peft(&dir).unwrap();
        assert_eq!(loaded, cfg);
        // Adapters are stored in f32, as PEFT stores them; this test model computes in f64.
        assert!(
            logits(&fresh)
                .iter()
                .zip(&logits(&m))
                .all(|(a, b)| (a - b).abs() < 1e-6)
        );
        std::fs::remove_dir_all(&dir).unwrap();
        // A training step's view: adapters tracked, base frozen.
        let tape = bft_engine::Tape::new();
        for t in m.lora_tensors_mut() {
            *t = tape.track(t);
        }
        let loss = m.logits(&ids()).unwrap().sum_all().unwrap();
        let grads = tape.backward(&loss).unwrap();
        assert_eq!(grads.len(), m.lora_tensors().len());
        assert!(m.lora_tensors().iter().all(|(_, t)| grads.get(t).is_some()));
        assert!(
            LoraConfig::parse_targets("q,attn")
                .unwrap_err()
                .to_string()
                .contains("attn")
        );
    }
}
