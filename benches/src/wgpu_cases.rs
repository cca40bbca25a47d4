//! Kernel rows for the wgpu backend: each WGSL kernel is validated against the CPU kernel on the
//! timed shape, then timed to completion (`Gpu::sync` after each run). There is no measured
//! device roofline yet, so rows report GFLOP/s and GB/s without a percentage.

use crate::cases::{Bound, Case, Measured, data};
use crate::timing::median_us;
use anyhow::Result;
use bft_kernels::cpu;
use bft_kernels::cpu::attention::{AttnDims, Tiles};
use bft_kernels::cpu::matmul::{GemmDims, Operand};
use bft_kernels::wgpu::ops::{self, DeviceOperand};
use bft_kernels::wgpu::{Gpu, GpuBuffer};
use std::sync::Arc;

fn up(g: &Arc<Gpu>, v: &[f32]) -> Result<GpuBuffer> {
    Ok(g.upload(bytemuck::cast_slice(v))?)
}

fn down(g: &Arc<Gpu>, b: &GpuBuffer) -> Result<Vec<f32>> {
    Ok(bytemuck::pod_collect_to_vec(&g.read(b)?))
}

/// `max |a - b| / max |b|` against the CPU kernel's f32 output.
fn err(got: &[f32], want: &[f32]) -> f64 {
    let wide: Vec<f64> = want.iter().map(|&x| x as f64).collect();
    crate::timing::rel_err(got, &wide)
}

/// Times `f` (which records work) to completion on the device.
fn time(g: &Arc<Gpu>, budget: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut failed = None;
    let t = median_us(budget, || {
        if let Err(e) = f().and_then(|()| Ok(g.sync()?)) {
            failed.get_or_insert(e);
        }
    });
    failed.map_or(Ok(t), Err)
}

pub fn all(g: &Arc<Gpu>, quick: bool) -> Vec<Case> {
    let tokens = if quick { 128 } else { 512 };
    let mut v = vec![
        gemm(g, "wgpu gemm smollm2 up_proj", tokens, 1536, 576),
        gemm(g, "wgpu gemm smollm2 down_proj", tokens, 576, 1536),
        attention(g, if quick { 128 } else { 1024 }),
        rmsnorm(g, tokens),
        softmax(g, tokens / 4),
        dispatches(g),
    ];
    if !quick {
        v.insert(0, gemm(g, "wgpu gemm 1024^3", 1024, 1024, 1024));
    }
    v
}

/// `C (m, n) = A (m, k) . B (n, k)^T`: a linear layer.
fn gemm(g: &Arc<Gpu>, name: &str, m: usize, n: usize, k: usize) -> Case {
    let g = g.clone();
    let body = move |budget: f64| -> Result<Measured> {
        let (a, b) = (data(m * k, 1), data(n * k, 2));
        let dims = GemmDims { batch: 1, m, n, k };
        let mut want = vec![0.0f32; m * n];
        let op = |data, trans| Operand {
            data,
            trans,
            batch_stride: 0,
        };
        cpu::matmul::matmul(dims, op(&a, false), op(&b, true), &mut want, false);
        let (ad, bd) = (up(&g, &a)?, up(&g, &b)?);
        let run = || {
            ops::matmul(
                &g,
                dims,
                DeviceOperand {
                    data: &ad,
                    trans: false,
                    batch_stride: 0,
                },
                DeviceOperand {
                    data: &bd,
                    trans: true,
                    batch_stride: 0,
                },
                None,
            )
        };
        let e = err(&down(&g, &run()?)?, &want);
        let t = time(&g, budget, || run().map(drop).map_err(Into::into))?;
        Ok(Measured {
            err: e,
            time_us: t,
            peak_bytes: None,
        })
    };
    Case {
        name: name.into(),
        shape: format!("{m}x{k} . ({n}x{k})^T"),
        flops: 2.0 * (m * n * k) as f64,
        bytes: 4.0 * (m * k + k * n + m * n) as f64,
        bound: Bound::Unmeasured,
        backend: "wgpu",
        dtype: "f32",
        body: Box::new(body),
    }
}

