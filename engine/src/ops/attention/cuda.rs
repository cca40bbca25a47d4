//! Attention's kernels are bf16 with an f32 log-sum-exp per row (`kernels/cuda/attention.cu`):
//! f32 operands are rounded once and the results widened back.

use super::AttentionKernel;
use crate::backend::{Cuda, bf16_input, bf16_output, cbuf, cuda_of};
use crate::{DType, Error, Result, Tensor};
use bft_kernels::cpu::attention::AttnDims;
use bft_kernels::cuda::ops;

impl AttentionKernel for Cuda {
    fn attention(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        dims: AttnDims,
        scale: f64,
        _autocast: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (dev, i) = cuda_of(q)?;
        if !ops::attention_supports(dims.head_dim) {
            return Err(Error::Unsupported {
                op: "attention with a head_dim over 256",
                device: q.device(),
            });
        }
        let n = "attention";
        let (qb, kb, vb) = (bf16_input(q)?, bf16_input(k)?, bf16_input(v)?);
        let qkv = (
            cbuf(n, &qb, DType::BF16)?,
            cbuf(n, &kb, DType::BF16)?,
            cbuf(n, &vb, DType::BF16)?,
        );
        let (o, lse) = ops::attention_forward(&dev, dims, scale as f32, qkv)?;
        let rows = dims.batch * dims.q_heads * dims.q_len;
        Ok((
            bf16_output(o, i, q.shape().clone(), q.dtype())?,
            Tensor::from_cuda(lse, DType::F32, i, [rows]),
        ))
    }

    fn attention_backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (o, lse, g): (&Tensor, &Tensor, &Tensor),
        dims: AttnDims,
        scale: f64,
        _autocast: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (dev, i) = cuda_of(g)?;
        let n = "attention";
        let b = |t: &Tensor| bf16_input(t);
        let (qb, kb, vb, ob, gb) = (b(q)?, b(k)?, b(v)?, b(o)?, b(g)?);
        let (dq, dk, dv) = ops::attention_backward(
            &dev,
            dims,
            scale as f32,
            (
                cbuf(n, &qb, DType::BF16)?,
                cbuf(n, &kb, DType::BF16)?,
                cbuf(n, &vb, DType::BF16)?,
            ),
            (
                cbuf(n, &ob, DType::BF16)?,
                cbuf(n, lse, DType::F32)?,
                cbuf(n, &gb, DType::BF16)?,
            ),
        )?;
        let out = |buf, s: &Tensor| bf16_output(buf, i, s.shape().clone(), g.dtype());
        Ok((out(dq, q)?, out(dk, k)?, out(dv, v)?))
    }
}
