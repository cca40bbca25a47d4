//! Batched matrix product with optionally transposed operands.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, promoted, same_device, same_kind};
use crate::DType;
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Tensor};
use bft_kernels::cpu::matmul::GemmDims;

/// One product's sizes: the GEMM's, whether each operand is read transposed, and the
/// product's dims.
#[derive(Clone, Debug)]
pub(crate) struct Gemm {
    pub dims: GemmDims,
    pub ta: bool,
    pub tb: bool,
    pub out_dims: Vec<usize>,
}

/// The product kernels of a backend, on operands whose shapes `Gemm` describes.
pub(crate) trait MatMulKernel {
    /// `op(a) . op(b)` for two operands of one type the backend computes in; the product has
    /// that type.
    fn matmul(&self, a: &Tensor, b: &Tensor, g: &Gemm) -> Result<Tensor>;

    /// `op(a) . op(b)` where an operand is 16-bit (autocast): an f32 operand is rounded to the
    /// 16-bit type once, products accumulate in f32, and the product has type `out` (f32, or
    /// the 16-bit type when both operands are).
    fn matmul_mixed(&self, a: &Tensor, b: &Tensor, g: &Gemm, out: DType) -> Result<Tensor>;

    /// `c + op(a) . op(b)` for operands and `c` of one type the backend computes in, `c` of
    /// the product's shape; untracked. The default adds a fresh product; a backend that can
    /// accumulate into `c`'s buffer overrides it.
    fn matmul_add(&self, a: &Tensor, b: &Tensor, g: &Gemm, c: &mut Tensor) -> Result<Tensor> {
        c.stop_gradient().add(&self.matmul(a, b, g)?)
    }

