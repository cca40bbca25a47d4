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
    /// The forward rotation written over `x`'s own buffer, which `x` owns alone, returning a
    /// tensor on that buffer; `None` (the default) when the backend has no in-place kernel
    /// for these inputs, and the caller rotates a copy.
    fn rope_in_place(
        &self,
        _x: &mut Tensor,
        _cos: &Tensor,
        _sin: &Tensor,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
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
        self.check_rope(cos, sin)?;
        let out = kernels(self.device()).rope(self, cos, sin, false)?;
        Tape::record(Op::Rope, &[self, cos, sin], out, || RopeBackward {
            cos: cos.stop_gradient(),
            sin: sin.stop_gradient(),
        })
    }

    /// `rope`, consuming `self`: where the backend has an in-place kernel and `self` owns its
    /// storage alone (a fresh projection does), the rotation overwrites that buffer instead of
    /// a copy. Recorded as `Rope`, whose backward needs only the tables, so nothing the tape
    /// keeps sees the overwrite (a saved copy would share the storage, and then `self` does
    /// not own it alone).
    pub fn rope_in_place(mut self, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Rope, crate::profile::Phase::Forward);
        if self.dtype() == cos.dtype() && self.dtype() == sin.dtype() {
            self.check_rope(cos, sin)?;
            if let Some(out) = kernels(self.device()).rope_in_place(&mut self, cos, sin)? {
                return Tape::record(Op::Rope, &[&self, cos, sin], out, || RopeBackward {
                    cos: cos.stop_gradient(),
                    sin: sin.stop_gradient(),
                });
            }
        }
        self.rope(cos, sin)
    }

    /// The checks of `rope` on inputs of one type.
    fn check_rope(&self, cos: &Tensor, sin: &Tensor) -> Result<()> {
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
        Ok(())
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

    /// The consuming form rotates like `rope` and records the same gradient, whether or not
    /// the input's storage is shared.
    #[test]
    fn rope_in_place_equals_rope() {
        use crate::Tape;
        let dev = Device::Cpu;
        let x = Tensor::randn([2, 3, 4, 6], 1.0, 7, DType::F64, &dev).unwrap();
        let (c, s) = rope_tables(10_000.0, 6, 4, 2, DType::F64).unwrap();
        let before = x.to_vec::<f64>().unwrap();
        let want = x.rope(&c, &s).unwrap().to_vec::<f64>().unwrap();
        let shared = x.clone().rope_in_place(&c, &s).unwrap();
        assert_eq!(shared.to_vec::<f64>().unwrap(), want);
        assert_eq!(
            x.to_vec::<f64>().unwrap(),
            before,
            "a shared input must not be overwritten"
        );
        let tape = Tape::new();
        let xt = tape.track(&x);
        let y = xt.scale(2.0).unwrap().rope_in_place(&c, &s).unwrap();
        let g = tape.backward(&y.sum_all().unwrap()).unwrap();
        let tape2 = Tape::new();
        let xt2 = tape2.track(&x);
        let y2 = xt2.scale(2.0).unwrap().rope(&c, &s).unwrap();
        let g2 = tape2.backward(&y2.sum_all().unwrap()).unwrap();
        let grad = |g: &crate::Gradients, t: &Tensor| g.get(t).unwrap().to_vec::<f64>().unwrap();
        assert_eq!(grad(&g, &xt), grad(&g2, &xt2));
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
