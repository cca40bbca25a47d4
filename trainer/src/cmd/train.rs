//! `bft train`: LoRA or full fine-tuning with any loss variant, checkpoints and resume,
//! held-out evaluation, metrics, a progress bar and a loss-curve plot.

use super::{plot, progress::Progress};
use crate::cli::{
    GroupMeanName, LossName, ScheduleName, WeightDType, check_at_least, check_range, check_targets,
};
use anyhow::{Context, Result, bail};
use bft_engine::DType;
use bft_model::load_model;
use bft_trainer::data::Encoded;
use bft_trainer::train::Trainer;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, serde::Serialize)]
pub struct TrainArgs {
    /// Base model: HF directory, .gguf file, or `smollm2` (the built-in model, fetched once).
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: JSONL with OpenAI `messages`, ShareGPT `conversations` or Alpaca
    /// `instruction`/`input`/`output` rows (detected per file).
    #[arg(long)]
    pub data: PathBuf,
    /// Loss variant.
    #[arg(long, value_enum, default_value = "bft")]
    pub loss: LossName,
    /// Output directory.
    #[arg(long)]
    pub output: PathBuf,
    /// Optimizer steps to run (default: --epochs over the data).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Samples per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (exact accumulation).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Longest sequence in tokens; longer ones are cut.
    #[arg(long, default_value_t = 1024)]
    pub cutoff_len: usize,
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Projections that get adapters: q,k,v,o,gate,up,down (or `all`).
    #[arg(long, default_value = "all")]
    pub lora_targets: String,
    /// Train every weight instead of LoRA adapters.
    #[arg(long)]
    pub full: bool,
    /// BFT group-confidence window g, in tokens.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// BFT window mean.
    #[arg(long, value_enum, default_value = "arithmetic")]
    pub group_mean: GroupMeanName,
    /// BFT exponent on p_conf.
    #[arg(long, default_value_t = 1.0)]
    pub gamma: f64,
    /// Floor of DFT/BFT token weights.
    #[arg(long, default_value_t = 0.0)]
    pub floor: f64,
    #[arg(long, default_value_t = 2.0)]
    pub focal_gamma: f64,
    /// Share of the steps spent warming the learning rate up from 0.
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// Decay after warm-up.
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: ScheduleName,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_steps: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2)]
    pub keep_last: usize,
    /// Continue from OUTPUT/checkpoints/latest.
    #[arg(long)]
    pub resume: bool,
    /// Skip (and count) malformed rows instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Recompute each layer in the backward pass (less memory, about 30% more compute).
    #[arg(long)]
    pub checkpointing: bool,
    /// Print where one step's time goes: time, calls and bytes per op kind, forward and
    /// backward, and the GEMM share (the run's third step, past warm-up; also BFT_PROFILE=1).
    #[arg(long)]
    pub profile: bool,
    /// Compute device: cpu, wgpu (the first adapter; `bft info` lists them) or wgpu:N; cuda[:N]
    /// holds the weights but runs no ops yet.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Storage of the frozen base weights: f32, bf16 or f16. 16 bits halve the weights' memory
    /// (LoRA keeps f32 master weights and the math stays f32), at the price of widening each
    /// weight for every product: about 2x the step time on the CPU. Full fine-tuning needs f32.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDType,
    /// Held-out data (JSONL) whose cross-entropy is measured every --eval-steps.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Hold out this share of --data for evaluation instead (seeded), e.g. 0.05.
    #[arg(long, default_value_t = 0.0)]
    pub val_ratio: f64,
    /// Evaluate the held-out data every N steps and at the end (0: a tenth of the run).
    #[arg(long, default_value_t = 0)]
    pub eval_steps: u64,
    /// A TOML file of these options (keys as here, `lora-rank` or `lora_rank`); options given on
    /// the command line override it. Every run writes its resolved options to OUTPUT/config.toml.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

