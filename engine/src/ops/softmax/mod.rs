//! Softmax and log-softmax over the last axis.

use super::{Op, float_dispatch, via_f32, wbuf, wgpu_of};
use crate::DType;
use crate::tape::{Backward, Tape};
use crate::{Result, Tensor};
use bft_kernels::cpu::softmax::{softmax, softmax_backward};

impl Tensor {
    /// Softmax over the last axis.
    pub fn softmax(&self) -> Result<Tensor> {
        self.softmax_impl(false)
    }

    /// `x - logsumexp(x)` over the last axis (never `log` of a rounded softmax).
    pub fn log_softmax(&self) -> Result<Tensor> {
        self.softmax_impl(true)
    }

    fn softmax_impl(&self, log: bool) -> Result<Tensor> {
        let _profiled = crate::profile::scope(
            if log { Op::LogSoftmax } else { Op::Softmax },
            crate::profile::Phase::Forward,
        );
        if let Some(out) = via_f32(&[self], |t| t[0].softmax_impl(log))? {
            return Ok(out);
        }
        let cols = self.shape().last();
        let out = if let Some((g, i)) = wgpu_of(self) {
            let rows = self.numel() / cols.max(1);
            let y = bft_kernels::wgpu::ops::softmax(&g, wbuf("softmax", self)?, rows, cols, log)?;
            Tensor::from_wgpu(y, DType::F32, i, self.shape().clone())
        } else {
            float_dispatch!("softmax", self.dtype(), |T| {
                let mut y = vec![T::default(); self.numel()];
                if !y.is_empty() {
                    softmax(self.cpu::<T>("softmax")?, cols, log, &mut y);
                }
                Ok(Tensor::from_cpu(y, self.shape().clone()))
            })?
        };
        let op = if log { Op::LogSoftmax } else { Op::Softmax };
        Tape::record(op, &[self], out.clone(), || SoftmaxBackward {
            y: out.stop_gradient(),
            log,
        })
    }
}

struct SoftmaxBackward {
    y: Tensor,
    log: bool,
}

impl Backward for SoftmaxBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let cols = g.shape().last();
        if let Some((gpu, i)) = wgpu_of(g) {
            let rows = g.numel() / cols.max(1);
            let (y, dy) = (wbuf("softmax", &self.y)?, wbuf("softmax", g)?);
            let dx = bft_kernels::wgpu::ops::softmax_backward(&gpu, y, dy, rows, cols, self.log)?;
            return Ok(vec![Some(Tensor::from_wgpu(
                dx,
                DType::F32,
                i,
                g.shape().clone(),
            ))]);
        }
        let dx = float_dispatch!("softmax backward", g.dtype(), |T| {
            let mut dx = vec![T::default(); g.numel()];
            if !dx.is_empty() {
                softmax_backward(
                    self.y.cpu::<T>("softmax")?,
                    g.cpu::<T>("softmax")?,
                    cols,
                    self.log,
                    &mut dx,
                );
            }
            Ok(Tensor::from_cpu(dx, g.shape().clone()))
        })?;
        Ok(vec![Some(dx)])
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::{Op, Tensor};
    use proptest::prelude::*;

    pub(crate) fn cases() -> Vec<Case> {
        let mk = |f: fn(&Tensor) -> crate::Result<Tensor>| {
            (size(), size())
                .prop_flat_map(move |(a, b)| {
                    tensor(vec![a, b]).prop_map(move |t| instance(vec![t], move |x| f(&x[0])))
                })
                .boxed()
        };
        vec![
            Case::new("softmax", &[Op::Softmax], mk(Tensor::softmax)),
            Case::new("log_softmax", &[Op::LogSoftmax], mk(Tensor::log_softmax)),
        ]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }
}
