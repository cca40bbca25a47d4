use super::BinaryKernel;
use crate::backend::{Cuda, cuda_of, fbuf, float_of, typed_output};
use crate::{Result, Shape, Tensor};
use bft_kernels::cpu::binary::BinaryKind;
use bft_kernels::cuda::typed;

impl BinaryKernel for Cuda {
    fn binary(&self, kind: BinaryKind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (dev, i) = cuda_of(a)?;
        let f = float_of("binary", a)?;
        // The kind's index in `kernels/cuda/elementwise.cu`.
        let code = match kind {
            BinaryKind::Add => 0,
            BinaryKind::Sub => 1,
            BinaryKind::Mul => 2,
            BinaryKind::Div => 3,
        };
        let bufs = (fbuf("binary", a, f)?, fbuf("binary", b, f)?);
        let o = typed::binary(&dev, f, code, bufs, a.numel(), b.numel())?;
        Ok(typed_output(o, f, i, a.shape().clone()))
    }

    fn scale(&self, x: &Tensor, alpha: f64) -> Result<Tensor> {
        let (dev, i) = cuda_of(x)?;
        let f = float_of("scale", x)?;
        let o = typed::scale(&dev, f, alpha as f32, fbuf("scale", x, f)?, x.numel())?;
        Ok(typed_output(o, f, i, x.shape().clone()))
    }

    fn sum_to(&self, x: &Tensor, shape: &Shape) -> Result<Tensor> {
        let (dev, i) = cuda_of(x)?;
        let f = float_of("sum_to", x)?;
        let cols = shape.numel();
        let rows = x.numel() / cols.max(1);
        let o = typed::sum_rows(&dev, f, fbuf("sum_to", x, f)?, rows, cols)?;
        Ok(typed_output(o, f, i, shape.clone()))
    }
}
