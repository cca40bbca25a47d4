//! SwiGLU, `silu(gate) * up`, fused: the MLP saves two activations instead of four.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, in_compute_dtype, same_kind};
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Tensor};

/// The SwiGLU kernels of a backend, on equal-shaped operands of its compute type.
pub(crate) trait SwiGluKernel {
    /// `silu(gate) * up`, elementwise.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;
    /// `(dgate, dup)` from the saved operands and the upstream gradient `dy`.
    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)>;
}

impl Tensor {
    /// `silu(self) * up`, elementwise; shapes must be equal.
    pub fn swiglu(&self, up: &Tensor) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::SwiGlu, crate::profile::Phase::Forward);
        if let Some(out) = in_compute_dtype(&[self, up], |t| t[0].swiglu(&t[1]))? {
            return Ok(out);
        }
        same_kind("swiglu", self, up)?;
        if self.shape() != up.shape() {
            return Err(Error::shape(
                "swiglu",
                format!("gate {} and up {} differ", self.shape(), up.shape()),
            ));
        }
        let out = kernels(self.device()).swiglu(self, up)?;
        Tape::record(Op::SwiGlu, &[self, up], out, || SwiGluBackward {
            gate: self.stop_gradient(),
            up: up.stop_gradient(),
        })
    }
}

struct SwiGluBackward {
    gate: Tensor,
    up: Tensor,
}

impl Backward for SwiGluBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (dg, du) = kernels(g.device()).swiglu_backward(&self.gate, &self.up, g)?;
        Ok(vec![Some(dg), Some(du)])
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::Op;
    use proptest::prelude::*;

    pub(crate) fn cases() -> Vec<Case> {
        let strategy = (size(), size())
            .prop_flat_map(|(a, b)| {
                (tensor(vec![a, b]), tensor(vec![a, b]))
                    .prop_map(|(g, u)| instance(vec![g, u], |t| t[0].swiglu(&t[1])))
            })
            .boxed();
        vec![Case::new("swiglu", &[Op::SwiGlu], strategy)]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }
}
