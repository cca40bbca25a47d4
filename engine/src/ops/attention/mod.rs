//! Causal scaled-dot-product attention with grouped-query heads, tiled flash-style.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, in_compute_dtype, same_kind};
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Tensor};
use bft_kernels::cpu::attention::AttnDims;

/// The attention kernels of a backend, on q, k, v of its compute type whose shapes `dims`
/// describes. The forward returns the output and the `(B * Hq * T)` row log-sum-exp of the
/// scaled scores (in whatever float type the backend keeps it), which is all the backward
/// needs besides the inputs: it recomputes the probabilities.
pub(crate) trait AttentionKernel {
    /// With `autocast` the backend may run the products in bf16 (see
    /// [`Tensor::causal_attention_autocast`]); the backward gets the forward's setting.
    fn attention(
        &self,
        qkv: (&Tensor, &Tensor, &Tensor),
        dims: AttnDims,
        scale: f64,
        autocast: bool,
    ) -> Result<(Tensor, Tensor)>;
    /// `(dq, dk, dv)` from the inputs, the forward's `(o, lse)` and the upstream `dout`.
    fn attention_backward(
        &self,
        qkv: (&Tensor, &Tensor, &Tensor),
        saved: (&Tensor, &Tensor, &Tensor),
        dims: AttnDims,
        scale: f64,
        autocast: bool,
    ) -> Result<(Tensor, Tensor, Tensor)>;
}

impl Tensor {
    /// `softmax(q k^T * scale + causal mask) v` for `q = self (B, Hq, T, D)` and
    /// `k, v (B, Hkv, S, D)` with `Hq` a multiple of `Hkv` (query head `h` uses K/V head
    /// `h / (Hq/Hkv)`; K/V are never repeated in memory) and `S >= T` (query `i` sees keys up to
    /// `i + S - T`, so a KV cache can hold earlier positions). `scale` defaults to `1/sqrt(D)`.
    ///
    /// Memory is linear in T: only the output and one log-sum-exp per row are saved; the
    /// backward pass recomputes the probabilities tile by tile.
    pub fn causal_attention(&self, k: &Tensor, v: &Tensor, scale: Option<f64>) -> Result<Tensor> {
        self.attention_impl(k, v, scale, false)
    }

    /// As [`Tensor::causal_attention`] under bf16 autocast, as PyTorch's CPU autocast runs
    /// attention on bf16 tensors: the backend may round q, k, v, the upstream gradient and each
    /// tile of probabilities (and of their gradient) to bf16 for the products, which then
    /// accumulate in f32; softmax and its statistics stay f32. The CPU does so where it has
    /// AVX512-BF16, at twice the f32 products' rate (`bft_kernels::cpu::attention_bf16`);
    /// elsewhere this computes exactly what `causal_attention` does.
    pub fn causal_attention_autocast(
        &self,
        k: &Tensor,
        v: &Tensor,
        scale: Option<f64>,
    ) -> Result<Tensor> {
        self.attention_impl(k, v, scale, true)
    }

    fn attention_impl(
        &self,
        k: &Tensor,
        v: &Tensor,
        scale: Option<f64>,
        autocast: bool,
    ) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Attention, crate::profile::Phase::Forward);
        if let Some(out) = in_compute_dtype(&[self, k, v], |t| {
            t[0].attention_impl(&t[1], &t[2], scale, autocast)
        })? {
            return Ok(out);
        }
        same_kind("attention", self, k)?;
        same_kind("attention", self, v)?;
        let dims = attn_dims(self, k, v)?;
        let scale = scale.unwrap_or(1.0 / (dims.head_dim as f64).sqrt());
        let (out, lse) = kernels(self.device()).attention((self, k, v), dims, scale, autocast)?;
        Tape::record(Op::Attention, &[self, k, v], out.clone(), || {
            AttentionBackward {
                q: self.stop_gradient(),
                k: k.stop_gradient(),
                v: v.stop_gradient(),
                o: out.stop_gradient(),
                lse,
                dims,
                scale,
                autocast,
            }
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
    /// `(B * Hq * T)` row log-sum-exp of the scaled scores, as the backend's forward kept it.
    lse: Tensor,
    dims: AttnDims,
    scale: f64,
    autocast: bool,
}

impl Backward for AttentionBackward {
    fn backward(&self, g: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (dq, dk, dv) = kernels(g.device()).attention_backward(
            (&self.q, &self.k, &self.v),
            (&self.o, &self.lse, g),
            self.dims,
            self.scale,
            self.autocast,
        )?;
        Ok(vec![Some(dq), Some(dk), Some(dv)])
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
        // The autocast entry point, through the same checks: in f64 (the gradient check) and
        // on backends without bf16 products it is the same computation.
        let autocast = (1usize..6, 1usize..3, 1usize..4)
            .prop_flat_map(|(t, hkv, d)| {
                (
                    tensor(vec![1, 2 * hkv, t, d]),
                    tensor(vec![1, hkv, t, d]),
                    tensor(vec![1, hkv, t, d]),
                )
                    .prop_map(|(q, k, v)| {
                        instance(vec![q, k, v], |x| {
                            x[0].causal_attention_autocast(&x[1], &x[2], None)
                        })
                    })
            })
            .boxed();
        vec![
            Case::new("attention", &[Op::Attention], strategy),
            Case::new("attention (autocast)", &[Op::Attention], autocast),
        ]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 12));
    }

    /// Under autocast the output and the gradients are those of f32 attention to bf16
    /// accuracy (the kernels themselves are checked tile by tile in `bft_kernels`), and
    /// exactly those on a CPU without AVX512-BF16, where the f32 kernels run.
    #[test]
    fn autocast_attention_is_f32_attention_to_bf16_accuracy() {
        use crate::{DType, Tape};
        let dev = Device::Cpu;
        let run = |autocast: bool| {
            let tape = Tape::new();
            let mk = |h, t, seed| Tensor::randn([2, h, t, 64], 1.0, seed, DType::F32, &dev);
            let (q, k, v) = (
                tape.track(&mk(6, 70, 1).unwrap()),
                tape.track(&mk(2, 75, 2).unwrap()),
                tape.track(&mk(2, 75, 3).unwrap()),
            );
            let o = if autocast {
                q.causal_attention_autocast(&k, &v, None)
            } else {
                q.causal_attention(&k, &v, None)
            }
            .unwrap();
            let w = Tensor::randn(o.dims().to_vec(), 1.0, 4, DType::F32, &dev).unwrap();
            let g = tape
                .backward(&o.mul(&w).unwrap().sum_all().unwrap())
                .unwrap();
            let mut all = vec![o.to_vec::<f32>().unwrap()];
            for x in [&q, &k, &v] {
                all.push(g.get(x).unwrap().to_vec::<f32>().unwrap());
            }
            all
        };
        let (lowp, full) = (run(true), run(false));
        let exact = !bft_kernels::cpu::bf16_gemm::available();
        for (name, (a, b)) in ["o", "dq", "dk", "dv"].iter().zip(lowp.iter().zip(&full)) {
            let big = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            if exact {
                assert_eq!(worst, 0.0, "{name}");
            } else {
                assert!(
                    worst <= 2e-2 * big,
                    "{name}: off by {worst} (largest {big})"
                );
                assert!(worst > 0.0, "{name}: the bf16 kernels did not run");
            }
        }
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
