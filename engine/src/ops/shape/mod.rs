//! Reshape, permute/transpose, narrow/split and cat. Every result is contiguous: kernels then
//! never deal with strides, at the price of a copy for permute, narrow and cat.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, axis};
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{DType, Error, Result, Shape, Tensor};
pub(crate) use bft_kernels::wgpu::ops::Slab;

/// The data-movement kernels of a backend. A slab (the kernels' `Slab`, whichever backend) is
/// `outer` runs of `len x inner` elements, read at `src_at` of an axis of `src_dim` and written
/// at `dst_at` of one of `dst_dim`: narrow reads one, cat writes one per input.
pub(crate) trait LayoutKernel {
    /// Whether the backend moves tensors of `dtype` as stored; others move as f32 (both casts
    /// are exact for 16-bit types, so the result holds the same bits).
    fn moves(&self, dtype: DType) -> bool;
    /// `x` with its axes reordered into `dims`: output axis `i` is input axis `perm[i]`.
    fn permute(&self, x: &Tensor, perm: &[usize], dims: Vec<usize>) -> Result<Tensor>;
    /// A tensor of `shape` and the pieces' type and device holding each piece's slab, and
    /// zeros elsewhere when `zeroed` (otherwise the slabs cover it).
    fn slabs(&self, shape: Shape, pieces: &[(&Tensor, Slab)], zeroed: bool) -> Result<Tensor>;
}

/// Runs `f` on f32 copies when the inputs' backend does not move their type as stored.
fn moved_as_stored(
    inputs: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    if inputs.iter().all(|t| kernels(t.device()).moves(t.dtype())) {
        return Ok(None);
    }
    super::in_compute_dtype(inputs, f)
}

impl Tensor {
    /// Same elements under a new shape (no copy).
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Reshape, crate::profile::Phase::Forward);
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("cannot reshape {} into {shape}", self.shape()),
            ));
        }
        let out = self.reshaped_view(shape);
        Tape::record(Op::Reshape, &[self], out, || {
            ReshapeBackward(self.shape().clone())
        })
    }

    /// Reorders axes: output axis `i` is input axis `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Permute, crate::profile::Phase::Forward);
        let rank = self.rank();
        let mut seen = vec![false; rank];
        if perm.len() != rank
            || perm
                .iter()
                .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::shape(
                "permute",
                format!(
                    "{perm:?} is not a permutation of the axes of {}",
                    self.shape()
                ),
            ));
        }
        if let Some(out) = moved_as_stored(&[self], |t| t[0].permute(perm))? {
            return Ok(out);
        }
        let dims: Vec<usize> = perm.iter().map(|&p| self.dims()[p]).collect();
        let out = kernels(self.device()).permute(self, perm, dims)?;
        let mut inverse = vec![0; rank];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        Tape::record(Op::Permute, &[self], out, || PermuteBackward(inverse))
    }

    /// Swaps two axes.
    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Tensor> {
        let (a, b) = (
            axis("transpose", d0, self.rank())?,
            axis("transpose", d1, self.rank())?,
        );
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// Elements `start..start + len` along axis `dim`.
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Narrow, crate::profile::Phase::Forward);
        let d = axis("narrow", dim, self.rank())?;
        let size = self.dims()[d];
        if start + len > size {
            return Err(Error::shape(
                "narrow",
                format!(
                    "range {start}..{} exceeds axis {d} of {}",
                    start + len,
                    self.shape()
                ),
            ));
        }
        if let Some(out) = moved_as_stored(&[self], |t| t[0].narrow(dim, start, len))? {
            return Ok(out);
        }
        let (outer, _, inner) = self.shape().split_at_axis(d);
        let mut dims = self.dims().to_vec();
        dims[d] = len;
        let slab = Slab {
            outer,
            inner,
            len,
            src_dim: size,
            src_at: start,
            dst_dim: len,
            dst_at: 0,
        };
        let out = kernels(self.device()).slabs(dims.into(), &[(self, slab)], false)?;
        Tape::record(Op::Narrow, &[self], out, || NarrowBackward {
            shape: self.shape().clone(),
            dim: d,
            start,
        })
    }

    /// Splits axis `dim` into consecutive pieces of the given sizes (which must sum to it).
    pub fn split(&self, dim: isize, sizes: &[usize]) -> Result<Vec<Tensor>> {
        let d = axis("split", dim, self.rank())?;
        if sizes.iter().sum::<usize>() != self.dims()[d] {
            return Err(Error::shape(
                "split",
                format!("sizes {sizes:?} do not sum to axis {d} of {}", self.shape()),
            ));
        }
        let mut start = 0;
        sizes
            .iter()
            .map(|&n| {
                start += n;
                self.narrow(d as isize, start - n, n)
            })
            .collect()
    }

    /// Concatenates along axis `dim`; all other axes must agree.
    pub fn cat(tensors: &[Tensor], dim: isize) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Cat, crate::profile::Phase::Forward);
        let first = tensors
            .first()
            .ok_or_else(|| Error::shape("cat", "no tensors to concatenate"))?;
        let d = axis("cat", dim, first.rank())?;
        for t in tensors {
            super::same_kind("cat", first, t)?;
            let ok = t.rank() == first.rank()
                && t.dims()
                    .iter()
                    .zip(first.dims())
                    .enumerate()
                    .all(|(i, (a, b))| i == d || a == b);
            if !ok {
                return Err(Error::shape(
                    "cat",
                    format!(
                        "{} and {} differ outside axis {d}",
                        first.shape(),
                        t.shape()
                    ),
                ));
            }
        }
        let refs: Vec<&Tensor> = tensors.iter().collect();
        if let Some(out) = moved_as_stored(&refs, |t| Tensor::cat(t, dim))? {
            return Ok(out);
        }
        let total: usize = tensors.iter().map(|t| t.dims()[d]).sum();
        let mut dims = first.dims().to_vec();
        dims[d] = total;
        let (outer, _, inner) = first.shape().split_at_axis(d);
        let mut at = 0;
        let pieces: Vec<(&Tensor, Slab)> = tensors
            .iter()
            .map(|t| {
                let len = t.dims()[d];
                at += len;
                let slab = Slab {
                    outer,
                    inner,
                    len,
                    src_dim: len,
                    src_at: 0,
                    dst_dim: total,
                    dst_at: at - len,
                };
                (t, slab)
            })
            .collect();
        let out = kernels(first.device()).slabs(dims.into(), &pieces, false)?;
        let sizes = tensors.iter().map(|t| t.dims()[d]).collect();
        Tape::record(Op::Cat, &refs, out, || CatBackward { dim: d, sizes })
    }
}

