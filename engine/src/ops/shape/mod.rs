//! Reshape, permute/transpose, narrow/split and cat. Every result is contiguous: kernels then
//! never deal with strides, at the price of a copy for permute, narrow and cat.

use super::{Op, axis};
use crate::storage::{CpuData, CpuStorage};
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Shape, Storage, Tensor};
use bft_kernels::cpu::layout::{copy_slab, permute};
use std::sync::Arc;

/// A wgpu tensor's buffer for a data-movement op: any 32-bit element type moves as bits.
fn moved<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a bft_kernels::wgpu::GpuBuffer> {
    if t.dtype().size_in_bytes() != 4 {
        return Err(Error::DType {
            op,
            got: t.dtype(),
            expected: "f32 or u32 on wgpu",
        });
    }
    t.wgpu().ok_or(Error::Unsupported {
        op,
        device: t.device(),
    })
}

/// 16-bit tensors on wgpu move as f32: the kernels move 32-bit words, and both casts are
/// exact, so the result holds the same bits.
fn wide_on_device(
    inputs: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    if inputs.iter().all(|t| t.wgpu().is_none()) {
        return Ok(None);
    }
    super::in_compute_dtype(inputs, f)
}

/// A slab copy on wgpu from `src` into `dst`; both have the layout of `sizes` around the axis.
fn wgpu_slab(
    src: &Tensor,
    dst: &bft_kernels::wgpu::GpuBuffer,
    slab: bft_kernels::wgpu::ops::Slab,
) -> Result<()> {
    let g = dst.gpu().clone();
    Ok(bft_kernels::wgpu::ops::slab(
        &g,
        moved("slab", src)?,
        dst,
        slab,
    )?)
}

/// The host storage of a tensor whose data an op moves on the CPU.
fn host<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a CpuStorage> {
    match t.storage() {
        Storage::Cpu(s) => Ok(s),
        Storage::Wgpu(_) | Storage::Cuda(_) => Err(Error::Unsupported {
            op,
            device: t.device(),
        }),
    }
}

/// Applies a generic data-movement kernel to whichever element type the storage holds.
fn map_cpu(
    op: &'static str,
    t: &Tensor,
    shape: Shape,
    f: impl Fn(&dyn AnySlice) -> CpuData,
) -> Result<Tensor> {
    let s = host(op, t)?;
    let data = match &s.data {
        CpuData::F32(v) => f(&v.as_slice()),
        CpuData::F64(v) => f(&v.as_slice()),
        CpuData::BF16(v) => f(&v.as_slice()),
        CpuData::F16(v) => f(&v.as_slice()),
        CpuData::U32(v) => f(&v.as_slice()),
    };
    Ok(Tensor::from_storage(
        Arc::new(Storage::Cpu(CpuStorage::new(data))),
        shape,
    ))
}

/// Type-erased source buffer so each movement op is written once for every dtype.
trait AnySlice {
    fn permute(&self, dims: &[usize], perm: &[usize]) -> CpuData;
    fn slab(
        &self,
        src_dim: usize,
        src_at: usize,
        dst_dim: usize,
        dst_at: usize,
        sizes: (usize, usize, usize),
        into: Option<CpuData>,
    ) -> CpuData;
}

