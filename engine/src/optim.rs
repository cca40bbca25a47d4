//! The optimizer's device work: a fused in-place AdamW step of a parameter and its f32 moments,
//! and the global sum of squares for gradient clipping, on the parameters' own device. Not ops:
//! nothing here is recorded on a tape.

use crate::backend::kernels;
use crate::{DType, Device, Error, Result, Tensor};
pub use bft_kernels::cpu::optim::AdamWStep;

/// Updates `p` and its moments `m`, `v` (f32, the same element count, on `p`'s device) in place
/// from gradient `g`. `p` leaves any tape. 16-bit parameters are updated through f32.
pub fn adamw_step(
    p: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    h: &AdamWStep,
) -> Result<()> {
    const OP: &str = "adamw";
    for (name, t) in [("gradient", g), ("m", &*m), ("v", &*v)] {
        if t.numel() != p.numel() {
            return Err(Error::shape(
                OP,
                format!(
                    "the {name} has {} values, the parameter {}",
                    t.numel(),
                    p.numel()
                ),
            ));
        }
        if t.device() != p.device() {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: p.device(),
                rhs: t.device(),
            });
        }
    }
    for t in [&*m, &*v] {
        if t.dtype() != DType::F32 {
            return Err(Error::DType {
                op: OP,
                got: t.dtype(),
                expected: "f32 moments",
            });
        }
    }
    let g = g.cast_untracked(p.dtype())?;
    if matches!(p.dtype(), DType::BF16 | DType::F16) {
        let dtype = p.dtype();
        let mut p32 = p.cast_untracked(DType::F32)?;
        adamw_step(&mut p32, &g.cast_untracked(DType::F32)?, m, v, h)?;
        *p = p32.cast_untracked(dtype)?;
        return Ok(());
    }
    kernels(p.device()).adamw(p, &g, (m, v), h)
}

/// `sum(t^2)` over all of `ts`, in f64: each device's tensors by its backend, with one read
/// per device for all of them.
pub fn sum_squares(ts: &[Tensor]) -> Result<f64> {
    let mut by_device: Vec<(Device, Vec<Tensor>)> = Vec::new();
    for t in ts {
        match by_device.iter_mut().find(|(d, _)| *d == t.device()) {
            Some((_, list)) => list.push(t.clone()),
            None => by_device.push((t.device(), vec![t.clone()])),
        }
    }
    let mut total = 0.0;
    for (device, list) in by_device {
        total += kernels(device).sum_squares(&list)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    fn step() -> AdamWStep {
        AdamWStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bias1: 0.1,
            bias2: 0.001,
            grad_scale: 1.0,
        }
    }

    #[test]
    fn a_shared_parameter_is_copied_before_the_in_place_update() {
        let dev = Device::Cpu;
        let p0 = Tensor::from_vec(vec![1.0f32, 2.0], [2], &dev).unwrap();
        let mut p = p0.clone();
        let g = Tensor::from_vec(vec![1.0f32, -1.0], [2], &dev).unwrap();
        let (mut m, mut v) = (
            Tensor::zeros([2], DType::F32, &dev).unwrap(),
            Tensor::zeros([2], DType::F32, &dev).unwrap(),
        );
        adamw_step(&mut p, &g, &mut m, &mut v, &step()).unwrap();
        assert_eq!(p0.to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
        let got = p.to_vec::<f32>().unwrap();
        assert!(
            (got[0] - 0.9).abs() < 1e-6 && (got[1] - 2.1).abs() < 1e-6,
            "{got:?}"
        );
        assert_ne!(p.id(), p0.id());
    }

    #[test]
    fn bf16_parameters_update_through_f32_and_bad_moments_are_errors() {
        let dev = Device::Cpu;
        let mut p = Tensor::from_vec(vec![1.0f32, 2.0], [2], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let g = Tensor::from_vec(vec![1.0f32, -1.0], [2], &dev).unwrap();
        let mut m = Tensor::zeros([2], DType::F32, &dev).unwrap();
        let mut v = Tensor::zeros([2], DType::F32, &dev).unwrap();
        adamw_step(&mut p, &g, &mut m, &mut v, &step()).unwrap();
        assert_eq!(p.dtype(), DType::BF16);
        assert_eq!(p.to_f64_vec().unwrap(), vec![0.8984375, 2.09375]);
        let mut short = Tensor::zeros([3], DType::F32, &dev).unwrap();
        let err = adamw_step(&mut p, &g, &mut short, &mut v, &step()).unwrap_err();
        assert!(err.to_string().contains("the m has 3 values"), "{err}");
        let ts = [
            g.clone(),
            Tensor::from_vec(vec![2.0f64], [1], &dev).unwrap(),
        ];
        assert_eq!(sum_squares(&ts).unwrap(), 6.0);
    }
}
