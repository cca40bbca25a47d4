//! Differential tests: every WGSL kernel against its CPU kernel on random inputs with planted
//! outliers. Without a wgpu adapter they report a skip, unless BFT_REQUIRE_WGPU=1 (CI sets it,
//! with Mesa's software Vulkan device), where a missing adapter fails.

use bft_kernels::cpu;
use bft_kernels::cpu::binary::BinaryKind;
use bft_kernels::cpu::matmul::{GemmDims, Operand};
use bft_kernels::cpu::unary::UnaryKind;
use bft_kernels::wgpu::ops::{self, DeviceOperand};
use bft_kernels::wgpu::{Gpu, GpuBuffer, gpu};
use std::sync::Arc;

fn device() -> Option<Arc<Gpu>> {
    match gpu(0) {
        Ok(g) => Some(g),
        Err(e) if std::env::var("BFT_REQUIRE_WGPU").is_ok_and(|v| v == "1") => {
            panic!("BFT_REQUIRE_WGPU=1 but {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// Uniform values in [lo, hi) from a fixed LCG, with every 37th value an outlier (x 50).
fn random(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            let v = lo + (hi - lo) * u;
            if i % 37 == 5 { v * 50.0 } else { v }
        })
        .collect()
}

fn up(g: &Arc<Gpu>, v: &[f32]) -> GpuBuffer {
    g.upload(bytemuck::cast_slice(v)).unwrap()
}

fn down(g: &Arc<Gpu>, b: &GpuBuffer) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(&g.read(b).unwrap())
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let ok = (a - b).abs() <= tol * (b.abs() + 1e-3 * scale) || (a.is_nan() && b.is_nan());
        assert!(ok, "{what}[{i}]: wgpu {a}, cpu {b}");
    }
}

/// Norm-wise: the largest error at most `tol` times the largest value. For outputs that are sums
/// of cancelling terms (attention gradients when an outlier makes a softmax row one-hot), an
/// element's own size says nothing about its rounding error; the tensor's scale does.
#[track_caller]
fn close_norm(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (i, err) = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0, 0.0f32), |m, (i, e)| if e > m.1 { (i, e) } else { m });
    assert!(
        err <= tol * scale,
        "{what}: max error {err} at [{i}] (wgpu {}, cpu {}) over scale {scale}",
        got[i],
        want[i]
    );
}

#[test]
fn every_shader_compiles_the_pool_reuses_buffers_and_parameters_stay_apart() {
    let Some(shared) = device() else { return };
    eprintln!("adapter: {}", shared.describe());
    for s in ops::ALL {
        shared
            .prepare(s)
            .unwrap_or_else(|e| panic!("{}: {e}", s.name));
    }
    // A device of its own, so the other tests' buffers do not come and go in its pool.
    let g = Gpu::open(0).unwrap();
    let x = up(&g, &[1.0, 2.0, 3.0]);
    let before = g.pooled_bytes();
    drop(ops::unary(&g, UnaryKind::Exp, &x, 3).unwrap());
    assert!(
        g.pooled_bytes() > before,
        "a dropped buffer returns to the pool"
    );
    let again = ops::unary(&g, UnaryKind::Exp, &x, 3).unwrap();
    assert_eq!(
        g.pooled_bytes(),
        before,
        "and is reused by the next op of its size"
    );
    close(
        "exp",
        &down(&g, &again),
        &[1f32.exp(), 2f32.exp(), 3f32.exp()],
        1e-6,
    );
    // 200 dispatches, each with parameters of its own, span several submitted batches that
    // share one parameter arena: every dispatch must see its own factor.
    let mut y = ops::scale(&g, 1.0, &x, 3).unwrap();
    let mut want = 1.0f64;
    for k in 0..200 {
        let f = 1.0 + (k % 7) as f32 * 0.01 - 0.03;
        y = ops::scale(&g, f, &y, 3).unwrap();
        want *= f as f64;
    }
    let want: Vec<f32> = [1.0, 2.0, 3.0].iter().map(|v| (v * want) as f32).collect();
    close("200 chained scales", &down(&g, &y), &want, 1e-5);
}

