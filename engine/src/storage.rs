use crate::memory::Ticket;
use crate::{DType, Device};
use half::{bf16, f16};

/// A tensor's buffer, an enum over backends so that each new backend is one more variant.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
    Wgpu(WgpuStorage),
}

/// A buffer on a CUDA device: f32, bf16, f16 or u32 elements in their own widths.
#[derive(Debug)]
pub struct CudaStorage {
    pub(crate) buf: bft_kernels::cuda::DeviceBuffer,
    pub(crate) dtype: DType,
    pub(crate) index: usize,
    _ticket: Ticket,
}

impl CudaStorage {
    pub(crate) fn new(buf: bft_kernels::cuda::DeviceBuffer, dtype: DType, index: usize) -> Self {
        let bytes = buf.len();
        CudaStorage {
            buf,
            dtype,
            index,
            _ticket: Ticket::new(bytes),
        }
    }
}

/// A buffer on a wgpu device: f32 or u32 elements (WGSL's storage types), or f16/bf16 packed two
/// to a u32 word (kernels compute on them through f32 casts).
#[derive(Debug)]
pub struct WgpuStorage {
    pub(crate) buf: bft_kernels::wgpu::GpuBuffer,
    pub(crate) dtype: DType,
    pub(crate) index: usize,
    _ticket: Ticket,
}

impl WgpuStorage {
    pub(crate) fn new(buf: bft_kernels::wgpu::GpuBuffer, dtype: DType, index: usize) -> Self {
        let bytes = buf.len() as usize;
        WgpuStorage {
            buf,
            dtype,
            index,
            _ticket: Ticket::new(bytes),
        }
    }
}

/// Host memory holding one of the element types.
#[derive(Debug)]
pub struct CpuStorage {
    pub(crate) data: CpuData,
    _ticket: Ticket,
}

#[derive(Clone, Debug)]
pub enum CpuData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    U32(Vec<u32>),
}

impl CpuData {
    pub fn dtype(&self) -> DType {
        match self {
            CpuData::F32(_) => DType::F32,
            CpuData::F64(_) => DType::F64,
            CpuData::BF16(_) => DType::BF16,
            CpuData::F16(_) => DType::F16,
            CpuData::U32(_) => DType::U32,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            CpuData::F32(v) => v.len(),
            CpuData::F64(v) => v.len(),
            CpuData::BF16(v) => v.len(),
            CpuData::F16(v) => v.len(),
            CpuData::U32(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CpuStorage {
    pub(crate) fn new(data: CpuData) -> Self {
        let bytes = data.len() * data.dtype().size_in_bytes();
        CpuStorage {
            data,
            _ticket: Ticket::new(bytes),
        }
    }
}

impl Clone for CpuStorage {
    fn clone(&self) -> Self {
        CpuStorage::new(self.data.clone())
    }
}

impl Storage {
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.index),
            Storage::Wgpu(s) => Device::Wgpu(s.index),
        }
    }
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.data.dtype(),
            Storage::Cuda(s) => s.dtype,
            Storage::Wgpu(s) => s.dtype,
        }
    }
}

impl Storage {
    /// A copy on the same device. A device copy can fail (out of memory, a lost device), so
    /// storage is not `Clone`: the failure is an error for the caller, never a panic.
    pub fn try_clone(&self) -> crate::Result<Storage> {
        Ok(match self {
            Storage::Cpu(s) => Storage::Cpu(s.clone()),
            Storage::Cuda(s) => Storage::Cuda(CudaStorage::new(
                s.buf.device().copy(&s.buf)?,
                s.dtype,
                s.index,
            )),
            Storage::Wgpu(s) => Storage::Wgpu(WgpuStorage::new(
                s.buf.gpu().copy(&s.buf)?,
                s.dtype,
                s.index,
            )),
        })
    }
}
