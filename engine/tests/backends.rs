//! One test body on every available backend: a small graph with every op (matmul with
//! transposes, broadcast add/mul/div/sub, scale, exp/log/sigmoid/silu/neg, RMSNorm, RoPE,
//! SwiGLU, softmax and log-softmax, sums and maxima over first, middle and last axes, argmax,
//! permute, narrow/split and cat, embedding, causal GQA attention, the unfused cross-entropy
//! (NLL), the fused LM-head loss, and the fused forms residual-add + RMSNorm and in-place RoPE),
//! forward and backward, compared with the CPU. Without a wgpu adapter only the CPU runs,
//! unless BFT_REQUIRE_WGPU=1; a CUDA device joins when there is one (BFT_REQUIRE_CUDA=1 makes
//! its absence a failure).

use bft_engine::{DType, Device, Tape, Tensor};

fn backends() -> Vec<Device> {
    let mut out = vec![Device::Cpu];
    match Tensor::zeros([1], DType::F32, &Device::Wgpu(0)) {
        Ok(_) => out.push(Device::Wgpu(0)),
        Err(e) if std::env::var("BFT_REQUIRE_WGPU").is_ok_and(|v| v == "1") => {
            panic!("BFT_REQUIRE_WGPU=1 but {e}")
        }
        Err(e) => eprintln!("wgpu skipped: {e}"),
    }
    match Tensor::zeros([1], DType::F32, &Device::Cpu).and_then(|t| t.to_device(&Device::Cuda(0))) {
        Ok(_) => out.push(Device::Cuda(0)),
        Err(e) if std::env::var("BFT_REQUIRE_CUDA").is_ok_and(|v| v == "1") => {
            panic!("BFT_REQUIRE_CUDA=1 but {e}")
        }
        Err(e) => eprintln!("cuda skipped: {e}"),
    }
    out
}

/// How close a backend's f32 walk must come to the CPU's, relative to each quantity's scale:
/// wgpu computes in f32; CUDA rounds f32 inputs to bf16 once in the kernels that exist only in
/// bf16 (RMSNorm, RoPE, SwiGLU, attention, the fused loss), 8 significant bits.
fn tolerance(dev: Device) -> f64 {
    match dev {
        Device::Cuda(_) => 3e-2,
        _ => 1e-4,
    }
}

