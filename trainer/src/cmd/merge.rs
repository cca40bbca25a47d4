//! `bft merge`: a LoRA adapter folded into its base model, written as a full HF directory.

use super::convert::{open_for_writing, write_dir};
use crate::cli::WeightDType;
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// Base model: HF directory, .gguf file, or `smollm2` (the built-in model, fetched once).
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory (must not exist yet).
    #[arg(long)]
    pub output: PathBuf,
    /// Storage dtype of the written weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDType,
}

pub fn run(a: MergeArgs) -> Result<()> {
    let (hf_config, mut m) = open_for_writing(&a.model, &a.output)?;
    let cfg = m
        .model
        .load_peft(&a.adapter)
        .with_context(|| format!("loading adapter {}", a.adapter.display()))?;
    m.model.merge_lora()?;
    eprintln!(
        "merged a rank-{} adapter on {} module kinds",
        cfg.rank,
        cfg.targets.len()
    );
    write_dir(&m, &hf_config, &a.output, a.dtype)
}
