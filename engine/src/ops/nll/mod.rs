//! Per-token negative log-likelihood and the plain masked cross-entropy built on it: the
//! unfused reference (it materialises `(tokens, vocab)` logits) for the fused LM-head loss.

use super::{Op, float_dispatch, via_f32, wbuf, wgpu_of};
use crate::tape::{Backward, Tape};
use crate::{DType, Error, Result, Tensor};
use bft_kernels::cpu::nll::{nll, nll_backward};

impl Tensor {
    /// `l_i = logsumexp(z_i) - z_i[y_i]` for logits `self (N, V)` and U32 targets `(N)`.
    pub fn nll(&self, targets: &Tensor) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Nll, crate::profile::Phase::Forward);
        if let Some(out) = via_f32(&[self], |t| t[0].nll(targets))? {
            return Ok(out);
        }
        if self.rank() != 2 || targets.dims() != [self.dims()[0]] {
            return Err(Error::shape(
                "nll",
                format!(
                    "need logits (N, V) and targets (N), got {} and {}",
                    self.shape(),
                    targets.shape()
                ),
            ));
        }
        if targets.dtype() != DType::U32 {
            return Err(Error::DType {
                op: "nll",
                got: targets.dtype(),
                expected: "u32 targets",
            });
        }
        let (n, vocab) = (self.dims()[0], self.dims()[1]);
        let host = targets.to_device(&crate::Device::Cpu)?;
        let tv = host.cpu::<u32>("nll")?;
        if let Some(&bad) = tv.iter().find(|&&y| y as usize >= vocab) {
            return Err(Error::Index {
                op: "nll",
                index: bad as usize,
                size: vocab,
            });
        }
        if let Some((g, i)) = wgpu_of(self) {
            let t = targets.to_device(&self.device())?;
            let (loss, dir) = bft_kernels::wgpu::ops::nll(
                &g,
                wbuf("nll", self)?,
                t.wgpu().ok_or(Error::Unsupported {
                    op: "nll targets",
                    device: t.device(),
                })?,
                n,
                vocab,
            )?;
            let out = Tensor::from_wgpu(loss, DType::F32, i, [n]);
            let dir = Tensor::from_wgpu(dir, DType::F32, i, self.shape().clone());
            return Tape::record(Op::Nll, &[self, targets], out, || NllBackward::Device {
                direction: dir,
            });
        }
        let (out, lse) = float_dispatch!("nll", self.dtype(), |T| {
            let (mut l, mut s) = (vec![T::default(); n], vec![T::default(); n]);
            nll(self.cpu::<T>("nll")?, vocab, tv, &mut l, &mut s);
            Ok((Tensor::from_cpu(l, [n]), Tensor::from_cpu(s, [n])))
        })?;
        Tape::record(Op::Nll, &[self, targets], out, || NllBackward::Host {
            logits: self.stop_gradient(),
            targets: targets.stop_gradient(),
            lse,
        })
    }

    /// Masked mean cross-entropy: `sum_i m_i l_i / (sum_i m_i + 1e-8)` with `mask (N)` of
    /// 0/1 weights (a constant). No valid token gives an exact zero, never NaN.
    pub fn cross_entropy(&self, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if mask.is_tracked() {
            return Err(Error::NotDifferentiable {
                op: "cross_entropy",
                input: "mask",
            });
        }
        let l = self.nll(targets)?;
        let mask = mask.to_dtype(l.dtype())?;
        let denom: f64 = mask.to_f64_vec()?.iter().sum::<f64>() + 1e-8;
        l.mul(&mask)?.sum_all()?.scale(1.0 / denom)
    }
}

enum NllBackward {
    /// The CPU recomputes the softmax from the logits and their log-sum-exp.
    Host {
        logits: Tensor,
        targets: Tensor,
        lse: Tensor,
    },
    /// The device kept `softmax(z) - onehot(y)` (rows, vocab) from the forward pass.
    Device { direction: Tensor },
}

impl Backward for NllBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (logits, targets, lse) = match self {
            // dz_i = g_i * direction_i: each row scaled by its loss gradient.
            NllBackward::Device { direction } => {
                let (gpu, i) = wgpu_of(direction).ok_or(Error::Unsupported {
                    op: "nll backward",
                    device: direction.device(),
                })?;
                let vocab = direction.dims()[1];
                let dz = bft_kernels::wgpu::ops::scale_rows(
                    &gpu,
                    wbuf("nll", direction)?,
                    wbuf("nll", g)?,
                    direction.numel(),
                    vocab,
                )?;
                let dz = Tensor::from_wgpu(dz, DType::F32, i, direction.shape().clone());
                return Ok(vec![Some(dz), None]);
            }
            NllBackward::Host {
                logits,
                targets,
                lse,
            } => (logits, targets, lse),
        };
        let vocab = logits.dims()[1];
        let dz = float_dispatch!("nll backward", g.dtype(), |T| {
            let mut dz = vec![T::default(); logits.numel()];
            nll_backward(
                logits.cpu::<T>("nll")?,
                vocab,
                targets.cpu::<u32>("nll")?,
                lse.cpu::<T>("nll")?,
                g.cpu::<T>("nll")?,
                &mut dz,
            );
            Ok(Tensor::from_cpu(dz, logits.shape().clone()))
        })?;
        Ok(vec![Some(dz), None])
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
        let strategy = (size(), size())
            .prop_flat_map(|(n, v)| {
                let targets = proptest::collection::vec(0..v as u32, n);
                let mask = proptest::collection::vec(prop_oneof![Just(0.0f64), Just(1.0)], n);
                (tensor(vec![n, v]), targets, mask).prop_map(move |(z, y, m)| {
                    let y = Tensor::from_vec(y, [n], &Device::Cpu).unwrap();
                    let m = Tensor::from_vec(m, [n], &Device::Cpu).unwrap();
                    instance(vec![z], move |x| x[0].cross_entropy(&y, &m))
                })
            })
            .boxed();
        vec![Case::new(
            "cross_entropy",
            &[Op::Nll, Op::Mul, Op::Sum, Op::Scale],
            strategy,
        )]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }

    #[test]
    fn hand_computed_value_and_empty_mask_is_exact_zero() {
        let dev = Device::Cpu;
        let z = Tensor::from_vec(vec![0.0f64, 0.0, 2.0, 0.0], [2, 2], &dev).unwrap();
        let y = Tensor::from_vec(vec![1u32, 0], [2], &dev).unwrap();
        let l = z.nll(&y).unwrap().to_vec::<f64>().unwrap();
        assert!((l[0] - 2f64.ln()).abs() < 1e-15);
        assert!((l[1] - (1.0 + (-2f64).exp()).ln()).abs() < 1e-15);
        let m = Tensor::from_vec(vec![1.0f64, 0.0], [2], &dev).unwrap();
        let ce = z.cross_entropy(&y, &m).unwrap().to_scalar().unwrap();
        assert!((ce - 2f64.ln() / (1.0 + 1e-8)).abs() < 1e-15);
        let none = Tensor::zeros([2], crate::DType::F64, &dev).unwrap();
        assert_eq!(
            z.cross_entropy(&y, &none).unwrap().to_scalar().unwrap(),
            0.0
        );
    }
}
