use super::{RmsNormBackward, RmsNormKernel};
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::{DType, Result, Tensor};
use bft_kernels::wgpu::ops;

impl RmsNormKernel for Wgpu {
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        let (g, i) = wgpu_of(x)?;
        let c = w.numel();
        let rows = x.numel() / c.max(1);
        let (xb, wb) = (wbuf("rms_norm", x)?, wbuf("rms_norm", w)?);
        let (y, r) = ops::rmsnorm(&g, xb, wb, rows, c, eps as f32)?;
        Ok((
            Tensor::from_wgpu(y, DType::F32, i, x.shape().clone()),
            Tensor::from_wgpu(r, DType::F32, i, [rows]),
        ))
    }

    fn rms_norm_backward(
        &self,
        s: &RmsNormBackward,
        dy: &Tensor,
        need_dw: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (g, i) = wgpu_of(dy)?;
        let c = s.w.numel();
        let rows = dy.numel() / c.max(1);
        let (dx, dw) = ops::rmsnorm_backward(
            &g,
            wbuf("rms_norm", &s.x)?,
            wbuf("rms_norm", &s.w)?,
            wbuf("rms_norm", &s.rstd)?,
            wbuf("rms_norm", dy)?,
            (rows, c),
            need_dw,
        )?;
        Ok((
            Tensor::from_wgpu(dx, DType::F32, i, dy.shape().clone()),
            dw.map(|d| Tensor::from_wgpu(d, DType::F32, i, [c])),
        ))
    }
}
