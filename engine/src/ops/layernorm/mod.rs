//! LayerNorm over the last axis with a learned gain and bias (BERT's normalisation).

use super::{Op, float_dispatch, same_kind, via_f32, wbuf, wgpu_of};
use crate::DType;
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Tensor};
use bft_kernels::cpu::layernorm::{layernorm, layernorm_backward};

impl Tensor {
    /// `(x - mean) / sqrt(var + eps) * w + b` over the last axis, the variance biased as in
    /// PyTorch; `w` and `b` are `(C)`. Row statistics are accumulated in f64 on the CPU.
    pub fn layer_norm(&self, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::LayerNorm, crate::profile::Phase::Forward);
        if let Some(out) = via_f32(&[self, w, b], |t| t[0].layer_norm(&t[1], &t[2], eps))? {
            return Ok(out);
        }
        same_kind("layer_norm", self, w)?;
        same_kind("layer_norm", self, b)?;
        let c = self.shape().last();
        for (name, p) in [("weight", w), ("bias", b)] {
            if p.dims() != [c] {
                return Err(Error::shape(
                    "layer_norm",
                    format!(
                        "{name} {} does not match the last axis of {}",
                        p.shape(),
                        self.shape()
                    ),
                ));
            }
        }
        let rows = self.numel() / c.max(1);
        let (out, mean, rstd) = if let Some((g, i)) = wgpu_of(self) {
            let bufs = (
                wbuf("layer_norm", self)?,
                wbuf("layer_norm", w)?,
                wbuf("layer_norm", b)?,
            );
            let (y, m, r) = bft_kernels::wgpu::ops::layernorm(
                &g,
                bufs.0,
                bufs.1,
                bufs.2,
                (rows, c),
                eps as f32,
            )?;
            (
                Tensor::from_wgpu(y, DType::F32, i, self.shape().clone()),
                Tensor::from_wgpu(m, DType::F32, i, [rows]),
                Tensor::from_wgpu(r, DType::F32, i, [rows]),
            )
        } else {
            float_dispatch!("layer_norm", self.dtype(), |T| {
                let mut y = vec![T::default(); self.numel()];
                let (mut m, mut r) = (vec![T::default(); rows], vec![T::default(); rows]);
                layernorm(
                    self.cpu::<T>("layer_norm")?,
                    w.cpu::<T>("layer_norm")?,
                    b.cpu::<T>("layer_norm")?,
                    eps,
                    &mut y,
                    &mut m,
                    &mut r,
                );
                Ok((
                    Tensor::from_cpu(y, self.shape().clone()),
                    Tensor::from_cpu(m, [rows]),
                    Tensor::from_cpu(r, [rows]),
                ))
            })?
        };
        Tape::record(Op::LayerNorm, &[self, w, b], out, || LayerNormBackward {
            x: self.stop_gradient(),
            w: w.stop_gradient(),
            mean,
            rstd,
        })
    }
}

struct LayerNormBackward {
    x: Tensor,
    w: Tensor,
    /// `(rows)`: each row's mean and 1 / std, so the backward pass need not recompute them.
    mean: Tensor,
    rstd: Tensor,
}

impl Backward for LayerNormBackward {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let c = self.w.numel();
        let rows = g.numel() / c.max(1);
        let need_params = needs[1] || needs[2];
        if let Some((gpu, i)) = wgpu_of(g) {
            let bufs = [
                wbuf("layer_norm", &self.x)?,
                wbuf("layer_norm", &self.w)?,
                wbuf("layer_norm", &self.mean)?,
                wbuf("layer_norm", &self.rstd)?,
                wbuf("layer_norm", g)?,
            ];
            let (dx, dwb) =
                bft_kernels::wgpu::ops::layernorm_backward(&gpu, bufs, (rows, c), need_params)?;
            let (dw, db) = dwb.map_or((None, None), |(dw, db)| {
                (
                    Some(Tensor::from_wgpu(dw, DType::F32, i, [c])),
                    Some(Tensor::from_wgpu(db, DType::F32, i, [c])),
                )
            });
            return Ok(vec![
                Some(Tensor::from_wgpu(dx, DType::F32, i, g.shape().clone())),
                dw.filter(|_| needs[1]),
                db.filter(|_| needs[2]),
            ]);
        }
        float_dispatch!("layer_norm backward", g.dtype(), |T| {
            let mut dx = vec![T::default(); g.numel()];
            let mut dw = needs[1].then(|| vec![T::default(); c]);
            let mut db = needs[2].then(|| vec![T::default(); c]);
            layernorm_backward(
                self.x.cpu::<T>("layer_norm")?,
                self.w.cpu::<T>("layer_norm")?,
                self.mean.cpu::<T>("layer_norm")?,
                self.rstd.cpu::<T>("layer_norm")?,
                g.cpu::<T>("layer_norm")?,
                &mut dx,
                dw.as_deref_mut(),
                db.as_deref_mut(),
            );
            Ok(vec![
                Some(Tensor::from_cpu(dx, g.shape().clone())),
                dw.map(|d| Tensor::from_cpu(d, [c])),
                db.map(|d| Tensor::from_cpu(d, [c])),
            ])
        })
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::{DType, Device, Op, Tensor};
    use proptest::prelude::*;

    pub(crate) fn cases() -> Vec<Case> {
        let strategy = (size(), size(), size())
            .prop_flat_map(|(a, b, c)| {
                (tensor(vec![a, b, c]), tensor(vec![c]), tensor(vec![c])).prop_map(|(x, w, b)| {
                    instance(vec![x, w, b], |t| t[0].layer_norm(&t[1], &t[2], 1e-5))
                })
            })
            .boxed();
        vec![Case::new("layer_norm", &[Op::LayerNorm], strategy)]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }

    /// Each row comes out with mean b and (biased) standard deviation |w| before the bias,
    /// here checked on a row whose values are far from zero (where a one-pass variance loses
    /// digits).
    #[test]
    fn rows_are_normalised() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(
            vec![1e4f32 + 1.0, 1e4 + 2.0, 1e4 + 3.0, 1e4 + 6.0],
            [1, 4],
            &dev,
        )
        .unwrap();
        let w = Tensor::from_vec(vec![2.0f32; 4], [4], &dev).unwrap();
        let b = Tensor::from_vec(vec![0.5f32; 4], [4], &dev).unwrap();
        let y = x.layer_norm(&w, &b, 0.0).unwrap().to_f64_vec().unwrap();
        // mean 3, deviations -2 -1 0 3, variance 14/4: y = 2 * d / sqrt(3.5) + 0.5.
        let expect = [-2.0, -1.0, 0.0, 3.0].map(|d: f64| 2.0 * d / 3.5f64.sqrt() + 0.5);
        for (a, e) in y.iter().zip(expect) {
            assert!((a - e).abs() < 1e-5, "{a} vs {e}");
        }
        let err = Tensor::zeros([3], DType::F32, &dev)
            .unwrap()
            .layer_norm(&w, &b, 1e-5)
            .unwrap_err();
        assert!(err.to_string().contains("weight [4]"), "{err}");
    }
}
