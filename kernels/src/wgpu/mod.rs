//! The wgpu backend's runtime: one `Gpu` per adapter with a pipeline cache, a buffer pool and
//! one command encoder that batches consecutive dispatches until a result is read back. The
//! kernels themselves are hand-written WGSL in `kernels/wgsl/`; `ops` holds their launchers.
//!
//! Every kernel takes its sizes in a small read-only storage buffer at binding 0 and its data
//! buffers at bindings 1.. in order; launchers size the grid from the data, never from a
//! device-specific subgroup width.

pub mod ops;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// What can go wrong on a wgpu device.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no wgpu adapter {index} ({found} found; WGPU_BACKEND={backend})")]
    NoAdapter {
        index: usize,
        found: usize,
        backend: String,
    },
    #[error("wgpu device request failed: {0}")]
    Device(String),
    #[error("wgpu error: {0}")]
    Validation(String),
    #[error("reading a wgpu buffer back failed: {0}")]
    Readback(String),
    #[error("a size of {0} elements does not fit a wgpu kernel's u32 parameters")]
    TooLarge(usize),
}

pub type Result<T> = std::result::Result<T, GpuError>;

/// A WGSL source file, its name (the pipeline cache's key with the entry point) and its entry
/// points.
pub struct Shader {
    pub name: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

/// Buffers are pooled by power-of-two size class (at least 256 bytes), so a training step that
/// allocates the same shapes every time reuses the same buffers.
fn size_class(bytes: u64) -> u64 {
    bytes.max(256).next_power_of_two()
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Dispatches recorded before the encoder is submitted anyway.
const MAX_PENDING: usize = 64;

/// Bytes of a dispatch's slot in the parameter arena: the largest storage-offset alignment
/// WebGPU allows, and room for 64 parameter words.
const PARAM_SLOT: u64 = 256;

/// One wgpu adapter opened as a device.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    shader_f16: bool,
    pipelines: Mutex<HashMap<(&'static str, &'static str), wgpu::ComputePipeline>>,
    pool: Mutex<HashMap<u64, Vec<wgpu::Buffer>>>,
    pending: Mutex<Pending>,
    /// The parameters of one batch of dispatches, a slot each, written once when the batch is
    /// submitted: no buffer is created per dispatch. The next batch's write is ordered after
    /// this batch's reads (one queue), so a single arena serves every batch.
    arena: wgpu::Buffer,
    /// The first uncaptured device error, reported at the next flush.
    error: Arc<Mutex<Option<String>>>,
}

struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    dispatches: usize,
    /// The arena's contents for the recorded dispatches (slot `k` at word `k * PARAM_SLOT / 4`).
    params: Vec<u32>,
}

/// A pooled device buffer of `len` bytes; it goes back to its pool when dropped.
pub struct GpuBuffer {
    buffer: Option<wgpu::Buffer>,
    len: u64,
    gpu: Arc<Gpu>,
}

impl std::fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuffer({} bytes on {})", self.len, self.gpu.info.name)
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            let mut pool = self.gpu.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.entry(b.size()).or_default().push(b);
        }
    }
}

impl GpuBuffer {
    /// Size in bytes of the data (the buffer itself may be larger).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn raw(&self) -> &wgpu::Buffer {
        // cannot fail: the buffer is taken only in `drop`, after which `self` is gone.
        self.buffer.as_ref().expect("a live buffer")
    }
}

/// The device of adapter `index` (in the order wgpu enumerates them), opened once per process.
pub fn gpu(index: usize) -> Result<Arc<Gpu>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    let devices = DEVICES.get_or_init(Default::default);
    let mut devices = devices.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(g) = devices.get(&index) {
        return Ok(g.clone());
    }
    let g = Gpu::open(index)?;
    devices.insert(index, g.clone());
    Ok(g)
}

/// The adapters wgpu finds (name and backend), for `bft info` and test reports.
pub fn adapters() -> Vec<String> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .iter()
        .map(|a| {
            let i = a.get_info();
            format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
        })
        .collect()
}

