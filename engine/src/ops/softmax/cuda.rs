use super::SoftmaxKernel;
use crate::backend::{Cuda, cuda_of, fbuf, float_of, typed_output};
use crate::{Result, Tensor};
use bft_kernels::cuda::typed;

impl SoftmaxKernel for Cuda {
    fn softmax(&self, x: &Tensor, log: bool) -> Result<Tensor> {
        let (dev, i) = cuda_of(x)?;
        let f = float_of("softmax", x)?;
        let cols = x.shape().last();
        let rows = x.numel() / cols.max(1);
        let y = typed::softmax(&dev, f, fbuf("softmax", x, f)?, (rows, cols), log)?;
        Ok(typed_output(y, f, i, x.shape().clone()))
    }

    fn softmax_backward(&self, y: &Tensor, dy: &Tensor, log: bool) -> Result<Tensor> {
        let (dev, i) = cuda_of(dy)?;
        let f = float_of("softmax backward", dy)?;
        let cols = dy.shape().last();
        let rows = dy.numel() / cols.max(1);
        let bufs = (fbuf("softmax", y, f)?, fbuf("softmax", dy, f)?);
        let dx = typed::softmax_backward(&dev, f, bufs, (rows, cols), log)?;
        Ok(typed_output(dx, f, i, dy.shape().clone()))
    }
}
