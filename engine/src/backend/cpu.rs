//! The CPU backend: host vectors, rayon and the GEMM kernels of `bft_kernels::cpu`.

use super::{Backend, StorageKernel};
use crate::optim::AdamWStep;
use crate::storage::CpuData;
use crate::{DType, Device, Elem, Error, Result, Storage, Tensor};
use bft_kernels::cpu::optim;

/// Host memory. f32 and f64 compute as they are; 16-bit tensors compute in f32, except the
/// products with a bf16 weight, which the AVX512-BF16 kernel multiplies as stored where the CPU
/// has it (`ops/matmul/cpu.rs`, `ops/lm_head/cpu.rs`).
pub(crate) struct Cpu;

impl Backend for Cpu {
    fn compute_dtype(&self, result: DType) -> DType {
        if result.is_half() { DType::F32 } else { result }
    }
}

impl StorageKernel for Cpu {
    fn upload(&self, t: &Tensor, _: Device) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn download(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn accumulate(&self, acc: &mut Tensor, g: &Tensor) -> Result<()> {
        fn add<T: Elem>(a: &mut [T], b: &[T]) {
            a.iter_mut()
                .zip(b)
                .for_each(|(x, &y)| *x = T::from_f64(x.to_f64() + y.to_f64()));
        }
        let (Storage::Cpu(theirs), Storage::Cpu(mine)) = (g.storage(), acc.unique_storage()?)
        else {
            return Err(Error::Backward(
                "gradient storage is not on the host".into(),
            ));
        };
        match (&mut mine.data, &theirs.data) {
            (CpuData::F32(a), CpuData::F32(b)) => bft_kernels::cpu::binary::add_assign(a, b),
            (CpuData::F64(a), CpuData::F64(b)) => bft_kernels::cpu::binary::add_assign(a, b),
            (CpuData::BF16(a), CpuData::BF16(b)) => add(a, b),
            (CpuData::F16(a), CpuData::F16(b)) => add(a, b),
            _ => {
                return Err(Error::Backward(
                    "cannot accumulate integer gradients".into(),
                ));
            }
        }
        Ok(())
    }

    fn adamw(
        &self,
        p: &mut Tensor,
        g: &Tensor,
        (m, v): (&mut Tensor, &mut Tensor),
        h: &AdamWStep,
    ) -> Result<()> {
        const OP: &str = "adamw";
        let (Storage::Cpu(ps), Storage::Cpu(ms), Storage::Cpu(vs), Storage::Cpu(gs)) = (
            p.storage_mut()?,
            m.storage_mut()?,
            v.storage_mut()?,
            g.storage(),
        ) else {
            return Err(Error::Unsupported {
                op: OP,
                device: g.device(),
            });
        };
        let (CpuData::F32(mv), CpuData::F32(vv)) = (&mut ms.data, &mut vs.data) else {
            return Err(Error::DType {
                op: OP,
                got: ms.data.dtype(),
                expected: "f32 moments",
            });
        };
        match (&mut ps.data, &gs.data) {
            (CpuData::F32(pv), CpuData::F32(gv)) => optim::adamw(pv, gv, mv, vv, h),
            (CpuData::F64(pv), CpuData::F64(gv)) => optim::adamw(pv, gv, mv, vv, h),
            _ => {
                return Err(Error::DType {
                    op: OP,
                    got: ps.data.dtype(),
                    expected: "a float parameter",
                });
            }
        }
        Ok(())
    }

    fn sum_squares(&self, ts: &[Tensor]) -> Result<f64> {
        let mut total = 0.0;
        for t in ts {
            total += match t.storage() {
                Storage::Cpu(s) => match &s.data {
                    CpuData::F32(v) => optim::sum_squares(v),
                    CpuData::F64(v) => optim::sum_squares(v),
                    _ => optim::sum_squares(&t.cast_untracked(DType::F32)?.to_vec::<f32>()?),
                },
                _ => {
                    return Err(Error::Unsupported {
                        op: "sum_squares",
                        device: t.device(),
                    });
                }
            };
        }
        Ok(total)
    }
}
