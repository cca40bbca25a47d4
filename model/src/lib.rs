//! bft-model: the Llama/Qwen2 transformer built from engine ops. For now the decoder block;
//! loaders, LoRA and generation come with the model issue.

pub mod block;

pub use block::{Block, BlockConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] bft_engine::Error),
    #[error("config: {0}")]
    Config(String),
    #[error("weight {name}: expected shape {expected:?}, got {got:?}")]
    WeightShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
