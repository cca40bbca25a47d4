//! Data movement on the host, written once for every element type through `AnySlice`.

use super::{LayoutKernel, Slab};
use crate::backend::Cpu;
use crate::storage::{CpuData, CpuStorage};
use crate::{DType, Error, Result, Shape, Storage, Tensor};
use bft_kernels::cpu::layout::{copy_slab, permute};
use bft_kernels::cpu::{written, zeroed};
use std::sync::Arc;

impl LayoutKernel for Cpu {
    fn moves(&self, _: DType) -> bool {
        true
    }

    fn permute(&self, x: &Tensor, perm: &[usize], dims: Vec<usize>) -> Result<Tensor> {
        let out = source(host("permute", x)?).permute(x.dims(), perm);
        Ok(tensor(out, dims.into()))
    }

    fn slabs(&self, shape: Shape, pieces: &[(&Tensor, Slab)], zeroed: bool) -> Result<Tensor> {
        let mut data: Option<CpuData> = None;
        if let (true, Some((first, _))) = (zeroed, pieces.first()) {
            let zeros = Tensor::zeros(shape.clone(), first.dtype(), &first.device())?;
            data = Some(host("slab", &zeros)?.data.clone());
        }
        for (t, s) in pieces {
            // Writing into the buffer passed along keeps `cat` linear in its output size.
            let sizes = (s.outer, s.len, s.inner);
            let src = source(host("slab", t)?);
            data = Some(src.slab(s.src_dim, s.src_at, s.dst_dim, s.dst_at, sizes, data.take()));
        }
        let data = data.ok_or_else(|| Error::shape("slab", "no tensor to copy"))?;
        Ok(tensor(data, shape))
    }
}

fn tensor(data: CpuData, shape: Shape) -> Tensor {
    Tensor::from_storage(Arc::new(Storage::Cpu(CpuStorage::new(data))), shape)
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

/// The storage's data as a type-erased slice.
fn source(s: &CpuStorage) -> &dyn AnySlice {
    match &s.data {
        CpuData::F32(v) => v,
        CpuData::F64(v) => v,
        CpuData::BF16(v) => v,
        CpuData::F16(v) => v,
        CpuData::U32(v) => v,
    }
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

impl<T: crate::Elem + Default> AnySlice for Vec<T> {
    fn permute(&self, dims: &[usize], perm: &[usize]) -> CpuData {
        // SAFETY: a permutation writes every element of an output as long as its input.
        T::wrap(unsafe { written(self.len(), |out| permute(self, dims, perm, out)) })
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
        let mut out = into
            .and_then(T::take)
            .unwrap_or_else(|| zeroed::<T>(sizes.0 * dst_dim * sizes.2));
        copy_slab(self, src_dim, src_at, &mut out, dst_dim, dst_at, sizes);
        T::wrap(out)
    }
}
