use super::{RmsNormBackward, RmsNormKernel};
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Tensor};
use bft_kernels::cpu::rmsnorm::{add_rmsnorm, rmsnorm, rmsnorm_backward};
use bft_kernels::cpu::{written, zeroed};

impl RmsNormKernel for Cpu {
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        let c = w.numel();
        let rows = x.numel() / c.max(1);
        float_dispatch!("rms_norm", x.dtype(), |T| {
            let (xs, ws) = (x.cpu::<T>("rms_norm")?, w.cpu::<T>("rms_norm")?);
            let mut r = zeroed::<T>(rows);
            // SAFETY: `rmsnorm` writes every element of `y` (whole rows, as many as `x`).
            let y = unsafe { written(x.numel(), |y| rmsnorm(xs, ws, eps, y, &mut r)) };
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
            // `h` is read back by the kernel after it is written, so it starts zeroed.
            let (mut h, mut r) = (zeroed::<T>(x.numel()), zeroed::<T>(rows));
            let (xs, ds, ws) = (x.cpu::<T>(n)?, delta.cpu::<T>(n)?, w.cpu::<T>(n)?);
            // SAFETY: `add_rmsnorm` writes every element of `y` (whole rows, as many as `x`).
            let y = unsafe {
                written(x.numel(), |y| {
                    add_rmsnorm((xs, ds), ws, eps, &mut h, y, &mut r);
                })
            };
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
            let mut dw = need_dw.then(|| zeroed::<T>(c));
            let n = "rms_norm";
            let (xs, ws, rs, dys) = (
                s.x.cpu::<T>(n)?,
                s.w.cpu::<T>(n)?,
                s.rstd.cpu::<T>(n)?,
                dy.cpu::<T>(n)?,
            );
            // SAFETY: `rmsnorm_backward` writes every element of `dx` (whole rows, as `dy`).
            let dx = unsafe {
                written(dy.numel(), |dx| {
                    rmsnorm_backward(xs, ws, rs, dys, dx, dw.as_deref_mut());
                })
            };
            Ok((
                Tensor::from_cpu(dx, dy.shape().clone()),
                dw.map(|d| Tensor::from_cpu(d, [c])),
            ))
        })
    }
}
