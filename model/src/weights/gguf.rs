//! GGUF v3, llama.cpp's format: metadata, tensor infos, and tensors dequantised to f32 on
//! read, under their HF names.
//!
//! llama.cpp's converter stores a `llama` model's q/k projection rows permuted for its
//! interleaved-pair RoPE; reading them here undoes that, so the weights use HF's rotate-half
//! layout (qwen2 files are not permuted).

use super::WeightSource;
use super::quant::{GgmlType, dequantize};
use crate::{Error, ModelConfig, Result};
use bft_engine::{Device, Tensor};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            MetaValue::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Float(f) => Some(*f),
            MetaValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

struct TensorInfo {
    /// HF order (outermost first): GGUF lists dimensions innermost first.
    dims: Vec<usize>,
    ty: GgmlType,
    /// Byte range in the file.
    start: usize,
    len: usize,
}

/// An opened, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    pub metadata: BTreeMap<String, MetaValue>,
    tensors: HashMap<String, TensorInfo>,
}

/// A bounds-checked little-endian reader over the mapped file.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                Error::Weights(format!(
                    "{}: truncated or corrupt GGUF: {what} at byte {} needs {n} bytes",
                    self.path.display(),
                    self.pos
                ))
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    /// The next `N` bytes as an array.
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A count that must fit in what is left of the file (`min_bytes` per item).
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.data.len() - self.pos) as u64;
        if n.saturating_mul(min_bytes as u64) > left {
            return Err(Error::Weights(format!(
                "{}: corrupt GGUF: {what} {n} exceeds the file",
                self.path.display()
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        String::from_utf8(self.take(n, what)?.to_vec()).map_err(|_| {
            Error::Weights(format!(
                "{}: corrupt GGUF: {what} is not UTF-8",
                self.path.display()
            ))
        })
    }
    fn value(&mut self, ty: u32, key: &str) -> Result<MetaValue> {
        self.value_at(ty, key, 0)
    }
    /// A value inside `depth` enclosing arrays. Real files nest arrays at most once; the limit
    /// keeps a crafted file from recursing until the stack overflows.
    fn value_at(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue> {
        const MAX_DEPTH: usize = 8;
        let b = |c: &mut Self, n| c.take(n, key);
        Ok(match ty {
            0 => MetaValue::Int(b(self, 1)?[0] as i64),
            1 => MetaValue::Int(b(self, 1)?[0] as i8 as i64),
            2 => MetaValue::Int(u16::from_le_bytes(self.array(key)?) as i64),
            3 => MetaValue::Int(i16::from_le_bytes(self.array(key)?) as i64),
            4 => MetaValue::Int(self.u32(key)? as i64),
            5 => MetaValue::Int(self.u32(key)? as i32 as i64),
            // Via the f32's shortest decimal form, so 1e-5 stays 1e-5 (not 9.99999974e-6).
            6 => {
                let f = f32::from_le_bytes(self.array(key)?);
                MetaValue::Float(f.to_string().parse().unwrap_or(f as f64))
            }
            7 => MetaValue::Bool(b(self, 1)?[0] != 0),
            8 => MetaValue::Str(self.string(key)?),
            9 if depth >= MAX_DEPTH => {
                return Err(Error::Weights(format!(
                    "{}: corrupt GGUF: {key} nests arrays deeper than {MAX_DEPTH}",
                    self.path.display()
                )));
            }
            9 => {
                let inner = self.u32(key)?;
                // The least bytes an element of that type takes: a count beyond the file is
                // refused before anything is allocated for it.
                let least = match inner {
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => 1,
                };
                let n = self.count(key, least)?;
                MetaValue::Array(
                    (0..n)
                        .map(|_| self.value_at(inner, key, depth + 1))
                        .collect::<Result<_>>()?,
                )
            }
            10 => MetaValue::Int(self.u64(key)? as i64),
            11 => MetaValue::Int(self.u64(key)? as i64),
            12 => MetaValue::Float(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(Error::Weights(format!(
                    "{}: corrupt GGUF: value type {other} of {key}",
                    self.path.display()
                )));
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |e| Error::Io {
            path: path.to_owned(),
            error: e,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: a read-only private map; every access below is bounds-checked against the
        // mapped length, so a file truncated before opening is an error, not a fault.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut c = Cursor {
            data: &map,
            pos: 0,
            path,
        };
        if c.take(4, "magic")? != b"GGUF" {
            return Err(Error::Weights(format!(
                "{}: not a GGUF file (bad magic)",
                path.display()
            )));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::Weights(format!(
                "{}: GGUF version {version} is not supported (2 or 3)",
                path.display()
            )));
        }
        let n_tensors = c.count("tensor count", 8)?;
        let n_kv = c.count("metadata count", 8)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key)?;
            metadata.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let rank = c.u32(&name)? as usize;
            if rank > 4 {
                return Err(Error::Weights(format!(
                    "{}: tensor {name} has rank {rank}",
                    path.display()
                )));
            }
            let mut dims = (0..rank)
                .map(|_| c.u64(&name).map(|d| d as usize))
                .collect::<Result<Vec<_>>>()?;
            dims.reverse();
            let ty_id = c.u32(&name)?;
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| {
                Error::Weights(format!(
                    "{}: tensor {name} has GGML type {ty_id}; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K",
                    path.display()
                ))
            })?;
            let offset = c.u64(&name)? as usize;
            infos.push((name, dims, ty, offset));
        }
        let align = metadata
            .get("general.alignment")
            .and_then(MetaValue::as_u64)
            .unwrap_or(32) as usize;
        if !align.is_power_of_two() {
            return Err(Error::Weights(format!(
                "{}: corrupt GGUF: general.alignment {align} is not a power of two",
                path.display()
            )));
        }
        // No overflow: the result is at most `pos + align - 1`, and both are below 2^63.
        let data_start = c.pos.div_ceil(align) * align;
        let mut tensors = HashMap::new();
        for (name, dims, ty, offset) in infos {
            let numel = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            let len = numel.and_then(|n| ty.bytes_for(n)).ok_or_else(|| {
                Error::Weights(format!(
                    "{}: tensor {name} {dims:?} is not a whole number of {ty:?} blocks",
                    path.display()
                ))
            })?;
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(len).is_some_and(|e| e <= map.len()));
            let start = start.ok_or_else(|| {
                Error::Weights(format!(
                    "{}: truncated or corrupt GGUF: tensor {name} lies beyond the end of the file",
                    path.display()
                ))
            })?;
            tensors.insert(
                name,
                TensorInfo {
                    dims,
                    ty,
                    start,
                    len,
                },
            );
        }
        Ok(GgufFile {
            path: path.to_owned(),
            map,
            metadata,
            tensors,
        })
    }

    fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// The architecture prefix of the metadata keys (`llama`, `qwen2`).
    pub fn arch(&self) -> Result<&str> {
        self.meta("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| {
                Error::Weights(format!(
                    "{}: missing general.architecture",
                    self.path.display()
                ))
            })
    }

    /// An HF `config.json` equivalent of the metadata.
    pub fn hf_config(&self) -> Result<serde_json::Value> {
        let arch = self.arch()?.to_string();
        let get = |k: &str| self.meta(&format!("{arch}.{k}"));
        let need = |k: &str| {
            get(k).and_then(MetaValue::as_u64).ok_or_else(|| {
                Error::Weights(format!("{}: missing {arch}.{k}", self.path.display()))
            })
        };
        let heads = need("attention.head_count")?;
        let hidden = need("embedding_length")?;
        let vocab = match get("vocab_size").and_then(MetaValue::as_u64) {
            Some(v) => v,
            None => self
                .meta("tokenizer.ggml.tokens")
                .and_then(MetaValue::as_array)
                .map(|a| a.len() as u64)
                .unwrap_or(0),
        };
        let mut cfg = serde_json::json!({
            "model_type": arch,
            "architectures": [if arch == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "hidden_size": hidden,
            "intermediate_size": need("feed_forward_length")?,
            "num_hidden_layers": need("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": get("attention.head_count_kv").and_then(MetaValue::as_u64).unwrap_or(heads),
            "head_dim": get("attention.key_length").and_then(MetaValue::as_u64).unwrap_or(hidden / heads.max(1)),
            "vocab_size": vocab,
            "rms_norm_eps": get("attention.layer_norm_rms_epsilon").and_then(MetaValue::as_f64).unwrap_or(1e-6),
            "rope_theta": get("rope.freq_base").and_then(MetaValue::as_f64).unwrap_or(10_000.0),
            "max_position_embeddings": get("context_length").and_then(MetaValue::as_u64).unwrap_or(4096),
            "tie_word_embeddings": !self.tensors.contains_key("output.weight"),
            "torch_dtype": "float32",
        });
        for (key, field) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ] {
            if let Some(id) = self.meta(key).and_then(MetaValue::as_u64) {
                cfg[field] = id.into();
            }
        }
        if self.tensors.contains_key("rope_freqs.weight") {
            return Err(Error::Weights(format!(
                "{}: GGUF rope_freqs (scaled RoPE) is not supported; load the HF checkpoint instead",
                self.path.display()
            )));
        }
        Ok(cfg)
    }

    /// The validated model configuration.
    pub fn config(&self) -> Result<ModelConfig> {
        ModelConfig::from_json(&self.hf_config()?.to_string()).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", self.path.display())),
            other => other,
        })
    }

    /// The chat template stored in the file, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.meta("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
    }

    fn read(&self, gguf_name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        let info = self.tensors.get(gguf_name)?;
        let mut out = vec![0.0f32; info.dims.iter().product()];
        dequantize(
            info.ty,
            &self.map[info.start..info.start + info.len],
            &mut out,
        );
        Some((info.dims.clone(), out))
    }
}

