use super::SoftmaxKernel;
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Tensor};
use bft_kernels::cpu::softmax::{softmax, softmax_backward};
use bft_kernels::cpu::zeroed;

impl SoftmaxKernel for Cpu {
    fn softmax(&self, x: &Tensor, log: bool) -> Result<Tensor> {
        let cols = x.shape().last();
        float_dispatch!("softmax", x.dtype(), |T| {
            let mut y = zeroed::<T>(x.numel());
            if !y.is_empty() {
                softmax(x.cpu::<T>("softmax")?, cols, log, &mut y);
            }
            Ok(Tensor::from_cpu(y, x.shape().clone()))
        })
    }

    fn softmax_backward(&self, y: &Tensor, dy: &Tensor, log: bool) -> Result<Tensor> {
        let cols = dy.shape().last();
        float_dispatch!("softmax backward", dy.dtype(), |T| {
            let mut dx = zeroed::<T>(dy.numel());
            if !dx.is_empty() {
                let (y, d) = (y.cpu::<T>("softmax")?, dy.cpu::<T>("softmax")?);
                softmax_backward(y, d, cols, log, &mut dx);
            }
            Ok(Tensor::from_cpu(dx, dy.shape().clone()))
        })
    }
}
