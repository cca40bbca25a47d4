//! Sum, mean and max over one axis (the axis is removed), the full sum, and argmax.

use super::{Op, axis, float_dispatch, via_f32, wbuf, wgpu_of};
use crate::tape::{Backward, Tape};
use crate::{Result, Shape, Tensor};
use bft_kernels::cpu::reduce::{ReduceKind, argmax_last, reduce, reduce_backward};
use bft_kernels::wgpu::ops::{reduce_backward as reduce_backward_wgpu, reduce_max, reduce_sum};

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
        let wide = if self.dtype().is_half() {
            self.cast_untracked(crate::DType::F32)?
        } else {
            self.stop_gradient()
        };
        if let Some((g, i)) = wgpu_of(&wide) {
            if cols == 0 {
                return Err(crate::Error::shape(
                    "argmax",
                    format!("argmax over an empty last axis of {}", self.shape()),
                ));
            }
            let rows = self.numel() / cols;
            let (_, idx) = reduce_max(&g, wbuf("argmax", &wide)?, (rows, cols, 1))?;
            let out = Tensor::from_wgpu(idx, crate::DType::U32, i, dims);
            return Tape::record_nondifferentiable(Op::ArgMax, &[self], out);
        }
        let out = float_dispatch!("argmax", wide.dtype(), |T| {
            let mut o = vec![0u32; self.numel() / cols.max(1)];
            argmax_last(wide.cpu::<T>("argmax")?, cols, &mut o);
            Ok(Tensor::from_cpu(o, dims))
        })?;
        Tape::record_nondifferentiable(Op::ArgMax, &[self], out)
    }

    fn reduce(&self, dim: isize, kind: ReduceKind) -> Result<Tensor> {
        let (op, name) = match kind {
            ReduceKind::Sum => (Op::Sum, "sum"),
            ReduceKind::Max => (Op::Max, "max"),
        };
        let _profiled = crate::profile::scope(op, crate::profile::Phase::Forward);
        if let Some(out) = via_f32(&[self], |t| t[0].reduce(dim, kind))? {
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
        if let Some((g, i)) = wgpu_of(self) {
            let x = wbuf(name, self)?;
            let (o, argmax) = match kind {
                ReduceKind::Sum => (reduce_sum(&g, x, sizes)?, None),
                ReduceKind::Max => {
                    let (o, idx) = reduce_max(&g, x, sizes)?;
                    let n = sizes.0 * sizes.2;
                    (o, Some(Tensor::from_wgpu(idx, crate::DType::U32, i, [n])))
                }
            };
            let out = Tensor::from_wgpu(o, crate::DType::F32, i, dims);
            return Tape::record(op, &[self], out, || ReduceBackward {
                kind,
                shape: self.shape().clone(),
                sizes,
                argmax,
            });
        }
        let n = sizes.0 * sizes.2;
        let mut argmax = vec![0u32; if kind == ReduceKind::Max { n } else { 0 }];
        let out = float_dispatch!(name, self.dtype(), |T| {
            let mut o = vec![T::default(); n];
            reduce(kind, self.cpu::<T>(name)?, sizes, &mut o, &mut argmax);
            Ok(Tensor::from_cpu(o, dims))
        })?;
        let argmax = (kind == ReduceKind::Max).then(|| Tensor::from_cpu(argmax, [n]));
        Tape::record(op, &[self], out, || ReduceBackward {
            kind,
            shape: self.shape().clone(),
            sizes,
            argmax,
        })
    }
}

struct ReduceBackward {
    kind: ReduceKind,
    shape: Shape,
    sizes: (usize, usize, usize),
    /// U32, one per output, on the input's device; `None` for a sum.
    argmax: Option<Tensor>,
}

impl Backward for ReduceBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        if let Some((gpu, i)) = wgpu_of(g) {
            let idx = self.argmax.as_ref().and_then(Tensor::wgpu);
            let dx = reduce_backward_wgpu(&gpu, wbuf("reduce", g)?, idx, self.sizes)?;
            let dx = Tensor::from_wgpu(dx, crate::DType::F32, i, self.shape.clone());
            return Ok(vec![Some(dx)]);
        }
        let no_index: &[u32] = &[];
        let argmax = match &self.argmax {
            Some(t) => t.cpu::<u32>("reduce")?,
            None => no_index,
        };
        let dx = float_dispatch!("reduce backward", g.dtype(), |T| {
            let mut dx = vec![T::default(); self.shape.numel()];
            reduce_backward(
                self.kind,
                g.cpu::<T>("reduce")?,
                argmax,
                self.sizes,
                &mut dx,
            );
            Ok(Tensor::from_cpu(dx, self.shape.clone()))
        })?;
        Ok(vec![Some(dx)])
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