/// The loss, the gradients of the six leaves, an argmax and the rows it is taken over, on the
/// host.
fn run(dev: Device) -> (f64, Vec<Vec<f64>>, Vec<u32>, Vec<f64>) {
    let t = |shape: Vec<usize>, std: f64, seed: u64| {
        Tensor::randn(shape, std, seed, DType::F32, &Device::Cpu)
            .unwrap()
            .to_device(&dev)
            .unwrap()
    };
    let tape = Tape::new();
    let x = tape.track(&t(vec![2, 6, 20], 1.0, 1));
    let w = tape.track(&t(vec![33, 20], 0.3, 2));
    let gain = tape.track(&t(vec![33], 0.5, 3).exp().unwrap());
    let bias = tape.track(&t(vec![33], 0.2, 4));
    let target = t(vec![2, 6, 33], 1.0, 5).softmax().unwrap();
    // (2, 6, 20) . (33, 20)^T -> (2, 6, 33)
    let h = x.matmul_t(&w, false, true).unwrap();
    let h = h.rms_norm(&gain, 1e-5).unwrap().silu().unwrap();
    let h = h.mul(&bias).unwrap().add(&bias).unwrap();
    let gate = h.sigmoid().unwrap().add(&gain).unwrap();
    let h = h.div(&gate).unwrap().sub(&bias.neg().unwrap()).unwrap();
    // (2, 6, 33 -> 32): rotate pairs of the first 32 channels at positions 3..9, then gate.
    let (cos, sin) = bft_engine::ops::rope_tables(10_000.0, 32, 6, 3, DType::F32).unwrap();
    let (cos, sin) = (cos.to_device(&dev).unwrap(), sin.to_device(&dev).unwrap());
    let ones = Tensor::ones([2, 6, 32], DType::F32, &dev).unwrap();
    let first = h.matmul_t(&t(vec![32, 33], 0.2, 6), false, true).unwrap();
    let rotated = first
        .scale(1.0)
        .unwrap()
        .rope_in_place(&cos, &sin)
        .unwrap()
        .swiglu(&first.add(&ones).unwrap())
        .unwrap();
    let (h, normed) = h
        .add_rms_norm(
            &rotated.matmul(&t(vec![32, 33], 0.2, 7)).unwrap(),
            &gain,
            1e-5,
        )
        .unwrap();
    let h = h.add(&normed.scale(0.1).unwrap()).unwrap();
    // Heads: (2, 6, 33) -> narrow to 32 channels -> (2, 6, 4, 8) -> (2, 4, 6, 8), split and
    // re-joined along the head axis, back to (2, 6, 32), then cat with the last channel.
    let heads = h
        .narrow(-1, 0, 32)
        .unwrap()
        .reshape([2, 6, 4, 8])
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let parts = heads.split(1, &[1, 3]).unwrap();
    let heads = Tensor::cat(&[parts[1].clone(), parts[0].scale(2.0).unwrap()], 1).unwrap();
    // Causal attention over the heads: 4 query heads share 2 K/V heads.
    let kv = heads.narrow(1, 0, 2).unwrap();
    let heads = heads
        .causal_attention(&kv, &kv.scale(0.5).unwrap(), None)
        .unwrap();
    let back = heads
        .permute(&[0, 2, 1, 3])
        .unwrap()
        .reshape([2, 6, 32])
        .unwrap();
    let h = Tensor::cat(&[back, h.narrow(-1, 32, 1).unwrap()], -1).unwrap();
    // Token embeddings (ids stay on the host) added per position.
    let table = tape.track(&t(vec![9, 33], 0.5, 8));
    let ids = Tensor::from_vec(
        vec![3u32, 1, 3, 8, 0, 3, 5, 5, 2, 1, 7, 3],
        [2, 6],
        &Device::Cpu,
    )
    .unwrap();
    let h = h.add(&table.embedding(&ids).unwrap()).unwrap();
    // Maxima and sums over the middle (token) axis, and the unfused cross-entropy over rows.
    let peaks = h.max(1).unwrap().sum(1).unwrap().max(0).unwrap();
    let spread = h.sum(1).unwrap().max(-1).unwrap().sum(0).unwrap();
    let labels = Tensor::from_vec((0..12u32).map(|i| i * 7 % 33).collect(), [12], &Device::Cpu)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    let mask = Tensor::from_vec(vec![1.0f32; 12], [12], &dev).unwrap();
    let plain_ce = h
        .reshape([12, 33])
        .unwrap()
        .cross_entropy(&labels, &mask)
        .unwrap();
    let extra = peaks
        .add(&spread)
        .unwrap()
        .scale(0.05)
        .unwrap()
        .add(&plain_ce)
        .unwrap();
    let h_rows = h.to_device(&Device::Cpu).unwrap().to_f64_vec().unwrap();
    let argmax = h
        .stop_gradient()
        .argmax()
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .to_vec::<u32>()
        .unwrap();
    let logp = h.log_softmax().unwrap();
    let ce = logp.mul(&target).unwrap().sum(-1).unwrap().sum(0).unwrap();
    let aux = h.softmax().unwrap().log().unwrap().scale(0.01).unwrap();
    let loss = ce
        .sum_all()
        .unwrap()
        .scale(-1.0 / 12.0)
        .unwrap()
        .add(&aux.sum_all().unwrap())
        .unwrap();
    // The fused LM head over 9 of the 12 rows, weighted per row by a detached function of the
    // log-probs (as BFT weighs tokens).
    let head = tape.track(&t(vec![50, 33], 0.3, 9));
    let hidden = h.reshape([12, 33]).unwrap();
    let rows = [0u32, 2, 3, 4, 6, 7, 9, 10, 11];
    let targets = [5u32, 49, 0, 17, 17, 3, 30, 44, 8];
    let nll = hidden
        .lm_head_nll(&head, &rows, &targets, |lp| {
            lp.iter().map(|l| 0.5 + l.exp()).collect()
        })
        .unwrap();
    let loss = loss
        .add(&nll.loss.scale(0.1).unwrap())
        .unwrap()
        .add(&extra)
        .unwrap();
    let value = loss.to_scalar().unwrap();
    let mut grads = tape.backward(&loss).unwrap();
    let leaves = [&x, &w, &gain, &bias, &table, &head];
    let g = leaves
        .iter()
        .map(|l| grads.remove(l).expect("a gradient").to_f64_vec().unwrap())
        .collect();
    (value, g, argmax, h_rows)
}

