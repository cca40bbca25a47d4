use super::AttentionKernel;
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::{DType, Error, Result, Tensor};
use bft_kernels::cpu::attention::AttnDims;
use bft_kernels::wgpu::ops;

impl AttentionKernel for Wgpu {
    fn attention(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        dims: AttnDims,
        scale: f64,
        _autocast: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (g, i) = wgpu_of(q)?;
        if !ops::attention_supports(dims.head_dim) {
            return Err(Error::Unsupported {
                op: "attention with a head_dim that is not a multiple of 4 up to 256",
                device: q.device(),
            });
        }
        let n = "attention";
        let qkv = (wbuf(n, q)?, wbuf(n, k)?, wbuf(n, v)?);
        let (o, l) = ops::attention_forward(&g, dims, scale as f32, qkv)?;
        let rows = dims.batch * dims.q_heads * dims.q_len;
        Ok((
            Tensor::from_wgpu(o, DType::F32, i, q.shape().clone()),
            Tensor::from_wgpu(l, DType::F32, i, [rows]),
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
        let (gpu, i) = wgpu_of(g)?;
        let n = "attention";
        let (dq, dk, dv) = ops::attention_backward(
            &gpu,
            dims,
            scale as f32,
            (wbuf(n, q)?, wbuf(n, k)?, wbuf(n, v)?),
            (wbuf(n, o)?, wbuf(n, lse)?, wbuf(n, g)?),
        )?;
        let t = |b, s: &Tensor| Tensor::from_wgpu(b, DType::F32, i, s.shape().clone());
        Ok((t(dq, q), t(dk, k), t(dv, v)))
    }
}
