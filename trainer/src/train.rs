//! The training loop: exact gradient accumulation over micro-batches through the fused loss,
//! AdamW with a warm-up schedule and clipping, NaN/Inf steps skipped and reported, and
//! crash-safe checkpoints from which a resumed run continues bit-identically on CPU.
//!
//! Everything a step does is a function of (seed, step): the data position, the LoRA dropout
//! masks and the learning rate. A checkpoint therefore needs only the weights, the optimizer
//! state and the step count to resume exactly.

use crate::batch::{epoch_batches, make_batch};
use crate::data::Encoded;
use crate::loss::{
    GroupConfig, LossBatch, LossOptions, LossVariant, Reduction, SampleStats, fused_loss,
};
use crate::optim::{AdamW, AdamWConfig, Schedule, clip_factor, grad_norm};
use bft_engine::{DType, Device, Gradients, Tape, Tensor};
use bft_model::weights::write_safetensors;
use bft_model::{LoraConfig, SafetensorsDir, Transformer, WeightSource};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Engine(#[from] bft_engine::Error),
    #[error(transparent)]
    Model(#[from] bft_model::Error),
    #[error(transparent)]
    Loss(#[from] crate::loss::LossError),
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{0} consecutive steps had a non-finite loss or gradient; stopping (last: step {1})")]
    Diverged(u32, u64),
    #[error("training: {0}")]
    Config(String),
}

type Result<T> = std::result::Result<T, TrainError>;

/// What is trained: LoRA adapters (the base frozen) or every weight.
#[derive(Clone, Debug, PartialEq)]
pub enum Trainable {
    Lora(LoraConfig),
    Full,
}

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub grad_accum: usize,
    pub total_steps: u64,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this (0 disables clipping).
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_steps: u64,
    /// Checkpoints kept on disk.
    pub keep_last: usize,
    pub pad_id: u32,
    pub analysis: GroupConfig,
    /// Consecutive non-finite steps tolerated before stopping.
    pub max_bad_steps: u32,
}

impl TrainConfig {
    /// Refuses settings no run can use: zero sizes, negative or non-finite rates and norms.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        for (name, v) in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("keep_last", self.keep_last),
            ("max_bad_steps", self.max_bad_steps as usize),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if self.total_steps == 0 {
            return bad("total_steps must be at least 1".into());
        }
        if self.analysis.window == 0 {
            return bad("the group window must be at least 1 token".into());
        }
        let a = &self.adamw;
        for (name, v, ok) in [
            (
                "learning rate",
                self.schedule.base_lr,
                self.schedule.base_lr >= 0.0,
            ),
            (
                "max_grad_norm",
                self.max_grad_norm,
                self.max_grad_norm >= 0.0,
            ),
            ("weight_decay", a.weight_decay, a.weight_decay >= 0.0),
            ("beta1", a.beta1, (0.0..1.0).contains(&a.beta1)),
            ("beta2", a.beta2, (0.0..1.0).contains(&a.beta2)),
            ("eps", a.eps, a.eps > 0.0),
        ] {
            if !(v.is_finite() && ok) {
                return bad(format!("{name} {v} is out of range"));
            }
        }
        Ok(())
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, serde::Serialize, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    /// The weighted (BFT/DFT/...) loss of the step.
    pub loss: f64,
    /// Plain cross-entropy, mean over the step's samples.
    pub ce: f64,
    pub s_mean: f64,
    pub w_mean: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Input tokens processed (padding excluded).
    pub tokens: usize,
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    /// True when a non-finite loss or gradient made the step skip its update.
    pub skipped: bool,
    /// Each sample's weight `s_b`, in the step's sample order.
    pub sample_weights: Vec<f64>,
    /// Each sample's mean token weight, in the same order.
    pub token_weights: Vec<f64>,
}

/// A dataset's loss under a variant and its plain cross-entropy, without gradients.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// The variant's loss over the whole set (exact reduction over all samples).
    pub loss: f64,
    /// Mean per-sample cross-entropy (nats per target token).
    pub ce: f64,
    pub samples: Vec<SampleStats>,
}

