//! AdamW with f32 state, gradient clipping by global norm, and learning-rate schedules, with
//! PyTorch's and HF Trainer's semantics.

use bft_engine::optim::{AdamWStep, adamw_step, sum_squares};
use bft_engine::{DType, Tensor};

/// AdamW hyper-parameters (PyTorch's defaults but for the learning rate).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied as `p -= lr * wd * p` before the Adam update.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Optimizer state: first and second moments per parameter, f32 tensors on the parameter's
/// device, and the step count.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    /// Zero state for `params`, each moment on its parameter's device.
    pub fn new(config: AdamWConfig, params: &[&Tensor]) -> bft_engine::Result<AdamW> {
        let zeros = || -> bft_engine::Result<Vec<Tensor>> {
            params
                .iter()
                .map(|p| Tensor::zeros([p.numel()], DType::F32, &p.device()))
                .collect()
        };
        Ok(AdamW {
            config,
            step: 0,
            m: zeros()?,
            v: zeros()?,
        })
    }

    /// One fused update of every parameter, in place on its device, from its gradient times
    /// `grad_scale` (the clipping factor) at learning rate `lr`.
    pub fn update(
        &mut self,
        params: &mut [&mut Tensor],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> bft_engine::Result<()> {
        if params.len() != self.m.len() || grads.len() != params.len() {
            return Err(bft_engine::Error::Shape {
                op: "AdamW update",
                msg: format!(
                    "the optimizer holds state for {} parameters, but was given {} parameters and {} gradients",
                    self.m.len(),
                    params.len(),
                    grads.len()
                ),
            });
        }
        self.step += 1;
        let c = self.config;
        let h = AdamWStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            bias1: 1.0 - c.beta1.powi(self.step as i32),
            bias2: 1.0 - c.beta2.powi(self.step as i32),
            grad_scale,
        };
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            adamw_step(p, g, &mut self.m[i], &mut self.v[i], &h)?;
        }
        Ok(())
    }
}

/// The global L2 norm of all gradients (one read per device).
pub fn grad_norm(grads: &[Tensor]) -> bft_engine::Result<f64> {
    Ok(sum_squares(grads)?.sqrt())
}

/// PyTorch's `clip_grad_norm_` as a factor for the gradients: `max_norm / (norm + 1e-6)` when
/// the norm exceeds `max_norm`, else 1; a non-finite norm scales nothing.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if norm.is_finite() && max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// How the learning rate decays after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

/// HF Trainer's schedules: linear warm-up from 0, then cosine, linear or constant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let progress = (step - self.warmup_steps) as f64
            / self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let factor = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - progress,
            Decay::Constant => 1.0,
        };
        self.base_lr * factor.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bft_engine::Device;

    #[test]
    fn adamw_with_clipping_matches_pytorch() {
        // torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01) with
        // clip_grad_norm_(max_norm=1.0) before each of 3 steps, in float64:
        let want = [
            0.29721571234,
            -0.955570612191,
            1.808882099431,
            -0.149031133513,
        ];
        let mut p = Tensor::from_vec(vec![0.5f64, -1.0, 2.0, 0.0], [4], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            AdamWConfig {
                weight_decay: 0.01,
                ..Default::default()
            },
            &[&p],
        )
        .unwrap();
        for g in [
            [0.3, -0.2, 1.5, 0.0],
            [-0.1, 0.4, 0.5, 2.0],
            [0.2, 0.2, -3.0, 1.0],
        ] {
            let grads = vec![Tensor::from_vec(g.to_vec(), [4], &Device::Cpu).unwrap()];
            let f = clip_factor(grad_norm(&grads).unwrap(), 1.0);
            opt.update(&mut [&mut p], &grads, 0.1, f).unwrap();
        }
        // The moments are kept in f32 (the specification), so agreement is to f32 precision.
        for (a, b) in p.to_vec::<f64>().unwrap().iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(opt.step, 3);
        // A parameter list that does not match the state is an error, and takes no step.
        let mut q = p.clone();
        let g = Tensor::zeros([4], DType::F64, &Device::Cpu).unwrap();
        let err = opt
            .update(&mut [&mut p, &mut q], &[g.clone(), g], 0.1, 1.0)
            .unwrap_err();
        assert!(err.to_string().contains("state for 1 parameters"), "{err}");
        assert_eq!(opt.step, 3);
    }

    #[test]
    fn schedules_warm_up_then_decay_like_hf() {
        let s = Schedule {
            base_lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            decay: Decay::Cosine,
        };
        assert_eq!((s.lr(0), s.lr(5), s.lr(10)), (0.0, 0.5, 1.0));
        assert!((s.lr(60) - 0.5).abs() < 1e-12 && s.lr(110).abs() < 1e-12);
        let l = Schedule {
            decay: Decay::Linear,
            ..s
        };
        assert!((l.lr(60) - 0.5).abs() < 1e-12 && (l.lr(85) - 0.25).abs() < 1e-12);
        assert_eq!(
            Schedule {
                decay: Decay::Constant,
                ..s
            }
            .lr(100),
            1.0
        );
    }

    #[test]
    fn clipping_scales_only_finite_norms_beyond_the_limit() {
        let t = |v: Vec<f64>| Tensor::from_vec(v.clone(), [v.len()], &Device::Cpu).unwrap();
        let norm = grad_norm(&[t(vec![3.0, 4.0]), t(vec![12.0])]).unwrap();
        assert_eq!(norm, 13.0);
        assert_eq!(clip_factor(norm, 20.0), 1.0);
        assert!((clip_factor(norm, 1.0) - 1.0 / (13.0 + 1e-6)).abs() < 1e-15);
        let nan = grad_norm(&[t(vec![f64::NAN, 1.0])]).unwrap();
        assert!(nan.is_nan() && clip_factor(nan, 1.0) == 1.0);
    }
}
