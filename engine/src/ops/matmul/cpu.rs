use super::{Gemm, MatMulKernel, widened_product};
use crate::backend::Cpu;
use crate::dtype::Elem;
use crate::ops::float_dispatch;
use crate::{DType, Result, Tensor};
use bft_kernels::cpu::matmul::{GemmDims, Operand, matmul, matmul_uninit};
use bft_kernels::cpu::thin::thin_product_grads;
use bft_kernels::cpu::zeroed;

/// The largest rank `thin_grads` takes: beyond it two GEMMs use the FMA units better than one
/// pass that reads the upstream gradient once.
const MAX_THIN: usize = 64;

impl MatMulKernel for Cpu {
    fn matmul(&self, a: &Tensor, b: &Tensor, g: &Gemm) -> Result<Tensor> {
        let GemmDims { batch, m, n, .. } = g.dims;
        let len = batch * m * n;
        float_dispatch!("matmul", a.dtype(), |T| {
            let (a, b) = operands::<T>(a, b, g)?;
            // Not zero-filled: the kernel writes every element.
            let mut c: Vec<T> = Vec::with_capacity(len);
            matmul_uninit(g.dims, a, b, &mut c.spare_capacity_mut()[..len]);
            // SAFETY: `matmul_uninit` wrote all `len` elements.
            unsafe { c.set_len(len) };
            Ok(Tensor::from_cpu(c, g.out_dims.clone()))
        })
    }

    /// The AVX512-BF16 kernel where the CPU has it, else the AVX2 + FMA one (which widens bf16
    /// as it packs); on CPUs with neither, the operands are widened (an f32 one after rounding
    /// to the 16-bit type) and multiplied in f32.
    fn matmul_mixed(&self, a: &Tensor, b: &Tensor, g: &Gemm, out: DType) -> Result<Tensor> {
        match bf16_product(a, b, g, None)? {
            Some(p) if out == DType::F32 => Ok(p),
            Some(p) => p.cast_untracked(out),
            None => widened_product(self, (a, b), g, out),
        }
    }

    /// The bf16 kernel with the f32 `u . b^T` added as each tile is stored, for an f32 `a`
    /// beside a bf16 `w` on a CPU with AVX512-BF16 or AVX2 + FMA; for an f32 `w`, the same in
    /// f32 where the hand-written AVX2 kernel is the f32 GEMM (`prefers_fma_kernel`).
    fn matmul_plus(
        &self,
        a: &Tensor,
        w: &Tensor,
        (u, b): (&Tensor, &Tensor),
        g: &Gemm,
    ) -> Result<Option<Tensor>> {
        let f32s = [a, u, b].iter().all(|t| t.dtype() == DType::F32);
        if !(f32s && g.dims.k > 0) {
            return Ok(None);
        }
        let n = "linear_plus";
        let extra = bft_kernels::cpu::bf16_gemm::Extra {
            a: u.cpu::<f32>(n)?,
            b: b.cpu::<f32>(n)?,
            k: u.dims()[1],
        };
        match w.dtype() {
            DType::BF16 => bf16_product(a, w, g, Some(extra)),
            DType::F32 => {
                let GemmDims {
                    batch,
                    m,
                    n: cols,
                    k,
                } = g.dims;
                let (a, w) = (
                    Operand {
                        data: a.cpu::<f32>(n)?,
                        trans: g.ta,
                        batch_stride: m * k,
                    },
                    Operand {
                        data: w.cpu::<f32>(n)?,
                        trans: g.tb,
                        batch_stride: k * cols,
                    },
                );
                // Not zero-filled: the kernel writes every element.
                let mut c: Vec<f32> = Vec::with_capacity(batch * m * cols);
                let out = &mut c.spare_capacity_mut()[..batch * m * cols];
                if !bft_kernels::cpu::matmul::matmul_plus_f32(g.dims, a, w, extra, out) {
                    return Ok(None);
                }
                // SAFETY: the kernel ran and wrote all batch * m * cols elements.
                unsafe { c.set_len(batch * m * cols) };
                Ok(Some(Tensor::from_cpu(c, g.out_dims.clone())))
            }
            _ => Ok(None),
        }
    }

