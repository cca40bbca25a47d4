use crate::storage::{CpuStorage, CudaStorage};
use crate::tape::Tape;
use crate::{DType, Device, Elem, Error, Result, Shape, Storage};
use half::{bf16, f16};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Identity of a tensor on a tape. Views that share storage (reshape, stop_gradient) get new ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// An immutable n-dimensional array: a shape, an `Arc`'d storage on one device, and, when it
/// takes part in autodiff, the tape it is tracked on. Cloning is cheap (reference counts only).
#[derive(Clone)]
pub struct Tensor {
    id: TensorId,
    shape: Shape,
    storage: Arc<Storage>,
    tape: Option<Tape>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {:?}, {}{})",
            self.shape,
            self.dtype(),
            self.device(),
            if self.tape.is_some() { ", tracked" } else { "" }
        )
    }
}

impl Tensor {
    pub(crate) fn from_storage(storage: Arc<Storage>, shape: Shape) -> Tensor {
        // A storage no other tensor holds is new memory (a view shares its input's).
        if Arc::strong_count(&storage) == 1 {
            crate::profile::made(shape.numel() * storage.dtype().size_in_bytes());
        }
        Tensor {
            id: TensorId::fresh(),
            shape,
            storage,
            tape: None,
        }
    }

    /// A tensor on the host from a vector laid out row-major.
    pub(crate) fn from_cpu<T: Elem>(v: Vec<T>, shape: impl Into<Shape>) -> Tensor {
        let shape = shape.into();
        debug_assert_eq!(v.len(), shape.numel());
        Tensor::from_storage(Arc::new(Storage::Cpu(CpuStorage::new(T::wrap(v)))), shape)
    }

    /// A tensor from a row-major vector; the length must match the shape.
    pub fn from_vec<T: Elem>(
        v: Vec<T>,
        shape: impl Into<Shape>,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        if v.len() != shape.numel() {
            return Err(Error::BufferSize {
                len: v.len(),
                numel: shape.numel(),
                shape,
            });
        }
        Tensor::from_cpu(v, shape).to_device(device)
    }