impl TrainArgs {
    /// Range checks of every numeric option, before anything is loaded or written.
    pub fn validate(&self) -> Result<()> {
        check_range("lr", self.lr, 0.0, f64::INFINITY)?;
        check_range("epochs", self.epochs, f64::MIN_POSITIVE, f64::INFINITY)?;
        if self.max_steps == Some(0) {
            bail!("--max-steps 0 is out of range: it must be at least 1");
        }
        check_at_least("batch-size", self.batch_size, 1)?;
        check_at_least("grad-accum", self.grad_accum, 1)?;
        // Two tokens is the least that holds a prompt token and a response token to predict.
        check_at_least("cutoff-len", self.cutoff_len, 2)?;
        check_at_least("window", self.window, 1)?;
        check_at_least("keep-last", self.keep_last, 1)?;
        check_range("gamma", self.gamma, f64::MIN_POSITIVE, f64::INFINITY)?;
        check_range("floor", self.floor, 0.0, 1.0)?;
        check_range("focal-gamma", self.focal_gamma, 0.0, f64::INFINITY)?;
        check_range("warmup-ratio", self.warmup_ratio, 0.0, 1.0)?;
        check_range("max-grad-norm", self.max_grad_norm, 0.0, f64::INFINITY)?;
        check_range("weight-decay", self.weight_decay, 0.0, f64::INFINITY)?;
        check_range("val-ratio", self.val_ratio, 0.0, 1.0)?;
        if self.val_ratio >= 1.0 {
            bail!(
                "--val-ratio {} leaves no training data: it must be below 1",
                self.val_ratio
            );
        }
        if self.eval_data.is_some() && self.val_ratio > 0.0 {
            bail!("give either --eval-data or --val-ratio, not both");
        }
        if !self.full {
            check_at_least("lora-rank", self.lora_rank, 1)?;
            check_range(
                "lora-alpha",
                self.lora_alpha,
                f64::MIN_POSITIVE,
                f64::INFINITY,
            )?;
            check_range("lora-dropout", self.lora_dropout, 0.0, 1.0)?;
            if self.lora_dropout >= 1.0 {
                bail!("--lora-dropout 1 drops every input: it must be below 1");
            }
            bft_model::LoraConfig::parse_targets(&self.lora_targets)
                .map_err(|e| anyhow::anyhow!("--lora-targets: {e}"))?;
        }
        if self.full && self.dtype != WeightDType::F32 {
            bail!(
                "--full trains every weight and keeps them in f32; --dtype {} is for the frozen base under LoRA",
                self.dtype.name()
            );
        }
        crate::cli::parse_device(&self.device)?;
        Ok(())
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    use bft_trainer::loss::{GroupConfig, VariantParams, builtin};
    use bft_trainer::optim::{AdamWConfig, Schedule};
    use bft_trainer::train::{TrainConfig, Trainable, Trainer};
    let device = crate::cli::parse_device(&a.device)?;
    let metrics_path = a.output.join("metrics.jsonl");
    if metrics_path.exists() && !a.resume {
        bail!(
            "{} already holds a run; pass --resume to continue it or choose a new --output",
            a.output.display()
        );
    }
    let group = GroupConfig {
        window: a.window,
        mean: a.group_mean.into(),
    };
    let params = VariantParams {
        group,
        gamma: a.gamma,
        floor: a.floor,
        focal_gamma: a.focal_gamma,
    };
    let variant = builtin(a.loss.name(), params)?;
    let dtype = DType::from(a.dtype);
    let mut m =
        load_model(&a.model, dtype).with_context(|| format!("loading {}", a.model.display()))?;
    let template = m
        .template
        .take()
        .with_context(|| format!("{} has no chat template", a.model.display()))?;
    let (ds, mut encoded) =
        crate::cli::read_encoded(&m, &template, &a.data, a.skip_bad_rows, a.cutoff_len)?;
    let held_out = held_out(&a, &m, &template, &mut encoded)?;
    check_targets(&encoded, &a.data, a.cutoff_len)?;
    m.model = m
        .model
        .to_device(&device)
        .with_context(|| format!("moving the model to {device}"))?;
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
    let per_epoch = encoded.len().div_ceil(a.batch_size * a.grad_accum) as u64;
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
            decay: a.schedule.into(),
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
    // Everything is checked (and a checkpoint to resume read) by now: nothing is written for a
    // run that cannot start.
    let mut trainer = Trainer::new(
        &mut m.model,
        &encoded,
        cfg,
        variant.as_ref(),
        trainable.clone(),
    )?;
    let ckpt_dir = a.output.join("checkpoints");
    let start = if a.resume {
        trainer.resume(&ckpt_dir)?.unwrap_or(0)
    } else {
        0
    };
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    let resolved = serde_json::json!({
        "args": &a, "total_steps": total, "warmup_steps": warmup, "samples": encoded.len(),
        "data_format": format!("{:?}", ds.format), "skipped_rows": ds.skipped,
        "held_out_samples": held_out.len(),
    });
    let toml = toml::to_string(&a).context("writing the resolved options as TOML")?;
    std::fs::write(a.output.join("config.toml"), toml)
        .with_context(|| format!("writing {}", a.output.display()))?;
    std::fs::write(
        a.output.join("run_config.json"),
        serde_json::to_string_pretty(&resolved)?,
    )?;
    // Lines past the checkpoint belong to steps that will run again: keep only those before.
    keep_steps_up_to(&metrics_path, start)?;
    keep_steps_up_to(&a.output.join("eval.jsonl"), start)?;
    let what = if a.full {
        "all weights".to_string()
    } else {
        format!("LoRA r={} alpha={}", a.lora_rank, a.lora_alpha)
    };
    eprintln!(
        "training {} on {} samples: {total} steps (from step {start}), loss {}, {what}",
        a.model.display(),
        encoded.len(),
        a.loss.name()
    );
    let every = if a.eval_steps > 0 {
        a.eval_steps
    } else {
        (total / 10).max(1)
    };
    let eval = (!held_out.is_empty()).then_some(HeldOut {
        data: &held_out,
        every,
        batch_size: a.batch_size,
    });
    let profile = a.profile || std::env::var_os("BFT_PROFILE").is_some_and(|v| v == "1");
    let steps = train_loop(
        &mut trainer,
        &a.output,
        a.save_steps,
        eval.as_ref(),
        profile,
    )?;
    if trainer.updates() == 0 {
        bail!(
            "no step of the run had a finite loss and gradient, so the weights never moved; \
             no {} was written (see {})",
            if a.full { "model" } else { "adapter" },
            metrics_path.display()
        );
    }
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
    eprintln!(
        "wrote {}: {} tokens in {:.1} s of optimizer steps ({:.0} tokens/s)",
        a.output.display(),
        steps.tokens,
        steps.seconds,
        steps.tokens as f64 / steps.seconds.max(1e-9)
    );
    Ok(())
}

/// The held-out set: --eval-data encoded, or a seeded --val-ratio share taken out of `train`.
fn held_out(
    a: &TrainArgs,
    m: &bft_model::LoadedModel,
    template: &bft_model::ChatTemplate,
    train: &mut Vec<Encoded>,
) -> Result<Vec<Encoded>> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    if let Some(path) = &a.eval_data {
        return Ok(crate::cli::read_encoded(m, template, path, a.skip_bad_rows, a.cutoff_len)?.1);
    }
    if a.val_ratio <= 0.0 {
        return Ok(Vec::new());
    }
    if a.val_ratio >= 1.0 || train.len() < 2 {
        bail!(
            "--val-ratio {} leaves no training data ({} samples)",
            a.val_ratio,
            train.len()
        );
    }
    let n = ((a.val_ratio * train.len() as f64).ceil() as usize).min(train.len() - 1);
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(a.seed ^ 0x5eed_e7a1));
    let mut pick = vec![false; train.len()];
    order[..n].iter().for_each(|&i| pick[i] = true);
    // One pass, both sides keeping file order.
    let (held, kept): (Vec<_>, Vec<_>) = std::mem::take(train)
        .into_iter()
        .zip(pick)
        .partition(|(_, p)| *p);
    *train = kept.into_iter().map(|(e, _)| e).collect();
    Ok(held.into_iter().map(|(e, _)| e).collect())
}

