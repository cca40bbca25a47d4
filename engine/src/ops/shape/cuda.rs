//! Data movement on CUDA by element width (`kernels/cuda/layout.cu`): 4-byte and 2-byte
//! elements of any type move as bits.

use super::{LayoutKernel, Slab};
use crate::backend::{Cuda, cuda_of};
use crate::{DType, Error, Result, Shape, Tensor};
use bft_kernels::cuda::typed;

impl LayoutKernel for Cuda {
    fn moves(&self, dtype: DType) -> bool {
        matches!(dtype.size_in_bytes(), 2 | 4)
    }

    fn permute(&self, x: &Tensor, perm: &[usize], dims: Vec<usize>) -> Result<Tensor> {
        let (dev, i) = cuda_of(x)?;
        let y = typed::permute(
            &dev,
            x.dtype().size_in_bytes(),
            buffer("permute", x)?,
            x.dims(),
            perm,
        )?;
        Ok(Tensor::from_cuda(y, x.dtype(), i, dims))
    }

    fn slabs(&self, shape: Shape, pieces: &[(&Tensor, Slab)], zeroed: bool) -> Result<Tensor> {
        let Some((first, _)) = pieces.first() else {
            return Err(Error::shape("slab", "no tensor to copy"));
        };
        let (dev, i) = cuda_of(first)?;
        let bytes = first.dtype().size_in_bytes();
        let dst = if zeroed {
            dev.zeros(shape.numel() * bytes)?
        } else {
            dev.alloc(shape.numel() * bytes)?
        };
        for (t, s) in pieces {
            // One run per outer index: `len x inner` contiguous elements.
            let run = typed::Slab {
                rows: s.outer,
                len: s.len * s.inner,
                src_stride: s.src_dim * s.inner,
                src_off: s.src_at * s.inner,
                dst_stride: s.dst_dim * s.inner,
                dst_off: s.dst_at * s.inner,
            };
            typed::slab(&dev, bytes, buffer("slab", t)?, &dst, run)?;
        }
        Ok(Tensor::from_cuda(dst, first.dtype(), i, shape))
    }
}

fn buffer<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a bft_kernels::cuda::DeviceBuffer> {
    t.cuda().ok_or(Error::Unsupported {
        op,
        device: t.device(),
    })
}
