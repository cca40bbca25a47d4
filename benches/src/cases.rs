//! The benchmark cases: each validates its kernel, then times it at shapes from real configs.

use crate::reference;
use crate::report::{Peak, Record};
use crate::timing::{median_us, rel_err};
use anyhow::{Result, ensure};
use bft_engine::{DType, Device, Tape, Tensor, memory};
use bft_kernels::cpu::attention::{AttnDims, Tiles, attention_forward, attention_reference};
use bft_kernels::cpu::matmul::{GemmDims, Operand, matmul};
use bft_kernels::cpu::{embedding, nll, rmsnorm, rope, softmax, unary};

/// The attention and MLP sizes of a real checkpoint's config.json.
#[derive(Clone, Copy)]
struct Model {
    name: &'static str,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
}

const SMOLLM2_135M: Model = Model {
    name: "smollm2-135m",
    hidden: 576,
    heads: 9,
    kv_heads: 3,
    head_dim: 64,
    ffn: 1536,
    vocab: 49152,
};
const QWEN2_1_5B: Model = Model {
    name: "qwen2-1.5b",
    hidden: 1536,
    heads: 12,
    kv_heads: 2,
    head_dim: 128,
    ffn: 8960,
    vocab: 151936,
};

/// Is the kernel bound by arithmetic or by memory traffic (which roofline it is judged on)?
/// Device kernels have no measured roofline yet: their rows report no percentage.
#[derive(Clone, Copy)]
pub enum Bound {
    Compute,
    /// Arithmetic-bound on the `vdpbf16ps` peak.
    ComputeBf16,
    Memory,
    Unmeasured,
}

/// What a case's body measures: validation error, median time in microseconds, and the peak
/// engine tensor bytes where the case tracks them.
pub struct Measured {
    pub err: f64,
    pub time_us: f64,
    pub peak_bytes: Option<usize>,
}

pub struct Case {
    pub name: String,
    pub shape: String,
    pub flops: f64,
    pub bytes: f64,
    pub bound: Bound,
    pub backend: &'static str,
    /// The element type of the kernel's inputs and outputs; bf16 rows validate at bf16's
    /// precision.
    pub dtype: &'static str,
    pub body: Box<dyn FnOnce(f64) -> Result<Measured>>,
}

impl Case {
    pub fn run(self, peak: &mut Peak, quick: bool) -> Result<Record> {
        let budget = if quick { 0.15 } else { 0.6 };
        match self.bound {
            Bound::Compute => peak.refresh_flops(),
            Bound::ComputeBf16 => peak.refresh_bf16_flops(),
            _ => {}
        }
        let Measured {
            err,
            time_us,
            peak_bytes,
        } = (self.body)(budget)?;
        let (gflops, gbps) = (self.flops / time_us / 1e3, self.bytes / time_us / 1e3);
        let (achieved, roofline) = match self.bound {
            Bound::Compute => (gflops, peak.gflops),
            Bound::ComputeBf16 => (gflops, peak.bf16_gflops),
            Bound::Memory => (gbps, peak.gbps),
            Bound::Unmeasured => (f64::NAN, f64::NAN),
        };
        let pct = 100.0 * achieved / roofline;
        Ok(Record {
            kernel: self.name,
            backend: self.backend,
            dtype: self.dtype,
            shape: self.shape,
            time_us,
            gflops,
            gbps,
            pct_of_peak: pct,
            max_rel_err: err,
            roofline,
            peak_bytes,
        })
    }
}