#[test]
fn unary_ops_and_their_backward_match_cpu() {
    let Some(g) = device() else { return };
    let n = 70_001;
    for kind in [
        UnaryKind::Exp,
        UnaryKind::Log,
        UnaryKind::Sigmoid,
        UnaryKind::Silu,
        UnaryKind::Neg,
    ] {
        let (lo, hi) = match kind {
            UnaryKind::Log => (0.01, 3.0),
            UnaryKind::Exp => (-3.0, 1.5),
            _ => (-4.0, 4.0),
        };
        let x = random(n, 1, lo, hi);
        let mut y = vec![0.0; n];
        cpu::unary::unary(kind, &x, &mut y);
        let (xd, dyv) = (up(&g, &x), random(n, 2, -1.0, 1.0));
        let yd = ops::unary(&g, kind, &xd, n).unwrap();
        close(&format!("{kind:?}"), &down(&g, &yd), &y, 2e-5);
        let mut dx = vec![0.0; n];
        cpu::unary::unary_backward(kind, &x, &y, &dyv, &mut dx);
        let dxd = ops::unary_backward(&g, Some(kind), 0.0, &xd, &yd, &up(&g, &dyv), n).unwrap();
        close(&format!("{kind:?} backward"), &down(&g, &dxd), &dx, 2e-5);
    }
    let x = random(n, 3, -2.0, 2.0);
    let mut y = vec![0.0; n];
    cpu::unary::scale(-0.75, &x, &mut y);
    close(
        "scale",
        &down(&g, &ops::scale(&g, -0.75, &up(&g, &x), n).unwrap()),
        &y,
        1e-6,
    );
}

#[test]
fn binary_ops_broadcast_and_column_sums_match_cpu() {
    let Some(g) = device() else { return };
    let (rows, cols) = (301, 77);
    let a = random(rows * cols, 4, -2.0, 2.0);
    for nb in [cols, rows * cols] {
        let b = random(nb, 5, 0.5, 2.0);
        for kind in [
            BinaryKind::Add,
            BinaryKind::Sub,
            BinaryKind::Mul,
            BinaryKind::Div,
        ] {
            let mut want = vec![0.0; a.len()];
            cpu::binary::binary(kind, &a, &b, &mut want);
            let got = ops::binary(&g, kind, &up(&g, &a), &up(&g, &b), a.len(), nb).unwrap();
            close(&format!("{kind:?} nb={nb}"), &down(&g, &got), &want, 1e-6);
        }
    }
    let mut want = vec![0.0; cols];
    cpu::binary::sum_rows(&a, &mut want);
    let got = ops::sum_rows(&g, &up(&g, &a), a.len(), cols).unwrap();
    close("sum_rows", &down(&g, &got), &want, 1e-5);
}

#[test]
fn tiled_matmul_matches_cpu_for_every_layout() {
    let Some(g) = device() else { return };
    let cases = [
        (1, 1, 1, 1),
        (1, 64, 64, 16),
        (3, 70, 45, 33),
        (2, 129, 131, 200),
    ];
    for (batch, m, n, k) in cases {
        for (ta, tb, shared_b, accumulate) in [
            (false, false, false, false),
            (true, false, true, false),
            (false, true, false, true),
            (true, true, true, true),
        ] {
            let a = random(batch * m * k, 6, -1.0, 1.0);
            let b = random(if shared_b { k * n } else { batch * k * n }, 7, -1.0, 1.0);
            let c0 = random(batch * m * n, 8, -1.0, 1.0);
            let b_stride = if shared_b { 0 } else { k * n };
            let dims = GemmDims { batch, m, n, k };
            let mut want = if accumulate {
                c0.clone()
            } else {
                vec![0.0; batch * m * n]
            };
            cpu::matmul::matmul(
                dims,
                Operand {
                    data: &a,
                    trans: ta,
                    batch_stride: m * k,
                },
                Operand {
                    data: &b,
                    trans: tb,
                    batch_stride: b_stride,
                },
                &mut want,
                accumulate,
            );
            let (ad, bd) = (up(&g, &a), up(&g, &b));
            let acc = accumulate.then(|| up(&g, &c0));
            let got = ops::matmul(
                &g,
                dims,
                DeviceOperand {
                    data: &ad,
                    trans: ta,
                    batch_stride: m * k,
                },
                DeviceOperand {
                    data: &bd,
                    trans: tb,
                    batch_stride: b_stride,
                },
                acc,
            )
            .unwrap();
            let what = format!("matmul {batch}x{m}x{n}x{k} ta={ta} tb={tb} acc={accumulate}");
            close(&what, &down(&g, &got), &want, 1e-4);
        }
    }
}

