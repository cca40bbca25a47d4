//! CPU kernels: rayon for parallel loops, the `gemm` crate for matrix products, hand-written
//! cache-friendly loops for the rest. Every kernel is generic over [`Float`] so the same code
//! runs in f32 (training) and f64 (finite-difference gradient checks).

pub mod attention;
pub mod bf16_gemm;
pub mod binary;
pub mod cast;
pub mod embedding;
pub mod layernorm;
pub mod layout;
pub mod lm_head;
pub mod matmul;
pub mod nll;
pub mod optim;
pub mod peak;
pub mod reduce;
pub mod rmsnorm;
pub mod rope;
pub mod softmax;
pub mod unary;

mod float;
pub use float::{Float, dot};

/// Rows per rayon task for row-wise kernels: large enough to amortise scheduling, small enough
/// to balance 2..64 cores on the row counts of real models.
pub(crate) fn rows_per_task(rows: usize, cols: usize) -> usize {
    // Aim for roughly 32 KiB of f32 input per task.
    (8192 / cols.max(1)).clamp(1, rows.max(1))
}
