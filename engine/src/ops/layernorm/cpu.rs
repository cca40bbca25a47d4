use super::{LayerNormBackward, LayerNormKernel};
use crate::backend::Cpu;
use crate::ops::float_dispatch;
use crate::{Result, Tensor};
use bft_kernels::cpu::layernorm::{layernorm, layernorm_backward};
use bft_kernels::cpu::zeroed;

impl LayerNormKernel for Cpu {
    fn layer_norm(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let rows = x.numel() / w.numel().max(1);
        float_dispatch!("layer_norm", x.dtype(), |T| {
            let mut y = zeroed::<T>(x.numel());
            let (mut m, mut r) = (zeroed::<T>(rows), zeroed::<T>(rows));
            layernorm(
                x.cpu::<T>("layer_norm")?,
                w.cpu::<T>("layer_norm")?,
                b.cpu::<T>("layer_norm")?,
                eps,
                &mut y,
                &mut m,
                &mut r,
            );
            Ok((
                Tensor::from_cpu(y, x.shape().clone()),
                Tensor::from_cpu(m, [rows]),
                Tensor::from_cpu(r, [rows]),
            ))
        })
    }

    fn layer_norm_backward(
        &self,
        s: &LayerNormBackward,
        dy: &Tensor,
        need_params: bool,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let c = s.w.numel();
        float_dispatch!("layer_norm backward", dy.dtype(), |T| {
            let mut dx = zeroed::<T>(dy.numel());
            let mut dw = need_params.then(|| zeroed::<T>(c));
            let mut db = need_params.then(|| zeroed::<T>(c));
            layernorm_backward(
                s.x.cpu::<T>("layer_norm")?,
                s.w.cpu::<T>("layer_norm")?,
                s.mean.cpu::<T>("layer_norm")?,
                s.rstd.cpu::<T>("layer_norm")?,
                dy.cpu::<T>("layer_norm")?,
                &mut dx,
                dw.as_deref_mut(),
                db.as_deref_mut(),
            );
            let params = dw
                .zip(db)
                .map(|(w, b)| (Tensor::from_cpu(w, [c]), Tensor::from_cpu(b, [c])));
            Ok((Tensor::from_cpu(dx, dy.shape().clone()), params))
        })
    }
}