/// Keeps only the JSONL lines whose `step` is at most `step` (a missing file stays missing).
fn keep_steps_up_to(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).with_context(|| format!("writing {}", path.display()))
}

/// Held-out data measured during training.
pub struct HeldOut<'a> {
    pub data: &'a [Encoded],
    /// Evaluate every this many steps (and at the end).
    pub every: u64,
    pub batch_size: usize,
}

/// Tokens and seconds of the optimizer steps a `train_loop` ran (evaluation and checkpoints
/// excluded).
pub struct StepTotals {
    pub tokens: usize,
    pub seconds: f64,
}

/// Runs the remaining steps: appends to `dir/metrics.jsonl` (and `dir/eval.jsonl`), shows
/// progress, checkpoints every `save_steps` and at the end, and draws `dir/loss.svg`.
pub fn train_loop(
    t: &mut Trainer,
    dir: &Path,
    save_steps: u64,
    held_out: Option<&HeldOut>,
    profile: bool,
) -> Result<StepTotals> {
    use bft_trainer::loss::{GroupConfig, Sft};
    let append = |p: PathBuf| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))
    };
    let mut metrics = append(dir.join("metrics.jsonl"))?;
    let mut evals = held_out
        .map(|_| append(dir.join("eval.jsonl")))
        .transpose()?;
    let ckpt_dir = dir.join("checkpoints");
    let total = t.total_steps();
    let mut p = Progress::new(total, "train").every_step();
    p.set_position(t.step);
    let mut totals = StepTotals {
        tokens: 0,
        seconds: 0.0,
    };
    // The third step of this process is past the one-time costs of the first two (thread
    // start-up, and the allocator settling on the step's buffer sizes: measured, the second
    // step can still be 15% slower); a shorter run profiles its last step.
    let profiled_step = profile.then(|| (t.step + 3).min(total));
    while t.step < total {
        let profiling = profiled_step == Some(t.step + 1);
        if profiling {
            bft_engine::profile::start();
        }
        let s = t.train_step()?;
        if let Some(prof) = profiling.then(bft_engine::profile::finish).flatten() {
            p.println(&profile_table(&prof, s.step, s.tokens));
        }
        totals.tokens += s.tokens;
        totals.seconds += s.step_time_s;
        writeln!(metrics, "{}", serde_json::to_string(&s)?)?;
        let line = format!(
            "step {}/{total}  loss {:.5}  ce {:.4}  s {:.3}  lr {:.2e}  |g| {:.3}  {:.0} tok/s",
            s.step, s.loss, s.ce, s.s_mean, s.lr, s.grad_norm, s.tokens_per_s
        );
        if s.skipped {
            p.println(&format!("{line}  (skipped: non-finite loss or gradient)"));
        }
        p.inc(&line);
        if let (Some(h), Some(f)) = (held_out, evals.as_mut())
            && (s.step % h.every == 0 || s.step == total)
        {
            let pad = t.config().pad_id;
            let e = bft_trainer::train::evaluate(
                t.model,
                h.data,
                &Sft,
                GroupConfig::default(),
                h.batch_size,
                pad,
            )?;
            writeln!(
                f,
                "{}",
                serde_json::json!({"step": s.step, "eval_ce": e.ce, "samples": h.data.len()})
            )?;
            p.println(&format!(
                "step {}/{total}  held-out ce {:.4} ({} samples)",
                s.step,
                e.ce,
                h.data.len()
            ));
        }
        if (save_steps > 0 && s.step % save_steps == 0) || s.step == total {
            metrics.sync_all()?;
            if let Some(f) = &evals {
                f.sync_all()?;
            }
            t.save_checkpoint(&ckpt_dir)?;
        }
    }
    p.finish();
    let svg = plot::plot_run(dir, &format!("{} ({} steps)", t.variant_name(), total))?;
    eprintln!("loss curve: {}", svg.display());
    Ok(totals)
}

