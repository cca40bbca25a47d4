//! `bft info`: the compute backends, devices, CPU threads and differentiable ops of this build.

use anyhow::Result;
use bft_engine::{Device, Op};
use std::io::Write;

pub fn run() -> Result<()> {
    let list = |items: Vec<String>, prefix: &str| {
        if items.is_empty() {
            "none found".to_string()
        } else {
            let named: Vec<String> = items
                .iter()
                .enumerate()
                .map(|(i, a)| format!("{prefix}:{i} {a}"))
                .collect();
            named.join(", ")
        }
    };
    let cuda = Device::cuda_devices().map_or_else(|e| e, |d| list(d, "cuda"));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ops: Vec<String> = Op::ALL.iter().map(|op| format!("{op:?}")).collect();
    let text = format!(
        "bft {}\n\
         backends: cpu, wgpu, cuda\n\
         wgpu adapters: {}\n\
         wgpu: every op (WGSL kernels) and AdamW; f32 and u32 tensors, and f16/bf16 stored two \
         to a word, computing through f32\n\
         cuda devices: {cuda}\n\
         cuda: every op (NVRTC kernels, cuBLAS products), bf16 with f32 statistics; not yet \
         run on a GPU\n\
         cpu: {}\n\
         cpu kernels: {}\n\
         cpu threads: {threads}\n\
         ops: {}\n",
        env!("CARGO_PKG_VERSION"),
        list(Device::wgpu_adapters(), "wgpu"),
        bft_engine::cpu_model(),
        bft_engine::cpu_kernels(),
        ops.join(", ")
    );
    // A closed pipe (`bft info | head -1`) is not an error.
    match std::io::stdout().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
