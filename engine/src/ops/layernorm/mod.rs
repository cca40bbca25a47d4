//! LayerNorm over the last axis with a learned gain and bias (BERT's normalisation).

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, in_compute_dtype, same_kind};
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Tensor};

/// The LayerNorm kernels of a backend over `x (rows, C)` with gain and bias `(C)`.
pub(crate) trait LayerNormKernel {
    /// `(y, mean, rstd)`, the statistics `(rows)` saved for the backward.
    fn layer_norm(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)>;
    /// `(dx, Some((dw, db)))`, the parameter gradients only when `need_params`.
    fn layer_norm_backward(
        &self,
        saved: &LayerNormBackward,
        dy: &Tensor,
        need_params: bool,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)>;
}

impl Tensor {
    /// `(x - mean) / sqrt(var + eps) * w + b` over the last axis, the variance biased as in
    /// PyTorch; `w` and `b` are `(C)`. Row statistics are accumulated in f64 on the CPU and in f32 on devices.
    pub fn layer_norm(&self, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::LayerNorm, crate::profile::Phase::Forward);
        if let Some(out) = in_compute_dtype(&[self, w, b], |t| t[0].layer_norm(&t[1], &t[2], eps))?
        {
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
        let (out, mean, rstd) = kernels(self.device()).layer_norm(self, w, b, eps)?;
        Tape::record(Op::LayerNorm, &[self, w, b], out, || LayerNormBackward {
            x: self.stop_gradient(),
            w: w.stop_gradient(),
            mean,
            rstd,
        })
    }
}

pub(crate) struct LayerNormBackward {
    x: Tensor,
    w: Tensor,
    /// `(rows)`: each row's mean and 1 / std, so the backward pass need not recompute them.
    mean: Tensor,
    rstd: Tensor,
}

impl Backward for LayerNormBackward {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (dx, dwb) = kernels(g.device()).layer_norm_backward(self, g, needs[1] || needs[2])?;
        let (dw, db) = dwb.map_or((None, None), |(w, b)| (Some(w), Some(b)));
        Ok(vec![
            Some(dx),
            dw.filter(|_| needs[1]),
            db.filter(|_| needs[2]),
        ])
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
