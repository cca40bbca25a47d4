//! The CUDA kernels: hand-written `.cu` files in `kernels/cuda/`, embedded in the binary and
//! compiled by NVRTC for the device's architecture at first use. cudarc loads the CUDA libraries
//! dynamically, so everything here builds, and the compile check runs, without a GPU: NVRTC
//! alone compiles for a real architecture (`sm_90`) and so runs ptxas, which reports register
//! and shared-memory overruns.

use std::ffi::CString;

pub mod ops;
mod runtime;
pub mod typed;

pub use runtime::{Arg, Cuda, DeviceBuffer, cuda, devices, driver_available, ptr};

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("{0} was not found (install the CUDA 13 libraries or put them on LD_LIBRARY_PATH)")]
    NoLibrary(&'static str),
    #[error("NVRTC failed on kernels/cuda/{file}.cu for {arch}:\n{log}")]
    Compile {
        file: &'static str,
        arch: String,
        log: String,
    },
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("CUDA: {0}")]
    Driver(String),
    #[error("CUDA: {0} is too large for a kernel launch")]
    TooLarge(String),
    #[error(
        "out of memory on {device} allocating {}: {} of {} free after releasing {} of cached \
         buffers",
        size(*bytes), size(*free), size(*total), size(*released)
    )]
    OutOfMemory {
        device: String,
        bytes: usize,
        free: usize,
        total: usize,
        released: usize,
    },
}

