use super::EmbeddingKernel;
use crate::backend::Cpu;
use crate::dtype::Elem;
use crate::ops::float_dispatch;
use crate::{DType, Result, Tensor};
use bft_kernels::cpu::embedding::{gather, scatter_add};
use bft_kernels::cpu::zeroed;

impl EmbeddingKernel for Cpu {
    fn gathers(&self, dtype: DType) -> bool {
        dtype.is_float()
    }

    fn embedding(&self, table: &Tensor, ids: &[u32], dims: Vec<usize>) -> Result<Tensor> {
        fn rows<T: Elem + Default>(t: &Tensor, dim: usize, ids: &[u32]) -> Result<Vec<T>> {
            let mut o = zeroed::<T>(ids.len() * dim);
            gather(t.cpu::<T>("embedding")?, dim, ids, &mut o);
            Ok(o)
        }
        let dim = table.dims()[1];
        match table.dtype() {
            DType::BF16 => Ok(Tensor::from_cpu(rows::<half::bf16>(table, dim, ids)?, dims)),
            DType::F16 => Ok(Tensor::from_cpu(rows::<half::f16>(table, dim, ids)?, dims)),
            dt => float_dispatch!("embedding", dt, |T| Ok(Tensor::from_cpu(
                rows::<T>(table, dim, ids)?,
                dims
            ))),
        }
    }

    fn embedding_backward(&self, dy: &Tensor, ids: &[u32], vocab: usize) -> Result<Tensor> {
        let dim = dy.shape().last();
        // A 16-bit table's gradient is summed in f32 and rounded once.
        let wide = if dy.dtype().is_half() {
            dy.cast_untracked(DType::F32)?
        } else {
            dy.clone()
        };
        let dt = float_dispatch!("embedding backward", wide.dtype(), |T| {
            let mut dt = zeroed::<T>(vocab * dim);
            scatter_add(wide.cpu::<T>("embedding")?, dim, ids, &mut dt);
            Ok(Tensor::from_cpu(dt, [vocab, dim]))
        })?;
        if dt.dtype() == dy.dtype() {
            Ok(dt)
        } else {
            dt.cast_untracked(dy.dtype())
        }
    }
}
