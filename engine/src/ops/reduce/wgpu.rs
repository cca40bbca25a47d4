use super::{ReduceBackward, ReduceKernel};
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::{DType, Result, Tensor};
use bft_kernels::cpu::reduce::ReduceKind;
use bft_kernels::wgpu::ops;

impl ReduceKernel for Wgpu {
    fn reduce(
        &self,
        kind: ReduceKind,
        x: &Tensor,
        sizes: (usize, usize, usize),
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (g, i) = wgpu_of(x)?;
        let n = sizes.0 * sizes.2;
        let xb = wbuf("reduce", x)?;
        let (o, argmax) = match kind {
            ReduceKind::Sum => (ops::reduce_sum(&g, xb, sizes)?, None),
            ReduceKind::Max => {
                let (o, idx) = ops::reduce_max(&g, xb, sizes)?;
                (o, Some(Tensor::from_wgpu(idx, DType::U32, i, [n])))
            }
        };
        Ok((Tensor::from_wgpu(o, DType::F32, i, [n]), argmax))
    }

    fn reduce_backward(&self, s: &ReduceBackward, dy: &Tensor) -> Result<Tensor> {
        let (g, i) = wgpu_of(dy)?;
        let idx = s.argmax.as_ref().and_then(Tensor::wgpu);
        let dx = ops::reduce_backward(&g, wbuf("reduce", dy)?, idx, s.sizes)?;
        Ok(Tensor::from_wgpu(dx, DType::F32, i, s.shape.clone()))
    }
}
