use super::UnaryKernel;
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Tensor};
use bft_kernels::cpu::unary::{UnaryKind, unary, unary_backward};
use bft_kernels::cpu::zeroed;

impl UnaryKernel for Cpu {
    fn unary(&self, kind: UnaryKind, x: &Tensor) -> Result<Tensor> {
        float_dispatch!("unary", x.dtype(), |T| {
            let mut o = zeroed::<T>(x.numel());
            unary(kind, x.cpu::<T>("unary")?, &mut o);
            Ok(Tensor::from_cpu(o, x.shape().clone()))
        })
    }

    fn unary_backward(
        &self,
        kind: UnaryKind,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<Tensor> {
        float_dispatch!("unary backward", dy.dtype(), |T| {
            let mut dx = zeroed::<T>(dy.numel());
            let (x, y, d) = (
                x.cpu::<T>("unary")?,
                y.cpu::<T>("unary")?,
                dy.cpu::<T>("unary")?,
            );
            unary_backward(kind, x, y, d, &mut dx);
            Ok(Tensor::from_cpu(dx, dy.shape().clone()))
        })
    }
}
