use super::RopeKernel;
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::{DType, Result, Tensor};

impl RopeKernel for Wgpu {
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
        let (g, i) = wgpu_of(x)?;
        let r = x.rank();
        let (t, d) = (x.dims()[r - 2], x.dims()[r - 1]);
        let rows = x.numel() / (t * d).max(1);
        let (xb, c, s) = (wbuf("rope", x)?, wbuf("rope", cos)?, wbuf("rope", sin)?);
        let y = bft_kernels::wgpu::ops::rope(&g, xb, c, s, (rows, t, d), inverse)?;
        Ok(Tensor::from_wgpu(y, DType::F32, i, x.shape().clone()))
    }
}