impl Gpu {
    /// Opens adapter `index` as a new device of its own (`gpu` shares one per process).
    pub fn open(index: usize) -> Result<Arc<Gpu>> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let mut found = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let n = found.len();
        if index >= n {
            return Err(GpuError::NoAdapter {
                index,
                found: n,
                backend: std::env::var("WGPU_BACKEND").unwrap_or_else(|_| "(unset)".into()),
            });
        }
        let adapter = found.swap_remove(index);
        let info = adapter.get_info();
        let shader_f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
        let mut required_features = wgpu::Features::empty();
        if shader_f16 {
            required_features |= wgpu::Features::SHADER_F16;
        }
        // The adapter's own limits: large storage bindings matter for LM heads.
        let required_limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("bft"),
            required_features,
            required_limits,
            ..Default::default()
        }))
        .map_err(|e| GpuError::Device(e.to_string()))?;
        let error = Arc::new(Mutex::new(None::<String>));
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| e.to_string());
        }));
        let arena = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bft params"),
            size: MAX_PENDING as u64 * PARAM_SLOT,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Arc::new(Gpu {
            device,
            queue,
            info,
            shader_f16,
            pipelines: Mutex::default(),
            pool: Mutex::default(),
            pending: Mutex::new(Pending {
                encoder: None,
                dispatches: 0,
                params: Vec::new(),
            }),
            arena,
            error,
        }))
    }

    /// Compiles every entry point of `shader` into the pipeline cache, reporting the first
    /// shader or pipeline error.
    pub fn prepare(&self, shader: &'static Shader) -> Result<()> {
        for &entry in shader.entries {
            self.pipeline(shader, entry);
        }
        self.check()
    }

    /// Adapter name, backend and type.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?})",
            self.info.name, self.info.backend, self.info.device_type
        )
    }

    /// Whether kernels may store f16 (`SHADER_F16`).
    pub fn has_f16(&self) -> bool {
        self.shader_f16
    }

    /// Bytes held in the pool, free for reuse.
    pub fn pooled_bytes(&self) -> u64 {
        let pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.iter().map(|(size, v)| size * v.len() as u64).sum()
    }

    /// An uninitialised buffer of `bytes`, from the pool when one of its size class is free.
    pub fn alloc(self: &Arc<Self>, bytes: u64) -> GpuBuffer {
        let class = size_class(bytes);
        let reused = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.get_mut(&class).and_then(Vec::pop)
        };
        let buffer = reused.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: class,
                usage: USAGE,
                mapped_at_creation: false,
            })
        });
        GpuBuffer {
            buffer: Some(buffer),
            len: bytes,
            gpu: self.clone(),
        }
    }

    /// A buffer holding `data`. The copy is recorded in the batched encoder, so it is ordered
    /// after every dispatch recorded before it (a pooled buffer may still be read by those).
    pub fn upload(self: &Arc<Self>, data: &[u8]) -> Result<GpuBuffer> {
        let out = self.alloc(data.len() as u64);
        if !data.is_empty() {
            let staging = self.staging(data)?;
            self.record(|enc| {
                enc.copy_buffer_to_buffer(&staging, 0, out.raw(), 0, padded(data.len()))
            })?;
        }
        Ok(out)
    }

    /// A new buffer with the contents of `src` (recorded in order like any dispatch).
    pub fn copy(self: &Arc<Self>, src: &GpuBuffer) -> Result<GpuBuffer> {
        let out = self.alloc(src.len);
        if src.len > 0 {
            self.record(|enc| {
                enc.copy_buffer_to_buffer(src.raw(), 0, out.raw(), 0, padded(src.len as usize))
            })?;
        }
        Ok(out)
    }

    /// A mapped-at-creation copy source holding `data` (padded to 4 bytes).
    fn staging(&self, data: &[u8]) -> Result<wgpu::Buffer> {
        self.filled(data, wgpu::BufferUsages::COPY_SRC)
    }

    /// A new buffer created mapped, holding `data`, then unmapped.
    fn filled(&self, data: &[u8], usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        let b = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: padded(data.len()),
            usage,
            mapped_at_creation: true,
        });
        {
            // The buffer is padded to 4 bytes; the copy must cover the whole view.
            let mut bytes = data.to_vec();
            bytes.resize(padded(data.len()) as usize, 0);
            b.slice(..)
                .get_mapped_range_mut()
                .map_err(|e| GpuError::Validation(e.to_string()))?
                .copy_from_slice(&bytes);
        }
        b.unmap();
        Ok(b)
    }

    /// The first `len` bytes of `src`, after every pending dispatch has run.
    pub fn read(self: &Arc<Self>, src: &GpuBuffer) -> Result<Vec<u8>> {
        let len = src.len;
        if len == 0 {
            return Ok(Vec::new());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: padded(len as usize),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.record(|enc| {
            enc.copy_buffer_to_buffer(src.raw(), 0, &staging, 0, padded(len as usize))
        })?;
        self.flush()?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            tx.send(r).ok();
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        rx.recv()
            .map_err(|e| GpuError::Readback(e.to_string()))?
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let out = view[..len as usize].to_vec();
        drop(view);
        staging.unmap();
        self.check()?;
        Ok(out)
    }

    /// Runs `entry` of `shader` over `groups` workgroups with `params` (u32 words; f32 values as
    /// their bits) at binding 0 and `buffers` at bindings 1...
    pub fn dispatch(
        self: &Arc<Self>,
        shader: &'static Shader,
        entry: &'static str,
        params: &[u32],
        buffers: &[&GpuBuffer],
        groups: [u32; 3],
    ) -> Result<()> {
        if groups.contains(&0) {
            return Ok(());
        }
        let pipeline = self.pipeline(shader, entry);
        let words = if params.is_empty() { &[0][..] } else { params };
        if words.len() as u64 * 4 > PARAM_SLOT {
            return Err(GpuError::Validation(format!(
                "{entry}: {} parameter words exceed a {PARAM_SLOT}-byte slot",
                words.len()
            )));
        }
        let layout = pipeline.get_bind_group_layout(0);
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.dispatches >= MAX_PENDING {
            self.submit(&mut p);
        }
        // This dispatch's slot: the batch's parameters so far, padded to whole slots.
        let slot = p.params.len().div_ceil(PARAM_SLOT as usize / 4) as u64;
        p.params.resize(slot as usize * PARAM_SLOT as usize / 4, 0);
        p.params.extend_from_slice(words);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.arena,
                offset: slot * PARAM_SLOT,
                size: std::num::NonZeroU64::new(words.len() as u64 * 4),
            }),
        }];
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.raw().as_entire_binding(),
            });
        }
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(entry),
            layout: &layout,
            entries: &entries,
        });
        let enc = p.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("bft") })
        });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(entry),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        p.dispatches += 1;
        let full = p.dispatches >= MAX_PENDING;
        drop(p);
        if full {
            self.flush()?;
        }
        Ok(())
    }

    /// Records into the batched encoder; true once it holds enough work to submit.
    fn record(&self, f: impl FnOnce(&mut wgpu::CommandEncoder)) -> Result<bool> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.dispatches >= MAX_PENDING {
            self.submit(&mut p);
        }
        let enc = p.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("bft") })
        });
        f(enc);
        p.dispatches += 1;
        Ok(p.dispatches >= MAX_PENDING)
    }

    /// Submits the batched work.
    pub fn flush(&self) -> Result<()> {
        {
            // Submitted under the lock: work must reach the queue in the order it was recorded,
            // or a pooled buffer reused by later work could be overwritten before earlier work
            // reads it.
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            self.submit(&mut p);
        }
        self.check()
    }

    /// Writes the batch's parameters into the arena and submits its encoder; the write lands
    /// at the start of this submission, after every earlier one.
    fn submit(&self, p: &mut Pending) {
        p.dispatches = 0;
        if !p.params.is_empty() {
            self.queue
                .write_buffer(&self.arena, 0, bytemuck::cast_slice(&p.params));
            p.params.clear();
        }
        if let Some(enc) = p.encoder.take() {
            self.queue.submit([enc.finish()]);
        }
    }

    /// Waits until the device is idle (for timing).
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        self.check()
    }

    fn check(&self) -> Result<()> {
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        match slot.take() {
            Some(e) => Err(GpuError::Validation(e)),
            None => Ok(()),
        }
    }

    fn pipeline(&self, shader: &'static Shader, entry: &'static str) -> wgpu::ComputePipeline {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry((shader.name, entry))
            .or_insert_with(|| {
                let module = self
                    .device
                    .create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(shader.name),
                        source: wgpu::ShaderSource::Wgsl(shader.source.into()),
                    });
                self.device
                    .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some(entry),
                        layout: None,
                        module: &module,
                        entry_point: Some(entry),
                        compilation_options: Default::default(),
                        cache: None,
                    })
            })
            .clone()
    }
}

/// Copy sizes must be multiples of 4 bytes.
fn padded(bytes: usize) -> u64 {
    (bytes.max(4) as u64).div_ceil(4) * 4
}

/// Workgroups of `size` invocations covering `n` items, spread over x and y when one dimension
/// would exceed the 65,535 limit (kernels recombine `gid.x + gid.y * nx`).
pub fn grid(n: usize, size: u32) -> [u32; 3] {
    let groups = (n as u64).div_ceil(size as u64).max(1);
    if groups <= 65_535 {
        [groups as u32, 1, 1]
    } else {
        [65_535, groups.div_ceil(65_535) as u32, 1]
    }
}
