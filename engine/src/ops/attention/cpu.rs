use super::AttentionKernel;
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Tensor};
use bft_kernels::cpu::attention::{AttnDims, Tiles, attention_backward, attention_forward};

impl AttentionKernel for Cpu {
    fn attention(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        dims: AttnDims,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        let rows = dims.batch * dims.q_heads * dims.q_len;
        float_dispatch!("attention", q.dtype(), |T| {
            let (mut o, mut l) = (vec![T::default(); q.numel()], vec![T::default(); rows]);
            if rows > 0 {
                let n = "attention";
                let qkv = (q.cpu::<T>(n)?, k.cpu::<T>(n)?, v.cpu::<T>(n)?);
                attention_forward(dims, Tiles::default(), scale, qkv, &mut o, &mut l);
            }
            Ok((
                Tensor::from_cpu(o, q.shape().clone()),
                Tensor::from_cpu(l, [rows]),
            ))
        })
    }

    fn attention_backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (o, lse, g): (&Tensor, &Tensor, &Tensor),
        dims: AttnDims,
        scale: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        float_dispatch!("attention backward", g.dtype(), |T| {
            let mut dq = vec![T::default(); q.numel()];
            let mut dk = vec![T::default(); k.numel()];
            let mut dv = vec![T::default(); v.numel()];
            if !dq.is_empty() {
                let n = "attention";
                attention_backward(
                    dims,
                    Tiles::default(),
                    scale,
                    (q.cpu::<T>(n)?, k.cpu::<T>(n)?, v.cpu::<T>(n)?),
                    (o.cpu::<T>(n)?, lse.cpu::<T>(n)?, g.cpu::<T>(n)?),
                    &mut dq,
                    &mut dk,
                    &mut dv,
                );
            }
            Ok((
                Tensor::from_cpu(dq, q.shape().clone()),
                Tensor::from_cpu(dk, k.shape().clone()),
                Tensor::from_cpu(dv, v.shape().clone()),
            ))
        })
    }
}