#[test]
fn forward_and_backward_agree_on_every_backend() {
    let (cpu_loss, cpu_grads, cpu_argmax, cpu_rows) = run(Device::Cpu);
    assert!(cpu_loss.is_finite());
    for dev in backends().into_iter().skip(1) {
        let tol = tolerance(dev);
        let (loss, grads, argmax, _) = run(dev);
        // Each row's pick is the CPU's; under bf16 rounding (CUDA) a value within tolerance of
        // the CPU's maximum may win a near tie instead.
        let row_scale = cpu_rows.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
        let bf16 = matches!(dev, Device::Cuda(_));
        for (r, (&a, &c)) in argmax.iter().zip(&cpu_argmax).enumerate() {
            let row = &cpu_rows[r * 33..(r + 1) * 33];
            assert!(
                a == c || (bf16 && row[c as usize] - row[a as usize] <= tol * row_scale),
                "{dev}: argmax of row {r} is {a}, the cpu's {c}"
            );
        }
        assert!(
            (loss - cpu_loss).abs() <= tol * cpu_loss.abs().max(1.0),
            "{dev}: loss {loss} vs cpu {cpu_loss}"
        );
        for (k, (g, c)) in grads.iter().zip(&cpu_grads).enumerate() {
            let scale = c.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
            for (i, (a, b)) in g.iter().zip(c).enumerate() {
                assert!(
                    (a - b).abs() <= tol * scale,
                    "{dev}: gradient of leaf {k} [{i}]: {a} vs cpu {b}"
                );
            }
        }
        eprintln!("{dev}: loss {loss:.6} (cpu {cpu_loss:.6}), gradients within {tol:e}");
    }
}

/// 16-bit tensors live on every backend: the same bits after a round trip and after casts on
/// the device, and ops on them compute in f32 (one rounding to 16 bits at the end), with
/// gradients flowing back through the casts.
#[test]
fn sixteen_bit_tensors_round_trip_cast_and_compute_on_every_backend() {
    let base = Tensor::randn([7, 5], 2.0, 21, DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::randn([5, 3], 1.0, 22, DType::F32, &Device::Cpu).unwrap();
    for half in [DType::F16, DType::BF16] {
        let host = base.to_dtype(half).unwrap();
        let cpu_y = host.matmul(&w.to_dtype(half).unwrap()).unwrap();
        let cpu_y = cpu_y.to_f64_vec().unwrap();
        for dev in backends().into_iter().skip(1) {
            let on = host.to_device(&dev).unwrap();
            assert_eq!(on.dtype(), half);
            let back = on.to_device(&Device::Cpu).unwrap();
            assert_eq!(back.to_f64_vec().unwrap(), host.to_f64_vec().unwrap());
            // Casts on the device give the host's bits: f32 -> 16 bit, 16 bit -> f32.
            let narrowed = base.to_device(&dev).unwrap().to_dtype(half).unwrap();
            assert_eq!(narrowed.dtype(), half);
            assert_eq!(narrowed.device(), dev);
            assert_eq!(
                narrowed.to_f64_vec().unwrap(),
                host.to_f64_vec().unwrap(),
                "{dev} {half:?}"
            );
            // f64 has no device form: an error, not an f32 buffer under an f64 label.
            assert!(on.to_dtype(DType::F64).is_err(), "{dev} {half:?} -> f64");
            let widened = on.to_dtype(DType::F32).unwrap();
            assert_eq!(widened.device(), dev);
            assert_eq!(widened.to_f64_vec().unwrap(), host.to_f64_vec().unwrap());
            // A product of 16-bit tensors: f32 inside, rounded once; the sums may round
            // differently by one 16-bit step.
            let tape = Tape::new();
            let x = tape.track(&on);
            let y = x
                .matmul(&w.to_dtype(half).unwrap().to_device(&dev).unwrap())
                .unwrap();
            assert_eq!((y.dtype(), y.device()), (half, dev));
            let step = if half == DType::F16 {
                2f64.powi(-10)
            } else {
                2f64.powi(-7)
            };
            for (a, b) in y.to_f64_vec().unwrap().iter().zip(&cpu_y) {
                assert!(
                    (a - b).abs() <= step * b.abs().max(1.0),
                    "{dev} {half:?}: {a} vs {b}"
                );
            }
            let grads = tape.backward(&y.to_dtype(DType::F32).unwrap().sum_all().unwrap());
            let gx = grads.unwrap().remove(&x).expect("a gradient");
            assert_eq!((gx.dtype(), gx.device()), (half, dev));
        }
    }
}

/// On a CUDA device (skipped without one, unless BFT_REQUIRE_CUDA=1): tensors of every dtype
/// round-trip, f32 <-> bf16/f16 casts give the host's bits, and the optimizer's fused AdamW
/// and sum of squares agree with the CPU. The engine's ops do not run on CUDA yet: they report
/// it as an error, never a panic.
#[test]
fn cuda_tensors_round_trip_cast_and_take_optimizer_steps() {
    use bft_engine::optim::{AdamWStep, adamw_step, sum_squares};
    let dev = Device::Cuda(0);
    let probe = Tensor::zeros([1], DType::F32, &Device::Cpu).and_then(|t| t.to_device(&dev));
    if let Err(e) = probe {
        assert!(
            !std::env::var("BFT_REQUIRE_CUDA").is_ok_and(|v| v == "1"),
            "BFT_REQUIRE_CUDA=1 but {e}"
        );
        return eprintln!("cuda skipped: {e}");
    }
    let base = Tensor::randn([7, 5], 2.0, 31, DType::F32, &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let host = base.to_dtype(dtype).unwrap();
        let on = host.to_device(&dev).unwrap();
        assert_eq!((on.dtype(), on.device()), (dtype, dev));
        assert_eq!(
            on.to_device(&Device::Cpu).unwrap().to_f64_vec().unwrap(),
            host.to_f64_vec().unwrap()
        );
        let narrowed = base.to_device(&dev).unwrap().to_dtype(dtype).unwrap();
        assert_eq!(narrowed.device(), dev);
        assert_eq!(narrowed.to_f64_vec().unwrap(), host.to_f64_vec().unwrap());
    }
    let err = base.to_device(&dev).unwrap().exp().unwrap_err();
    assert!(err.to_string().contains("cuda:0"), "{err}");
    let h = AdamWStep {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        bias1: 0.1,
        bias2: 0.001,
        grad_scale: 0.5,
    };
    let g = Tensor::randn([7, 5], 1.0, 32, DType::F32, &Device::Cpu).unwrap();
    let zeros = || Tensor::zeros([35], DType::F32, &Device::Cpu).unwrap();
    let (mut p, mut m, mut v) = (base.clone(), zeros(), zeros());
    adamw_step(&mut p, &g, &mut m, &mut v, &h).unwrap();
    let on = |t: &Tensor| t.to_device(&dev).unwrap();
    let (mut pd, mut md, mut vd) = (on(&base), on(&zeros()), on(&zeros()));
    adamw_step(&mut pd, &on(&g), &mut md, &mut vd, &h).unwrap();
    for (a, b) in pd.to_f64_vec().unwrap().iter().zip(p.to_f64_vec().unwrap()) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "adamw {a} vs {b}");
    }
    let (sd, sc) = (sum_squares(&[on(&g)]).unwrap(), sum_squares(&[g]).unwrap());
    assert!((sd - sc).abs() <= 1e-5 * sc, "{sd} vs {sc}");
}

