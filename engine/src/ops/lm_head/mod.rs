//! Fused LM head + weighted NLL: the memory-bounded core of every loss variant.

use super::{Op, float_dispatch, promoted, same_kind, wbuf, wgpu_of};
use crate::memory::Scratch;
use crate::tape::{Backward, Tape};
use crate::{DType, Device, Error, Result, Tensor};
use bft_kernels::cpu::Float;
use bft_kernels::cpu::embedding::{gather, scatter_add};
use bft_kernels::cpu::lm_head::{HeadDims, chunk_rows, lm_head_backward_head, lm_head_forward};

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

impl Tensor {
    /// `sum_i coef_i * (logsumexp(z_i) - z_i[y_i])` with `z_i = x_{rows[i]} . head^T`, for
    /// hidden states `self (N, C)`, `head (V, C)`, and the rows that have a target.
    ///
    /// Only the listed rows go through the head, `chunk` rows at a time: the `(N, V)` logits
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
        let _profiled = crate::profile::scope(Op::LmHeadNll, crate::profile::Phase::Forward);
        // Autocast: f32 hidden states on a CPU with the bf16 kernel read a frozen bf16 head as
        // stored (its products round the other operand to bf16 once). Other 16-bit cases, and
        // CPUs without AVX512-BF16, compute on f32 copies made once per call: the kernel's own
        // fallback would widen the vocabulary-sized head for every product of every chunk.
        let bf16_head = self.dtype() == DType::F32
            && head.dtype() == DType::BF16
            && !head.is_tracked()
            && self.device() == Device::Cpu
            && head.device() == Device::Cpu
            && bft_kernels::cpu::bf16_gemm::available();
        if !bf16_head && (self.dtype().is_half() || head.dtype().is_half()) {
            let (x, w) = (self.to_dtype(DType::F32)?, head.to_dtype(DType::F32)?);
            let out = x.lm_head_nll(&w, rows, targets, weigh)?;
            let to = promoted(&[self, head]);
            return Ok(HeadLoss {
                loss: out.loss.to_dtype(to)?,
                ..out
            });
        }
        if !bf16_head {
            same_kind("lm_head_nll", self, head)?;
        }
        let (n_all, c, v) = match (self.dims(), head.dims()) {
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
        if let Some((g, i)) = wgpu_of(self) {
            return self.lm_head_wgpu(&g, i, head, dims, (rows, targets), weigh, n_all);
        }
        let (loss, lse, coef, logprobs, xs, unit) =
            float_dispatch!("lm_head_nll", self.dtype(), |T| {
                // (n, C): only the rows with a target.
                let mut xs = vec![T::default(); rows.len() * c];
                gather(self.cpu::<T>("lm_head_nll")?, c, rows, &mut xs);
                let (mut lse, mut tl) = (
                    vec![T::default(); rows.len()],
                    vec![T::default(); rows.len()],
                );
                let chunk = chunk_rows(v, std::mem::size_of::<T>(), CHUNK_BYTES);
                // The one vocabulary-sized buffer: a chunk of logits, counted as engine memory.
                let mut z = Scratch::<T>::new(chunk.min(rows.len()) * v);
                // (n, C) gradient direction of each row, formed while its logits are live, so the
                // backward pass never revisits the vocabulary for dX.
                let mut unit = self
                    .is_tracked()
                    .then(|| vec![T::default(); rows.len() * c]);
                let (n, x) = ("lm_head_nll", xs.as_slice());
                if bf16_head {
                    lm_head_forward(
                        dims,
                        chunk,
                        (x, head.cpu::<half::bf16>(n)?, targets),
                        &mut z.buf,
                        &mut lse,
                        &mut tl,
                        unit.as_deref_mut(),
                    );
                } else {
                    lm_head_forward(
                        dims,
                        chunk,
                        (x, head.cpu::<T>(n)?, targets),
                        &mut z.buf,
                        &mut lse,
                        &mut tl,
                        unit.as_deref_mut(),
                    );
                }
                drop(z);
                let logprobs: Vec<f64> = tl
                    .iter()
                    .zip(&lse)
                    .map(|(&t, &l)| Float::to_f64(t - l))
                    .collect();
                let coef = weigh(&logprobs);
                if coef.len() != rows.len() {
                    return Err(Error::shape(
                        "lm_head_nll",
                        format!(
                            "weigh returned {} coefficients for {} rows",
                            coef.len(),
                            rows.len()
                        ),
                    ));
                }
                let loss: f64 = coef.iter().zip(&logprobs).map(|(a, lp)| -a * lp).sum();
                let coef: Vec<T> = coef.iter().map(|&a| T::from_f64(a)).collect();
                Ok((
                    Tensor::from_cpu(vec![T::from_f64(loss)], Vec::<usize>::new()),
                    Tensor::from_cpu(lse, [rows.len()]),
                    Tensor::from_cpu(coef, [rows.len()]),
                    logprobs,
                    Tensor::from_cpu(xs, [rows.len(), c]),
                    unit.map(|u| Tensor::from_cpu(u, [rows.len(), c])),
                ))
            })?;
        let loss = Tape::record(Op::LmHeadNll, &[self, head], loss, || LmHeadBackward {
            xs,
            unit,
            head: head.stop_gradient(),
            rows: rows.to_vec(),
            targets: targets.to_vec(),
            lse,
            coef,
            n_all,
        })?;
        Ok(HeadLoss { loss, logprobs })
    }
}