    /// `a . w^T + u . b^T` for 2-D operands (`g` describes the first product) in one pass over
    /// the output, where the backend has a kernel for these types; untracked. `None` (the
    /// default) sends the caller to the two products.
    fn matmul_plus(
        &self,
        _a: &Tensor,
        _w: &Tensor,
        (_u, _b): (&Tensor, &Tensor),
        _g: &Gemm,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Both gradients of `a . b^T` for 2-D `a (m, r)`, `b (n, r)` with a thin `r` (a LoRA
    /// up-projection), from the upstream `g (m, n)`: `(g . b, g^T . a)`, in one pass over `g`
    /// where the backend has a kernel for these types and sizes; untracked. `None` (the
    /// default) sends the caller to the two products.
    fn thin_grads(
        &self,
        _g: &Tensor,
        _a: &Tensor,
        _b: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
}

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
        let g = gemm(ad, bd, ta, tb)?;
        let out = if [self, rhs].iter().any(|t| t.dtype().is_half()) {
            // A 16-bit operand (autocast). The tape keeps the operands as they are (no f32
            // copies), so a frozen bf16 weight costs its 16 bits during training.
            same_device("matmul", self, rhs)?;
            kernels(self.device()).matmul_mixed(self, rhs, &g, promoted(&[self, rhs]))?
        } else {
            same_kind("matmul", self, rhs)?;
            kernels(self.device()).matmul(self, rhs, &g)?
        };
        Tape::record(Op::MatMul, &[self, rhs], out, || MatMulBackward {
            a: self.stop_gradient(),
            b: rhs.stop_gradient(),
            ta,
            tb,
        })
    }

    /// `c + op(self) . op(rhs)`, consuming `c`: where the backend can (the CPU in f32/f64) the
    /// product accumulates into `c`'s buffer (taken in place when no other tensor shares it),
    /// so a LoRA update lands on the frozen product without a separate Add and its fresh
    /// output. Recorded as a `MatMul` with a third input, whose gradient is the upstream one.
    /// With 16-bit operands or a `c` of another type or shape it is `c.add(&self.matmul_t(..))`.
    pub fn matmul_t_add(&self, rhs: &Tensor, ta: bool, tb: bool, c: Tensor) -> Result<Tensor> {
        let plain = |c: Tensor| c.add(&self.matmul_t(rhs, ta, tb)?);
        if c.dtype().is_half()
            && c.device() == self.device()
            && kernels(c.device()).compute_dtype(c.dtype()) == c.dtype()
        {
            // A 16-bit `c` on a backend that computes in 16 bits (CUDA in bf16): the sum keeps
            // `c`'s type, as PEFT keeps a LoRA layer's output in the base layer's type, so the
            // activations stay 16-bit; the product (f32 beside an f32 LoRA master) is rounded
            // once before the add. Elsewhere the sum widens (16-bit + f32 promotes to f32).
            let product = self.matmul_t(rhs, ta, tb)?;
            return c.add(&product.to_dtype(c.dtype())?);
        }
        let (ad, bd) = (self.dims(), rhs.dims());
        let same = |t: &Tensor| {
            t.dtype() == self.dtype() && !t.dtype().is_half() && t.device() == self.device()
        };
        if !(same(rhs) && same(&c)) || ad.len() < 2 {
            return plain(c);
        }
        if ad.len() > 2 && bd.len() == 2 && !ta {
            // Fold the batch into the rows, as `matmul_t` does, when `c` has the product's
            // shape; the views share storage, so `c` is dropped once its view exists.
            let (k, n) = (ad[ad.len() - 1], bd[if tb { 0 } else { 1 }]);
            let c_dims = c.dims().to_vec();
            if !c_dims.iter().eq(ad[..ad.len() - 1].iter().chain([&n])) {
                return plain(c);
            }
            let rows = self.numel() / k.max(1);
            let c2 = c.reshape([rows, n])?;
            drop(c);
            let out = self.reshape([rows, k])?.matmul_t_add(rhs, false, tb, c2)?;
            return out.reshape(c_dims);
        }
        let Ok(g) = gemm(ad, bd, ta, tb) else {
            return plain(c);
        };
        if c.dims() != g.out_dims.as_slice() {
            return plain(c);
        }
        let _profiled = crate::profile::scope(Op::MatMul, crate::profile::Phase::Forward);
        let mut c = c;
        let out = kernels(self.device()).matmul_add(self, rhs, &g, &mut c)?;
        Tape::record(Op::MatMul, &[self, rhs, &c], out, || MatMulBackward {
            a: self.stop_gradient(),
            b: rhs.stop_gradient(),
            ta,
            tb,
        })
    }
}

impl Tensor {
    /// `self . w^T + u . b^T` for `self (..., K)`, `w (N, K)`, `u (..., R)`, `b (N, R)`: a linear
    /// layer plus its LoRA up-projection (`u` the scaled rank-sized activation). Where the
    /// backend has a kernel for it (the CPU's bf16 one, for an f32 `self` beside a bf16 `w`,
    /// adds the f32 `u . b^T` as it stores each tile) the output is written in one pass;
    /// elsewhere, and for shapes that do not fit, it is
    /// `u.matmul_t_add(b, false, true, self.matmul_t(w, false, true)?)`. Either way the
    /// gradients are those of the two products.
    pub fn linear_plus(&self, w: &Tensor, u: &Tensor, b: &Tensor) -> Result<Tensor> {
        let composed = || u.matmul_t_add(b, false, true, self.matmul_t(w, false, true)?);
        let (xd, ud, wd, bd) = (self.dims(), u.dims(), w.dims(), b.dims());
        let r = xd.len();
        let fits = r >= 2
            && ud.len() == r
            && xd[..r - 1] == ud[..r - 1]
            && wd.len() == 2
            && bd.len() == 2
            && wd[1] == xd[r - 1]
            && bd[1] == ud[r - 1]
            && wd[0] == bd[0]
            && [w, u, b].iter().all(|t| t.device() == self.device());
        if !fits {
            return composed();
        }
        let _profiled = crate::profile::scope(Op::MatMul, crate::profile::Phase::Forward);
        let (k, rank) = (xd[r - 1], ud[r - 1]);
        let rows = self.numel() / k.max(1);
        let (x2, u2) = (self.reshape([rows, k])?, u.reshape([rows, rank])?);
        let g = gemm(x2.dims(), wd, false, true)?;
        let Some(out) = kernels(self.device()).matmul_plus(&x2, w, (&u2, b), &g)? else {
            return composed();
        };
        let product = |a: &Tensor, b: &Tensor| MatMulBackward {
            a: a.stop_gradient(),
            b: b.stop_gradient(),
            ta: false,
            tb: true,
        };
        let out = Tape::record(Op::MatMul, &[&x2, w, &u2, b], out, || MatMulPlusBackward {
            first: product(&x2, w),
            second: product(&u2, b),
        })?;
        let mut dims = xd[..r - 1].to_vec();
        dims.push(wd[0]);
        out.reshape(dims)
    }
}

/// `linear_plus`'s two products, each with its own gradients.
struct MatMulPlusBackward {
    first: MatMulBackward,
    second: MatMulBackward,
}

impl Backward for MatMulPlusBackward {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut grads = self.first.backward(g, &needs[..2])?;
        grads.extend(self.second.backward(g, &needs[2..])?);
        Ok(grads)
    }
}