struct ReshapeBackward(Shape);

impl Backward for ReshapeBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.reshape(self.0.clone())?)])
    }
}

struct PermuteBackward(Vec<usize>);

impl Backward for PermuteBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.permute(&self.0)?)])
    }
}

struct NarrowBackward {
    shape: Shape,
    dim: usize,
    start: usize,
}

impl Backward for NarrowBackward {
    /// The gradient lands in its slab of an otherwise zero tensor.
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (outer, size, inner) = self.shape.split_at_axis(self.dim);
        let len = g.dims()[self.dim];
        let slab = Slab {
            outer,
            inner,
            len,
            src_dim: len,
            src_at: 0,
            dst_dim: size,
            dst_at: self.start,
        };
        let dx = kernels(g.device()).slabs(self.shape.clone(), &[(g, slab)], true)?;
        Ok(vec![Some(dx)])
    }
}

struct CatBackward {
    dim: usize,
    sizes: Vec<usize>,
}

impl Backward for CatBackward {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut start = 0;
        let mut out = Vec::with_capacity(self.sizes.len());
        for (&n, &need) in self.sizes.iter().zip(needs) {
            out.push(
                need.then(|| g.narrow(self.dim as isize, start, n))
                    .transpose()?,
            );
            start += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::{Device, Op, Tensor};
    use proptest::prelude::*;

    pub(crate) fn cases() -> Vec<Case> {
        let dims3 = || (size(), size(), size());
        let reshape = dims3()
            .prop_flat_map(|(a, b, c)| {
                tensor(vec![a, b, c])
                    .prop_map(move |t| instance(vec![t], move |x| x[0].reshape([c, a * b])))
            })
            .boxed();
        let permute = (
            dims3(),
            size(),
            Just([[0usize, 1, 2, 3], [3, 1, 0, 2], [0, 2, 1, 3], [2, 3, 1, 0]]),
            0usize..4,
        )
            .prop_flat_map(|((a, b, c), d, perms, p)| {
                let perm = perms[p];
                tensor(vec![a, b, c, d])
                    .prop_map(move |t| instance(vec![t], move |x| x[0].permute(&perm)))
            })
            .boxed();
        let narrow = (dims3(), 0usize..3)
            .prop_flat_map(|((a, b, c), d)| {
                let size = [a, b, c][d];
                (tensor(vec![a, b, c]), 0..size).prop_flat_map(move |(t, start)| {
                    (1..=size - start).prop_map(move |len| {
                        instance(vec![t.clone()], move |x| {
                            x[0].narrow(d as isize, start, len)
                        })
                    })
                })
            })
            .boxed();
        let cat = (dims3(), size(), 0usize..3)
            .prop_flat_map(|((a, b, c), e, d)| {
                let mut other = [a, b, c];
                other[d] = e;
                (tensor(vec![a, b, c]), tensor(other.to_vec())).prop_map(move |(x, y)| {
                    instance(vec![x, y], move |t| Tensor::cat(t, d as isize))
                })
            })
            .boxed();
        let split = (size(), size(), size())
            .prop_flat_map(|(a, b, c)| {
                tensor(vec![a, b + c]).prop_map(move |t| {
                    // Recombine the pieces with distinct weights so both halves are checked.
                    instance(vec![t], move |x| {
                        let p = x[0].split(1, &[b, c])?;
                        Tensor::cat(&[p[1].clone(), p[0].scale(2.0)?], 1)
                    })
                })
            })
            .boxed();
        let transpose = dims3()
            .prop_flat_map(|(a, b, c)| {
                tensor(vec![a, b, c]).prop_map(|t| instance(vec![t], |x| x[0].transpose(0, -1)))
            })
            .boxed();
        vec![
            Case::new("reshape", &[Op::Reshape], reshape),
            Case::new("permute", &[Op::Permute], permute),
            Case::new("transpose", &[Op::Permute], transpose),
            Case::new("narrow", &[Op::Narrow], narrow),
            Case::new("cat", &[Op::Cat], cat),
            Case::new("split", &[Op::Narrow, Op::Cat], split),
        ]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }

    #[test]
    fn permute_moves_elements() {
        let x = Tensor::from_vec((0..6u32).collect(), [2, 3], &Device::Cpu).unwrap();
        assert_eq!(
            x.transpose(0, 1).unwrap().to_vec::<u32>().unwrap(),
            vec![0, 3, 1, 4, 2, 5]
        );
        let c = Tensor::cat(&[x.clone(), x.narrow(1, 1, 1).unwrap()], 1).unwrap();
        assert_eq!(c.to_vec::<u32>().unwrap(), vec![0, 1, 2, 1, 3, 4, 5, 4]);
        assert!(x.permute(&[0, 0]).is_err());
        assert!(
            x.narrow(1, 2, 2)
                .unwrap_err()
                .to_string()
                .contains("exceeds")
        );
    }
}
