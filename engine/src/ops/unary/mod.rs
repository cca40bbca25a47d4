//! Elementwise exp, log, sigmoid, silu, negation and GELU.

use super::{Op, float_dispatch, via_f32, wbuf, wgpu_of};
use crate::DType;
use crate::tape::{Backward, Tape};
use crate::{Result, Tensor};
use bft_kernels::cpu::unary::{UnaryKind, unary, unary_backward};

impl Tensor {
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(UnaryKind::Exp)
    }
    /// Natural logarithm.
    pub fn log(&self) -> Result<Tensor> {
        self.unary(UnaryKind::Log)
    }
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(UnaryKind::Sigmoid)
    }
    /// `x * sigmoid(x)`.
    pub fn silu(&self) -> Result<Tensor> {
        self.unary(UnaryKind::Silu)
    }
    pub fn neg(&self) -> Result<Tensor> {
        self.unary(UnaryKind::Neg)
    }
    /// The exact GELU, `x * Phi(x)` with the erf-based normal CDF (BERT's `gelu`, not the tanh
    /// approximation).
    pub fn gelu(&self) -> Result<Tensor> {
        self.unary(UnaryKind::Gelu)
    }

    fn unary(&self, kind: UnaryKind) -> Result<Tensor> {
        let (op, name) = match kind {
            UnaryKind::Exp => (Op::Exp, "exp"),
            UnaryKind::Log => (Op::Log, "log"),
            UnaryKind::Sigmoid => (Op::Sigmoid, "sigmoid"),
            UnaryKind::Silu => (Op::Silu, "silu"),
            UnaryKind::Neg => (Op::Neg, "neg"),
            UnaryKind::Gelu => (Op::Gelu, "gelu"),
        };
        let _profiled = crate::profile::scope(op, crate::profile::Phase::Forward);
        if let Some(out) = via_f32(&[self], |t| t[0].unary(kind))? {
            return Ok(out);
        }
        let out = if let Some((g, i)) = wgpu_of(self) {
            let y = bft_kernels::wgpu::ops::unary(&g, kind, wbuf(name, self)?, self.numel())?;
            Tensor::from_wgpu(y, DType::F32, i, self.shape().clone())
        } else {
            float_dispatch!(name, self.dtype(), |T| {
                let mut o = vec![T::default(); self.numel()];
                unary(kind, self.cpu::<T>(name)?, &mut o);
                Ok(Tensor::from_cpu(o, self.shape().clone()))
            })?
        };
        Tape::record(op, &[self], out.clone(), || UnaryBackward {
            kind,
            x: self.stop_gradient(),
            y: out.stop_gradient(),
        })
    }
}

struct UnaryBackward {
    kind: UnaryKind,
    x: Tensor,
    y: Tensor,
}

impl Backward for UnaryBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        if let Some((gpu, i)) = wgpu_of(g) {
            let (x, y, dy) = (
                wbuf("unary", &self.x)?,
                wbuf("unary", &self.y)?,
                wbuf("unary", g)?,
            );
            let dx = bft_kernels::wgpu::ops::unary_backward(
                &gpu,
                Some(self.kind),
                0.0,
                x,
                y,
                dy,
                g.numel(),
            )?;
            return Ok(vec![Some(Tensor::from_wgpu(
                dx,
                DType::F32,
                i,
                g.shape().clone(),
            ))]);
        }
        let dx = float_dispatch!("unary backward", g.dtype(), |T| {
            let mut dx = vec![T::default(); g.numel()];
            let (x, y, dy) = (
                self.x.cpu::<T>("unary")?,
                self.y.cpu::<T>("unary")?,
                g.cpu::<T>("unary")?,
            );
            unary_backward(self.kind, x, y, dy, &mut dx);
            Ok(Tensor::from_cpu(dx, g.shape().clone()))
        })?;
        Ok(vec![Some(dx)])
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::{Op, Tensor};
    use proptest::prelude::*;

    fn case(
        name: &'static str,
        covers: &'static [Op],
        f: fn(&Tensor) -> crate::Result<Tensor>,
    ) -> Case {
        let strategy = (size(), size())
            .prop_flat_map(move |(x, y)| {
                let s = if name == "log" {
                    positive(vec![x, y])
                } else {
                    tensor(vec![x, y])
                };
                s.prop_map(move |a| instance(vec![a], move |t| f(&t[0])))
            })
            .boxed();
        Case::new(name, covers, strategy)
    }

    pub(crate) fn cases() -> Vec<Case> {
        vec![
            case("exp", &[Op::Exp], Tensor::exp),
            case("log", &[Op::Log], Tensor::log),
            case("sigmoid", &[Op::Sigmoid], Tensor::sigmoid),
            case("silu", &[Op::Silu], Tensor::silu),
            case("neg", &[Op::Neg], Tensor::neg),
            case("gelu", &[Op::Gelu], Tensor::gelu),
        ]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }

    /// The exact GELU at points whose values are known to 16 digits (x * Phi(x)).
    #[test]
    fn gelu_is_the_erf_form() {
        let x = Tensor::from_vec(vec![1.0f64, -0.5, 3.0, 0.0], [4], &crate::Device::Cpu).unwrap();
        let y = x.gelu().unwrap().to_vec::<f64>().unwrap();
        let expect = [
            0.8413447460685429,
            -0.15426876936299344,
            2.99595030590511,
            0.0,
        ];
        for (a, e) in y.iter().zip(expect) {
            assert!((a - e).abs() < 1e-15, "{a} vs {e}");
        }
        let f = Tensor::from_vec(vec![1.0f32, -0.5], [2], &crate::Device::Cpu).unwrap();
        let y = f.gelu().unwrap().to_vec::<f32>().unwrap();
        assert!((y[0] - 0.841_344_7).abs() < 1e-7 && (y[1] + 0.154_268_77).abs() < 1e-7);
    }
}
