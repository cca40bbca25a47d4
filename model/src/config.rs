//! HF `config.json` for the `llama` and `qwen2` families, in both the older spelling
//! (`rope_theta`, `rope_scaling`, `torch_dtype`) and transformers 5's (`rope_parameters`,
//! `dtype`).

use crate::{BlockConfig, Error, Result};
use serde::Deserialize;
use std::path::Path;

/// Supported architectures (`model_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    /// q/k/v projections carry a bias (DeepSeek-R1-Distill-Qwen is qwen2).
    Qwen2,
}

/// Llama 3's frequency-dependent RoPE scaling (DeepSeek-R1-Distill-Llama uses it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// A validated model configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub tie_word_embeddings: bool,
    /// The checkpoint's storage dtype name (`bfloat16`, `float16`, `float32`), if stated.
    pub dtype: Option<String>,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    max_position_embeddings: Option<usize>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    use_sliding_window: Option<bool>,
}

#[derive(Deserialize)]
struct RawRope {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl ModelConfig {
    /// Reads and validates `path` (a `config.json`); errors name the file.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_owned(),
            error: e,
        })?;
        ModelConfig::from_json(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<ModelConfig> {
        let raw: Raw =
            serde_json::from_str(text).map_err(|e| Error::Config(format!("invalid JSON: {e}")))?;
        let need = |v: Option<usize>, name: &str| {
            v.ok_or_else(|| Error::Config(format!("missing `{name}`")))
        };
        let arch = match raw.model_type.as_deref() {
            Some("llama") => Arch::Llama,
            Some("qwen2") => Arch::Qwen2,
            Some(other) => {
                return Err(Error::Config(format!(
                    "model_type `{other}` is not supported (supported: llama, qwen2)"
                )));
            }
            None => {
                return Err(Error::Config(
                    "missing `model_type` (supported: llama, qwen2)".into(),
                ));
            }
        };
        if raw.mlp_bias == Some(true) {
            return Err(Error::Config("`mlp_bias: true` is not supported".into()));
        }
        if arch == Arch::Llama && raw.attention_bias == Some(true) {
            return Err(Error::Config(
                "llama with `attention_bias: true` is not supported".into(),
            ));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(Error::Config(
                "`use_sliding_window: true` is not supported".into(),
            ));
        }
        let hidden = need(raw.hidden_size, "hidden_size")?;
        let heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        let head_dim = raw.head_dim.unwrap_or(hidden / heads.max(1));
        // The rope block: transformers 5 writes `rope_parameters`, older files `rope_scaling`
        // next to a top-level `rope_theta`.
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = raw
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(10_000.0);
        let rope_scaling = match rope.and_then(|r| r.rope_type.as_deref().or(r.kind.as_deref())) {
            None | Some("default") => None,
            Some("llama3") => {
                // cannot fail: this arm is reached only when `rope` named a type.
                let r = rope.expect("matched above");
                let get = |v: Option<f64>, name: &str| {
                    v.ok_or_else(|| {
                        Error::Config(format!("llama3 rope scaling is missing `{name}`"))
                    })
                };
                Some(Llama3Scaling {
                    factor: get(r.factor, "factor")?,
                    low_freq_factor: get(r.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: get(r.high_freq_factor, "high_freq_factor")?,
                    original_max_position_embeddings: get(
                        r.original_max_position_embeddings,
                        "original_max_position_embeddings",
                    )?,
                })
            }
            Some(other) => {
                return Err(Error::Config(format!(
                    "rope scaling `{other}` is not supported (supported: default, llama3)"
                )));
            }
        };
        let cfg = ModelConfig {
            arch,
            hidden,
            ffn: need(raw.intermediate_size, "intermediate_size")?,
            layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            vocab: need(raw.vocab_size, "vocab_size")?,
            rms_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            dtype: raw.dtype.or(raw.torch_dtype),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            bos_token_id: raw.bos_token_id,
            eos_token_ids: match raw.eos_token_id {
                None => vec![],
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
            },
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Refuses sizes and constants no model can run with (a zero-layer model would index its
    /// first block; a zero or non-finite epsilon divides by zero in every norm).
    fn check(&self) -> Result<()> {
        for (name, v) in [
            ("hidden_size", self.hidden),
            ("intermediate_size", self.ffn),
            ("num_hidden_layers", self.layers),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("{name} must be at least 1 (got 0)")));
            }
        }
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "{name} must be a positive finite number (got {v})"
                )))
            }
        };
        positive("rms_norm_eps", self.rms_eps)?;
        positive("rope_theta", self.rope_theta)?;
        if let Some(s) = self.rope_scaling {
            positive("rope_scaling.factor", s.factor)?;
            positive("rope_scaling.low_freq_factor", s.low_freq_factor)?;
            positive("rope_scaling.high_freq_factor", s.high_freq_factor)?;
            positive(
                "rope_scaling.original_max_position_embeddings",
                s.original_max_position_embeddings,
            )?;
            if s.high_freq_factor <= s.low_freq_factor {
                return Err(Error::Config(format!(
                    "rope_scaling.high_freq_factor ({}) must exceed low_freq_factor ({})",
                    s.high_freq_factor, s.low_freq_factor
                )));
            }
        }
        self.block().check()
    }

    /// The per-layer sizes.
    pub fn block(&self) -> BlockConfig {
        BlockConfig {
            hidden: self.hidden,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            ffn: self.ffn,
            rms_eps: self.rms_eps,
            qkv_bias: self.arch == Arch::Qwen2,
        }
    }

    /// RoPE inverse frequencies (`head_dim / 2`), with llama3 scaling applied when configured.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let base = (0..d / 2).map(|i| self.rope_theta.powf(-(2.0 * i as f64) / d as f64));
        let Some(s) = self.rope_scaling else {
            return base.collect();
        };
        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
        base.map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = r#"{"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 100, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": true, "torch_dtype": "bfloat16", "eos_token_id": [5, 7]}"#;

    #[test]
    fn both_spellings_give_the_same_config() {
        let new = OLD
            .replace(
                r#""rope_theta": 1000000.0,"#,
                r#""rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},"#,
            )
            .replace("torch_dtype", "dtype");
        let (a, b) = (
            ModelConfig::from_json(OLD).unwrap(),
            ModelConfig::from_json(&new).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(
            (a.arch, a.head_dim, a.rope_theta, a.eos_token_ids.clone()),
            (Arch::Qwen2, 16, 1e6, vec![5, 7])
        );
        assert!(a.block().qkv_bias && a.tie_word_embeddings);
        assert_eq!(a.dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn explicit_head_dim_and_llama3_scaling() {
        let text = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 48, "vocab_size": 10,
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;
        let c = ModelConfig::from_json(text).unwrap();
        assert_eq!(c.head_dim, 48);
        let f = c.inv_freq();
        // Highest frequency (wavelength 2π < 2048) is kept; the lowest is divided by 8.
        assert_eq!(f[0], 1.0);
        let plain = 500000f64.powf(-46.0 / 48.0);
        assert!(
            (f[23] - plain / 8.0).abs() < 1e-18,
            "{} vs {}",
            f[23],
            plain / 8.0
        );
    }

    #[test]
    fn unsupported_or_incomplete_configs_say_what_is_supported() {
        let e = ModelConfig::from_json(&OLD.replace("qwen2", "mistral"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mistral") && e.contains("llama, qwen2"), "{e}");
        let e = ModelConfig::from_json(&OLD.replace(r#""hidden_size": 64,"#, ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let e = ModelConfig::from_json(
            &OLD.replace(r#""num_key_value_heads": 2"#, r#""num_key_value_heads": 3"#),
        )
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
        assert!(
            ModelConfig::from_json("{not json")
                .unwrap_err()
                .to_string()
                .contains("invalid JSON")
        );
    }
}
