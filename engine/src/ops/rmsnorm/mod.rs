//! RMSNorm over the last axis with a learned per-channel weight.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, in_compute_dtype, same_kind};
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Tensor};

/// The RMSNorm kernels of a backend over `x (rows, C)` (any leading shape) and `w (C)`.
pub(crate) trait RmsNormKernel {
    /// `(y, rstd)`: the normalised rows and each row's `1 / rms` `(rows)`, saved for the
    /// backward so it need not recompute them.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)>;
    /// `(dx, dw)`, with `dw` only when `need_dw`.
    fn rms_norm_backward(
        &self,
        saved: &RmsNormBackward,
        dy: &Tensor,
        need_dw: bool,
    ) -> Result<(Tensor, Option<Tensor>)>;
}

impl Tensor {
    /// `x * w / sqrt(mean(x^2) + eps)` over the last axis; `w` is `(C)`. The row statistic is
    /// accumulated in f64 on the CPU and in f32 on devices, whatever the dtype.
    pub fn rms_norm(&self, w: &Tensor, eps: f64) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::RmsNorm, crate::profile::Phase::Forward);
        if let Some(out) = in_compute_dtype(&[self, w], |t| t[0].rms_norm(&t[1], eps))? {
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
        let (out, rstd) = kernels(self.device()).rms_norm(self, w, eps)?;
        Tape::record(Op::RmsNorm, &[self, w], out, || RmsNormBackward {
            x: self.stop_gradient(),
            w: w.stop_gradient(),
            rstd,
        })
    }
}

/// What the forward saves.
pub(crate) struct RmsNormBackward {
    x: Tensor,
    w: Tensor,
    /// `(rows)`: 1 / rms of each row.
    rstd: Tensor,
}

impl Backward for RmsNormBackward {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (dx, dw) = kernels(g.device()).rms_norm_backward(self, g, needs[1])?;
        Ok(vec![Some(dx), dw])
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
