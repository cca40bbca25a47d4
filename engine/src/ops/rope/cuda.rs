//! RoPE's kernel rotates bf16 rows in place with f32 tables (`kernels/cuda/rope.cu`): it runs
//! on a fresh bf16 copy of the input (rounded once when the input is f32), never on the
//! input's own buffer, which other tensors may share.

use super::RopeKernel;
use crate::backend::{Cuda, bf16_output, cbuf, cuda_of};
use crate::{DType, Result, Tensor};

impl RopeKernel for Cuda {
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
        let (dev, i) = cuda_of(x)?;
        let r = x.rank();
        let (t, d) = (x.dims()[r - 2], x.dims()[r - 1]);
        let rows = x.numel() / (t * d).max(1);
        let y = match x.dtype() {
            DType::BF16 => dev.copy(cbuf("rope", x, DType::BF16)?)?,
            _ => dev.copy(cbuf("rope", &x.cast_untracked(DType::BF16)?, DType::BF16)?)?,
        };
        let (c, s) = (
            cos.cast_untracked(DType::F32)?,
            sin.cast_untracked(DType::F32)?,
        );
        bft_kernels::cuda::ops::rope(
            &dev,
            &y,
            (cbuf("rope", &c, DType::F32)?, cbuf("rope", &s, DType::F32)?),
            (rows, t, d),
            inverse,
        )?;
        bf16_output(y, i, x.shape().clone(), x.dtype())
    }
}
