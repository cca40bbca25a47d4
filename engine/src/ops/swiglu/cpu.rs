use super::SwiGluKernel;
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Tensor};
use bft_kernels::cpu::unary::{swiglu, swiglu_backward};
use bft_kernels::cpu::zeroed;

impl SwiGluKernel for Cpu {
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        float_dispatch!("swiglu", gate.dtype(), |T| {
            let mut o = zeroed::<T>(gate.numel());
            swiglu(gate.cpu::<T>("swiglu")?, up.cpu::<T>("swiglu")?, &mut o);
            Ok(Tensor::from_cpu(o, gate.shape().clone()))
        })
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        float_dispatch!("swiglu backward", dy.dtype(), |T| {
            let n = dy.numel();
            let (mut dg, mut du) = (zeroed::<T>(n), zeroed::<T>(n));
            swiglu_backward(
                gate.cpu::<T>("swiglu")?,
                up.cpu::<T>("swiglu")?,
                dy.cpu::<T>("swiglu")?,
                &mut dg,
                &mut du,
            );
            Ok((
                Tensor::from_cpu(dg, dy.shape().clone()),
                Tensor::from_cpu(du, dy.shape().clone()),
            ))
        })
    }
}