#[test]
fn rmsnorm_and_softmax_forward_and_backward_match_cpu() {
    let Some(g) = device() else { return };
    for (rows, cols) in [(1, 1), (5, 300), (130, 576), (3, 1031)] {
        let x = random(rows * cols, 9, -3.0, 3.0);
        let w = random(cols, 10, 0.5, 1.5);
        let dy = random(rows * cols, 11, -1.0, 1.0);
        let (mut y, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows]);
        cpu::rmsnorm::rmsnorm(&x, &w, 1e-5, &mut y, &mut rstd);
        let (xd, wd, dyd) = (up(&g, &x), up(&g, &w), up(&g, &dy));
        let (yd, rd) = ops::rmsnorm(&g, &xd, &wd, rows, cols, 1e-5).unwrap();
        close("rmsnorm y", &down(&g, &yd), &y, 2e-5);
        close("rmsnorm rstd", &down(&g, &rd), &rstd, 2e-5);
        let (mut dx, mut dw) = (vec![0.0; rows * cols], vec![0.0; cols]);
        cpu::rmsnorm::rmsnorm_backward(&x, &w, &rstd, &dy, &mut dx, Some(&mut dw));
        let (dxd, dwd) =
            ops::rmsnorm_backward(&g, &xd, &wd, &rd, &dyd, (rows, cols), true).unwrap();
        close("rmsnorm dx", &down(&g, &dxd), &dx, 1e-4);
        close("rmsnorm dw", &down(&g, &dwd.unwrap()), &dw, 1e-4);
        for log in [false, true] {
            let mut s = vec![0.0; rows * cols];
            cpu::softmax::softmax(&x, cols, log, &mut s);
            let sd = ops::softmax(&g, &xd, rows, cols, log).unwrap();
            // The CPU kernel forms x - lse in f32, where lse nears the planted outliers (~150):
            // its log-probs carry an absolute error of about 1e-5 there.
            let tol = if log { 1e-4 } else { 2e-5 };
            close(&format!("softmax log={log}"), &down(&g, &sd), &s, tol);
            let mut ds = vec![0.0; rows * cols];
            cpu::softmax::softmax_backward(&s, &dy, cols, log, &mut ds);
            let dsd = ops::softmax_backward(&g, &sd, &dyd, rows, cols, log).unwrap();
            // y * (dy - sum(dy * y)) cancels where dy is near the sum: the tolerance has an
            // absolute floor at the output's scale.
            close(
                &format!("softmax backward log={log}"),
                &down(&g, &dsd),
                &ds,
                5e-4,
            );
        }
    }
}

