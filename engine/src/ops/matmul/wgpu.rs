use super::{Gemm, MatMulKernel, autocast_operand};
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::ops::same_kind;
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
        let half = [a, b]
            .iter()
            .map(|t| t.dtype())
            .find(|d| d.is_half())
            .unwrap_or(DType::BF16);
        let (a, b) = (autocast_operand(a, half)?, autocast_operand(b, half)?);
        same_kind("matmul", &a, &b)?;
        let product = self.matmul(&a, &b, g)?;
        if out == DType::F32 {
            Ok(product)
        } else {
            product.cast_untracked(out)
        }
    }
}
