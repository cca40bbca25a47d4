//! A new loss variant in one file, trained on a real model through the library's run call (the
//! same one `bft train` and `bft sweep` use), then made available to sweep files.
//!
//! `cargo run --release -p bft-trainer --example custom_variant` fetches SmolLM2-135M-Instruct
//! once (into $BFT_CACHE or ~/.cache/bft) and trains LoRA adapters for a few steps on the
//! built-in gene set -> process name instructions (about a minute on 2 cores).

use bft_trainer::loss::{LossVariant, SampleWeights};
use bft_trainer::run::{Quiet, RunOptions, train};
use bft_trainer::sweep::{Registry, SweepConfig};
use std::error::Error;
use std::path::{Path, PathBuf};

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

/// The variant from a sweep file's `[[variants]]` keys: `span` and `threshold`.
fn from_table(t: &toml::Table) -> Result<Box<dyn LossVariant>, String> {
    let mut v = SustainedLow {
        span: 16,
        threshold: 0.3,
    };
    for (k, val) in t {
        match k.as_str() {
            "span" => {
                v.span = val
                    .as_integer()
                    .filter(|&s| s >= 1)
                    .ok_or("`span` must be at least 1")? as usize
            }
            "threshold" => v.threshold = val.as_float().ok_or("`threshold` must be a number")?,
            _ => return Err(format!("unknown key `{k}` (span, threshold)")),
        }
    }
    Ok(Box::new(v))
}

fn cache() -> PathBuf {
    match (std::env::var_os("BFT_CACHE"), std::env::var_os("HOME")) {
        (Some(c), _) => c.into(),
        (None, Some(h)) => Path::new(&h).join(".cache/bft"),
        _ => std::env::temp_dir().join("bft-cache"),
    }
}

// ---- Training it on SmolLM2: the library's whole run in one call. ----

fn main() -> Result<(), Box<dyn Error>> {
    let cache = cache();
    std::fs::create_dir_all(&cache)?;
    let gguf = bft_model::fetch::smollm2_gguf(&cache)?;
    let mut m = bft_model::load_model(&gguf, bft_engine::DType::F32)?;
    let template = m.template.clone().ok_or("the model has no chat template")?;
    let convs = bft_trainer::genes::gene_set_instructions();
    let mut data =
        bft_trainer::data::encode_all(&convs[..40], &m.tokenizer, &template, &m.eos_token, 384)?;
    let held_out = data.split_off(32);
    let out = std::env::temp_dir().join(format!("bft-custom-variant-{}", std::process::id()));
    let opts = RunOptions {
        lr: 3e-4,
        eval_every: 6,
        base_model: "SmolLM2-135M-Instruct".into(),
        ..RunOptions::new(&out, 6)
    };
    let variant = SustainedLow {
        span: 16,
        threshold: 0.3,
    };
    let s = train(&mut m, &data, &held_out, &variant, &opts, &mut Quiet)?;
    let (before, after) = (
        s.eval_ce_start.ok_or("held out")?,
        s.eval_ce.ok_or("held out")?,
    );
    println!(
        "{}: {} steps, {} tokens at {:.0} tokens/s; held-out cross-entropy {before:.4} -> {after:.4}; adapter in {}",
        s.variant,
        s.steps,
        s.tokens,
        s.tokens_per_s,
        s.weights.display()
    );
    std::fs::remove_dir_all(&out)?;
    if after >= before {
        return Err(format!("held-out cross-entropy did not fall: {before} -> {after}").into());
    }

    // ---- The same variant in a sweep: register it, and sweep files can name it. ----
    let mut registry = Registry::default();
    registry.register("sustained-low", from_table);
    let sweep = "seeds = [1, 2]\n\n[[variants]]\nloss = \"bft\"\n\n[[variants]]\nloss = \"sustained-low\"\nspan = 8\n";
    let cfg = SweepConfig::parse(sweep, Path::new("sweep.toml"), &registry)?;
    let runs: Vec<String> = cfg.plan().into_iter().map(|r| r.name).collect();
    println!("a sweep file naming it plans {runs:?}; bft_trainer::sweep::run_file runs it");
    let bad = sweep.replace("span = 8", "span = 0");
    let err = SweepConfig::parse(&bad, Path::new("sweep.toml"), &registry)
        .err()
        .ok_or("span 0 must be refused")?;
    println!("and refuses a bad parameter before training: {err}");
    if runs
        != [
            "bft-s1",
            "bft-s2",
            "sustained-low-span8-s1",
            "sustained-low-span8-s2",
        ]
        || !err.to_string().starts_with("sweep.toml:8:")
    {
        return Err(format!("unexpected plan {runs:?} or error {err}").into());
    }
    Ok(())
}

#[test]
fn the_custom_variant_trains_on_smollm2_and_joins_a_sweep() {
    main().unwrap();
}
