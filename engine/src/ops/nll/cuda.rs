use super::{NllBackward, NllKernel};
use crate::backend::{Cuda, cbuf, cuda_of, fbuf, float_of, typed_output};
use crate::{DType, Result, Tensor};
use bft_kernels::cuda::typed;

impl NllKernel for Cuda {
    fn nll(&self, logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
        let (dev, i) = cuda_of(logits)?;
        let f = float_of("nll", logits)?;
        let (n, vocab) = (logits.dims()[0], logits.dims()[1]);
        let z = fbuf("nll", logits, f)?;
        let (loss, dir) = typed::nll(&dev, f, z, cbuf("nll", targets, DType::U32)?, (n, vocab))?;
        Ok((
            typed_output(loss, f, i, [n]),
            typed_output(dir, f, i, logits.shape().clone()),
        ))
    }

    fn nll_backward(&self, s: &NllBackward, dy: &Tensor) -> Result<Tensor> {
        let (dev, i) = cuda_of(dy)?;
        let f = float_of("nll backward", dy)?;
        let vocab = s.aux.dims()[1];
        let dir = fbuf("nll", &s.aux, f)?;
        let dz = typed::scale_rows(&dev, f, dir, fbuf("nll", dy, f)?, s.aux.numel(), vocab)?;
        Ok(typed_output(dz, f, i, s.aux.shape().clone()))
    }
}
