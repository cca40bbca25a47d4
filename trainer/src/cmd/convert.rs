//! `bft convert`: a GGUF file as an HF model directory; and the directory writer `bft merge`
//! shares.

use crate::cli::{WeightDType, sibling_tmp};
use anyhow::{Context, Result, bail};
use bft_engine::DType;
use bft_model::{GgufFile, load_model, save_hf_dir};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The .gguf file to convert (or `smollm2`, the built-in model).
    pub input: PathBuf,
    /// Output directory (must not exist yet).
    pub output: PathBuf,
    /// Storage dtype of the written weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDType,
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let (hf_config, m) = open_for_writing(&a.input, &a.output)?;
    write_dir(&m, &hf_config, &a.output, a.dtype)
}

/// The model to rewrite and its HF config, after refusing to overwrite `output`.
pub fn open_for_writing(
    model: &Path,
    output: &Path,
) -> Result<(serde_json::Value, bft_model::LoadedModel)> {
    if output.exists() {
        bail!(
            "{} already exists; choose a new output directory",
            output.display()
        );
    }
    let hf_config = hf_config_of(model)?;
    let m =
        load_model(model, DType::F32).with_context(|| format!("loading {}", model.display()))?;
    Ok((hf_config, m))
}

/// The HF config.json of a model given as a directory or a GGUF file.
fn hf_config_of(path: &Path) -> Result<serde_json::Value> {
    if path.is_dir() {
        let p = path.join("config.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        return serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()));
    }
    let g = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(g.hf_config()?)
}

/// Writes beside the target and renames at the end: no half-written directory on failure.
pub fn write_dir(
    m: &bft_model::LoadedModel,
    hf_config: &serde_json::Value,
    out: &Path,
    dtype: WeightDType,
) -> Result<()> {
    let tmp = sibling_tmp(out);
    let result = save_hf_dir(m, hf_config, &tmp, dtype.into()).and_then(|()| {
        std::fs::rename(&tmp, out).map_err(|e| bft_model::Error::Io {
            path: out.to_owned(),
            error: e,
        })
    });
    if let Err(e) = result {
        std::fs::remove_dir_all(&tmp).ok();
        return Err(e).with_context(|| format!("writing {}", out.display()));
    }
    eprintln!(
        "wrote {} ({} tensors)",
        out.display(),
        m.model.named_tensors().len()
    );
    Ok(())
}
