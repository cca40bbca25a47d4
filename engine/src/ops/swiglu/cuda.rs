//! SwiGLU's kernels are bf16 (`kernels/cuda/swiglu.cu`): f32 operands are rounded once and the
//! results widened back.

use super::SwiGluKernel;
use crate::backend::{Cuda, bf16_input, bf16_output, cbuf, cuda_of};
use crate::{DType, Result, Tensor};
use bft_kernels::cuda::ops;

impl SwiGluKernel for Cuda {
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let (dev, i) = cuda_of(gate)?;
        let (g, u) = (bf16_input(gate)?, bf16_input(up)?);
        let y = ops::swiglu_forward(
            &dev,
            cbuf("swiglu", &g, DType::BF16)?,
            cbuf("swiglu", &u, DType::BF16)?,
            gate.numel(),
        )?;
        bf16_output(y, i, gate.shape().clone(), gate.dtype())
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let (dev, i) = cuda_of(dy)?;
        let (g, u, d) = (bf16_input(gate)?, bf16_input(up)?, bf16_input(dy)?);
        let (dg, du) = ops::swiglu_backward(
            &dev,
            cbuf("swiglu", &g, DType::BF16)?,
            cbuf("swiglu", &u, DType::BF16)?,
            cbuf("swiglu", &d, DType::BF16)?,
            dy.numel(),
        )?;
        Ok((
            bf16_output(dg, i, dy.shape().clone(), dy.dtype())?,
            bf16_output(du, i, dy.shape().clone(), dy.dtype())?,
        ))
    }
}
