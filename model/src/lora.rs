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
        if self.rank == 0
            || !(0.0..1.0).contains(&self.dropout)
            || !(self.alpha.is_finite() && self.alpha > 0.0)
        {
            return Err(Error::Config(format!(
                "LoRA needs rank >= 1, a positive finite alpha and 0 <= dropout < 1 (got r={}, \
                 alpha={}, dropout={})",
                self.rank, self.alpha, self.dropout
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
        // cannot fail: a `json!` value always serialises.
        std::fs::write(&p, serde_json::to_string_pretty(&config).expect("JSON"))
            .map_err(|e| Error::Io { path: p, error: e })
    }

    /// Loads a PEFT LoRA adapter directory onto this model (replacing any adapters).
    ///
    /// The config and the tensors must agree, as PEFT requires: exactly one A and one B per
    /// target module of every layer, no other tensors, A `(r, in)` and B `(out, r)` with the
    /// config's `r`, finite values, and no PEFT option that would change the adapter's math
    /// (per-module ranks or alphas, rsLoRA, DoRA, biases, layer subsets). Anything else is an
    /// error naming the file and the key or tensor, before the model is touched.
    pub fn load_peft(&mut self, dir: &Path) -> Result<LoraConfig> {
        let p = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::Io {
            path: p.clone(),
            error: e,
        })?;
        let cfg = parse_adapter_config(&text)
            .map_err(|e| Error::Config(format!("{}: {}", p.display(), message(e))))?;
        let file = dir.join("adapter_model.safetensors");
        let src = SafetensorsDir::open_file(&file)?;
        let bad = |m: String| Error::Weights(format!("{}: {m}", file.display()));
        let layers = self.blocks().len();
        let modules: Vec<(usize, Linear)> = (0..layers)
            .flat_map(|i| cfg.targets.iter().map(move |&l| (i, l)))
            .collect();
        let names: std::collections::HashSet<String> = modules
            .iter()
            .flat_map(|&(i, l)| [peft_name(i, l, 'A'), peft_name(i, l, 'B')])
            .collect();
        if let Some(extra) = src.names().into_iter().find(|n| !names.contains(*n)) {
            return Err(bad(format!(
                "holds tensor {extra}, which the config (r={}, target_modules {:?}) and this \
                 {layers}-layer model do not call for",
                cfg.rank,
                cfg.targets.iter().map(|l| l.module()).collect::<Vec<_>>()
            )));
        }
        let (dtype, dev) = (adapter_dtype(self.head().dtype()), self.head().device());
        let mut pairs = Vec::with_capacity(modules.len());
        for &(i, l) in &modules {
            let w = self.blocks()[i].tensors()[weight_of(l)].dims().to_vec();
            let get = |f: char, want: [usize; 2]| -> Result<Tensor> {
                let name = peft_name(i, l, f);
                let t = src
                    .tensor(&name)?
                    .ok_or_else(|| bad(format!("missing {name}")))?;
                if t.dims() != want {
                    return Err(bad(format!(
                        "{name} has shape {:?}, but r={} over this model's {} weight {:?} needs {want:?}",
                        t.dims(),
                        cfg.rank,
                        l.path(),
                        w
                    )));
                }
                if let Some((at, v)) = t.first_non_finite()? {
                    return Err(bad(format!("{name} holds {v} at flat index {at}")));
                }
                Ok(t.to_dtype(dtype)?.to_device(&dev)?)
            };
            let a = get('A', [cfg.rank, w[1]])?;
            let b = get('B', [w[0], cfg.rank])?;
            pairs.push((i, l, a, b));
        }
        for block in self.blocks_mut() {
            for l in Linear::ALL {
                block.set_lora(l, None)?;
            }
        }
        for (i, l, a, b) in pairs {
            let pair = LoraPair {
                a,
                b,
                scale: cfg.scale(),
                dropout: cfg.dropout,
            };
            self.blocks_mut()[i].set_lora(l, Some(pair))?;
        }
        Ok(cfg)
    }
}

/// The LoRA settings of an `adapter_config.json`, refusing what `bft` cannot apply exactly
/// (`Error::Config` saying which key and why).
pub fn parse_adapter_config(text: &str) -> Result<LoraConfig> {
    parse_config_value(text).map_err(Error::Config)
}

fn parse_config_value(text: &str) -> std::result::Result<LoraConfig, String> {
    use serde_json::Value;
    let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    if !v.is_object() {
        return Err("expected a JSON object".into());
    }
    if v["peft_type"].as_str() != Some("LORA") {
        return Err(format!(
            "peft_type {} is not supported (LORA only)",
            v["peft_type"]
        ));
    }
    for key in ["use_dora", "use_rslora", "fan_in_fan_out"] {
        match &v[key] {
            Value::Null | Value::Bool(false) => {}
            Value::Bool(true) => return Err(format!("`{key}: true` is not supported")),
            other => return Err(format!("`{key}` must be true or false, not {other}")),
        }
    }
    match &v["bias"] {
        Value::Null => {}
        Value::String(b) if b == "none" => {}
        other => return Err(format!("bias {other} is not supported (only \"none\")")),
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        match &v[key] {
            Value::Null => {}
            Value::Object(m) if m.is_empty() => {}
            other => {
                return Err(format!(
                    "`{key}` {other} sets per-module values, which are not supported"
                ));
            }
        }
    }
    for key in ["modules_to_save", "layers_to_transform", "layers_pattern"] {
        match &v[key] {
            Value::Null => {}
            Value::Array(a) if a.is_empty() => {}
            other => return Err(format!("`{key}` {other} is not supported")),
        }
    }
    let targets = match &v["target_modules"] {
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .ok_or_else(|| format!("target_modules holds {x}, not a module name"))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?
            .join(","),
        Value::String(s) => s.clone(),
        other => return Err(format!("target_modules {other} is not supported")),
    };
    let rank = match v["r"].as_u64() {
        Some(r) if r >= 1 => r as usize,
        _ => return Err(format!("`r` must be a positive integer, not {}", v["r"])),
    };
    let alpha = match v["lora_alpha"].as_f64() {
        Some(a) if a.is_finite() && a > 0.0 => a,
        _ => {
            return Err(format!(
                "`lora_alpha` must be a positive finite number, not {}",
                v["lora_alpha"]
            ));
        }
    };
    let dropout = match &v["lora_dropout"] {
        Value::Null => 0.0,
        d => match d.as_f64() {
            Some(x) if (0.0..1.0).contains(&x) => x,
            _ => return Err(format!("`lora_dropout` must lie in [0, 1), not {d}")),
        },
    };
    let cfg = LoraConfig {
        rank,
        alpha,
        dropout,
        targets: LoraConfig::parse_targets(&targets).map_err(message)?,
    };
    cfg.check().map_err(message)?;
    Ok(cfg)
}

/// The text of a config error, without the variant's `config:` prefix.
fn message(e: Error) -> String {
    match e {
        Error::Config(m) => m,
        other => other.to_string(),
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
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
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

    /// An adapter whose config disagrees with its tensors is refused with the file and the
    /// tensor or key named, and the model keeps the adapters it had (PEFT refuses these too).
    #[test]
    fn adapters_whose_config_disagrees_with_their_tensors_are_refused() {
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: LoraConfig::parse_targets("q,v").unwrap(),
        };
        let mut m = model();
        m.attach_lora(&cfg, 2).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let edit_config = |f: &dyn Fn(&mut serde_json::Value)| {
            m.save_peft(&cfg, "tiny", &dir).unwrap();
            let p = dir.join("adapter_config.json");
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            f(&mut v);
            std::fs::write(&p, v.to_string()).unwrap();
            let mut fresh = model();
            let err = fresh.load_peft(&dir).unwrap_err().to_string();
            assert!(fresh.lora_tensors().is_empty(), "{err}");
            err
        };
        type Edit<'a> = &'a dyn Fn(&mut serde_json::Value);
        let cases: Vec<(Edit, &str)> = vec![
            (&|v| v["r"] = 3.into(), "has shape [2, 12]"),
            (
                &|v| v["target_modules"] = serde_json::json!(["q_proj"]),
                "v_proj.lora_A",
            ),
            (
                &|v| v["target_modules"] = serde_json::json!(["q_proj", "v_proj", "k_proj"]),
                "missing",
            ),
            (
                &|v| v["lora_alpha"] = serde_json::json!("NaN"),
                "lora_alpha",
            ),
            (&|v| v["lora_alpha"] = 0.into(), "lora_alpha"),
            (&|v| v["r"] = 0.into(), "`r`"),
            (
                &|v| v["rank_pattern"] = serde_json::json!({"q_proj": 4}),
                "rank_pattern",
            ),
            (
                &|v| v["alpha_pattern"] = serde_json::json!({"q_proj": 4}),
                "alpha_pattern",
            ),
            (&|v| v["use_rslora"] = true.into(), "use_rslora"),
            (&|v| v["bias"] = "all".into(), "bias"),
            (
                &|v| v["layers_to_transform"] = serde_json::json!([0]),
                "layers_to_transform",
            ),
            (&|v| v["lora_dropout"] = 1.5.into(), "lora_dropout"),
        ];
        for (edit, want) in cases {
            let err = edit_config(edit);
            assert!(err.contains(want), "want {want:?} in: {err}");
            assert!(
                err.contains(&dir.display().to_string()),
                "names the file: {err}"
            );
        }
        // Tensors edited instead: a non-finite value, and a layer the model does not have.
        let st = dir.join("adapter_model.safetensors");
        let write = |extra: Option<(&str, Tensor)>, poison: bool| {
            m.save_peft(&cfg, "tiny", &dir).unwrap();
            let mut named: Vec<(String, Tensor)> = m
                .lora_tensors()
                .into_iter()
                .map(|(n, t)| (n, t.to_dtype(DType::F32).unwrap()))
                .collect();
            if poison {
                let (_, t) = &mut named[1];
                let mut v = t.to_vec::<f32>().unwrap();
                v[3] = f32::INFINITY;
                *t = Tensor::from_vec(v, t.dims().to_vec(), &Device::Cpu).unwrap();
            }
            if let Some((n, t)) = extra {
                named.push((n.to_string(), t));
            }
            let refs: Vec<(String, &Tensor)> = named.iter().map(|(n, t)| (n.clone(), t)).collect();
            write_safetensors(&st, &refs).unwrap();
            let mut fresh = model();
            let err = fresh.load_peft(&dir).unwrap_err().to_string();
            assert!(fresh.lora_tensors().is_empty());
            err
        };
        let err = write(None, true);
        assert!(
            err.contains("q_proj.lora_B.weight holds inf at flat index 3"),
            "{err}"
        );
        let extra = Tensor::zeros([2, 12], DType::F32, &Device::Cpu).unwrap();
        let err = write(Some((&peft_name(2, Linear::Q, 'A'), extra)), false);
        assert!(
            err.contains("layers.2.self_attn.q_proj.lora_A") && err.contains("2-layer"),
            "{err}"
        );
    }
}