    /// A filled tensor of any dtype.
    pub fn full(
        value: f64,
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.numel();
        let t = match dtype {
            DType::F32 => Tensor::from_cpu(vec![value as f32; n], shape),
            DType::F64 => Tensor::from_cpu(vec![value; n], shape),
            DType::BF16 => Tensor::from_cpu(vec![half::bf16::from_f64(value); n], shape),
            DType::F16 => Tensor::from_cpu(vec![half::f16::from_f64(value); n], shape),
            DType::U32 => Tensor::from_cpu(vec![value as u32; n], shape),
        };
        t.to_device(device)
    }

    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(0.0, shape, dtype, device)
    }

    pub fn ones(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(1.0, shape, dtype, device)
    }

    /// Normal(0, std) samples from a seeded generator (Box–Muller), for initialisation and tests.
    pub fn randn(
        shape: impl Into<Shape>,
        std: f64,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let shape = shape.into();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f64> = (0..shape.numel())
            .map(|_| {
                let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            })
            .collect();
        Tensor::from_cpu(v, shape)
            .cast_untracked(dtype)?
            .to_device(device)
    }

    pub fn id(&self) -> TensorId {
        self.id
    }
    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }
    pub fn device(&self) -> Device {
        self.storage.device()
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    /// Whether this tensor takes part in autodiff (a tracked leaf or computed from one).
    pub fn is_tracked(&self) -> bool {
        self.tape.is_some()
    }
    pub(crate) fn tape(&self) -> Option<&Tape> {
        self.tape.as_ref()
    }

    /// Same id and storage, tracked on `tape`: how a leaf joins a tape and how an op's output
    /// is marked.
    pub(crate) fn with_tape(&self, tape: Tape) -> Tensor {
        Tensor {
            tape: Some(tape),
            ..self.clone()
        }
    }

    /// A constant for every tape: shares storage, records nothing, and gets a new id so its
    /// gradient can never be confused with the original's. BFT's token weight `sg(p)` and
    /// sample weight `sg(1 - p_conf)` go through it.
    pub fn stop_gradient(&self) -> Tensor {
        Tensor::from_storage(self.storage.clone(), self.shape.clone())
    }

    /// The storage, for writing in place: the tensor leaves its tape and gets a new id (it will
    /// hold new values), and shared storage is copied first, so no other tensor sees the write.
    pub(crate) fn storage_mut(&mut self) -> Result<&mut Storage> {
        // Copy first, so a failed copy leaves the tensor as it was; the second call only
        // re-borrows the now unique storage.
        self.unique_storage()?;
        self.tape = None;
        self.id = TensorId::fresh();
        self.unique_storage()
    }

    /// Whether no other tensor shares this one's storage (an in-place kernel may write it).
    pub(crate) fn owns_storage(&mut self) -> bool {
        Arc::get_mut(&mut self.storage).is_some()
    }

    /// The storage, copied first if another tensor shares it (copy-on-write).
    pub(crate) fn unique_storage(&mut self) -> Result<&mut Storage> {
        if Arc::get_mut(&mut self.storage).is_none() {
            self.storage = Arc::new(self.storage.try_clone()?);
        }
        Arc::get_mut(&mut self.storage).ok_or_else(|| {
            Error::Backward("a tensor's storage is still shared after copying it".into())
        })
    }

    /// Same storage under another shape; the caller has checked the element count.
    pub(crate) fn reshaped_view(&self, shape: Shape) -> Tensor {
        Tensor::from_storage(self.storage.clone(), shape)
    }

    /// The host buffer, if the tensor is on the CPU with element type `T`.
    pub(crate) fn cpu<T: Elem>(&self, op: &'static str) -> Result<&[T]> {
        match &*self.storage {
            Storage::Cpu(s) => T::view(&s.data).ok_or(Error::DType {
                op,
                got: self.dtype(),
                expected: std::any::type_name::<T>(),
            }),
            Storage::Wgpu(_) | Storage::Cuda(_) => Err(Error::Unsupported {
                op,
                device: self.device(),
            }),
        }
    }

    /// This tensor's host buffer, moved out, when no other tensor shares it (and it holds
    /// `T`): an op that overwrites its input in place (`matmul_t_add`) takes it instead of a
    /// copy. The tensor keeps its id and tape but is left empty; the caller drops it.
    pub(crate) fn take_unique_cpu<T: Elem>(&mut self) -> Option<Vec<T>> {
        let Storage::Cpu(s) = Arc::get_mut(&mut self.storage)? else {
            return None;
        };
        T::view(&s.data)?;
        T::take(std::mem::replace(&mut s.data, T::wrap(Vec::new())))
    }

    /// The device buffer, if the tensor is on a wgpu device (f32 or u32).
    pub(crate) fn wgpu(&self) -> Option<&bft_kernels::wgpu::GpuBuffer> {
        match &*self.storage {
            Storage::Wgpu(s) => Some(&s.buf),
            Storage::Cpu(_) | Storage::Cuda(_) => None,
        }
    }

    /// The device buffer, if the tensor is on a CUDA device.
    pub(crate) fn cuda(&self) -> Option<&bft_kernels::cuda::DeviceBuffer> {
        match &*self.storage {
            Storage::Cuda(s) => Some(&s.buf),
            Storage::Cpu(_) | Storage::Wgpu(_) => None,
        }
    }

    /// A tensor on CUDA device `index` holding `buf`.
    pub(crate) fn from_cuda(
        buf: bft_kernels::cuda::DeviceBuffer,
        dtype: DType,
        index: usize,
        shape: impl Into<Shape>,
    ) -> Tensor {
        Tensor::from_storage(
            Arc::new(Storage::Cuda(CudaStorage::new(buf, dtype, index))),
            shape.into(),
        )
    }

    /// A tensor on wgpu device `index` holding `buf`.
    pub(crate) fn from_wgpu(
        buf: bft_kernels::wgpu::GpuBuffer,
        dtype: DType,
        index: usize,
        shape: impl Into<Shape>,
    ) -> Tensor {
        use crate::storage::WgpuStorage;
        Tensor::from_storage(
            Arc::new(Storage::Wgpu(WgpuStorage::new(buf, dtype, index))),
            shape.into(),
        )
    }

    /// Copies the elements to a host vector. The dtype must be `T`'s (use `to_dtype` first).
    pub fn to_vec<T: Elem>(&self) -> Result<Vec<T>> {
        let host = self.to_device(&Device::Cpu)?;
        Ok(host.cpu::<T>("to_vec")?.to_vec())
    }

    /// Every element widened to f64, whatever the dtype: for tests, metrics and printing.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        self.to_device(&Device::Cpu)?
            .cast_untracked(DType::F64)?
            .to_vec::<f64>()
    }

    /// The flat index and value of the first NaN or infinite element, if any (integer tensors
    /// have none). Device tensors are read back first. Loaders use it to refuse weights that
    /// would poison every step.
    pub fn first_non_finite(&self) -> Result<Option<(usize, f64)>> {
        fn first<T: Copy>(
            v: &[T],
            finite: impl Fn(T) -> bool,
            wide: impl Fn(T) -> f64,
        ) -> Option<(usize, f64)> {
            v.iter().position(|&x| !finite(x)).map(|i| (i, wide(v[i])))
        }
        let host = self.to_device(&Device::Cpu)?;
        let op = "first_non_finite";
        Ok(match self.dtype() {
            DType::F32 => first(host.cpu::<f32>(op)?, f32::is_finite, f64::from),
            DType::F64 => first(host.cpu::<f64>(op)?, f64::is_finite, |x| x),
            DType::BF16 => first(host.cpu::<bf16>(op)?, |x| x.is_finite(), f64::from),
            DType::F16 => first(host.cpu::<f16>(op)?, |x| x.is_finite(), f64::from),
            DType::U32 => None,
        })
    }

    /// The value of a one-element tensor.
    pub fn to_scalar(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "to_scalar",
                format!("expected one element, got shape {}", self.shape),
            ));
        }
        Ok(self.to_f64_vec()?[0])
    }

    /// Moves the tensor to `device`; an explicit copy (a no-op on the same device).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device() == *device {
            return Ok(self.clone());
        }
        // Between two devices: through the host.
        let host = crate::backend::kernels(self.device()).download(self)?;
        crate::backend::kernels(*device).upload(&host, *device)
    }

    /// Converts element type without recording on a tape, on the tensor's own device: by the
    /// backend's cast kernel, or through the host for the conversions a device has none for
    /// (a dtype its device cannot store is an error).
    pub(crate) fn cast_untracked(&self, dtype: DType) -> Result<Tensor> {
        if self.dtype() == dtype {
            return Ok(self.stop_gradient());
        }
        if let Some(out) = crate::backend::kernels(self.device()).cast(self, dtype)? {
            return Ok(out);
        }
        self.to_device(&Device::Cpu)?
            .cast_untracked(dtype)?
            .to_device(&self.device())
    }

    /// `self += other` in place when this handle owns its storage alone (gradient accumulation
    /// into a leaf's buffer); otherwise a new buffer. Shapes and dtypes must match.
    pub(crate) fn accumulate(&mut self, other: &Tensor) -> Result<()> {
        if self.shape != other.shape || self.dtype() != other.dtype() {
            return Err(Error::Backward(format!(
                "gradient of shape {} {:?} cannot accumulate into {} {:?}",
                other.shape,
                other.dtype(),
                self.shape,
                self.dtype()
            )));
        }
        if self.device() != other.device() {
            return Err(Error::DeviceMismatch {
                op: "gradient accumulation",
                lhs: self.device(),
                rhs: other.device(),
            });
        }
        crate::backend::kernels(self.device()).accumulate(self, other)
    }

    /// Replaces the storage, keeping id and tape: gradient accumulation on a device, which
    /// writes a new buffer rather than the old one.
    pub(crate) fn replace_storage(&mut self, storage: Storage) {
        self.storage = Arc::new(storage);
    }
}
