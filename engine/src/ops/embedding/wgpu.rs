use super::EmbeddingKernel;
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::{DType, Result, Tensor};
use bft_kernels::wgpu::ops;

impl EmbeddingKernel for Wgpu {
    fn gathers(&self, dtype: DType) -> bool {
        dtype == DType::F32
    }

    fn embedding(&self, table: &Tensor, ids: &[u32], dims: Vec<usize>) -> Result<Tensor> {
        let (g, i) = wgpu_of(table)?;
        let o = ops::gather(&g, wbuf("embedding", table)?, table.dims()[1], ids)?;
        Ok(Tensor::from_wgpu(o, DType::F32, i, dims))
    }

    fn embedding_backward(&self, dy: &Tensor, ids: &[u32], vocab: usize) -> Result<Tensor> {
        let (g, i) = wgpu_of(dy)?;
        let dim = dy.shape().last();
        let dt = ops::scatter_add(&g, wbuf("embedding", dy)?, dim, ids, vocab)?;
        Ok(Tensor::from_wgpu(dt, DType::F32, i, [vocab, dim]))
    }
}
