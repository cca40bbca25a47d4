use super::*;
use bft_engine::gradcheck::{Tolerance, check};
use bft_engine::{DType, Tape};
use std::sync::Mutex;

const C: usize = 4;
const V: usize = 7;

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), 1.0, seed, DType::F64, &Device::Cpu).unwrap()
}

/// Three samples of 6 positions: a prompt, two assistant turns with a gap between them, one
/// sample with no valid token, and targets spread over the vocabulary.
fn data() -> (Tensor, Tensor, Vec<u32>, Vec<bool>) {
    let mask = [
        [false, true, true, false, true, true],
        [false, false, false, false, false, false],
        [true, true, true, true, true, false],
    ]
    .concat();
    let targets = (0..18).map(|i| (i * 5 % V) as u32).collect();
    (tensor(&[3, 6, C], 1), tensor(&[V, C], 2), targets, mask)
}

fn variants() -> Vec<Box<dyn LossVariant>> {
    let p = VariantParams {
        group: GroupConfig {
            window: 3,
            mean: GroupMean::Arithmetic,
        },
        floor: 0.05,
        ..Default::default()
    };
    let mut v: Vec<Box<dyn LossVariant>> = BUILTIN_NAMES
        .iter()
        .map(|n| builtin(n, p).unwrap())
        .collect();
    v.push(Box::new(Bft {
        group: GroupConfig {
            window: 3,
            mean: GroupMean::Geometric,
        },
        gamma: 2.0,
        ..Default::default()
    }));
    v
}

#[test]
fn golden_group_confidence_for_short_samples() {
    let (a, b) = (0.5f64.ln(), 0.25f64.ln());
    // n = 2 < g: one window over both tokens.
    let arith = weakest_window(
        &[a, b],
        GroupConfig {
            window: 256,
            mean: GroupMean::Arithmetic,
        },
    )
    .unwrap();
    assert!((arith.p_conf - 0.375).abs() < 1e-15 && arith.start == 0);
    let geo = weakest_window(
        &[a, b],
        GroupConfig {
            window: 256,
            mean: GroupMean::Geometric,
        },
    )
    .unwrap();
    assert!((geo.p_conf - 0.125f64.sqrt()).abs() < 1e-15);
    // s_b = 1 - p_conf^gamma.
    let bft = Bft {
        group: GroupConfig {
            window: 256,
            mean: GroupMean::Arithmetic,
        },
        ..Default::default()
    };
    assert!((bft.sample_weight(&[a, b]) - 0.625).abs() < 1e-15);
    let bft2 = Bft { gamma: 2.0, ..bft };
    assert!((bft2.sample_weight(&[a, b]) - (1.0 - 0.375f64.powi(2))).abs() < 1e-15);
    assert!(weakest_window(&[], GroupConfig::default()).is_none());
}

#[test]
fn golden_sliding_windows_pick_the_first_weakest() {
    // Confidences 0.9, 0.2, 0.3, 0.9, 0.1, 0.4 with g = 3.
    let c = [0.9f64, 0.2, 0.3, 0.9, 0.1, 0.4];
    let lp: Vec<f64> = c.iter().map(|x| x.ln()).collect();
    let arith = weakest_window(
        &lp,
        GroupConfig {
            window: 3,
            mean: GroupMean::Arithmetic,
        },
    )
    .unwrap();
    // Window means: 1.4/3, 1.4/3, 1.3/3, 1.4/3 -> the third window (start 2).
    assert!(
        (arith.p_conf - 1.3 / 3.0).abs() < 1e-15 && arith.start == 2,
        "{arith:?}"
    );
    let geo = weakest_window(
        &lp,
        GroupConfig {
            window: 3,
            mean: GroupMean::Geometric,
        },
    )
    .unwrap();
    // Geometric means: 0.054^(1/3), 0.054^(1/3), 0.027^(1/3), 0.036^(1/3) -> start 2 as well,
    // but with a different value: the two means disagree in general.
    assert!(
        (geo.p_conf - 0.027f64.cbrt()).abs() < 1e-14 && geo.start == 2,
        "{geo:?}"
    );
    let ties = weakest_window(
        &[0.5f64.ln(); 5],
        GroupConfig {
            window: 2,
            mean: GroupMean::Arithmetic,
        },
    )
    .unwrap();
    assert_eq!(ties.start, 0);
}

