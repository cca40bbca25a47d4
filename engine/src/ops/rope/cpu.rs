use super::RopeKernel;
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Tensor};
use bft_kernels::cpu::rope::rope;
use bft_kernels::cpu::written;

impl RopeKernel for Cpu {
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
        let r = x.rank();
        let (t, d) = (x.dims()[r - 2], x.dims()[r - 1]);
        float_dispatch!("rope", x.dtype(), |T| {
            let (xs, c, s) = (
                x.cpu::<T>("rope")?,
                cos.cpu::<T>("rope")?,
                sin.cpu::<T>("rope")?,
            );
            // SAFETY: `rope` writes every element of an output as long as `x` (it checks the
            // shapes and tables that make it so); an empty one has nothing to write.
            let o = unsafe {
                written(x.numel(), |o| {
                    if !o.is_empty() {
                        rope(xs, c, s, t, d, inverse, o);
                    }
                })
            };
            Ok(Tensor::from_cpu(o, x.shape().clone()))
        })
    }
}
