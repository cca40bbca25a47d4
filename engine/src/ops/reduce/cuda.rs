use super::{ReduceBackward, ReduceKernel};
use crate::backend::{Cuda, cbuf, cuda_of, fbuf, float_of, typed_output};
use crate::{DType, Result, Tensor};
use bft_kernels::cpu::reduce::ReduceKind;
use bft_kernels::cuda::typed;

impl ReduceKernel for Cuda {
    fn reduce(
        &self,
        kind: ReduceKind,
        x: &Tensor,
        sizes: (usize, usize, usize),
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (dev, i) = cuda_of(x)?;
        let f = float_of("reduce", x)?;
        let n = sizes.0 * sizes.2;
        let xb = fbuf("reduce", x, f)?;
        let (o, argmax) = match kind {
            ReduceKind::Sum => (typed::reduce_sum(&dev, f, xb, sizes)?, None),
            ReduceKind::Max => {
                let (o, idx) = typed::reduce_max(&dev, f, xb, sizes)?;
                (o, Some(Tensor::from_cuda(idx, DType::U32, i, [n])))
            }
        };
        Ok((typed_output(o, f, i, [n]), argmax))
    }

    fn reduce_backward(&self, s: &ReduceBackward, dy: &Tensor) -> Result<Tensor> {
        let (dev, i) = cuda_of(dy)?;
        let f = float_of("reduce backward", dy)?;
        let idx = match &s.argmax {
            Some(t) => Some(cbuf("reduce", t, DType::U32)?),
            None => None,
        };
        let dx = typed::reduce_backward(&dev, f, fbuf("reduce", dy, f)?, idx, s.sizes)?;
        Ok(typed_output(dx, f, i, s.shape.clone()))
    }
}
