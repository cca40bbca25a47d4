//! A loss's weights from its tokens' log-probs, computed where the log-probs are (DESIGN.md §5):
//! BFT's group confidence and sample weight, DFT's token weights, each token's coefficient, and
//! the per-sample sums the statistics are made of. Not differentiable: the weights are the
//! constants (`sg(...)`) of the loss. The host computes them for the CPU and for wgpu (a read
//! of the log-probs and an upload of the results); CUDA has kernels, so a training step reads
//! back only per-sample numbers.

mod cpu;
mod cuda;
mod wgpu;

use crate::backend::kernels;
use crate::{DType, Error, Result, Tensor};
pub use bft_kernels::cpu::weights::{Weighing, weakest_window};

/// What [`Tensor::weigh_samples`] gives, on the log-probs' device and in their float type.
#[derive(Debug)]
pub struct Weights {
    /// `(n)`: each token's coefficient `a_t = s_b w_t / (denom (n_b + 1e-8))`.
    pub coef: Tensor,
    /// `(B)`: each sample's weight `s_b` (1 for a sample without tokens).
    pub s_b: Tensor,
    /// `(B)`: each sample's group confidence (1 for a sample without tokens).
    pub p_conf: Tensor,
    /// `(B, 3)`: per sample, the sums of `log c_t`, `w_t log c_t` and `w_t` over its tokens.
    pub sums: Tensor,
}

/// The weighing kernel of a backend. The default reads the log-probs to the host, weighs them
/// there and puts the results back on their device.
pub(crate) trait WeighKernel {
    fn weigh_samples(&self, logp: &Tensor, starts: &[u32], w: Weighing) -> Result<Weights> {
        let device = logp.device();
        let host = weigh_on_host(&logp.to_device(&crate::Device::Cpu)?, starts, w)?;
        let back = |t: Tensor| t.to_device(&device);
        Ok(Weights {
            coef: back(host.coef)?,
            s_b: back(host.s_b)?,
            p_conf: back(host.p_conf)?,
            sums: back(host.sums)?,
        })
    }
}

impl Tensor {
    /// Weighs B samples whose valid tokens' log-probs `self (n)` lie end to end, sample `b`'s
    /// at `starts[b]..starts[b + 1]` (`starts` has B + 1 entries, from 0 to n, never
    /// decreasing). The results stay on `self`'s device.
    pub fn weigh_samples(&self, starts: &[u32], w: Weighing) -> Result<Weights> {
        const OP: &str = "weigh_samples";
        if self.is_tracked() {
            return Err(Error::NotDifferentiable {
                op: OP,
                input: "log-probs (weights are constants: stop the gradient first)",
            });
        }
        if self.rank() != 1 || !self.dtype().is_float() {
            return Err(Error::shape(
                OP,
                format!(
                    "need float log-probs (n), got {} {:?}",
                    self.shape(),
                    self.dtype()
                ),
            ));
        }
        let n = self.numel();
        let ordered = starts.windows(2).all(|p| p[0] <= p[1]);
        if starts.first() != Some(&0) || starts.last().map(|&e| e as usize) != Some(n) || !ordered {
            return Err(Error::shape(
                OP,
                format!("sample starts must run from 0 to {n} without decreasing"),
            ));
        }
        if w.window == 0 || !w.denom.is_finite() || w.denom <= 0.0 {
            return Err(Error::shape(
                OP,
                format!(
                    "window {} and denominator {} must be positive",
                    w.window, w.denom
                ),
            ));
        }
        kernels(self.device()).weigh_samples(self, starts, w)
    }
}

/// The weights of host log-probs, in their float type.
fn weigh_on_host(logp: &Tensor, starts: &[u32], w: Weighing) -> Result<Weights> {
    let out = bft_kernels::cpu::weights::weigh(&logp.to_f64_vec()?, starts, w);
    let batch = starts.len() - 1;
    let t = |v: Vec<f64>, shape: Vec<usize>| -> Result<Tensor> {
        let host = Tensor::from_vec(v, shape, &crate::Device::Cpu)?;
        match logp.dtype() {
            DType::F64 => Ok(host),
            d => host.to_dtype(d),
        }
    };
    Ok(Weights {
        coef: t(out.coef, vec![logp.numel()])?,
        s_b: t(out.s_b, vec![batch])?,
        p_conf: t(out.p_conf, vec![batch])?,
        sums: t(out.sums, vec![batch, 3])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    /// On every backend here the results are the host's, in the log-probs' type and device
    /// (CUDA's kernels compute in f32: within 1e-5).
    #[test]
    fn weights_match_the_host_on_every_backend() {
        let lp: Vec<f32> = (0..37).map(|i| -0.05 * ((i * 7 % 11) as f32)).collect();
        let starts = [0u32, 5, 5, 37];
        let w = Weighing {
            window: 4,
            geometric: false,
            gamma: Some(2.0),
            token_floor: Some(0.3),
            denom: 6.0,
        };
        let want = bft_kernels::cpu::weights::weigh(
            &lp.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &starts,
            w,
        );
        let mut devices = vec![Device::Cpu];
        if !Device::wgpu_adapters().is_empty() {
            devices.push(Device::Wgpu(0));
        }
        if Device::cuda_devices().is_ok_and(|d| !d.is_empty()) {
            devices.push(Device::Cuda(0));
        }
        for dev in devices {
            let tol = if matches!(dev, Device::Cuda(_)) {
                1e-5
            } else {
                1e-6
            };
            let t = Tensor::from_vec(lp.clone(), [37], &dev).unwrap();
            let got = t.weigh_samples(&starts, w).unwrap();
            assert_eq!(got.coef.device(), dev);
            let v = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_f64_vec().unwrap();
            let close = |a: Vec<f64>, b: &[f64]| {
                a.iter()
                    .zip(b)
                    .all(|(x, y)| (x - y).abs() <= tol * y.abs().max(1e-6))
            };
            assert!(close(v(&got.coef), &want.coef), "{dev}");
            assert!(close(v(&got.s_b), &want.s_b), "{dev}");
            assert!(close(v(&got.p_conf), &want.p_conf), "{dev}");
            assert!(close(v(&got.sums), &want.sums), "{dev}");
        }
        let t = Tensor::from_vec(lp, [37], &Device::Cpu).unwrap();
        let err = t.weigh_samples(&[0, 40], w).unwrap_err().to_string();
        assert!(err.contains("from 0 to 37"), "{err}");
    }
}