impl Tensor {
    /// The fused loss on a wgpu device: the same two passes, with only the per-row log-sum-exp
    /// and target logits read back to weigh the rows on the host.
    #[allow(clippy::too_many_arguments)]
    fn lm_head_wgpu(
        &self,
        g: &std::sync::Arc<bft_kernels::wgpu::Gpu>,
        index: usize,
        head: &Tensor,
        dims: HeadDims,
        (rows, targets): (&[u32], &[u32]),
        weigh: impl FnOnce(&[f64]) -> Vec<f64>,
        n_all: usize,
    ) -> Result<HeadLoss> {
        use bft_kernels::wgpu::ops as k;
        let n = "lm_head_nll";
        let c = dims.hidden;
        let xs = k::gather(g, wbuf(n, self)?, c, rows)?;
        let chunk = chunk_rows(dims.vocab, 4, CHUNK_BYTES);
        let f = k::head_forward(
            g,
            dims,
            chunk,
            (&xs, wbuf(n, head)?, targets),
            self.is_tracked(),
        )?;
        let read = |b: &bft_kernels::wgpu::GpuBuffer| -> Result<Vec<f32>> {
            Ok(bytemuck::pod_collect_to_vec(&g.read(b)?))
        };
        let (lse_h, tl_h) = (read(&f.lse)?, read(&f.target_logit)?);
        let logprobs: Vec<f64> = tl_h
            .iter()
            .zip(&lse_h)
            .map(|(&t, &l)| f64::from(t - l))
            .collect();
        let coef = weigh(&logprobs);
        if coef.len() != rows.len() {
            return Err(Error::shape(
                n,
                format!(
                    "weigh returned {} coefficients for {} rows",
                    coef.len(),
                    rows.len()
                ),
            ));
        }
        let loss: f64 = coef.iter().zip(&logprobs).map(|(a, lp)| -a * lp).sum();
        let dev = crate::Device::Wgpu(index);
        let loss = Tensor::from_vec(vec![loss as f32], Vec::<usize>::new(), &dev)?;
        let coef: Vec<f32> = coef.iter().map(|&a| a as f32).collect();
        let w = |b, shape: Vec<usize>| Tensor::from_wgpu(b, DType::F32, index, shape);
        let saved = LmHeadBackward {
            xs: w(xs, vec![rows.len(), c]),
            unit: f.unit.map(|u| w(u, vec![rows.len(), c])),
            head: head.stop_gradient(),
            rows: rows.to_vec(),
            targets: targets.to_vec(),
            lse: w(f.lse, vec![rows.len()]),
            coef: Tensor::from_vec(coef, [rows.len()], &dev)?,
            n_all,
        };
        let loss = Tape::record(Op::LmHeadNll, &[self, head], loss, || saved)?;
        Ok(HeadLoss { loss, logprobs })
    }
}