struct MatMulBackward {
    a: Tensor,
    b: Tensor,
    ta: bool,
    tb: bool,
}

/// The GEMM of `op(a) . op(b)` for operands of dims `ad`, `bd` (same rank, matching batch
/// axes); errors name both shapes.
fn gemm(ad: &[usize], bd: &[usize], ta: bool, tb: bool) -> Result<Gemm> {
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
    Ok(Gemm {
        dims: GemmDims { batch, m, n, k: ka },
        ta,
        tb,
        out_dims,
    })
}

/// `op(a) . op(b)` by `matmul` on the operands widened to f32 (each through
/// [`autocast_operand`]), in type `out`: how a backend without 16-bit products autocasts.
pub(super) fn widened_product(
    k: &dyn MatMulKernel,
    (a, b): (&Tensor, &Tensor),
    g: &Gemm,
    out: DType,
) -> Result<Tensor> {
    let half = [a, b]
        .iter()
        .map(|t| t.dtype())
        .find(|d| d.is_half())
        .unwrap_or(DType::BF16);
    let (a, b) = (autocast_operand(a, half)?, autocast_operand(b, half)?);
    same_kind("matmul", &a, &b)?;
    let product = k.matmul(&a, &b, g)?;
    if out == DType::F32 {
        Ok(product)
    } else {
        product.cast_untracked(out)
    }
}

/// The f32 values a product with a 16-bit operand reads, as an untracked tensor: a 16-bit
/// operand widened; an f32 operand rounded to the 16-bit type `half` first (autocast rounds the
/// activation it feeds a 16-bit weight), then widened; anything else as it is.
pub(super) fn autocast_operand(t: &Tensor, half: DType) -> Result<Tensor> {
    match t.dtype() {
        d if d.is_half() => t.cast_untracked(DType::F32),
        DType::F32 => t.cast_untracked(half)?.cast_untracked(DType::F32),
        _ => Ok(t.stop_gradient()),
    }
}

impl Backward for MatMulBackward {
    /// For `C = op(A) op(B)`: `dA = dC op(B)^T` (stored transposed when `ta`), `dB = op(A)^T dC`.
    /// The two products follow the forward's rules (with a 16-bit operand: the other rounded
    /// once, f32 accumulation, so the input gradient of a frozen bf16 weight runs the bf16
    /// kernel), and each gradient then takes its operand's type: an f32 activation or master
    /// weight gets an f32 gradient, a bf16 one a bf16 gradient.
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (a, b, ta, tb) = (&self.a, &self.b, self.ta, self.tb);
        let fused = if needs[0] && needs[1] && !ta && tb && g.device() == a.device() {
            kernels(g.device()).thin_grads(g, a, b)?
        } else {
            None
        };
        let (da, db) = match fused {
            Some((da, db)) => (Some(da), Some(db)),
            None => self.two_products(g, needs)?,
        };
        let typed = |d: Option<Tensor>, of: &Tensor| match d {
            Some(d) if d.dtype() != of.dtype() => d.cast_untracked(of.dtype()).map(Some),
            d => Ok(d),
        };
        let mut grads = vec![typed(da, a)?, typed(db, b)?];
        // `matmul_t_add`'s accumulated input gets the upstream gradient as it is.
        if needs.len() == 3 {
            grads.push(needs[2].then(|| g.clone()));
        }
        Ok(grads)
    }
}

