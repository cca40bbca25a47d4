//! RoPE's kernel rotates bf16 rows in place with f32 tables (`kernels/cuda/rope.cu`). `rope`
//! runs it on a fresh bf16 buffer (a copy of a bf16 input, which other tensors may share, or
//! the rounded copy of an f32 one, widened back after); `rope_in_place` on the input's own
//! buffer.

use super::RopeKernel;
use crate::backend::{Cuda, cbuf, cuda_of};
use crate::{DType, Result, Tensor};
use bft_kernels::cuda::DeviceBuffer;

impl RopeKernel for Cuda {
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
        let (dev, i) = cuda_of(x)?;
        let y = match x.dtype() {
            DType::BF16 => {
                let copy = dev.copy(cbuf("rope", x, DType::BF16)?)?;
                Tensor::from_cuda(copy, DType::BF16, i, x.shape().clone())
            }
            // The cast writes a fresh buffer, which is rotated where it is.
            _ => x.cast_untracked(DType::BF16)?,
        };
        rotate(x, cbuf("rope", &y, DType::BF16)?, (cos, sin), inverse)?;
        y.cast_untracked(x.dtype())
    }

    fn rope_in_place(&self, x: &mut Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
        if x.dtype() != DType::BF16 || !x.owns_storage() {
            return Ok(None);
        }
        rotate(x, cbuf("rope", x, DType::BF16)?, (cos, sin), false)?;
        Ok(Some(x.reshaped_view(x.shape().clone())))
    }
}

/// Rotates `y`, a bf16 buffer of `x`'s shape, in place.
fn rotate(
    x: &Tensor,
    y: &DeviceBuffer,
    (cos, sin): (&Tensor, &Tensor),
    inverse: bool,
) -> Result<()> {
    let (dev, _) = cuda_of(x)?;
    let r = x.rank();
    let (t, d) = (x.dims()[r - 2], x.dims()[r - 1]);
    let rows = x.numel() / (t * d).max(1);
    let (c, s) = (
        cos.cast_untracked(DType::F32)?,
        sin.cast_untracked(DType::F32)?,
    );
    bft_kernels::cuda::ops::rope(
        &dev,
        y,
        (cbuf("rope", &c, DType::F32)?, cbuf("rope", &s, DType::F32)?),
        (rows, t, d),
        inverse,
    )?;
    Ok(())
}