#[test]
fn swiglu_and_rope_match_cpu() {
    let Some(g) = device() else { return };
    let n = 10_007;
    let (gate, upv, dy) = (
        random(n, 12, -4.0, 4.0),
        random(n, 13, -2.0, 2.0),
        random(n, 14, -1.0, 1.0),
    );
    let mut y = vec![0.0; n];
    cpu::unary::swiglu(&gate, &upv, &mut y);
    let (gd, ud, dyd) = (up(&g, &gate), up(&g, &upv), up(&g, &dy));
    close(
        "swiglu",
        &down(&g, &ops::swiglu(&g, &gd, &ud, n).unwrap()),
        &y,
        2e-5,
    );
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    cpu::unary::swiglu_backward(&gate, &upv, &dy, &mut dg, &mut du);
    let (dgd, dud) = ops::swiglu_backward(&g, &gd, &ud, &dyd, n).unwrap();
    close("swiglu dgate", &down(&g, &dgd), &dg, 2e-5);
    close("swiglu dup", &down(&g, &dud), &du, 2e-5);

    let (rows, t, d) = (6, 33, 64);
    let x = random(rows * t * d, 15, -2.0, 2.0);
    let (c64, s64) = cpu::rope::rope_tables(&cpu::rope::default_inv_freq(10_000.0, d), t, 7);
    let (c, s): (Vec<f32>, Vec<f32>) = (
        c64.iter().map(|&v| v as f32).collect(),
        s64.iter().map(|&v| v as f32).collect(),
    );
    let (xd, cd, sd) = (up(&g, &x), up(&g, &c), up(&g, &s));
    for inverse in [false, true] {
        let mut want = vec![0.0; x.len()];
        cpu::rope::rope(&x, &c, &s, t, d, inverse, &mut want);
        let got = ops::rope(&g, &xd, &cd, &sd, (rows, t, d), inverse).unwrap();
        close(
            &format!("rope inverse={inverse}"),
            &down(&g, &got),
            &want,
            1e-5,
        );
    }
}

#[test]
fn permutes_slabs_and_fills_match_cpu() {
    let Some(g) = device() else { return };
    let dims = [3usize, 4, 5, 6];
    let x = random(dims.iter().product(), 16, -1.0, 1.0);
    let xd = up(&g, &x);
    for perm in [[0usize, 2, 1, 3], [3, 2, 1, 0], [1, 0, 3, 2], [0, 1, 2, 3]] {
        let mut want = vec![0.0; x.len()];
        cpu::layout::permute(&x, &dims, &perm, &mut want);
        let got = ops::permute(&g, &xd, &dims, &perm).unwrap();
        close(&format!("permute {perm:?}"), &down(&g, &got), &want, 0.0);
    }
    // Narrow rows 1..4 of the middle axis of (6, 7, 5) into a zeroed (6, 9, 5) at offset 2.
    let (outer, inner) = (6, 5);
    let src = random(outer * 7 * inner, 17, -1.0, 1.0);
    let mut want = vec![0.0; outer * 9 * inner];
    cpu::layout::copy_slab(&src, 7, 1, &mut want, 9, 2, (outer, 3, inner));
    let dst = ops::fill(&g, want.len(), 0).unwrap();
    let s = ops::Slab {
        outer,
        inner,
        len: 3,
        src_dim: 7,
        src_at: 1,
        dst_dim: 9,
        dst_at: 2,
    };
    ops::slab(&g, &up(&g, &src), &dst, s).unwrap();
    close("slab", &down(&g, &dst), &want, 0.0);
    let filled = ops::fill(&g, 5, 2.5f32.to_bits()).unwrap();
    close("fill", &down(&g, &filled), &[2.5; 5], 0.0);
}

#[test]
fn embedding_gather_and_scatter_add_match_cpu() {
    let Some(g) = device() else { return };
    let (vocab, dim) = (97, 40);
    let table = random(vocab * dim, 18, -1.0, 1.0);
    // Repeated ids (and unused rows) exercise the accumulation.
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 31 + i / 7) % 60).collect();
    let mut want = vec![0.0; ids.len() * dim];
    cpu::embedding::gather(&table, dim, &ids, &mut want);
    let got = ops::gather(&g, &up(&g, &table), dim, &ids).unwrap();
    close("gather", &down(&g, &got), &want, 0.0);
    let dout = random(ids.len() * dim, 19, -1.0, 1.0);
    let mut dt = vec![0.0; vocab * dim];
    cpu::embedding::scatter_add(&dout, dim, &ids, &mut dt);
    let got = ops::scatter_add(&g, &up(&g, &dout), dim, &ids, vocab).unwrap();
    close("scatter_add", &down(&g, &got), &dt, 1e-6);
}