/// Deterministic pseudo-random values in [-1, 1] (a hash, so no RNG state is shared).
pub fn data(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
            z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn all(quick: bool) -> Vec<Case> {
    let tokens = if quick { 256 } else { 1024 };
    let models: &[Model] = if quick {
        &[SMOLLM2_135M]
    } else {
        &[SMOLLM2_135M, QWEN2_1_5B]
    };
    let mut v = vec![gemm("gemm 1024^3", 1024, 1024, 1024, false)];
    for m in models {
        v.push(gemm(
            &format!("gemm {} up_proj", m.name),
            tokens,
            m.ffn,
            m.hidden,
            true,
        ));
        v.push(gemm(
            &format!("gemm {} down_proj", m.name),
            tokens,
            m.hidden,
            m.ffn,
            true,
        ));
    }
    // The frozen-weight GEMMs of `--dtype bf16`: the forward x . W^T and the input gradient
    // dY . W, bf16 x bf16 -> f32, where the CPU has AVX512-BF16 (rated against the bf16 peak)
    // or AVX2 + FMA (widened as packed, rated against the f32 peak); then as training runs
    // them under autocast, with the f32 activation rounded in packing, including the fused LM
    // head's two products over one chunk of rows (the engine's 64 MiB of f32 logits).
    if bft_kernels::cpu::bf16_gemm::supported() {
        for m in models {
            v.push(gemm_bf16(
                &format!("gemm bf16 {} up_proj", m.name),
                tokens,
                m.ffn,
                m.hidden,
                true,
                false,
            ));
            v.push(gemm_bf16(
                &format!("gemm bf16 {} up_proj dX", m.name),
                tokens,
                m.hidden,
                m.ffn,
                false,
                false,
            ));
            v.push(gemm_bf16(
                &format!("gemm bf16 {} down_proj", m.name),
                tokens,
                m.hidden,
                m.ffn,
                true,
                false,
            ));
        }
        let m = SMOLLM2_135M;
        let chunk = bft_kernels::cpu::lm_head::chunk_rows(m.vocab, 4, 64 << 20);
        v.push(gemm_bf16(
            &format!("gemm bf16 {} up_proj, f32 x", m.name),
            tokens,
            m.ffn,
            m.hidden,
            true,
            true,
        ));
        v.push(gemm_bf16(
            &format!("gemm bf16 {} k_proj, f32 x", m.name),
            tokens,
            m.kv_heads * m.head_dim,
            m.hidden,
            true,
            true,
        ));
        v.push(gemm_bf16(
            &format!("gemm bf16 {} lm_head x.W^T, f32 x", m.name),
            chunk,
            m.vocab,
            m.hidden,
            true,
            true,
        ));
        v.push(gemm_bf16(
            &format!("gemm bf16 {} lm_head P.W, f32 P", m.name),
            chunk,
            m.hidden,
            m.vocab,
            false,
            true,
        ));
    }
    // The two input gradients of a LoRA up-projection `u B^T` (rank 16) of the widest
    // projection (gate/up): one pass over the upstream gradient, and the two f32 GEMMs it
    // replaces.
    for m in models {
        for fused in [true, false] {
            v.push(thin_grads(m, tokens, 16, fused));
        }
    }
    for m in models {
        for t in if quick {
            vec![512]
        } else {
            vec![512, 1024, 2048]
        } {
            v.push(attention_fwd(m, t));
        }
    }
    for t in if quick {
        vec![512, 1024]
    } else {
        vec![512, 1024, 2048]
    } {
        v.push(attention_fwd_bwd(&SMOLLM2_135M, t, false));
    }
    // The same under bf16 autocast (`causal_attention_autocast`: the AVX512-BF16 kernels where
    // the CPU has them, else the f32 ones), at the training benchmark's shape and one longer.
    if bft_kernels::cpu::bf16_gemm::available() {
        for t in [256, 1024] {
            v.push(attention_fwd_bwd(&SMOLLM2_135M, t, true));
        }
        // The AVX512-BF16 kernels alone, forward and backward apart, at one training step's
        // layer: batch 4 x 256 tokens.
        v.push(attention_bf16_kernel(&SMOLLM2_135M, 4, 256, false));
        v.push(attention_bf16_kernel(&SMOLLM2_135M, 4, 256, true));
    }
    let head = if quick {
        (SMOLLM2_135M, 512)
    } else {
        (QWEN2_1_5B, 4096)
    };
    v.push(lm_loss(&head.0, head.1, true));
    v.push(lm_loss(&head.0, head.1, false));
    for m in models {
        v.push(rmsnorm_fwd(m, tokens));
        v.push(swiglu_fwd(m, tokens));
        v.push(rope_fwd(m, tokens));
        v.push(embedding_gather(m, tokens));
        v.push(softmax_fwd(m, tokens / 4));
        v.push(nll_fwd(m, tokens / 4));
    }
    v
}

/// `C (m, n) = A (m, k) . B (n, k)^T` when `tb` (a linear layer), else `A . B (k, n)`.
fn gemm(name: &str, m: usize, n: usize, k: usize, tb: bool) -> Case {
    let body = move |budget: f64| {
        let (a, b) = (data(m * k, 1), data(k * n, 2));
        let mut c = vec![0.0f32; m * n];
        let dims = GemmDims { batch: 1, m, n, k };
        let ao = Operand {
            data: &a,
            trans: false,
            batch_stride: 0,
        };
        let bo = Operand {
            data: &b,
            trans: tb,
            batch_stride: 0,
        };
        matmul(dims, ao, bo, &mut c, false);
        let err = sampled_error((m, n, k, tb), &c, |i| a[i] as f64, |i| b[i] as f64);
        let t = median_us(budget, || matmul(dims, ao, bo, &mut c, false));
        Ok(Measured {
            err,
            time_us: t,
            peak_bytes: None,
        })
    };
    Case {
        name: name.into(),
        shape: gemm_shape(m, n, k, tb),
        flops: 2.0 * (m * n * k) as f64,
        bytes: 4.0 * (m * k + k * n + m * n) as f64,
        bound: Bound::Compute,
        backend: "cpu",
        dtype: "f32",
        body: Box::new(body),
    }
}

/// `A (m, k) . B`, B stored `(n, k)` and read transposed when `tb`, else `(k, n)`.
fn gemm_shape(m: usize, n: usize, k: usize, tb: bool) -> String {
    if tb {
        format!("{m}x{k} . ({n}x{k})^T")
    } else {
        format!("{m}x{k} . {k}x{n}")
    }
}

/// The relative error of 512 sampled entries of `c = A . op(B)` (sizes `(m, n, k, tb)`, as in
/// `gemm_shape`) against f64 dot products of the operands' values.
fn sampled_error(
    (m, n, k, tb): (usize, usize, usize, bool),
    c: &[f32],
    a: impl Fn(usize) -> f64,
    b: impl Fn(usize) -> f64,
) -> f64 {
    let samples: Vec<(usize, usize)> = (0..512)
        .map(|s| ((s * 7919) % m, (s * 104_729) % n))
        .collect();
    let got: Vec<f32> = samples.iter().map(|&(i, j)| c[i * n + j]).collect();
    let want: Vec<f64> = samples
        .iter()
        .map(|&(i, j)| {
            (0..k)
                .map(|p| a(i * k + p) * b(if tb { j * k + p } else { p * n + j }))
                .sum()
        })
        .collect();
    rel_err(&got, &want)
}

/// As `gemm`, with a bf16 weight B and an f32 result through `bf16_gemm`. A is bf16 too, or
/// with `f32_a` an f32 activation the kernel rounds to bf16 as it packs it (`--dtype bf16`'s
/// autocast). Validated against the f64 product of the bf16 values the kernel reads.
/// `du = g . b` and `db = g^T . u` for `g (tokens, ffn)`, `b (ffn, r)`, `u (tokens, r)`: by
/// `cpu::thin` in one pass over `g` (`fused`), or as the two GEMMs the engine ran before it.
fn thin_grads(model: &Model, tokens: usize, r: usize, fused: bool) -> Case {
    let n = model.ffn;
    let body = move |budget: f64| {
        let m = tokens;
        let (g, b, u) = (data(m * n, 1), data(n * r, 2), data(m * r, 3));
        let (mut du, mut db) = (vec![0f32; m * r], vec![0f32; n * r]);
        fn op(data: &[f32], trans: bool) -> Operand<'_, f32> {
            Operand {
                data,
                trans,
                batch_stride: 0,
            }
        }
        let run = |du: &mut [f32], db: &mut [f32]| {
            if fused {
                bft_kernels::cpu::thin::thin_product_grads((m, n, r), &g, &b, &u, du, db);
            } else {
                let (dd, dbd) = (
                    GemmDims {
                        batch: 1,
                        m,
                        n: r,
                        k: n,
                    },
                    GemmDims {
                        batch: 1,
                        m: n,
                        n: r,
                        k: m,
                    },
                );
                matmul(dd, op(&g, false), op(&b, false), du, false);
                matmul(dbd, op(&g, true), op(&u, false), db, false);
            }
        };
        run(&mut du, &mut db);
        let (mut want_du, mut want_db) = (vec![0f64; m * r], vec![0f64; n * r]);
        for i in 0..m {
            for j in 0..n {
                let x = g[i * n + j] as f64;
                for t in 0..r {
                    want_du[i * r + t] += x * b[j * r + t] as f64;
                    want_db[j * r + t] += x * u[i * r + t] as f64;
                }
            }
        }
        let err = rel_err(&du, &want_du).max(rel_err(&db, &want_db));
        let time_us = median_us(budget, || run(&mut du, &mut db));
        Ok(Measured {
            err,
            time_us,
            peak_bytes: None,
        })
    };
    Case {
        name: format!(
            "lora grads {} up_proj r={r}, {}",
            model.name,
            if fused { "one pass" } else { "two GEMMs" }
        ),
        shape: format!("g {tokens}x{n}, B {n}x{r}"),
        flops: 4.0 * (tokens * n * r) as f64,
        bytes: 4.0 * (tokens * n + 2 * (tokens + n) * r) as f64,
        bound: Bound::Compute,
        backend: "cpu",
        dtype: "f32",
        body: Box::new(body),
    }
}

