use super::SwiGluKernel;
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::{DType, Result, Tensor};
use bft_kernels::wgpu::ops;

impl SwiGluKernel for Wgpu {
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let (g, i) = wgpu_of(gate)?;
        let y = ops::swiglu(&g, wbuf("swiglu", gate)?, wbuf("swiglu", up)?, gate.numel())?;
        Ok(Tensor::from_wgpu(y, DType::F32, i, gate.shape().clone()))
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let (g, i) = wgpu_of(dy)?;
        let (gb, ub, db) = (
            wbuf("swiglu", gate)?,
            wbuf("swiglu", up)?,
            wbuf("swiglu", dy)?,
        );
        let (dg, du) = ops::swiglu_backward(&g, gb, ub, db, dy.numel())?;
        let out = |b| Tensor::from_wgpu(b, DType::F32, i, dy.shape().clone());
        Ok((out(dg), out(du)))
    }
}
