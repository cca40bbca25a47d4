//! The CUDA runtime: one context and one stream per device (all work is ordered, so cudarc's
//! event tracking is switched off before the first allocation), kernels compiled by NVRTC for
//! the device's architecture at first use and cached, a caching allocator so no op calls
//! cudaMalloc, and cuBLAS for the GEMMs.

use super::{CudaError, CudaSource, Result, compile};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

fn driver(e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver(e.to_string())
}

/// Whether the CUDA driver library can be loaded (a machine without a GPU has none).
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names; nothing is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The CUDA devices on this machine (name and architecture), or why there are none.
pub fn devices() -> std::result::Result<Vec<String>, String> {
    if !driver_available() {
        return Err("no NVIDIA driver (libcuda) found".into());
    }
    let n = CudaContext::device_count().map_err(|e| e.to_string())?;
    Ok((0..n.max(0) as usize)
        .map(|i| match cuda(i) {
            Ok(d) => d.describe(),
            Err(e) => format!("unusable: {e}"),
        })
        .collect())
}

/// One CUDA device, opened once per process by [`cuda`].
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    name: String,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    /// Free buffers by power-of-two size class.
    pool: Mutex<HashMap<usize, Vec<CudaSlice<u8>>>>,
    blas: OnceLock<std::result::Result<cudarc::cublas::CudaBlas, String>>,
}

/// A pooled device buffer of `len` bytes; it returns to its pool when dropped.
pub struct DeviceBuffer {
    slice: Option<CudaSlice<u8>>,
    len: usize,
    dev: Arc<Cuda>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({} bytes on {})", self.len, self.dev.name)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            let mut pool = self.dev.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.entry(s.len()).or_default().push(s);
        }
    }
}

impl DeviceBuffer {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn device(&self) -> &Arc<Cuda> {
        &self.dev
    }

    /// The device address, for kernel arguments.
    pub fn ptr(&self) -> u64 {
        match &self.slice {
            Some(s) => s.device_ptr(&self.dev.stream).0,
            None => 0,
        }
    }
}

/// A kernel argument: device addresses travel as u64 (the kernels' pointers).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Pointer argument of a buffer, or null.
pub fn ptr(b: Option<&DeviceBuffer>) -> Arg {
    Arg::Ptr(b.map_or(0, DeviceBuffer::ptr))
}

/// The device `ordinal`, opened once per process.
pub fn cuda(ordinal: usize) -> Result<Arc<Cuda>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Cuda>>>> = OnceLock::new();
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(d) = devices.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Cuda::open(ordinal)?;
    devices.insert(ordinal, d.clone());
    Ok(d)
}

/// Buffers are pooled by power-of-two size class (at least 256 bytes).
fn size_class(bytes: usize) -> usize {
    bytes.max(256).next_power_of_two()
}