fn gemm_bf16(name: &str, m: usize, n: usize, k: usize, tb: bool, f32_a: bool) -> Case {
    use bft_kernels::cpu::bf16_gemm::matmul_bf16;
    use half::bf16;
    let body = move |budget: f64| {
        let a32 = data(m * k, 1);
        let a16: Vec<bf16> = a32.iter().map(|&x| bf16::from_f32(x)).collect();
        let b: Vec<bf16> = data(k * n, 2).into_iter().map(bf16::from_f32).collect();
        let mut c = vec![0.0f32; m * n];
        let dims = GemmDims { batch: 1, m, n, k };
        let bo = Operand {
            data: &b[..],
            trans: tb,
            batch_stride: 0,
        };
        let run = |c: &mut [f32]| {
            if f32_a {
                let ao = Operand {
                    data: &a32[..],
                    trans: false,
                    batch_stride: 0,
                };
                matmul_bf16(dims, ao, bo, c, false)
            } else {
                let ao = Operand {
                    data: &a16[..],
                    trans: false,
                    batch_stride: 0,
                };
                matmul_bf16(dims, ao, bo, c, false)
            }
        };
        ensure!(run(&mut c), "bf16 GEMM unavailable");
        let err = sampled_error((m, n, k, tb), &c, |i| a16[i].to_f64(), |i| b[i].to_f64());
        let t = median_us(budget, || {
            run(&mut c);
        });
        Ok(Measured {
            err,
            time_us: t,
            peak_bytes: None,
        })
    };
    Case {
        name: name.into(),
        shape: gemm_shape(m, n, k, tb),
        flops: 2.0 * (m * n * k) as f64,
        bytes: (if f32_a { 4.0 } else { 2.0 }) * (m * k) as f64
            + 2.0 * (k * n) as f64
            + 4.0 * (m * n) as f64,
        bound: if bft_kernels::cpu::bf16_gemm::available() {
            Bound::ComputeBf16
        } else {
            Bound::Compute
        },
        backend: "cpu",
        dtype: "bf16",
        body: Box::new(body),
    }
}