impl MatMulBackward {
    /// `dA` and `dB` (those that `needs` asks for) as one product each.
    fn two_products(&self, g: &Tensor, needs: &[bool]) -> Result<(Option<Tensor>, Option<Tensor>)> {
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
        Ok((da, db))
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

    /// `c + x . W^T` with `c` taken in place (a fresh `scale` output no one else holds), over
    /// a batched lhs folded onto a 2-D rhs, and with both operands transposed.
    fn accumulate_case() -> Case {
        let strategy = (size(), size(), size(), any::<bool>())
            .prop_flat_map(|(m, n, k, folded)| {
                let (ad, bd, cd, ta) = if folded {
                    (vec![2, m, k], vec![n, k], vec![2, m, n], false)
                } else {
                    (vec![k, m], vec![n, k], vec![m, n], true)
                };
                (tensor(ad), tensor(bd), tensor(cd)).prop_map(move |(a, b, c)| {
                    instance(vec![a, b, c], move |x| {
                        x[0].matmul_t_add(&x[1], ta, true, x[2].scale(1.0)?)
                    })
                })
            })
            .boxed();
        Case::new(
            "matmul_t_add",
            &[Op::MatMul, Op::Scale, Op::Reshape],
            strategy,
        )
    }

    /// `x . W^T + u . B^T` over a batched `x`.
    fn linear_plus_case() -> Case {
        let strategy = (size(), size(), size(), size())
            .prop_flat_map(|(m, n, k, r)| {
                (
                    tensor(vec![2, m, k]),
                    tensor(vec![n, k]),
                    tensor(vec![2, m, r]),
                    tensor(vec![n, r]),
                )
                    .prop_map(|(x, w, u, b)| {
                        instance(vec![x, w, u, b], |t| t[0].linear_plus(&t[1], &t[2], &t[3]))
                    })
            })
            .boxed();
        Case::new("linear_plus", &[Op::MatMul, Op::Reshape], strategy)
    }

    pub(crate) fn cases() -> Vec<Case> {
        vec![
            case(),
            shared_rhs_case(),
            accumulate_case(),
            linear_plus_case(),
        ]
    }

    /// Operands that do not fit together are refused with an error naming their shapes, never
    /// a panic, whether or not the one-pass kernel would have taken them.
    #[test]
    fn linear_plus_refuses_mismatched_shapes() {
        use crate::{DType, Device, Tensor};
        let dev = Device::Cpu;
        let t = |dims: &[usize], dt| Tensor::randn(dims.to_vec(), 1.0, 1, dt, &dev).unwrap();
        let x = t(&[2, 5, 64], DType::F32);
        for (w, u, b) in [
            // B's rows differ from W's.
            (
                t(&[70, 64], DType::BF16),
                t(&[2, 5, 16], DType::F32),
                t(&[71, 16], DType::F32),
            ),
            // B's rank differs from u's.
            (
                t(&[70, 64], DType::BF16),
                t(&[2, 5, 16], DType::F32),
                t(&[70, 8], DType::F32),
            ),
            // W's inner size differs from x's.
            (
                t(&[70, 63], DType::F32),
                t(&[2, 5, 16], DType::F32),
                t(&[70, 16], DType::F32),
            ),
            // u's rows differ from x's.
            (
                t(&[70, 64], DType::BF16),
                t(&[2, 4, 16], DType::F32),
                t(&[70, 16], DType::F32),
            ),
        ] {
            let err = x.linear_plus(&w, &u, &b).unwrap_err().to_string();
            assert!(err.contains('['), "no shapes in: {err}");
        }
    }

    /// The one-pass `linear_plus` of an f32 activation and a frozen bf16 weight (the bf16
    /// kernel with the LoRA product added in its tiles, where the CPU has AVX512-BF16 or AVX2) gives
    /// the two products' values up to summation order, and the same gradients.
    #[test]
    fn linear_plus_equals_the_two_products() {
        use crate::{DType, Device, Tape, Tensor};
        let dev = Device::Cpu;
        let x = Tensor::randn([2, 5, 64], 1.0, 1, DType::F32, &dev).unwrap();
        let w = Tensor::randn([70, 64], 0.1, 2, DType::BF16, &dev).unwrap();
        let u = Tensor::randn([2, 5, 16], 1.0, 3, DType::F32, &dev).unwrap();
        let b = Tensor::randn([70, 16], 0.1, 4, DType::F32, &dev).unwrap();
        let c = Tensor::randn([2, 5, 70], 1.0, 5, DType::F32, &dev).unwrap();
        let run = |fused: bool| {
            let tape = Tape::new();
            let (x, u, b) = (tape.track(&x), tape.track(&u), tape.track(&b));
            let y = if fused {
                x.linear_plus(&w, &u, &b)
            } else {
                u.matmul_t_add(&b, false, true, x.matmul_t(&w, false, true).unwrap())
            }
            .unwrap();
            let loss = y.mul(&c).unwrap().sum_all().unwrap();
            let grads = tape.backward(&loss).unwrap();
            let g = |t: &Tensor| grads.get(t).unwrap().to_f64_vec().unwrap();
            (y.to_f64_vec().unwrap(), [g(&x), g(&u), g(&b)])
        };
        let ((y1, g1), (y2, g2)) = (run(true), run(false));
        assert_eq!(y1.len(), 2 * 5 * 70);
        for (a, b) in y1.iter().zip(&y2) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        assert_eq!(g1, g2);
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }

    /// All-bf16 products (the forward x . W^T and the input gradient dY . W of a frozen bf16
    /// weight, batched and transposed operands too) give the widened f32 GEMM's values up to
    /// the one bf16 rounding both end in: on an AVX512-BF16 or AVX2 CPU they run a bf16
    /// kernel, elsewhere the widening path, and the two must agree.
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

    /// Autocast: an f32 activation times an f32 LoRA weight and a frozen bf16 weight. The bf16
    /// product rounds the activation to bf16 once and returns f32 (the f64 product of the
    /// rounded values, to f32 accuracy); the f32 product is untouched; each gradient has its
    /// operand's type, and the activation's gradient through the bf16 weight is f32.
    /// (`tests/half_weights_memory.rs` shows the tape keeps the weight in 16 bits.)
    #[test]
    fn an_f32_activation_times_a_bf16_weight_is_autocast() {
        use crate::{DType, Device, Tape, Tensor};
        let dev = Device::Cpu;
        // A batched activation against 2-D weights (the batch folds into the rows).
        let x64 = Tensor::randn([2, 3, 40], 1.0, 1, DType::F64, &dev).unwrap();
        let a64 = Tensor::randn([40, 8], 0.3, 2, DType::F64, &dev).unwrap();
        let w16 = Tensor::randn([300, 40], 0.3, 3, DType::BF16, &dev).unwrap();
        let (x32, a32) = (
            x64.to_dtype(DType::F32).unwrap(),
            a64.to_dtype(DType::F32).unwrap(),
        );
        // The f64 reference on the values the products read: x rounded to bf16 for the bf16
        // weight, x as it is for the f32 one.
        let xr = x32
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let wr = w16.to_dtype(DType::F64).unwrap();
        let x32r = x32.to_dtype(DType::F64).unwrap();
        let a32r = a32.to_dtype(DType::F64).unwrap();
        let z_ref = xr.matmul_t(&wr, false, true).unwrap().to_f64_vec().unwrap();
        let y_ref = x32r.matmul(&a32r).unwrap().to_f64_vec().unwrap();
        // dL/dx for L = sum(z) + sum(y): ones . W + ones . A^T (the ones are exact in bf16).
        let ones = |n| Tensor::ones([2, 3, n], DType::F64, &dev).unwrap();
        let dx_ref = ones(300)
            .matmul(&wr)
            .unwrap()
            .add(&ones(8).matmul_t(&a32r, false, true).unwrap())
            .unwrap()
            .to_f64_vec()
            .unwrap();
        let da_ref = x32r
            .reshape([6, 40])
            .unwrap()
            .matmul_t(
                &Tensor::ones([6, 8], DType::F64, &dev).unwrap(),
                true,
                false,
            )
            .unwrap()
            .to_f64_vec()
            .unwrap();

        let tape = Tape::new();
        let (x, a) = (tape.track(&x32), tape.track(&a32));
        let z = x.matmul_t(&w16, false, true).unwrap();
        let y = x.matmul(&a).unwrap();
        assert_eq!((y.dtype(), z.dtype()), (DType::F32, DType::F32));
        let loss = y.sum_all().unwrap().add(&z.sum_all().unwrap()).unwrap();
        let g = tape.backward(&loss).unwrap();
        let (dx, da) = (g.get(&x).unwrap(), g.get(&a).unwrap());
        assert_eq!((dx.dtype(), da.dtype()), (DType::F32, DType::F32));
        assert_eq!((dx.dims(), da.dims()), (&[2, 3, 40][..], &[40, 8][..]));
        let close = |got: &[f64], want: &[f64]| {
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (p, q) in got.iter().zip(want) {
                assert!((p - q).abs() <= 1e-5 * scale, "{p} vs {q}");
            }
        };
        close(&z.to_f64_vec().unwrap(), &z_ref);
        // The path of CPUs without the bf16 kernels reads the same values.
        let fallback = super::autocast_operand(&x32, DType::BF16)
            .unwrap()
            .matmul_t(
                &super::autocast_operand(&w16, DType::BF16).unwrap(),
                false,
                true,
            )
            .unwrap();
        close(&fallback.to_f64_vec().unwrap(), &z_ref);
        close(&y.to_f64_vec().unwrap(), &y_ref);
        close(&dx.to_f64_vec().unwrap(), &dx_ref);
        close(&da.to_f64_vec().unwrap(), &da_ref);
        // Two 16-bit operands keep their type; a bf16 operand beside an f32 one gives f32.
        let x16 = x32.to_dtype(DType::BF16).unwrap();
        assert_eq!(
            x16.matmul_t(&w16, false, true).unwrap().dtype(),
            DType::BF16
        );
        assert_eq!(x16.matmul(&a32).unwrap().dtype(), DType::F32);
    }

    /// `matmul_t_add` writes into `c` only when no one else holds it: a shared `c` keeps its
    /// values, and both ways give `c + a . b^T`.
    #[test]
    fn matmul_t_add_never_changes_a_shared_input() {
        use crate::{DType, Device, Tensor};
        let dev = Device::Cpu;
        let a = Tensor::randn([2, 5, 7], 1.0, 1, DType::F32, &dev).unwrap();
        let b = Tensor::randn([3, 7], 1.0, 2, DType::F32, &dev).unwrap();
        let c = Tensor::randn([2, 5, 3], 1.0, 3, DType::F32, &dev).unwrap();
        let before = c.to_f64_vec().unwrap();
        let want = c.add(&a.matmul_t(&b, false, true).unwrap()).unwrap();
        let shared = a.matmul_t_add(&b, false, true, c.clone()).unwrap();
        assert_eq!(c.to_f64_vec().unwrap(), before);
        let owned = a
            .matmul_t_add(&b, false, true, c.scale(1.0).unwrap())
            .unwrap();
        // A `c` with the product's element count but not its shape is refused, as the Add
        // it stands for refuses it, naming both shapes.
        let e = a
            .matmul_t_add(&b, false, true, c.reshape([10, 3]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("[10, 3]") && e.contains("[2, 5, 3]"), "{e}");
        for got in [&shared, &owned] {
            assert_eq!(got.dims(), &[2, 5, 3]);
            for (x, y) in got
                .to_f64_vec()
                .unwrap()
                .iter()
                .zip(want.to_f64_vec().unwrap())
            {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
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
