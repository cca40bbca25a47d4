//! Kernel rows for the CUDA backend at Qwen2-1.5B's shapes (DeepSeek-R1-Distill-Qwen-1.5B):
//! each kernel is validated against the CPU kernel on the bf16-rounded inputs of the timed
//! shape, then timed to completion (`Cuda::sync` after each run). There is no measured device
//! roofline yet, so rows report GFLOP/s and GB/s without a percentage.

use crate::cases::{Bound, Case, Measured, data};
use crate::timing::{median_us, rel_err};
use anyhow::Result;
use bft_kernels::cpu;
use bft_kernels::cpu::attention::{AttnDims, Tiles};
use bft_kernels::cpu::matmul::GemmDims;
use bft_kernels::cuda::ops::{self, Operand};
use bft_kernels::cuda::{Cuda, DeviceBuffer};
use std::sync::Arc;

const HIDDEN: usize = 1536;
const FFN: usize = 8960;
const VOCAB: usize = 151_936;
/// LoRA r = 16 on the 7 linear layers of each of the 28 layers.
const LORA_PARAMS: usize = 28 * 16 * (2 * (1536 + 1536) + 2 * (1536 + 256) + 3 * (1536 + 8960));

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| f32::from_bits((x.to_bits() + 0x7fff + ((x.to_bits() >> 16) & 1)) & 0xffff_0000))
        .collect()
}

fn up_bf16(d: &Arc<Cuda>, v: &[f32]) -> Result<DeviceBuffer> {
    let bits: Vec<u16> = bf16_round(v)
        .iter()
        .map(|x| (x.to_bits() >> 16) as u16)
        .collect();
    Ok(d.upload(bytemuck::cast_slice(&bits))?)
}

fn up_f32(d: &Arc<Cuda>, v: &[f32]) -> Result<DeviceBuffer> {
    Ok(d.upload(bytemuck::cast_slice(v))?)
}

fn down_bf16(d: &Arc<Cuda>, b: &DeviceBuffer) -> Result<Vec<f32>> {
    let bits: Vec<u16> = bytemuck::pod_collect_to_vec(&d.read(b)?);
    Ok(bits
        .iter()
        .map(|&h| f32::from_bits((h as u32) << 16))
        .collect())
}

