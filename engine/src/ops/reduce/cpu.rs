use super::{ReduceBackward, ReduceKernel};
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Tensor};
use bft_kernels::cpu::reduce::{ReduceKind, reduce, reduce_backward};
use bft_kernels::cpu::zeroed;

impl ReduceKernel for Cpu {
    fn reduce(
        &self,
        kind: ReduceKind,
        x: &Tensor,
        sizes: (usize, usize, usize),
    ) -> Result<(Tensor, Option<Tensor>)> {
        let n = sizes.0 * sizes.2;
        let max = kind == ReduceKind::Max;
        let mut argmax = vec![0u32; if max { n } else { 0 }];
        let out = float_dispatch!("reduce", x.dtype(), |T| {
            let mut o = zeroed::<T>(n);
            reduce(kind, x.cpu::<T>("reduce")?, sizes, &mut o, &mut argmax);
            Ok(Tensor::from_cpu(o, [n]))
        })?;
        Ok((out, max.then(|| Tensor::from_cpu(argmax, [n]))))
    }

    fn reduce_backward(&self, s: &ReduceBackward, dy: &Tensor) -> Result<Tensor> {
        let no_index: &[u32] = &[];
        let argmax = match &s.argmax {
            Some(t) => t.cpu::<u32>("reduce")?,
            None => no_index,
        };
        float_dispatch!("reduce backward", dy.dtype(), |T| {
            let mut dx = zeroed::<T>(s.shape.numel());
            reduce_backward(s.kind, dy.cpu::<T>("reduce")?, argmax, s.sizes, &mut dx);
            Ok(Tensor::from_cpu(dx, s.shape.clone()))
        })
    }
}