/// A byte count for a person: MiB below one GiB, GiB above.
fn size(bytes: usize) -> String {
    let mib = bytes as f64 / (1u64 << 20) as f64;
    if mib < 1024.0 {
        format!("{mib:.1} MiB")
    } else {
        format!("{:.2} GiB", mib / 1024.0)
    }
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// A kernel file with `common.cuh` in front of it, and its entry points.
pub struct CudaSource {
    pub name: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

macro_rules! cuda_source {
    ($name:ident, $file:literal, [$($entry:literal),+ $(,)?]) => {
        pub static $name: CudaSource = CudaSource {
            name: $file,
            source: concat!(
                include_str!("../../cuda/common.cuh"),
                include_str!(concat!("../../cuda/", $file, ".cu"))
            ),
            entries: &[$($entry),+],
        };
    };
}

cuda_source!(
    CAST,
    "cast",
    [
        "f32_to_bf16_kernel",
        "bf16_to_f32_kernel",
        "f32_to_f16_kernel",
        "f16_to_f32_kernel"
    ]
);
cuda_source!(
    EMBEDDING,
    "embedding",
    [
        "embedding_forward_b4",
        "embedding_forward_b2",
        "embedding_backward"
    ]
);
cuda_source!(
    RMSNORM,
    "rmsnorm",
    ["rmsnorm_forward", "rmsnorm_backward", "rmsnorm_dw"]
);
cuda_source!(ROPE, "rope", ["rope"]);
cuda_source!(SWIGLU, "swiglu", ["swiglu_forward", "swiglu_backward"]);
cuda_source!(
    ATTENTION,
    "attention",
    [
        "attention_forward",
        "attention_backward_dq",
        "attention_backward_dkv"
    ]
);
cuda_source!(
    FLASH,
    "flash",
    [
        "attention_delta",
        "flash_forward_d64",
        "flash_forward_d128",
        "flash_dq_d64",
        "flash_dq_d128",
        "flash_dkv_d64",
        "flash_dkv_d128",
    ]
);
cuda_source!(
    LOSS,
    "loss",
    [
        "head_lse",
        "head_grad",
        "head_target_term",
        "sample_weights",
        "token_coef",
        "sample_sums"
    ]
);
cuda_source!(OPTIM, "optim", ["adamw", "sum_squares"]);

cuda_source!(
    ELEMENTWISE,
    "elementwise",
    [
        "unary_f32",
        "unary_bf16",
        "unary_backward_f32",
        "unary_backward_bf16",
        "binary_f32",
        "binary_bf16",
        "scale_f32",
        "scale_bf16",
        "sum_rows_f32",
        "sum_rows_bf16",
        "scale_rows_f32",
        "scale_rows_bf16",
    ]
);
cuda_source!(
    SOFTMAX,
    "softmax",
    [
        "softmax_f32",
        "softmax_bf16",
        "softmax_backward_f32",
        "softmax_backward_bf16",
        "nll_f32",
        "nll_bf16",
    ]
);
cuda_source!(
    REDUCE,
    "reduce",
    [
        "reduce_sum_f32",
        "reduce_sum_bf16",
        "reduce_max_f32",
        "reduce_max_bf16",
        "reduce_backward_f32",
        "reduce_backward_bf16",
    ]
);
cuda_source!(
    LAYOUT,
    "layout",
    ["permute_b4", "permute_b2", "slab_b4", "slab_b2"]
);
cuda_source!(
    LAYERNORM,
    "layernorm",
    [
        "layernorm_f32",
        "layernorm_bf16",
        "layernorm_backward_f32",
        "layernorm_backward_bf16",
        "layernorm_dwb_f32",
        "layernorm_dwb_bf16",
    ]
);

/// Every kernel file, so the compile check covers them all.
pub static ALL: &[&CudaSource] = &[
    &CAST,
    &EMBEDDING,
    &RMSNORM,
    &ROPE,
    &SWIGLU,
    &ATTENTION,
    &FLASH,
    &LOSS,
    &OPTIM,
    &ELEMENTWISE,
    &SOFTMAX,
    &REDUCE,
    &LAYOUT,
    &LAYERNORM,
];

/// Whether NVRTC can be loaded (it needs no GPU).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names; nothing is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// A compiled kernel file: the device code for one architecture and the compiler's log.
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

/// Compiles `src` for a real architecture such as `sm_90` to a CUBIN (ptxas included).
pub fn compile(src: &CudaSource, arch: &str) -> Result<Compiled> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_available() {
        return Err(CudaError::NoLibrary("libnvrtc"));
    }
    let nv = |e: cudarc::nvrtc::result::NvrtcError| CudaError::Nvrtc(format!("{e:?}"));
    let code = CString::new(src.source).map_err(|e| CudaError::Nvrtc(e.to_string()))?;
    let name =
        CString::new(format!("{}.cu", src.name)).map_err(|e| CudaError::Nvrtc(e.to_string()))?;
    let prog = result::create_program(&code, Some(&name)).map_err(nv)?;
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        // Precise division and square root, no flush to zero: the kernels are compared with
        // the CPU's f32 results.
        "--prec-div=true".to_string(),
        "--prec-sqrt=true".to_string(),
        "--ftz=false".to_string(),
        // ptxas reports registers, shared memory and spills per function into the log.
        "--ptxas-options=-v".to_string(),
    ];
    // SAFETY: `prog` was created above and is destroyed once, below, on every path.
    let compiled = unsafe { result::compile_program(prog, &options) };
    // SAFETY: as above; the log exists whether or not compilation succeeded.
    let log = unsafe { result::get_program_log(prog) }
        .map(|raw| {
            let bytes: Vec<u8> = raw
                .iter()
                .map(|&c| c as u8)
                .take_while(|&c| c != 0)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    let cubin = compiled.map_err(|_| CudaError::Compile {
        file: src.name,
        arch: arch.to_string(),
        log: log.clone(),
    });
    let cubin = cubin.and_then(|()| {
        let mut size = 0usize;
        // SAFETY: `prog` compiled successfully, so its CUBIN exists; the buffer has its size.
        unsafe {
            sys::nvrtcGetCUBINSize(prog, &mut size)
                .result()
                .map_err(nv)?;
            let mut out = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog, out.as_mut_ptr().cast())
                .result()
                .map_err(nv)?;
            Ok(out)
        }
    });
    // SAFETY: `prog` is live and not used after this.
    unsafe { result::destroy_program(prog) }.map_err(nv)?;
    Ok(Compiled { cubin: cubin?, log })
}
