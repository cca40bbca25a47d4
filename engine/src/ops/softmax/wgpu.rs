use super::SoftmaxKernel;
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::{DType, Result, Tensor};
use bft_kernels::wgpu::ops;

impl SoftmaxKernel for Wgpu {
    fn softmax(&self, x: &Tensor, log: bool) -> Result<Tensor> {
        let (g, i) = wgpu_of(x)?;
        let cols = x.shape().last();
        let rows = x.numel() / cols.max(1);
        let y = ops::softmax(&g, wbuf("softmax", x)?, rows, cols, log)?;
        Ok(Tensor::from_wgpu(y, DType::F32, i, x.shape().clone()))
    }

    fn softmax_backward(&self, y: &Tensor, dy: &Tensor, log: bool) -> Result<Tensor> {
        let (g, i) = wgpu_of(dy)?;
        let cols = dy.shape().last();
        let rows = dy.numel() / cols.max(1);
        let (yb, db) = (wbuf("softmax", y)?, wbuf("softmax", dy)?);
        let dx = ops::softmax_backward(&g, yb, db, rows, cols, log)?;
        Ok(Tensor::from_wgpu(dx, DType::F32, i, dy.shape().clone()))
    }
}
