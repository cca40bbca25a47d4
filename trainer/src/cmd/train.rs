//! `bft train`: LoRA or full fine-tuning with any loss variant, checkpoints and resume,
//! held-out evaluation, metrics, a progress bar and a loss-curve plot.

use super::progress::Progress;
use crate::cli::{
    GroupMeanName, LossName, ScheduleName, WeightDType, check_at_least, check_range, check_targets,
};
use anyhow::{Context, Result, bail};
use bft_engine::DType;
use bft_model::load_model;
use std::path::PathBuf;

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
    /// Compute device: cpu, wgpu (the first adapter), wgpu:N, cuda or cuda:N (`bft info` lists
    /// them). On CUDA, bf16 weights make the step bf16 (f32 LoRA masters and optimizer state,
    /// f32 accumulation).
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
    use bft_trainer::run::{RunOptions, split_held_out, steps_for_epochs};
    use bft_trainer::train::Trainable;
    let device = crate::cli::parse_device(&a.device)?;
    if a.output.join("metrics.jsonl").exists() && !a.resume {
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
        .clone()
        .with_context(|| format!("{} has no chat template", a.model.display()))?;
    let (ds, mut encoded) =
        crate::cli::read_encoded(&m, &template, &a.data, a.skip_bad_rows, a.cutoff_len)?;
    let held_out = match &a.eval_data {
        Some(path) => {
            crate::cli::read_encoded(&m, &template, path, a.skip_bad_rows, a.cutoff_len)?.1
        }
        None => split_held_out(&mut encoded, a.val_ratio, a.seed)?,
    };
    check_targets(&encoded, &a.data, a.cutoff_len)?;
    m.model = m
        .model
        .to_device(&device)
        .with_context(|| format!("moving the model to {device}"))?;
    let trainable = if a.full {
        Trainable::Full
    } else {
        Trainable::Lora(bft_model::LoraConfig {
            rank: a.lora_rank,
            alpha: a.lora_alpha,
            dropout: a.lora_dropout,
            targets: bft_model::LoraConfig::parse_targets(&a.lora_targets)?,
        })
    };
    let total = a
        .max_steps
        .unwrap_or_else(|| steps_for_epochs(encoded.len(), a.batch_size, a.grad_accum, a.epochs));
    let warmup = (a.warmup_ratio * total as f64).ceil() as u64;
    let resolved = serde_json::json!({
        "args": &a, "total_steps": total, "warmup_steps": warmup, "samples": encoded.len(),
        "data_format": format!("{:?}", ds.format), "skipped_rows": ds.skipped,
        "held_out_samples": held_out.len(),
    });
    let opts = RunOptions {
        output: a.output.clone(),
        steps: total,
        lr: a.lr,
        warmup_ratio: a.warmup_ratio,
        decay: a.schedule.into(),
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_grad_norm: a.max_grad_norm,
        weight_decay: a.weight_decay,
        seed: a.seed,
        save_steps: a.save_steps,
        keep_last: a.keep_last,
        trainable,
        group,
        eval_every: a.eval_steps,
        resume: a.resume,
        profile: a.profile || std::env::var_os("BFT_PROFILE").is_some_and(|v| v == "1"),
        checkpointing: a.checkpointing,
        base_model: a.model.display().to_string(),
        files: vec![
            (
                "config.toml".into(),
                toml::to_string(&a).context("writing the resolved options as TOML")?,
            ),
            (
                "run_config.json".into(),
                serde_json::to_string_pretty(&resolved)?,
            ),
        ],
    };
    let what = if a.full {
        "all weights".to_string()
    } else {
        format!("LoRA r={} alpha={}", a.lora_rank, a.lora_alpha)
    };
    let mut obs = TrainProgress::new(format!(
        "training {} on {} samples: {total} steps, loss {}, {what}",
        a.model.display(),
        encoded.len(),
        a.loss.name()
    ));
    let summary = bft_trainer::run::train(
        &mut m,
        &encoded,
        &held_out,
        variant.as_ref(),
        &opts,
        &mut obs,
    )?;
    obs.finish();
    eprintln!(
        "loss curve: {}\nwrote {}: {} tokens in {:.1} s of optimizer steps ({:.0} tokens/s)",
        a.output.join("loss.svg").display(),
        a.output.display(),
        summary.tokens,
        summary.step_seconds,
        summary.tokens_per_s
    );
    Ok(())
}

/// The progress of a run on stderr: a bar (or a line a step without a terminal), skipped
/// steps, held-out cross-entropy and the `--profile` table.
pub struct TrainProgress {
    intro: String,
    bar: Option<Progress>,
}

impl TrainProgress {
    /// `intro` is printed when the run starts.
    pub fn new(intro: String) -> TrainProgress {
        TrainProgress { intro, bar: None }
    }

    pub fn finish(&self) {
        if let Some(p) = &self.bar {
            p.finish();
        }
    }

    fn println(&self, line: &str) {
        match &self.bar {
            Some(p) => p.println(line),
            None => eprintln!("{line}"),
        }
    }
}

impl bft_trainer::run::Observer for TrainProgress {
    fn started(&mut self, total: u64, start: u64, _samples: usize) {
        let from = if start > 0 {
            format!(" (resuming at step {start})")
        } else {
            String::new()
        };
        eprintln!("{}{from}", self.intro);
        let mut p = Progress::new(total, "train").every_step();
        p.set_position(start);
        self.bar = Some(p);
    }

    fn step(&mut self, s: &bft_trainer::train::StepMetrics, total: u64) {
        let line = format!(
            "step {}/{total}  loss {:.5}  ce {:.4}  s {:.3}  lr {:.2e}  |g| {:.3}  {:.0} tok/s",
            s.step, s.loss, s.ce, s.s_mean, s.lr, s.grad_norm, s.tokens_per_s
        );
        if s.skipped {
            self.println(&format!("{line}  (skipped: non-finite loss or gradient)"));
        }
        if let Some(p) = self.bar.as_mut() {
            p.inc(&line);
        }
    }

    fn evaluated(&mut self, step: u64, eval_ce: f64, samples: usize) {
        self.println(&format!(
            "step {step}  held-out ce {eval_ce:.4} ({samples} samples)"
        ));
    }

    fn profiled(&mut self, p: &bft_engine::profile::Profile, s: &bft_trainer::train::StepMetrics) {
        self.println(&profile_table(p, s.step, s.tokens));
    }
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
