//! Per-token negative log-likelihood and the plain masked cross-entropy built on it: the
//! unfused reference (it materialises `(tokens, vocab)` logits) for the fused LM-head loss.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, in_compute_dtype};
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{DType, Error, Result, Tensor};

/// The NLL kernels of a backend on logits `(N, V)` of its compute type and u32 targets `(N)`
/// (checked in range).
pub(crate) trait NllKernel {
    /// `(loss (N), aux)`: `aux` is what this backend's backward needs besides the logits and
    /// targets (the CPU saves each row's log-sum-exp, devices the direction `softmax - onehot`).
    fn nll(&self, logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)>;
    /// The logits' gradient from the upstream `(N)` gradient `dy`.
    fn nll_backward(&self, saved: &NllBackward, dy: &Tensor) -> Result<Tensor>;
}

impl Tensor {
    /// `l_i = logsumexp(z_i) - z_i[y_i]` for logits `self (N, V)` and U32 targets `(N)`.
    pub fn nll(&self, targets: &Tensor) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Nll, crate::profile::Phase::Forward);
        if let Some(out) = in_compute_dtype(&[self], |t| t[0].nll(targets))? {
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
        let vocab = self.dims()[1];
        let host = targets.to_device(&crate::Device::Cpu)?;
        if let Some(&bad) = host
            .cpu::<u32>("nll")?
            .iter()
            .find(|&&y| y as usize >= vocab)
        {
            return Err(Error::Index {
                op: "nll",
                index: bad as usize,
                size: vocab,
            });
        }
        let targets_here = targets.to_device(&self.device())?;
        let (out, aux) = kernels(self.device()).nll(self, &targets_here)?;
        Tape::record(Op::Nll, &[self, targets], out, || NllBackward {
            logits: self.stop_gradient(),
            targets: targets_here.stop_gradient(),
            aux,
        })
    }

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

/// What the NLL saves: the logits, the targets on their device, and the backend's `aux`.
pub(crate) struct NllBackward {
    logits: Tensor,
    targets: Tensor,
    aux: Tensor,
}

impl Backward for NllBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(kernels(g.device()).nll_backward(self, g)?), None])
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
