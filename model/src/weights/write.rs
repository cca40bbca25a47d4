//! Writing safetensors files: under a temporary name, fsynced, then renamed, so a reader never
//! sees a half-written file.

use crate::{Error, Result};
use bft_engine::{DType, Tensor};
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::path::Path;

/// A tensor's bytes in safetensors' little-endian layout.
struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn bytes(t: &Tensor) -> Result<Bytes> {
    let (dtype, data): (Dtype, Vec<u8>) = match t.dtype() {
        DType::F32 => (
            Dtype::F32,
            t.to_vec::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            Dtype::F64,
            t.to_vec::<f64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            Dtype::BF16,
            t.to_vec::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            Dtype::F16,
            t.to_vec::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::U32 => (
            Dtype::U32,
            t.to_vec::<u32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
    };
    Ok(Bytes {
        dtype,
        shape: t.dims().to_vec(),
        data,
    })
}

/// Writes `tensors` (name, tensor) to `path` atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, &Tensor)]) -> Result<()> {
    write_safetensors_with_metadata(path, tensors, None)
}

/// As `write_safetensors`, with string metadata in the header's `__metadata__`.
pub fn write_safetensors_with_metadata(
    path: &Path,
    tensors: &[(String, &Tensor)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let io = |e: std::io::Error| Error::Io {
        path: path.to_owned(),
        error: e,
    };
    let owned = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), bytes(t)?)))
        .collect::<Result<Vec<_>>>()?;
    let views: Vec<(String, &Bytes)> = owned.iter().map(|(n, b)| (n.clone(), b)).collect();
    let data = safetensors::serialize(views, metadata)
        .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?;
    let tmp = path.with_extension("safetensors.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&data).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}
