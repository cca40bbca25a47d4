use super::AttentionKernel;
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{DType, Result, Tensor};
use bft_kernels::cpu::attention::{AttnDims, Tiles, attention_backward, attention_forward};
use bft_kernels::cpu::attention_bf16::{
    attention_backward_bf16, attention_forward_bf16, backward_applies, forward_applies,
};
use bft_kernels::cpu::zeroed;

/// Whether these operands take the bf16 kernels: f32 under autocast, where `applies` (the
/// kernel's own test of the CPU and the shapes) says so. f64, the gradient checks' exact
/// reference, never does.
fn takes_bf16(autocast: bool, dtype: DType, applies: bool) -> bool {
    autocast && dtype == DType::F32 && applies
}

impl AttentionKernel for Cpu {
    fn attention(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        dims: AttnDims,
        scale: f64,
        autocast: bool,
    ) -> Result<(Tensor, Tensor)> {
        let rows = dims.batch * dims.q_heads * dims.q_len;
        let n = "attention";
        if takes_bf16(autocast, q.dtype(), forward_applies(&dims)) && rows > 0 {
            let (mut o, mut l) = (zeroed::<f32>(q.numel()), zeroed::<f32>(rows));
            let qkv = (q.cpu::<f32>(n)?, k.cpu::<f32>(n)?, v.cpu::<f32>(n)?);
            if attention_forward_bf16(dims, scale, qkv, &mut o, &mut l) {
                return Ok((
                    Tensor::from_cpu(o, q.shape().clone()),
                    Tensor::from_cpu(l, [rows]),
                ));
            }
        }
        float_dispatch!("attention", q.dtype(), |T| {
            let (mut o, mut l) = (zeroed::<T>(q.numel()), zeroed::<T>(rows));
            if rows > 0 {
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
        autocast: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let n = "attention";
        // Decided before the outputs are allocated: a declined call would allocate twice.
        if takes_bf16(autocast, g.dtype(), backward_applies(&dims)) && q.numel() > 0 {
            let mut dq = zeroed::<f32>(q.numel());
            let mut dk = zeroed::<f32>(k.numel());
            let mut dv = zeroed::<f32>(v.numel());
            if attention_backward_bf16(
                dims,
                scale,
                (q.cpu::<f32>(n)?, k.cpu::<f32>(n)?, v.cpu::<f32>(n)?),
                (o.cpu::<f32>(n)?, lse.cpu::<f32>(n)?, g.cpu::<f32>(n)?),
                &mut dq,
                &mut dk,
                &mut dv,
            ) {
                return Ok((
                    Tensor::from_cpu(dq, q.shape().clone()),
                    Tensor::from_cpu(dk, k.shape().clone()),
                    Tensor::from_cpu(dv, v.shape().clone()),
                ));
            }
        }
        float_dispatch!("attention backward", g.dtype(), |T| {
            let mut dq = zeroed::<T>(q.numel());
            let mut dk = zeroed::<T>(k.numel());
            let mut dv = zeroed::<T>(v.numel());
            if !dq.is_empty() {
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