fn attn_dims(m: &Model, t: usize) -> AttnDims {
    AttnDims {
        batch: 1,
        q_heads: m.heads,
        kv_heads: m.kv_heads,
        q_len: t,
        kv_len: t,
        head_dim: m.head_dim,
    }
}

/// Query-key pairs a causal mask keeps, times heads: the work unit of attention.
fn causal_pairs(d: &AttnDims) -> f64 {
    (d.batch * d.q_heads) as f64 * (d.q_len * (d.q_len + 1) / 2) as f64
}

fn attention_fwd(m: &Model, t: usize) -> Case {
    let m = *m;
    let dims = attn_dims(&m, t);
    let body = move |budget: f64| {
        // Validate on a short sequence of the same heads (the reference is O(T^2) in f64).
        let small = AttnDims {
            q_len: 67,
            kv_len: 67,
            ..dims
        };
        let n = |d: &AttnDims, h: usize| d.batch * h * d.q_len * d.head_dim;
        let (q, k, v) = (
            data(n(&small, m.heads), 3),
            data(n(&small, m.kv_heads), 4),
            data(n(&small, m.kv_heads), 5),
        );
        let (mut o, mut lse) = (vec![0.0f32; q.len()], vec![0.0f32; m.heads * small.q_len]);
        let scale = 1.0 / (m.head_dim as f64).sqrt();
        attention_forward(
            small,
            Tiles::default(),
            scale,
            (&q, &k, &v),
            &mut o,
            &mut lse,
        );
        let qd: Vec<f64> = q.iter().map(|&x| x as f64).collect();
        let (kd, vd): (Vec<f64>, Vec<f64>) = (
            k.iter().map(|&x| x as f64).collect(),
            v.iter().map(|&x| x as f64).collect(),
        );
        let mut want = vec![0.0f64; q.len()];
        attention_reference(small, scale, (&qd, &kd, &vd), &mut want);
        let err = rel_err(&o, &want);
        let (q, k, v) = (
            data(n(&dims, m.heads), 3),
            data(n(&dims, m.kv_heads), 4),
            data(n(&dims, m.kv_heads), 5),
        );
        let (mut o, mut lse) = (vec![0.0f32; q.len()], vec![0.0f32; m.heads * t]);
        let time = median_us(budget, || {
            attention_forward(
                dims,
                Tiles::default(),
                scale,
                (&q, &k, &v),
                &mut o,
                &mut lse,
            )
        });
        Ok(Measured {
            err,
            time_us: time,
            peak_bytes: None,
        })
    };
    Case {
        name: format!("attention_fwd {}", m.name),
        shape: format!("T={t} H={}/{} D={}", m.heads, m.kv_heads, m.head_dim),
        // Two matmuls (QK^T and PV) over the kept pairs.
        flops: 4.0 * causal_pairs(&dims) * m.head_dim as f64,
        bytes: 4.0 * (2 * m.heads + 2 * m.kv_heads) as f64 * (t * m.head_dim) as f64,
        bound: Bound::Compute,
        backend: "cpu",
        dtype: "f32",
        body: Box::new(body),
    }
}

