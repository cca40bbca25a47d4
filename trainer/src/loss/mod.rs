//! The loss library: SFT, DFT, BFT and research variants, all through one fused,
//! memory-bounded LM-head loss (DESIGN.md §5).
//!
//! For sample `b` with `n_b` valid target tokens (prompt and padding masked out), target
//! log-probs `lp_t` and `l_t = -lp_t`, a variant gives token weights `w_t` and a sample weight
//! `s_b`, both constants for the gradient (stop-gradient). The loss is
//!
//! ```text
//! L = (1/D) * sum_b s_b * sum_t w_t l_t / (n_b + 1e-8)
//! ```
//!
//! with `D` the number of samples in the optimizer step (exact accumulation) or, for the
//! `Reference` reduction, the micro-batch size times the number of micro-batches (HF Trainer).
//! A sample with no valid token contributes an exact zero and still counts in `D`.

mod group;
mod variants;

#[cfg(test)]
mod tests;

pub use group::{GroupConfig, GroupMean, Weakest, weakest_window};
pub use variants::{BUILTIN_NAMES, Bft, Dft, Focal, Sft, VariantParams, builtin};

use bft_engine::{Device, Tensor};

/// The research API: how a variant weighs one sample.
///
/// `logprobs` are the log-probabilities of the sample's valid target tokens, in order, with
/// prompt and padding removed (two assistant turns are adjacent). Return one weight per token
/// and the sample's weight. Both are treated as constants by the gradient, exactly as
/// `sg(...)` in the paper. A variant is only this: the fused kernel does the rest.
pub trait LossVariant: Send + Sync {
    /// Name for logs and configs.
    fn name(&self) -> &str;
    /// Token weights (`logprobs.len()` of them) and the sample weight.
    fn weigh(&self, logprobs: &[f64]) -> SampleWeights;
    /// The same weights in a form the engine computes where the log-probs are
    /// (`Tensor::weigh_samples`), so that a training step on a GPU reads back no per-token
    /// log-prob; `None` (the default): only `weigh` knows them, and the log-probs come back.
    fn device_weights(&self) -> Option<DeviceWeights> {
        None
    }
}

/// A variant's weights as the engine computes them on a device: token weights
/// `max(c_t, floor)` or 1, and sample weights `clamp(1 - p_conf^gamma, 0, 1)` or 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceWeights {
    /// The group confidence the sample weight reads; `None` when the weights need none (the
    /// analysis config's is used for the statistics).
    pub group: Option<GroupConfig>,
    /// BFT's exponent; `None`: every sample weighs 1.
    pub gamma: Option<f64>,
    /// The floor of the token weights `max(c_t, floor)`; `None`: every token weighs 1.
    pub token_floor: Option<f64>,
}

/// What [`LossVariant::weigh`] returns for one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleWeights {
    pub tokens: Vec<f64>,
    pub sample: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum LossError {
    #[error(transparent)]
    Engine(#[from] bft_engine::Error),
    #[error("loss batch: {0}")]
    Batch(String),
    #[error("loss config: {0}")]
    Config(String),
    #[error("loss variant {variant}: returned {got} token weights for {want} tokens")]
    Variant {
        variant: String,
        got: usize,
        want: usize,
    },
}

/// One micro-batch: hidden states, the LM head, and per-position targets.
#[derive(Clone, Copy, Debug)]
pub struct LossBatch<'a> {
    /// `(B, T, C)` final hidden states (after the last norm).
    pub hidden: &'a Tensor,
    /// `(V, C)` LM head (the embedding matrix for tied models). Tracked only when trainable.
    pub head: &'a Tensor,
    /// `(B * T)`: the token position `t` must predict (labels already shifted by one).
    pub targets: &'a [u32],
    /// `(B * T)`: whether position `t` is a training target (a response token).
    pub mask: &'a [bool],
}

