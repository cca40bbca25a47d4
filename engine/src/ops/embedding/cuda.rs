//! Embeddings on CUDA: rows copied as stored (`kernels/cuda/embedding.cu`, by element width);
//! the table's gradient is summed in f32 without atomics and returned in the gradient's type.

use super::EmbeddingKernel;
use crate::backend::{Cuda, cbuf, cuda_of};
use crate::{DType, Result, Tensor};
use bft_kernels::cuda::ops;

impl EmbeddingKernel for Cuda {
    fn gathers(&self, dtype: DType) -> bool {
        dtype.is_float() && dtype != DType::F64
    }

    fn embedding(&self, table: &Tensor, ids: &[u32], dims: Vec<usize>) -> Result<Tensor> {
        let (dev, i) = cuda_of(table)?;
        let bytes = table.dtype().size_in_bytes();
        let buf = table.cuda().ok_or(crate::Error::Unsupported {
            op: "embedding",
            device: table.device(),
        })?;
        let device_ids = dev.upload(bytemuck::cast_slice(ids))?;
        let o = ops::embedding_forward(&dev, bytes, buf, &device_ids, ids.len(), table.dims()[1])?;
        Ok(Tensor::from_cuda(o, table.dtype(), i, dims))
    }

    fn embedding_backward(&self, dy: &Tensor, ids: &[u32], vocab: usize) -> Result<Tensor> {
        let (dev, i) = cuda_of(dy)?;
        let dim = dy.shape().last();
        let wide = dy.cast_untracked(DType::F32)?;
        let dt =
            ops::embedding_backward(&dev, cbuf("embedding", &wide, DType::F32)?, ids, vocab, dim)?;
        let dt = Tensor::from_cuda(dt, DType::F32, i, [vocab, dim]);
        dt.cast_untracked(dy.dtype())
    }
}
