//! Batched matrix product with optionally transposed operands.

use super::{Op, float_dispatch, same_kind, wbuf, wgpu_of};
use crate::DType;
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Tensor};
use bft_kernels::cpu::matmul::{GemmDims, Operand, matmul};

impl Tensor {
    /// `self (..., M, K) . rhs (..., K, N)`; `rhs` may be 2-D and shared by every batch.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.matmul_t(rhs, false, false)
    }

    /// `op(self) . op(rhs)` where `op` transposes the last two axes when its flag is set, at
    /// no cost (the GEMM reads with swapped strides). A linear layer with weight `(out, in)` is
    /// `x.matmul_t(&w, false, true)`. Batch axes must match, or `rhs` is 2-D and `self` is
    /// not transposed (then the batch folds into M: one large GEMM).
    pub fn matmul_t(&self, rhs: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::MatMul, crate::profile::Phase::Forward);
        let (ad, bd) = (self.dims(), rhs.dims());
        if ad.len() < 2 || bd.len() < 2 {
            return Err(Error::shape(
                "matmul",
                format!("operands need rank >= 2, got {ad:?} and {bd:?}"),
            ));
        }
        if ad.len() > 2 && bd.len() == 2 {
            if ta {
                return Err(Error::shape(
                    "matmul",
                    "a transposed batched lhs cannot share a 2-D rhs",
                ));
            }
            let k = ad[ad.len() - 1];
            let rows = self.numel() / k.max(1);
            let out = self.reshape([rows, k])?.matmul_t(rhs, false, tb)?;
            let mut dims = ad[..ad.len() - 1].to_vec();
            dims.push(out.dims()[1]);
            return out.reshape(dims);
        }
        if let Some(half) = [self, rhs].iter().map(|t| t.dtype()).find(|d| d.is_half()) {
            // 16-bit operands: the product runs on transient f32 copies and rounds once, but
            // the tape keeps the 16-bit operands (not f32 copies, as `via_f32` would), so a
            // frozen bf16 weight costs its 16 bits during training.
            let product = match bf16_product(self, rhs, ta, tb)? {
                Some(p) => p,
                None => wide(self)?.matmul_t(&wide(rhs)?, ta, tb)?,
            };
            let out = product.cast_untracked(half)?;
            return Tape::record(Op::MatMul, &[self, rhs], out, || MatMulBackward {
                a: self.stop_gradient(),
                b: rhs.stop_gradient(),
                ta,
                tb,
            });
        }
        same_kind("matmul", self, rhs)?;
        let (dims, out_dims) = gemm_dims(ad, bd, ta, tb)?;
        let GemmDims { m, n, k: ka, .. } = dims;
        let out = if let Some((g, i)) = wgpu_of(self) {
            use bft_kernels::wgpu::ops::{DeviceOperand, matmul as gemm};
            let a = DeviceOperand {
                data: wbuf("matmul", self)?,
                trans: ta,
                batch_stride: m * ka,
            };
            let b = DeviceOperand {
                data: wbuf("matmul", rhs)?,
                trans: tb,
                batch_stride: ka * n,
            };
            Tensor::from_wgpu(gemm(&g, dims, a, b, None)?, DType::F32, i, out_dims)
        } else {
            self.matmul_cpu(rhs, dims, ta, tb, out_dims)?
        };
        Tape::record(Op::MatMul, &[self, rhs], out, || MatMulBackward {
            a: self.stop_gradient(),
            b: rhs.stop_gradient(),
            ta,
            tb,
        })
    }

    fn matmul_cpu(
        &self,
        rhs: &Tensor,
        dims: GemmDims,
        ta: bool,
        tb: bool,
        out_dims: Vec<usize>,
    ) -> Result<Tensor> {
        let GemmDims { batch, m, n, k: ka } = dims;
        float_dispatch!("matmul", self.dtype(), |T| {
            let mut c = vec![T::default(); batch * m * n];
            let a = Operand {
                data: self.cpu::<T>("matmul")?,
                trans: ta,
                batch_stride: m * ka,
            };
            let b = Operand {
                data: rhs.cpu::<T>("matmul")?,
                trans: tb,
                batch_stride: ka * n,
            };
            matmul(dims, a, b, &mut c, false);
            Ok(Tensor::from_cpu(c, out_dims))
        })
    }
}

