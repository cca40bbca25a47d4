use super::{Gemm, MatMulKernel, widened_product};
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::{DType, Result, Tensor};
use bft_kernels::wgpu::ops::{DeviceOperand, matmul};

impl MatMulKernel for Wgpu {
    fn matmul(&self, a: &Tensor, b: &Tensor, g: &Gemm) -> Result<Tensor> {
        let (gpu, i) = wgpu_of(a)?;
        let d = g.dims;
        let a = DeviceOperand {
            data: wbuf("matmul", a)?,
            trans: g.ta,
            batch_stride: d.m * d.k,
        };
        let b = DeviceOperand {
            data: wbuf("matmul", b)?,
            trans: g.tb,
            batch_stride: d.k * d.n,
        };
        let c = matmul(&gpu, d, a, b, None)?;
        Ok(Tensor::from_wgpu(c, DType::F32, i, g.out_dims.clone()))
    }

    /// WGSL has no bf16 products: the operands are widened (an f32 one after rounding to the
    /// 16-bit type) and multiplied in f32.
    fn matmul_mixed(&self, a: &Tensor, b: &Tensor, g: &Gemm, out: DType) -> Result<Tensor> {
        widened_product(self, (a, b), g, out)
    }
}
