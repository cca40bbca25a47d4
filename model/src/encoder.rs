//! A BERT sentence encoder in the sentence-transformers layout (all-MiniLM-L6-v2 and its kin):
//! WordPiece through `tokenizers`, word + absolute position + token-type embeddings, post-norm
//! layers of bidirectional attention under a padding mask and a GELU MLP, then mean pooling over
//! the real tokens and (when the model lists a `Normalize` module) L2 normalisation.

use crate::weights::{SafetensorsDir, WeightSource};
use crate::{Error, Result};
use bft_engine::{DType, Device, Tensor};
use serde_json::Value;
use std::path::Path;
use tokenizers::Tokenizer;

/// What a BERT `config.json` says about the shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub eps: f64,
}

impl EncoderConfig {
    /// Parses a BERT `config.json`; refuses what this encoder does not implement (another
    /// activation, relative positions) rather than computing something else.
    pub fn from_json(text: &str) -> Result<EncoderConfig> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("encoder config.json: {e}")))?;
        let size = |k: &str| -> Result<usize> {
            match v.get(k).and_then(Value::as_u64) {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(Error::Config(format!(
                    "encoder config.json: `{k}` must be a positive integer"
                ))),
            }
        };
        let text_of = |k: &str, default: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string()
        };
        if text_of("model_type", "bert") != "bert" {
            return Err(Error::Config(format!(
                "encoder config.json: model_type `{}` is not bert",
                text_of("model_type", "")
            )));
        }
        if text_of("hidden_act", "gelu") != "gelu" {
            return Err(Error::Config(format!(
                "encoder config.json: hidden_act `{}` is not supported (only the exact `gelu`)",
                text_of("hidden_act", "")
            )));
        }
        if text_of("position_embedding_type", "absolute") != "absolute" {
            return Err(Error::Config(
                "encoder config.json: only absolute position embeddings are supported".into(),
            ));
        }
        let c = EncoderConfig {
            vocab: size("vocab_size")?,
            hidden: size("hidden_size")?,
            layers: size("num_hidden_layers")?,
            heads: size("num_attention_heads")?,
            intermediate: size("intermediate_size")?,
            max_positions: size("max_position_embeddings")?,
            type_vocab: size("type_vocab_size")?,
            eps: v
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-12),
        };
        if !c.hidden.is_multiple_of(c.heads) {
            return Err(Error::Config(format!(
                "encoder config.json: hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden, c.heads
            )));
        }
        Ok(c)
    }
}

/// The tensors of one encoder layer, in HF's order of use.
const LAYER_TENSORS: [&str; 16] = [
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
];

/// Sequences per forward pass, and padded tokens per pass (the attention scores of a batch are
/// `B * heads * T^2` values).
const BATCH: usize = 32;
const BATCH_TOKENS: usize = 4096;

/// A loaded sentence encoder.
pub struct SentenceEncoder {
    pub config: EncoderConfig,
    tokenizer: Tokenizer,
    /// Longest input in tokens, special tokens included (sentence-transformers' `max_seq_length`).
    pub max_tokens: usize,
    normalize: bool,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: [Tensor; 2],
    layers: Vec<Vec<Tensor>>,
}

