use super::CastKernel;
use crate::backend::Cpu;
use crate::storage::{CpuData, CpuStorage};
use crate::{DType, Elem, Error, Result, Storage, Tensor};
use std::sync::Arc;

impl CastKernel for Cpu {
    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
        let Storage::Cpu(s) = x.storage() else {
            return Err(Error::Unsupported {
                op: "cast",
                device: x.device(),
            });
        };
        // f32 <-> 16-bit: parallel kernels that round from the f32 bits. The rest (f64, u32,
        // 16-bit to 16-bit) go element by element through f64.
        use bft_kernels::cpu::cast;
        let fast = match (&s.data, dtype) {
            (CpuData::F32(v), DType::BF16) => {
                let mut out = vec![half::bf16::ZERO; v.len()];
                cast::narrow_bf16(v, &mut out);
                Some(CpuData::BF16(out))
            }
            (CpuData::F32(v), DType::F16) => {
                let mut out = vec![half::f16::ZERO; v.len()];
                cast::narrow_f16(v, &mut out);
                Some(CpuData::F16(out))
            }
            (CpuData::BF16(v), DType::F32) => {
                let mut out = vec![0f32; v.len()];
                cast::widen_bf16(v, &mut out);
                Some(CpuData::F32(out))
            }
            (CpuData::F16(v), DType::F32) => {
                let mut out = vec![0f32; v.len()];
                cast::widen_f16(v, &mut out);
                Some(CpuData::F32(out))
            }
            _ => None,
        };
        if let Some(data) = fast {
            return Ok(Some(Tensor::from_storage(
                Arc::new(Storage::Cpu(CpuStorage::new(data))),
                x.shape().clone(),
            )));
        }
        fn conv<S: Elem, D: Elem>(v: &[S]) -> Vec<D> {
            v.iter().map(|&x| D::from_f64(x.to_f64())).collect()
        }
        fn to<D: Elem>(d: &CpuData) -> Vec<D> {
            match d {
                CpuData::F32(v) => conv(v),
                CpuData::F64(v) => conv(v),
                CpuData::BF16(v) => conv(v),
                CpuData::F16(v) => conv(v),
                CpuData::U32(v) => conv(v),
            }
        }
        let data = match dtype {
            DType::F32 => CpuData::F32(to(&s.data)),
            DType::F64 => CpuData::F64(to(&s.data)),
            DType::BF16 => CpuData::BF16(to(&s.data)),
            DType::F16 => CpuData::F16(to(&s.data)),
            DType::U32 => CpuData::U32(to(&s.data)),
        };
        Ok(Some(Tensor::from_storage(
            Arc::new(Storage::Cpu(CpuStorage::new(data))),
            x.shape().clone(),
        )))
    }
}