/// How the per-sample terms of a micro-batch are scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// Divide by the number of samples in the whole optimizer step, so k micro-batches give
    /// exactly the gradient of one batch of all their samples. `None`: this micro-batch is the
    /// whole step.
    Exact { step_samples: Option<usize> },
    /// HF Trainer's sum of per-micro-batch means: divide by this micro-batch's size times
    /// `micro_batches`. Equal to `Exact` only when every micro-batch has the same size.
    Reference { micro_batches: usize },
}

impl Default for Reduction {
    fn default() -> Self {
        Reduction::Exact { step_samples: None }
    }
}

/// Settings of one loss call besides the variant.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossOptions {
    pub reduction: Reduction,
    /// The group confidence reported per sample (whatever the variant).
    pub analysis: GroupConfig,
    /// On a device (not the CPU), weigh where the hidden states are when the variant has
    /// [`LossVariant::device_weights`]: the step then reads back per-sample numbers only, and
    /// the statistics carry no per-token log-probs and no weakest-window start. Training sets
    /// it; scoring, which reports the log-probs, does not.
    pub weigh_on_device: bool,
}

/// Per-sample results, for logging, `bft score` and analysis.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleStats {
    /// Log-probabilities of the valid targets, in order.
    pub logprobs: Vec<f64>,
    pub n_valid: usize,
    /// `min_i C_i` under the analysis group config; `None` with no valid token.
    pub p_conf: Option<f64>,
    /// Valid-token index where the weakest window starts.
    pub weakest_window_start: Option<usize>,
    /// The variant's sample weight `s_b`.
    pub s_b: f64,
    /// Mean token weight.
    pub w_mean: f64,
    /// The sample's term `s_b * sum_t w_t l_t / (n_b + 1e-8)` (before dividing by D).
    pub loss: f64,
    /// Plain cross-entropy `sum_t l_t / (n_b + 1e-8)`.
    pub ce: f64,
}

/// The result of a loss call.
#[derive(Debug)]
pub struct LossOutput {
    /// The scalar to differentiate (tracked when the hidden states or head are).
    pub loss: Tensor,
    /// Mean plain cross-entropy over the micro-batch's samples: what users compare against.
    pub ce: f64,
    pub samples: Vec<SampleStats>,
}

/// Denominator of the per-token normaliser: `n_b + EPS` (an empty sample gives exactly 0).
const EPS: f64 = 1e-8;

/// Where the valid positions are: their flat row indices, targets and owning samples.
struct Layout {
    batch: usize,
    rows: Vec<u32>,
    targets: Vec<u32>,
    /// `starts[b]..starts[b + 1]` are sample b's entries in `rows`.
    starts: Vec<usize>,
}

fn layout(b: &LossBatch<'_>) -> Result<Layout, LossError> {
    let dims = b.hidden.dims();
    let [batch, t, c] = *dims else {
        return Err(LossError::Batch(format!(
            "hidden states must be (B, T, C), got {dims:?}"
        )));
    };
    if b.head.rank() != 2 || b.head.dims()[1] != c {
        return Err(LossError::Batch(format!(
            "head must be (V, {c}), got {}",
            b.head.shape()
        )));
    }
    let n = batch * t;
    if b.targets.len() != n || b.mask.len() != n {
        return Err(LossError::Batch(format!(
            "targets ({}) and mask ({}) must both have B*T = {n} entries",
            b.targets.len(),
            b.mask.len()
        )));
    }
    let vocab = b.head.dims()[0];
    let mut out = Layout {
        batch,
        rows: Vec::new(),
        targets: Vec::new(),
        starts: vec![0],
    };
    for s in 0..batch {
        for p in s * t..(s + 1) * t {
            if b.mask[p] {
                if b.targets[p] as usize >= vocab {
                    return Err(LossError::Batch(format!(
                        "sample {s}, position {}: target {} is outside the vocabulary of {vocab}",
                        p - s * t,
                        b.targets[p]
                    )));
                }
                out.rows.push(p as u32);
                out.targets.push(b.targets[p]);
            }
        }
        out.starts.push(out.rows.len());
    }
    Ok(out)
}

