//! bft-engine: tensors, a runtime tape for reverse-mode autodiff, and op dispatch to the kernels
//! of the tensor's device.
//!
//! ```
//! use bft_engine::{Device, Tape, Tensor};
//! # fn main() -> bft_engine::Result<()> {
//! let w = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2], &Device::Cpu)?;
//! let x = Tensor::from_vec(vec![0.5f32, -1.0], [1, 2], &Device::Cpu)?;
//! let tape = Tape::new();
//! let w = tape.track(&w);                  // a trainable leaf; `x` stays a constant
//! let loss = x.matmul(&w)?.sum_all()?;     // (1, 2) . (2, 2) -> scalar
//! let grads = tape.backward(&loss)?;
//! assert_eq!(grads.get(&w).unwrap().to_vec::<f32>()?, vec![0.5, 0.5, -1.0, -1.0]);
//! assert!(grads.get(&x).is_none());        // constants get no gradient buffer
//! # Ok(()) }
//! ```

mod backend;
mod device;
mod dtype;
mod error;
pub mod gradcheck;
pub mod memory;
pub mod ops;
pub mod optim;
pub mod profile;
mod shape;
mod storage;
mod tape;
mod tensor;

/// The CPU and the GEMM kernels it runs, in words (for `bft info` and benchmark headers).
pub use bft_kernels::cpu::{cpu_model, kernels_picked as cpu_kernels};
pub use device::Device;
pub use dtype::{DType, Elem};
pub use error::{Error, Result};
pub use ops::Op;
pub use shape::Shape;
pub use storage::{CpuData, CudaStorage, Storage, WgpuStorage};
pub use tape::{Gradients, Tape};
pub use tensor::{Tensor, TensorId};