#[test]
fn causal_gqa_attention_forward_and_backward_match_cpu() {
    use bft_kernels::cpu::attention::AttnDims;
    let Some(g) = device() else { return };
    // (batch, q heads, kv heads, T, S, D): GQA groups of 1 and 3, a KV cache offset, odd sizes,
    // a head dimension that leaves the 4-wide vec4 loops a partial iteration (D = 8, 20), and a
    // sequence long enough to have hit the software Vulkan loop cap before the vec4 loops.
    for (batch, hq, hkv, t, s, d) in [
        (1, 2, 2, 5, 5, 8),
        (2, 6, 2, 33, 40, 20),
        (1, 3, 1, 70, 70, 64),
        (1, 2, 1, 1100, 1100, 64),
    ] {
        let dims = AttnDims {
            batch,
            q_heads: hq,
            kv_heads: hkv,
            q_len: t,
            kv_len: s,
            head_dim: d,
        };
        let scale = 1.0 / (d as f64).sqrt();
        let q = random(batch * hq * t * d, 20, -1.0, 1.0);
        let k = random(batch * hkv * s * d, 21, -1.0, 1.0);
        let v = random(batch * hkv * s * d, 22, -1.0, 1.0);
        let dout = random(q.len(), 23, -1.0, 1.0);
        // The CPU kernel in f64 is the reference and in f32 the yardstick: with the planted
        // outliers the scores reach hundreds, so f32 rounding of a score alone moves exp by
        // 1e-4, and rows of many keys or near one-hot softmax rows with cancelling gradients
        // stray from f64 by up to 4e-5 of the scale in the CPU's f32 kernel. The WGSL kernels
        // must be as accurate: [`no_worse`].
        let want = cpu_attention::<f64>(dims, scale, [&q, &k, &v, &dout]);
        let cpu32 = cpu_attention::<f32>(dims, scale, [&q, &k, &v, &dout]);
        let (qd, kd, vd) = (up(&g, &q), up(&g, &k), up(&g, &v));
        let (od, ld) = ops::attention_forward(&g, dims, scale as f32, (&qd, &kd, &vd)).unwrap();
        let (dqd, dkd, dvd) = ops::attention_backward(
            &g,
            dims,
            scale as f32,
            (&qd, &kd, &vd),
            (&od, &ld, &up(&g, &dout)),
        )
        .unwrap();
        let what = format!("attention {batch}x{hq}/{hkv}x{t}/{s}x{d}");
        for (i, (name, buf)) in [
            ("o", od),
            ("lse", ld),
            ("dq", dqd),
            ("dk", dkd),
            ("dv", dvd),
        ]
        .iter()
        .enumerate()
        {
            let got = down(&g, buf);
            no_worse(&format!("{what} {name}"), &got, &cpu32[i], &want[i]);
        }
    }
}

/// The CPU attention kernels in `T`: `[o, lse, dq, dk, dv]` as f64.
fn cpu_attention<T: cpu::Float>(
    dims: bft_kernels::cpu::attention::AttnDims,
    scale: f64,
    [q, k, v, dout]: [&[f32]; 4],
) -> [Vec<f64>; 5] {
    use bft_kernels::cpu::attention::{Tiles, attention_backward, attention_forward};
    let f = |x: &[f32]| x.iter().map(|&v| T::from_f64(v as f64)).collect::<Vec<T>>();
    let (q, k, v, dout) = (f(q), f(k), f(v), f(dout));
    let rows = dims.batch * dims.q_heads * dims.q_len;
    let (mut o, mut lse) = (vec![T::zero(); q.len()], vec![T::zero(); rows]);
    attention_forward(
        dims,
        Tiles::default(),
        scale,
        (&q, &k, &v),
        &mut o,
        &mut lse,
    );
    let mut dq = vec![T::zero(); q.len()];
    let (mut dk, mut dv) = (vec![T::zero(); k.len()], vec![T::zero(); v.len()]);
    attention_backward(
        dims,
        Tiles::default(),
        scale,
        (&q, &k, &v),
        (&o, &lse, &dout),
        &mut dq,
        &mut dk,
        &mut dv,
    );
    [o, lse, dq, dk, dv].map(|x| x.iter().map(|&y| cpu::Float::to_f64(y)).collect())
}

