use super::UnaryKernel;
use crate::backend::{Cuda, cuda_of, fbuf, float_of, typed_output};
use crate::{Result, Tensor};
use bft_kernels::cpu::unary::UnaryKind;
use bft_kernels::cuda::typed;

/// The kind's index in `kernels/cuda/elementwise.cu`.
fn code(kind: UnaryKind) -> u32 {
    match kind {
        UnaryKind::Exp => 0,
        UnaryKind::Log => 1,
        UnaryKind::Sigmoid => 2,
        UnaryKind::Silu => 3,
        UnaryKind::Neg => 4,
        UnaryKind::Gelu => 5,
    }
}

impl UnaryKernel for Cuda {
    fn unary(&self, kind: UnaryKind, x: &Tensor) -> Result<Tensor> {
        let (dev, i) = cuda_of(x)?;
        let f = float_of("unary", x)?;
        let y = typed::unary(&dev, f, code(kind), fbuf("unary", x, f)?, x.numel())?;
        Ok(typed_output(y, f, i, x.shape().clone()))
    }

    fn unary_backward(
        &self,
        kind: UnaryKind,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let (dev, i) = cuda_of(dy)?;
        let f = float_of("unary backward", dy)?;
        let bufs = (
            fbuf("unary", x, f)?,
            fbuf("unary", y, f)?,
            fbuf("unary", dy, f)?,
        );
        let dx = typed::unary_backward(&dev, f, code(kind), bufs, dy.numel())?;
        Ok(typed_output(dx, f, i, dy.shape().clone()))
    }
}
