//! Element-type conversion; the gradient converts back.

mod cpu;
mod cuda;
mod wgpu;

use super::Op;
use crate::tape::{Backward, Tape};
use crate::{DType, Error, Result, Tensor};

/// The element-type conversion of a backend, untracked (`Tensor::cast_untracked` records
/// nothing; `to_dtype` records the op).
pub(crate) trait CastKernel {
    /// `x` converted to `dtype` (another type than its own) on its device, or `None` when the
    /// backend has no kernel for the pair: the conversion then goes through the host.
    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Option<Tensor>>;
}

/// The 16-bit type of `d`, if it is one.
fn half(d: DType) -> Option<bft_kernels::Half> {
    match d {
        DType::F16 => Some(bft_kernels::Half::F16),
        DType::BF16 => Some(bft_kernels::Half::BF16),
        _ => None,
    }
}

/// Whether both types are among f32, f16 and bf16 (the casts devices convert themselves).
fn device_pair(from: DType, to: DType) -> bool {
    let float = |d: DType| matches!(d, DType::F32 | DType::F16 | DType::BF16);
    float(from) && float(to) && from != to
}

impl Tensor {
    /// Converts to `dtype` (rounding to nearest for 16-bit floats). Float-to-float casts are
    /// differentiable; casting to or from U32 is not.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Cast, crate::profile::Phase::Forward);
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        if self.is_tracked() && (dtype == DType::U32 || self.dtype() == DType::U32) {
            return Err(Error::NotDifferentiable {
                op: "to_dtype",
                input: "an integer cast",
            });
        }
        let out = self.cast_untracked(dtype)?;
        Tape::record(Op::Cast, &[self], out, || CastBackward(self.dtype()))
    }
}

struct CastBackward(DType);

impl Backward for CastBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.to_dtype(self.0)?)])
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
        // Through f32 the perturbation must stay far above f32 resolution (~1e-7 relative):
        // a 1e-2 step, with a tolerance that covers its O(eps^2) truncation error.
        let strategy = (size(), size())
            .prop_flat_map(|(a, b)| {
                tensor(vec![a, b]).prop_map(|t| {
                    instance(vec![t], |x| {
                        x[0].to_dtype(DType::F32)?.exp()?.to_dtype(DType::F64)
                    })
                })
            })
            .boxed();
        let tol = crate::gradcheck::Tolerance {
            eps: 1e-2,
            atol: 1e-4,
            rtol: 1e-3,
        };
        vec![Case {
            tol,
            ..Case::new("cast", &[Op::Cast], strategy)
        }]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }

    #[test]
    fn cast_gradient_is_identity_through_bf16() {
        // d/dx sum(cast(x)) = 1 exactly, whatever the rounding of the forward values.
        let x = Tensor::from_vec(vec![0.3f64, -1.2, 2.5], [3], &Device::Cpu).unwrap();
        let tape = crate::Tape::new();
        let xt = tape.track(&x);
        let y = xt
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(y.dtype(), DType::F32);
        let g = tape.backward(&y).unwrap();
        assert_eq!(
            g.get(&xt).unwrap().to_vec::<f64>().unwrap(),
            vec![1.0, 1.0, 1.0]
        );
    }

    #[test]
    fn half_storage_computes_in_f32_and_keeps_its_dtype() {
        let dev = Device::Cpu;
        let a = Tensor::from_vec(vec![1.5f32, -2.0, 0.25, 4.0], [2, 2], &dev).unwrap();
        for dt in [DType::BF16, DType::F16] {
            let h = a.to_dtype(dt).unwrap();
            let p = h.matmul(&h).unwrap();
            assert_eq!(p.dtype(), dt);
            assert_eq!(p.to_f64_vec().unwrap(), vec![1.75, -11.0, 1.375, 15.5]);
        }
    }
}
