//! Elementwise exp, log, sigmoid, silu, negation and GELU.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, in_compute_dtype};
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{Result, Tensor};
use bft_kernels::cpu::unary::UnaryKind;

/// The elementwise kernels of a backend, on tensors of its compute type.
pub(crate) trait UnaryKernel {
    /// `f(x)`.
    fn unary(&self, kind: UnaryKind, x: &Tensor) -> Result<Tensor>;
    /// `dy * f'(x)`, given the forward's input `x` and output `y`.
    fn unary_backward(
        &self,
        kind: UnaryKind,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<Tensor>;
}

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
        let op = match kind {
            UnaryKind::Exp => Op::Exp,
            UnaryKind::Log => Op::Log,
            UnaryKind::Sigmoid => Op::Sigmoid,
            UnaryKind::Silu => Op::Silu,
            UnaryKind::Neg => Op::Neg,
            UnaryKind::Gelu => Op::Gelu,
        };
        let _profiled = crate::profile::scope(op, crate::profile::Phase::Forward);
        if let Some(out) = in_compute_dtype(&[self], |t| t[0].unary(kind))? {
            return Ok(out);
        }
        let out = kernels(self.device()).unary(kind, self)?;
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
        let dx = kernels(g.device()).unary_backward(self.kind, &self.x, &self.y, g)?;
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
