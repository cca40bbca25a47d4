//! bft-model: the Llama/Qwen2 transformer built from engine ops: configs and the decoder block
//! so far; weight loaders, LoRA and generation come next.

pub mod block;
pub mod config;
pub mod transformer;
pub mod weights;

pub use block::{Block, BlockConfig};
pub use config::{Arch, Llama3Scaling, ModelConfig};
pub use transformer::Transformer;
pub use weights::{SafetensorsDir, WeightSource};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] bft_engine::Error),
    #[error("config: {0}")]
    Config(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
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