/// Forward and backward through the engine on a tape, with the engine's peak tensor memory.
fn attention_fwd_bwd(m: &Model, t: usize, autocast: bool) -> Case {
    let m = *m;
    let dims = attn_dims(&m, t);
    let body = move |budget: f64| {
        let dev = Device::Cpu;
        let shape = |h: usize, t: usize| [1, h, t, m.head_dim];
        // Validate gradients against attention composed from unfused engine ops in f64.
        let err = {
            let tv = 70;
            let mk = |h, seed, dt| Tensor::randn(shape(h, tv), 1.0, seed, dt, &dev);
            let grads = |dt: DType, fused: bool| -> Result<Vec<f64>> {
                let tape = Tape::new();
                let (q, k, v) = (
                    tape.track(&mk(m.heads, 1, dt)?),
                    tape.track(&mk(m.kv_heads, 2, dt)?),
                    tape.track(&mk(m.kv_heads, 3, dt)?),
                );
                let o = if fused && autocast {
                    q.causal_attention_autocast(&k, &v, None)?
                } else if fused {
                    q.causal_attention(&k, &v, None)?
                } else {
                    composed_attention(&q, &k, &v)?
                };
                let w = Tensor::randn(o.dims().to_vec(), 1.0, 4, dt, &dev)?;
                let g = tape.backward(&o.mul(&w)?.sum_all()?)?;
                let mut all = Vec::new();
                for x in [&q, &k, &v] {
                    all.extend(g.get(x).expect("tracked").to_f64_vec()?);
                }
                Ok(all)
            };
            let (fast, want) = (grads(DType::F32, true)?, grads(DType::F64, false)?);
            rel_err(&fast.iter().map(|&x| x as f32).collect::<Vec<_>>(), &want)
        };
        let (q, k, v) = (
            Tensor::randn(shape(m.heads, t), 1.0, 1, DType::F32, &dev)?,
            Tensor::randn(shape(m.kv_heads, t), 1.0, 2, DType::F32, &dev)?,
            Tensor::randn(shape(m.kv_heads, t), 1.0, 3, DType::F32, &dev)?,
        );
        let mut peak = 0;
        let mut failure = None;
        let time = median_us(budget, || {
            memory::reset_peak();
            let run = || -> bft_engine::Result<()> {
                let tape = Tape::new();
                let (qt, kt, vt) = (tape.track(&q), tape.track(&k), tape.track(&v));
                let o = if autocast {
                    qt.causal_attention_autocast(&kt, &vt, None)?
                } else {
                    qt.causal_attention(&kt, &vt, None)?
                };
                let loss = o.sum_all()?;
                tape.backward(&loss).map(drop)
            };
            if let Err(e) = run() {
                failure = Some(e);
            }
            peak = memory::peak_bytes();
        });
        if let Some(e) = failure {
            return Err(e.into());
        }
        Ok(Measured {
            err,
            time_us: time,
            peak_bytes: Some(peak),
        })
    };
    Case {
        name: format!(
            "attention_fwd_bwd{} {}",
            if autocast { " bf16" } else { "" },
            m.name
        ),
        shape: format!("T={t} H={}/{} D={}", m.heads, m.kv_heads, m.head_dim),
        // FlashAttention's convention: backward = 2.5x forward FLOPs.
        flops: 3.5 * 4.0 * causal_pairs(&dims) * m.head_dim as f64,
        bytes: 4.0 * 2.0 * (2 * m.heads + 2 * m.kv_heads) as f64 * (t * m.head_dim) as f64,
        // Under autocast: rated against the bf16 peak, and validated at bf16's tolerance.
        bound: if autocast {
            Bound::ComputeBf16
        } else {
            Bound::Compute
        },
        backend: "cpu",
        dtype: if autocast { "bf16" } else { "f32" },
        body: Box::new(body),
    }
}