/// The GGUF name of an HF tensor name.
fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let (module, kind) = name.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Undoes llama.cpp's q/k row permutation: within each head, GGUF row `2i + j` is HF row
/// `j * (D/2) + i`. `rows` = heads * D, each row `cols` long.
fn unpermute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let d = w.len() / cols / heads.max(1);
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let src = (h * d + 2 * i + j) * cols;
                let dst = (h * d + j * (d / 2) + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

impl WeightSource for GgufFile {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(g) = gguf_name(name) else {
            return Ok(None);
        };
        let Some((dims, mut data)) = self.read(&g) else {
            return Ok(None);
        };
        if self.arch()? == "llama" && (g.ends_with("attn_q.weight") || g.ends_with("attn_k.weight"))
        {
            let cfg = self.config()?;
            let heads = if g.ends_with("attn_q.weight") {
                cfg.heads
            } else {
                cfg.kv_heads
            };
            data = unpermute_rows(&data, heads, dims.get(1).copied().unwrap_or(1));
        }
        Ok(Some(Tensor::from_vec(data, dims, &Device::Cpu)?))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp_and_permutation_inverts() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.bias").unwrap(),
            "blk.3.attn_q.bias"
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").unwrap(),
            "blk.0.ffn_norm.weight"
        );
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert!(gguf_name("model.layers.0.mlp.unknown.weight").is_none());
        // One head of D = 4, rows labelled by their HF index: llama.cpp stores [0, 2, 1, 3].
        let gguf = [0.0, 2.0, 1.0, 3.0];
        assert_eq!(unpermute_rows(&gguf, 1, 1), vec![0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn garbage_and_truncated_files_are_errors_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let p = dir.join("bad.gguf");
        let err = |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            match GgufFile::open(&p) {
                Ok(_) => panic!("must not open"),
                Err(e) => e.to_string(),
            }
        };
        assert!(err(b"nope").contains("bad magic"));
        let mut hdr = b"GGUF".to_vec();
        hdr.extend(3u32.to_le_bytes());
        hdr.extend(1u64.to_le_bytes());
        hdr.extend(u64::MAX.to_le_bytes());
        let e = err(&hdr);
        assert!(
            e.contains("bad.gguf") && e.contains("exceeds the file"),
            "{e}"
        );
        let e = err(&hdr[..10]);
        assert!(e.contains("truncated"), "{e}");
    }
}
