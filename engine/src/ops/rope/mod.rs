//! Rotary position embedding (HF's rotate-half convention) from precomputed tables.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, in_compute_dtype, same_kind};
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{DType, Device, Error, Result, Tensor};
use bft_kernels::cpu::rope::{default_inv_freq, rope_tables as tables};

/// The rotary kernel of a backend: `x (..., T, D)` rotated by `cos, sin (T, D/2)` of its type,
/// or by the inverse rotation (the backward).
pub(crate) trait RopeKernel {
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor>;
}

/// `(cos, sin)`, each `(t, head_dim / 2)`, for positions `offset..offset + t` with the standard
/// inverse frequencies `theta^(-2i/d)`. Scaled variants (llama3) pass their own frequencies to
/// `rope_tables_from`.
pub fn rope_tables(
    theta: f64,
    head_dim: usize,
    t: usize,
    offset: usize,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    rope_tables_from(&default_inv_freq(theta, head_dim), t, offset, dtype)
}

/// Tables from explicit inverse frequencies (`head_dim / 2` of them).
pub fn rope_tables_from(
    inv_freq: &[f64],
    t: usize,
    offset: usize,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let (c, s) = tables(inv_freq, t, offset);
    let h = inv_freq.len();
    let cos = Tensor::from_vec(c, [t, h], &Device::Cpu)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(s, [t, h], &Device::Cpu)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

impl Tensor {
    /// Rotates `self (..., T, D)` by position: `cos, sin` are `(T, D/2)` constants.
    pub fn rope(&self, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Rope, crate::profile::Phase::Forward);
        if let Some(out) = in_compute_dtype(&[self, cos, sin], |t| t[0].rope(&t[1], &t[2]))? {
            return Ok(out);
        }
        same_kind("rope", self, cos)?;
        same_kind("rope", self, sin)?;
        if cos.is_tracked() || sin.is_tracked() {
            return Err(Error::NotDifferentiable {
                op: "rope",
                input: "cos/sin tables",
            });
        }
        let r = self.rank();
        if r < 2 || !self.dims()[r - 1].is_multiple_of(2) {
            return Err(Error::shape(
                "rope",
                format!(
                    "input must be (..., T, D) with even D, got {}",
                    self.shape()
                ),
            ));
        }
        let (t, d) = (self.dims()[r - 2], self.dims()[r - 1]);
        if cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
            return Err(Error::shape(
                "rope",
                format!(
                    "tables {} / {} do not match (T, D/2) = ({t}, {})",
                    cos.shape(),
                    sin.shape(),
                    d / 2
                ),
            ));
        }
        let out = kernels(self.device()).rope(self, cos, sin, false)?;
        Tape::record(Op::Rope, &[self, cos, sin], out, || RopeBackward {
            cos: cos.stop_gradient(),
            sin: sin.stop_gradient(),
        })
    }
}

struct RopeBackward {
    cos: Tensor,
    sin: Tensor,
}

impl Backward for RopeBackward {
    /// A rotation's gradient is the inverse rotation of the output gradient.
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![
            Some(kernels(g.device()).rope(g, &self.cos, &self.sin, true)?),
            None,
            None,
        ])
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::rope_tables;
    use crate::{DType, Device, Op, Tensor};
    use proptest::prelude::*;

    pub(crate) fn cases() -> Vec<Case> {
        let strategy = (size(), size(), 1usize..4, 0usize..5)
            .prop_flat_map(|(h, t, half, offset)| {
                tensor(vec![2, h, t, 2 * half]).prop_map(move |x| {
                    let (c, s) = rope_tables(10_000.0, 2 * half, t, offset, DType::F64).unwrap();
                    instance(vec![x], move |v| v[0].rope(&c, &s))
                })
            })
            .boxed();
        vec![Case::new("rope", &[Op::Rope], strategy)]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }

    #[test]
    fn matches_rotate_half_by_hand() {
        // One head, D = 4, position 1, theta = 100: inv_freq = [1, 0.1].
        let x = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0], [1, 4], &Device::Cpu).unwrap();
        let (c, s) = rope_tables(100.0, 4, 1, 1, DType::F64).unwrap();
        let y = x.rope(&c, &s).unwrap().to_vec::<f64>().unwrap();
        let (c0, s0, c1, s1) = (1f64.cos(), 1f64.sin(), 0.1f64.cos(), 0.1f64.sin());
        let want = [
            1.0 * c0 - 3.0 * s0,
            2.0 * c1 - 4.0 * s1,
            3.0 * c0 + 1.0 * s0,
            4.0 * c1 + 2.0 * s1,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}
