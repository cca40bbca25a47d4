use super::{CastKernel, device_pair, half};
use crate::backend::Cuda;
use crate::{DType, Error, Result, Tensor};
use bft_kernels::cuda::ops::{narrow, widen};

impl CastKernel for Cuda {
    /// f32, f16 and bf16 among themselves, 16-bit through f32; U32 and F64 go through the host.
    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
        if !device_pair(x.dtype(), dtype) {
            return Ok(None);
        }
        let (buf, i) = match (x.cuda(), x.device()) {
            (Some(b), crate::Device::Cuda(i)) => (b, i),
            (_, device) => return Err(Error::Unsupported { op: "cast", device }),
        };
        let (d, n) = (buf.device(), x.numel());
        let wide = half(x.dtype()).map(|h| widen(d, buf, n, h)).transpose()?;
        let out = match (wide, half(dtype)) {
            (wide, Some(h)) => narrow(d, wide.as_ref().unwrap_or(buf), n, h)?,
            (Some(wide), None) => wide,
            (None, None) => return Ok(None),
        };
        Ok(Some(Tensor::from_cuda(out, dtype, i, x.shape().clone())))
    }
}