impl Cuda {
    fn open(ordinal: usize) -> Result<Arc<Cuda>> {
        if !driver_available() {
            return Err(CudaError::NoLibrary("libcuda (the NVIDIA driver)"));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        // SAFETY: before any allocation or launch on this context. All work goes to one
        // stream in order, so the per-buffer events cudarc would record are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = ctx.compute_capability().map_err(driver)?;
        let name = ctx.name().map_err(driver)?;
        Ok(Arc::new(Cuda {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            name,
            functions: Mutex::default(),
            pool: Mutex::default(),
            blas: OnceLock::new(),
        }))
    }

    /// Device name, compute capability and memory.
    pub fn describe(&self) -> String {
        match self.memory() {
            Ok((_, total)) => format!(
                "{} ({}, {:.1} GiB)",
                self.name,
                self.arch,
                total as f64 / (1u64 << 30) as f64
            ),
            Err(_) => format!("{} ({})", self.name, self.arch),
        }
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(driver)
    }

    /// Bytes held in the pool, free for reuse.
    pub fn pooled_bytes(&self) -> usize {
        let pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.iter().map(|(size, v)| size * v.len()).sum()
    }

    /// An uninitialised buffer of `bytes`, from the pool when one of its class is free.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        let class = size_class(bytes);
        let reused = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.get_mut(&class).and_then(Vec::pop)
        };
        let slice = match reused {
            Some(s) => s,
            None => self.fresh(bytes, class)?,
        };
        Ok(DeviceBuffer {
            slice: Some(slice),
            len: bytes,
            dev: self.clone(),
        })
    }

    /// A new device allocation of `class` bytes for a buffer of `bytes`. When the device is
    /// full, the pool's free buffers go back to the driver and the allocation is tried once
    /// more; failing again it is `OutOfMemory`, with what was asked and what the device has.
    fn fresh(&self, bytes: usize, class: usize) -> Result<CudaSlice<u8>> {
        use cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY;
        // SAFETY: the buffer is uninitialised device memory; every user writes before reading
        // (kernels fill their outputs, uploads copy in).
        let first = unsafe { self.stream.alloc::<u8>(class) };
        match first {
            Ok(s) => return Ok(s),
            Err(e) if e.0 != CUDA_ERROR_OUT_OF_MEMORY => return Err(driver(e)),
            Err(_) => {}
        }
        let released = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            let bytes = pool.iter().map(|(size, v)| size * v.len()).sum();
            pool.clear();
            bytes
        };
        // SAFETY: as above.
        match unsafe { self.stream.alloc::<u8>(class) } {
            Ok(s) => Ok(s),
            Err(e) if e.0 == CUDA_ERROR_OUT_OF_MEMORY => {
                let (free, total) = self.memory().unwrap_or((0, 0));
                Err(CudaError::OutOfMemory {
                    device: self.describe(),
                    bytes,
                    free,
                    total,
                    released,
                })
            }
            Err(e) => Err(driver(e)),
        }
    }

    /// A zero-filled buffer of `bytes`.
    pub fn zeros(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        let mut b = self.alloc(bytes)?;
        if let Some(s) = b.slice.as_mut() {
            self.stream
                .memset_zeros(&mut s.slice_mut(..bytes.max(1)))
                .map_err(driver)?;
        }
        Ok(b)
    }

    /// A buffer holding `data` (copied in stream order).
    pub fn upload(self: &Arc<Self>, data: &[u8]) -> Result<DeviceBuffer> {
        let mut b = self.alloc(data.len())?;
        if let (Some(s), false) = (b.slice.as_mut(), data.is_empty()) {
            self.stream
                .memcpy_htod(data, &mut s.slice_mut(..data.len()))
                .map_err(driver)?;
        }
        Ok(b)
    }

    /// The buffer's bytes, after all work queued before.
    pub fn read(&self, b: &DeviceBuffer) -> Result<Vec<u8>> {
        match &b.slice {
            Some(s) if b.len > 0 => self.stream.clone_dtoh(&s.slice(..b.len)).map_err(driver),
            _ => Ok(Vec::new()),
        }
    }

    /// A copy of `src` in a new buffer.
    pub fn copy(self: &Arc<Self>, src: &DeviceBuffer) -> Result<DeviceBuffer> {
        let mut out = self.alloc(src.len)?;
        if let (Some(s), Some(d)) = (src.slice.as_ref(), out.slice.as_mut())
            && src.len > 0
        {
            self.stream
                .memcpy_dtod(&s.slice(..src.len), &mut d.slice_mut(..src.len))
                .map_err(driver)?;
        }
        Ok(out)
    }

    /// Waits for the stream (for timing and before host reads of device results).
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver)
    }

    /// Compiles (once) and returns an entry point of a kernel file.
    fn function(&self, src: &'static CudaSource, entry: &'static str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(&(src.name, entry)) {
            return Ok(f.clone());
        }
        let compiled = compile(src, &self.arch)?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin))
            .map_err(driver)?;
        for &e in src.entries {
            cache.insert((src.name, e), module.load_function(e).map_err(driver)?);
        }
        cache
            .get(&(src.name, entry))
            .cloned()
            .ok_or_else(|| CudaError::Driver(format!("{} has no entry point {entry}", src.name)))
    }

    /// Launches `entry` of `src` over `grid` blocks of `block` threads with `args`, which must
    /// match the kernel's parameters in order and type (each launcher in `ops` mirrors one).
    pub fn launch(
        &self,
        src: &'static CudaSource,
        entry: &'static str,
        grid: u32,
        block: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.launch_grid(src, entry, (grid, 1), block, args)
    }

    /// As `launch`, over a 2-D grid `(x, y)` (the flash kernels: row tiles by heads).
    pub fn launch_grid(
        &self,
        src: &'static CudaSource,
        entry: &'static str,
        (grid, grid_y): (u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<()> {
        if grid == 0 || grid_y == 0 {
            return Ok(());
        }
        if grid_y > 65_535 {
            return Err(CudaError::TooLarge(format!(
                "a grid of {grid_y} rows of blocks"
            )));
        }
        let f = self.function(src, entry)?;
        let mut builder = self.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(p) => builder.arg(p),
                Arg::I32(v) => builder.arg(v),
                Arg::I64(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid, grid_y, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature (the launchers in `ops` are
        // written against the .cu files), and every pointer is a live buffer of the sizes the
        // kernel indexes, or null where the kernel checks for null.
        unsafe { builder.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// The cuBLAS handle on this device's stream.
    pub fn blas(&self) -> Result<&cudarc::cublas::CudaBlas> {
        self.blas
            .get_or_init(|| {
                cudarc::cublas::CudaBlas::new(self.stream.clone()).map_err(|e| format!("{e:?}"))
            })
            .as_ref()
            .map_err(|e| CudaError::Driver(format!("cuBLAS: {e}")))
    }
}