impl SentenceEncoder {
    /// Loads a sentence-transformers directory: `config.json`, `model.safetensors`,
    /// `tokenizer.json`, and when present `sentence_bert_config.json` (`max_seq_length`),
    /// `1_Pooling/config.json` (must be mean pooling) and `modules.json` (`Normalize`).
    pub fn load(dir: &Path) -> Result<SentenceEncoder> {
        let read = |name: &str| -> Result<Option<String>> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(t) => Ok(Some(t)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(error) => Err(Error::Io { path, error }),
            }
        };
        let json = |name: &str, text: &str| -> Result<Value> {
            serde_json::from_str(text)
                .map_err(|e| Error::Config(format!("{}: {e}", dir.join(name).display())))
        };
        let config_text = read("config.json")?
            .ok_or_else(|| Error::Config(format!("{}: no config.json", dir.display())))?;
        let config = EncoderConfig::from_json(&config_text)?;
        let mut max_tokens = config.max_positions;
        if let Some(t) = read("sentence_bert_config.json")?
            && let Some(n) = json("sentence_bert_config.json", &t)?
                .get("max_seq_length")
                .and_then(Value::as_u64)
        {
            max_tokens = (n as usize).clamp(2, config.max_positions);
        }
        if let Some(t) = read("1_Pooling/config.json")? {
            let p = json("1_Pooling/config.json", &t)?;
            let mode = |k: &str| p.get(k).and_then(Value::as_bool).unwrap_or(false);
            let others = [
                "pooling_mode_cls_token",
                "pooling_mode_max_tokens",
                "pooling_mode_mean_sqrt_len_tokens",
            ];
            if !mode("pooling_mode_mean_tokens") || others.iter().any(|k| mode(k)) {
                return Err(Error::Config(format!(
                    "{}: only mean pooling is supported",
                    dir.join("1_Pooling/config.json").display()
                )));
            }
        }
        let normalize = match read("modules.json")? {
            Some(t) => json("modules.json", &t)?.as_array().is_some_and(|m| {
                m.iter().any(|x| {
                    x.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|s| s.ends_with("Normalize"))
                })
            }),
            None => false,
        };
        let mut tokenizer = crate::tokenizer_from_dir(dir)?;
        // tokenizer.json may carry a fixed padding and a shorter truncation for other uses;
        // the encoder pads itself and truncates where sentence-transformers does.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.display())))?;
        let source = SafetensorsDir::open(dir)?;
        // HF BertModel checkpoints name tensors with or without a `bert.` prefix.
        let prefix = if source
            .tensor("embeddings.word_embeddings.weight")?
            .is_some()
        {
            ""
        } else {
            "bert."
        };
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = crate::weights::checked_tensor(&source, &format!("{prefix}{name}"), shape)?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let (c, f) = (config.hidden, config.intermediate);
        let layers = (0..config.layers)
            .map(|i| {
                LAYER_TENSORS
                    .iter()
                    .map(|name| {
                        let shape = match *name {
                            "intermediate.dense.weight" => vec![f, c],
                            "intermediate.dense.bias" => vec![f],
                            "output.dense.weight" => vec![c, f],
                            n if n.ends_with("weight") && n.contains("LayerNorm") => vec![c],
                            n if n.ends_with("weight") => vec![c, c],
                            _ => vec![c],
                        };
                        get(&format!("encoder.layer.{i}.{name}"), &shape)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SentenceEncoder {
            word: get("embeddings.word_embeddings.weight", &[config.vocab, c])?,
            position: get(
                "embeddings.position_embeddings.weight",
                &[config.max_positions, c],
            )?,
            token_type: get(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab, c],
            )?,
            norm: [
                get("embeddings.LayerNorm.weight", &[c])?,
                get("embeddings.LayerNorm.bias", &[c])?,
            ],
            layers,
            config,
            tokenizer,
            max_tokens,
            normalize,
        })
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.config.hidden
    }

    /// Token ids of `text` as the encoder sees it: `[CLS] ... [SEP]`, truncated to
    /// `max_tokens`.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// One embedding per text, in input order. Texts are batched by length (little padding);
    /// `on_batch(done)` is told how many are embedded after each batch.
    pub fn embed(&self, texts: &[&str], mut on_batch: impl FnMut(usize)) -> Result<Vec<Vec<f32>>> {
        let ids = texts
            .iter()
            .map(|t| self.tokenize(t))
            .collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); ids.len()];
        let mut start = 0;
        while start < order.len() {
            // Sorted ascending, so the batch's last sequence is its longest.
            let mut end = start + 1;
            while end < order.len()
                && end - start < BATCH
                && (end + 1 - start) * ids[order[end]].len() <= BATCH_TOKENS
            {
                end += 1;
            }
            let batch: Vec<&[u32]> = order[start..end].iter().map(|&i| &ids[i][..]).collect();
            for (row, &i) in self.embed_ids(&batch)?.into_iter().zip(&order[start..end]) {
                out[i] = row;
            }
            start = end;
            on_batch(start);
        }
        Ok(out)
    }

    /// Embeddings of token-id sequences (each non-empty, at most `max_tokens`), padded into
    /// one batch.
    pub fn embed_ids(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let (b, t) = (seqs.len(), seqs.iter().map(|s| s.len()).max().unwrap_or(0));
        if b == 0 {
            return Ok(Vec::new());
        }
        if t == 0 || t > self.max_tokens {
            return Err(Error::Config(format!(
                "encoder input of {t} tokens (1 to {} allowed)",
                self.max_tokens
            )));
        }
        let (c, heads) = (self.config.hidden, self.config.heads);
        let d = c / heads;
        let dev = Device::Cpu;
        let mut flat = vec![0u32; b * t];
        for (row, s) in flat.chunks_mut(t).zip(seqs) {
            row[..s.len()].copy_from_slice(s);
        }
        if let Some(&bad) = flat.iter().find(|&&i| i as usize >= self.config.vocab) {
            return Err(Error::Tokenizer(format!(
                "token id {bad} is outside the encoder's vocabulary of {}",
                self.config.vocab
            )));
        }
        let ids = Tensor::from_vec(flat, [b, t], &dev)?;
        // (B, T, C) + (T, C) positions + token type 0 for every token.
        let type0 = self.token_type.narrow(0, 0, 1)?.reshape([c])?;
        let mut x = self
            .word
            .embedding(&ids)?
            .add(&self.position.narrow(0, 0, t)?)?
            .add(&type0)?
            .layer_norm(&self.norm[0], &self.norm[1], self.config.eps)?;
        // Additive key mask (B, heads, T, T): padded keys get a large negative score, so their
        // softmax weight is exactly 0 in f32. Padded queries compute garbage that is never read.
        let mut mask = vec![0f32; b * heads * t * t];
        for (bi, s) in seqs.iter().enumerate() {
            for row in mask[bi * heads * t * t..(bi + 1) * heads * t * t].chunks_mut(t) {
                row[s.len()..].fill(-1e9);
            }
        }
        let mask = Tensor::from_vec(mask, [b, heads, t, t], &dev)?;
        let scale = 1.0 / (d as f64).sqrt();
        for w in &self.layers {
            let linear = |h: &Tensor, i: usize| -> Result<Tensor> {
                Ok(h.matmul_t(&w[i], false, true)?.add(&w[i + 1])?)
            };
            // (B, T, C) -> (B, T, heads, D) -> (B, heads, T, D)
            let split =
                |h: Tensor| -> Result<Tensor> { Ok(h.reshape([b, t, heads, d])?.transpose(1, 2)?) };
            let (q, k, v) = (
                split(linear(&x, 0)?)?,
                split(linear(&x, 2)?)?,
                split(linear(&x, 4)?)?,
            );
            // (B, heads, T, D) . (B, heads, T, D)^T -> (B, heads, T, T)
            let p = q
                .matmul_t(&k, false, true)?
                .scale(scale)?
                .add(&mask)?
                .softmax()?;
            // (B, heads, T, D) -> (B, T, C)
            let a = p.matmul(&v)?.transpose(1, 2)?.reshape([b, t, c])?;
            x = linear(&a, 6)?
                .add(&x)?
                .layer_norm(&w[8], &w[9], self.config.eps)?;
            let m = linear(&x, 10)?.gelu()?;
            x = linear(&m, 12)?
                .add(&x)?
                .layer_norm(&w[14], &w[15], self.config.eps)?;
        }
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        Ok(mean_pool(&x.to_vec::<f32>()?, &lens, t, c, self.normalize))
    }
}

