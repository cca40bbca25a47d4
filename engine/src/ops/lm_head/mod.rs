//! Fused LM head + weighted NLL: the memory-bounded core of every loss variant.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, promoted, same_kind};
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{DType, Error, Result, Tensor};
use bft_kernels::cpu::lm_head::HeadDims;

/// Bytes of logits one chunk may hold: with Qwen2's 151,936-word vocabulary that is 110 rows.
const CHUNK_BYTES: usize = 64 << 20;

/// The result of [`Tensor::lm_head_nll`].
#[derive(Debug)]
pub struct HeadLoss {
    /// `sum_i coef_i * l_i`: a tracked scalar when an input is tracked.
    pub loss: Tensor,
    /// `log softmax(x_i W^T)[y_i]` of every selected row, in order.
    pub logprobs: Vec<f64>,
}

/// The rows of the hidden states that go through the head, and their targets.
#[derive(Clone, Copy)]
pub(crate) struct Selection<'a> {
    pub rows: &'a [u32],
    pub targets: &'a [u32],
    pub dims: HeadDims,
    /// Rows of the hidden states, selected or not.
    pub n_all: usize,
}

/// What the forward pass leaves for the backward, on the backend's device.
pub(crate) struct HeadSaved {
    /// `(n, C)` the selected rows of the hidden states.
    pub xs: Tensor,
    /// `(n, C)` `(softmax(z) - onehot(y)) W` per row, for a backend that forms it while the
    /// logits are live (then the backward never revisits the vocabulary for dX); present when
    /// the hidden states are tracked.
    pub unit: Option<Tensor>,
    /// `(n)` log-sum-exp of each row's logits.
    pub lse: Tensor,
}

/// Coefficients from log-probs read back to the host.
type HostWeigh<'a> = Box<dyn FnOnce(&[f64]) -> Vec<f64> + 'a>;
/// Coefficients from log-probs left on their device.
type DeviceWeigh<'a> = Box<dyn FnOnce(&Tensor) -> Result<Tensor> + 'a>;

