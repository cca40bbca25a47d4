//! RMSNorm over the last axis with a learned per-channel weight.

use super::{Op, float_dispatch, same_kind, via_f32, wbuf, wgpu_of};
use crate::DType;
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Tensor};
use bft_kernels::cpu::rmsnorm::{rmsnorm, rmsnorm_backward};

impl Tensor {
    /// `x * w / sqrt(mean(x^2) + eps)` over the last axis; `w` is `(C)`. The row statistic is
    /// accumulated in f64 whatever the dtype.
    pub fn rms_norm(&self, w: &Tensor, eps: f64) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::RmsNorm, crate::profile::Phase::Forward);
        if let Some(out) = via_f32(&[self, w], |t| t[0].rms_norm(&t[1], eps))? {
            return Ok(out);
        }
        same_kind("rms_norm", self, w)?;
        let c = self.shape().last();
        if w.dims() != [c] {
            return Err(Error::shape(
                "rms_norm",
                format!(
                    "weight {} does not match the last axis of {}",
                    w.shape(),
                    self.shape()
                ),
            ));
        }
        let rows = self.numel() / c.max(1);
        if let Some((g, i)) = wgpu_of(self) {
            let (x, wb) = (wbuf("rms_norm", self)?, wbuf("rms_norm", w)?);
            let (y, r) = bft_kernels::wgpu::ops::rmsnorm(&g, x, wb, rows, c, eps as f32)?;
            let out = Tensor::from_wgpu(y, DType::F32, i, self.shape().clone());
            let rstd = Tensor::from_wgpu(r, DType::F32, i, [rows]);
            return Tape::record(Op::RmsNorm, &[self, w], out, || RmsNormBackward {
                x: self.stop_gradient(),
                w: w.stop_gradient(),
                rstd,
            });
        }
        let (out, rstd) = float_dispatch!("rms_norm", self.dtype(), |T| {
            let (mut y, mut r) = (vec![T::default(); self.numel()], vec![T::default(); rows]);
            rmsnorm(
                self.cpu::<T>("rms_norm")?,
                w.cpu::<T>("rms_norm")?,
                eps,
                &mut y,
                &mut r,
            );
            Ok((
                Tensor::from_cpu(y, self.shape().clone()),
                Tensor::from_cpu(r, [rows]),
            ))
        })?;
        Tape::record(Op::RmsNorm, &[self, w], out, || RmsNormBackward {
            x: self.stop_gradient(),
            w: w.stop_gradient(),
            rstd,
        })
    }
}

struct RmsNormBackward {
    x: Tensor,
    w: Tensor,
    /// `(rows)`: 1 / rms of each row, so the backward pass need not recompute it.
    rstd: Tensor,
}

impl Backward for RmsNormBackward {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        if let Some((gpu, i)) = wgpu_of(g) {
            let c = self.w.numel();
            let rows = g.numel() / c.max(1);
            let (dx, dw) = bft_kernels::wgpu::ops::rmsnorm_backward(
                &gpu,
                wbuf("rms_norm", &self.x)?,
                wbuf("rms_norm", &self.w)?,
                wbuf("rms_norm", &self.rstd)?,
                wbuf("rms_norm", g)?,
                (rows, c),
                needs[1],
            )?;
            return Ok(vec![
                Some(Tensor::from_wgpu(dx, DType::F32, i, g.shape().clone())),
                dw.map(|d| Tensor::from_wgpu(d, DType::F32, i, [c])),
            ]);
        }
        float_dispatch!("rms_norm backward", g.dtype(), |T| {
            let c = self.w.numel();
            let mut dx = vec![T::default(); g.numel()];
            let mut dw = needs[1].then(|| vec![T::default(); c]);
            rmsnorm_backward(
                self.x.cpu::<T>("rms_norm")?,
                self.w.cpu::<T>("rms_norm")?,
                self.rstd.cpu::<T>("rms_norm")?,
                g.cpu::<T>("rms_norm")?,
                &mut dx,
                dw.as_deref_mut(),
            );
            Ok(vec![
                Some(Tensor::from_cpu(dx, g.shape().clone())),
                dw.map(|d| Tensor::from_cpu(d, [c])),
            ])
        })
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::Op;
    use proptest::prelude::*;

    pub(crate) fn cases() -> Vec<Case> {
        let strategy = (size(), size(), size())
            .prop_flat_map(|(a, b, c)| {
                (tensor(vec![a, b, c]), tensor(vec![c]))
                    .prop_map(|(x, w)| instance(vec![x, w], |t| t[0].rms_norm(&t[1], 1e-5)))
            })
            .boxed();
        vec![Case::new("rms_norm", &[Op::RmsNorm], strategy)]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }
}
