//! Softmax and log-softmax over the last axis.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, in_compute_dtype};
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{Result, Tensor};

/// The softmax kernels of a backend over the last axis of a tensor of its compute type;
/// `log` selects log-softmax.
pub(crate) trait SoftmaxKernel {
    fn softmax(&self, x: &Tensor, log: bool) -> Result<Tensor>;
    /// The input gradient from the forward's output `y` and the upstream `dy`.
    fn softmax_backward(&self, y: &Tensor, dy: &Tensor, log: bool) -> Result<Tensor>;
}

impl Tensor {
    /// Softmax over the last axis.
    pub fn softmax(&self) -> Result<Tensor> {
        self.softmax_impl(false)
    }

    /// `x - logsumexp(x)` over the last axis (never `log` of a rounded softmax).
    pub fn log_softmax(&self) -> Result<Tensor> {
        self.softmax_impl(true)
    }

    fn softmax_impl(&self, log: bool) -> Result<Tensor> {
        let op = if log { Op::LogSoftmax } else { Op::Softmax };
        let _profiled = crate::profile::scope(op, crate::profile::Phase::Forward);
        if let Some(out) = in_compute_dtype(&[self], |t| t[0].softmax_impl(log))? {
            return Ok(out);
        }
        let out = kernels(self.device()).softmax(self, log)?;
        Tape::record(op, &[self], out.clone(), || SoftmaxBackward {
            y: out.stop_gradient(),
            log,
        })
    }
}

struct SoftmaxBackward {
    y: Tensor,
    log: bool,
}

impl Backward for SoftmaxBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(
            kernels(g.device()).softmax_backward(&self.y, g, self.log)?,
        )])
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::{Op, Tensor};
    use proptest::prelude::*;

    pub(crate) fn cases() -> Vec<Case> {
        let mk = |f: fn(&Tensor) -> crate::Result<Tensor>| {
            (size(), size())
                .prop_flat_map(move |(a, b)| {
                    tensor(vec![a, b]).prop_map(move |t| instance(vec![t], move |x| f(&x[0])))
                })
                .boxed()
        };
        vec![
            Case::new("softmax", &[Op::Softmax], mk(Tensor::softmax)),
            Case::new("log_softmax", &[Op::LogSoftmax], mk(Tensor::log_softmax)),
        ]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }
}