/// Evaluates `data` under `model` in batches of `batch_size` (padding with `pad_id`).
pub fn evaluate(
    model: &Transformer,
    data: &[Encoded],
    variant: &dyn LossVariant,
    group: GroupConfig,
    batch_size: usize,
    pad_id: u32,
) -> Result<Evaluation> {
    let opts = LossOptions {
        reduction: Reduction::Exact {
            step_samples: Some(data.len()),
        },
        analysis: group,
        // `bft score` and `bft analyze` report every token's log-prob.
        weigh_on_device: false,
    };
    let (mut loss, mut samples) = (0.0, Vec::new());
    for chunk in data.chunks(batch_size.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let batch = make_batch(&refs, pad_id)?;
        let hidden = model.hidden(&batch.ids)?;
        let lb = LossBatch {
            hidden: &hidden,
            head: model.head(),
            targets: &batch.targets,
            mask: &batch.mask,
        };
        let out = fused_loss(lb, variant, opts)?;
        loss += out.loss.to_scalar()?;
        samples.extend(out.samples);
    }
    let ce = samples.iter().map(|s| s.ce).sum::<f64>() / samples.len().max(1) as f64;
    Ok(Evaluation { loss, ce, samples })
}

/// A run in progress over a model and encoded data.
pub struct Trainer<'a> {
    pub model: &'a mut Transformer,
    data: &'a [Encoded],
    cfg: TrainConfig,
    variant: &'a dyn LossVariant,
    trainable: Trainable,
    opt: AdamW,
    /// Optimizer steps taken (skipped ones included).
    pub step: u64,
    bad_streak: u32,
    /// The current epoch's effective batches, cached: (epoch, batches).
    epoch: Option<(u64, Vec<Vec<usize>>)>,
    lengths: Vec<usize>,
}

fn trainable_params<'m>(model: &'m mut Transformer, t: &Trainable) -> Vec<&'m mut Tensor> {
    match t {
        Trainable::Lora(_) => model.lora_tensors_mut(),
        Trainable::Full => model.params_mut(),
    }
}

impl<'a> Trainer<'a> {
    /// Prepares a run; with LoRA the adapters must already be attached (`attach_lora`).
    pub fn new(
        model: &'a mut Transformer,
        data: &'a [Encoded],
        cfg: TrainConfig,
        variant: &'a dyn LossVariant,
        trainable: Trainable,
    ) -> Result<Self> {
        cfg.check()?;
        if data.is_empty() {
            return Err(TrainError::Config("no training samples".into()));
        }
        let params = trainable_params(model, &trainable);
        if params.is_empty() {
            return Err(TrainError::Config(
                "nothing to train: attach LoRA adapters or train all weights".into(),
            ));
        }
        let refs: Vec<&Tensor> = params.iter().map(|p| &**p).collect();
        let opt = AdamW::new(cfg.adamw, &refs)?;
        let lengths = data.iter().map(|e| e.ids.len()).collect();
        Ok(Trainer {
            model,
            data,
            cfg,
            variant,
            trainable,
            opt,
            step: 0,
            bad_streak: 0,
            epoch: None,
            lengths,
        })
    }

