//! The CPU backend: host vectors, rayon and the GEMM kernels of `bft_kernels::cpu`.

use super::Backend;
use crate::DType;

/// Host memory. f32 and f64 compute as they are; 16-bit tensors compute in f32, except the
/// products with a bf16 weight, which the AVX512-BF16 kernel multiplies as stored where the CPU
/// has it (`ops/matmul/cpu.rs`, `ops/lm_head/cpu.rs`).
pub(crate) struct Cpu;

impl Backend for Cpu {
    fn compute_dtype(&self, result: DType) -> DType {
        if result.is_half() { DType::F32 } else { result }
    }
}
