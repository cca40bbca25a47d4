//! The wgpu backend: WGSL kernels over storage buffers.

use super::Backend;
use crate::{DType, Error, Result, Tensor};
use bft_kernels::wgpu::{Gpu, GpuBuffer};
use std::sync::Arc;

/// A wgpu adapter. WGSL has no bf16, so kernels compute in f32; 16-bit tensors are stored
/// packed two to a word and widened before an op.
pub(crate) struct Wgpu;

impl Backend for Wgpu {
    fn compute_dtype(&self, result: DType) -> DType {
        if result.is_half() { DType::F32 } else { result }
    }
}

/// The wgpu device of `t` and its index, when `t` lives on one.
pub(crate) fn wgpu_of(t: &Tensor) -> Result<(Arc<Gpu>, usize)> {
    match (t.device(), t.wgpu()) {
        (crate::Device::Wgpu(i), Some(b)) => Ok((b.gpu().clone(), i)),
        (device, _) => Err(Error::DeviceMismatch {
            op: "wgpu kernel",
            lhs: crate::Device::Wgpu(0),
            rhs: device,
        }),
    }
}

/// The f32 wgpu buffer of an input, which must be on the op's wgpu device.
pub(crate) fn wbuf<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a GpuBuffer> {
    if t.dtype() != DType::F32 {
        return Err(Error::DType {
            op,
            got: t.dtype(),
            expected: "f32 on wgpu",
        });
    }
    t.wgpu().ok_or(Error::Unsupported {
        op,
        device: t.device(),
    })
}