struct MatMulBackward {
    a: Tensor,
    b: Tensor,
    ta: bool,
    tb: bool,
}

/// The GEMM sizes of `op(a) . op(b)` for operands of dims `ad`, `bd` (same rank, matching
/// batch axes) and the product's dims; errors name both shapes.
fn gemm_dims(ad: &[usize], bd: &[usize], ta: bool, tb: bool) -> Result<(GemmDims, Vec<usize>)> {
    if ad.len() != bd.len() || ad[..ad.len() - 2] != bd[..bd.len() - 2] {
        return Err(Error::shape(
            "matmul",
            format!("batch axes differ: {ad:?} and {bd:?}"),
        ));
    }
    let r = ad.len();
    let (m, ka) = if ta {
        (ad[r - 1], ad[r - 2])
    } else {
        (ad[r - 2], ad[r - 1])
    };
    let (kb, n) = if tb {
        (bd[r - 1], bd[r - 2])
    } else {
        (bd[r - 2], bd[r - 1])
    };
    if ka != kb {
        return Err(Error::shape(
            "matmul",
            format!(
                "inner sizes differ: {ad:?}{} . {bd:?}{}",
                if ta { "^T" } else { "" },
                if tb { "^T" } else { "" }
            ),
        ));
    }
    let batch: usize = ad[..r - 2].iter().product();
    let mut out_dims = ad[..r - 2].to_vec();
    out_dims.extend([m, n]);
    Ok((GemmDims { batch, m, n, k: ka }, out_dims))
}

