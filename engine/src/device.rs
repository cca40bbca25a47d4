use std::fmt;

/// Where a tensor's storage lives. Moving between devices is explicit (`Tensor::to_device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
    /// A wgpu adapter by index.
    Wgpu(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Wgpu(i) => write!(f, "wgpu:{i}"),
        }
    }
}

impl Device {
    /// The wgpu adapters on this machine, in `Device::Wgpu(i)` order (name, backend, type).
    pub fn wgpu_adapters() -> Vec<String> {
        bft_kernels::wgpu::adapters()
    }

    /// The CUDA devices on this machine in `Device::Cuda(i)` order (name, architecture), or
    /// why there are none.
    pub fn cuda_devices() -> Result<Vec<String>, String> {
        bft_kernels::cuda::devices()
    }
}
