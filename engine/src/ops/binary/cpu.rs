use super::BinaryKernel;
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Shape, Tensor};
use bft_kernels::cpu::binary::{BinaryKind, binary, sum_rows};
use bft_kernels::cpu::unary::scale;
use bft_kernels::cpu::zeroed;

impl BinaryKernel for Cpu {
    fn binary(&self, kind: BinaryKind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        float_dispatch!("binary", a.dtype(), |T| {
            let mut o = zeroed::<T>(a.numel());
            if !o.is_empty() {
                binary(kind, a.cpu::<T>("binary")?, b.cpu::<T>("binary")?, &mut o);
            }
            Ok(Tensor::from_cpu(o, a.shape().clone()))
        })
    }

    fn scale(&self, x: &Tensor, alpha: f64) -> Result<Tensor> {
        float_dispatch!("scale", x.dtype(), |T| {
            let mut o = zeroed::<T>(x.numel());
            let alpha = <T as bft_kernels::cpu::Float>::from_f64(alpha);
            scale(alpha, x.cpu::<T>("scale")?, &mut o);
            Ok(Tensor::from_cpu(o, x.shape().clone()))
        })
    }

    fn sum_to(&self, x: &Tensor, shape: &Shape) -> Result<Tensor> {
        float_dispatch!("sum_to", x.dtype(), |T| {
            let mut o = zeroed::<T>(shape.numel());
            sum_rows(x.cpu::<T>("sum_to")?, &mut o);
            Ok(Tensor::from_cpu(o, shape.clone()))
        })
    }
}
