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
use bft_kernels::cuda::typed::{self, Float};
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
    use ops::AttentionKernel::{Flash, Rows};
    // (batch, q heads, kv heads, T, S, D, kernels): GQA groups of 1, 2 and 6 (Qwen2-1.5B:
    // 12 / 2), a KV cache offset, lengths across the flash tiles (64 queries, 64 or 32 keys),
    // head dims 64 and 128 on both kernels and 48 on the rows kernels alone.
    let cases = [
        (1, 2, 2, 5, 5, 64, Flash),
        (1, 2, 2, 5, 5, 64, Rows),
        (2, 12, 2, 70, 81, 128, Flash),
        (2, 12, 2, 70, 81, 128, Rows),
        (1, 4, 2, 130, 130, 64, Flash),
        (1, 4, 2, 33, 97, 48, Rows),
    ];
    for (batch, hq, hkv, t, s, d, kernel) in cases {
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
        let (od, ld) =
            ops::attention_forward_by(&dev, kernel, dims, scale as f32, (&qd, &kd, &vd)).unwrap();
        let what = format!("attention {kernel:?} {batch}x{hq}/{hkv}x{t}/{s}x{d}");
        // Flash rounds the probabilities to bf16 for the P.V product: a few 2^-9 more.
        let floor = if kernel == Flash { 4e-3 } else { 1e-3 };
        close(&format!("{what} o"), &down_bf16(&dev, &od), &o, BF16, floor);
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
        let (dqd, dkd, dvd) = ops::attention_backward_by(
            &dev,
            kernel,
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
                1.0
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
            (tokens, 6.0),
            true,
            0.0,
        )
        .unwrap(),
    );
    for (t, &c) in coef.iter().enumerate() {
        let b = sample_of[t] as usize;
        let want =
            [0.0, 0.5, 0.25, 1.0][b] * (logp[t] as f64).exp() / (6.0 * (lens[b] as f64 + 1e-8));
        assert!(
            (c as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
            "coef[{t}] {c} vs {want}"
        );
    }
    for (token_weight, floor) in [(false, 0.0f32), (true, 0.01)] {
        let sums = ops::sample_sums(&d, &lpd, &od, lens.len(), token_weight, floor).unwrap();
        let sums = down_f32(&d, &sums);
        for b in 0..lens.len() {
            let lp = &logp[offsets[b] as usize..offsets[b + 1] as usize];
            let w = |v: f32| {
                if token_weight {
                    (v as f64).exp().max(floor as f64)
                } else {
                    1.0
                }
            };
            let want = [
                lp.iter().map(|&v| v as f64).sum::<f64>(),
                lp.iter().map(|&v| w(v) * v as f64).sum::<f64>(),
                lp.iter().map(|&v| w(v)).sum::<f64>(),
            ];
            close(
                &format!("sample sums {b} token_weight={token_weight}"),
                &sums[3 * b..3 * b + 3],
                &want,
                1e-5,
                1e-6,
            );
        }
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

/// The typed kernels' two storage types: uploads, reads back, and the tolerance of their
/// outputs (f32 arithmetic on f32, one bf16 rounding of the result on bf16).
struct Typed {
    f: Float,
    d: Arc<Cuda>,
}

impl Typed {
    fn up(&self, v: &[f32]) -> DeviceBuffer {
        match self.f {
            Float::F32 => up_f32(&self.d, v),
            Float::Bf16 => up_bf16(&self.d, v),
        }
    }
    fn down(&self, b: &DeviceBuffer) -> Vec<f32> {
        match self.f {
            Float::F32 => down_f32(&self.d, b),
            Float::Bf16 => down_bf16(&self.d, b),
        }
    }
    /// `(relative, floor of the scale)`.
    fn tol(&self) -> (f64, f64) {
        match self.f {
            // f32 sums of a few hundred terms, against f64: within 1e-5 of the tensor's scale.
            Float::F32 => (2e-5, 1e-5),
            Float::Bf16 => (BF16, 1e-3),
        }
    }
    #[track_caller]
    fn check(&self, what: &str, got: &DeviceBuffer, want: &[f64]) {
        let (rel, floor) = self.tol();
        close(
            &format!("{what} {:?}", self.f),
            &self.down(got),
            want,
            rel,
            floor,
        );
    }
}

fn typed() -> Vec<Typed> {
    let Some(d) = device() else { return vec![] };
    [Float::F32, Float::Bf16]
        .into_iter()
        .map(|f| Typed { f, d: d.clone() })
        .collect()
}

/// Rounds to the storage type, as an upload does: the CPU reference reads the same values.
fn stored(t: &Typed, v: &[f32]) -> Vec<f64> {
    match t.f {
        Float::F32 => wide(v),
        Float::Bf16 => v.iter().map(|&x| bf16::from_f32(x).to_f64()).collect(),
    }
}

#[test]
fn typed_elementwise_kernels_match_cpu() {
    use cpu::binary::BinaryKind;
    use cpu::unary::UnaryKind;
    for t in typed() {
        let (d, n, cols) = (&t.d, 4099, 29);
        let x = random(n, 41, -2.0, 2.0);
        let pos: Vec<f32> = x.iter().map(|v| v.abs() + 0.5).collect();
        let dy = random(n, 42, -1.0, 1.0);
        let kinds = [
            UnaryKind::Exp,
            UnaryKind::Log,
            UnaryKind::Sigmoid,
            UnaryKind::Silu,
            UnaryKind::Neg,
            UnaryKind::Gelu,
        ];
        for (code, kind) in kinds.into_iter().enumerate() {
            // exp of the outliers (x 50) overflows; log needs positive inputs.
            let input: Vec<f32> = match kind {
                UnaryKind::Log => pos.clone(),
                UnaryKind::Exp => x.iter().map(|v| v.clamp(-8.0, 8.0)).collect(),
                _ => x.clone(),
            };
            let xw = stored(&t, &input);
            let mut y = vec![0.0; n];
            cpu::unary::unary(kind, &xw, &mut y);
            let xd = t.up(&input);
            let yd = typed::unary(d, t.f, code as u32, &xd, n).unwrap();
            t.check(&format!("unary {kind:?}"), &yd, &y);
            // The backward reads the device's own forward output, as the engine does.
            let yw = stored(&t, &t.down(&yd));
            let mut dx = vec![0.0; n];
            cpu::unary::unary_backward(kind, &xw, &yw, &stored(&t, &dy), &mut dx);
            let dyd = t.up(&dy);
            let dxd = typed::unary_backward(d, t.f, code as u32, (&xd, &yd, &dyd), n).unwrap();
            t.check(&format!("unary backward {kind:?}"), &dxd, &dx);
        }
        let b = random(cols, 43, 0.5, 2.0);
        let kinds = [
            BinaryKind::Add,
            BinaryKind::Sub,
            BinaryKind::Mul,
            BinaryKind::Div,
        ];
        let m = n - n % cols;
        for (code, kind) in kinds.into_iter().enumerate() {
            let mut want = vec![0.0; m];
            cpu::binary::binary(kind, &stored(&t, &x[..m]), &stored(&t, &b), &mut want);
            let got = typed::binary(d, t.f, code as u32, (&t.up(&x[..m]), &t.up(&b)), m, cols);
            t.check(&format!("binary {kind:?}"), &got.unwrap(), &want);
        }
        let want: Vec<f64> = stored(&t, &x).iter().map(|v| v * -0.75).collect();
        t.check(
            "scale",
            &typed::scale(d, t.f, -0.75, &t.up(&x), n).unwrap(),
            &want,
        );
        let mut sums = vec![0.0; cols];
        cpu::binary::sum_rows(&stored(&t, &x[..m]), &mut sums);
        let got = typed::sum_rows(d, t.f, &t.up(&x[..m]), m / cols, cols).unwrap();
        t.check("sum_rows", &got, &sums);
        let g = random(m / cols, 44, -1.0, 1.0);
        let (xs, gs) = (stored(&t, &x[..m]), stored(&t, &g));
        let want: Vec<f64> = (0..m).map(|i| xs[i] * gs[i / cols]).collect();
        let got = typed::scale_rows(d, t.f, &t.up(&x[..m]), &t.up(&g), m, cols).unwrap();
        t.check("scale_rows", &got, &want);
    }
}

#[test]
fn typed_softmax_nll_and_reductions_match_cpu() {
    use cpu::reduce::ReduceKind;
    for t in typed() {
        let (d, rows, cols) = (&t.d, 37, 1029);
        let x = random(rows * cols, 51, -4.0, 4.0);
        let dy = random(rows * cols, 52, -1.0, 1.0);
        let (xw, dyw) = (stored(&t, &x), stored(&t, &dy));
        let (xd, dyd) = (t.up(&x), t.up(&dy));
        for log in [false, true] {
            let mut y = vec![0.0; rows * cols];
            cpu::softmax::softmax(&xw, cols, log, &mut y);
            let yd = typed::softmax(d, t.f, &xd, (rows, cols), log).unwrap();
            t.check(&format!("softmax log={log}"), &yd, &y);
            let mut dx = vec![0.0; rows * cols];
            cpu::softmax::softmax_backward(&stored(&t, &t.down(&yd)), &dyw, cols, log, &mut dx);
            let dxd = typed::softmax_backward(d, t.f, (&yd, &dyd), (rows, cols), log).unwrap();
            t.check(&format!("softmax backward log={log}"), &dxd, &dx);
        }
        let targets: Vec<u32> = (0..rows as u32).map(|r| r * 97 % cols as u32).collect();
        let (mut loss, mut lse) = (vec![0.0; rows], vec![0.0; rows]);
        cpu::nll::nll(&xw, cols, &targets, &mut loss, &mut lse);
        let (ld, dir) = typed::nll(d, t.f, &xd, &up_u32(d, &targets), (rows, cols)).unwrap();
        t.check("nll", &ld, &loss);
        let mut want = vec![0.0; rows * cols];
        cpu::nll::nll_backward(&xw, cols, &targets, &lse, &vec![1.0; rows], &mut want);
        t.check("nll direction", &dir, &want);
        let (outer, n, inner) = (7, 13, 31);
        let len = outer * n * inner;
        let (xr, xrd) = (stored(&t, &x[..len]), t.up(&x[..len]));
        let mut out = vec![0.0; outer * inner];
        let mut idx = vec![0u32; outer * inner];
        cpu::reduce::reduce(ReduceKind::Sum, &xr, (outer, n, inner), &mut out, &mut idx);
        let sd = typed::reduce_sum(d, t.f, &xrd, (outer, n, inner)).unwrap();
        t.check("reduce_sum", &sd, &out);
        cpu::reduce::reduce(ReduceKind::Max, &xr, (outer, n, inner), &mut out, &mut idx);
        let (md, id) = typed::reduce_max(d, t.f, &xrd, (outer, n, inner)).unwrap();
        t.check("reduce_max", &md, &out);
        let got_idx: Vec<u32> = bytemuck::pod_collect_to_vec(&d.read(&id).unwrap());
        assert_eq!(got_idx, idx, "argmax {:?}", t.f);
        let g = random(outer * inner, 53, -1.0, 1.0);
        let gd = t.up(&g);
        for (kind, saved) in [(ReduceKind::Sum, None), (ReduceKind::Max, Some(&id))] {
            let mut dx = vec![0.0; len];
            cpu::reduce::reduce_backward(kind, &stored(&t, &g), &idx, (outer, n, inner), &mut dx);
            let got = typed::reduce_backward(d, t.f, &gd, saved, (outer, n, inner)).unwrap();
            t.check(&format!("reduce backward {kind:?}"), &got, &dx);
        }
    }
}

#[test]
fn typed_layernorm_matches_cpu() {
    for t in typed() {
        let (d, rows, dim) = (&t.d, 45, 384);
        let x = random(rows * dim, 61, -2.0, 2.0);
        let w = random(dim, 62, 0.5, 1.5);
        let b = random(dim, 63, -0.5, 0.5);
        let dy = random(rows * dim, 64, -1.0, 1.0);
        let (xw, ww, bw) = (stored(&t, &x), stored(&t, &w), stored(&t, &b));
        let (mut y, mut mean, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
        cpu::layernorm::layernorm(&xw, &ww, &bw, 1e-5, &mut y, &mut mean, &mut rstd);
        let (xd, wd, bd) = (t.up(&x), t.up(&w), t.up(&b));
        let (yd, md, rd) = typed::layernorm(d, t.f, (&xd, &wd, &bd), (rows, dim), 1e-5).unwrap();
        t.check("layernorm", &yd, &y);
        // A mean near zero is a sum that cancels: checked against the largest mean.
        close("layernorm mean", &down_f32(d, &md), &mean, 1e-5, 1e-4);
        close("layernorm rstd", &down_f32(d, &rd), &rstd, 1e-5, 1e-6);
        let (mut dx, mut dw, mut db) = (vec![0.0; rows * dim], vec![0.0; dim], vec![0.0; dim]);
        let dyw = stored(&t, &dy);
        cpu::layernorm::layernorm_backward(
            &xw,
            &ww,
            &mean,
            &rstd,
            &dyw,
            &mut dx,
            Some(&mut dw),
            Some(&mut db),
        );
        let (dxd, wb) =
            typed::layernorm_backward(d, t.f, (&xd, &wd, &md, &rd), &t.up(&dy), (rows, dim), true)
                .unwrap();
        // The input gradient cancels terms: checked against the tensor's scale.
        let (rel, _) = t.tol();
        close(
            &format!("layernorm dx {:?}", t.f),
            &t.down(&dxd),
            &dx,
            rel,
            4.0 * rel,
        );
        let (dwd, dbd) = wb.expect("asked for dw and db");
        t.check("layernorm dw", &dwd, &dw);
        t.check("layernorm db", &dbd, &db);
    }
}

#[test]
fn layout_kernels_move_every_element() {
    let Some(d) = device() else { return };
    let dims = [3usize, 4, 5, 6];
    let n: usize = dims.iter().product();
    let words: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2654435761)).collect();
    let halves: Vec<u16> = words.iter().map(|&w| (w >> 7) as u16).collect();
    for perm in [[0usize, 2, 1, 3], [3, 2, 1, 0], [1, 3, 0, 2]] {
        let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
        let mut want32 = vec![0u32; n];
        cpu::layout::permute(&words, &dims, &perm, &mut want32);
        let got = typed::permute(&d, 4, &up_u32(&d, &words), &dims, &perm).unwrap();
        let got32: Vec<u32> = bytemuck::pod_collect_to_vec(&d.read(&got).unwrap());
        assert_eq!(got32, want32, "permute {perm:?} -> {out_dims:?}, 4 bytes");
        let mut want16 = vec![0u16; n];
        cpu::layout::permute(&halves, &dims, &perm, &mut want16);
        let src = d.upload(bytemuck::cast_slice(&halves)).unwrap();
        let got = typed::permute(&d, 2, &src, &dims, &perm).unwrap();
        let got16: Vec<u16> = bytemuck::pod_collect_to_vec(&d.read(&got).unwrap());
        assert_eq!(got16, want16, "permute {perm:?}, 2 bytes");
    }
    // Narrow axis 1 of (3, 20, 7) at 5..13 into the middle of a (3, 11, 7) tensor at 2.
    let (outer, inner, len) = (3, 7, 8);
    let (src_dim, src_at, dst_dim, dst_at) = (20, 5, 11, 2);
    let src: Vec<u32> = (0..(outer * src_dim * inner) as u32).collect();
    let mut want = vec![u32::MAX; outer * dst_dim * inner];
    cpu::layout::copy_slab(
        &src,
        src_dim,
        src_at,
        &mut want,
        dst_dim,
        dst_at,
        (outer, len, inner),
    );
    let dst = up_u32(&d, &vec![u32::MAX; outer * dst_dim * inner]);
    let run = typed::Slab {
        rows: outer,
        len: len * inner,
        src_stride: src_dim * inner,
        src_off: src_at * inner,
        dst_stride: dst_dim * inner,
        dst_off: dst_at * inner,
    };
    typed::slab(&d, 4, &up_u32(&d, &src), &dst, run).unwrap();
    let got: Vec<u32> = bytemuck::pod_collect_to_vec(&d.read(&dst).unwrap());
    assert_eq!(got, want, "slab");
}

/// f32 products multiply in f32 (no TF32), and `gemm_into` accumulates into and writes at an
/// offset of its output, as the LM-head backward uses it.
#[test]
fn cublas_f32_gemm_accumulates_at_an_offset() {
    let Some(d) = device() else { return };
    let (m, n, k, offset) = (33, 70, 257, 100);
    let dims = GemmDims { batch: 1, m, n, k };
    let (a, b) = (random(m * k, 71, -1.0, 1.0), random(n * k, 72, -1.0, 1.0));
    let c0 = random(offset + m * n, 73, -1.0, 1.0);
    let mut want = wide(&c0);
    cpu::matmul::matmul(
        dims,
        Operand {
            data: &wide(&a),
            trans: false,
            batch_stride: m * k,
        },
        Operand {
            data: &wide(&b),
            trans: true,
            batch_stride: 0,
        },
        &mut want[offset..],
        true,
    );
    let c = up_f32(&d, &c0);
    let (ad, bd) = (up_f32(&d, &a), up_f32(&d, &b));
    let types = ops::GemmTypes {
        operands: Float::F32,
        out: Float::F32,
    };
    let ab = (
        ops::Operand::new(&ad, false),
        (ops::Operand::new(&bd, true), true),
    );
    ops::gemm_into(&d, dims, ab, types, (&c, offset, true)).unwrap();
    close(
        "f32 gemm += at an offset",
        &down_f32(&d, &c),
        &want,
        1e-5,
        1e-6,
    );
}
