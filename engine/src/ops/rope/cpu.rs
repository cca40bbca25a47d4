use super::RopeKernel;
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Tensor};
use bft_kernels::cpu::rope::rope;
use bft_kernels::cpu::zeroed;

impl RopeKernel for Cpu {
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
        let r = x.rank();
        let (t, d) = (x.dims()[r - 2], x.dims()[r - 1]);
        float_dispatch!("rope", x.dtype(), |T| {
            let mut o = zeroed::<T>(x.numel());
            if !o.is_empty() {
                rope(
                    x.cpu::<T>("rope")?,
                    cos.cpu::<T>("rope")?,
                    sin.cpu::<T>("rope")?,
                    t,
                    d,
                    inverse,
                    &mut o,
                );
            }
            Ok(Tensor::from_cpu(o, x.shape().clone()))
        })
    }
}