/// `D`: the number of samples a micro-batch's terms are divided by.
fn denominator(lay: &Layout, opts: LossOptions) -> Result<f64, LossError> {
    Ok(match opts.reduction {
        Reduction::Exact { step_samples: None } => lay.batch,
        Reduction::Exact {
            step_samples: Some(n),
        } if n >= lay.batch => n,
        Reduction::Exact {
            step_samples: Some(n),
        } => {
            return Err(LossError::Config(format!(
                "the step has {n} samples but this micro-batch alone has {}",
                lay.batch
            )));
        }
        Reduction::Reference { micro_batches: k } if k >= 1 => lay.batch * k,
        Reduction::Reference { .. } => {
            return Err(LossError::Config("micro_batches must be at least 1".into()));
        }
    } as f64)
}

/// From the valid rows' log-probs: per-sample statistics and each row's coefficient
/// `a_t = s_b w_t / (D (n_b + eps))`, so that `L = sum_t a_t l_t`.
fn plan(
    lay: &Layout,
    logprobs: &[f64],
    variant: &dyn LossVariant,
    opts: LossOptions,
) -> Result<(Vec<f64>, Vec<SampleStats>), LossError> {
    let denom = denominator(lay, opts)?;
    let mut coef = Vec::with_capacity(logprobs.len());
    let mut stats = Vec::with_capacity(lay.batch);
    for s in 0..lay.batch {
        let lp = &logprobs[lay.starts[s]..lay.starts[s + 1]];
        let n = lp.len();
        let w = variant.weigh(lp);
        if w.tokens.len() != n {
            return Err(LossError::Variant {
                variant: variant.name().to_string(),
                got: w.tokens.len(),
                want: n,
            });
        }
        let norm = n as f64 + EPS;
        coef.extend(w.tokens.iter().map(|wt| w.sample * wt / (denom * norm)));
        let weakest = weakest_window(lp, opts.analysis);
        stats.push(SampleStats {
            logprobs: lp.to_vec(),
            n_valid: n,
            p_conf: weakest.map(|x| x.p_conf),
            weakest_window_start: weakest.map(|x| x.start),
            s_b: w.sample,
            w_mean: if n == 0 {
                0.0
            } else {
                w.tokens.iter().sum::<f64>() / n as f64
            },
            loss: w.sample * w.tokens.iter().zip(lp).map(|(wt, l)| -wt * l).sum::<f64>() / norm,
            ce: -lp.iter().sum::<f64>() / norm,
        });
    }
    Ok((coef, stats))
}

fn output(loss: Tensor, stats: Vec<SampleStats>) -> LossOutput {
    let ce = stats.iter().map(|s| s.ce).sum::<f64>() / stats.len().max(1) as f64;
    LossOutput {
        loss,
        ce,
        samples: stats,
    }
}

/// The loss through the fused LM-head kernel: only valid rows reach the head, in chunks, and
/// the `(tokens, vocab)` logits never exist.
pub fn fused_loss(
    batch: LossBatch<'_>,
    variant: &dyn LossVariant,
    opts: LossOptions,
) -> Result<LossOutput, LossError> {
    let lay = layout(&batch)?;
    let c = batch.hidden.dims()[2];
    let flat = batch
        .hidden
        .reshape([lay.batch * batch.hidden.dims()[1], c])?;
    if let (true, false, Some(dw)) = (
        opts.weigh_on_device,
        flat.device() == Device::Cpu,
        variant.device_weights(),
    ) {
        return weighed_on_device(&flat, batch.head, &lay, dw, opts);
    }
    let mut planned = None;
    let head = flat.lm_head_nll(batch.head, &lay.rows, &lay.targets, |lp| {
        match plan(&lay, lp, variant, opts) {
            Ok((coef, stats)) => {
                planned = Some(Ok(stats));
                coef
            }
            Err(e) => {
                planned = Some(Err(e));
                vec![0.0; lp.len()]
            }
        }
    })?;
    let stats = planned.expect("the kernel calls weigh exactly once")?;
    Ok(output(head.loss, stats))
}