/// bf16 attention's forward or backward kernel (`attention_bf16`) at `batch` sequences of `t`,
/// validated against the f32 kernel's output (or gradients) at the same shape.
fn attention_bf16_kernel(m: &Model, batch: usize, t: usize, backward: bool) -> Case {
    use bft_kernels::cpu::attention::attention_backward;
    use bft_kernels::cpu::attention_bf16::{attention_backward_bf16, attention_forward_bf16};
    let m = *m;
    let dims = AttnDims {
        batch,
        ..attn_dims(&m, t)
    };
    let body = move |budget: f64| {
        let (nq, nk) = (
            batch * m.heads * t * m.head_dim,
            batch * m.kv_heads * t * m.head_dim,
        );
        let (q, k, v, dout) = (data(nq, 1), data(nk, 2), data(nk, 3), data(nq, 4));
        let scale = 1.0 / (m.head_dim as f64).sqrt();
        let lse_len = batch * m.heads * t;
        let f32_forward = || {
            let (mut o, mut lse) = (vec![0f32; nq], vec![0f32; lse_len]);
            attention_forward(
                dims,
                Tiles::default(),
                scale,
                (&q, &k, &v),
                &mut o,
                &mut lse,
            );
            (o, lse)
        };
        let (o, lse) = f32_forward();
        let wide = |x: &[f32]| x.iter().map(|&e| e as f64).collect::<Vec<f64>>();
        let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
        let (mut ob, mut lb) = (vec![0f32; nq], vec![0f32; lse_len]);
        let mut run = || {
            if backward {
                let saved = (&o[..], &lse[..], &dout[..]);
                attention_backward_bf16(dims, scale, (&q, &k, &v), saved, &mut dq, &mut dk, &mut dv)
            } else {
                attention_forward_bf16(dims, scale, (&q, &k, &v), &mut ob, &mut lb)
            }
        };
        ensure!(run(), "the bf16 attention kernel declined these shapes");
        let time = median_us(budget, || {
            run();
        });
        // The last timed call's outputs (every call writes the same ones).
        let err = if backward {
            let (mut wq, mut wk, mut wv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
            attention_backward(
                dims,
                Tiles::default(),
                scale,
                (&q, &k, &v),
                (&o, &lse, &dout),
                &mut wq,
                &mut wk,
                &mut wv,
            );
            let got: Vec<f32> = [&dq, &dk, &dv].into_iter().flatten().copied().collect();
            let want: Vec<f32> = [&wq, &wk, &wv].into_iter().flatten().copied().collect();
            rel_err(&got, &wide(&want))
        } else {
            rel_err(&ob, &wide(&o))
        };
        Ok(Measured {
            err,
            time_us: time,
            peak_bytes: None,
        })
    };
    Case {
        name: format!(
            "attention bf16 kernel {} {}",
            if backward { "backward" } else { "forward" },
            m.name
        ),
        shape: format!(
            "B={batch} T={t} H={}/{} D={}",
            m.heads, m.kv_heads, m.head_dim
        ),
        // FlashAttention's convention: the backward is 2.5x the forward's FLOPs.
        flops: if backward { 2.5 } else { 1.0 } * 4.0 * causal_pairs(&dims) * m.head_dim as f64,
        bytes: 4.0 * (2 * m.heads + 2 * m.kv_heads) as f64 * (batch * t * m.head_dim) as f64,
        bound: Bound::ComputeBf16,
        backend: "cpu",
        dtype: "bf16",
        body: Box::new(body),
    }
}

/// Attention from unfused ops (materialises T x T scores per head), the check for the fused op.
fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> bft_engine::Result<Tensor> {
    let (hq, hk, t, d) = (q.dims()[1], k.dims()[1], q.dims()[2], q.dims()[3]);
    let mask: Vec<f64> = (0..t * t)
        .map(|i| if i % t > i / t { -1e30 } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, [t, t], &Device::Cpu)?.to_dtype(q.dtype())?;
    let heads = (0..hq)
        .map(|h| {
            let (qh, kh, vh) = (
                q.narrow(1, h, 1)?,
                k.narrow(1, h / (hq / hk), 1)?,
                v.narrow(1, h / (hq / hk), 1)?,
            );
            let s = qh
                .matmul_t(&kh, false, true)?
                .scale(1.0 / (d as f64).sqrt())?;
            s.add(&mask)?.softmax()?.matmul(&vh)
        })
        .collect::<bft_engine::Result<Vec<_>>>()?;
    Tensor::cat(&heads, 1)
}

/// A memory-bound case over `inputs` buffers producing `out_len` values.
fn elementwise(
    name: String,
    shape: String,
    bytes: f64,
    flops: f64,
    mut run: impl FnMut(&mut [f32]) + 'static,
    out_len: usize,
    want: impl Fn() -> Vec<f64> + 'static,
) -> Case {
    let body = move |budget: f64| {
        let mut out = vec![0.0f32; out_len];
        run(&mut out);
        let err = rel_err(&out, &want());
        let time = median_us(budget, || run(&mut out));
        Ok(Measured {
            err,
            time_us: time,
            peak_bytes: None,
        })
    };
    Case {
        name,
        shape,
        flops,
        bytes,
        bound: Bound::Memory,
        backend: "cpu",
        dtype: "f32",
        body: Box::new(body),
    }
}

fn rmsnorm_fwd(m: &Model, tokens: usize) -> Case {
    let c = m.hidden;
    let (x, w) = (
        std::rc::Rc::new(data(tokens * c, 6)),
        std::rc::Rc::new(data(c, 7)),
    );
    let (x2, w2) = (x.clone(), w.clone());
    let mut rstd = vec![0.0f32; tokens];
    let run = move |out: &mut [f32]| rmsnorm::rmsnorm(&x, &w, 1e-5, out, &mut rstd);
    elementwise(
        format!("rmsnorm_fwd {}", m.name),
        format!("{tokens}x{c}"),
        4.0 * (2 * tokens * c) as f64,
        4.0 * (tokens * c) as f64,
        run,
        tokens * c,
        move || reference::rmsnorm(&x2, &w2, 1e-5),
    )
}

fn swiglu_fwd(m: &Model, tokens: usize) -> Case {
    let n = tokens * m.ffn;
    let (g, u) = (std::rc::Rc::new(data(n, 8)), std::rc::Rc::new(data(n, 9)));
    let (g2, u2) = (g.clone(), u.clone());
    elementwise(
        format!("swiglu_fwd {}", m.name),
        format!("{tokens}x{}", m.ffn),
        4.0 * (3 * n) as f64,
        6.0 * n as f64,
        move |out| unary::swiglu(&g, &u, out),
        n,
        move || reference::swiglu(&g2, &u2),
    )
}

fn rope_fwd(m: &Model, tokens: usize) -> Case {
    let (h, d) = (m.heads, m.head_dim);
    let x = std::rc::Rc::new(data(h * tokens * d, 10));
    let (cos, sin) = rope::rope_tables(&rope::default_inv_freq(10_000.0, d), tokens, 0);
    let (cf, sf): (Vec<f32>, Vec<f32>) = (
        cos.iter().map(|&v| v as f32).collect(),
        sin.iter().map(|&v| v as f32).collect(),
    );
    let x2 = x.clone();
    elementwise(
        format!("rope_fwd {}", m.name),
        format!("H={h} T={tokens} D={d}"),
        4.0 * (2 * h * tokens * d + tokens * d) as f64,
        3.0 * (h * tokens * d) as f64,
        move |out| rope::rope(&x, &cf, &sf, tokens, d, false, out),
        h * tokens * d,
        move || reference::rope(&x2, &cos, &sin, tokens, d),
    )
}

fn embedding_gather(m: &Model, tokens: usize) -> Case {
    let c = m.hidden;
    let table = std::rc::Rc::new(data(m.vocab * c, 11));
    let ids: std::rc::Rc<Vec<u32>> =
        std::rc::Rc::new((0..tokens).map(|i| ((i * 7919) % m.vocab) as u32).collect());
    let (t2, i2) = (table.clone(), ids.clone());
    elementwise(
        format!("embedding_gather {}", m.name),
        format!("{tokens} ids of {}x{c}", m.vocab),
        4.0 * (2 * tokens * c) as f64,
        0.0,
        move |out| embedding::gather(&table, c, &ids, out),
        tokens * c,
        move || {
            i2.iter()
                .flat_map(|&i| {
                    t2[i as usize * c..(i as usize + 1) * c]
                        .iter()
                        .map(|&v| v as f64)
                })
                .collect()
        },
    )
}

fn softmax_fwd(m: &Model, rows: usize) -> Case {
    let x = std::rc::Rc::new(data(rows * m.vocab, 12));
    let (x2, v) = (x.clone(), m.vocab);
    elementwise(
        format!("softmax_fwd {}", m.name),
        format!("{rows}x{v}"),
        4.0 * (2 * rows * v) as f64,
        4.0 * (rows * v) as f64,
        move |out| softmax::softmax(&x, v, false, out),
        rows * v,
        move || reference::softmax(&x2, v),
    )
}

/// Unfused cross-entropy over full logits rows (what the fused loss will replace).
fn nll_fwd(m: &Model, rows: usize) -> Case {
    let v = m.vocab;
    let x = std::rc::Rc::new(data(rows * v, 13));
    let y: std::rc::Rc<Vec<u32>> =
        std::rc::Rc::new((0..rows).map(|i| ((i * 31) % v) as u32).collect());
    let (x2, y2) = (x.clone(), y.clone());
    let mut lse = vec![0.0f32; rows];
    elementwise(
        format!("nll_fwd {}", m.name),
        format!("{rows}x{v}"),
        4.0 * (rows * v) as f64,
        3.0 * (rows * v) as f64,
        move |out| nll::nll(&x, v, &y, out, &mut lse),
        rows,
        move || reference::nll(&x2, v, &y2),
    )
}

/// Fails loudly if a case's validation error is out of bounds (f32 kernels vs f64 references).
pub fn check_error(r: &Record) -> Result<()> {
    // One bf16 rounding is 2^-9 relative; sums of bf16 products stay within 1e-2 of the scale.
    let limit = if r.dtype == "bf16" { 1e-2 } else { 1e-4 };
    ensure!(
        r.max_rel_err < limit,
        "{} failed validation: max_rel_err {:.2e}",
        r.kernel,
        r.max_rel_err
    );
    Ok(())
}

/// BFT loss forward + backward through the LM head (frozen, as with LoRA), fused or composed
/// from unfused engine ops. `peak_bytes` is the tensor memory the loss adds on top of its
/// inputs (hidden states and head).
fn lm_loss(m: &Model, tokens: usize, fused: bool) -> Case {
    use bft_trainer::loss::{Bft, LossBatch, LossOptions, fused_loss, unfused_loss};
    let m = *m;
    let body = move |_budget: f64| {
        let dev = Device::Cpu;
        // Four samples; every position is a valid target.
        let (b, t) = (4, tokens / 4);
        let x = Tensor::randn([b, t, m.hidden], 1.0, 1, DType::F32, &dev)?;
        let w = Tensor::randn([m.vocab, m.hidden], 0.02, 2, DType::F32, &dev)?;
        let targets: Vec<u32> = (0..tokens).map(|i| ((i * 7919) % m.vocab) as u32).collect();
        let mask = vec![true; tokens];
        let bft = Bft::default();
        let run = |fused: bool| -> Result<(f64, Vec<f64>)> {
            let tape = Tape::new();
            let xt = tape.track(&x);
            let batch = LossBatch {
                hidden: &xt,
                head: &w,
                targets: &targets,
                mask: &mask,
            };
            let out = if fused {
                fused_loss(batch, &bft, LossOptions::default())?
            } else {
                unfused_loss(batch, &bft, LossOptions::default())?
            };
            let g = tape.backward(&out.loss)?;
            Ok((
                out.loss.to_scalar()?,
                g.get(&xt).expect("tracked").to_f64_vec()?,
            ))
        };
        // Validate: the fused loss and its gradient against the unfused composition, on the
        // first micro-run of each (same inputs).
        let mut base = 0;
        let mut peak = 0;
        let mut result = None;
        let time = median_us(0.0, || {
            base = memory::live_bytes();
            memory::reset_peak();
            result = Some(run(fused));
            peak = memory::peak_bytes() - base;
        });
        let (loss, grad) = result.expect("ran")?;
        let err = if fused {
            let (l2, g2) = run(false)?;
            let scale = g2.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            let gerr = grad
                .iter()
                .zip(&g2)
                .fold(0.0f64, |a, (p, q)| a.max((p - q).abs()))
                / scale;
            gerr.max((loss - l2).abs() / l2.abs())
        } else {
            0.0
        };
        Ok(Measured {
            err,
            time_us: time,
            peak_bytes: Some(peak),
        })
    };
    Case {
        name: format!(
            "bft_loss_{} {}",
            if fused { "fused" } else { "unfused" },
            m.name
        ),
        shape: format!("{tokens} tok, V={} C={}", m.vocab, m.hidden),
        // Useful work: the logits GEMM and the dX GEMM (the fused kernel also recomputes logits).
        flops: 4.0 * (tokens * m.vocab * m.hidden) as f64,
        bytes: 4.0 * (m.vocab * m.hidden + 2 * tokens * m.hidden) as f64,
        bound: Bound::Compute,
        backend: "cpu",
        dtype: "f32",
        body: Box::new(body),
    }
}
