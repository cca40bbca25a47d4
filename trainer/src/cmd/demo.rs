//! `bft demo`: the README's main command. Fetches SmolLM2-135M-Instruct, fine-tunes it with
//! LoRA + BFT on the built-in gene instructions and reports held-out answers, cross-entropy and
//! ROUGE-L before and after.

use super::progress::Progress;
use super::train::TrainProgress;
use crate::cli::{encode_all, fetch_smollm2};
use anyhow::{Context, Result, bail};
use bft_engine::DType;
use bft_model::load_model;
use bft_trainer::eval::rouge;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug, serde::Serialize)]
pub struct DemoArgs {
    /// Output directory: data/, metrics.jsonl, run_config.json, adapter/.
    #[arg(long, default_value = "bft-demo")]
    pub output: PathBuf,
    /// Optimizer steps of 4 samples (the default takes a few minutes on 2 cores).
    #[arg(long, default_value_t = 60)]
    pub max_steps: u64,
    /// Held-out samples whose cross-entropy is measured before and after.
    #[arg(long, default_value_t = 48)]
    pub eval_samples: usize,
    /// Model cache (default: $BFT_CACHE or ~/.cache/bft).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Peak learning rate (3e-4 over-sharpens with BFT's probability weights here: held-out
    /// cross-entropy rises; see docs/BENCHMARKS.md).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Loss variant (bft, or sft/dft/... for comparison).
    #[arg(long, value_enum, default_value = "bft")]
    pub loss: crate::cli::LossName,
    /// Held-out questions answered before and after training and scored with ROUGE-L.
    #[arg(long, default_value_t = 16)]
    pub rouge_samples: usize,
}

