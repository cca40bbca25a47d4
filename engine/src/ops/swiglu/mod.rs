//! SwiGLU, `silu(gate) * up`, fused: the MLP saves two activations instead of four.

use super::{Op, float_dispatch, same_kind, via_f32, wbuf, wgpu_of};
use crate::DType;
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Tensor};
use bft_kernels::cpu::unary::{swiglu, swiglu_backward};

impl Tensor {
    /// `silu(self) * up`, elementwise; shapes must be equal.
    pub fn swiglu(&self, up: &Tensor) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::SwiGlu, crate::profile::Phase::Forward);
        if let Some(out) = via_f32(&[self, up], |t| t[0].swiglu(&t[1]))? {
            return Ok(out);
        }
        same_kind("swiglu", self, up)?;
        if self.shape() != up.shape() {
            return Err(Error::shape(
                "swiglu",
                format!("gate {} and up {} differ", self.shape(), up.shape()),
            ));
        }
        let out = if let Some((g, i)) = wgpu_of(self) {
            let (gb, ub) = (wbuf("swiglu", self)?, wbuf("swiglu", up)?);
            let y = bft_kernels::wgpu::ops::swiglu(&g, gb, ub, self.numel())?;
            Tensor::from_wgpu(y, DType::F32, i, self.shape().clone())
        } else {
            float_dispatch!("swiglu", self.dtype(), |T| {
                let mut o = vec![T::default(); self.numel()];
                swiglu(self.cpu::<T>("swiglu")?, up.cpu::<T>("swiglu")?, &mut o);
                Ok(Tensor::from_cpu(o, self.shape().clone()))
            })?
        };
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
        if let Some((gpu, i)) = wgpu_of(g) {
            let (gb, ub, dy) = (
                wbuf("swiglu", &self.gate)?,
                wbuf("swiglu", &self.up)?,
                wbuf("swiglu", g)?,
            );
            let (dg, du) = bft_kernels::wgpu::ops::swiglu_backward(&gpu, gb, ub, dy, g.numel())?;
            return Ok(vec![
                Some(Tensor::from_wgpu(dg, DType::F32, i, g.shape().clone())),
                Some(Tensor::from_wgpu(du, DType::F32, i, g.shape().clone())),
            ]);
        }
        float_dispatch!("swiglu backward", g.dtype(), |T| {
            let (mut dg, mut du) = (vec![T::default(); g.numel()], vec![T::default(); g.numel()]);
            swiglu_backward(
                self.gate.cpu::<T>("swiglu")?,
                self.up.cpu::<T>("swiglu")?,
                g.cpu::<T>("swiglu")?,
                &mut dg,
                &mut du,
            );
            Ok(vec![
                Some(Tensor::from_cpu(dg, g.shape().clone())),
                Some(Tensor::from_cpu(du, g.shape().clone())),
            ])
        })
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
