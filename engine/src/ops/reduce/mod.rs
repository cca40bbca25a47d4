//! Sum, mean and max over one axis (the axis is removed), the full sum, and argmax.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, axis, in_compute_dtype};
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{Result, Shape, Tensor};
use bft_kernels::cpu::reduce::ReduceKind;

/// The reduction kernels of a backend over the middle axis of `x` viewed as
/// `sizes = (outer, n, inner)`, on tensors of its compute type.
pub(crate) trait ReduceKernel {
    /// `(out (outer * inner), argmax)`: the argmax (u32, on the device) only for `Max`.
    fn reduce(
        &self,
        kind: ReduceKind,
        x: &Tensor,
        sizes: (usize, usize, usize),
    ) -> Result<(Tensor, Option<Tensor>)>;
    /// The input gradient `(outer, n, inner)` of a sum, or of a max through its argmax.
    fn reduce_backward(&self, saved: &ReduceBackward, dy: &Tensor) -> Result<Tensor>;
}

impl Tensor {
    /// Sum over axis `dim`, which is removed from the shape.
    pub fn sum(&self, dim: isize) -> Result<Tensor> {
        self.reduce(dim, ReduceKind::Sum)
    }

    /// Maximum over axis `dim`; the gradient flows to the first maximal element.
    pub fn max(&self, dim: isize) -> Result<Tensor> {
        self.reduce(dim, ReduceKind::Max)
    }

    /// Mean over axis `dim`.
    pub fn mean(&self, dim: isize) -> Result<Tensor> {
        let d = axis("mean", dim, self.rank())?;
        let n = self.dims()[d];
        self.sum(dim)?.scale(1.0 / n.max(1) as f64)
    }

    /// Sum of every element, as a rank-0 tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        self.reshape([self.numel()])?.sum(0)
    }

    /// Index of the largest element of each row of the last axis, as U32. Not differentiable.
    pub fn argmax(&self) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::ArgMax, crate::profile::Phase::Forward);
        let cols = self.shape().last();
        let dims = self.dims()[..self.rank().saturating_sub(1)].to_vec();
        if cols == 0 && dims.iter().product::<usize>() > 0 {
            return Err(crate::Error::shape(
                "argmax",
                format!("argmax over an empty last axis of {}", self.shape()),
            ));
        }
        let k = kernels(self.device());
        let compute = k.compute_dtype(self.dtype());
        let x = if compute != self.dtype() {
            self.cast_untracked(compute)?
        } else {
            self.stop_gradient()
        };
        let rows = self.numel() / cols.max(1);
        let (_, idx) = k.reduce(ReduceKind::Max, &x, (rows, cols, 1))?;
        let idx = idx.ok_or_else(|| crate::Error::Backward("a max kept no argmax".into()))?;
        Tape::record_nondifferentiable(Op::ArgMax, &[self], idx.reshaped_view(dims.into()))
    }

    fn reduce(&self, dim: isize, kind: ReduceKind) -> Result<Tensor> {
        let (op, name) = match kind {
            ReduceKind::Sum => (Op::Sum, "sum"),
            ReduceKind::Max => (Op::Max, "max"),
        };
        let _profiled = crate::profile::scope(op, crate::profile::Phase::Forward);
        if let Some(out) = in_compute_dtype(&[self], |t| t[0].reduce(dim, kind))? {
            return Ok(out);
        }
        let d = axis(name, dim, self.rank())?;
        let sizes = self.shape().split_at_axis(d);
        if kind == ReduceKind::Max && sizes.1 == 0 {
            return Err(crate::Error::shape(
                name,
                format!("max over empty axis {d} of {}", self.shape()),
            ));
        }
        let mut dims = self.dims().to_vec();
        dims.remove(d);
        let (out, argmax) = kernels(self.device()).reduce(kind, self, sizes)?;
        let out = out.reshaped_view(dims.into());
        Tape::record(op, &[self], out, || ReduceBackward {
            kind,
            shape: self.shape().clone(),
            sizes,
            argmax,
        })
    }
}

/// What a reduction saves.
pub(crate) struct ReduceBackward {
    kind: ReduceKind,
    shape: Shape,
    sizes: (usize, usize, usize),
    /// U32, one per output, on the input's device; `None` for a sum.
    argmax: Option<Tensor>,
}

impl Backward for ReduceBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(kernels(g.device()).reduce_backward(self, g)?)])
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::{Device, Error, Op, Tape, Tensor};
    use proptest::prelude::*;

    pub(crate) fn cases() -> Vec<Case> {
        let over_axis = |f: fn(&Tensor, isize) -> crate::Result<Tensor>| {
            (size(), size(), size(), 0isize..3)
                .prop_flat_map(move |(a, b, c, d)| {
                    tensor(vec![a, b, c]).prop_map(move |t| instance(vec![t], move |x| f(&x[0], d)))
                })
                .boxed()
        };
        let sum_all = (size(), size())
            .prop_flat_map(|(a, b)| {
                tensor(vec![a, b]).prop_map(|t| instance(vec![t], |x| x[0].sum_all()))
            })
            .boxed();
        vec![
            Case::new("sum", &[Op::Sum], over_axis(Tensor::sum)),
            Case::new("mean", &[Op::Sum, Op::Scale], over_axis(Tensor::mean)),
            Case::new("max", &[Op::Max], over_axis(Tensor::max)),
            Case::new("sum_all", &[Op::Sum, Op::Reshape], sum_all),
        ]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }

    #[test]
    fn argmax_has_no_backward_and_refuses_a_tape() {
        let x =
            Tensor::from_vec(vec![0.1f32, 3.0, -1.0, 7.0, 7.0, 2.0], [2, 3], &Device::Cpu).unwrap();
        assert_eq!(x.argmax().unwrap().to_vec::<u32>().unwrap(), vec![1, 0]);
        let tape = Tape::new();
        let err = tape.track(&x).argmax().unwrap_err();
        assert!(matches!(err, Error::NoBackward(Op::ArgMax)), "{err}");
    }

    #[test]
    fn sum_and_max_values() {
        let x =
            Tensor::from_vec(vec![1.0f32, 5.0, 3.0, 4.0, 2.0, 6.0], [2, 3], &Device::Cpu).unwrap();
        assert_eq!(
            x.sum(0).unwrap().to_vec::<f32>().unwrap(),
            vec![5.0, 7.0, 9.0]
        );
        assert_eq!(x.max(-1).unwrap().to_vec::<f32>().unwrap(), vec![5.0, 6.0]);
        assert_eq!(x.mean(1).unwrap().to_vec::<f32>().unwrap(), vec![3.0, 4.0]);
        assert_eq!(x.sum_all().unwrap().to_scalar().unwrap(), 21.0);
    }
}
