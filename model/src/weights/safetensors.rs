//! `model.safetensors` or a sharded `model.safetensors.index.json`, memory-mapped.
//!
//! Each file's header is validated when it is opened (every tensor's byte range must lie inside
//! the file), so a truncated or corrupt file is an error naming it, never a panic or a SIGBUS.
//! Tensors are read lazily, by copying out of the map: a slice of the map need not be aligned
//! for its element type, so it is never reinterpreted in place.

use super::WeightSource;
use crate::{Error, Result};
use bft_engine::{Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// A model directory's safetensors weights.
pub struct SafetensorsDir {
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    index: HashMap<String, usize>,
}

fn corrupt(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Weights(format!("{}: {msg}", path.display()))
}

impl Shard {
    fn open(path: &Path) -> Result<Shard> {
        let file = std::fs::File::open(path).map_err(|e| Error::Io {
            path: path.to_owned(),
            error: e,
        })?;
        // SAFETY: the map is read-only and private to this process. A file truncated by another
        // process while mapped could still fault on access, as with any mmap reader; a file
        // already truncated is caught by the header validation below.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::Io {
            path: path.to_owned(),
            error: e,
        })?;
        SafeTensors::deserialize(&map)
            .map_err(|e| corrupt(path, format!("not a valid safetensors file: {e}")))?;
        Ok(Shard {
            path: path.to_owned(),
            map,
        })
    }

    fn names(&self) -> Vec<String> {
        SafeTensors::deserialize(&self.map)
            .map(|st| st.names().into_iter().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    fn read(&self, name: &str) -> Result<Tensor> {
        let st = SafeTensors::deserialize(&self.map).map_err(|e| corrupt(&self.path, e))?;
        let view = st
            .tensor(name)
            .map_err(|e| corrupt(&self.path, format!("tensor {name}: {e}")))?;
        let (bytes, shape) = (view.data(), view.shape().to_vec());
        let dev = Device::Cpu;
        let t = match view.dtype() {
            Dtype::F32 => Tensor::from_vec(le::<4, f32>(bytes, f32::from_le_bytes), shape, &dev),
            Dtype::F16 => Tensor::from_vec(
                le::<2, half::f16>(bytes, half::f16::from_le_bytes),
                shape,
                &dev,
            ),
            Dtype::BF16 => Tensor::from_vec(
                le::<2, half::bf16>(bytes, half::bf16::from_le_bytes),
                shape,
                &dev,
            ),
            other => {
                return Err(corrupt(
                    &self.path,
                    format!("tensor {name} has dtype {other:?}; supported: F32, F16, BF16"),
                ));
            }
        };
        t.map_err(|e| corrupt(&self.path, format!("tensor {name}: {e}")))
    }
}

/// Decodes little-endian elements from possibly unaligned bytes.
fn le<const N: usize, T>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        // cannot fail: chunks_exact yields slices of exactly N bytes.
        .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
        .collect()
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: HashMap<String, String>,
}

impl SafetensorsDir {
    /// Opens `dir/model.safetensors.index.json` (sharded) or `dir/model.safetensors`.
    pub fn open(dir: &Path) -> Result<SafetensorsDir> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::Io {
                path: index_path.clone(),
                error: e,
            })?;
            let idx: IndexFile = serde_json::from_str(&text)
                .map_err(|e| corrupt(&index_path, format!("invalid index: {e}")))?;
            let mut files: Vec<&String> = idx.weight_map.values().collect();
            files.sort();
            files.dedup();
            let shards = files
                .iter()
                .map(|f| Shard::open(&dir.join(f)))
                .collect::<Result<Vec<_>>>()?;
            let mut index = HashMap::new();
            for (name, file) in &idx.weight_map {
                // cannot fail: `files` was built from these very values.
                let s = files
                    .iter()
                    .position(|f| *f == file)
                    .expect("file listed above");
                if !shards[s].names().contains(name) {
                    return Err(corrupt(
                        &shards[s].path,
                        format!("the index lists tensor {name} here, but the file lacks it"),
                    ));
                }
                index.insert(name.clone(), s);
            }
            return Ok(SafetensorsDir { shards, index });
        }
        let path = dir.join("model.safetensors");
        if !path.exists() {
            return Err(Error::Weights(format!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            )));
        }
        let shard = Shard::open(&path)?;
        let index = shard.names().into_iter().map(|n| (n, 0)).collect();
        Ok(SafetensorsDir {
            shards: vec![shard],
            index,
        })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The string metadata of the (first) file's header, empty when it has none.
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let Some(shard) = self.shards.first() else {
            return Ok(HashMap::new());
        };
        let (_, meta) =
            SafeTensors::read_metadata(&shard.map).map_err(|e| corrupt(&shard.path, e))?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// One safetensors file on its own (a LoRA adapter, say).
    pub fn open_file(path: &Path) -> Result<SafetensorsDir> {
        let shard = Shard::open(path)?;
        let index = shard.names().into_iter().map(|n| (n, 0)).collect();
        Ok(SafetensorsDir {
            shards: vec![shard],
            index,
        })
    }
}

impl WeightSource for SafetensorsDir {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        self.index
            .get(name)
            .map(|&s| self.shards[s].read(name))
            .transpose()
    }

    fn describe(&self) -> String {
        match self.shards.as_slice() {
            [one] => one.path.display().to_string(),
            many => format!(
                "{} shards in {}",
                many.len(),
                many[0].path.parent().unwrap_or(Path::new(".")).display()
            ),
        }
    }
}
