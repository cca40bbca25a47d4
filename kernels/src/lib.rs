//! Kernels over raw buffers, shapes and strides, one module per backend.
//!
//! This crate knows nothing of tensors or tapes (DESIGN.md §1): every function takes slices and
//! sizes and writes its result into a caller-provided buffer. The engine owns dispatch.

pub mod cpu;
