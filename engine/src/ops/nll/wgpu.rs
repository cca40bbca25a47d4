use super::{NllBackward, NllKernel};
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::{DType, Error, Result, Tensor};
use bft_kernels::wgpu::ops;

impl NllKernel for Wgpu {
    fn nll(&self, logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
        let (g, i) = wgpu_of(logits)?;
        let (n, vocab) = (logits.dims()[0], logits.dims()[1]);
        let t = targets.wgpu().ok_or(Error::Unsupported {
            op: "nll targets",
            device: targets.device(),
        })?;
        let (loss, dir) = ops::nll(&g, wbuf("nll", logits)?, t, n, vocab)?;
        Ok((
            Tensor::from_wgpu(loss, DType::F32, i, [n]),
            Tensor::from_wgpu(dir, DType::F32, i, logits.shape().clone()),
        ))
    }

    fn nll_backward(&self, s: &NllBackward, dy: &Tensor) -> Result<Tensor> {
        let (g, i) = wgpu_of(dy)?;
        let vocab = s.aux.dims()[1];
        let dir = wbuf("nll", &s.aux)?;
        let dz = ops::scale_rows(&g, dir, wbuf("nll", dy)?, s.aux.numel(), vocab)?;
        Ok(Tensor::from_wgpu(dz, DType::F32, i, s.aux.shape().clone()))
    }
}