    /// The micro-batches (sample indices) of optimizer step `step`. The step's samples are
    /// drawn and grouped by length as one effective batch of `batch_size * grad_accum`, then
    /// split: `--batch-size 4` and `--batch-size 2 --grad-accum 2` train on the same samples.
    fn micro_batches(&mut self, step: u64) -> Vec<Vec<usize>> {
        let effective = self.cfg.batch_size * self.cfg.grad_accum;
        let per_epoch = self.data.len().div_ceil(effective) as u64;
        let (epoch, i) = (step / per_epoch, (step % per_epoch) as usize);
        if self.epoch.as_ref().is_some_and(|(e, _)| *e != epoch) {
            self.epoch = None;
        }
        let (lengths, seed) = (&self.lengths, self.cfg.seed);
        let (_, batches) = self
            .epoch
            .get_or_insert_with(|| (epoch, epoch_batches(lengths, effective, seed, epoch)));
        batches[i]
            .chunks(self.cfg.batch_size)
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// One optimizer step over `grad_accum` micro-batches.
    ///
    /// On the CPU, call it from a rayon worker (inside `rayon::scope` or
    /// `ThreadPool::install`, as the `bft` binary runs every command): each parallel kernel
    /// then forks inside the pool instead of being handed over from the calling thread, which
    /// made a SmolLM2 step about 6% slower on 2 cores.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let t0 = Instant::now();
        let step = self.step;
        let micro = self.micro_batches(step);
        let step_samples: usize = micro.iter().map(Vec::len).sum();
        let tape = Tape::new();
        let mut grads = Gradients::default();
        let (mut loss, mut ce, mut tokens) = (0.0, 0.0, 0);
        let (mut sample_weights, mut token_weights) = (Vec::new(), Vec::new());
        for (j, idx) in micro.iter().enumerate() {
            let samples: Vec<&Encoded> = idx.iter().map(|&i| &self.data[i]).collect();
            let batch = make_batch(&samples, self.cfg.pad_id)?;
            tokens += samples.iter().map(|s| s.ids.len()).sum::<usize>();
            for p in trainable_params(self.model, &self.trainable) {
                *p = tape.track(p);
            }
            let seed = self.cfg.seed
                ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (j as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let hidden = self.model.hidden_train(&batch.ids, seed)?;
            // A step reads back per-sample numbers only: on a GPU the weights are computed
            // there, and no per-token log-prob is needed.
            let opts = LossOptions {
                reduction: Reduction::Exact {
                    step_samples: Some(step_samples),
                },
                analysis: self.cfg.analysis,
                weigh_on_device: true,
            };
            let lb = LossBatch {
                hidden: &hidden,
                head: self.model.head(),
                targets: &batch.targets,
                mask: &batch.mask,
            };
            let out = fused_loss(lb, self.variant, opts)?;
            loss += out.loss.to_scalar()?;
            for s in &out.samples {
                ce += s.ce;
                sample_weights.push(s.s_b);
                token_weights.push(s.w_mean);
            }
            tape.backward_into(&out.loss, &mut grads)?;
        }
        let lr = self.cfg.schedule.lr(step);
        let params = trainable_params(self.model, &self.trainable);
        let g: Vec<Tensor> = params
            .iter()
            .map(|p| {
                grads.get(p).cloned().map_or_else(
                    || Tensor::zeros(p.dims().to_vec(), p.dtype(), &p.device()),
                    Ok,
                )
            })
            .collect::<bft_engine::Result<_>>()?;
        let grad_norm = grad_norm(&g)?;
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        let mut params = params;
        if skipped {
            self.bad_streak += 1;
            if self.bad_streak >= self.cfg.max_bad_steps {
                return Err(TrainError::Diverged(self.bad_streak, step));
            }
        } else {
            self.bad_streak = 0;
            let scale = clip_factor(grad_norm, self.cfg.max_grad_norm);
            self.opt.update(&mut params, &g, lr, scale)?;
        }
        // The parameters leave this step untracked: the next step tracks them on a new tape.
        for p in params {
            *p = p.stop_gradient();
        }
        self.step += 1;
        let dt = t0.elapsed().as_secs_f64();
        let n = step_samples as f64;
        Ok(StepMetrics {
            step: self.step,
            loss,
            ce: ce / n,
            s_mean: sample_weights.iter().sum::<f64>() / n,
            w_mean: token_weights.iter().sum::<f64>() / n,
            lr,
            grad_norm,
            tokens,
            step_time_s: dt,
            tokens_per_s: tokens as f64 / dt.max(1e-9),
            skipped,
            sample_weights,
            token_weights,
        })
    }

    /// Writes `dir/checkpoint-<step>` completely (temporary name, fsynced, renamed), then points
    /// `dir/latest` at it, then drops checkpoints beyond `keep_last`.
    pub fn save_checkpoint(&mut self, dir: &Path) -> Result<PathBuf> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |error| TrainError::Io { path, error }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let name = format!("checkpoint-{}", self.step);
        let (tmp, done) = (dir.join(format!(".{name}.partial")), dir.join(&name));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        match &self.trainable {
            Trainable::Lora(cfg) => self.model.save_peft(cfg, "bft", &tmp.join("adapter"))?,
            Trainable::Full => {
                write_safetensors(&tmp.join("model.safetensors"), &self.model.named_tensors())?
            }
        }
        fault_point(CheckpointPhase::Weights, self.step);
        let mut moments: Vec<(String, Tensor)> = Vec::new();
        for (i, (m, v)) in self.opt.m.iter().zip(&self.opt.v).enumerate() {
            moments.push((format!("m.{i}"), m.to_device(&Device::Cpu)?));
            moments.push((format!("v.{i}"), v.to_device(&Device::Cpu)?));
        }
        let refs: Vec<(String, &Tensor)> = moments.iter().map(|(n, t)| (n.clone(), t)).collect();
        write_safetensors(&tmp.join("optimizer.safetensors"), &refs)?;
        fault_point(CheckpointPhase::Optimizer, self.step);
        let state = serde_json::json!({ "step": self.step, "adam_step": self.opt.step, "seed": self.cfg.seed });
        write_synced(&tmp.join("state.json"), state.to_string().as_bytes())?;
        fault_point(CheckpointPhase::State, self.step);
        if done.exists() {
            std::fs::remove_dir_all(&done).map_err(io(&done))?;
        }
        std::fs::rename(&tmp, &done).map_err(io(&done))?;
        sync_dir(dir)?;
        fault_point(CheckpointPhase::Renamed, self.step);
        // `latest` is replaced atomically and only ever names a complete checkpoint.
        let latest_tmp = dir.join(".latest.partial");
        write_synced(&latest_tmp, name.as_bytes())?;
        fault_point(CheckpointPhase::LatestWritten, self.step);
        std::fs::rename(&latest_tmp, dir.join("latest")).map_err(io(dir))?;
        sync_dir(dir)?;
        fault_point(CheckpointPhase::LatestRenamed, self.step);
        let mut steps: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("checkpoint-")?
                    .parse()
                    .ok()
            })
            .collect();
        steps.sort_unstable();
        let drop = steps.len().saturating_sub(self.cfg.keep_last.max(1));
        for s in steps.into_iter().take(drop).filter(|&s| s != self.step) {
            let old = dir.join(format!("checkpoint-{s}"));
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        Ok(done)
    }

    /// Continues from `dir/latest` if there is one; returns the step resumed at.
    pub fn resume(&mut self, dir: &Path) -> Result<Option<u64>> {
        let latest = dir.join("latest");
        let Ok(name) = std::fs::read_to_string(&latest) else {
            return Ok(None);
        };
        let ck = dir.join(name.trim());
        let bad = |msg: String| TrainError::Checkpoint {
            path: ck.clone(),
            msg,
        };
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(ck.join("state.json"))
                .map_err(|e| bad(format!("state.json: {e}")))?,
        )
        .map_err(|e| bad(format!("state.json: {e}")))?;
        let step = state["step"]
            .as_u64()
            .ok_or_else(|| bad("state.json has no step".into()))?;
        if state["seed"].as_u64() != Some(self.cfg.seed) {
            return Err(bad(format!(
                "it was written with seed {}, this run uses {}",
                state["seed"], self.cfg.seed
            )));
        }
        match &self.trainable {
            Trainable::Lora(cfg) => {
                let loaded = self.model.load_peft(&ck.join("adapter"))?;
                if &loaded != cfg {
                    return Err(bad(format!(
                        "its LoRA settings {loaded:?} differ from this run's {cfg:?}"
                    )));
                }
            }
            Trainable::Full => {
                let file = SafetensorsDir::open_file(&ck.join("model.safetensors"))?;
                let names: Vec<String> = self
                    .model
                    .named_tensors()
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect();
                for (name, p) in names.iter().zip(self.model.params_mut()) {
                    let t = file
                        .tensor(name)?
                        .ok_or_else(|| bad(format!("missing {name}")))?;
                    if t.dims() != p.dims() {
                        return Err(bad(format!(
                            "{name} has shape {:?}, the model's is {:?}",
                            t.dims(),
                            p.dims()
                        )));
                    }
                    if let Some((i, v)) = t.first_non_finite()? {
                        return Err(bad(format!("{name} holds {v} at flat index {i}")));
                    }
                    *p = t.to_dtype(p.dtype())?.to_device(&p.device())?;
                }
            }
        }
        let moments = SafetensorsDir::open_file(&ck.join("optimizer.safetensors"))?;
        for i in 0..self.opt.m.len() {
            for (kind, dst) in [("m", &mut self.opt.m[i]), ("v", &mut self.opt.v[i])] {
                let t = moments
                    .tensor(&format!("{kind}.{i}"))?
                    .ok_or_else(|| bad(format!("missing optimizer {kind}.{i}")))?;
                if t.numel() != dst.numel() {
                    return Err(bad(format!(
                        "optimizer {kind}.{i} has {} values, expected {}",
                        t.numel(),
                        dst.numel()
                    )));
                }
                if let Some((at, v)) = t.first_non_finite()? {
                    return Err(bad(format!("optimizer {kind}.{i} holds {v} at index {at}")));
                }
                *dst = t
                    .to_dtype(DType::F32)?
                    .reshape([dst.numel()])?
                    .to_device(&dst.device())?;
            }
        }
        self.opt.step = state["adam_step"].as_u64().unwrap_or(step);
        self.step = step;
        Ok(Some(step))
    }

    /// Optimizer updates applied so far (steps skipped for a non-finite loss or gradient do
    /// not count; a resumed run counts those before its checkpoint). Zero means the trainable
    /// weights are still the ones the run started from.
    pub fn updates(&self) -> u64 {
        self.opt.step
    }

    pub fn total_steps(&self) -> u64 {
        self.cfg.total_steps
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The loss variant's name.
    pub fn variant_name(&self) -> &str {
        self.variant.name()
    }
}

