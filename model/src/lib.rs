//! bft-model: the Llama/Qwen2 transformer built from engine ops: configs, the decoder block,
//! weight loaders (safetensors, GGUF), LoRA and KV-cache generation.

pub mod block;
pub mod config;
pub mod encoder;
pub mod fetch;
pub mod generate;
pub mod loader;
pub mod lora;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use block::{Block, BlockConfig, KvCache, Linear, LoraPair};
pub use config::{Arch, Llama3Scaling, ModelConfig};
pub use encoder::{EncoderConfig, SentenceEncoder};
pub use generate::{Sampling, generate, generate_batch, generate_batch_until};
pub use loader::{LoadedModel, load_model, save_hf_dir};
pub use lora::LoraConfig;
pub use tokenizer::{ChatTemplate, Message, tokenizer_from_dir, tokenizer_from_gguf};
pub use transformer::Transformer;
pub use weights::{GgufFile, SafetensorsDir, WeightSource};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] bft_engine::Error),
    #[error("config: {0}")]
    Config(String),
    /// `error` is shown inline (not as a `source`), so a report prints it once.
    #[error("{}: {error}", path.display())]
    Io {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("weight {name}: expected shape {expected:?}, got {got:?}")]
    WeightShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
