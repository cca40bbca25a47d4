use super::BinaryKernel;
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Shape, Tensor};
use bft_kernels::cpu::binary::{BinaryKind, binary, sum_rows};
use bft_kernels::cpu::unary::scale;
use bft_kernels::cpu::{written, zeroed};

impl BinaryKernel for Cpu {
    fn binary(&self, kind: BinaryKind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        float_dispatch!("binary", a.dtype(), |T| {
            let (x, y) = (a.cpu::<T>("binary")?, b.cpu::<T>("binary")?);
            // SAFETY: `binary` writes every element of an output as long as `a` (it checks
            // that `b` tiles `a`); an empty one has nothing to write.
            let o = unsafe {
                written(a.numel(), |o| {
                    if !o.is_empty() {
                        binary(kind, x, y, o);
                    }
                })
            };
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
