use super::BinaryKernel;
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::{DType, Result, Shape, Tensor};
use bft_kernels::cpu::binary::BinaryKind;
use bft_kernels::wgpu::ops;

impl BinaryKernel for Wgpu {
    fn binary(&self, kind: BinaryKind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (g, i) = wgpu_of(a)?;
        let (n, nb) = (a.numel(), b.numel().max(1));
        let o = ops::binary(&g, kind, wbuf("binary", a)?, wbuf("binary", b)?, n, nb)?;
        Ok(Tensor::from_wgpu(o, DType::F32, i, a.shape().clone()))
    }

    fn scale(&self, x: &Tensor, alpha: f64) -> Result<Tensor> {
        let (g, i) = wgpu_of(x)?;
        let o = ops::scale(&g, alpha as f32, wbuf("scale", x)?, x.numel())?;
        Ok(Tensor::from_wgpu(o, DType::F32, i, x.shape().clone()))
    }

    fn sum_to(&self, x: &Tensor, shape: &Shape) -> Result<Tensor> {
        let (g, i) = wgpu_of(x)?;
        let o = ops::sum_rows(&g, wbuf("sum_to", x)?, x.numel(), shape.numel())?;
        Ok(Tensor::from_wgpu(o, DType::F32, i, shape.clone()))
    }
}
