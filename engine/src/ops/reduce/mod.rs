//! Sum, mean and max over one axis (the axis is removed), the full sum, and argmax.

use super::{Op, axis, float_dispatch, via_f32, wbuf, wgpu_of};
use crate::tape::{Backward, Tape};
use crate::{Result, Shape, Tensor};
use bft_kernels::cpu::reduce::{ReduceKind, argmax_last, reduce, reduce_backward};

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
        let cols = self.shape().last();
        let dims = self.dims()[..self.rank().saturating_sub(1)].to_vec();
        let wide = if self.dtype().is_half() {
            self.cast_untracked(crate::DType::F32)?
        } else {
            self.stop_gradient()
        };
        let out = float_dispatch!("argmax", wide.dtype(), |T| {
            let mut o = vec![0u32; self.numel() / cols.max(1)];
            argmax_last(wide.cpu::<T>("argmax")?, cols, &mut o);
            Ok(Tensor::from_cpu(o, dims))
        })?;
        Tape::record_nondifferentiable(Op::ArgMax, &[self], out)
    }

    fn reduce(&self, dim: isize, kind: ReduceKind) -> Result<Tensor> {
        if let Some(out) = via_f32(&[self], |t| t[0].reduce(dim, kind))? {
            return Ok(out);
        }
        let (op, name) = match kind {
            ReduceKind::Sum => (Op::Sum, "sum"),
            ReduceKind::Max => (Op::Max, "max"),
        };
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
            if kind != ReduceKind::Sum || (sizes.0 > 1 && sizes.2 > 1) {
                return Err(crate::Error::Unsupported {
                    op: "max, or a sum over a middle axis,",
                    device: self.device(),
                });
            }
            let x = wbuf(name, self)?;
            let o = ones_product(&g, x, sizes, false)?;
            let out = Tensor::from_wgpu(o, crate::DType::F32, i, dims);
            return Tape::record(op, &[self], out, || ReduceBackward {
                kind,
                shape: self.shape().clone(),
                sizes,
                argmax: Vec::new(),
            });
        }
        let mut argmax = vec![
            0u32;
            if kind == ReduceKind::Max {
                sizes.0 * sizes.2
            } else {
                0
            }
        ];
        let out = float_dispatch!(name, self.dtype(), |T| {
            let mut o = vec![T::default(); sizes.0 * sizes.2];
            reduce(kind, self.cpu::<T>(name)?, sizes, &mut o, &mut argmax);
            Ok(Tensor::from_cpu(o, dims))
        })?;
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
    argmax: Vec<u32>,
}

impl Backward for ReduceBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        if let Some((gpu, i)) = wgpu_of(g) {
            let dx = ones_product(&gpu, wbuf("sum", g)?, self.sizes, true)?;
            let dx = Tensor::from_wgpu(dx, crate::DType::F32, i, self.shape.clone());
            return Ok(vec![Some(dx)]);
        }
        let dx = float_dispatch!("reduce backward", g.dtype(), |T| {
            let mut dx = vec![T::default(); self.shape.numel()];
            reduce_backward(
                self.kind,
                g.cpu::<T>("reduce")?,
                &self.argmax,
                self.sizes,
                &mut dx,
            );
            Ok(Tensor::from_cpu(dx, self.shape.clone()))
        })?;
        Ok(vec![Some(dx)])
    }
}

/// A sum over the first or last axis on wgpu as a product with a vector of ones, for `x` of
/// `sizes = (outer, size, inner)` with `outer == 1` or `inner == 1`; `spread` is its backward,
/// the gradient copied along the summed axis.
fn ones_product(
    g: &std::sync::Arc<bft_kernels::wgpu::Gpu>,
    x: &bft_kernels::wgpu::GpuBuffer,
    (outer, size, inner): (usize, usize, usize),
    spread: bool,
) -> Result<bft_kernels::wgpu::GpuBuffer> {
    use bft_kernels::cpu::matmul::GemmDims;
    use bft_kernels::wgpu::ops::{DeviceOperand, matmul};
    let ones = g.upload(bytemuck::cast_slice(&vec![1f32; size]))?;
    let op = |data, trans| DeviceOperand {
        data,
        trans,
        batch_stride: 0,
    };
    let (rows, cols) = if inner == 1 { (outer, 1) } else { (1, inner) };
    let out = match (inner == 1, spread) {
        // (outer, size) . (size, 1) and (outer, 1) . (1, size)
        (true, false) => matmul(
            g,
            GemmDims {
                batch: 1,
                m: rows,
                n: 1,
                k: size,
            },
            op(x, false),
            op(&ones, false),
            None,
        )?,
        (true, true) => matmul(
            g,
            GemmDims {
                batch: 1,
                m: rows,
                n: size,
                k: 1,
            },
            op(x, false),
            op(&ones, false),
            None,
        )?,
        // (1, size) . (size, inner) and (size, 1) . (1, inner)
        (false, false) => matmul(
            g,
            GemmDims {
                batch: 1,
                m: 1,
                n: cols,
                k: size,
            },
            op(&ones, false),
            op(x, false),
            None,
        )?,
        (false, true) => matmul(
            g,
            GemmDims {
                batch: 1,
                m: size,
                n: cols,
                k: 1,
            },
            op(&ones, false),
            op(x, false),
            None,
        )?,
    };
    Ok(out)
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
