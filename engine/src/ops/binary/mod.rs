//! Elementwise add/sub/mul/div with `rhs` broadcast over the leading axes of `self`, and scale.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, in_compute_dtype, same_kind};
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Tensor};
use bft_kernels::cpu::binary::BinaryKind;

/// The binary kernels of a backend, on tensors of its compute type.
pub(crate) trait BinaryKernel {
    /// `a op b` with `b`'s elements repeated over `a`'s leading axes (shapes checked).
    fn binary(&self, kind: BinaryKind, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// `alpha * x`.
    fn scale(&self, x: &Tensor, alpha: f64) -> Result<Tensor>;
    /// `x` summed over its leading axes down to `shape`, a trailing part of its own.
    fn sum_to(&self, x: &Tensor, shape: &crate::Shape) -> Result<Tensor>;
}

impl Tensor {
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryKind::Add)
    }
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryKind::Sub)
    }
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryKind::Mul)
    }
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryKind::Div)
    }

    /// `rhs`'s shape must equal a trailing part of `self`'s: `(B, T, C) + (C)` adds a bias to
    /// every row; equal shapes are plain elementwise. The result has `self`'s shape.
    fn binary(&self, rhs: &Tensor, kind: BinaryKind) -> Result<Tensor> {
        let op = match kind {
            BinaryKind::Add => Op::Add,
            BinaryKind::Sub => Op::Sub,
            BinaryKind::Mul => Op::Mul,
            BinaryKind::Div => Op::Div,
        };
        let _profiled = crate::profile::scope(op, crate::profile::Phase::Forward);
        if let Some(out) = in_compute_dtype(&[self, rhs], |t| t[0].binary(&t[1], kind))? {
            return Ok(out);
        }
        let name = op_name(op);
        same_kind(name, self, rhs)?;
        let (ad, bd) = (self.dims(), rhs.dims());
        if bd.len() > ad.len()
            || ad[ad.len() - bd.len()..] != *bd
            || (rhs.numel() == 0 && self.numel() > 0)
        {
            return Err(Error::shape(
                name,
                format!("cannot broadcast {bd:?} over {ad:?} (rhs must match trailing axes)"),
            ));
        }
        let out = kernels(self.device()).binary(kind, self, rhs)?;
        let saved_out = matches!(kind, BinaryKind::Div).then(|| out.stop_gradient());
        Tape::record(op, &[self, rhs], out, || BinaryBackward {
            kind,
            a: self.stop_gradient(),
            b: rhs.stop_gradient(),
            out: saved_out,
        })
    }

    /// `alpha * self`.
    pub fn scale(&self, alpha: f64) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Scale, crate::profile::Phase::Forward);
        if let Some(out) = in_compute_dtype(&[self], |t| t[0].scale(alpha))? {
            return Ok(out);
        }
        let out = kernels(self.device()).scale(self, alpha)?;
        Tape::record(Op::Scale, &[self], out, || ScaleBackward(alpha))
    }

    /// Sums `self` over its leading axes down to `shape` (a trailing part of its own): the
    /// gradient of a broadcast operand.
    pub(crate) fn sum_to(&self, shape: &crate::Shape) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        kernels(self.device()).sum_to(self, shape)
    }
}

/// Records `out = a + b` for operands of one shape whose sum a fused kernel computed (the
/// residual stream of `add_rms_norm`): the tape holds the Add it stands for.
pub(crate) fn record_add(a: &Tensor, b: &Tensor, out: Tensor) -> Result<Tensor> {
    Tape::record(Op::Add, &[a, b], out, || BinaryBackward {
        kind: BinaryKind::Add,
        a: a.stop_gradient(),
        b: b.stop_gradient(),
        out: None,
    })
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Add => "add",
        Op::Sub => "sub",
        Op::Mul => "mul",
        _ => "div",
    }
}

struct BinaryBackward {
    kind: BinaryKind,
    a: Tensor,
    b: Tensor,
    /// `a / b`, saved by division only.
    out: Option<Tensor>,
}

impl Backward for BinaryBackward {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (a, b) = (&self.a, &self.b);
        let bs = b.shape();
        let (da, db) = match self.kind {
            BinaryKind::Add => (Some(g.clone()), needs[1].then(|| g.sum_to(bs)).transpose()?),
            BinaryKind::Sub => (
                Some(g.clone()),
                needs[1].then(|| g.sum_to(bs)?.scale(-1.0)).transpose()?,
            ),
            BinaryKind::Mul => (
                needs[0].then(|| g.mul(b)).transpose()?,
                needs[1].then(|| g.mul(a)?.sum_to(bs)).transpose()?,
            ),
            BinaryKind::Div => {
                // d(a/b)/db = -(a/b)/b
                // cannot fail: the forward saves its output exactly when the kind is Div.
                let out = self.out.as_ref().expect("division saves its output");
                (
                    needs[0].then(|| g.div(b)).transpose()?,
                    needs[1]
                        .then(|| g.mul(out)?.div(b)?.sum_to(bs)?.scale(-1.0))
                        .transpose()?,
                )
            }
        };
        Ok(vec![da.filter(|_| needs[0]), db.filter(|_| needs[1])])
    }
}

struct ScaleBackward(f64);

impl Backward for ScaleBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.scale(self.0)?)])
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::{Op, Tensor};
    use proptest::prelude::*;

    fn binary_case(
        name: &'static str,
        covers: &'static [Op],
        f: fn(&Tensor, &Tensor) -> crate::Result<Tensor>,
    ) -> Case {
        let strategy = (size(), size(), size(), any::<bool>())
            .prop_flat_map(move |(x, y, z, bcast)| {
                let bd = if bcast { vec![z] } else { vec![x, y, z] };
                let b = if name == "div" {
                    positive(bd)
                } else {
                    tensor(bd)
                };
                (tensor(vec![x, y, z]), b)
                    .prop_map(move |(a, b)| instance(vec![a, b], move |t| f(&t[0], &t[1])))
            })
            .boxed();
        Case::new(name, covers, strategy)
    }

    pub(crate) fn cases() -> Vec<Case> {
        let scale = (size(), size())
            .prop_flat_map(|(x, y)| {
                tensor(vec![x, y]).prop_map(|a| instance(vec![a], |t| t[0].scale(-1.7)))
            })
            .boxed();
        vec![
            binary_case("add", &[Op::Add], Tensor::add),
            binary_case("sub", &[Op::Sub], Tensor::sub),
            binary_case("mul", &[Op::Mul], Tensor::mul),
            binary_case("div", &[Op::Div], Tensor::div),
            Case::new("scale", &[Op::Scale], scale),
        ]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }

    #[test]
    fn bias_broadcasts_over_rows() {
        let dev = crate::Device::Cpu;
        let x = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2], &dev).unwrap();
        let b = Tensor::from_vec(vec![10.0f32, 20.0], [2], &dev).unwrap();
        assert_eq!(
            x.add(&b).unwrap().to_vec::<f32>().unwrap(),
            vec![11.0, 22.0, 13.0, 24.0]
        );
        let bad = Tensor::from_vec(vec![1.0f32, 2.0], [2, 1], &dev).unwrap();
        assert!(
            x.add(&bad)
                .unwrap_err()
                .to_string()
                .contains("cannot broadcast")
        );
    }
}
