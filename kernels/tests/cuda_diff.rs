//! Differential tests: every CUDA kernel against the CPU kernel (run in f64 on the same
//! bf16-rounded inputs) on random inputs with planted outliers. Without a CUDA device they
//! report a skip, unless BFT_REQUIRE_CUDA=1 (set it on a GPU machine), where no device fails.
//! Tolerances: bf16 outputs within 2^-8 of the value (one rounding, plus f32 arithmetic) or
//! 1e-2 of the tensor's scale where terms cancel; f32 outputs within 1e-5 relative.

use bft_kernels::Half;
use bft_kernels::cpu;
use bft_kernels::cpu::attention::{AttnDims, Tiles};
use bft_kernels::cpu::matmul::{GemmDims, Operand};
use bft_kernels::cuda::ops;
use bft_kernels::cuda::{Cuda, DeviceBuffer, cuda, driver_available};
use half::{bf16, f16};
use std::sync::Arc;

fn device() -> Option<Arc<Cuda>> {
    let required = std::env::var("BFT_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let found = if driver_available() {
        cuda(0).map_err(|e| e.to_string())
    } else {
        Err("no CUDA driver library".to_string())
    };
    match found {
        Ok(d) => Some(d),
        Err(e) if required => panic!("BFT_REQUIRE_CUDA=1 but {e}"),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// Uniform values in [lo, hi) from a fixed LCG, every 37th an outlier (x 50), rounded to bf16
/// so the device and the reference read the same numbers.
fn random(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            let v = lo + (hi - lo) * u;
            bf16::from_f32(if i % 37 == 5 { v * 50.0 } else { v }).to_f32()
        })
        .collect()
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn up_bf16(d: &Arc<Cuda>, v: &[f32]) -> DeviceBuffer {
    let bits: Vec<u16> = v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
    d.upload(bytemuck::cast_slice(&bits)).unwrap()
}

fn up_f32(d: &Arc<Cuda>, v: &[f32]) -> DeviceBuffer {
    d.upload(bytemuck::cast_slice(v)).unwrap()
}

fn up_u32(d: &Arc<Cuda>, v: &[u32]) -> DeviceBuffer {
    d.upload(bytemuck::cast_slice(v)).unwrap()
}

fn down_bf16(d: &Arc<Cuda>, b: &DeviceBuffer) -> Vec<f32> {
    let bits: Vec<u16> = bytemuck::pod_collect_to_vec(&d.read(b).unwrap());
    bits.into_iter()
        .map(|h| bf16::from_bits(h).to_f32())
        .collect()
}

fn down_f32(d: &Arc<Cuda>, b: &DeviceBuffer) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(&d.read(b).unwrap())
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f64], rel: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let ok = (a as f64 - b).abs() <= rel * b.abs() + floor * scale;
        assert!(ok, "{what}[{i}]: cuda {a}, cpu {b} (scale {scale})");
    }
}

const BF16: f64 = 1.0 / 256.0;

#[test]
fn casts_give_the_host_bits() {
    let Some(d) = device() else { return };
    let mut x = random(10_001, 1, -3.0, 3.0);
    x.extend([
        0.0,
        -0.0,
        65520.0,
        1e-7,
        2f32.powi(-25),
        f32::INFINITY,
        f32::NAN,
    ]);
    let n = x.len();
    let xd = up_f32(&d, &x);
    for half in [Half::BF16, Half::F16] {
        let bits: Vec<u16> =
            bytemuck::pod_collect_to_vec(&d.read(&ops::narrow(&d, &xd, n, half).unwrap()).unwrap());
        for (i, &v) in x.iter().enumerate() {
            let (want, nan) = match half {
                Half::BF16 => (
                    bf16::from_f32(v).to_bits(),
                    bf16::from_bits(bits[i]).is_nan(),
                ),
                Half::F16 => (f16::from_f32(v).to_bits(), f16::from_bits(bits[i]).is_nan()),
            };
            assert!(
                bits[i] == want || (nan && v.is_nan()),
                "{half:?} {v:e}: {:#06x} vs {want:#06x}",
                bits[i]
            );
        }
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let back = down_f32(
            &d,
            &ops::widen(
                &d,
                &d.upload(bytemuck::cast_slice(&all)).unwrap(),
                all.len(),
                half,
            )
            .unwrap(),
        );
        for (&h, &w) in all.iter().zip(&back) {
            let want = match half {
                Half::BF16 => bf16::from_bits(h).to_f32(),
                Half::F16 => f16::from_bits(h).to_f32(),
            };
            assert!(
                w.to_bits() == want.to_bits() || (w.is_nan() && want.is_nan()),
                "{half:?} {h:#06x}"
            );
        }
    }
}

