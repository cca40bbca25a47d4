//! One entry point for the two forms a model comes in: an HF directory (`config.json`,
//! safetensors, `tokenizer.json`, `tokenizer_config.json`) or a single GGUF file.

use crate::tokenizer::{ChatTemplate, tokenizer_from_dir, tokenizer_from_gguf};
use crate::weights::{GgufFile, SafetensorsDir, write_safetensors};
use crate::{Error, ModelConfig, Result, Transformer};
use bft_engine::DType;
use serde_json::Value;
use std::path::Path;
use tokenizers::Tokenizer;

/// A model ready to run: weights, tokenizer, chat template and the ids that end a reply.
pub struct LoadedModel {
    pub model: Transformer,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Chat template source and special tokens, as `tokenizer_config.json` states them.
    pub tokenizer_config: Value,
    /// The text of the end-of-turn token (`eos_token`), which ends each assistant reply.
    pub eos_token: String,
    pub stop_ids: Vec<u32>,
}

/// `bos_token`/`eos_token` are either strings or `{"content": ...}` objects.
fn token_text(v: &Value) -> Option<String> {
    v.as_str()
        .map(str::to_owned)
        .or_else(|| v.get("content").and_then(Value::as_str).map(str::to_owned))
}

/// `chat_template` is a string or a list of named templates (the `default` one is used).
fn template_source(cfg: &Value) -> Option<String> {
    match cfg.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// Loads a model from an HF directory or a `.gguf` file, with weights in `dtype`.
pub fn load_model(path: &Path, dtype: DType) -> Result<LoadedModel> {
    let (model, tokenizer, tok_cfg) = if path.is_dir() {
        let config = ModelConfig::from_file(&path.join("config.json"))?;
        let model = Transformer::load(&SafetensorsDir::open(path)?, config, dtype)?;
        let tc_path = path.join("tokenizer_config.json");
        let tok_cfg = match std::fs::read_to_string(&tc_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                Error::Tokenizer(format!("{}: invalid JSON: {e}", tc_path.display()))
            })?,
            Err(_) => Value::Object(Default::default()),
        };
        (model, tokenizer_from_dir(path)?, tok_cfg)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        let g = GgufFile::open(path)?;
        let model = Transformer::load(&g, g.config()?, dtype)?;
        let tokenizer = tokenizer_from_gguf(&g)?;
        let name = |key: &str| {
            g.metadata
                .get(key)
                .and_then(|v| v.as_u64())
                .and_then(|id| tokenizer.id_to_token(id as u32))
        };
        let mut tok_cfg = serde_json::json!({});
        if let Some(t) = g.chat_template() {
            tok_cfg["chat_template"] = t.into();
        }
        for (key, field) in [
            ("tokenizer.ggml.bos_token_id", "bos_token"),
            ("tokenizer.ggml.eos_token_id", "eos_token"),
        ] {
            if let Some(t) = name(key) {
                tok_cfg[field] = t.into();
            }
        }
        (model, tokenizer, tok_cfg)
    } else if path.exists() {
        return Err(Error::Weights(format!(
            "{}: expected a model directory or a .gguf file",
            path.display()
        )));
    } else {
        return Err(Error::Io {
            path: path.to_owned(),
            error: std::io::ErrorKind::NotFound.into(),
        });
    };
    let bos = tok_cfg
        .get("bos_token")
        .and_then(token_text)
        .unwrap_or_default();
    let eos = tok_cfg
        .get("eos_token")
        .and_then(token_text)
        .unwrap_or_default();
    let template = template_source(&tok_cfg)
        .map(|src| ChatTemplate::new(&src, &bos, &eos))
        .transpose()?;
    let mut stop_ids = model.config.eos_token_ids.clone();
    stop_ids.extend(tokenizer.token_to_id(&eos));
    stop_ids.sort_unstable();
    stop_ids.dedup();
    Ok(LoadedModel {
        model,
        tokenizer,
        template,
        tokenizer_config: tok_cfg,
        eos_token: eos,
        stop_ids,
    })
}

/// Writes `m` as an HF model directory: `model.safetensors`, `config.json`, `tokenizer.json`
/// and `tokenizer_config.json` (chat template and special tokens).
pub fn save_hf_dir(m: &LoadedModel, hf_config: &Value, dir: &Path, dtype: DType) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |e| Error::Io { path: p, error: e }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let converted: Vec<(String, bft_engine::Tensor)> = m
        .model
        .named_tensors()
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    let refs: Vec<(String, &bft_engine::Tensor)> =
        converted.iter().map(|(n, t)| (n.clone(), t)).collect();
    write_safetensors(&dir.join("model.safetensors"), &refs)?;
    let mut config = hf_config.clone();
    config["torch_dtype"] = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
    .into();
    let write_json = |name: &str, v: &Value| {
        let p = dir.join(name);
        std::fs::write(
            &p,
            // cannot fail: a `serde_json::Value` always serialises.
            serde_json::to_string_pretty(v).expect("JSON values serialise"),
        )
        .map_err(io(&p))
    };
    write_json("config.json", &config)?;
    let mut tc = m.tokenizer_config.clone();
    tc["tokenizer_class"] = "PreTrainedTokenizerFast".into();
    write_json("tokenizer_config.json", &tc)?;
    let tp = dir.join("tokenizer.json");
    m.tokenizer
        .save(&tp, true)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tp.display())))
}
