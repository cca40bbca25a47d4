//! `bft score`: per-token log-probs, weights and losses of a dataset under a model, as JSONL.

use crate::cli::{
    GroupMeanName, LossName, WeightDType, check_at_least, check_targets, parse_device,
    read_encoded, write_atomically,
};
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub source: crate::cli::ModelArgs,
    /// JSONL data (messages, conversations or instruction/output rows).
    #[arg(long)]
    pub data: PathBuf,
    /// Loss variant whose weights are reported.
    #[arg(long, value_enum, default_value = "bft")]
    pub loss: LossName,
    /// Group-confidence window g, in tokens.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// The mean over a window.
    #[arg(long, value_enum, default_value = "arithmetic")]
    pub group_mean: GroupMeanName,
    /// Longest sequence in tokens; longer ones are cut.
    #[arg(long, default_value_t = 1024)]
    pub cutoff_len: usize,
    /// Samples per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Output JSONL file (written only if scoring succeeds).
    #[arg(long)]
    pub out: PathBuf,
    /// Compute device: cpu, wgpu (the first adapter), wgpu:N, cuda or cuda:N (`bft info` lists
    /// them).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Storage dtype of the weights on the device (bf16/f16 halve their memory; the math stays
    /// f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDType,
}

pub fn run(a: ScoreArgs) -> Result<()> {
    use bft_trainer::loss::{GroupConfig, VariantParams, builtin};
    check_at_least("window", a.window, 1)?;
    check_at_least("batch-size", a.batch_size, 1)?;
    check_at_least("cutoff-len", a.cutoff_len, 2)?;
    crate::cli::check_out_dir("out", &a.out)?;
    let device = parse_device(&a.device)?;
    let group = GroupConfig {
        window: a.window,
        mean: a.group_mean.into(),
    };
    let variant = builtin(
        a.loss.name(),
        VariantParams {
            group,
            ..Default::default()
        },
    )?;
    let mut m = a.source.load(a.dtype.into())?;
    m.model = m
        .model
        .to_device(&device)
        .with_context(|| format!("moving the model to {device}"))?;
    let template = m
        .template
        .take()
        .with_context(|| format!("{} has no chat template", a.source.model.display()))?;
    let (_, encoded) = read_encoded(&m, &template, &a.data, false, a.cutoff_len)?;
    check_targets(&encoded, &a.data, a.cutoff_len)?;
    let pad = m.stop_ids.first().copied().unwrap_or(0);
    let ev = bft_trainer::train::evaluate(
        &m.model,
        &encoded,
        variant.as_ref(),
        group,
        a.batch_size,
        pad,
    )?;
    let (loss, ce, stats) = (ev.loss, ev.ce, ev.samples);
    let mut lines = String::new();
    for (e, st) in encoded.iter().zip(&stats) {
        let row = serde_json::json!({
            "input_ids": e.ids,
            "target_mask": e.target_mask.iter().map(|&t| t as u8).collect::<Vec<_>>(),
            "logprobs": st.logprobs, "n_valid": st.n_valid, "p_conf": st.p_conf, "s_b": st.s_b,
            "loss": st.loss, "ce": st.ce, "weakest_window_start": st.weakest_window_start,
        });
        lines.push_str(&row.to_string());
        lines.push('\n');
    }
    write_atomically(&a.out, lines.as_bytes())?;
    println!(
        "loss {loss:.6}  ce {ce:.6}  ({} samples, {})",
        encoded.len(),
        a.loss.name()
    );
    Ok(())
}
