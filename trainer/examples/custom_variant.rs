//! A new loss variant in one file, trained through the same fused LM-head kernel as the
//! built-ins. Run it with `cargo run --release -p bft-trainer --example custom_variant`.

use bft_engine::{DType, Device, Tape, Tensor};
use bft_trainer::loss::{LossBatch, LossOptions, LossVariant, SampleWeights, fused_loss};

// ---- The variant: everything a researcher writes (under 40 lines). ----

/// Weighs each sample by the share of its tokens that sit in sustained low-confidence spans
/// (the paper's Group B: `span` consecutive tokens whose mean probability is below
/// `threshold`), and each token by its own probability, as DFT does.
struct SustainedLow {
    span: usize,
    threshold: f64,
}

impl LossVariant for SustainedLow {
    fn name(&self) -> &str {
        "sustained-low"
    }

    fn weigh(&self, logprobs: &[f64]) -> SampleWeights {
        let c: Vec<f64> = logprobs.iter().map(|lp| lp.exp()).collect();
        let mut in_low_span = vec![false; c.len()];
        for start in 0..(c.len() + 1).saturating_sub(self.span) {
            let window = &c[start..start + self.span];
            if window.iter().sum::<f64>() / (self.span as f64) < self.threshold {
                in_low_span[start..start + self.span].fill(true);
            }
        }
        let share = in_low_span.iter().filter(|&&x| x).count() as f64 / c.len().max(1) as f64;
        // Both are constants for the gradient (stop-gradient), like DFT's and BFT's weights.
        SampleWeights {
            tokens: c,
            sample: 0.5 + share,
        }
    }
}

// ---- A tiny training run: 4 samples, a prompt of 8 positions each, a trainable head. ----

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let (b, t, c, v) = (4, 24, 32, 64);
    let hidden = Tensor::randn([b, t, c], 1.0, 1, DType::F32, &dev)?;
    let mut head = Tensor::randn([v, c], 0.1, 2, DType::F32, &dev)?;
    let targets: Vec<u32> = (0..b * t).map(|i| (i * 7 % v) as u32).collect();
    let mask: Vec<bool> = (0..b * t).map(|i| i % t >= 8).collect();
    let variant = SustainedLow {
        span: 10,
        threshold: 0.15,
    };
    let tape = Tape::new();
    let mut ce = Vec::new();
    for step in 0..60 {
        let w = tape.track(&head);
        let batch = LossBatch {
            hidden: &hidden,
            head: &w,
            targets: &targets,
            mask: &mask,
        };
        let out = fused_loss(batch, &variant, LossOptions::default())?;
        let s_mean = out.samples.iter().map(|s| s.s_b).sum::<f64>() / b as f64;
        if step % 10 == 0 {
            println!(
                "step {step:2}  loss {:.4}  ce {:.4}  mean s_b {s_mean:.3}",
                out.loss.to_scalar()?,
                out.ce
            );
        }
        ce.push(out.ce);
        let grad = tape
            .backward(&out.loss)?
            .remove(&w)
            .ok_or("the head is tracked")?;
        head = head.sub(&grad.scale(200.0)?)?;
    }
    let (first, last) = (ce[0], ce[ce.len() - 1]);
    println!("cross-entropy {first:.4} -> {last:.4}");
    if last >= 0.5 * first {
        return Err(format!("cross-entropy did not halve: {first} -> {last}").into());
    }
    Ok(())
}

#[test]
fn the_custom_variant_trains() {
    main().unwrap();
}
