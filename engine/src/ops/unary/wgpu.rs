use super::UnaryKernel;
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::{DType, Result, Tensor};
use bft_kernels::cpu::unary::UnaryKind;
use bft_kernels::wgpu::ops;

impl UnaryKernel for Wgpu {
    fn unary(&self, kind: UnaryKind, x: &Tensor) -> Result<Tensor> {
        let (g, i) = wgpu_of(x)?;
        let y = ops::unary(&g, kind, wbuf("unary", x)?, x.numel())?;
        Ok(Tensor::from_wgpu(y, DType::F32, i, x.shape().clone()))
    }

    fn unary_backward(
        &self,
        kind: UnaryKind,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let (g, i) = wgpu_of(dy)?;
        let (xb, yb, db) = (wbuf("unary", x)?, wbuf("unary", y)?, wbuf("unary", dy)?);
        let dx = ops::unary_backward(&g, Some(kind), 0.0, xb, yb, db, dy.numel())?;
        Ok(Tensor::from_wgpu(dx, DType::F32, i, dy.shape().clone()))
    }
}