#[test]
fn windows_span_turns_on_compacted_tokens_and_empty_samples_are_exact_zeros() {
    let (x, w, y, m) = data();
    let bft = Bft {
        group: GroupConfig {
            window: 3,
            mean: GroupMean::Arithmetic,
        },
        ..Default::default()
    };
    let opts = LossOptions {
        analysis: bft.group,
        ..Default::default()
    };
    let tape = Tape::new();
    let xt = tape.track(&x);
    let out = fused_loss(
        LossBatch {
            hidden: &xt,
            head: &w,
            targets: &y,
            mask: &m,
        },
        &bft,
        opts,
    )
    .unwrap();
    // Sample 0: positions 1, 2, 4, 5 are valid; windows of 3 run over those 4 compacted tokens,
    // so the second window spans the gap between the two turns.
    let s0 = &out.samples[0];
    assert_eq!(s0.n_valid, 4);
    let c: Vec<f64> = s0.logprobs.iter().map(|l| l.exp()).collect();
    let want = ((c[0] + c[1] + c[2]) / 3.0).min((c[1] + c[2] + c[3]) / 3.0);
    assert!((s0.p_conf.unwrap() - want).abs() < 1e-15);
    assert!((s0.s_b - (1.0 - want)).abs() < 1e-15);
    // Sample 1 has no valid token: its term is exactly 0, and it still counts in B = 3.
    let s1 = &out.samples[1];
    assert_eq!((s1.n_valid, s1.loss, s1.ce, s1.p_conf), (0, 0.0, 0.0, None));
    let total: f64 = out.samples.iter().map(|s| s.loss).sum::<f64>() / 3.0;
    assert!((out.loss.to_scalar().unwrap() - total).abs() < 1e-14);
    // The loss is differentiable there too: the gradient rows of sample 1 are exact zeros.
    let g = tape
        .backward(&out.loss)
        .unwrap()
        .get(&xt)
        .unwrap()
        .to_vec::<f64>()
        .unwrap();
    assert!(g[6 * C..12 * C].iter().all(|&v| v == 0.0) && g.iter().all(|v| v.is_finite()));
    // Masked positions get no gradient either (sample 0, position 0 is prompt).
    assert!(g[..C].iter().all(|&v| v == 0.0));
}

