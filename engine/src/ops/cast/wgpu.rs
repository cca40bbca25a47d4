use super::CastKernel;
use crate::backend::Wgpu;
use crate::{DType, Error, Result, Tensor};
use bft_kernels::Half;
use bft_kernels::wgpu::ops::{narrow, widen};

/// The 16-bit type of `d`, if it is one.
pub(super) fn half(d: DType) -> Option<Half> {
    match d {
        DType::F16 => Some(Half::F16),
        DType::BF16 => Some(Half::BF16),
        _ => None,
    }
}

/// Whether both types are among f32, f16 and bf16 (the casts devices convert themselves).
pub(super) fn device_pair(from: DType, to: DType) -> bool {
    let float = |d: DType| matches!(d, DType::F32 | DType::F16 | DType::BF16);
    float(from) && float(to) && from != to
}

impl CastKernel for Wgpu {
    /// f32, f16 and bf16 among themselves, 16-bit through f32; U32 and F64 go through the host.
    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
        if !device_pair(x.dtype(), dtype) {
            return Ok(None);
        }
        let (buf, i) = match (x.wgpu(), x.device()) {
            (Some(b), crate::Device::Wgpu(i)) => (b, i),
            (_, device) => return Err(Error::Unsupported { op: "cast", device }),
        };
        let (g, n) = (buf.gpu(), x.numel());
        let wide = half(x.dtype()).map(|h| widen(g, buf, n, h)).transpose()?;
        let out = match (wide, half(dtype)) {
            (wide, Some(h)) => narrow(g, wide.as_ref().unwrap_or(buf), n, h)?,
            (Some(wide), None) => wide,
            (None, None) => return Ok(None),
        };
        Ok(Some(Tensor::from_wgpu(out, dtype, i, x.shape().clone())))
    }
}
