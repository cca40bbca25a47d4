use super::{LayerNormBackward, LayerNormKernel};
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::{DType, Result, Tensor};
use bft_kernels::wgpu::ops;

impl LayerNormKernel for Wgpu {
    fn layer_norm(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (g, i) = wgpu_of(x)?;
        let c = w.numel();
        let rows = x.numel() / c.max(1);
        let (xb, wb, bb) = (
            wbuf("layer_norm", x)?,
            wbuf("layer_norm", w)?,
            wbuf("layer_norm", b)?,
        );
        let (y, m, r) = ops::layernorm(&g, xb, wb, bb, (rows, c), eps as f32)?;
        Ok((
            Tensor::from_wgpu(y, DType::F32, i, x.shape().clone()),
            Tensor::from_wgpu(m, DType::F32, i, [rows]),
            Tensor::from_wgpu(r, DType::F32, i, [rows]),
        ))
    }

    fn layer_norm_backward(
        &self,
        s: &LayerNormBackward,
        dy: &Tensor,
        need_params: bool,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let (g, i) = wgpu_of(dy)?;
        let c = s.w.numel();
        let rows = dy.numel() / c.max(1);
        let bufs = [
            wbuf("layer_norm", &s.x)?,
            wbuf("layer_norm", &s.w)?,
            wbuf("layer_norm", &s.mean)?,
            wbuf("layer_norm", &s.rstd)?,
            wbuf("layer_norm", dy)?,
        ];
        let (dx, dwb) = ops::layernorm_backward(&g, bufs, (rows, c), need_params)?;
        let param = |b| Tensor::from_wgpu(b, DType::F32, i, [c]);
        Ok((
            Tensor::from_wgpu(dx, DType::F32, i, dy.shape().clone()),
            dwb.map(|(w, b)| (param(w), param(b))),
        ))
    }
}
