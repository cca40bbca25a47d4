//! The CUDA backend: NVRTC-compiled kernels from `kernels/cuda/` and cuBLAS products.

use super::{Backend, StorageKernel, host_bytes, host_tensor};
use crate::optim::AdamWStep;
use crate::storage::CudaStorage;
use crate::{DType, Error, Result, Storage, Tensor};
use bft_kernels::cuda::typed::Float;
use bft_kernels::cuda::{Cuda as Device, DeviceBuffer};
use std::sync::Arc;

/// A CUDA device. Activations are bf16 and the kernels compute in f32 registers from them,
/// writing bf16; row statistics, reductions, loss terms, LoRA masters, gradients of f32
/// tensors and optimizer state are f32. f32 tensors compute in f32 (kernels that exist only
/// for bf16 round their f32 input once, as each op's `cuda.rs` says); f16 computes in f32.
pub(crate) struct Cuda;

impl Backend for Cuda {
    fn compute_dtype(&self, result: DType) -> DType {
        if result == DType::F16 {
            DType::F32
        } else {
            result
        }
    }
}

/// The CUDA device of `t` and its ordinal, when `t` lives on one.
pub(crate) fn cuda_of(t: &Tensor) -> Result<(Arc<Device>, usize)> {
    match (t.device(), t.cuda()) {
        (crate::Device::Cuda(i), Some(b)) => Ok((b.device().clone(), i)),
        (device, _) => Err(Error::DeviceMismatch {
            op: "cuda kernel",
            lhs: crate::Device::Cuda(0),
            rhs: device,
        }),
    }
}

/// The CUDA buffer of an input that must hold `dtype`, on the op's device.
pub(crate) fn cbuf<'a>(op: &'static str, t: &'a Tensor, dtype: DType) -> Result<&'a DeviceBuffer> {
    if t.dtype() != dtype {
        return Err(Error::DType {
            op,
            got: t.dtype(),
            expected: dtype_name(dtype),
        });
    }
    t.cuda().ok_or(Error::Unsupported {
        op,
        device: t.device(),
    })
}

/// `t` as bf16, for the kernels that exist only in bf16: itself, or an f32 tensor rounded once.
pub(crate) fn bf16_input(t: &Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::BF16 => Ok(t.stop_gradient()),
        _ => t.cast_untracked(DType::BF16),
    }
}

/// A bf16 kernel output on device `index`, returned in `like`, the type of the op's inputs
/// (an f32 op widens the bf16 result exactly).
pub(crate) fn bf16_output(
    buf: DeviceBuffer,
    index: usize,
    shape: impl Into<crate::Shape>,
    like: DType,
) -> Result<Tensor> {
    let out = Tensor::from_cuda(buf, DType::BF16, index, shape);
    if like == DType::BF16 {
        Ok(out)
    } else {
        out.cast_untracked(like)
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32 on cuda",
        DType::BF16 => "bf16 on cuda",
        DType::U32 => "u32 on cuda",
        DType::F16 => "f16 on cuda",
        DType::F64 => "f64 on cuda",
    }
}

/// The storage type of a typed kernel for `t`: f32 or bf16 (f16 computes in f32 by the
/// policy above, so it never reaches a kernel).
pub(crate) fn float_of(op: &'static str, t: &Tensor) -> Result<Float> {
    match t.dtype() {
        DType::F32 => Ok(Float::F32),
        DType::BF16 => Ok(Float::Bf16),
        got => Err(Error::DType {
            op,
            got,
            expected: "f32 or bf16 on cuda",
        }),
    }
}

/// The buffer of a float input of the op's storage type (`float_of` of its first input).
pub(crate) fn fbuf<'a>(op: &'static str, t: &'a Tensor, f: Float) -> Result<&'a DeviceBuffer> {
    cbuf(
        op,
        t,
        match f {
            Float::F32 => DType::F32,
            Float::Bf16 => DType::BF16,
        },
    )
}

/// A typed kernel's output on device `index`.
pub(crate) fn typed_output(
    buf: DeviceBuffer,
    f: Float,
    index: usize,
    shape: impl Into<crate::Shape>,
) -> Tensor {
    let dtype = match f {
        Float::F32 => DType::F32,
        Float::Bf16 => DType::BF16,
    };
    Tensor::from_cuda(buf, dtype, index, shape)
}

impl StorageKernel for Cuda {
    fn upload(&self, t: &Tensor, device: crate::Device) -> Result<Tensor> {
        let crate::Device::Cuda(i) = device else {
            return Err(Error::Unsupported {
                op: "upload",
                device,
            });
        };
        let d = bft_kernels::cuda::cuda(i)?;
        let buf = d.upload(&host_bytes(t)?)?;
        Ok(Tensor::from_cuda(buf, t.dtype(), i, t.shape().clone()))
    }

    fn download(&self, t: &Tensor) -> Result<Tensor> {
        let buf = t.cuda().ok_or(Error::Unsupported {
            op: "download",
            device: t.device(),
        })?;
        Ok(host_tensor(&buf.device().read(buf)?, t))
    }

    /// A new buffer from the elementwise add (f32 or bf16 gradients).
    fn accumulate(&self, acc: &mut Tensor, g: &Tensor) -> Result<()> {
        let (dev, i) = cuda_of(acc)?;
        let f = float_of("accumulate", acc)?;
        let n = acc.numel();
        let bufs = (fbuf("accumulate", acc, f)?, fbuf("accumulate", g, f)?);
        // 0: Add in `kernels/cuda/elementwise.cu`.
        let sum = bft_kernels::cuda::typed::binary(&dev, f, 0, bufs, n, n.max(1))?;
        let dtype = acc.dtype();
        acc.replace_storage(Storage::Cuda(CudaStorage::new(sum, dtype, i)));
        Ok(())
    }

    /// f32 master weights, in place; a bf16 working copy is the caller's cast.
    fn adamw(
        &self,
        p: &mut Tensor,
        g: &Tensor,
        (m, v): (&mut Tensor, &mut Tensor),
        h: &AdamWStep,
    ) -> Result<()> {
        let (dev, _) = cuda_of(g)?;
        let grad = cbuf("adamw", g, DType::F32)?;
        let n = p.numel();
        let (Storage::Cuda(pc), Storage::Cuda(mc), Storage::Cuda(vc)) =
            (p.storage_mut()?, m.storage_mut()?, v.storage_mut()?)
        else {
            return Err(Error::Unsupported {
                op: "adamw",
                device: g.device(),
            });
        };
        bft_kernels::cuda::ops::adamw(&dev, (&pc.buf, grad, &mc.buf, &vc.buf), None, n, h)?;
        Ok(())
    }

    fn sum_squares(&self, ts: &[Tensor]) -> Result<f64> {
        let Some(first) = ts.first() else {
            return Ok(0.0);
        };
        let (dev, _) = cuda_of(first)?;
        let wide = ts
            .iter()
            .map(|t| t.cast_untracked(DType::F32))
            .collect::<Result<Vec<_>>>()?;
        let bufs = wide
            .iter()
            .map(|t| Ok((cbuf("sum_squares", t, DType::F32)?, t.numel())))
            .collect::<Result<Vec<_>>>()?;
        Ok(bft_kernels::cuda::ops::sum_squares(&dev, &bufs)?
            .iter()
            .sum())
    }
}