/// How a call turns its rows' target log-probs into their coefficients.
enum Weigh<'a> {
    /// On the host, from the log-probs read back (any loss variant).
    Host(HostWeigh<'a>),
    /// On the log-probs' device, as tensors (`Tensor::weigh_samples`): only what the closure
    /// reads comes back.
    Device(DeviceWeigh<'a>),
}

/// The fused loss kernels of a backend: two passes over the vocabulary a chunk of rows at a
/// time (at most `CHUNK_BYTES` of logits), never the `(N, V)` logits.
pub(crate) trait LmHeadKernel {
    /// Whether this backend reads a bf16 head as stored beside hidden states `x` (autocast);
    /// otherwise 16-bit inputs are widened to f32 once per call.
    fn reads_bf16_head(&self, x: &Tensor, head: &Tensor) -> bool;

    /// Pass 1: what the backward needs, and each selected row's target log-prob `(n)` on the
    /// device, in the type the backend computes the loss in.
    fn head_forward(
        &self,
        x: &Tensor,
        head: &Tensor,
        sel: Selection<'_>,
        want_dx: bool,
    ) -> Result<(HeadSaved, Tensor)>;

    /// `(dX (N, C), dW (V, C))`, each when asked for, from per-row coefficients `(n)` (of the
    /// log-probs' type and device) that include the upstream gradient; rows without a target
    /// get zero gradient. Their float type is the backend's (the caller gives each its input's
    /// type).
    fn head_backward(
        &self,
        saved: &HeadSaved,
        head: &Tensor,
        sel: Selection<'_>,
        coef: &Tensor,
        needs: (bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>)>;
}

impl Tensor {
    /// `sum_i coef_i * (logsumexp(z_i) - z_i[y_i])` with `z_i = x_{rows[i]} . head^T`, for
    /// hidden states `self (N, C)`, `head (V, C)`, and the rows that have a target.
    ///
    /// Only the listed rows go through the head, a chunk of rows at a time: the `(N, V)` logits
    /// never exist, and memory is O(chunk x V). `weigh` maps the rows' target log-probs to their
    /// coefficients, which are constants for the gradient (a stop-gradient): this is how
    /// DFT's `sg(p)` and BFT's sample weights enter. The gradient is
    /// `dz_i = coef_i (softmax(z_i) - onehot(y_i))`; `dhead` is computed only when `head` is
    /// tracked.
    pub fn lm_head_nll(
        &self,
        head: &Tensor,
        rows: &[u32],
        targets: &[u32],
        weigh: impl FnOnce(&[f64]) -> Vec<f64>,
    ) -> Result<HeadLoss> {
        let (loss, logprobs) = self.head_loss(head, rows, targets, Weigh::Host(Box::new(weigh)))?;
        Ok(HeadLoss {
            loss,
            // cannot fail: the host weighing always reads the log-probs.
            logprobs: logprobs.expect("host weighing reads the log-probs"),
        })
    }

    /// As [`Tensor::lm_head_nll`], with the coefficients computed where the hidden states are:
    /// `weigh` maps the rows' target log-probs `(n)` (untracked, on the device) to their
    /// coefficients `(n)`, say with [`Tensor::weigh_samples`], and no log-prob is read back.
    /// Returns the loss `sum_i coef_i * l_i`.
    pub fn lm_head_nll_weighed(
        &self,
        head: &Tensor,
        rows: &[u32],
        targets: &[u32],
        weigh: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let device = Weigh::Device(Box::new(weigh));
        Ok(self.head_loss(head, rows, targets, device)?.0)
    }

    /// The loss and, when weighed on the host, the log-probs it read.
    fn head_loss(
        &self,
        head: &Tensor,
        rows: &[u32],
        targets: &[u32],
        weigh: Weigh<'_>,
    ) -> Result<(Tensor, Option<Vec<f64>>)> {
        let _profiled = crate::profile::scope(Op::LmHeadNll, crate::profile::Phase::Forward);
        // Autocast: a backend that reads a frozen bf16 head as stored does (its products round
        // the other operand to bf16 once). Other 16-bit cases compute on f32 copies made once
        // per call: widening inside the kernel would widen the vocabulary-sized head for every
        // product of every chunk.
        let k = kernels(self.device());
        let bf16_head = self.device() == head.device() && k.reads_bf16_head(self, head);
        if !bf16_head && (self.dtype().is_half() || head.dtype().is_half()) {
            let (x, w) = (self.to_dtype(DType::F32)?, head.to_dtype(DType::F32)?);
            let (loss, logprobs) = x.head_loss(&w, rows, targets, weigh)?;
            let to = promoted(&[self, head]);
            return Ok((loss.to_dtype(to)?, logprobs));
        }
        if !bf16_head {
            same_kind("lm_head_nll", self, head)?;
        }
        let sel = selection(self, head, rows, targets)?;
        let (saved, logp) = k.head_forward(self, head, sel, self.is_tracked())?;
        let n = rows.len();
        let (loss, coef, logprobs) = match weigh {
            Weigh::Host(weigh) => {
                let logprobs = logp.to_f64_vec()?;
                let coef = weigh(&logprobs);
                check_coefficients(coef.len(), n)?;
                let loss: f64 = coef.iter().zip(&logprobs).map(|(a, lp)| -a * lp).sum();
                let loss = Tensor::full(loss, Vec::<usize>::new(), logp.dtype(), &logp.device())?;
                let coef = Tensor::from_vec(coef, [n], &crate::Device::Cpu)?
                    .to_dtype(logp.dtype())?
                    .to_device(&logp.device())?;
                (loss, coef, Some(logprobs))
            }
            Weigh::Device(weigh) => {
                let coef = weigh(&logp)?;
                check_coefficients(coef.numel(), n)?;
                if coef.device() != logp.device() || coef.is_tracked() {
                    return Err(Error::shape(
                        "lm_head_nll",
                        format!(
                            "weigh must return untracked coefficients on {}, got {:?} on {}",
                            logp.device(),
                            coef,
                            coef.device()
                        ),
                    ));
                }
                let coef = coef.cast_untracked(logp.dtype())?.reshape([n])?;
                let loss = coef.mul(&logp)?.sum_all()?.scale(-1.0)?;
                (loss, coef, None)
            }
        };
        let loss = Tape::record(Op::LmHeadNll, &[self, head], loss, || LmHeadBackward {
            saved,
            head: head.stop_gradient(),
            rows: rows.to_vec(),
            targets: targets.to_vec(),
            coef,
            n_all: sel.n_all,
            x_dtype: self.dtype(),
        })?;
        Ok((loss, logprobs))
    }
}

/// `weigh` gives one coefficient per selected row.
fn check_coefficients(got: usize, rows: usize) -> Result<()> {
    if got == rows {
        return Ok(());
    }
    Err(Error::shape(
        "lm_head_nll",
        format!("weigh returned {got} coefficients for {rows} rows"),
    ))
}

/// Checks the shapes, rows and targets of a call.
fn selection<'a>(
    x: &Tensor,
    head: &Tensor,
    rows: &'a [u32],
    targets: &'a [u32],
) -> Result<Selection<'a>> {
    let (n_all, c, v) = match (x.dims(), head.dims()) {
        ([n, c], [v, hc]) if c == hc => (*n, *c, *v),
        (x, h) => {
            return Err(Error::shape(
                "lm_head_nll",
                format!("need hidden (N, C) and head (V, C), got {x:?} and {h:?}"),
            ));
        }
    };
    if rows.len() != targets.len() {
        return Err(Error::shape(
            "lm_head_nll",
            format!("{} rows but {} targets", rows.len(), targets.len()),
        ));
    }
    if let Some(&r) = rows.iter().find(|&&r| r as usize >= n_all) {
        return Err(Error::Index {
            op: "lm_head_nll (row)",
            index: r as usize,
            size: n_all,
        });
    }
    if let Some(&y) = targets.iter().find(|&&y| y as usize >= v) {
        return Err(Error::Index {
            op: "lm_head_nll (target)",
            index: y as usize,
            size: v,
        });
    }
    let dims = HeadDims {
        rows: rows.len(),
        hidden: c,
        vocab: v,
    };
    Ok(Selection {
        rows,
        targets,
        dims,
        n_all,
    })
}

