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
use crate::{DType, Device};

/// A backend's precision policy (DESIGN.md §2), stated once so that no op decides it.
pub(crate) trait Backend: Sync {
    /// The type this backend's kernels compute an op in, given the type of the op's result.
    /// An input of another float type where one side is 16-bit is cast to it before the
    /// kernel runs (`ops::in_compute_dtype`), and the result is cast back.
    fn compute_dtype(&self, result: DType) -> DType;
}

/// Every op's kernel, forward and backward. A backend implements all of them or the crate
/// does not compile; adding an op adds its trait here, one line.
pub(crate) trait Kernels:
    Backend
    + BinaryKernel
    + CastKernel
    + EmbeddingKernel
    + LayerNormKernel
    + NllKernel
    + ReduceKernel
    + RmsNormKernel
    + RopeKernel
    + SoftmaxKernel
    + SwiGluKernel
    + UnaryKernel
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