struct LmHeadBackward {
    /// `(n, C)` the selected rows of the hidden states.
    xs: Tensor,
    /// `(n, C)` `(softmax(z) - onehot(y)) W` per row; present when the hidden states are tracked.
    unit: Option<Tensor>,
    head: Tensor,
    rows: Vec<u32>,
    targets: Vec<u32>,
    lse: Tensor,
    coef: Tensor,
    n_all: usize,
}

impl Backward for LmHeadBackward {
    /// `dX_i = g coef_i unit_i` scattered back to the selected rows; `dW` (trainable head only)
    /// recomputes the logits chunk by chunk.
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (v, c) = (self.head.dims()[0], self.head.dims()[1]);
        let dims = HeadDims {
            rows: self.rows.len(),
            hidden: c,
            vocab: v,
        };
        let upstream = g.to_scalar()?;
        if let Some((gpu, i)) = wgpu_of(g) {
            use bft_kernels::wgpu::ops as k;
            let n = "lm_head_nll";
            let coef = k::scale(&gpu, upstream as f32, wbuf(n, &self.coef)?, self.rows.len())?;
            let dx = match (&self.unit, needs[0]) {
                (Some(unit), true) => {
                    let scaled =
                        k::scale_rows(&gpu, wbuf(n, unit)?, &coef, self.rows.len() * c, c)?;
                    let dx = k::scatter_add(&gpu, &scaled, c, &self.rows, self.n_all)?;
                    Some(Tensor::from_wgpu(dx, DType::F32, i, [self.n_all, c]))
                }
                _ => None,
            };
            let dw = if needs[1] {
                let chunk = chunk_rows(v, 4, CHUNK_BYTES);
                let inputs = (
                    wbuf(n, &self.xs)?,
                    wbuf(n, &self.head)?,
                    self.targets.as_slice(),
                );
                let dw = k::head_backward_weight(
                    &gpu,
                    dims,
                    chunk,
                    inputs,
                    (wbuf(n, &self.lse)?, &coef),
                )?;
                Some(Tensor::from_wgpu(dw, DType::F32, i, [v, c]))
            } else {
                None
            };
            return Ok(vec![dx, dw]);
        }
        float_dispatch!("lm_head_nll backward", g.dtype(), |T| {
            let n = "lm_head_nll";
            let coef: Vec<T> = self
                .coef
                .cpu::<T>(n)?
                .iter()
                .map(|&a| a * T::from_f64(upstream))
                .collect();
            let dx = match (&self.unit, needs[0]) {
                (Some(unit), true) => {
                    let mut dxs = unit.cpu::<T>(n)?.to_vec();
                    dxs.chunks_mut(c)
                        .zip(&coef)
                        .for_each(|(row, &a)| row.iter_mut().for_each(|e| *e *= a));
                    // Rows without a target get zero gradient.
                    let mut dx = vec![T::default(); self.n_all * c];
                    scatter_add(&dxs, c, &self.rows, &mut dx);
                    Some(Tensor::from_cpu(dx, [self.n_all, c]))
                }
                _ => None,
            };
            let dw = if needs[1] {
                let mut dw = vec![T::default(); v * c];
                let chunk = chunk_rows(v, std::mem::size_of::<T>(), CHUNK_BYTES);
                let mut z = Scratch::<T>::new(chunk.min(self.rows.len()) * v);
                let inputs = (
                    self.xs.cpu::<T>(n)?,
                    self.head.cpu::<T>(n)?,
                    self.targets.as_slice(),
                );
                let saved = (self.lse.cpu::<T>(n)?, coef.as_slice());
                lm_head_backward_head(dims, chunk, inputs, saved, &mut z.buf, &mut dw);
                Some(Tensor::from_cpu(dw, [v, c]))
            } else {
                None
            };
            Ok(vec![dx, dw])
        })
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

    /// Autocast: f32 hidden states with a frozen bf16 head on the CPU. With AVX512-BF16 the
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
        let read = if bft_kernels::cpu::bf16_gemm::available() {
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
