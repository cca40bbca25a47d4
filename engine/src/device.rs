use std::fmt;

/// Where a tensor's storage lives. Moving between devices is explicit (`Tensor::to_device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal (backend lands with the CUDA issue).
    Cuda(usize),
    /// A wgpu adapter by index (backend lands with the WGSL issue).
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
}
