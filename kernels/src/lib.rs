//! Kernels over raw buffers, shapes and strides, one module per backend.
//!
//! This crate knows nothing of tensors or tapes (DESIGN.md §1): every function takes slices and
//! sizes and writes its result into a caller-provided buffer. The engine owns dispatch.

// Kernels walk several buffers with one index (x[i], w[i], dy[i]); index loops say that more
// plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

pub mod cpu;
pub mod cuda;
pub mod wgpu;

/// The 16-bit float formats the device backends store (as their bits) and cast to and from f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    F16,
    BF16,
}
