//! Products go through cuBLAS with f32 accumulation: f32 operands multiply in f32, and a
//! product with a bf16 operand multiplies bf16 by bf16 (an f32 operand, such as a LoRA master,
//! is rounded to a bf16 copy first), writing f32 or bf16 as the result type asks.

use super::{Gemm, MatMulKernel, widened_product};
use crate::backend::{Cuda, bf16_input, cbuf, cuda_of, typed_output};
use crate::{DType, Error, Result, Tensor};
use bft_kernels::cuda::ops::{GemmTypes, Operand, gemm_into};
use bft_kernels::cuda::typed::Float;

impl MatMulKernel for Cuda {
    fn matmul(&self, a: &Tensor, b: &Tensor, g: &Gemm) -> Result<Tensor> {
        let f = match a.dtype() {
            DType::F32 => Float::F32,
            DType::BF16 => Float::Bf16,
            got => {
                return Err(Error::DType {
                    op: "matmul",
                    got,
                    expected: "f32 or bf16 on cuda",
                });
            }
        };
        product(a, b, g, f, f)
    }

    fn matmul_mixed(&self, a: &Tensor, b: &Tensor, g: &Gemm, out: DType) -> Result<Tensor> {
        if [a, b].iter().any(|t| t.dtype() == DType::F16) {
            // f16 computes in f32 on CUDA (`Backend::compute_dtype`).
            return widened_product(self, (a, b), g, out);
        }
        let (a, b) = (bf16_input(a)?, bf16_input(b)?);
        let out = if out == DType::F32 {
            Float::F32
        } else {
            Float::Bf16
        };
        product(&a, &b, g, Float::Bf16, out)
    }

    /// cuBLAS accumulates into a copy of `c` (beta = 1).
    fn matmul_add(&self, a: &Tensor, b: &Tensor, g: &Gemm, c: &mut Tensor) -> Result<Tensor> {
        let (dev, i) = cuda_of(a)?;
        let f = match a.dtype() {
            DType::F32 => Float::F32,
            _ => return c.stop_gradient().add(&self.matmul(a, b, g)?),
        };
        let acc = dev.copy(cbuf("matmul", c, DType::F32)?)?;
        let operands = (
            Operand::new(cbuf("matmul", a, DType::F32)?, g.ta),
            (Operand::new(cbuf("matmul", b, DType::F32)?, g.tb), false),
        );
        let types = GemmTypes {
            operands: f,
            out: f,
        };
        gemm_into(&dev, g.dims, operands, types, (&acc, 0, true))?;
        Ok(typed_output(acc, f, i, g.out_dims.clone()))
    }
}

/// `op(a) . op(b)` for operands stored as `operands`, written as `out`.
fn product(a: &Tensor, b: &Tensor, g: &Gemm, operands: Float, out: Float) -> Result<Tensor> {
    let (dev, i) = cuda_of(a)?;
    let dtype = match operands {
        Float::F32 => DType::F32,
        Float::Bf16 => DType::BF16,
    };
    let d = g.dims;
    let c = dev.alloc(d.batch * d.m * d.n * out.bytes())?;
    let ab = (
        Operand::new(cbuf("matmul", a, dtype)?, g.ta),
        (Operand::new(cbuf("matmul", b, dtype)?, g.tb), false),
    );
    gemm_into(&dev, d, ab, GemmTypes { operands, out }, (&c, 0, false))?;
    Ok(typed_output(c, out, i, g.out_dims.clone()))
}
