//! Causal scaled-dot-product attention with grouped-query heads, tiled flash-style.

use super::{Op, float_dispatch, in_compute_dtype, same_kind, wbuf, wgpu_of};
use crate::DType;
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Tensor};
use bft_kernels::cpu::attention::{AttnDims, Tiles, attention_backward, attention_forward};

impl Tensor {
    /// `softmax(q k^T * scale + causal mask) v` for `q = self (B, Hq, T, D)` and
    /// `k, v (B, Hkv, S, D)` with `Hq` a multiple of `Hkv` (query head `h` uses K/V head
    /// `h / (Hq/Hkv)`; K/V are never repeated in memory) and `S >= T` (query `i` sees keys up to
    /// `i + S - T`, so a KV cache can hold earlier positions). `scale` defaults to `1/sqrt(D)`.
    ///
    /// Memory is linear in T: only the output and one log-sum-exp per row are saved; the
    /// backward pass recomputes the probabilities tile by tile.
    pub fn causal_attention(&self, k: &Tensor, v: &Tensor, scale: Option<f64>) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Attention, crate::profile::Phase::Forward);
        if let Some(out) = in_compute_dtype(&[self, k, v], |t| {
            t[0].causal_attention(&t[1], &t[2], scale)
        })? {
            return Ok(out);
        }
        same_kind("attention", self, k)?;
        same_kind("attention", self, v)?;
        let dims = attn_dims(self, k, v)?;
        let scale = scale.unwrap_or(1.0 / (dims.head_dim as f64).sqrt());
        let rows = dims.batch * dims.q_heads * dims.q_len;
        let (out, lse) = if let Some((g, i)) = wgpu_of(self) {
            use bft_kernels::wgpu::ops::{attention_forward as fwd, attention_supports};
            if !attention_supports(dims.head_dim) {
                return Err(Error::Unsupported {
                    op: "attention with a head_dim that is not a multiple of 4 up to 256",
                    device: self.device(),
                });
            }
            let qkv = (
                wbuf("attention", self)?,
                wbuf("attention", k)?,
                wbuf("attention", v)?,
            );
            let (o, l) = fwd(&g, dims, scale as f32, qkv)?;
            (
                Tensor::from_wgpu(o, DType::F32, i, self.shape().clone()),
                Tensor::from_wgpu(l, DType::F32, i, [rows]),
            )
        } else {
            self.attention_cpu(k, v, dims, scale)?
        };
        Tape::record(Op::Attention, &[self, k, v], out.clone(), || {
            AttentionBackward {
                q: self.stop_gradient(),
                k: k.stop_gradient(),
                v: v.stop_gradient(),
                o: out.stop_gradient(),
                lse,
                dims,
                scale,
            }
        })
    }

    /// `(o, lse)` of the forward pass on the CPU.
    fn attention_cpu(
        &self,
        k: &Tensor,
        v: &Tensor,
        dims: AttnDims,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        let rows = dims.batch * dims.q_heads * dims.q_len;
        float_dispatch!("attention", self.dtype(), |T| {
            let (mut o, mut l) = (vec![T::default(); self.numel()], vec![T::default(); rows]);
            if rows > 0 {
                let qkv = (
                    self.cpu::<T>("attention")?,
                    k.cpu::<T>("attention")?,
                    v.cpu::<T>("attention")?,
                );
                attention_forward(dims, Tiles::default(), scale, qkv, &mut o, &mut l);
            }
            Ok((
                Tensor::from_cpu(o, self.shape().clone()),
                Tensor::from_cpu(l, [rows]),
            ))
        })
    }
}

fn attn_dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttnDims> {
    let bad = |msg: String| Err(Error::shape("attention", msg));
    let (qd, kd) = (q.dims(), k.dims());
    if q.rank() != 4 || k.rank() != 4 || k.shape() != v.shape() {
        return bad(format!(
            "need q (B, Hq, T, D) and k = v (B, Hkv, S, D), got {qd:?}, {kd:?}, {:?}",
            v.dims()
        ));
    }
    let dims = AttnDims {
        batch: qd[0],
        q_heads: qd[1],
        kv_heads: kd[1],
        q_len: qd[2],
        kv_len: kd[2],
        head_dim: qd[3],
    };
    if kd[0] != qd[0] || kd[3] != qd[3] {
        return bad(format!("q {qd:?} and k {kd:?} differ in batch or head_dim"));
    }
    if dims.kv_heads == 0 || !dims.q_heads.is_multiple_of(dims.kv_heads) {
        return bad(format!(
            "{} query heads are not a multiple of {} K/V heads",
            dims.q_heads, dims.kv_heads
        ));
    }
    if dims.kv_len < dims.q_len {
        return bad(format!(
            "{} keys cannot serve {} causal queries",
            dims.kv_len, dims.q_len
        ));
    }
    Ok(dims)
}

