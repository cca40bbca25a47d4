use super::SwiGluKernel;
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Tensor};
use bft_kernels::cpu::unary::{swiglu, swiglu_backward};
use bft_kernels::cpu::written;

impl SwiGluKernel for Cpu {
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        float_dispatch!("swiglu", gate.dtype(), |T| {
            let (g, u) = (gate.cpu::<T>("swiglu")?, up.cpu::<T>("swiglu")?);
            // SAFETY: `swiglu` writes every element of an output as long as its inputs.
            let o = unsafe { written(gate.numel(), |o| swiglu(g, u, o)) };
            Ok(Tensor::from_cpu(o, gate.shape().clone()))
        })
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        float_dispatch!("swiglu backward", dy.dtype(), |T| {
            let n = dy.numel();
            let (g, u, d) = (
                gate.cpu::<T>("swiglu")?,
                up.cpu::<T>("swiglu")?,
                dy.cpu::<T>("swiglu")?,
            );
            let mut du = Vec::with_capacity(n);
            // SAFETY: `swiglu_backward` writes every element of both outputs, each as long as
            // `dy`; `du`'s length is set only after it ran.
            let dg = unsafe {
                written(n, |dg| {
                    swiglu_backward(g, u, d, dg, &mut du.spare_capacity_mut()[..n]);
                })
            };
            // SAFETY: as above, all n elements of `du` were written.
            unsafe { du.set_len(n) };
            Ok((
                Tensor::from_cpu(dg, dy.shape().clone()),
                Tensor::from_cpu(du, dy.shape().clone()),
            ))
        })
    }
}
