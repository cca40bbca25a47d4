//! The weights on CUDA (`kernels/cuda/loss.cu`): `sample_weights` (group confidence and `s_b`),
//! `token_coef` and `sample_sums`, on f32 log-probs.

use super::{WeighKernel, Weighing, Weights};
use crate::backend::{Cuda, cbuf, cuda_of};
use crate::{DType, Result, Tensor};
use bft_kernels::cuda::ops;

impl WeighKernel for Cuda {
    fn weigh_samples(&self, logp: &Tensor, starts: &[u32], w: Weighing) -> Result<Weights> {
        let (dev, i) = cuda_of(logp)?;
        let lp = logp.cast_untracked(DType::F32)?;
        let lpd = cbuf("weigh_samples", &lp, DType::F32)?;
        let (batch, n) = (starts.len() - 1, logp.numel());
        let offsets = dev.upload(bytemuck::cast_slice(starts))?;
        let sample_of: Vec<u32> = (0..batch as u32)
            .flat_map(|b| {
                std::iter::repeat_n(b, (starts[b as usize + 1] - starts[b as usize]) as usize)
            })
            .collect();
        let sample_of = dev.upload(bytemuck::cast_slice(&sample_of))?;
        let gamma = w.gamma.unwrap_or(1.0) as f32;
        let (p_conf, s_b) = ops::sample_weights(
            &dev,
            lpd,
            &offsets,
            (batch, n),
            (w.window, w.geometric, gamma),
        )?;
        // Without a sample weight every sample weighs 1.
        let s_b = match w.gamma {
            Some(_) => s_b,
            None => dev.upload(bytemuck::cast_slice(&vec![1.0f32; batch]))?,
        };
        let (token_weight, floor) = (w.token_floor.is_some(), w.token_floor.unwrap_or(0.0) as f32);
        let coef = ops::token_coef(
            &dev,
            lpd,
            &sample_of,
            &offsets,
            &s_b,
            (n, w.denom as f32),
            token_weight,
            floor,
        )?;
        let sums = ops::sample_sums(&dev, lpd, &offsets, batch, token_weight, floor)?;
        let t = |b, shape: Vec<usize>| {
            Tensor::from_cuda(b, DType::F32, i, shape).cast_untracked(logp.dtype())
        };
        Ok(Weights {
            coef: t(coef, vec![n])?,
            s_b: t(s_b, vec![batch])?,
            p_conf: t(p_conf, vec![batch])?,
            sums: t(sums, vec![batch, 3])?,
        })
    }
}
