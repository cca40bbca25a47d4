//! The backends behind one interface. Each backend is a zero-sized type (`Cpu`, `Wgpu`,
//! `Cuda`) that states its dtype policy once (`Backend`) and implements every op's kernel
//! trait in that op's folder (`ops/<op>/{cpu,wgpu,cuda}.rs`). `Kernels` is the sum of those
//! traits: `kernels` below is the one place that picks a backend from a device, and coercing a
//! backend to `&dyn Kernels` there is what makes a missing kernel a compile error.

mod cpu;
mod cuda;
mod wgpu;

pub(crate) use cpu::Cpu;
pub(crate) use cuda::{Cuda, bf16_input, bf16_output, cbuf, cuda_of, fbuf, float_of, typed_output};
pub(crate) use wgpu::{Wgpu, wbuf, wgpu_of};

use crate::ops::kernels::*;
use crate::optim::AdamWStep;
use crate::storage::{CpuData, CpuStorage};
use crate::{DType, Device, Error, Result, Storage, Tensor};
use half::{bf16, f16};
use std::sync::Arc;

/// A backend's precision policy (DESIGN.md §2), stated once so that no op decides it.
pub(crate) trait Backend: Sync {
    /// The type this backend's kernels compute an op in, given the type of the op's result.
    /// An input of another float type where one side is 16-bit is cast to it before the
    /// kernel runs (`ops::in_compute_dtype`), and the result is cast back.
    fn compute_dtype(&self, result: DType) -> DType;
}

/// What a backend does with whole tensors outside any op: moving them between the host and
/// its devices, accumulating gradients, the optimizer's step and the gradient norm. Nothing
/// here is recorded on a tape; the callers (`Tensor::to_device`, `Tensor::accumulate`,
/// `optim`) check shapes, types and devices first.
pub(crate) trait StorageKernel {
    /// A copy of the host tensor `t` on `device`, one of this backend's.
    fn upload(&self, t: &Tensor, device: Device) -> Result<Tensor>;
    /// A host copy of `t`, which lives on one of this backend's devices.
    fn download(&self, t: &Tensor) -> Result<Tensor>;
    /// `acc += g` for gradients of one shape, float type and device: in place where the
    /// backend can and `acc` owns its storage alone.
    fn accumulate(&self, acc: &mut Tensor, g: &Tensor) -> Result<()>;
    /// One AdamW step, in place, of an f32 or f64 parameter `p` from its gradient `g` (of
    /// `p`'s type) and its f32 moments.
    fn adamw(
        &self,
        p: &mut Tensor,
        g: &Tensor,
        moments: (&mut Tensor, &mut Tensor),
        h: &AdamWStep,
    ) -> Result<()>;
    /// `sum(t^2)` over all of `ts`, which live on one device of this backend, in f64.
    fn sum_squares(&self, ts: &[Tensor]) -> Result<f64>;
}

/// A host buffer's bytes as a device holds them: 16-bit floats as their bits. f64 has no device
/// form.
pub(crate) fn host_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let bits = |v: &[u16]| bytemuck::cast_slice(v).to_vec();
    let Storage::Cpu(s) = t.storage() else {
        return Err(Error::Unsupported {
            op: "upload",
            device: t.device(),
        });
    };
    Ok(match &s.data {
        CpuData::F32(v) => bytemuck::cast_slice(v).to_vec(),
        CpuData::U32(v) => bytemuck::cast_slice(v).to_vec(),
        CpuData::F16(v) => bits(&v.iter().map(|h| h.to_bits()).collect::<Vec<_>>()),
        CpuData::BF16(v) => bits(&v.iter().map(|h| h.to_bits()).collect::<Vec<_>>()),
        CpuData::F64(_) => {
            return Err(Error::DType {
                op: "to_device",
                got: t.dtype(),
                expected: "f32, f16, bf16 or u32 (convert with to_dtype first)",
            });
        }
    })
}

/// A host tensor of `like`'s type and shape from the bytes a device read back (16-bit floats
/// as their bits; a device may pad the buffer past the last element).
pub(crate) fn host_tensor(bytes: &[u8], like: &Tensor) -> Tensor {
    /// The first `n` elements of `bytes` read as `T`.
    fn first<T: bytemuck::Pod>(bytes: &[u8], n: usize) -> Vec<T> {
        let mut all: Vec<T> = bytemuck::pod_collect_to_vec(bytes);
        all.truncate(n);
        all
    }
    let n = like.numel();
    let halves = || first::<u16>(bytes, n).into_iter();
    let data = match like.dtype() {
        DType::U32 => CpuData::U32(first(bytes, n)),
        DType::F16 => CpuData::F16(halves().map(f16::from_bits).collect()),
        DType::BF16 => CpuData::BF16(halves().map(bf16::from_bits).collect()),
        _ => CpuData::F32(first(bytes, n)),
    };
    Tensor::from_storage(
        Arc::new(Storage::Cpu(CpuStorage::new(data))),
        like.shape().clone(),
    )
}

/// Every op's kernel, forward and backward. A backend implements all of them or the crate
/// does not compile; adding an op adds its trait here, one line.
pub(crate) trait Kernels:
    Backend
    + AttentionKernel
    + BinaryKernel
    + CastKernel
    + EmbeddingKernel
    + LayerNormKernel
    + LayoutKernel
    + LmHeadKernel
    + MatMulKernel
    + NllKernel
    + ReduceKernel
    + RmsNormKernel
    + RopeKernel
    + SoftmaxKernel
    + StorageKernel
    + SwiGluKernel
    + UnaryKernel
    + WeighKernel
{
}

impl Kernels for Cpu {}
impl Kernels for Wgpu {}
impl Kernels for Cuda {}

/// The kernels of `device`: the one match from a device to its backend.
pub(crate) fn kernels(device: Device) -> &'static dyn Kernels {
    match device {
        Device::Cpu => &Cpu,
        Device::Wgpu(_) => &Wgpu,
        Device::Cuda(_) => &Cuda,
    }
}