/// The fused loss with the variant's weights computed where the hidden states `flat (B*T, C)`
/// are (`Tensor::weigh_samples`): the host reads back the loss and five numbers a sample.
fn weighed_on_device(
    flat: &Tensor,
    head: &Tensor,
    lay: &Layout,
    dw: DeviceWeights,
    opts: LossOptions,
) -> Result<LossOutput, LossError> {
    let denom = denominator(lay, opts)?;
    let starts: Vec<u32> = lay.starts.iter().map(|&s| s as u32).collect();
    let weighing = |g: GroupConfig, gamma, token_floor| bft_engine::ops::Weighing {
        window: g.window,
        geometric: g.mean == GroupMean::Geometric,
        gamma,
        token_floor,
        denom,
    };
    let group = dw.group.unwrap_or(opts.analysis);
    let mut weighed = None;
    let loss = flat.lm_head_nll_weighed(head, &lay.rows, &lay.targets, |logp| {
        let w = logp.weigh_samples(&starts, weighing(group, dw.gamma, dw.token_floor))?;
        // The statistics report the group confidence under the analysis config.
        let p_conf = if group == opts.analysis {
            w.p_conf.clone()
        } else {
            logp.weigh_samples(&starts, weighing(opts.analysis, None, None))?
                .p_conf
        };
        let coef = w.coef.clone();
        weighed = Some((w, p_conf));
        Ok(coef)
    })?;
    let (w, p_conf) = weighed.ok_or_else(|| LossError::Batch("the loss weighed nothing".into()))?;
    let (s_b, p_conf, sums) = (
        w.s_b.to_f64_vec()?,
        p_conf.to_f64_vec()?,
        w.sums.to_f64_vec()?,
    );
    let samples = (0..lay.batch)
        .map(|b| {
            let n = lay.starts[b + 1] - lay.starts[b];
            let (lp, wlp, ws) = (sums[3 * b], sums[3 * b + 1], sums[3 * b + 2]);
            let norm = n as f64 + EPS;
            SampleStats {
                logprobs: Vec::new(),
                n_valid: n,
                p_conf: (n > 0).then_some(p_conf[b]),
                weakest_window_start: None,
                s_b: s_b[b],
                w_mean: if n == 0 { 0.0 } else { ws / n as f64 },
                loss: s_b[b] * -wlp / norm,
                ce: -lp / norm,
            }
        })
        .collect();
    Ok(output(loss, samples))
}

/// The same loss composed from plain engine ops over the full `(B*T, V)` logits: the
/// reference the fused kernel is tested against (and the baseline it is benchmarked against).
pub fn unfused_loss(
    batch: LossBatch<'_>,
    variant: &dyn LossVariant,
    opts: LossOptions,
) -> Result<LossOutput, LossError> {
    let lay = layout(&batch)?;
    let c = batch.hidden.dims()[2];
    let n = lay.batch * batch.hidden.dims()[1];
    let logits = batch
        .hidden
        .reshape([n, c])?
        .matmul_t(batch.head, false, true)?;
    // Masked positions may hold any id; they get coefficient 0, so point them at token 0.
    let targets: Vec<u32> = (0..n)
        .map(|p| if batch.mask[p] { batch.targets[p] } else { 0 })
        .collect();
    let nll = logits.nll(&Tensor::from_vec(targets, [n], &Device::Cpu)?)?;
    let all = nll.to_f64_vec()?;
    let logprobs: Vec<f64> = lay.rows.iter().map(|&r| -all[r as usize]).collect();
    let (coef, stats) = plan(&lay, &logprobs, variant, opts)?;
    let mut full = vec![0.0; n];
    for (&r, a) in lay.rows.iter().zip(coef) {
        full[r as usize] = a;
    }
    // The coefficients are a constant tensor: the stop-gradient of the specification.
    let coef = Tensor::from_vec(full, [n], &Device::Cpu)?
        .to_dtype(nll.dtype())?
        .stop_gradient();
    Ok(output(nll.mul(&coef)?.sum_all()?, stats))
}