/// The `--profile` report of one step: a row per (op, phase), slowest first, then the time
/// outside ops and the GEMM share.
fn profile_table(p: &bft_engine::profile::Profile, step: u64, tokens: usize) -> String {
    use std::fmt::Write as _;
    let wall = p.wall_seconds.max(1e-12);
    let share = |s: f64| 100.0 * s / wall;
    let mut out = format!(
        "profile of step {step} ({tokens} tokens, {} cores): {:.3} s\n{:<14} {:<9} {:>6} {:>9} {:>7} {:>10}\n",
        cores(),
        p.wall_seconds,
        "op",
        "phase",
        "calls",
        "time (s)",
        "share",
        "MB made"
    );
    for (op, phase, st) in &p.rows {
        // cannot fail: writing to a String.
        writeln!(
            out,
            "{:<14} {:<9} {:>6} {:>9.4} {:>6.1}% {:>10.1}",
            format!("{op:?}"),
            format!("{phase:?}").to_lowercase(),
            st.calls,
            st.seconds,
            share(st.seconds),
            st.bytes as f64 / 1e6
        )
        .expect("String");
    }
    let ops = p.op_seconds();
    let outside = (p.wall_seconds - ops).max(0.0);
    // cannot fail: writing to a String.
    write!(
        out,
        "{:<31} {:>9.4} {:>6.1}%\n{:<31} {:>9.4} {:>6.1}%\n\
         GEMM kernels (f32 and bf16: every matmul, LM head included): {:.4} s = {:.1}% of the step at {:.1} GFLOP/s; \
         the rest, {:.1}%, is not GEMM",
        "in ops",
        ops,
        share(ops),
        "outside ops (tape, optimizer)",
        outside,
        share(outside),
        p.gemm_seconds,
        share(p.gemm_seconds),
        p.gemm_flops / p.gemm_seconds.max(1e-12) / 1e9,
        100.0 - share(p.gemm_seconds)
    )
    .expect("String");
    out
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
