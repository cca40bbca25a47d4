//! LayerNorm on CUDA: rows of the input's type (f32 or bf16) with f32 row statistics
//! (`kernels/cuda/layernorm.cu`).

use super::{LayerNormBackward, LayerNormKernel};
use crate::backend::{Cuda, cbuf, cuda_of, fbuf, float_of, typed_output};
use crate::{DType, Result, Tensor};
use bft_kernels::cuda::typed;

impl LayerNormKernel for Cuda {
    fn layer_norm(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (dev, i) = cuda_of(x)?;
        let f = float_of("layer_norm", x)?;
        let c = w.numel();
        let rows = x.numel() / c.max(1);
        let bufs = (
            fbuf("layer_norm", x, f)?,
            fbuf("layer_norm", w, f)?,
            fbuf("layer_norm", b, f)?,
        );
        let (y, m, r) = typed::layernorm(&dev, f, bufs, (rows, c), eps as f32)?;
        Ok((
            typed_output(y, f, i, x.shape().clone()),
            Tensor::from_cuda(m, DType::F32, i, [rows]),
            Tensor::from_cuda(r, DType::F32, i, [rows]),
        ))
    }

    fn layer_norm_backward(
        &self,
        s: &LayerNormBackward,
        dy: &Tensor,
        need_params: bool,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let (dev, i) = cuda_of(dy)?;
        let f = float_of("layer_norm backward", dy)?;
        let c = s.w.numel();
        let rows = dy.numel() / c.max(1);
        let saved = (
            fbuf("layer_norm", &s.x, f)?,
            fbuf("layer_norm", &s.w, f)?,
            cbuf("layer_norm", &s.mean, DType::F32)?,
            cbuf("layer_norm", &s.rstd, DType::F32)?,
        );
        let d = fbuf("layer_norm", dy, f)?;
        let (dx, dwb) = typed::layernorm_backward(&dev, f, saved, d, (rows, c), need_params)?;
        Ok((
            typed_output(dx, f, i, dy.shape().clone()),
            dwb.map(|(w, b)| (typed_output(w, f, i, [c]), typed_output(b, f, i, [c]))),
        ))
    }
}
