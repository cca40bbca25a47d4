//! Where weights come from: a name-to-tensor lookup over memory-mapped checkpoints.

mod gguf;
mod quant;
mod safetensors;
mod write;

pub use self::safetensors::SafetensorsDir;
pub use gguf::{GgufFile, MetaValue};
pub use write::{write_safetensors, write_safetensors_with_metadata};

use crate::Result;
use bft_engine::Tensor;

/// A checkpoint's tensors by HF name (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    /// The tensor, read now (lazily, one at a time), or `None` if the checkpoint lacks it.
    fn tensor(&self, name: &str) -> Result<Option<Tensor>>;
    /// Where the weights come from, for error messages.
    fn describe(&self) -> String;
}