fn down_f32(d: &Arc<Cuda>, b: &DeviceBuffer) -> Result<Vec<f32>> {
    Ok(bytemuck::pod_collect_to_vec(&d.read(b)?))
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Times `f` (which queues work) to completion on the device.
fn time(d: &Arc<Cuda>, budget: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut failed = None;
    let t = median_us(budget, || {
        if let Err(e) = f().and_then(|()| Ok(d.sync()?)) {
            failed.get_or_insert(e);
        }
    });
    failed.map_or(Ok(t), Err)
}

/// Device memory in use, in bytes (the caching allocator keeps what a case allocated).
fn used(d: &Arc<Cuda>) -> Result<usize> {
    let (free, total) = d.memory()?;
    Ok(total - free)
}

fn case(
    name: &str,
    shape: String,
    work: (f64, f64),
    body: impl FnOnce(f64) -> Result<Measured> + 'static,
) -> Case {
    Case {
        name: name.into(),
        shape,
        flops: work.0,
        bytes: work.1,
        bound: Bound::Unmeasured,
        backend: "cuda",
        dtype: "bf16",
        body: Box::new(body),
    }
}

pub fn all(d: &Arc<Cuda>, quick: bool) -> Vec<Case> {
    let tokens = if quick { 256 } else { 2048 };
    vec![
        gemm(d, tokens),
        attention(d, tokens, false),
        attention(d, tokens, true),
        rmsnorm(d, tokens),
        fused_loss(d, if quick { 512 } else { 8192 }),
        adamw(d, if quick { LORA_PARAMS / 16 } else { LORA_PARAMS }),
    ]
}

/// The MLP up projection: (T, 1536) . (8960, 1536)^T, bf16 in, f32 accumulation, bf16 out.
fn gemm(d: &Arc<Cuda>, t: usize) -> Case {
    let d = d.clone();
    let body = move |budget: f64| -> Result<Measured> {
        let (x, w) = (
            bf16_round(&data(t * HIDDEN, 1)),
            bf16_round(&data(FFN * HIDDEN, 2)),
        );
        let dims = GemmDims {
            batch: 1,
            m: t,
            n: FFN,
            k: HIDDEN,
        };
        let mut want = vec![0.0f32; t * FFN];
        let op = |data, trans| cpu::matmul::Operand {
            data,
            trans,
            batch_stride: 0,
        };
        cpu::matmul::matmul(dims, op(&x, false), op(&w, true), &mut want, false);
        let (xd, wd) = (up_bf16(&d, &x)?, up_bf16(&d, &w)?);
        let run = || {
            ops::gemm(
                &d,
                dims,
                Operand::new(&xd, false),
                (Operand::new(&wd, true), true),
                false,
            )
        };
        let err = rel_err(&down_bf16(&d, &run()?)?, &wide(&want));
        let t_us = time(&d, budget, || run().map(drop).map_err(Into::into))?;
        Ok(Measured {
            err,
            time_us: t_us,
            peak_bytes: None,
        })
    };
    let flops = 2.0 * (t * FFN * HIDDEN) as f64;
    let bytes = 2.0 * (t * HIDDEN + FFN * HIDDEN + t * FFN) as f64;
    case(
        "cuda gemm qwen2-1.5b up_proj",
        format!("{t}x{HIDDEN} . ({FFN}x{HIDDEN})^T"),
        (flops, bytes),
        body,
    )
}

/// Causal attention, 12 query heads over 2 K/V heads, head_dim 128, forward or backward.
fn attention(d: &Arc<Cuda>, t: usize, backward: bool) -> Case {
    let d = d.clone();
    let dims = AttnDims {
        batch: 1,
        q_heads: 12,
        kv_heads: 2,
        q_len: t,
        kv_len: t,
        head_dim: 128,
    };
    let body = move |budget: f64| -> Result<Measured> {
        let nq = 12 * t * 128;
        let nk = 2 * t * 128;
        let (q, k, v, dout) = (
            bf16_round(&data(nq, 3)),
            bf16_round(&data(nk, 4)),
            bf16_round(&data(nk, 5)),
            bf16_round(&data(nq, 6)),
        );
        let scale = 1.0 / (128f64).sqrt();
        let (mut o, mut lse) = (vec![0.0f32; nq], vec![0.0f32; 12 * t]);
        cpu::attention::attention_forward(
            dims,
            Tiles::default(),
            scale,
            (&q, &k, &v),
            &mut o,
            &mut lse,
        );
        let (qd, kd, vd, dod) = (
            up_bf16(&d, &q)?,
            up_bf16(&d, &k)?,
            up_bf16(&d, &v)?,
            up_bf16(&d, &dout)?,
        );
        let fwd = || ops::attention_forward(&d, dims, scale as f32, (&qd, &kd, &vd));
        let (od, ld) = fwd()?;
        if !backward {
            let err = rel_err(&down_bf16(&d, &od)?, &wide(&o));
            let t_us = time(&d, budget, || fwd().map(drop).map_err(Into::into))?;
            return Ok(Measured {
                err,
                time_us: t_us,
                peak_bytes: None,
            });
        }
        let o16 = down_bf16(&d, &od)?;
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; nq], vec![0.0f32; nk], vec![0.0f32; nk]);
        cpu::attention::attention_backward(
            dims,
            Tiles::default(),
            scale,
            (&q, &k, &v),
            (&o16, &lse, &dout),
            &mut dq,
            &mut dk,
            &mut dv,
        );
        let bwd =
            || ops::attention_backward(&d, dims, scale as f32, (&qd, &kd, &vd), (&od, &ld, &dod));
        let err = rel_err(&down_bf16(&d, &bwd()?.0)?, &wide(&dq));
        let t_us = time(&d, budget, || bwd().map(drop).map_err(Into::into))?;
        Ok(Measured {
            err,
            time_us: t_us,
            peak_bytes: None,
        })
    };
    // Causal: half the score matrix; forward 4 T^2 D per head, backward 2.5 times that.
    let fwd_flops = 2.0 * 12.0 * (t * t * 128) as f64;
    let flops = if backward { 2.5 * fwd_flops } else { fwd_flops };
    let bytes = 2.0 * (2 * 12 * t * 128 + 2 * 2 * t * 128) as f64;
    let name = if backward {
        "cuda attention_bwd qwen2-1.5b"
    } else {
        "cuda attention_fwd qwen2-1.5b"
    };
    case(name, format!("T={t} H=12/2 D=128"), (flops, bytes), body)
}