struct LmHeadBackward {
    saved: HeadSaved,
    head: Tensor,
    rows: Vec<u32>,
    targets: Vec<u32>,
    /// `(n)` each selected row's coefficient, as `weigh` returned it, on the log-probs' device.
    coef: Tensor,
    n_all: usize,
    /// The hidden states' type, which their gradient takes.
    x_dtype: DType,
}

impl Backward for LmHeadBackward {
    /// `dX_i = g coef_i unit_i` scattered back to the selected rows; `dW` (trainable head only)
    /// recomputes the logits chunk by chunk.
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (v, c) = (self.head.dims()[0], self.head.dims()[1]);
        let sel = Selection {
            rows: &self.rows,
            targets: &self.targets,
            dims: HeadDims {
                rows: self.rows.len(),
                hidden: c,
                vocab: v,
            },
            n_all: self.n_all,
        };
        let coef = self.coef.scale(g.to_scalar()?)?;
        let (dx, dw) = kernels(g.device()).head_backward(
            &self.saved,
            &self.head,
            sel,
            &coef,
            (needs[0], needs[1]),
        )?;
        let typed = |d: Option<Tensor>, of: DType| match d {
            Some(d) if d.dtype() != of => d.cast_untracked(of).map(Some),
            d => Ok(d),
        };
        Ok(vec![
            typed(dx, self.x_dtype)?,
            typed(dw, self.head.dtype())?,
        ])
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::{Device, Op, Tensor};
    use proptest::prelude::*;

