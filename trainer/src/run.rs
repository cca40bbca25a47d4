//! A whole training run behind one call: [`train`] takes a model, encoded data, any
//! [`LossVariant`] and [`RunOptions`], and does what `bft train` does: LoRA attachment, the
//! warm-up schedule, exact accumulation, held-out cross-entropy, `metrics.jsonl` and
//! `eval.jsonl`, crash-safe checkpoints and resume, the adapter (PEFT) or full weights, the loss
//! curve and a `summary.json`. The `bft` binary, `bft sweep` and a researcher's own binary all
//! train through it; an [`Observer`] sees the steps (progress bars, logs) without owning the
//! loop.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use bft_trainer::{loss, run};
//! let mut m = bft_model::load_model("model.gguf".as_ref(), bft_engine::DType::F32)?;
//! let template = m.template.clone().ok_or("no chat template")?;
//! let ds = bft_trainer::data::read_jsonl("train.jsonl".as_ref(), false)?;
//! let data = bft_trainer::data::encode_all(&ds.conversations, &m.tokenizer, &template, &m.eos_token, 512)?;
//! let variant = loss::builtin("bft", loss::VariantParams::default())?;
//! let summary = run::train(&mut m, &data, &[], variant.as_ref(), &run::RunOptions::new("out", 100), &mut run::Quiet)?;
//! println!("{} tokens/s", summary.tokens_per_s);
//! # Ok(()) }
//! ```

use crate::data::{Encoded, count_targets};
use crate::loss::{GroupConfig, LossVariant, Sft};
use crate::optim::{AdamWConfig, Decay, Schedule};
use crate::train::{StepMetrics, TrainConfig, TrainError, Trainable, Trainer, evaluate};
use bft_model::{LoadedModel, LoraConfig};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

type Result<T> = std::result::Result<T, TrainError>;

/// How a run trains and where it writes. [`RunOptions::new`] gives `bft train`'s defaults.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The run's directory: metrics.jsonl, eval.jsonl, checkpoints/, adapter/, loss.svg,
    /// summary.json.
    pub output: PathBuf,
    /// Optimizer steps (see [`steps_for_epochs`]).
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Share of the steps spent warming the learning rate up from 0.
    pub warmup_ratio: f64,
    pub decay: Decay,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    /// Seeds the data order, LoRA initialisation and dropout.
    pub seed: u64,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_steps: u64,
    pub keep_last: usize,
    /// LoRA adapters (attached by the run) or every weight.
    pub trainable: Trainable,
    /// The window of the per-sample statistics (`p_conf`) recorded for every variant.
    pub group: GroupConfig,
    /// Held-out evaluation every this many steps and at the end (0: a tenth of the run).
    pub eval_every: u64,
    /// Continue from `output/checkpoints/latest` if there is one; without it a directory that
    /// already holds a run is refused.
    pub resume: bool,
    /// Profile one step (the third this process runs) and hand it to `Observer::profiled`.
    pub profile: bool,
    /// Recompute each layer in the backward pass (less memory, more compute).
    pub checkpointing: bool,
    /// The base model's name, recorded in the adapter's config.
    pub base_model: String,
    /// Files written into `output` once the run has been checked and is about to start:
    /// (file name, contents), e.g. the caller's resolved configuration.
    pub files: Vec<(String, String)>,
}

impl RunOptions {
    /// `bft train`'s defaults: LoRA r=16, alpha=32 on every projection, lr 1e-4 with 3% warm-up
    /// and cosine decay, batches of 4, clipping at 1, BFT's window 256 for the statistics.
    pub fn new(output: impl Into<PathBuf>, steps: u64) -> RunOptions {
        RunOptions {
            output: output.into(),
            steps,
            lr: 1e-4,
            warmup_ratio: 0.03,
            decay: Decay::Cosine,
            batch_size: 4,
            grad_accum: 1,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            seed: 42,
            save_steps: 0,
            keep_last: 2,
            trainable: Trainable::Lora(LoraConfig {
                rank: 16,
                alpha: 32.0,
                dropout: 0.0,
                // cannot fail: "all" is a constant the parser accepts.
                targets: LoraConfig::parse_targets("all").expect("`all` parses"),
            }),
            group: GroupConfig::default(),
            eval_every: 0,
            resume: false,
            profile: false,
            checkpointing: false,
            base_model: "base".into(),
            files: Vec::new(),
        }
    }
}