/// The WGSL result's largest error against the f64 reference is at most twice the f32 CPU
/// kernel's, or 1e-6 of the scale: no less accurate than the CPU kernel. NaN must match NaN.
#[track_caller]
fn no_worse(what: &str, got: &[f32], cpu32: &[f64], want: &[f64]) {
    let err = |x: &mut dyn Iterator<Item = f64>| {
        x.zip(want)
            .map(|(a, b)| {
                if a.is_nan() && b.is_nan() {
                    0.0
                } else {
                    (a - b).abs()
                }
            })
            .fold(0.0f64, |m, e| if e.is_nan() || e > m { e } else { m })
    };
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (e_wgpu, e_cpu) = (
        err(&mut got.iter().map(|&v| v as f64)),
        err(&mut cpu32.iter().copied()),
    );
    assert!(
        e_wgpu <= 2.0 * e_cpu + 1e-6 * scale,
        "{what}: max error {e_wgpu:.3e} against f64, the f32 CPU kernel's {e_cpu:.3e}, scale {scale:.3e}"
    );
}

#[test]
fn fused_lm_head_loss_passes_match_cpu() {
    use bft_kernels::cpu::lm_head::{HeadDims, lm_head_backward_head, lm_head_forward};
    let Some(g) = device() else { return };
    let (rows, c, v) = (37, 24, 301);
    let dims = HeadDims {
        rows,
        hidden: c,
        vocab: v,
    };
    let x = random(rows * c, 24, -1.0, 1.0);
    let w = random(v * c, 25, -0.5, 0.5);
    let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 97 + 5) % v as u32).collect();
    let coef: Vec<f32> = (0..rows).map(|i| 0.1 + (i % 5) as f32 * 0.2).collect();
    // Chunks of 16 rows: the last chunk is partial.
    let chunk = 16;
    let mut z = vec![0.0; chunk * v];
    let (mut lse, mut tl, mut unit) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows * c]);
    lm_head_forward(
        dims,
        (chunk, v),
        (&x, &w, &targets),
        &mut z,
        &mut lse,
        &mut tl,
        Some(&mut unit),
    );
    let (xd, wd) = (up(&g, &x), up(&g, &w));
    let f = ops::head_forward(&g, dims, chunk, (&xd, &wd, &targets), true).unwrap();
    close("lse", &down(&g, &f.lse), &lse, 1e-5);
    close("target logit", &down(&g, &f.target_logit), &tl, 1e-5);
    // Sums of 301 products with outliers: f32 rounding, norm-wise.
    close_norm("unit gradient", &down(&g, &f.unit.unwrap()), &unit, 5e-5);
    let mut dw = vec![0.0; v * c];
    lm_head_backward_head(
        dims,
        chunk,
        (&x, &w, &targets),
        (&lse, &coef),
        &mut z,
        &mut dw,
    );
    let dwd = ops::head_backward_weight(
        &g,
        dims,
        chunk,
        (&xd, &wd, &targets),
        (&f.lse, &up(&g, &coef)),
    )
    .unwrap();
    close_norm("head gradient", &down(&g, &dwd), &dw, 5e-5);
    let scaled = ops::scale_rows(&g, &xd, &up(&g, &coef), rows * c, c).unwrap();
    let want: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, &e)| e * coef[i / c])
        .collect();
    close("scale_rows", &down(&g, &scaled), &want, 1e-6);
}