impl<T: crate::Elem + Default> AnySlice for &[T] {
    fn permute(&self, dims: &[usize], perm: &[usize]) -> CpuData {
        let mut out = vec![T::default(); self.len()];
        permute(self, dims, perm, &mut out);
        T::wrap(out)
    }
    fn slab(
        &self,
        src_dim: usize,
        src_at: usize,
        dst_dim: usize,
        dst_at: usize,
        sizes: (usize, usize, usize),
        into: Option<CpuData>,
    ) -> CpuData {
        // Writing into the buffer passed in (by value) keeps `cat` linear in its output size.
        let mut out = into
            .and_then(T::take)
            .unwrap_or_else(|| vec![T::default(); sizes.0 * dst_dim * sizes.2]);
        copy_slab(self, src_dim, src_at, &mut out, dst_dim, dst_at, sizes);
        T::wrap(out)
    }
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
        if let Some(out) = wide_on_device(&[self], |t| t[0].permute(perm))? {
            return Ok(out);
        }
        let dims: Vec<usize> = perm.iter().map(|&p| self.dims()[p]).collect();
        let out = if let Some((g, i)) = super::wgpu_of(self) {
            if rank > bft_kernels::wgpu::ops::MAX_RANK {
                return Err(Error::Unsupported {
                    op: "permute of more than 6 axes",
                    device: self.device(),
                });
            }
            let y =
                bft_kernels::wgpu::ops::permute(&g, moved("permute", self)?, self.dims(), perm)?;
            Tensor::from_wgpu(y, self.dtype(), i, dims)
        } else {
            map_cpu("permute", self, dims.into(), |s| {
                s.permute(self.dims(), perm)
            })?
        };
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
        if let Some(out) = wide_on_device(&[self], |t| t[0].narrow(dim, start, len))? {
            return Ok(out);
        }
        let (outer, _, inner) = self.shape().split_at_axis(d);
        let mut dims = self.dims().to_vec();
        dims[d] = len;
        let out = if let Some((g, i)) = super::wgpu_of(self) {
            let dst = g.alloc((outer * len * inner * 4) as u64);
            let slab = bft_kernels::wgpu::ops::Slab {
                outer,
                inner,
                len,
                src_dim: size,
                src_at: start,
                dst_dim: len,
                dst_at: 0,
            };
            wgpu_slab(self, &dst, slab)?;
            Tensor::from_wgpu(dst, self.dtype(), i, dims)
        } else {
            map_cpu("narrow", self, dims.into(), |s| {
                s.slab(size, start, len, 0, (outer, len, inner), None)
            })?
        };
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
        if let Some(out) = wide_on_device(&refs, |t| Tensor::cat(t, dim))? {
            return Ok(out);
        }
        let total: usize = tensors.iter().map(|t| t.dims()[d]).sum();
        let mut dims = first.dims().to_vec();
        dims[d] = total;
        let (outer, _, inner) = first.shape().split_at_axis(d);
        if let Some((g, i)) = super::wgpu_of(first) {
            let dst = g.alloc((outer * total * inner * 4) as u64);
            let mut at = 0;
            for t in tensors {
                let len = t.dims()[d];
                let slab = bft_kernels::wgpu::ops::Slab {
                    outer,
                    inner,
                    len,
                    src_dim: len,
                    src_at: 0,
                    dst_dim: total,
                    dst_at: at,
                };
                wgpu_slab(t, &dst, slab)?;
                at += len;
            }
            let out = Tensor::from_wgpu(dst, first.dtype(), i, dims);
            let sizes = tensors.iter().map(|t| t.dims()[d]).collect();
            return Tape::record(Op::Cat, &refs, out, || CatBackward { dim: d, sizes });
        }
        let mut data: Option<CpuData> = None;
        let mut at = 0;
        for t in tensors {
            let len = t.dims()[d];
            let s = host("cat", t)?;
            let src: &dyn AnySlice = match &s.data {
                CpuData::F32(v) => &v.as_slice(),
                CpuData::F64(v) => &v.as_slice(),
                CpuData::BF16(v) => &v.as_slice(),
                CpuData::F16(v) => &v.as_slice(),
                CpuData::U32(v) => &v.as_slice(),
            };
            data = Some(src.slab(len, 0, total, at, (outer, len, inner), data.take()));
            at += len;
        }
        // cannot fail: `tensors` is not empty (checked at the top), so the loop ran.
        let data = data.expect("at least one tensor");
        let out = Tensor::from_storage(Arc::new(Storage::Cpu(CpuStorage::new(data))), dims.into());
        let refs: Vec<&Tensor> = tensors.iter().collect();
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
        if let Some((gpu, i)) = super::wgpu_of(g) {
            let dst = bft_kernels::wgpu::ops::fill(&gpu, self.shape.numel(), 0)?;
            let slab = bft_kernels::wgpu::ops::Slab {
                outer,
                inner,
                len,
                src_dim: len,
                src_at: 0,
                dst_dim: size,
                dst_at: self.start,
            };
            wgpu_slab(g, &dst, slab)?;
            return Ok(vec![Some(Tensor::from_wgpu(
                dst,
                g.dtype(),
                i,
                self.shape.clone(),
            ))]);
        }
        let zeros = Tensor::zeros(self.shape.clone(), g.dtype(), &g.device())?;
        let z = host("narrow backward", &zeros)?;
        let out = map_cpu("narrow backward", g, self.shape.clone(), |s| {
            s.slab(
                len,
                0,
                size,
                self.start,
                (outer, len, inner),
                Some(z.data.clone()),
            )
        })?;
        Ok(vec![Some(out)])
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