pub fn run(a: DemoArgs) -> Result<()> {
    use bft_trainer::run::RunOptions;
    use bft_trainer::train::Trainable;
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let t0 = Instant::now();
    crate::cli::check_range("lr", a.lr, 0.0, f64::INFINITY)?;
    crate::cli::check_at_least("eval-samples", a.eval_samples, 1)?;
    if a.output.join("metrics.jsonl").exists() {
        bail!(
            "{} already holds a demo run; choose another --output or remove it",
            a.output.display()
        );
    }
    let gguf = fetch_smollm2(a.cache.as_deref())?;
    let mut m =
        load_model(&gguf, DType::F32).with_context(|| format!("loading {}", gguf.display()))?;
    let template = m
        .template
        .clone()
        .context("the model has no chat template")?;
    let data = bft_trainer::genes::build();
    std::fs::create_dir_all(a.output.join("data"))
        .with_context(|| format!("creating {}", a.output.display()))?;
    bft_trainer::genes::write_jsonl(&data.train, &a.output.join("data/train.jsonl"))?;
    bft_trainer::genes::write_jsonl(&data.eval, &a.output.join("data/eval.jsonl"))?;
    let (batch_size, cutoff, lr) = (4usize, 192usize, a.lr);
    let variant =
        bft_trainer::loss::builtin(a.loss.name(), bft_trainer::loss::VariantParams::default())?;
    // Each training sample is seen once: a seeded draw of steps x batch samples.
    let total = a.max_steps.max(1);
    let mut train = data.train.clone();
    train.shuffle(&mut rand::rngs::StdRng::seed_from_u64(a.seed));
    train.truncate(total as usize * batch_size);
    let encoded = encode_all(&train, &m.tokenizer, &template, &m.eos_token, cutoff)?;
    let stride = (data.eval.len() / a.eval_samples.max(1)).max(1);
    let eval: Vec<_> = data
        .eval
        .iter()
        .step_by(stride)
        .take(a.eval_samples.max(1))
        .cloned()
        .collect();
    let eval_enc = encode_all(&eval, &m.tokenizer, &template, &m.eos_token, cutoff)?;
    // Held-out questions answered greedily: three are shown, all are scored with ROUGE-L.
    let asked: Vec<&bft_trainer::data::Conversation> = data
        .eval
        .iter()
        .step_by((data.eval.len() / a.rouge_samples.max(3)).max(1))
        .take(a.rouge_samples.max(3))
        .collect();
    let answer = |m: &bft_model::LoadedModel, what: &str| -> Result<Vec<String>> {
        let mut p = Progress::new(asked.len() as u64, what);
        let out = asked
            .iter()
            .map(|c| {
                let r = bft_trainer::eval::reply(m, &c.messages[..1], 48);
                p.inc("");
                r
            })
            .collect::<Result<Vec<_>, _>>()?;
        p.finish();
        Ok(out)
    };
    let rouge_l = |answers: &[String]| -> f64 {
        let sum: f64 = asked
            .iter()
            .zip(answers)
            .map(|(c, r)| rouge::score(&c.messages[1].content, r).rouge_l.fmeasure)
            .sum();
        sum / asked.len().max(1) as f64
    };
    let before = answer(&m, "answering before training")?;
    let lora = bft_model::LoraConfig {
        rank: 16,
        alpha: 32.0,
        dropout: 0.0,
        targets: bft_model::LoraConfig::parse_targets("all")?,
    };
    let resolved = serde_json::json!({
        "demo": &a, "model": gguf, "train_samples": encoded.len(), "eval_samples": eval_enc.len(),
        "lora": { "rank": 16, "alpha": 32.0, "targets": "all" }, "loss": a.loss.name(), "group": "g=256, arithmetic",
        "lr": lr, "batch_size": batch_size, "cutoff_len": cutoff,
    });
    let opts = RunOptions {
        lr,
        warmup_ratio: 0.05,
        batch_size,
        seed: a.seed,
        keep_last: 1,
        trainable: Trainable::Lora(lora),
        // The held-out cross-entropy before training is step 0 of the loss curve.
        eval_every: (total / 4).max(1),
        base_model: "SmolLM2-135M-Instruct".into(),
        files: vec![(
            "run_config.json".into(),
            serde_json::to_string_pretty(&resolved)?,
        )],
        ..RunOptions::new(&a.output, total)
    };
    let mut obs = TrainProgress::new(format!(
        "fine-tuning with LoRA r=16 + {} on {} gene instructions ({total} steps) ...",
        a.loss.name(),
        encoded.len()
    ));
    let t1 = Instant::now();
    let summary = bft_trainer::run::train(
        &mut m,
        &encoded,
        &eval_enc,
        variant.as_ref(),
        &opts,
        &mut obs,
    )?;
    obs.finish();
    let train_s = t1.elapsed().as_secs_f64();
    let (ce_before, ce_after) = (
        summary
            .eval_ce_start
            .context("the held-out set was measured")?,
        summary.eval_ce.context("the held-out set was measured")?,
    );
    let after = answer(&m, "answering after training")?;
    let tokens_per_s = summary.tokens_per_s;
    println!(
        "\n== demo: SmolLM2-135M-Instruct, LoRA r=16 + {}, {total} steps on {} gene instructions ==",
        a.loss.name(),
        encoded.len()
    );
    let shown = [0, asked.len() / 2, asked.len() - 1];
    for &i in &shown {
        let c = asked[i];
        println!("\nQ (held-out gene): {}", c.messages[0].content);
        println!("  reference: {}", c.messages[1].content);
        println!("  before:    {}", before[i]);
        println!("  after:     {}", after[i]);
    }
    println!(
        "\nheld-out cross-entropy ({} samples): {ce_before:.4} -> {ce_after:.4}",
        eval_enc.len()
    );
    let (rl_before, rl_after) = (rouge_l(&before), rouge_l(&after));
    println!(
        "held-out ROUGE-L F1 of greedy answers ({} questions): {rl_before:.4} -> {rl_after:.4}",
        asked.len()
    );
    let report = serde_json::json!({
        "steps": total, "train_samples": encoded.len(), "eval_samples": eval_enc.len(),
        "eval_ce_before": ce_before, "eval_ce_after": ce_after,
        "rouge_questions": asked.len(), "rougeL_f1_before": rl_before, "rougeL_f1_after": rl_after,
        "train_s": train_s, "step_s": summary.step_seconds, "run": &summary, "train_tokens_per_s": tokens_per_s,
        "answers": asked.iter().zip(before.iter().zip(&after)).map(|(c, (b, a))| serde_json::json!({
            "question": c.messages[0].content, "reference": c.messages[1].content, "before": b, "after": a,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        a.output.join("summary.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!(
        "training: {train_s:.0} s ({:.0} s in optimizer steps at {tokens_per_s:.0} tokens/s, the rest \
         held-out evaluation); whole demo {:.0} s; adapter, metrics, loss curve and data in {}",
        summary.step_seconds,
        t0.elapsed().as_secs_f64(),
        a.output.display()
    );
    Ok(())
}
