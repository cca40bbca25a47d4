//! Evaluation: ROUGE as Google's rouge-score computes it, the GeneAgent gene-set process-naming
//! benchmark and PubMedQA, with the generation and scoring helpers they share.

pub mod geneagent;
pub mod ggi;
pub mod porter;
pub mod pubmedqa;
pub mod rouge;

use bft_engine::{Device, Tensor};
use bft_model::{LoadedModel, Message, Sampling};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Config(String),
    #[error("the model has no chat template; evaluation needs one")]
    NoTemplate,
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Model(#[from] bft_model::Error),
    #[error(transparent)]
    Engine(#[from] bft_engine::Error),
}

pub type Result<T> = std::result::Result<T, EvalError>;

/// The prompt of a chat (`messages` rendered with the model's template and the generation
/// prompt) as token ids.
pub fn prompt_ids(m: &LoadedModel, messages: &[Message]) -> Result<Vec<u32>> {
    let template = m.template.as_ref().ok_or(EvalError::NoTemplate)?;
    let text = template.render(messages, true)?;
    let enc = m
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| EvalError::Tokenizer(e.to_string()))?;
    Ok(enc.get_ids().to_vec())
}

/// The model's greedy reply to a chat, at most `max_new_tokens` long.
pub fn reply(m: &LoadedModel, messages: &[Message], max_new_tokens: usize) -> Result<String> {
    let ids = prompt_ids(m, messages)?;
    let sampling = Sampling {
        max_new_tokens,
        ..Default::default()
    };
    let out = bft_model::generate(&m.model, &ids, &m.stop_ids, sampling, |_| true)?;
    let text = m
        .tokenizer
        .decode(&out, true)
        .map_err(|e| EvalError::Tokenizer(e.to_string()))?;
    Ok(text.trim().to_string())
}

/// Logits of the token that would follow `ids`: (V,).
pub fn next_token_logits(m: &LoadedModel, ids: &[u32]) -> Result<Vec<f64>> {
    let t = Tensor::from_vec(ids.to_vec(), [1, ids.len()], &Device::Cpu)?;
    let h = m.model.hidden(&t)?;
    let c = m.model.config.hidden;
    // (1, C) . (V, C)^T
    let last = h.narrow(1, ids.len() - 1, 1)?.reshape([1, c])?;
    Ok(last.matmul_t(m.model.head(), false, true)?.to_f64_vec()?)
}

/// A user message (with an optional system message before it).
pub fn chat(system: Option<&str>, user: String) -> Vec<Message> {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(Message {
            role: "system".into(),
            content: s.into(),
        });
    }
    messages.push(Message {
        role: "user".into(),
        content: user,
    });
    messages
}
