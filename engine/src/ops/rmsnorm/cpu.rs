use super::{RmsNormBackward, RmsNormKernel};
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Tensor};
use bft_kernels::cpu::rmsnorm::{add_rmsnorm, rmsnorm, rmsnorm_backward};
use bft_kernels::cpu::zeroed;

impl RmsNormKernel for Cpu {
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        let c = w.numel();
        let rows = x.numel() / c.max(1);
        float_dispatch!("rms_norm", x.dtype(), |T| {
            let (mut y, mut r) = (zeroed::<T>(x.numel()), zeroed::<T>(rows));
            rmsnorm(
                x.cpu::<T>("rms_norm")?,
                w.cpu::<T>("rms_norm")?,
                eps,
                &mut y,
                &mut r,
            );
            Ok((
                Tensor::from_cpu(y, x.shape().clone()),
                Tensor::from_cpu(r, [rows]),
            ))
        })
    }

    /// One pass over the rows, for f32 and f64.
    fn add_rms_norm(
        &self,
        x: &Tensor,
        delta: &Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        if x.dtype().is_half() {
            return Ok(None);
        }
        let c = w.numel();
        let rows = x.numel() / c.max(1);
        let n = "add_rms_norm";
        float_dispatch!(n, x.dtype(), |T| {
            let (mut h, mut y) = (zeroed::<T>(x.numel()), zeroed::<T>(x.numel()));
            let mut r = zeroed::<T>(rows);
            add_rmsnorm(
                (x.cpu::<T>(n)?, delta.cpu::<T>(n)?),
                w.cpu::<T>(n)?,
                eps,
                &mut h,
                &mut y,
                &mut r,
            );
            Ok(Some((
                Tensor::from_cpu(h, x.shape().clone()),
                Tensor::from_cpu(y, x.shape().clone()),
                Tensor::from_cpu(r, [rows]),
            )))
        })
    }

    fn rms_norm_backward(
        &self,
        s: &RmsNormBackward,
        dy: &Tensor,
        need_dw: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        float_dispatch!("rms_norm backward", dy.dtype(), |T| {
            let c = s.w.numel();
            let mut dx = zeroed::<T>(dy.numel());
            let mut dw = need_dw.then(|| zeroed::<T>(c));
            rmsnorm_backward(
                s.x.cpu::<T>("rms_norm")?,
                s.w.cpu::<T>("rms_norm")?,
                s.rstd.cpu::<T>("rms_norm")?,
                dy.cpu::<T>("rms_norm")?,
                &mut dx,
                dw.as_deref_mut(),
            );
            Ok((
                Tensor::from_cpu(dx, dy.shape().clone()),
                dw.map(|d| Tensor::from_cpu(d, [c])),
            ))
        })
    }
}
