//! Data movement on wgpu: 32-bit words of any type move as bits.

use super::{LayoutKernel, Slab};
use crate::backend::{Wgpu, wgpu_of};
use crate::{DType, Error, Result, Shape, Tensor};
use bft_kernels::wgpu::ops;

impl LayoutKernel for Wgpu {
    fn moves(&self, dtype: DType) -> bool {
        dtype.size_in_bytes() == 4
    }

    fn permute(&self, x: &Tensor, perm: &[usize], dims: Vec<usize>) -> Result<Tensor> {
        let (g, i) = wgpu_of(x)?;
        if x.rank() > ops::MAX_RANK {
            return Err(Error::Unsupported {
                op: "permute of more than 6 axes",
                device: x.device(),
            });
        }
        let y = ops::permute(&g, moved("permute", x)?, x.dims(), perm)?;
        Ok(Tensor::from_wgpu(y, x.dtype(), i, dims))
    }

    fn slabs(&self, shape: Shape, pieces: &[(&Tensor, Slab)], zeroed: bool) -> Result<Tensor> {
        let Some((first, _)) = pieces.first() else {
            return Err(Error::shape("slab", "no tensor to copy"));
        };
        let (g, i) = wgpu_of(first)?;
        let dst = if zeroed {
            ops::fill(&g, shape.numel(), 0)?
        } else {
            g.alloc((shape.numel() * 4) as u64)
        };
        for (t, s) in pieces {
            ops::slab(&g, moved("slab", t)?, &dst, *s)?;
        }
        Ok(Tensor::from_wgpu(dst, first.dtype(), i, shape))
    }
}

/// A wgpu tensor's buffer for a data-movement op: any 32-bit element type moves as bits.
fn moved<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a bft_kernels::wgpu::GpuBuffer> {
    if t.dtype().size_in_bytes() != 4 {
        return Err(Error::DType {
            op,
            got: t.dtype(),
            expected: "f32 or u32 on wgpu",
        });
    }
    t.wgpu().ok_or(Error::Unsupported {
        op,
        device: t.device(),
    })
}