struct AttentionBackward {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    /// `(B * Hq * T)` row log-sum-exp of the scaled scores.
    lse: Tensor,
    dims: AttnDims,
    scale: f64,
}

impl Backward for AttentionBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        if let Some((gpu, i)) = wgpu_of(g) {
            let n = "attention";
            let (dq, dk, dv) = bft_kernels::wgpu::ops::attention_backward(
                &gpu,
                self.dims,
                self.scale as f32,
                (wbuf(n, &self.q)?, wbuf(n, &self.k)?, wbuf(n, &self.v)?),
                (wbuf(n, &self.o)?, wbuf(n, &self.lse)?, wbuf(n, g)?),
            )?;
            let t = |b, s: &Tensor| Some(Tensor::from_wgpu(b, DType::F32, i, s.shape().clone()));
            return Ok(vec![t(dq, &self.q), t(dk, &self.k), t(dv, &self.v)]);
        }
        float_dispatch!("attention backward", g.dtype(), |T| {
            let mut dq = vec![T::default(); self.q.numel()];
            let mut dk = vec![T::default(); self.k.numel()];
            let mut dv = vec![T::default(); self.v.numel()];
            if !dq.is_empty() {
                let n = "attention";
                attention_backward(
                    self.dims,
                    Tiles::default(),
                    self.scale,
                    (
                        self.q.cpu::<T>(n)?,
                        self.k.cpu::<T>(n)?,
                        self.v.cpu::<T>(n)?,
                    ),
                    (self.o.cpu::<T>(n)?, self.lse.cpu::<T>(n)?, g.cpu::<T>(n)?),
                    &mut dq,
                    &mut dk,
                    &mut dv,
                );
            }
            Ok(vec![
                Some(Tensor::from_cpu(dq, self.q.shape().clone())),
                Some(Tensor::from_cpu(dk, self.k.shape().clone())),
                Some(Tensor::from_cpu(dv, self.v.shape().clone())),
            ])
        })
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::{Device, Op, Tensor};
    use proptest::prelude::*;

    pub(crate) fn cases() -> Vec<Case> {
        // Lengths straddle the 64-row/64-key tiles (63, 65, 70) as well as 1 and small odd sizes.
        let len = prop_oneof![1usize..6, Just(63usize), Just(65usize), Just(70usize)];
        let strategy = (len, 0usize..3, 1usize..3, 1usize..3, 1usize..5)
            .prop_flat_map(|(t, extra, hkv, group, d)| {
                let s = t + extra;
                (
                    tensor(vec![1, hkv * group, t, d]),
                    tensor(vec![1, hkv, s, d]),
                    tensor(vec![1, hkv, s, d]),
                )
                    .prop_map(|(q, k, v)| {
                        instance(vec![q, k, v], |x| x[0].causal_attention(&x[1], &x[2], None))
                    })
            })
            .boxed();
        vec![Case::new("attention", &[Op::Attention], strategy)]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 12));
    }

    /// Composes attention from unfused ops (materialising the scores) and compares values.
    #[test]
    fn equals_composed_attention_with_repeated_heads() {
        let dev = Device::Cpu;
        let dt = crate::DType::F64;
        let (t, d) = (5, 3);
        let q = Tensor::randn([1, 4, t, d], 1.0, 1, dt, &dev).unwrap();
        let k = Tensor::randn([1, 2, t, d], 1.0, 2, dt, &dev).unwrap();
        let v = Tensor::randn([1, 2, t, d], 1.0, 3, dt, &dev).unwrap();
        let fused = q
            .causal_attention(&k, &v, None)
            .unwrap()
            .to_vec::<f64>()
            .unwrap();
        let mask: Vec<f64> = (0..t * t)
            .map(|i| if i % t > i / t { -1e30 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, [t, t], &dev).unwrap();
        for h in 0..4 {
            let qh = q.narrow(1, h, 1).unwrap();
            let kh = k.narrow(1, h / 2, 1).unwrap();
            let vh = v.narrow(1, h / 2, 1).unwrap();
            let s = qh
                .matmul_t(&kh, false, true)
                .unwrap()
                .scale(1.0 / (d as f64).sqrt())
                .unwrap();
            let o = s
                .add(&mask)
                .unwrap()
                .softmax()
                .unwrap()
                .matmul(&vh)
                .unwrap()
                .to_vec::<f64>()
                .unwrap();
            for (a, b) in o.iter().zip(&fused[h * t * d..(h + 1) * t * d]) {
                assert!((a - b).abs() < 1e-12, "head {h}: {a} vs {b}");
            }
        }
    }
}