/// The moments of a checkpoint write at which `BFT_FAULT_CHECKPOINT` can stop the process, in
/// the order they happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointPhase {
    /// The weights (adapter or full model) are in the temporary directory.
    Weights,
    /// The optimizer moments too.
    Optimizer,
    /// `state.json` too: the temporary directory is complete but not yet renamed.
    State,
    /// Renamed to `checkpoint-N`; `latest` still names the previous checkpoint.
    Renamed,
    /// The new `latest` is written under its temporary name, not yet renamed.
    LatestWritten,
    /// `latest` names the new checkpoint; older ones are not yet pruned.
    LatestRenamed,
}

impl CheckpointPhase {
    /// The name `BFT_FAULT_CHECKPOINT` takes.
    pub fn name(self) -> &'static str {
        match self {
            CheckpointPhase::Weights => "weights",
            CheckpointPhase::Optimizer => "optimizer",
            CheckpointPhase::State => "state",
            CheckpointPhase::Renamed => "renamed",
            CheckpointPhase::LatestWritten => "latest-written",
            CheckpointPhase::LatestRenamed => "latest-renamed",
        }
    }
}

/// Fault injection for crash tests: with `BFT_FAULT_CHECKPOINT=PHASE@STEP` the process aborts
/// (as a SIGKILL or power loss would end it, with no unwinding or cleanup) when the checkpoint of
/// step STEP reaches PHASE. Crash tests use it to stop a run at an exact point of a checkpoint
/// write, however fast the machine is.
fn fault_point(phase: CheckpointPhase, step: u64) {
    let Some(spec) = std::env::var_os("BFT_FAULT_CHECKPOINT") else {
        return;
    };
    let spec = spec.to_string_lossy();
    let (name, at) = spec.split_once('@').unwrap_or((&spec, ""));
    if name == phase.name() && at.parse() == Ok(step) {
        std::process::abort();
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |error| TrainError::Io {
        path: path.to_owned(),
        error,
    };
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Makes a rename durable: fsync the directory holding it.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|error| TrainError::Io {
            path: dir.to_owned(),
            error,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::Bft;
    use crate::optim::Decay;
    use bft_model::ModelConfig;

    fn model() -> Transformer {
        let cfg = ModelConfig::from_json(
            r#"{"model_type": "llama", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 23}"#,
        )
        .unwrap();
        let mut m = Transformer::random(cfg, 11, DType::F32).unwrap();
        let lora = LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets: LoraConfig::parse_targets("all").unwrap(),
        };
        m.attach_lora(&lora, 3).unwrap();
        m
    }

    /// Samples whose replies follow a learnable rule (each token is the previous + 1).
    fn data() -> Vec<Encoded> {
        (0..10)
            .map(|i| {
                let n = 8 + i % 5;
                let ids: Vec<u32> = (0..n).map(|p| ((i * 3 + p) % 23) as u32).collect();
                let target_mask = (0..n).map(|p| p >= 3).collect();
                Encoded { ids, target_mask }
            })
            .collect()
    }

    fn config(total_steps: u64) -> TrainConfig {
        TrainConfig {
            batch_size: 2,
            grad_accum: 2,
            total_steps,
            schedule: Schedule {
                base_lr: 2e-2,
                warmup_steps: 2,
                total_steps,
                decay: Decay::Cosine,
            },
            adamw: AdamWConfig::default(),
            max_grad_norm: 1.0,
            seed: 5,
            save_steps: 0,
            keep_last: 2,
            pad_id: 0,
            analysis: GroupConfig {
                window: 4,
                ..Default::default()
            },
            max_bad_steps: 5,
        }
    }

    fn lora() -> Trainable {
        Trainable::Lora(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets: LoraConfig::parse_targets("all").unwrap(),
        })
    }

    /// Two runs' steps agree: losses within `loss_rtol` (of the loss, at least 1e-3) and
    /// gradient norms within `norm_rtol`.
    #[track_caller]
    fn assert_steps_agree(
        a: &[StepMetrics],
        b: &[StepMetrics],
        loss_rtol: f64,
        norm_rtol: f64,
        what: &str,
    ) {
        assert_eq!(a.len(), b.len(), "{what}: step counts");
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x.loss - y.loss).abs() <= loss_rtol * y.loss.abs().max(1e-3),
                "{what}, step {}: loss {} vs {}",
                y.step,
                x.loss,
                y.loss
            );
            assert!(
                (x.grad_norm - y.grad_norm).abs() <= norm_rtol * y.grad_norm,
                "{what}, step {}: |g| {} vs {}",
                y.step,
                x.grad_norm,
                y.grad_norm
            );
        }
    }

    #[test]
    fn loss_falls_on_a_learnable_task() {
        let (mut m, d, bft) = (
            model(),
            data(),
            Bft {
                group: GroupConfig {
                    window: 4,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        let mut t = Trainer::new(&mut m, &d, config(40), &bft, lora()).unwrap();
        let metrics: Vec<StepMetrics> = (0..40).map(|_| t.train_step().unwrap()).collect();
        let mean = |r: &[StepMetrics]| r.iter().map(|m| m.ce).sum::<f64>() / r.len() as f64;
        let (first, last) = (mean(&metrics[..5]), mean(&metrics[35..]));
        assert!(last < 0.7 * first, "cross-entropy {first} -> {last}");
        assert!(
            metrics
                .iter()
                .all(|m| !m.skipped && m.grad_norm.is_finite() && m.tokens > 0)
        );
        assert_eq!(metrics[0].lr, 0.0, "warm-up starts at 0");
    }

    /// A training step (forward, backward, clipping, AdamW) of the model moved to a wgpu device
    /// matches the CPU: every LoRA weight within 1e-4 of its scale after 3 steps. Skips without
    /// an adapter unless BFT_REQUIRE_WGPU=1.
    #[test]
    fn training_steps_on_wgpu_match_cpu() {
        let dev = bft_engine::Device::Wgpu(0);
        let on_gpu = match model().to_device(&dev) {
            Ok(m) => m,
            Err(e) if std::env::var("BFT_REQUIRE_WGPU").is_ok_and(|v| v == "1") => {
                panic!("BFT_REQUIRE_WGPU=1 but {e}")
            }
            Err(e) => return eprintln!("wgpu skipped: {e}"),
        };
        let (d, bft) = (data(), Bft::default());
        let run = |mut m: Transformer| {
            let mut t = Trainer::new(&mut m, &d, config(3), &bft, lora()).unwrap();
            let metrics: Vec<StepMetrics> = (0..3).map(|_| t.train_step().unwrap()).collect();
            drop(t);
            let lora: Vec<Vec<f32>> = m
                .lora_tensors()
                .iter()
                .map(|(_, t)| t.to_vec::<f32>().unwrap())
                .collect();
            (metrics, lora)
        };
        let (cpu_metrics, cpu_lora) = run(model());
        let (gpu_metrics, gpu_lora) = run(on_gpu);
        assert_steps_agree(&gpu_metrics, &cpu_metrics, 1e-4, 1e-3, "wgpu vs cpu");
        for (k, (g, c)) in gpu_lora.iter().zip(&cpu_lora).enumerate() {
            let scale = c.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            for (i, (a, b)) in g.iter().zip(c).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * scale,
                    "adapter tensor {k}[{i}]: wgpu {a}, cpu {b}"
                );
            }
        }
    }

    #[test]
    fn resumed_run_is_bit_identical_to_an_uninterrupted_one() {
        let (d, bft) = (data(), Bft::default());
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let adapter = |m: &Transformer| -> Vec<Vec<f32>> {
            m.lora_tensors()
                .iter()
                .map(|(_, t)| t.to_vec::<f32>().unwrap())
                .collect()
        };
        let mut whole = model();
        let mut t = Trainer::new(&mut whole, &d, config(6), &bft, lora()).unwrap();
        let uninterrupted: Vec<StepMetrics> = (0..6).map(|_| t.train_step().unwrap()).collect();
        drop(t);
        // Interrupted after step 3: everything but the checkpoint on disk is gone.
        let mut first = model();
        let mut t = Trainer::new(&mut first, &d, config(6), &bft, lora()).unwrap();
        for _ in 0..3 {
            t.train_step().unwrap();
        }
        t.save_checkpoint(&dir).unwrap();
        drop(t);
        let mut resumed = model();
        let mut t = Trainer::new(&mut resumed, &d, config(6), &bft, lora()).unwrap();
        assert_eq!(t.resume(&dir).unwrap(), Some(3));
        let rest: Vec<StepMetrics> = (0..3).map(|_| t.train_step().unwrap()).collect();
        drop(t);
        let strip = |m: &StepMetrics| (m.step, m.loss, m.ce, m.grad_norm, m.lr);
        assert_eq!(
            rest.iter().map(strip).collect::<Vec<_>>(),
            uninterrupted[3..].iter().map(strip).collect::<Vec<_>>()
        );
        assert_eq!(
            adapter(&resumed),
            adapter(&whole),
            "final adapters must be bit-identical"
        );
    }

    /// A checkpoint with a non-finite optimizer moment is refused on resume, naming the
    /// checkpoint and the moment.
    #[test]
    fn corrupt_checkpoints_are_refused_on_resume() {
        let (d, bft) = (data(), Bft::default());
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut m = model();
        let mut t = Trainer::new(&mut m, &d, config(3), &bft, lora()).unwrap();
        t.train_step().unwrap();
        let ck = t.save_checkpoint(&dir).unwrap();
        drop(t);
        let moments = ck.join("optimizer.safetensors");
        let src = SafetensorsDir::open_file(&moments).unwrap();
        let mut named: Vec<(String, Tensor)> = src
            .names()
            .iter()
            .map(|n| (n.to_string(), src.tensor(n).unwrap().unwrap()))
            .collect();
        drop(src);
        let (_, m0) = named.iter_mut().find(|(n, _)| n == "m.0").unwrap();
        let mut v = m0.to_vec::<f32>().unwrap();
        v[2] = f32::NAN;
        *m0 = Tensor::from_vec(v, m0.dims().to_vec(), &Device::Cpu).unwrap();
        let refs: Vec<(String, &Tensor)> = named.iter().map(|(n, t)| (n.clone(), t)).collect();
        write_safetensors(&moments, &refs).unwrap();
        let mut fresh = model();
        let mut t = Trainer::new(&mut fresh, &d, config(3), &bft, lora()).unwrap();
        let err = t.resume(&dir).unwrap_err().to_string();
        assert!(
            err.contains("checkpoint-1") && err.contains("optimizer m.0 holds NaN at index 2"),
            "{err}"
        );
    }

    #[test]
    fn checkpoints_are_pruned_and_latest_names_a_complete_one() {
        let (mut m, d, bft) = (model(), data(), Bft::default());
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut t = Trainer::new(&mut m, &d, config(4), &bft, lora()).unwrap();
        for _ in 0..4 {
            t.train_step().unwrap();
            t.save_checkpoint(&dir).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["checkpoint-3", "checkpoint-4", "latest"]);
        assert_eq!(
            std::fs::read_to_string(dir.join("latest")).unwrap(),
            "checkpoint-4"
        );
        for f in [
            "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json",
            "optimizer.safetensors",
            "state.json",
        ] {
            assert!(dir.join("checkpoint-4").join(f).exists(), "{f}");
        }
    }

    /// The model of `model()` in f64 with dropout-free adapters: the same run however it is
    /// split, up to f64 rounding.
    fn model_without_dropout() -> Transformer {
        let cfg = ModelConfig::from_json(
            r#"{"model_type": "llama", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 23}"#,
        )
        .unwrap();
        let mut m = Transformer::random(cfg, 11, DType::F64).unwrap();
        m.attach_lora(&lora_config(0.0), 3).unwrap();
        m
    }

    fn lora_config(dropout: f64) -> LoraConfig {
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout,
            targets: LoraConfig::parse_targets("all").unwrap(),
        }
    }

    /// `batch_size 4` and `batch_size 2, grad_accum 2` (and `1 x 4`) draw the same samples for
    /// every optimizer step, so their losses, gradient norms and adapters agree to rounding.
    #[test]
    fn the_micro_batch_split_does_not_change_the_run() {
        let (d, bft) = (data(), Bft::default());
        let run = |batch_size: usize, grad_accum: usize| {
            let mut m = model_without_dropout();
            let cfg = TrainConfig {
                batch_size,
                grad_accum,
                ..config(4)
            };
            let trainable = Trainable::Lora(lora_config(0.0));
            let mut t = Trainer::new(&mut m, &d, cfg, &bft, trainable).unwrap();
            let metrics: Vec<StepMetrics> = (0..4).map(|_| t.train_step().unwrap()).collect();
            drop(t);
            let lora: Vec<f64> = m
                .lora_tensors()
                .iter()
                .flat_map(|(_, t)| t.to_vec::<f64>().unwrap())
                .collect();
            (metrics, lora)
        };
        let (whole, whole_lora) = run(4, 1);
        for (b, k) in [(2, 2), (1, 4)] {
            let (split, split_lora) = run(b, k);
            for (a, w) in split.iter().zip(&whole) {
                assert_eq!(a.tokens, w.tokens, "same samples at step {}", w.step);
            }
            assert_steps_agree(&split, &whole, 1e-12, 1e-12, &format!("{b}x{k} vs 4x1"));
            let scale = whole_lora.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (x, y) in split_lora.iter().zip(&whole_lora) {
                assert!((x - y).abs() <= 1e-9 * scale, "{b}x{k}: adapter {x} vs {y}");
            }
        }
    }

    /// A model whose forward is never finite: every step is skipped and reported, nothing is
    /// updated, and `updates()` says so (the binary then writes no adapter).
    #[test]
    fn a_run_without_a_finite_step_updates_nothing() {
        let mut m = model();
        let embed = &mut m.params_mut()[0];
        let mut v = embed.to_vec::<f32>().unwrap();
        v.iter_mut().for_each(|x| *x = f32::INFINITY);
        **embed = Tensor::from_vec(v, embed.dims().to_vec(), &Device::Cpu).unwrap();
        let before: Vec<Vec<f32>> = m
            .lora_tensors()
            .iter()
            .map(|(_, t)| t.to_vec::<f32>().unwrap())
            .collect();
        let (d, bft) = (data(), Bft::default());
        let mut t = Trainer::new(&mut m, &d, config(3), &bft, lora()).unwrap();
        let metrics: Vec<StepMetrics> = (0..3).map(|_| t.train_step().unwrap()).collect();
        assert!(metrics.iter().all(|s| s.skipped));
        assert_eq!(t.updates(), 0);
        drop(t);
        let after: Vec<Vec<f32>> = m
            .lora_tensors()
            .iter()
            .map(|(_, t)| t.to_vec::<f32>().unwrap())
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn settings_out_of_range_are_refused_before_a_run() {
        let (mut m, d, bft) = (model(), data(), Bft::default());
        let bad: Vec<(TrainConfig, &str)> = vec![
            (
                TrainConfig {
                    batch_size: 0,
                    ..config(3)
                },
                "batch_size",
            ),
            (
                TrainConfig {
                    grad_accum: 0,
                    ..config(3)
                },
                "grad_accum",
            ),
            (
                TrainConfig {
                    total_steps: 0,
                    ..config(3)
                },
                "total_steps",
            ),
            (
                TrainConfig {
                    keep_last: 0,
                    ..config(3)
                },
                "keep_last",
            ),
            (
                TrainConfig {
                    max_grad_norm: f64::NAN,
                    ..config(3)
                },
                "max_grad_norm",
            ),
            (
                TrainConfig {
                    schedule: Schedule {
                        base_lr: -1e-3,
                        ..config(3).schedule
                    },
                    ..config(3)
                },
                "learning rate",
            ),
            (
                TrainConfig {
                    schedule: Schedule {
                        base_lr: f64::INFINITY,
                        ..config(3).schedule
                    },
                    ..config(3)
                },
                "learning rate",
            ),
            (
                TrainConfig {
                    adamw: AdamWConfig {
                        beta2: 1.0,
                        ..Default::default()
                    },
                    ..config(3)
                },
                "beta2",
            ),
            (
                TrainConfig {
                    analysis: GroupConfig {
                        window: 0,
                        ..Default::default()
                    },
                    ..config(3)
                },
                "window",
            ),
        ];
        for (cfg, want) in bad {
            let err = Trainer::new(&mut m, &d, cfg, &bft, lora())
                .err()
                .expect(want)
                .to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        let err = Trainer::new(&mut m, &[], config(3), &bft, lora())
            .err()
            .unwrap();
        assert!(err.to_string().contains("no training samples"), "{err}");
    }
}