#[test]
fn embedding_forward_and_backward_match_cpu() {
    let Some(d) = device() else { return };
    let (vocab, dim, rows) = (50, 96, 37);
    let table = random(vocab * dim, 2, -1.0, 1.0);
    let ids: Vec<u32> = (0..rows as u32).map(|i| (i * 7 + 3) % 11).collect();
    let mut out = vec![0.0f64; rows * dim];
    cpu::embedding::gather(&wide(&table), dim, &ids, &mut out);
    let got =
        ops::embedding_forward(&d, 2, &up_bf16(&d, &table), &up_u32(&d, &ids), rows, dim).unwrap();
    close("gather", &down_bf16(&d, &got), &out, 0.0, 0.0);
    let dout = random(rows * dim, 3, -1.0, 1.0);
    let mut dtable = vec![0.0f64; vocab * dim];
    cpu::embedding::scatter_add(&wide(&dout), dim, &ids, &mut dtable);
    let got = ops::embedding_backward(&d, &up_f32(&d, &dout), &ids, vocab, dim).unwrap();
    close("scatter_add", &down_f32(&d, &got), &dtable, 1e-6, 1e-7);
}

#[test]
fn rmsnorm_with_residual_forward_and_backward_match_cpu() {
    let Some(d) = device() else { return };
    let (rows, dim) = (19, 1536);
    let (x, res, w) = (
        random(rows * dim, 4, -1.0, 1.0),
        random(rows * dim, 5, -1.0, 1.0),
        random(dim, 6, 0.5, 1.5),
    );
    // The kernel stores h = x + res in bf16 and normalises the stored value.
    let h: Vec<f64> = x
        .iter()
        .zip(&res)
        .map(|(a, b)| bf16::from_f32(a + b).to_f64())
        .collect();
    let (mut y, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
    cpu::rmsnorm::rmsnorm(&h, &wide(&w), 1e-5, &mut y, &mut rstd);
    let (hd, yd, rd) = ops::rmsnorm_forward(
        &d,
        &up_bf16(&d, &x),
        Some(&up_bf16(&d, &res)),
        &up_bf16(&d, &w),
        (rows, dim),
        1e-5,
    )
    .unwrap();
    let hd = hd.expect("a residual stream");
    close("rmsnorm h", &down_bf16(&d, &hd), &h, 0.0, 0.0);
    close("rmsnorm y", &down_bf16(&d, &yd), &y, BF16, 1e-6);
    close("rmsnorm rstd", &down_f32(&d, &rd), &rstd, 1e-5, 0.0);
    let dy = random(rows * dim, 7, -1.0, 1.0);
    let dres = random(rows * dim, 8, -1.0, 1.0);
    let (mut dx, mut dw) = (vec![0.0; rows * dim], vec![0.0; dim]);
    cpu::rmsnorm::rmsnorm_backward(&h, &wide(&w), &rstd, &wide(&dy), &mut dx, Some(&mut dw));
    let dx: Vec<f64> = dx.iter().zip(&dres).map(|(a, &b)| a + b as f64).collect();
    let dyd = up_bf16(&d, &dy);
    let dhd = ops::rmsnorm_backward(
        &d,
        &dyd,
        &hd,
        &up_bf16(&d, &w),
        &rd,
        Some(&up_bf16(&d, &dres)),
        (rows, dim),
    )
    .unwrap();
    close("rmsnorm dx", &down_bf16(&d, &dhd), &dx, BF16, 1e-2);
    let dwd = ops::rmsnorm_dw(&d, &dyd, &hd, &rd, (rows, dim)).unwrap();
    close("rmsnorm dw", &down_f32(&d, &dwd), &dw, 1e-4, 1e-5);
}

#[test]
fn rope_and_swiglu_match_cpu() {
    let Some(d) = device() else { return };
    let (rows, t, hd) = (6, 33, 128);
    let x = random(rows * t * hd, 9, -1.0, 1.0);
    let (cos, sin) = cpu::rope::rope_tables(&cpu::rope::default_inv_freq(1e6, hd), t, 5);
    for inverse in [false, true] {
        let mut out = vec![0.0; x.len()];
        cpu::rope::rope(&wide(&x), &cos, &sin, t, hd, inverse, &mut out);
        let xd = up_bf16(&d, &x);
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        ops::rope(
            &d,
            &xd,
            (&up_f32(&d, &f(&cos)), &up_f32(&d, &f(&sin))),
            (rows, t, hd),
            inverse,
        )
        .unwrap();
        close("rope", &down_bf16(&d, &xd), &out, BF16, 1e-3);
    }
    let n = 10_007;
    let (g, u, dy) = (
        random(n, 10, -4.0, 4.0),
        random(n, 11, -1.0, 1.0),
        random(n, 12, -1.0, 1.0),
    );
    let mut y = vec![0.0; n];
    cpu::unary::swiglu(&wide(&g), &wide(&u), &mut y);
    let (gd, ud) = (up_bf16(&d, &g), up_bf16(&d, &u));
    close(
        "swiglu",
        &down_bf16(&d, &ops::swiglu_forward(&d, &gd, &ud, n).unwrap()),
        &y,
        BF16,
        1e-6,
    );
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    cpu::unary::swiglu_backward(&wide(&g), &wide(&u), &wide(&dy), &mut dg, &mut du);
    let (dgd, dud) = ops::swiglu_backward(&d, &gd, &ud, &up_bf16(&d, &dy), n).unwrap();
    close("swiglu dgate", &down_bf16(&d, &dgd), &dg, BF16, 1e-6);
    close("swiglu dup", &down_bf16(&d, &dud), &du, BF16, 1e-6);
}

#[test]
fn causal_gqa_attention_forward_and_backward_match_cpu() {
    let Some(dev) = device() else { return };
    // (batch, q heads, kv heads, T, S, D): GQA groups of 1 and 6 (Qwen2-1.5B: 12 / 2), a KV
    // cache offset, head dims 64 and 128.
    for (batch, hq, hkv, t, s, d) in [(1, 2, 2, 5, 5, 64), (2, 12, 2, 70, 81, 128)] {
        let dims = AttnDims {
            batch,
            q_heads: hq,
            kv_heads: hkv,
            q_len: t,
            kv_len: s,
            head_dim: d,
        };
        let scale = 1.0 / (d as f64).sqrt();
        let (q, k, v) = (
            random(batch * hq * t * d, 13, -1.0, 1.0),
            random(batch * hkv * s * d, 14, -1.0, 1.0),
            random(batch * hkv * s * d, 15, -1.0, 1.0),
        );
        let dout = random(q.len(), 16, -1.0, 1.0);
        let rows = batch * hq * t;
        let (mut o, mut lse) = (vec![0.0; q.len()], vec![0.0; rows]);
        cpu::attention::attention_forward(
            dims,
            Tiles::default(),
            scale,
            (&wide(&q), &wide(&k), &wide(&v)),
            &mut o,
            &mut lse,
        );
        let (qd, kd, vd) = (up_bf16(&dev, &q), up_bf16(&dev, &k), up_bf16(&dev, &v));
        let (od, ld) = ops::attention_forward(&dev, dims, scale as f32, (&qd, &kd, &vd)).unwrap();
        let what = format!("attention {batch}x{hq}/{hkv}x{t}/{s}x{d}");
        close(&format!("{what} o"), &down_bf16(&dev, &od), &o, BF16, 1e-3);
        close(
            &format!("{what} lse"),
            &down_f32(&dev, &ld),
            &lse,
            1e-5,
            1e-6,
        );
        // The backward reads the device's bf16 O, as the reference reads its own O.
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let o16 = wide(&down_bf16(&dev, &od));
        cpu::attention::attention_backward(
            dims,
            Tiles::default(),
            scale,
            (&wide(&q), &wide(&k), &wide(&v)),
            (&o16, &lse, &wide(&dout)),
            &mut dq,
            &mut dk,
            &mut dv,
        );
        let (dqd, dkd, dvd) = ops::attention_backward(
            &dev,
            dims,
            scale as f32,
            (&qd, &kd, &vd),
            (&od, &ld, &up_bf16(&dev, &dout)),
        )
        .unwrap();
        close(
            &format!("{what} dq"),
            &down_bf16(&dev, &dqd),
            &dq,
            BF16,
            1e-2,
        );
        close(
            &format!("{what} dk"),
            &down_bf16(&dev, &dkd),
            &dk,
            BF16,
            1e-2,
        );
        close(
            &format!("{what} dv"),
            &down_bf16(&dev, &dvd),
            &dv,
            BF16,
            1e-2,
        );
    }
}

#[test]
fn cublas_bf16_gemm_matches_cpu_for_every_layout() {
    let Some(d) = device() else { return };
    let (batch, m, n, k) = (3, 67, 45, 129);
    let dims = GemmDims { batch, m, n, k };
    for (ta, tb, shared) in [
        (false, false, false),
        (false, true, true),
        (true, false, false),
        (true, true, false),
    ] {
        let a = random(batch * m * k, 17, -1.0, 1.0);
        let b = random(if shared { k * n } else { batch * k * n }, 18, -1.0, 1.0);
        let (aw, bw) = (wide(&a), wide(&b));
        let mut c = vec![0.0f64; batch * m * n];
        cpu::matmul::matmul(
            dims,
            Operand {
                data: &aw,
                trans: ta,
                batch_stride: m * k,
            },
            Operand {
                data: &bw,
                trans: tb,
                batch_stride: if shared { 0 } else { k * n },
            },
            &mut c,
            false,
        );
        let (ad, bd) = (up_bf16(&d, &a), up_bf16(&d, &b));
        let got = ops::gemm(
            &d,
            dims,
            ops::Operand::new(&ad, ta),
            (ops::Operand::new(&bd, tb), shared),
            true,
        )
        .unwrap();
        close(
            &format!("gemm ta={ta} tb={tb} shared={shared}"),
            &down_f32(&d, &got),
            &c,
            1e-5,
            1e-5,
        );
    }
}

#[test]
fn fused_loss_passes_and_sample_weights_match_cpu() {
    let Some(d) = device() else { return };
    let (rows, vocab, hidden) = (21, 5003, 64);
    let z = random(rows * vocab, 19, -4.0, 4.0);
    let targets: Vec<u32> = (0..rows as u32)
        .map(|i| (i * 977 + 1) % vocab as u32)
        .collect();
    let zw = wide(&z);
    let (mut lse, mut tl) = (vec![0.0; rows], vec![0.0; rows]);
    for r in 0..rows {
        let row = &zw[r * vocab..(r + 1) * vocab];
        let m = row.iter().cloned().fold(f64::MIN, f64::max);
        lse[r] = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        tl[r] = row[targets[r] as usize];
    }
    let (zd, td) = (up_f32(&d, &z), up_u32(&d, &targets));
    let (ld, tld) = (d.alloc(4 * rows).unwrap(), d.alloc(4 * rows).unwrap());
    ops::head_lse(&d, &zd, &td, (&ld, &tld), (rows, vocab, 0)).unwrap();
    close("lse", &down_f32(&d, &ld), &lse, 1e-6, 0.0);
    close("target logit", &down_f32(&d, &tld), &tl, 0.0, 0.0);
    let coef: Vec<f32> = (0..rows).map(|r| 0.1 + 0.05 * r as f32).collect();
    let cd = up_f32(&d, &coef);
    let g = down_bf16(
        &d,
        &ops::head_grad(&d, &zd, &td, (&ld, &cd), (rows, vocab, 0), true).unwrap(),
    );
    let mut want = vec![0.0; rows * vocab];
    for r in 0..rows {
        for j in 0..vocab {
            let onehot = if j == targets[r] as usize { 1.0 } else { 0.0 };
            want[r * vocab + j] = coef[r] as f64 * ((zw[r * vocab + j] - lse[r]).exp() - onehot);
        }
    }
    close("head grad", &g, &want, BF16, 1e-6);
    let w = random(vocab * hidden, 20, -1.0, 1.0);
    let dx = up_f32(&d, &vec![0.0; rows * hidden]);
    ops::head_target_term(&d, (&dx, 0), &up_bf16(&d, &w), &td, &cd, (rows, hidden, 0)).unwrap();
    let mut want = vec![0.0; rows * hidden];
    for r in 0..rows {
        for c in 0..hidden {
            want[r * hidden + c] = -(coef[r] as f64) * w[targets[r] as usize * hidden + c] as f64;
        }
    }
    close("target term", &down_f32(&d, &dx), &want, 1e-6, 0.0);

    // Samples of 0, 3, 300 and 40 valid tokens, window 32: no window, one short window, many.
    let lens = [0usize, 3, 300, 40];
    let mut offsets = vec![0u32];
    for l in lens {
        offsets.push(offsets.last().unwrap() + l as u32);
    }
    let tokens = *offsets.last().unwrap() as usize;
    let logp: Vec<f32> = random(tokens, 21, -3.0, 0.0)
        .iter()
        .map(|v| v.min(0.0))
        .collect();
    let (od, lpd) = (up_u32(&d, &offsets), up_f32(&d, &logp));
    for geometric in [false, true] {
        let (pc, sb) =
            ops::sample_weights(&d, &lpd, &od, (lens.len(), tokens), (32, geometric, 1.0)).unwrap();
        let (pc, sb) = (down_f32(&d, &pc), down_f32(&d, &sb));
        for (b, &n) in lens.iter().enumerate() {
            let lp = &logp[offsets[b] as usize..offsets[b + 1] as usize];
            let g = n.min(32);
            let want = if n == 0 {
                1.0
            } else {
                (0..=n - g)
                    .map(|i| {
                        let wnd = &lp[i..i + g];
                        if geometric {
                            (wnd.iter().map(|&v| v as f64).sum::<f64>() / g as f64).exp()
                        } else {
                            wnd.iter().map(|&v| (v as f64).exp()).sum::<f64>() / g as f64
                        }
                    })
                    .fold(f64::MAX, f64::min)
            };
            assert!(
                (pc[b] as f64 - want).abs() <= 1e-6,
                "p_conf[{b}] {} vs {want}",
                pc[b]
            );
            let s = if n == 0 {
                0.0
            } else {
                (1.0 - want).clamp(0.0, 1.0)
            };
            assert!(
                (sb[b] as f64 - s).abs() <= 1e-6,
                "s_b[{b}] {} vs {s}",
                sb[b]
            );
        }
    }
    let sample_of: Vec<u32> = (0..lens.len() as u32)
        .flat_map(|b| std::iter::repeat_n(b, lens[b as usize]))
        .collect();
    let s_b = up_f32(&d, &[0.0, 0.5, 0.25, 1.0]);
    let coef = down_f32(
        &d,
        &ops::token_coef(
            &d,
            &lpd,
            &up_u32(&d, &sample_of),
            &od,
            &s_b,
            (tokens, lens.len()),
            true,
            0.0,
        )
        .unwrap(),
    );
    for (t, &c) in coef.iter().enumerate() {
        let b = sample_of[t] as usize;
        let want =
            [0.0, 0.5, 0.25, 1.0][b] * (logp[t] as f64).exp() / (4.0 * (lens[b] as f64 + 1e-8));
        assert!(
            (c as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
            "coef[{t}] {c} vs {want}"
        );
    }
}

#[test]
fn adamw_and_sum_of_squares_match_cpu() {
    let Some(d) = device() else { return };
    let n = 100_003;
    let (w0, g) = (random(n, 22, -1.0, 1.0), random(n, 23, -0.1, 0.1));
    let (mut w, mut m, mut v) = (w0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
    let h = cpu::optim::AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        bias1: 0.1,
        bias2: 0.001,
        grad_scale: 0.5,
    };
    cpu::optim::adamw(&mut w, &g, &mut m, &mut v, &h);
    let (wd, gd) = (up_f32(&d, &w0), up_f32(&d, &g));
    let (md, vd) = (d.zeros(4 * n).unwrap(), d.zeros(4 * n).unwrap());
    let copy = d.alloc(2 * n).unwrap();
    ops::adamw(&d, (&wd, &gd, &md, &vd), Some(&copy), n, &h).unwrap();
    close("adamw master", &down_f32(&d, &wd), &wide(&w), 1e-6, 1e-7);
    close("adamw m", &down_f32(&d, &md), &wide(&m), 1e-6, 1e-7);
    close("adamw v", &down_f32(&d, &vd), &wide(&v), 1e-5, 1e-7);
    let rounded: Vec<f64> = w.iter().map(|&x| bf16::from_f32(x).to_f64()).collect();
    close(
        "adamw bf16 copy",
        &down_bf16(&d, &copy),
        &rounded,
        BF16,
        0.0,
    );
    let sums = ops::sum_squares(&d, &[(&gd, n), (&wd, 10)]).unwrap();
    let want = [
        cpu::optim::sum_squares(&g),
        cpu::optim::sum_squares(&down_f32(&d, &wd)[..10]),
    ];
    for (a, b) in sums.iter().zip(want) {
        assert!((a - b).abs() <= 1e-5 * b, "sum of squares {a} vs {b}");
    }
}

#[test]
fn the_pool_reuses_buffers() {
    let Some(d) = device() else { return };
    let before = d.pooled_bytes();
    drop(d.alloc(1000).unwrap());
    assert!(d.pooled_bytes() > before);
    let again = d.alloc(900).unwrap();
    assert_eq!(
        d.pooled_bytes(),
        before,
        "a buffer of the same class is reused"
    );
    assert_eq!(again.len(), 900);
}