    /// The one-pass kernel (`cpu::thin`) for f32 or f64 operands of one type and a rank of at
    /// most `MAX_THIN`, on CPUs where it beats the two products (`thin::preferred`).
    fn thin_grads(&self, g: &Tensor, a: &Tensor, b: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        let (&[m, r], &[n, rb], &[gm, gn]) = (a.dims(), b.dims(), g.dims()) else {
            return Ok(None);
        };
        let floats = matches!(g.dtype(), DType::F32 | DType::F64)
            && a.dtype() == g.dtype()
            && b.dtype() == g.dtype();
        let fits = floats && rb == r && (gm, gn) == (m, n) && (1..=MAX_THIN).contains(&r);
        if !(fits && bft_kernels::cpu::thin::preferred()) {
            return Ok(None);
        }
        float_dispatch!("matmul", g.dtype(), |T| {
            let (mut du, mut db) = (zeroed::<T>(m * r), zeroed::<T>(n * r));
            let op = "matmul";
            thin_product_grads(
                (m, n, r),
                g.cpu::<T>(op)?,
                b.cpu::<T>(op)?,
                a.cpu::<T>(op)?,
                &mut du,
                &mut db,
            );
            Ok(Some((
                Tensor::from_cpu(du, vec![m, r]),
                Tensor::from_cpu(db, vec![n, r]),
            )))
        })
    }

    /// Accumulates into `c`'s buffer, taken in place when no other tensor shares it.
    fn matmul_add(&self, a: &Tensor, b: &Tensor, g: &Gemm, c: &mut Tensor) -> Result<Tensor> {
        float_dispatch!("matmul", a.dtype(), |T| {
            let mut acc = match c.take_unique_cpu::<T>() {
                Some(v) => v,
                None => c.cpu::<T>("matmul")?.to_vec(),
            };
            let (a, b) = operands::<T>(a, b, g)?;
            matmul(g.dims, a, b, &mut acc, true);
            Ok(Tensor::from_cpu(acc, g.out_dims.clone()))
        })
    }
}

/// `a` and `b` as the kernel's operands of type `T`, read as `g` says.
fn operands<'a, T: Elem>(
    a: &'a Tensor,
    b: &'a Tensor,
    g: &Gemm,
) -> Result<(Operand<'a, T>, Operand<'a, T>)> {
    let GemmDims { m, n, k, .. } = g.dims;
    let a = Operand {
        data: a.cpu::<T>("matmul")?,
        trans: g.ta,
        batch_stride: m * k,
    };
    let b = Operand {
        data: b.cpu::<T>("matmul")?,
        trans: g.tb,
        batch_stride: k * n,
    };
    Ok((a, b))
}

/// `op(a) . op(b)` in f32 through the AVX512-BF16 kernel (or the AVX2 + FMA one where the CPU
/// lacks it), when one operand is bf16 and the other bf16 or f32 (rounded to bf16 as it is
/// packed) and the CPU has either's instructions.
/// Products of bf16 values are exact in f32, so this is the widened product of the rounded
/// values up to summation order. With `extra` (a batch of one) its f32 product is added as
/// the tiles are stored. `None` sends the caller to the widening path.
fn bf16_product(
    a: &Tensor,
    b: &Tensor,
    g: &Gemm,
    extra: Option<bft_kernels::cpu::bf16_gemm::Extra<'_>>,
) -> Result<Option<Tensor>> {
    use bft_kernels::cpu::bf16_gemm::{Bf16Source, Extra, matmul_bf16_uninit, supported};
    use half::bf16;
    use std::mem::MaybeUninit;
    let fits = |t: &Tensor| matches!(t.dtype(), DType::BF16 | DType::F32);
    if !(fits(a) && fits(b) && supported()) {
        return Ok(None);
    }
    let GemmDims { batch, m, n, .. } = g.dims;
    // Not zero-filled: the kernel writes every element.
    let mut c: Vec<f32> = Vec::with_capacity(batch * m * n);
    /// The kernel on `a` read as `A` and `b` as `B`.
    fn run<A: Bf16Source + Elem, B: Bf16Source + Elem>(
        a: &Tensor,
        b: &Tensor,
        g: &Gemm,
        extra: Option<Extra<'_>>,
        c: &mut [MaybeUninit<f32>],
    ) -> Result<bool> {
        let GemmDims { m, n, k, .. } = g.dims;
        let (a, b) = (
            Operand {
                data: a.cpu::<A>("matmul")?,
                trans: g.ta,
                batch_stride: m * k,
            },
            Operand {
                data: b.cpu::<B>("matmul")?,
                trans: g.tb,
                batch_stride: k * n,
            },
        );
        Ok(matmul_bf16_uninit(g.dims, a, b, extra, c))
    }
    let out = &mut c.spare_capacity_mut()[..batch * m * n];
    let ran = match (a.dtype(), b.dtype()) {
        (DType::BF16, DType::BF16) => run::<bf16, bf16>(a, b, g, extra, out)?,
        (DType::F32, DType::BF16) => run::<f32, bf16>(a, b, g, extra, out)?,
        (DType::BF16, DType::F32) => run::<bf16, f32>(a, b, g, extra, out)?,
        _ => false,
    };
    if !ran {
        return Ok(None);
    }
    // SAFETY: the kernel ran and wrote all batch * m * n elements.
    unsafe { c.set_len(batch * m * n) };
    Ok(Some(Tensor::from_cpu(c, g.out_dims.clone())))
}
