//! RMSNorm's kernels read and write bf16 rows with an f32 statistic per row
//! (`kernels/cuda/rmsnorm.cu`); f32 inputs are rounded once. The gain's gradient is
//! accumulated in f32 over the rows and returned in the gain's type.

use super::{RmsNormBackward, RmsNormKernel};
use crate::backend::{Cuda, bf16_input, bf16_output, cbuf, cuda_of};
use crate::{DType, Result, Tensor};
use bft_kernels::cuda::ops;

impl RmsNormKernel for Cuda {
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        let (dev, i) = cuda_of(x)?;
        let c = w.numel();
        let rows = x.numel() / c.max(1);
        let (xb, wb) = (bf16_input(x)?, bf16_input(w)?);
        let (_, y, rstd) = ops::rmsnorm_forward(
            &dev,
            cbuf("rms_norm", &xb, DType::BF16)?,
            None,
            cbuf("rms_norm", &wb, DType::BF16)?,
            (rows, c),
            eps as f32,
        )?;
        Ok((
            bf16_output(y, i, x.shape().clone(), x.dtype())?,
            Tensor::from_cuda(rstd, DType::F32, i, [rows]),
        ))
    }

    /// The bf16 kernel with the residual add fused: one read of each input row.
    fn add_rms_norm(
        &self,
        x: &Tensor,
        delta: &Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        if x.dtype() != DType::BF16 {
            return Ok(None);
        }
        let (dev, i) = cuda_of(x)?;
        let c = w.numel();
        let rows = x.numel() / c.max(1);
        let n = "add_rms_norm";
        let (h, y, rstd) = ops::rmsnorm_forward(
            &dev,
            cbuf(n, x, DType::BF16)?,
            Some(cbuf(n, delta, DType::BF16)?),
            cbuf(n, w, DType::BF16)?,
            (rows, c),
            eps as f32,
        )?;
        let h = h.ok_or(crate::Error::Unsupported {
            op: "add_rms_norm without its sum",
            device: x.device(),
        })?;
        let t = |b| Tensor::from_cuda(b, DType::BF16, i, x.shape().clone());
        Ok(Some((
            t(h),
            t(y),
            Tensor::from_cuda(rstd, DType::F32, i, [rows]),
        )))
    }

    fn rms_norm_backward(
        &self,
        s: &RmsNormBackward,
        dy: &Tensor,
        need_dw: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (dev, i) = cuda_of(dy)?;
        let c = s.w.numel();
        let rows = dy.numel() / c.max(1);
        let (d, x, w) = (bf16_input(dy)?, bf16_input(&s.x)?, bf16_input(&s.w)?);
        let (d, x) = (
            cbuf("rms_norm", &d, DType::BF16)?,
            cbuf("rms_norm", &x, DType::BF16)?,
        );
        let rstd = cbuf("rms_norm", &s.rstd, DType::F32)?;
        let dx = ops::rmsnorm_backward(
            &dev,
            d,
            x,
            cbuf("rms_norm", &w, DType::BF16)?,
            rstd,
            None,
            (rows, c),
        )?;
        let dw = need_dw
            .then(|| -> Result<Tensor> {
                let dw = ops::rmsnorm_dw(&dev, d, x, rstd, (rows, c))?;
                Tensor::from_cuda(dw, DType::F32, i, [c]).cast_untracked(s.w.dtype())
            })
            .transpose()?;
        Ok((bf16_output(dx, i, dy.shape().clone(), dy.dtype())?, dw))
    }
}