#[test]
fn adamw_and_sum_of_squares_match_cpu() {
    let Some(g) = device() else { return };
    let n = 70_001; // several workgroups, a ragged end
    let (w0, grad) = (random(n, 31, -1.0, 1.0), random(n, 32, -0.1, 0.1));
    let (m0, v0) = (random(n, 33, -0.01, 0.01), random(n, 34, 0.0, 1e-4));
    let (wb, gb, mb, vb) = (up(&g, &w0), up(&g, &grad), up(&g, &m0), up(&g, &v0));
    let (mut w, mut m, mut v) = (w0, m0, v0);
    let h = cpu::optim::AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        bias1: 1.0 - 0.9f64.powi(3),
        bias2: 1.0 - 0.999f64.powi(3),
        grad_scale: 0.7,
    };
    for _ in 0..3 {
        ops::adamw(&g, &wb, &gb, &mb, &vb, n, &h).unwrap();
        cpu::optim::adamw(&mut w, &grad, &mut m, &mut v, &h);
    }
    // The moments are sums of cancelling terms: compared norm-wise.
    close_norm("adamw m", &down(&g, &mb), &m, 1e-6);
    close_norm("adamw v", &down(&g, &vb), &v, 1e-6);
    // Steps are about 3e-3; a slip in the update (bias correction, decay) moves w by more than
    // 1e-4, far beyond this tolerance, while f32 rounding of w stays within it.
    close("adamw w", &down(&g, &wb), &w, 1e-6);

    let short = random(100, 35, -3.0, 3.0);
    let sb = up(&g, &short);
    let sums = ops::sum_squares(&g, &[(&gb, n), (&sb, 100), (&sb, 0)]).unwrap();
    let want = [
        cpu::optim::sum_squares(&grad),
        cpu::optim::sum_squares(&short),
        0.0,
    ];
    for (a, b) in sums.iter().zip(want) {
        assert!(
            (a - b).abs() <= 1e-5 * b,
            "sum of squares: wgpu {a}, cpu {b}"
        );
    }
}

#[test]
fn sums_maxima_and_their_backward_over_any_axis_match_cpu() {
    use bft_kernels::cpu::reduce::{ReduceKind, reduce, reduce_backward};
    let Some(g) = device() else { return };
    // (outer, size, inner): last axis, first axis, a middle axis, and a long row that each
    // invocation strides many times.
    for (case, sizes) in [(3, 70, 1), (1, 300, 17), (4, 9, 5), (2, 100_003, 1)]
        .into_iter()
        .enumerate()
    {
        let (outer, size, inner) = sizes;
        let n = outer * size * inner;
        let mut x = random(n, 40 + case as u64, -1.0, 1.0);
        // Ties: the first maximal index wins. NaN: counted only as an axis' first element.
        x[inner] = 1e4;
        x[3 * inner] = 1e4;
        if inner > 1 {
            x[1] = f32::NAN;
            x[inner + 1] = f32::NAN;
        }
        let xd = up(&g, &x);
        let outputs = outer * inner;
        let grad = random(outputs, 50, -1.0, 1.0);
        let gd = up(&g, &grad);
        for kind in [ReduceKind::Sum, ReduceKind::Max] {
            let (mut y, mut idx) = (vec![0.0; outputs], vec![0u32; outputs]);
            reduce(kind, &x, sizes, &mut y, &mut idx);
            let mut dx = vec![0.0; n];
            let (yd, dxd) = match kind {
                ReduceKind::Sum => {
                    let yd = ops::reduce_sum(&g, &xd, sizes).unwrap();
                    reduce_backward(kind, &grad, &[], sizes, &mut dx);
                    (yd, ops::reduce_backward(&g, &gd, None, sizes).unwrap())
                }
                ReduceKind::Max => {
                    let (yd, id) = ops::reduce_max(&g, &xd, sizes).unwrap();
                    let got: Vec<u32> = bytemuck::pod_collect_to_vec(&g.read(&id).unwrap());
                    assert_eq!(got, idx, "argmax {sizes:?}");
                    reduce_backward(kind, &grad, &idx, sizes, &mut dx);
                    (yd, ops::reduce_backward(&g, &gd, Some(&id), sizes).unwrap())
                }
            };
            let what = format!("{kind:?} {sizes:?}");
            // A sum of 1e5 terms rounds by the order of addition: against f64, the tree sum must
            // be no worse than the CPU's f32 sum.
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let mut y64 = vec![0.0f64; outputs];
            reduce(kind, &x64, sizes, &mut y64, &mut idx.clone());
            let y32: Vec<f64> = y.iter().map(|&v| v as f64).collect();
            no_worse(&what, &down(&g, &yd), &y32, &y64);
            close(&format!("{what} backward"), &down(&g, &dxd), &dx, 0.0);
        }
    }
}