/// Mean of each sequence's first `lens[b]` rows of `h (B, T, C)`, in f64, then (when
/// `normalize`) scaled to unit L2 norm as sentence-transformers' `Normalize` does (a zero vector
/// stays zero).
pub fn mean_pool(h: &[f32], lens: &[usize], t: usize, c: usize, normalize: bool) -> Vec<Vec<f32>> {
    lens.iter()
        .enumerate()
        .map(|(b, &n)| {
            let mut acc = vec![0f64; c];
            for row in h[b * t * c..].chunks(c).take(n) {
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64);
            }
            acc.iter_mut().for_each(|a| *a /= n.max(1) as f64);
            if normalize {
                let norm = acc.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
                acc.iter_mut().for_each(|a| *a /= norm);
            }
            acc.into_iter().map(|a| a as f32).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_refuses_what_it_cannot_compute() {
        let ok = r#"{"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 12,
            "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12}"#;
        let c = EncoderConfig::from_json(ok).unwrap();
        assert_eq!((c.hidden, c.heads, c.eps), (8, 2, 1e-12));
        for (from, to, says) in [
            (r#""gelu""#, r#""relu""#, "hidden_act `relu`"),
            (
                r#""num_attention_heads": 2"#,
                r#""num_attention_heads": 3"#,
                "multiple",
            ),
            (r#""vocab_size": 10"#, r#""vocab_size": 0"#, "vocab_size"),
            (r#""bert""#, r#""llama""#, "not bert"),
        ] {
            let err = EncoderConfig::from_json(&ok.replace(from, to)).unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn mean_pool_averages_real_tokens_and_normalises() {
        // Two sequences of T = 3, C = 2: the second has one real token.
        let h = [
            1.0, 2.0, 3.0, 4.0, 100.0, 100.0, 3.0, 4.0, 9.0, 9.0, 9.0, 9.0,
        ];
        let raw = mean_pool(&h, &[2, 1], 3, 2, false);
        assert_eq!(raw, vec![vec![2.0, 3.0], vec![3.0, 4.0]]);
        let unit = mean_pool(&h, &[2, 1], 3, 2, true);
        assert!((unit[1][0] - 0.6).abs() < 1e-7 && (unit[1][1] - 0.8).abs() < 1e-7);
    }
}