/// `op(a) . op(b)` in f32 straight from bf16 operands through the AVX512-BF16 kernel (bf16
/// products are exact in f32, so this is the widened product up to summation order), when
/// both are bf16 on the CPU, their batch axes match and the CPU has the instructions; `None`
/// sends the caller to the widening path (which also reports shape errors).
fn bf16_product(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Option<Tensor>> {
    use bft_kernels::cpu::bf16_gemm::{available, matmul_bf16};
    let on_cpu = |t: &Tensor| t.dtype() == DType::BF16 && t.device() == crate::Device::Cpu;
    if !(on_cpu(a) && on_cpu(b) && available()) || a.dims().len() != b.dims().len() {
        return Ok(None);
    }
    let Ok((dims, out_dims)) = gemm_dims(a.dims(), b.dims(), ta, tb) else {
        return Ok(None);
    };
    let GemmDims { batch, m, n, k } = dims;
    let mut c = vec![0f32; batch * m * n];
    let (a_op, b_op) = (
        Operand {
            data: a.cpu::<half::bf16>("matmul")?,
            trans: ta,
            batch_stride: m * k,
        },
        Operand {
            data: b.cpu::<half::bf16>("matmul")?,
            trans: tb,
            batch_stride: k * n,
        },
    );
    if !matmul_bf16(dims, a_op, b_op, &mut c, false) {
        return Ok(None);
    }
    Ok(Some(Tensor::from_cpu(c, out_dims)))
}

/// `t` in f32 when it is 16-bit (an untracked copy), else `t` untracked.
fn wide(t: &Tensor) -> Result<Tensor> {
    if t.dtype().is_half() {
        t.cast_untracked(DType::F32)
    } else {
        Ok(t.stop_gradient())
    }
}

impl Backward for MatMulBackward {
    /// For `C = op(A) op(B)`: `dA = dC op(B)^T` (stored transposed when `ta`), `dB = op(A)^T dC`.
    /// With 16-bit operands the products run in f32 and each gradient rounds once, to its
    /// operand's type: an f32 master weight beside a bf16 activation gets an f32 gradient.
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        // When the gradient and both operands share one 16-bit type, the products below are
        // all 16-bit and take the forward's 16-bit branch (the bf16 kernel or the widening,
        // one rounding), which already gives each gradient its operand's type.
        let one_half_type =
            g.dtype().is_half() && [&self.a, &self.b].iter().all(|t| t.dtype() == g.dtype());
        if !one_half_type && [g, &self.a, &self.b].iter().any(|t| t.dtype().is_half()) {
            let widened = MatMulBackward {
                a: wide(&self.a)?,
                b: wide(&self.b)?,
                ..*self
            };
            let grads = widened.backward(&wide(g)?, needs)?;
            let dtypes = [self.a.dtype(), self.b.dtype()];
            return grads
                .into_iter()
                .zip(dtypes)
                .map(|(d, dt)| d.map(|d| d.cast_untracked(dt)).transpose())
                .collect();
        }
        let (a, b, ta, tb) = (&self.a, &self.b, self.ta, self.tb);
        let da = match (needs[0], ta) {
            (false, _) => None,
            (true, false) => Some(g.matmul_t(b, false, !tb)?),
            (true, true) => Some(b.matmul_t(g, tb, true)?),
        };
        let db = match (needs[1], tb) {
            (false, _) => None,
            (true, false) => Some(a.matmul_t(g, !ta, false)?),
            (true, true) => Some(g.matmul_t(a, true, ta)?),
        };
        Ok(vec![da, db])
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::Op;
    use proptest::prelude::*;

    fn case() -> Case {
        let strategy = (
            size(),
            size(),
            size(),
            1usize..3,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_flat_map(|(m, n, k, batch, ta, tb)| {
                let ad = if ta {
                    vec![batch, k, m]
                } else {
                    vec![batch, m, k]
                };
                let bd = if tb {
                    vec![batch, n, k]
                } else {
                    vec![batch, k, n]
                };
                (tensor(ad), tensor(bd)).prop_map(move |(a, b)| {
                    instance(vec![a, b], move |x| x[0].matmul_t(&x[1], ta, tb))
                })
            })
            .boxed();
        Case::new("matmul", &[Op::MatMul], strategy)
    }

    fn shared_rhs_case() -> Case {
        let strategy = (size(), size(), size(), any::<bool>())
            .prop_flat_map(|(m, n, k, tb)| {
                let bd = if tb { vec![n, k] } else { vec![k, n] };
                (tensor(vec![2, m, k]), tensor(bd)).prop_map(move |(a, b)| {
                    instance(vec![a, b], move |x| x[0].matmul_t(&x[1], false, tb))
                })
            })
            .boxed();
        Case::new(
            "matmul (shared 2-D rhs)",
            &[Op::MatMul, Op::Reshape],
            strategy,
        )
    }

    pub(crate) fn cases() -> Vec<Case> {
        vec![case(), shared_rhs_case()]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }

    /// All-bf16 products (the forward x . W^T and the input gradient dY . W of a frozen bf16
    /// weight, batched and transposed operands too) give the widened f32 GEMM's values up to
    /// the one bf16 rounding both end in: on an AVX512-BF16 CPU they run the bf16 kernel,
    /// elsewhere the widening path, and the two must agree.
    #[test]
    fn all_bf16_products_equal_the_widened_product() {
        use crate::{DType, Device, Tape, Tensor};
        let dev = Device::Cpu;
        let x = Tensor::randn([3, 17, 70], 1.0, 5, DType::BF16, &dev).unwrap();
        let w = Tensor::randn([45, 70], 0.3, 6, DType::BF16, &dev).unwrap();
        let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let close = |got: &Tensor, want: &Tensor| {
            assert_eq!(got.dtype(), DType::BF16);
            let (g, w) = (got.to_f64_vec().unwrap(), want.to_f64_vec().unwrap());
            let scale = w.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            for (a, b) in g.iter().zip(&w) {
                // One bf16 rounding of either side: 2^-8 of the value, plus f32 noise.
                assert!(
                    (a - b).abs() <= b.abs() / 128.0 + 1e-5 * scale,
                    "{a} vs {b}"
                );
            }
        };
        let y = x.matmul_t(&w, false, true).unwrap();
        close(&y, &wide(&x).matmul_t(&wide(&w), false, true).unwrap());
        let t = Tensor::randn([3, 70, 17], 1.0, 7, DType::BF16, &dev).unwrap();
        let v = Tensor::randn([3, 45, 70], 0.3, 8, DType::BF16, &dev).unwrap();
        close(
            &t.matmul_t(&v, true, true).unwrap(),
            &wide(&t).matmul_t(&wide(&v), true, true).unwrap(),
        );
        // The gradient of a tracked bf16 activation through the frozen weight: dY . W.
        let tape = Tape::new();
        let xt = tape.track(&x);
        let loss = xt.matmul_t(&w, false, true).unwrap().sum_all().unwrap();
        let dx = tape.backward(&loss).unwrap().remove(&xt).unwrap();
        let ones = Tensor::ones([3, 17, 45], DType::F32, &dev).unwrap();
        close(&dx, &ones.matmul(&wide(&w)).unwrap());
    }

    /// A bf16 activation times an f32 master weight and a frozen bf16 weight: the values and
    /// gradients are the f64 ones up to bf16 rounding, and each gradient has its operand's type.
    /// (`tests/half_weights_memory.rs` shows the tape keeps the weight in 16 bits.)
    #[test]
    fn sixteen_bit_operands_are_kept_in_16_bits_and_gradients_take_their_operands_type() {
        use crate::{DType, Device, Tape, Tensor};
        let dev = Device::Cpu;
        // A batched activation against 2-D weights (the batch folds into the rows).
        let x64 = Tensor::randn([2, 3, 40], 1.0, 1, DType::F64, &dev).unwrap();
        let a64 = Tensor::randn([40, 8], 0.3, 2, DType::F64, &dev).unwrap();
        let w64 = Tensor::randn([300, 40], 0.3, 3, DType::F64, &dev).unwrap();
        let x16 = x64.to_dtype(DType::BF16).unwrap();
        let w16 = w64.to_dtype(DType::BF16).unwrap();
        // The f64 reference on the same (rounded) values.
        let (xr, wr) = (
            x16.to_dtype(DType::F64).unwrap(),
            w16.to_dtype(DType::F64).unwrap(),
        );
        let reference = |x: &Tensor, a: &Tensor, w: &Tensor| {
            let tape = Tape::new();
            let (x, a) = (tape.track(x), tape.track(a));
            let y = x.matmul(&a).unwrap().sum_all().unwrap();
            let z = x.matmul_t(w, false, true).unwrap().sum_all().unwrap();
            let g = tape.backward(&y.add(&z).unwrap()).unwrap();
            (
                g.get(&x).unwrap().to_f64_vec().unwrap(),
                g.get(&a).unwrap().clone(),
            )
        };
        let (dx_ref, da_ref) = reference(&xr, &a64, &wr);
        let a32 = a64.to_dtype(DType::F32).unwrap();
        let tape = Tape::new();
        let (x, a) = (tape.track(&x16), tape.track(&a32));
        let z = x.matmul_t(&w16, false, true).unwrap();
        let y = x.matmul(&a).unwrap();
        assert_eq!((y.dtype(), z.dtype()), (DType::BF16, DType::BF16));
        let loss = y
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .add(&z.to_dtype(DType::F32).unwrap().sum_all().unwrap())
            .unwrap();
        let g = tape.backward(&loss).unwrap();
        let (dx, da) = (g.get(&x).unwrap(), g.get(&a).unwrap());
        assert_eq!((dx.dtype(), da.dtype()), (DType::BF16, DType::F32));
        assert_eq!((dx.dims(), da.dims()), (&[2, 3, 40][..], &[40, 8][..]));
        let close = |got: &[f64], want: &[f64], rel: f64| {
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (p, q) in got.iter().zip(want) {
                assert!((p - q).abs() <= rel * scale, "{p} vs {q}");
            }
        };
        close(&dx.to_f64_vec().unwrap(), &dx_ref, 1.0 / 128.0);
        // dA = x^T 1 from bf16 x: exact inputs, f32 sums.
        close(
            &da.to_f64_vec().unwrap(),
            &da_ref.to_f64_vec().unwrap(),
            1e-6,
        );
    }

    #[test]
    fn mismatched_inner_sizes_name_both_shapes() {
        let dev = crate::Device::Cpu;
        let a = crate::Tensor::zeros([2, 3], crate::DType::F32, &dev).unwrap();
        let b = crate::Tensor::zeros([4, 5], crate::DType::F32, &dev).unwrap();
        let e = a.matmul(&b).unwrap_err().to_string();
        assert!(e.contains("[2, 3]") && e.contains("[4, 5]"), "{e}");
    }
}
