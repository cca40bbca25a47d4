use crate::{DType, Device, Op, Shape};

/// Errors of the engine. Every variant names the op and the offending shape, dtype or device so
/// the message alone says what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: dtype {got:?} is not supported here (expected {expected})")]
    DType {
        op: &'static str,
        got: DType,
        expected: &'static str,
    },
    #[error("{op}: dtypes differ: {lhs:?} and {rhs:?}")]
    DTypeMismatch {
        op: &'static str,
        lhs: DType,
        rhs: DType,
    },
    #[error("{op}: tensors are on different devices: {lhs} and {rhs}")]
    DeviceMismatch {
        op: &'static str,
        lhs: Device,
        rhs: Device,
    },
    #[error("device {0} is not available in this build or on this machine")]
    DeviceUnavailable(Device),
    #[error("{op} is not implemented on {device} yet")]
    Unsupported { op: &'static str, device: Device },
    #[error(transparent)]
    Gpu(#[from] bft_kernels::wgpu::GpuError),
    #[error(transparent)]
    Cuda(#[from] bft_kernels::cuda::CudaError),
    #[error("{op}: index {index} is out of range for size {size}")]
    Index {
        op: &'static str,
        index: usize,
        size: usize,
    },
    #[error("op {0:?} has no backward, but one of its inputs is tracked on a tape")]
    NoBackward(Op),
    #[error("{op}: input {input} must not be tracked: it is not differentiable")]
    NotDifferentiable {
        op: &'static str,
        input: &'static str,
    },
    #[error("inputs of one op are tracked on two different tapes")]
    TapeMismatch,
    #[error("backward: {0}")]
    Backward(String),
    #[error("buffer of {len} elements does not match shape {shape} ({numel} elements)")]
    BufferSize {
        len: usize,
        shape: Shape,
        numel: usize,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }
}