/// Gradients of `loss` w.r.t. hidden states and head, both tracked.
fn grads(f: impl Fn(LossBatch<'_>) -> LossOutput) -> (f64, Vec<f64>, Vec<f64>, Vec<SampleStats>) {
    let (x, w, y, m) = data();
    let tape = Tape::new();
    let (xt, wt) = (tape.track(&x), tape.track(&w));
    let out = f(LossBatch {
        hidden: &xt,
        head: &wt,
        targets: &y,
        mask: &m,
    });
    let g = tape.backward(&out.loss).unwrap();
    let v = |t: &Tensor| g.get(t).unwrap().to_vec::<f64>().unwrap();
    (out.loss.to_scalar().unwrap(), v(&xt), v(&wt), out.samples)
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

#[test]
fn fused_equals_unfused_reference_for_every_variant() {
    for variant in variants() {
        let opts = LossOptions::default();
        let (lf, dxf, dwf, sf) = grads(|b| fused_loss(b, variant.as_ref(), opts).unwrap());
        let (lu, dxu, dwu, su) = grads(|b| unfused_loss(b, variant.as_ref(), opts).unwrap());
        let name = variant.name();
        assert!((lf - lu).abs() < 1e-13, "{name}: {lf} vs {lu}");
        assert!(
            close(&dxf, &dxu, 1e-12) && close(&dwf, &dwu, 1e-12),
            "{name}: gradients differ"
        );
        for (a, b) in sf.iter().zip(&su) {
            assert!(
                close(&a.logprobs, &b.logprobs, 1e-13)
                    && (a.loss - b.loss).abs() < 1e-13
                    && a.s_b == b.s_b,
                "{name}"
            );
        }
    }
}

/// Replays fixed weights: the loss as a function of hidden states and head with the weights
/// frozen, which is what the stop-gradient makes them.
struct Frozen {
    weights: Vec<SampleWeights>,
    next: Mutex<usize>,
}

impl LossVariant for Frozen {
    fn name(&self) -> &str {
        "frozen"
    }
    fn weigh(&self, _: &[f64]) -> SampleWeights {
        let mut i = self.next.lock().unwrap();
        *i += 1;
        self.weights[*i - 1].clone()
    }
}

#[test]
fn finite_differences_agree_for_every_variant() {
    let (x, w, y, m) = data();
    for variant in variants() {
        let opts = LossOptions::default();
        let base = fused_loss(
            LossBatch {
                hidden: &x,
                head: &w,
                targets: &y,
                mask: &m,
            },
            variant.as_ref(),
            opts,
        )
        .unwrap();
        let weights: Vec<SampleWeights> = base
            .samples
            .iter()
            .map(|s| variant.weigh(&s.logprobs))
            .collect();
        let f = |t: &[Tensor]| -> bft_engine::Result<Tensor> {
            let frozen = Frozen {
                weights: weights.clone(),
                next: Mutex::new(0),
            };
            let b = LossBatch {
                hidden: &t[0],
                head: &t[1],
                targets: &y,
                mask: &m,
            };
            Ok(fused_loss(b, &frozen, opts)
                .map_err(|e| bft_engine::Error::Backward(e.to_string()))?
                .loss)
        };
        check(&f, &[x.clone(), w.clone()], Tolerance::default())
            .unwrap_or_else(|e| panic!("{}: {e}", variant.name()));
        // At the base point the real variant's gradient is the frozen one's.
        let (_, dx, dw, _) = grads(|b| fused_loss(b, variant.as_ref(), opts).unwrap());
        let frozen = Frozen {
            weights,
            next: Mutex::new(0),
        };
        let (_, fx, fw, _) = grads(|b| fused_loss(b, &frozen, opts).unwrap());
        assert!(
            close(&dx, &fx, 1e-14) && close(&dw, &fw, 1e-14),
            "{}",
            variant.name()
        );
    }
}

/// Runs the samples `range` of the fixture as one micro-batch and returns (loss, dhidden, dhead)
/// with dhidden placed back at the rows of those samples.
fn micro(
    range: std::ops::Range<usize>,
    reduction: Reduction,
    variant: &dyn LossVariant,
) -> (f64, Vec<f64>, Vec<f64>) {
    let (x, w, y, m) = data();
    let (x, y, m) = (
        x.narrow(0, range.start, range.len()).unwrap(),
        y[range.start * 6..range.end * 6].to_vec(),
        m[range.start * 6..range.end * 6].to_vec(),
    );
    let tape = Tape::new();
    let (xt, wt) = (tape.track(&x), tape.track(&w));
    let opts = LossOptions {
        reduction,
        ..Default::default()
    };
    let out = fused_loss(
        LossBatch {
            hidden: &xt,
            head: &wt,
            targets: &y,
            mask: &m,
        },
        variant,
        opts,
    )
    .unwrap();
    let g = tape.backward(&out.loss).unwrap();
    let mut dx = vec![0.0; 3 * 6 * C];
    dx[range.start * 6 * C..range.end * 6 * C]
        .copy_from_slice(&g.get(&xt).unwrap().to_vec::<f64>().unwrap());
    (
        out.loss.to_scalar().unwrap(),
        dx,
        g.get(&wt).unwrap().to_vec::<f64>().unwrap(),
    )
}

#[test]
fn exact_accumulation_equals_one_big_batch_and_reference_is_hf_trainer() {
    let bft = Bft {
        group: GroupConfig {
            window: 3,
            mean: GroupMean::Arithmetic,
        },
        ..Default::default()
    };
    let whole = micro(0..3, Reduction::default(), &bft);
    // Unequal micro-batches (2 + 1 samples), each scaled by the step's 3 samples.
    let exact = Reduction::Exact {
        step_samples: Some(3),
    };
    let (a, b) = (micro(0..2, exact, &bft), micro(2..3, exact, &bft));
    let sum = |u: &[f64], v: &[f64]| u.iter().zip(v).map(|(p, q)| p + q).collect::<Vec<_>>();
    assert!((a.0 + b.0 - whole.0).abs() < 1e-14);
    assert!(close(&sum(&a.1, &b.1), &whole.1, 1e-13) && close(&sum(&a.2, &b.2), &whole.2, 1e-13));
    // Reference: each micro-batch's mean, divided by the number of micro-batches.
    let reference = Reduction::Reference { micro_batches: 2 };
    let (ra, rb) = (micro(0..2, reference, &bft), micro(2..3, reference, &bft));
    let mean = |r: std::ops::Range<usize>| micro(r, Reduction::default(), &bft).0;
    assert!((ra.0 + rb.0 - (mean(0..2) + mean(2..3)) / 2.0).abs() < 1e-14);
    assert!(
        (ra.0 + rb.0 - whole.0).abs() > 1e-6,
        "unequal micro-batches must differ from exact"
    );
}

#[test]
fn bad_batches_are_errors_that_say_where() {
    let (x, w, mut y, m) = data();
    let bft = Bft::default();
    y[14] = 99;
    let e = fused_loss(
        LossBatch {
            hidden: &x,
            head: &w,
            targets: &y,
            mask: &m,
        },
        &bft,
        LossOptions::default(),
    );
    let msg = e.unwrap_err().to_string();
    assert!(
        msg.contains("sample 2, position 2") && msg.contains("99"),
        "{msg}"
    );
    let e = fused_loss(
        LossBatch {
            hidden: &x,
            head: &w,
            targets: &y[..5],
            mask: &m,
        },
        &bft,
        LossOptions::default(),
    );
    assert!(e.unwrap_err().to_string().contains("B*T = 18"));
    let opts = LossOptions {
        reduction: Reduction::Exact {
            step_samples: Some(2),
        },
        ..Default::default()
    };
    assert!(
        fused_loss(
            LossBatch {
                hidden: &x,
                head: &w,
                targets: &y,
                mask: &m
            },
            &bft,
            opts
        )
        .is_err()
    );
    assert!(
        builtin(
            "bft",
            VariantParams {
                group: GroupConfig {
                    window: 0,
                    ..Default::default()
                },
                ..Default::default()
            }
        )
        .is_err()
    );
    let msg = builtin("dpo", VariantParams::default())
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("sft, dft, bft"), "{msg}");
    // Non-finite parameters are refused, not turned into NaN weights.
    for p in [
        VariantParams {
            gamma: f64::NAN,
            ..Default::default()
        },
        VariantParams {
            gamma: f64::INFINITY,
            ..Default::default()
        },
        VariantParams {
            focal_gamma: f64::NAN,
            ..Default::default()
        },
        VariantParams {
            floor: f64::NAN,
            ..Default::default()
        },
    ] {
        let msg = builtin("bft", p).err().unwrap().to_string();
        assert!(msg.contains("gamma"), "{msg}");
    }
}

/// Weights computed where the hidden states are (`weigh_on_device`) give the host's loss,
/// gradients and per-sample statistics for every variant with a device form: on the CPU
/// through the code a GPU runs (in f64, so to rounding), and on wgpu through `fused_loss`
/// itself (in f32).
#[test]
fn weighing_on_the_device_equals_weighing_on_the_host() {
    let configs = [
        (Reduction::default(), GroupConfig::default()),
        (
            Reduction::Exact {
                step_samples: Some(5),
            },
            GroupConfig {
                window: 2,
                mean: GroupMean::Geometric,
            },
        ),
    ];
    let near = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * (1.0 + a.abs());
    let same_stats = |h: &[SampleStats], d: &[SampleStats], tol: f64, name: &str| {
        assert_eq!(h.len(), d.len(), "{name}");
        for (h, d) in h.iter().zip(d) {
            assert_eq!(h.n_valid, d.n_valid, "{name}");
            assert!(d.logprobs.is_empty() && d.weakest_window_start.is_none());
            for (a, b) in [
                (h.s_b, d.s_b),
                (h.w_mean, d.w_mean),
                (h.loss, d.loss),
                (h.ce, d.ce),
            ] {
                assert!(near(a, b, tol), "{name}: {a} vs {b}");
            }
            match (h.p_conf, d.p_conf) {
                (Some(a), Some(b)) => assert!(near(a, b, tol), "{name}: p_conf {a} vs {b}"),
                (a, b) => assert_eq!(a, b, "{name}"),
            }
        }
    };
    let mut devices = 0;
    for variant in variants() {
        let name = variant.name().to_string();
        let Some(dw) = variant.device_weights() else {
            assert_eq!(name, "focal", "only focal has no device form");
            continue;
        };
        devices += 1;
        for (reduction, analysis) in configs {
            let opts = LossOptions {
                reduction,
                analysis,
                weigh_on_device: false,
            };
            let (lh, dxh, dwh, sh) = grads(|b| fused_loss(b, variant.as_ref(), opts).unwrap());
            let (ld, dxd, dwd, sd) = grads(|b| {
                let lay = layout(&b).unwrap();
                let flat = b.hidden.reshape([18, C]).unwrap();
                weighed_on_device(&flat, b.head, &lay, dw, opts).unwrap()
            });
            assert!(near(lh, ld, 1e-12), "{name}: loss {lh} vs {ld}");
            assert!(
                close(&dxh, &dxd, 1e-12) && close(&dwh, &dwd, 1e-12),
                "{name}: gradients differ"
            );
            same_stats(&sh, &sd, 1e-12, &name);
            if Device::wgpu_adapters().is_empty() {
                continue;
            }
            let (x, w, y, m) = data();
            let gpu = |t: Tensor| t.to_dtype(DType::F32).unwrap().to_device(&Device::Wgpu(0));
            let (x, w) = (gpu(x).unwrap(), gpu(w).unwrap());
            let batch = LossBatch {
                hidden: &x,
                head: &w,
                targets: &y,
                mask: &m,
            };
            let host = fused_loss(batch, variant.as_ref(), opts).unwrap();
            let on_device = LossOptions {
                weigh_on_device: true,
                ..opts
            };
            let dev = fused_loss(batch, variant.as_ref(), on_device).unwrap();
            let (a, b) = (
                host.loss.to_scalar().unwrap(),
                dev.loss.to_scalar().unwrap(),
            );
            assert!(near(a, b, 1e-5), "{name} on wgpu: loss {a} vs {b}");
            same_stats(&host.samples, &dev.samples, 1e-5, &name);
        }
    }
    assert_eq!(
        devices, 6,
        "sft, dft, bft, bft-no-token, bft-no-sample and the geometric BFT"
    );
}
