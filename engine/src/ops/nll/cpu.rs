use super::{NllBackward, NllKernel};
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Tensor};
use bft_kernels::cpu::nll::{nll, nll_backward};
use bft_kernels::cpu::zeroed;

impl NllKernel for Cpu {
    fn nll(&self, logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n, vocab) = (logits.dims()[0], logits.dims()[1]);
        let tv = targets.cpu::<u32>("nll")?;
        float_dispatch!("nll", logits.dtype(), |T| {
            let (mut l, mut s) = (zeroed::<T>(n), zeroed::<T>(n));
            nll(logits.cpu::<T>("nll")?, vocab, tv, &mut l, &mut s);
            Ok((Tensor::from_cpu(l, [n]), Tensor::from_cpu(s, [n])))
        })
    }

    fn nll_backward(&self, s: &NllBackward, dy: &Tensor) -> Result<Tensor> {
        let vocab = s.logits.dims()[1];
        float_dispatch!("nll backward", dy.dtype(), |T| {
            let mut dz = zeroed::<T>(s.logits.numel());
            nll_backward(
                s.logits.cpu::<T>("nll")?,
                vocab,
                s.targets.cpu::<u32>("nll")?,
                s.aux.cpu::<T>("nll")?,
                dy.cpu::<T>("nll")?,
                &mut dz,
            );
            Ok(Tensor::from_cpu(dz, s.logits.shape().clone()))
        })
    }
}