/// SmolLM2-135M's attention: 9 query heads over 3 K/V heads, head_dim 64.
fn attention(g: &Arc<Gpu>, t: usize) -> Case {
    let g = g.clone();
    let dims = AttnDims {
        batch: 1,
        q_heads: 9,
        kv_heads: 3,
        q_len: t,
        kv_len: t,
        head_dim: 64,
    };
    let body = move |budget: f64| -> Result<Measured> {
        let (q, k, v) = (
            data(9 * t * 64, 3),
            data(3 * t * 64, 4),
            data(3 * t * 64, 5),
        );
        let (mut o, mut lse) = (vec![0.0; q.len()], vec![0.0; 9 * t]);
        cpu::attention::attention_forward(
            dims,
            Tiles::default(),
            0.125,
            (&q, &k, &v),
            &mut o,
            &mut lse,
        );
        let (qd, kd, vd) = (up(&g, &q)?, up(&g, &k)?, up(&g, &v)?);
        let run = || ops::attention_forward(&g, dims, 0.125, (&qd, &kd, &vd));
        let e = err(&down(&g, &run()?.0)?, &o);
        let t = time(&g, budget, || run().map(drop).map_err(Into::into))?;
        Ok(Measured {
            err: e,
            time_us: t,
            peak_bytes: None,
        })
    };
    // Causal: about half of the T x T score matrix, QK^T and PV.
    let pairs = (t * (t + 1) / 2) as f64;
    Case {
        name: "wgpu attention_fwd smollm2".into(),
        shape: format!("T={t} H=9/3 D=64"),
        flops: 4.0 * 9.0 * pairs * 64.0,
        bytes: 4.0 * (2 * 9 * t * 64 + 2 * 3 * t * 64) as f64,
        bound: Bound::Unmeasured,
        backend: "wgpu",
        dtype: "f32",
        body: Box::new(body),
    }
}

fn rmsnorm(g: &Arc<Gpu>, rows: usize) -> Case {
    let g = g.clone();
    let cols = 576;
    let body = move |budget: f64| -> Result<Measured> {
        let (x, w) = (data(rows * cols, 6), data(cols, 7));
        let (mut y, mut r) = (vec![0.0; rows * cols], vec![0.0; rows]);
        cpu::rmsnorm::rmsnorm(&x, &w, 1e-5, &mut y, &mut r);
        let (xd, wd) = (up(&g, &x)?, up(&g, &w)?);
        let run = || ops::rmsnorm(&g, &xd, &wd, rows, cols, 1e-5);
        let e = err(&down(&g, &run()?.0)?, &y);
        let t = time(&g, budget, || run().map(drop).map_err(Into::into))?;
        Ok(Measured {
            err: e,
            time_us: t,
            peak_bytes: None,
        })
    };
    Case {
        name: "wgpu rmsnorm_fwd smollm2".into(),
        shape: format!("{rows}x{cols}"),
        flops: 4.0 * (rows * cols) as f64,
        bytes: 8.0 * (rows * cols) as f64,
        bound: Bound::Unmeasured,
        backend: "wgpu",
        dtype: "f32",
        body: Box::new(body),
    }
}

fn softmax(g: &Arc<Gpu>, rows: usize) -> Case {
    let g = g.clone();
    let cols = 49152;
    let body = move |budget: f64| -> Result<Measured> {
        let x: Vec<f32> = data(rows * cols, 8).iter().map(|v| 4.0 * v).collect();
        let mut y = vec![0.0; x.len()];
        cpu::softmax::softmax(&x, cols, false, &mut y);
        let xd = up(&g, &x)?;
        let run = || ops::softmax(&g, &xd, rows, cols, false);
        let e = err(&down(&g, &run()?)?, &y);
        let t = time(&g, budget, || run().map(drop).map_err(Into::into))?;
        Ok(Measured {
            err: e,
            time_us: t,
            peak_bytes: None,
        })
    };
    Case {
        name: "wgpu softmax_fwd smollm2".into(),
        shape: format!("{rows}x{cols}"),
        flops: 4.0 * (rows * cols) as f64,
        bytes: 8.0 * (rows * cols) as f64,
        bound: Bound::Unmeasured,
        backend: "wgpu",
        dtype: "f32",
        body: Box::new(body),
    }
}

/// The runtime's cost per dispatch: 256 chained `scale` ops on 256 values, too small for the
/// kernel to matter (parameters, bind group, recording, batched submission).
fn dispatches(g: &Arc<Gpu>) -> Case {
    let g = g.clone();
    let (n, ops_per_run) = (256, 256);
    let body = move |budget: f64| -> Result<Measured> {
        let x = data(n, 9);
        let xd = up(&g, &x)?;
        let run = || -> Result<GpuBuffer> {
            let mut y = ops::scale(&g, 1.0, &xd, n)?;
            for _ in 1..ops_per_run {
                y = ops::scale(&g, 1.0, &y, n)?;
            }
            Ok(y)
        };
        let e = err(&down(&g, &run()?)?, &x);
        let t = time(&g, budget, || run().map(drop))?;
        Ok(Measured {
            err: e,
            time_us: t,
            peak_bytes: None,
        })
    };
    Case {
        name: "wgpu 256 tiny dispatches".into(),
        shape: format!("{ops_per_run} x scale({n})"),
        flops: (n * ops_per_run) as f64,
        bytes: (8 * n * ops_per_run) as f64,
        bound: Bound::Unmeasured,
        backend: "wgpu",
        dtype: "f32",
        body: Box::new(body),
    }
}
