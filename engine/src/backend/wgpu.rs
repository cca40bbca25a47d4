//! The wgpu backend: WGSL kernels over storage buffers.

use super::{Backend, StorageKernel, host_bytes, host_tensor};
use crate::optim::AdamWStep;
use crate::storage::WgpuStorage;
use crate::{DType, Device, Error, Result, Storage, Tensor};
use bft_kernels::cpu::binary::BinaryKind;
use bft_kernels::wgpu::ops;
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

impl StorageKernel for Wgpu {
    fn upload(&self, t: &Tensor, device: Device) -> Result<Tensor> {
        let Device::Wgpu(i) = device else {
            return Err(Error::Unsupported {
                op: "upload",
                device,
            });
        };
        let g = bft_kernels::wgpu::gpu(i)?;
        // 16-bit floats upload as their bits: two to a u32 word on the device.
        let buf = g.upload(&host_bytes(t)?)?;
        Ok(Tensor::from_wgpu(buf, t.dtype(), i, t.shape().clone()))
    }

    fn download(&self, t: &Tensor) -> Result<Tensor> {
        let buf = t.wgpu().ok_or(Error::Unsupported {
            op: "download",
            device: t.device(),
        })?;
        Ok(host_tensor(&buf.gpu().read(buf)?, t))
    }

    /// A new buffer: device tensors are not updated in place.
    fn accumulate(&self, acc: &mut Tensor, g: &Tensor) -> Result<()> {
        let (gpu, i) = wgpu_of(acc)?;
        let n = acc.numel();
        let (a, b) = (wbuf("accumulate", acc)?, wbuf("accumulate", g)?);
        let sum = ops::binary(&gpu, BinaryKind::Add, a, b, n, n.max(1))?;
        let dtype = acc.dtype();
        acc.replace_storage(Storage::Wgpu(WgpuStorage::new(sum, dtype, i)));
        Ok(())
    }

    fn adamw(
        &self,
        p: &mut Tensor,
        g: &Tensor,
        (m, v): (&mut Tensor, &mut Tensor),
        h: &AdamWStep,
    ) -> Result<()> {
        let grad = wbuf("adamw", g)?;
        let n = p.numel();
        let (Storage::Wgpu(pw), Storage::Wgpu(mw), Storage::Wgpu(vw)) =
            (p.storage_mut()?, m.storage_mut()?, v.storage_mut()?)
        else {
            return Err(Error::Unsupported {
                op: "adamw",
                device: g.device(),
            });
        };
        Ok(ops::adamw(
            pw.buf.gpu(),
            &pw.buf,
            grad,
            &mw.buf,
            &vw.buf,
            n,
            h,
        )?)
    }

    fn sum_squares(&self, ts: &[Tensor]) -> Result<f64> {
        let Some(first) = ts.first() else {
            return Ok(0.0);
        };
        let (g, _) = wgpu_of(first)?;
        let wide = ts
            .iter()
            .map(|t| t.cast_untracked(DType::F32))
            .collect::<Result<Vec<_>>>()?;
        let bufs = wide
            .iter()
            .map(|t| Ok((wbuf("sum_squares", t)?, t.numel())))
            .collect::<Result<Vec<_>>>()?;
        Ok(ops::sum_squares(&g, &bufs)?.iter().sum())
    }
}