/// The encoder's ops (LayerNorm with gain and bias, the exact GELU, a softmax over scores with
/// an additive padding mask) forward and backward on every backend, compared with the CPU.
#[test]
fn encoder_ops_agree_on_every_backend() {
    let run = |dev: &Device| {
        let t = |shape: Vec<usize>, std: f64, seed: u64| {
            Tensor::randn(shape, std, seed, DType::F32, &Device::Cpu)
                .unwrap()
                .to_device(dev)
                .unwrap()
        };
        let tape = Tape::new();
        let x = tape.track(&t(vec![3, 5, 300], 1.5, 31));
        let w = tape.track(&t(vec![300], 1.0, 32));
        let b = tape.track(&t(vec![300], 0.3, 33));
        let h = x.layer_norm(&w, &b, 1e-12).unwrap().gelu().unwrap();
        // (3, 5, 300) . (3, 300, 5) -> (3, 5, 5) scores, the last key of each row masked.
        let scores = h.matmul_t(&h, false, true).unwrap().scale(0.05).unwrap();
        let mask: Vec<f32> = (0..75)
            .map(|i| if i % 5 == 4 { -1e4 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, [3, 5, 5], &Device::Cpu)
            .unwrap()
            .to_device(dev)
            .unwrap();
        let p = scores.add(&mask).unwrap().softmax().unwrap();
        let loss = p.matmul(&h).unwrap().gelu().unwrap().sum_all().unwrap();
        let value = loss.to_scalar().unwrap();
        let mut g = tape.backward(&loss).unwrap();
        let grads: Vec<Vec<f64>> = [&x, &w, &b]
            .iter()
            .map(|l| g.remove(l).unwrap().to_f64_vec().unwrap())
            .collect();
        (value, grads)
    };
    let (cpu_loss, cpu_grads) = run(&Device::Cpu);
    for dev in backends().into_iter().skip(1) {
        let (loss, grads) = run(&dev);
        assert!(
            (loss - cpu_loss).abs() <= 1e-4 * cpu_loss.abs().max(1.0),
            "{dev}: loss {loss} vs cpu {cpu_loss}"
        );
        for (k, (g, c)) in grads.iter().zip(&cpu_grads).enumerate() {
            let scale = c.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
            for (a, b) in g.iter().zip(c) {
                assert!((a - b).abs() <= 1e-4 * scale, "{dev}: leaf {k}: {a} vs {b}");
            }
        }
    }
}