/// RMSNorm with the residual add fused, (T, 1536).
fn rmsnorm(d: &Arc<Cuda>, t: usize) -> Case {
    let d = d.clone();
    let body = move |budget: f64| -> Result<Measured> {
        let (x, r, w) = (
            bf16_round(&data(t * HIDDEN, 7)),
            bf16_round(&data(t * HIDDEN, 8)),
            bf16_round(&data(HIDDEN, 9)),
        );
        let h: Vec<f32> = bf16_round(&x.iter().zip(&r).map(|(a, b)| a + b).collect::<Vec<_>>());
        let (mut y, mut rstd) = (vec![0.0f32; t * HIDDEN], vec![0.0f32; t]);
        cpu::rmsnorm::rmsnorm(&h, &w, 1e-6, &mut y, &mut rstd);
        let (xd, rd, wd) = (up_bf16(&d, &x)?, up_bf16(&d, &r)?, up_bf16(&d, &w)?);
        let run = || ops::rmsnorm_forward(&d, &xd, Some(&rd), &wd, (t, HIDDEN), 1e-6);
        let err = rel_err(&down_bf16(&d, &run()?.1)?, &wide(&y));
        let t_us = time(&d, budget, || run().map(drop).map_err(Into::into))?;
        Ok(Measured {
            err,
            time_us: t_us,
            peak_bytes: None,
        })
    };
    let n = (t * HIDDEN) as f64;
    case(
        "cuda rmsnorm_residual_fwd qwen2-1.5b",
        format!("{t}x{HIDDEN}"),
        (5.0 * n, 8.0 * n),
        body,
    )
}

/// Rows per logits chunk: about 256 MB of f32 logits at this vocabulary.
fn chunk_rows(vocab: usize) -> usize {
    ((256 << 20) / (4 * vocab)).max(1)
}

