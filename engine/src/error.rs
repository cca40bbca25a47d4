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
    Cuda(bft_kernels::cuda::CudaError),
    /// A device allocation failed; `during` is the op that was running, when one was.
    #[error("{}{source}", during.map(|(op, phase)| format!("{op:?} {}: ", match phase {
        crate::profile::Phase::Forward => "forward",
        crate::profile::Phase::Backward => "backward",
    })).unwrap_or_default())]
    OutOfMemory {
        during: Option<(Op, crate::profile::Phase)>,
        source: bft_kernels::cuda::CudaError,
    },
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

impl From<bft_kernels::cuda::CudaError> for Error {
    /// Out-of-memory errors name the op that was allocating.
    fn from(e: bft_kernels::cuda::CudaError) -> Self {
        match e {
            e @ bft_kernels::cuda::CudaError::OutOfMemory { .. } => Error::OutOfMemory {
                during: crate::profile::current(),
                source: e,
            },
            e => Error::Cuda(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Phase, scope};
    use bft_kernels::cuda::CudaError;

    #[test]
    fn out_of_memory_names_the_running_op_and_the_sizes() {
        let oom = || CudaError::OutOfMemory {
            device: "NVIDIA H200 (sm_90)".into(),
            bytes: 3 << 30,
            free: 1 << 29,
            total: 140 << 30,
            released: 1 << 30,
        };
        let plain = "out of memory on NVIDIA H200 (sm_90) allocating 3.00 GiB: 512.0 MiB of \
                     140.00 GiB free after releasing 1.00 GiB of cached buffers";
        assert_eq!(Error::from(oom()).to_string(), plain);
        {
            let _outer = scope(Op::MatMul, Phase::Forward);
            let _inner = scope(Op::Attention, Phase::Backward);
            let e = Error::from(oom()).to_string();
            assert_eq!(e, format!("Attention backward: {plain}"));
        }
        assert_eq!(
            Error::from(oom()).to_string(),
            plain,
            "the scopes are closed"
        );
    }
}