#[test]
fn unfused_nll_and_its_gradient_direction_match_cpu() {
    let Some(g) = device() else { return };
    let (rows, vocab) = (13, 50_000);
    let z = random(rows * vocab, 60, -4.0, 4.0);
    let targets: Vec<u32> = (0..rows as u32)
        .map(|i| (i * 7919 + 5) % vocab as u32)
        .collect();
    let (mut loss, mut lse) = (vec![0.0; rows], vec![0.0; rows]);
    cpu::nll::nll(&z, vocab, &targets, &mut loss, &mut lse);
    let ones = vec![1.0; rows];
    let mut dz = vec![0.0; rows * vocab];
    cpu::nll::nll_backward(&z, vocab, &targets, &lse, &ones, &mut dz);
    let tb = g.upload(bytemuck::cast_slice(&targets)).unwrap();
    let (ld, dird) = ops::nll(&g, &up(&g, &z), &tb, rows, vocab).unwrap();
    // Outliers put logits near 200, where exp's f32 rounding is 1e-5 relative: against the CPU
    // kernel in f64, the WGSL one must be no worse than the CPU's f32 kernel.
    let z64: Vec<f64> = z.iter().map(|&v| v as f64).collect();
    let (mut loss64, mut lse64) = (vec![0.0f64; rows], vec![0.0f64; rows]);
    cpu::nll::nll(&z64, vocab, &targets, &mut loss64, &mut lse64);
    let mut dz64 = vec![0.0f64; rows * vocab];
    cpu::nll::nll_backward(&z64, vocab, &targets, &lse64, &[1.0; 13], &mut dz64);
    let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    no_worse("nll", &down(&g, &ld), &wide(&loss), &loss64);
    no_worse("nll direction", &down(&g, &dird), &wide(&dz), &dz64);
}

#[test]
fn casts_to_and_from_16_bit_floats_give_the_host_bits() {
    use bft_kernels::Half;
    use half::{bf16, f16};
    let Some(g) = device() else { return };
    // Ties, the edges of f16's range and subnormals, infinities, NaN, then f32 bit patterns
    // from every exponent. An odd count leaves the last word half full.
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        65504.0,
        65519.99,
        65520.0,
        -1e5,
        2f32.powi(-14),
        2f32.powi(-25),
        1.5 * 2f32.powi(-25),
        1.5 * 2f32.powi(-24),
        2.5 * 2f32.powi(-24),
        2f32.powi(-14) - 2f32.powi(-26),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE / 3.0,
    ];
    let mut s = 12345u64;
    for _ in 0..20_001 {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x.push(f32::from_bits((s >> 32) as u32));
    }
    let n = x.len();
    let xd = up(&g, &x);
    for half in [Half::F16, Half::BF16] {
        let bits = |v: f32| match half {
            Half::F16 => f16::from_f32(v).to_bits(),
            Half::BF16 => bf16::from_f32(v).to_bits(),
        };
        let packed = ops::narrow(&g, &xd, n, half).unwrap();
        let got: Vec<u16> = bytemuck::pod_collect_to_vec(&g.read(&packed).unwrap());
        for (i, &v) in x.iter().enumerate() {
            let want = bits(v);
            let nan = |b: u16| match half {
                Half::F16 => f16::from_bits(b).is_nan(),
                Half::BF16 => bf16::from_bits(b).is_nan(),
            };
            assert!(
                got[i] == want || (nan(got[i]) && nan(want)),
                "{half:?} of {v:e} ({:#010x}): wgpu {:#06x}, host {want:#06x}",
                v.to_bits(),
                got[i]
            );
        }
        // Every 16-bit pattern widens exactly.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let hd = g.upload(bytemuck::cast_slice(&all)).unwrap();
        let wide = down(&g, &ops::widen(&g, &hd, all.len(), half).unwrap());
        for (&h, &w) in all.iter().zip(&wide) {
            let want = match half {
                Half::F16 => f16::from_bits(h).to_f32(),
                Half::BF16 => bf16::from_bits(h).to_f32(),
            };
            assert!(
                w.to_bits() == want.to_bits() || (w.is_nan() && want.is_nan()),
                "{half:?} {h:#06x}: wgpu {w:e}, host {want:e}"
            );
        }
    }
}
