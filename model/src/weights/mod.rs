//! Where weights come from: a name-to-tensor lookup over memory-mapped checkpoints.

mod gguf;
mod quant;
mod safetensors;
mod write;

pub use self::safetensors::SafetensorsDir;
pub use gguf::{GgufFile, MetaValue};
pub use write::{write_safetensors, write_safetensors_with_metadata};

use crate::{Error, Result};
use bft_engine::Tensor;

/// A checkpoint's tensors by HF name (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    /// The tensor, read now (lazily, one at a time), or `None` if the checkpoint lacks it.
    fn tensor(&self, name: &str) -> Result<Option<Tensor>>;
    /// Where the weights come from, for error messages.
    fn describe(&self) -> String;
}

/// The tensor `name` of `source`, required to exist, to have `shape` and to be finite (a
/// non-finite weight makes every output NaN); errors name the tensor and the checkpoint.
pub fn checked_tensor(source: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = source
        .tensor(name)?
        .ok_or_else(|| Error::Weights(format!("{}: missing tensor {name}", source.describe())))?;
    if t.dims() != shape {
        return Err(Error::WeightShape {
            name: format!("{name} (in {})", source.describe()),
            expected: shape.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    if let Some((i, v)) = t.first_non_finite()? {
        return Err(Error::Weights(format!(
            "{}: tensor {name} holds {v} at flat index {i}; a non-finite weight makes every \
             output NaN",
            source.describe()
        )));
    }
    Ok(t)
}