/// The fused BFT loss through the LM head, forward and the hidden-state gradient: per chunk of
/// rows, logits by cuBLAS, log-sum-exp and target logit; per sample the window minimum and
/// s_b on the device; then per chunk again, the gradient direction and dX = G W with the
/// target term in f32. `peak_bytes` is the device memory the step adds.
fn fused_loss(d: &Arc<Cuda>, tokens: usize) -> Case {
    let d = d.clone();
    let body = move |budget: f64| -> Result<Measured> {
        let x = bf16_round(&data(tokens * HIDDEN, 10));
        let w: Vec<f32> = bf16_round(
            &data(VOCAB * HIDDEN, 11)
                .iter()
                .map(|v| 0.05 * v)
                .collect::<Vec<_>>(),
        );
        let targets: Vec<u32> = (0..tokens as u32)
            .map(|i| i.wrapping_mul(2_654_435_761) % VOCAB as u32)
            .collect();
        // Samples of 2048 tokens (the benchmark's sequence length).
        let samples = tokens.div_ceil(2048);
        let offsets: Vec<u32> = (0..=samples)
            .map(|b| (b * 2048).min(tokens) as u32)
            .collect();
        let sample_of: Vec<u32> = (0..tokens).map(|t| (t / 2048) as u32).collect();
        let (xd, wd) = (up_bf16(&d, &x)?, up_bf16(&d, &w)?);
        let up_u32 = |v: &[u32]| d.upload(bytemuck::cast_slice(v));
        let (td, od, sd) = (up_u32(&targets)?, up_u32(&offsets)?, up_u32(&sample_of)?);
        let before = used(&d)?;
        let chunk = chunk_rows(VOCAB);
        let logits = |r0: usize, n: usize| {
            let dims = GemmDims {
                batch: 1,
                m: n,
                n: VOCAB,
                k: HIDDEN,
            };
            let xo = Operand {
                buf: &xd,
                offset: r0 * HIDDEN,
                trans: false,
            };
            ops::gemm(&d, dims, xo, (Operand::new(&wd, true), true), true)
        };
        let run = || -> Result<Vec<f32>> {
            let (lse, tl) = (d.alloc(4 * tokens)?, d.alloc(4 * tokens)?);
            for r0 in (0..tokens).step_by(chunk) {
                let n = chunk.min(tokens - r0);
                ops::head_lse(&d, &logits(r0, n)?, &td, (&lse, &tl), (n, VOCAB, r0))?;
            }
            // log c_t = z[y] - lse: 4 bytes a token through the host.
            let (l, t) = (down_f32(&d, &lse)?, down_f32(&d, &tl)?);
            let logp: Vec<f32> = t.iter().zip(&l).map(|(a, b)| a - b).collect();
            let lpd = up_f32(&d, &logp)?;
            let (_, s_b) =
                ops::sample_weights(&d, &lpd, &od, (samples, tokens), (256, false, 1.0))?;
            let coef = ops::token_coef(
                &d,
                &lpd,
                &sd,
                &od,
                &s_b,
                (tokens, samples as f32),
                true,
                0.0,
            )?;
            for r0 in (0..tokens).step_by(chunk) {
                let n = chunk.min(tokens - r0);
                let g = ops::head_grad(
                    &d,
                    &logits(r0, n)?,
                    &td,
                    (&lse, &coef),
                    (n, VOCAB, r0),
                    false,
                )?;
                let dims = GemmDims {
                    batch: 1,
                    m: n,
                    n: HIDDEN,
                    k: VOCAB,
                };
                let part = ops::gemm(
                    &d,
                    dims,
                    Operand::new(&g, false),
                    (Operand::new(&wd, false), true),
                    true,
                )?;
                // The chunk's rows of dX, what the model's backward takes next.
                ops::head_target_term(&d, (&part, 0), &wd, &td, &coef, (n, HIDDEN, r0))?;
            }
            Ok(l)
        };
        let lse = run()?;
        let peak = used(&d)?.saturating_sub(before);
        // The first rows' log-sum-exp against the host in f64.
        let check = 8.min(tokens);
        let mut want = Vec::with_capacity(check);
        for r in 0..check {
            let row: Vec<f64> = (0..VOCAB)
                .map(|v| {
                    (0..HIDDEN)
                        .map(|c| x[r * HIDDEN + c] as f64 * w[v * HIDDEN + c] as f64)
                        .sum()
                })
                .collect();
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            want.push(m + row.iter().map(|z| (z - m).exp()).sum::<f64>().ln());
        }
        let err = rel_err(&lse[..check], &want);
        let t_us = time(&d, budget, || run().map(drop))?;
        Ok(Measured {
            err,
            time_us: t_us,
            peak_bytes: Some(peak),
        })
    };
    // Two logits GEMMs and the dX GEMM.
    let flops = 3.0 * 2.0 * (tokens * VOCAB * HIDDEN) as f64;
    let bytes = 2.0 * (VOCAB * HIDDEN) as f64 * 3.0;
    case(
        "cuda fused bft loss qwen2-1.5b",
        format!("{tokens}x{HIDDEN} . ({VOCAB}x{HIDDEN})^T"),
        (flops, bytes),
        body,
    )
}

/// Fused AdamW over the LoRA parameters of Qwen2-1.5B (r = 16, all linear layers).
fn adamw(d: &Arc<Cuda>, n: usize) -> Case {
    let d = d.clone();
    let body = move |budget: f64| -> Result<Measured> {
        let (w0, g) = (
            data(n, 12),
            data(n, 13).iter().map(|v| 0.01 * v).collect::<Vec<_>>(),
        );
        let h = cpu::optim::AdamWStep {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bias1: 0.1,
            bias2: 0.001,
            grad_scale: 1.0,
        };
        let (mut w, mut m, mut v) = (w0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        cpu::optim::adamw(&mut w, &g, &mut m, &mut v, &h);
        let (wd, gd) = (up_f32(&d, &w0)?, up_f32(&d, &g)?);
        let (md, vd) = (d.zeros(4 * n)?, d.zeros(4 * n)?);
        let copy = d.alloc(2 * n)?;
        ops::adamw(&d, (&wd, &gd, &md, &vd), Some(&copy), n, &h)?;
        let err = rel_err(&down_f32(&d, &wd)?, &wide(&w));
        let t_us = time(&d, budget, || {
            Ok(ops::adamw(&d, (&wd, &gd, &md, &vd), Some(&copy), n, &h)?)
        })?;
        Ok(Measured {
            err,
            time_us: t_us,
            peak_bytes: None,
        })
    };
    // Read p, g, m, v; write p, m, v and the bf16 copy.
    let bytes = (n * (4 * 7 + 2)) as f64;
    case(
        "cuda adamw lora qwen2-1.5b",
        format!("{n} params"),
        (12.0 * n as f64, bytes),
        body,
    )
}
