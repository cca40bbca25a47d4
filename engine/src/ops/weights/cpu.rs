use super::WeighKernel;
use crate::backend::Cpu;

/// The log-probs are on the host already: the default is the CPU kernel.
impl WeighKernel for Cpu {}