    pub(crate) fn cases() -> Vec<Case> {
        // Coefficients fixed per instance (constants, as the stop-gradient makes them).
        let strategy = (size(), size(), size(), 1usize..8)
            .prop_flat_map(|(n, c, v, k)| {
                let rows = proptest::collection::vec(0..n as u32, k);
                let targets = proptest::collection::vec(0..v as u32, k);
                let coef = proptest::collection::vec(-1.0f64..1.0, k);
                (tensor(vec![n, c]), tensor(vec![v, c]), rows, targets, coef).prop_map(
                    |(x, w, rows, y, a)| {
                        instance(vec![x, w], move |t| {
                            Ok(t[0].lm_head_nll(&t[1], &rows, &y, |_| a.clone())?.loss)
                        })
                    },
                )
            })
            .boxed();
        vec![Case::new("lm_head_nll", &[Op::LmHeadNll], strategy)]
    }

    /// Autocast: f32 hidden states with a frozen bf16 head on the CPU. With a bf16 kernel the
    /// loss and log-probs are the f64 ones of the bf16-rounded hidden states (the logits
    /// accumulate in f32); elsewhere the head is widened once and the hidden states are read
    /// as they are. The hidden states' gradient is f32, within bf16 rounding of the
    /// probabilities it is made of.
    #[test]
    fn f32_hidden_states_read_a_frozen_bf16_head_as_stored() {
        use crate::{DType, Tape};
        let dev = Device::Cpu;
        let x = Tensor::randn([6, 20], 1.0, 1, DType::F32, &dev).unwrap();
        let head = Tensor::randn([50, 20], 0.5, 2, DType::BF16, &dev).unwrap();
        let (rows, targets) = ([0u32, 2, 3, 5], [7u32, 0, 49, 7]);
        let run = |x: &Tensor, head: &Tensor| {
            let tape = Tape::new();
            let xt = tape.track(x);
            let out = xt
                .lm_head_nll(head, &rows, &targets, |lp| vec![1.0; lp.len()])
                .unwrap();
            let dx = tape.backward(&out.loss).unwrap().remove(&xt).unwrap();
            (out.loss, out.logprobs, dx)
        };
        let (loss, logprobs, dx) = run(&x, &head);
        assert_eq!((loss.dtype(), dx.dtype()), (DType::F32, DType::F32));
        let read = if bft_kernels::cpu::bf16_gemm::supported() {
            x.to_dtype(DType::BF16).unwrap()
        } else {
            x.clone()
        };
        let read = read.to_dtype(DType::F64).unwrap();
        let (loss64, logprobs64, dx64) = run(&read, &head.to_dtype(DType::F64).unwrap());
        let (l, l64) = (loss.to_scalar().unwrap(), loss64.to_scalar().unwrap());
        assert!((l - l64).abs() <= 1e-5 * l64.abs(), "{l} vs {l64}");
        for (a, b) in logprobs.iter().zip(&logprobs64) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let (g, g64) = (dx.to_f64_vec().unwrap(), dx64.to_f64_vec().unwrap());
        let scale = g64.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (a, b) in g.iter().zip(&g64) {
            assert!((a - b).abs() <= scale / 128.0, "{a} vs {b}");
        }
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }

    #[test]
    fn equals_full_logits_nll_and_never_uses_unselected_rows() {
        let dev = Device::Cpu;
        let x = Tensor::randn([5, 4], 1.0, 1, crate::DType::F64, &dev).unwrap();
        let w = Tensor::randn([9, 4], 1.0, 2, crate::DType::F64, &dev).unwrap();
        let (rows, y) = (vec![0u32, 3, 4], vec![8u32, 0, 2]);
        let out = x
            .lm_head_nll(&w, &rows, &y, |lp| lp.iter().map(|_| 1.0).collect())
            .unwrap();
        let full = x
            .matmul_t(&w, false, true)
            .unwrap()
            .log_softmax()
            .unwrap()
            .to_vec::<f64>()
            .unwrap();
        for (i, (&r, &t)) in rows.iter().zip(&y).enumerate() {
            assert!((out.logprobs[i] - full[r as usize * 9 + t as usize]).abs() < 1e-12);
        }
        let want: f64 = -out.logprobs.iter().sum::<f64>();
        assert!((out.loss.to_scalar().unwrap() - want).abs() < 1e-12);
        let bad = x
            .lm_head_nll(&w, &[7], &[0], |_| vec![1.0])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("index 7"), "{bad}");
    }
}
