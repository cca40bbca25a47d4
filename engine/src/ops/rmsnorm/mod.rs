//! RMSNorm over the last axis with a learned per-channel weight.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, in_compute_dtype, same_kind};
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Tensor};

/// The RMSNorm kernels of a backend over `x (rows, C)` (any leading shape) and `w (C)`.
pub(crate) trait RmsNormKernel {
    /// `(y, rstd)`: the normalised rows and each row's `1 / rms` `(rows)`, saved for the
    /// backward so it need not recompute them.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)>;
    /// `(dx, dw)`, with `dw` only when `need_dw`.
    fn rms_norm_backward(
        &self,
        saved: &RmsNormBackward,
        dy: &Tensor,
        need_dw: bool,
    ) -> Result<(Tensor, Option<Tensor>)>;
    /// `(h, y, rstd)` for `h = x + delta` and the `(y, rstd)` of `rms_norm(h)` in one pass,
    /// for inputs of one type and shape that the backend has a fused kernel for; `None` (the
    /// default) sends the caller to the two ops.
    fn add_rms_norm(
        &self,
        _x: &Tensor,
        _delta: &Tensor,
        _w: &Tensor,
        _eps: f64,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        Ok(None)
    }
}

impl Tensor {
    /// `x * w / sqrt(mean(x^2) + eps)` over the last axis; `w` is `(C)`. The row statistic is
    /// accumulated in f64 on the CPU and in f32 on devices, whatever the dtype.
    pub fn rms_norm(&self, w: &Tensor, eps: f64) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::RmsNorm, crate::profile::Phase::Forward);
        if let Some(out) = in_compute_dtype(&[self, w], |t| t[0].rms_norm(&t[1], eps))? {
            return Ok(out);
        }
        same_kind("rms_norm", self, w)?;
        let c = self.shape().last();
        if w.dims() != [c] {
            return Err(Error::shape(
                "rms_norm",
                format!(
                    "weight {} does not match the last axis of {}",
                    w.shape(),
                    self.shape()
                ),
            ));
        }
        let (out, rstd) = kernels(self.device()).rms_norm(self, w, eps)?;
        Tape::record(Op::RmsNorm, &[self, w], out, || RmsNormBackward {
            x: self.stop_gradient(),
            w: w.stop_gradient(),
            rstd,
        })
    }
}

impl Tensor {
    /// `(h, rms_norm(h, w))` with `h = self + delta` of the same shape: a block's residual
    /// stream and its norm. Recorded as the Add and the RmsNorm it stands for, so gradients are
    /// those of the two ops; a backend with a fused kernel (CUDA in bf16, the CPU in f32 and
    /// f64) writes both in one pass over the rows. A frozen 16-bit weight beside wider
    /// activations is widened first, as the two-op path widens it.
    pub fn add_rms_norm(&self, delta: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        let _profiled = crate::profile::scope(Op::RmsNorm, crate::profile::Phase::Forward);
        let k = kernels(self.device());
        let alike = |t: &Tensor| t.dtype() == self.dtype() && t.device() == self.device();
        // The weight may be a frozen 16-bit one beside wider activations (autocast), which a
        // kernel widens as the two-op path would.
        let weight_fits = w.device() == self.device()
            && (w.dtype() == self.dtype() || (w.dtype().is_half() && !w.is_tracked()));
        let fusable = delta.shape() == self.shape()
            && alike(delta)
            && weight_fits
            && w.dims() == [self.shape().last()]
            && k.compute_dtype(self.dtype()) == self.dtype();
        if fusable {
            let wide = w.stop_gradient().to_dtype(self.dtype())?;
            if let Some((h, y, rstd)) = k.add_rms_norm(self, delta, &wide, eps)? {
                let h = super::binary::record_add(self, delta, h)?;
                let y = Tape::record(Op::RmsNorm, &[&h, w], y, || RmsNormBackward {
                    x: h.stop_gradient(),
                    w: wide,
                    rstd,
                })?;
                return Ok((h, y));
            }
        }
        let h = self.add(delta)?;
        let y = h.rms_norm(w, eps)?;
        Ok((h, y))
    }
}

/// What the forward saves.
pub(crate) struct RmsNormBackward {
    x: Tensor,
    w: Tensor,
    /// `(rows)`: 1 / rms of each row.
    rstd: Tensor,
}

impl Backward for RmsNormBackward {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (dx, dw) = kernels(g.device()).rms_norm_backward(self, g, needs[1])?;
        Ok(vec![Some(dx), dw])
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::Op;
    use proptest::prelude::*;

    pub(crate) fn cases() -> Vec<Case> {
        let strategy = (size(), size(), size())
            .prop_flat_map(|(a, b, c)| {
                (tensor(vec![a, b, c]), tensor(vec![c]))
                    .prop_map(|(x, w)| instance(vec![x, w], |t| t[0].rms_norm(&t[1], 1e-5)))
            })
            .boxed();
        // The fused residual form: both outputs reach the loss, so both paths carry gradient.
        let fused = (size(), size())
            .prop_flat_map(|(a, c)| {
                (tensor(vec![a, c]), tensor(vec![a, c]), tensor(vec![c])).prop_map(|(x, d, w)| {
                    instance(vec![x, d, w], |t| {
                        let (h, y) = t[0].add_rms_norm(&t[1], &t[2], 1e-5)?;
                        h.scale(0.5)?.add(&y)
                    })
                })
            })
            .boxed();
        vec![
            Case::new("rms_norm", &[Op::RmsNorm], strategy),
            Case::new("add_rms_norm", &[Op::Add, Op::RmsNorm], fused),
        ]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }

    /// The fused op is the two ops it stands for, value for value, on every backend here.
    #[test]
    fn add_rms_norm_equals_add_then_rms_norm() {
        use crate::{DType, Device, Tensor};
        let mut devices = vec![Device::Cpu];
        if !Device::wgpu_adapters().is_empty() {
            devices.push(Device::Wgpu(0));
        }
        for dev in devices {
            let x = Tensor::randn([3, 5, 8], 1.0, 1, DType::F32, &dev).unwrap();
            let d = Tensor::randn([3, 5, 8], 1.0, 2, DType::F32, &dev).unwrap();
            let w = Tensor::randn([8], 1.0, 3, DType::F32, &dev).unwrap();
            // An f32 weight, and a frozen bf16 one beside f32 activations (autocast).
            for w in [w.clone(), w.to_dtype(DType::BF16).unwrap()] {
                let (h, y) = x.add_rms_norm(&d, &w, 1e-6).unwrap();
                let h2 = x.add(&d).unwrap();
                let y2 = h2.rms_norm(&w, 1e-6).unwrap();
                let v = |t: &Tensor| t.to_vec::<f32>().unwrap();
                assert_eq!(v(&h), v(&h2), "{dev} {:?}", w.dtype());
                assert_eq!(v(&y), v(&y2), "{dev} {:?}", w.dtype());
            }
        }
    }
}
