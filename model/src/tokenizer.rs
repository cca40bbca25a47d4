//! Tokenizers (the `tokenizers` crate) from a model directory's `tokenizer.json` or from a GGUF
//! file's embedded BPE vocabulary, and chat templates rendered with `minijinja`.

use crate::weights::{GgufFile, MetaValue, WeightSource};
use crate::{Error, Result};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

/// GGUF token types that are special (control) or user-defined added tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Loads `dir/tokenizer.json`.
pub fn tokenizer_from_dir(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}

/// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.model = gpt2`: byte-level BPE).
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<Tokenizer> {
    let err = |m: String| Error::Tokenizer(format!("{}: {m}", g.describe()));
    let meta = |k: &str| g.metadata.get(k);
    let model = meta("tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(err(format!(
            "tokenizer model `{model}` is not supported (supported: gpt2 byte-level BPE)"
        )));
    }
    let strings = |k: &str| -> Result<Vec<&str>> {
        let a = meta(k)
            .and_then(MetaValue::as_array)
            .ok_or_else(|| err(format!("missing {k}")))?;
        a.iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| err(format!("{k} holds a non-string")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| err(format!("bad merge `{m}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| err(format!("BPE: {e}")))?;
    let pre = meta("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        // SmolLM's tokenizer.json: digits split one by one, then GPT-2's byte-level regex.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "gpt-2" | "default" => byte_level.into(),
        other => {
            return Err(err(format!(
                "pre-tokenizer `{other}` is not supported yet (supported: smollm, gpt-2); load the HF model directory instead"
            )));
        }
    };
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let types = meta("tokenizer.ggml.token_type")
        .and_then(MetaValue::as_array)
        .unwrap_or(&[]);
    let special: Vec<AddedToken> = types
        .iter()
        .zip(&tokens)
        .filter(|(t, _)| {
            matches!(
                t,
                MetaValue::Int(TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED)
            )
        })
        .map(|(_, s)| AddedToken::from(s.to_string(), true))
        .collect();
    tok.add_special_tokens(special)
        .map_err(|e| err(format!("special tokens: {e}")))?;
    Ok(tok)
}

/// One chat turn.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A model's own Jinja chat template, rendered as HF's `apply_chat_template` does.
#[derive(Clone)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate> {
        let mut env = minijinja::Environment::new();
        // HF templates call Python string methods (`.strip()`, `.startswith()`, ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, ending where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))
    }
}
