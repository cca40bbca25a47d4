//! AdamW with f32 state, gradient clipping by global norm, and learning-rate schedules, with
//! PyTorch's and HF Trainer's semantics.

use bft_engine::{Device, Tensor};

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

/// Optimizer state: first and second moments per parameter, in f32, and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    /// State for parameters with these element counts.
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> AdamW {
        AdamW {
            config,
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of every parameter with its gradient at learning rate `lr`.
    pub fn update(
        &mut self,
        params: &mut [&mut Tensor],
        grads: &[Tensor],
        lr: f64,
    ) -> bft_engine::Result<()> {
        assert_eq!(params.len(), self.m.len(), "AdamW: parameter count changed");
        self.step += 1;
        let c = self.config;
        // Bias corrections of the moment estimates.
        let (bc1, bc2) = (
            1.0 - c.beta1.powi(self.step as i32),
            1.0 - c.beta2.powi(self.step as i32),
        );
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let dtype = p.dtype();
            let mut w = p.to_f64_vec()?;
            let g = g.to_f64_vec()?;
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            for j in 0..w.len() {
                w[j] -= lr * c.weight_decay * w[j];
                m[j] = (c.beta1 * m[j] as f64 + (1.0 - c.beta1) * g[j]) as f32;
                v[j] = (c.beta2 * v[j] as f64 + (1.0 - c.beta2) * g[j] * g[j]) as f32;
                let (mh, vh) = (m[j] as f64 / bc1, v[j] as f64 / bc2);
                w[j] -= lr * mh / (vh.sqrt() + c.eps);
            }
            // The update runs on the host; the parameter returns to its device.
            **p = Tensor::from_vec(w, p.dims().to_vec(), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(&p.device())?;
        }
        Ok(())
    }
}

/// The global L2 norm of all gradients, and the gradients scaled down to `max_norm` when they
/// exceed it (PyTorch's `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`). Returns the norm
/// before clipping; a non-finite norm is returned as is and nothing is scaled.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> bft_engine::Result<f64> {
    let mut sq = 0.0;
    for g in grads.iter() {
        sq += g.to_f64_vec()?.iter().map(|x| x * x).sum::<f64>();
    }
    let norm = sq.sqrt();
    if norm.is_finite() && max_norm > 0.0 && norm > max_norm {
        let f = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = g.scale(f)?;
        }
    }
    Ok(norm)
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
            &[4],
        );
        for g in [
            [0.3, -0.2, 1.5, 0.0],
            [-0.1, 0.4, 0.5, 2.0],
            [0.2, 0.2, -3.0, 1.0],
        ] {
            let mut grads = vec![Tensor::from_vec(g.to_vec(), [4], &Device::Cpu).unwrap()];
            clip_grad_norm(&mut grads, 1.0).unwrap();
            opt.update(&mut [&mut p], &grads, 0.1).unwrap();
        }
        // The moments are kept in f32 (the specification), so agreement is to f32 precision.
        for (a, b) in p.to_vec::<f64>().unwrap().iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
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
    fn clipping_returns_the_norm_and_leaves_small_or_nonfinite_gradients_alone() {
        let t = |v: Vec<f64>| Tensor::from_vec(v.clone(), [v.len()], &Device::Cpu).unwrap();
        let mut g = vec![t(vec![3.0, 4.0])];
        assert_eq!(clip_grad_norm(&mut g, 10.0).unwrap(), 5.0);
        assert_eq!(g[0].to_vec::<f64>().unwrap(), vec![3.0, 4.0]);
        let mut g = vec![t(vec![f64::NAN, 1.0])];
        assert!(clip_grad_norm(&mut g, 1.0).unwrap().is_nan());
    }
}
