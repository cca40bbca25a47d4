use super::WeighKernel;
use crate::backend::Wgpu;

/// No WGSL kernel: the host weighs (one read of the log-probs, uploads of the results).
impl WeighKernel for Wgpu {}