/// Optimizer steps of `epochs` passes over `samples` (at least 1).
pub fn steps_for_epochs(samples: usize, batch_size: usize, grad_accum: usize, epochs: f64) -> u64 {
    let per_epoch = samples.div_ceil((batch_size * grad_accum).max(1)) as u64;
    ((epochs * per_epoch as f64).ceil() as u64).max(1)
}

/// What a run reports as it goes. Every method has an empty default.
pub trait Observer {
    /// The run passed its checks: `total` steps, starting at `start` (a resumed run's step).
    fn started(&mut self, _total: u64, _start: u64, _samples: usize) {}
    /// An optimizer step finished (its line is already in metrics.jsonl).
    fn step(&mut self, _s: &StepMetrics, _total: u64) {}
    /// Held-out cross-entropy measured after `step` (0: before training).
    fn evaluated(&mut self, _step: u64, _eval_ce: f64, _samples: usize) {}
    /// The profile of one step (with `RunOptions::profile`).
    fn profiled(&mut self, _p: &bft_engine::profile::Profile, _s: &StepMetrics) {}
}

/// An observer that reports nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// The outcome of a run, also written to `output/summary.json`. Totals cover every step of
/// the run, those of an interrupted process before a resume included.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunSummary {
    pub variant: String,
    pub steps: u64,
    /// The step this process started from (0, or a resumed checkpoint's).
    pub resumed_from: u64,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped_steps: u64,
    /// Input tokens trained on (padding excluded).
    pub tokens: usize,
    /// Seconds spent in optimizer steps (evaluation and checkpoints excluded).
    pub step_seconds: f64,
    pub tokens_per_s: f64,
    /// Wall time of this process's part of the run, evaluation and checkpoints included.
    pub wall_seconds: f64,
    /// Mean training cross-entropy over the last tenth of the steps.
    pub final_train_ce: f64,
    /// Held-out cross-entropy before the first step and after the last (with held-out data).
    pub eval_ce_start: Option<f64>,
    pub eval_ce: Option<f64>,
    pub held_out_samples: usize,
    /// The adapter directory (LoRA) or the model file (full fine-tuning).
    pub weights: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |error| TrainError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Trains `model` on `data` under `variant` as `opts` says, measuring `held_out` (may be
/// empty). Everything is checked, and a checkpoint to resume read, before anything is written.
pub fn train(
    model: &mut LoadedModel,
    data: &[Encoded],
    held_out: &[Encoded],
    variant: &dyn LossVariant,
    opts: &RunOptions,
    obs: &mut dyn Observer,
) -> Result<RunSummary> {
    let wall = Instant::now();
    let out = &opts.output;
    let metrics_path = out.join("metrics.jsonl");
    if metrics_path.exists() && !opts.resume {
        return Err(TrainError::Config(format!(
            "{} already holds a run; resume it or choose a new output directory",
            out.display()
        )));
    }
    if count_targets(data) == 0 {
        return Err(TrainError::Config(format!(
            "no response token to train on in {} samples (are the sequences cut before the replies?)",
            data.len()
        )));
    }
    if !(0.0..=1.0).contains(&opts.warmup_ratio) {
        return Err(TrainError::Config(format!(
            "warmup_ratio {} is out of range: it must be between 0 and 1",
            opts.warmup_ratio
        )));
    }
    if let Trainable::Lora(cfg) = &opts.trainable {
        model.model.attach_lora(cfg, opts.seed)?;
    }
    model.model.checkpointing = opts.checkpointing;
    let total = opts.steps;
    let warmup = (opts.warmup_ratio * total as f64).ceil() as u64;
    let pad_id = model.stop_ids.first().copied().unwrap_or(0);
    let cfg = TrainConfig {
        batch_size: opts.batch_size,
        grad_accum: opts.grad_accum,
        total_steps: total,
        schedule: Schedule {
            base_lr: opts.lr,
            warmup_steps: warmup,
            total_steps: total,
            decay: opts.decay,
        },
        adamw: AdamWConfig {
            weight_decay: opts.weight_decay,
            ..Default::default()
        },
        max_grad_norm: opts.max_grad_norm,
        seed: opts.seed,
        save_steps: opts.save_steps,
        keep_last: opts.keep_last,
        pad_id,
        analysis: opts.group,
        max_bad_steps: 5,
    };
    let mut t = Trainer::new(&mut model.model, data, cfg, variant, opts.trainable.clone())?;
    let ckpt_dir = out.join("checkpoints");
    let start = if opts.resume {
        t.resume(&ckpt_dir)?.unwrap_or(0)
    } else {
        0
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    for (name, text) in &opts.files {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(io(&p))?;
    }
    // Lines past the checkpoint belong to steps that will run again: keep only those before.
    let eval_path = out.join("eval.jsonl");
    keep_steps_up_to(&metrics_path, start)?;
    keep_steps_up_to(&eval_path, start)?;
    obs.started(total, start, data.len());
    let every = if opts.eval_every > 0 {
        opts.eval_every
    } else {
        (total / 10).max(1)
    };
    let append = |p: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(io(p))
    };
    let mut metrics = append(&metrics_path)?;
    let mut evals = (!held_out.is_empty())
        .then(|| append(&eval_path))
        .transpose()?;
    let measure =
        |t: &Trainer, step: u64, f: &mut std::fs::File, obs: &mut dyn Observer| -> Result<()> {
            let e = evaluate(
                t.model,
                held_out,
                &Sft,
                GroupConfig::default(),
                opts.batch_size,
                pad_id,
            )?;
            let line =
                serde_json::json!({"step": step, "eval_ce": e.ce, "samples": held_out.len()});
            writeln!(f, "{line}").map_err(io(&eval_path))?;
            obs.evaluated(step, e.ce, held_out.len());
            Ok(())
        };
    if start == 0
        && let Some(f) = evals.as_mut()
    {
        measure(&t, 0, f, obs)?;
    }
    // The third step of this process is past the one-time costs of the first two (thread
    // start-up, and the allocator settling on the step's buffer sizes: measured, the second
    // step can still be 15% slower); a shorter run profiles its last step.
    let profiled_step = opts.profile.then(|| (t.step + 3).min(total));
    while t.step < total {
        let profiling = profiled_step == Some(t.step + 1);
        if profiling {
            bft_engine::profile::start();
        }
        let s = t.train_step()?;
        if let Some(prof) = profiling.then(bft_engine::profile::finish).flatten() {
            obs.profiled(&prof, &s);
        }
        let line = serde_json::to_string(&s).map_err(|e| TrainError::Config(e.to_string()))?;
        writeln!(metrics, "{line}").map_err(io(&metrics_path))?;
        obs.step(&s, total);
        if let Some(f) = evals.as_mut()
            && (s.step % every == 0 || s.step == total)
        {
            measure(&t, s.step, f, obs)?;
        }
        if (opts.save_steps > 0 && s.step % opts.save_steps == 0) || s.step == total {
            metrics.sync_all().map_err(io(&metrics_path))?;
            if let Some(f) = &evals {
                f.sync_all().map_err(io(&eval_path))?;
            }
            t.save_checkpoint(&ckpt_dir)?;
        }
    }
    if t.updates() == 0 {
        return Err(TrainError::Config(format!(
            "no step of the run had a finite loss and gradient, so the weights never moved; \
             nothing was saved (see {})",
            metrics_path.display()
        )));
    }
    let name = t.variant_name().to_string();
    drop(t);
    let weights = match &opts.trainable {
        Trainable::Lora(cfg) => {
            let dir = out.join("adapter");
            model.model.save_peft(cfg, &opts.base_model, &dir)?;
            dir
        }
        Trainable::Full => {
            let file = out.join("model.safetensors");
            bft_model::weights::write_safetensors(&file, &model.model.named_tensors())?;
            file
        }
    };
    crate::plot::plot_run(out, &format!("{name} ({total} steps)"))
        .map_err(|e| TrainError::Config(e.to_string()))?;
    let summary = summarize(out, &name, start, held_out.len(), weights, wall)?;
    let p = out.join("summary.json");
    let text =
        serde_json::to_string_pretty(&summary).map_err(|e| TrainError::Config(e.to_string()))?;
    std::fs::write(&p, text).map_err(io(&p))?;
    Ok(summary)
}

/// The summary of a finished run from its metrics.jsonl and eval.jsonl.
fn summarize(
    out: &Path,
    variant: &str,
    start: u64,
    held_out_samples: usize,
    weights: PathBuf,
    wall: Instant,
) -> Result<RunSummary> {
    let read = |name: &str| -> Result<Vec<serde_json::Value>> {
        let p = out.join(name);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(&p)(e)),
        };
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    };
    let steps = read("metrics.jsonl")?;
    let evals = read("eval.jsonl")?;
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let tokens: usize = steps
        .iter()
        .map(|s| s["tokens"].as_u64().unwrap_or(0) as usize)
        .sum();
    let step_seconds: f64 = steps.iter().map(|s| f(s, "step_time_s")).sum();
    let tail = &steps[steps.len() - steps.len().div_ceil(10)..];
    let final_train_ce = tail.iter().map(|s| f(s, "ce")).sum::<f64>() / tail.len().max(1) as f64;
    let eval_at = |pick: fn(&[serde_json::Value]) -> Option<&serde_json::Value>| {
        pick(&evals).map(|v| f(v, "eval_ce"))
    };
    Ok(RunSummary {
        variant: variant.to_string(),
        steps: steps.last().and_then(|s| s["step"].as_u64()).unwrap_or(0),
        resumed_from: start,
        skipped_steps: steps.iter().filter(|s| s["skipped"] == true).count() as u64,
        tokens,
        step_seconds,
        tokens_per_s: tokens as f64 / step_seconds.max(1e-9),
        wall_seconds: wall.elapsed().as_secs_f64(),
        final_train_ce,
        eval_ce_start: eval_at(|e| e.iter().find(|v| v["step"] == 0)),
        eval_ce: eval_at(|e| e.last()),
        held_out_samples,
        weights,
    })
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
    std::fs::write(path, kept).map_err(io(path))
}

/// A seeded `ratio` share of `train` taken out as held-out data (both keep file order); at
/// least one sample stays in each. The draw depends only on the length and the seed, so
/// encoded samples and their conversations split alike.
pub fn split_held_out<T>(train: &mut Vec<T>, ratio: f64, seed: u64) -> Result<Vec<T>> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    if ratio <= 0.0 {
        return Ok(Vec::new());
    }
    if ratio >= 1.0 || train.len() < 2 {
        return Err(TrainError::Config(format!(
            "a held-out share of {ratio} leaves no training data ({} samples)",
            train.len()
        )));
    }
    let n = ((ratio * train.len() as f64).ceil() as usize).min(train.len() - 1);
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_e7a1));
    let mut pick = vec![false; train.len()];
    order[..n].iter().for_each(|&i| pick[i] = true);
    let (held, kept): (Vec<_>, Vec<_>) = std::mem::take(train)
        .into_iter()
        .zip(pick)
        .partition(|(_, p)| *p);
    *train = kept.into_iter().map(|(e, _)| e).collect();
    Ok(held.into_iter().map(|(e, _)| e).collect())
}
