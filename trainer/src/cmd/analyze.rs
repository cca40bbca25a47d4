//! `bft analyze`: the paper's Figure 1 over a dataset. Scores every sample, finds isolated
//! confidence drops (Group A) and sustained low spans (Group B), prints a summary table and
//! writes `analysis.json` and a self-contained `analysis.html` that draws each token's
//! confidence with both groups marked.

use anyhow::{Context, Result};
use bft_trainer::analysis::{AnalysisConfig, Groups, find_groups};
use bft_trainer::data::Encoded;
use bft_trainer::loss::{GroupConfig, SampleStats, VariantParams, builtin};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct AnalyzeArgs {
    #[command(flatten)]
    pub source: crate::cli::ModelArgs,
    /// JSONL data (messages, conversations or instruction/output rows).
    #[arg(long)]
    pub data: PathBuf,
    /// Output directory for analysis.json and analysis.html.
    #[arg(long)]
    pub out: PathBuf,
    /// Group A: a token with p below this...
    #[arg(long, default_value_t = 0.1)]
    pub drop_p: f64,
    /// ...in a context of this many tokens...
    #[arg(long, default_value_t = 10)]
    pub context: usize,
    /// ...whose other tokens average p at least this (none below --drop-p).
    #[arg(long, default_value_t = 0.5)]
    pub confident_p: f64,
    /// Group B: windows of this many tokens...
    #[arg(long, default_value_t = 10)]
    pub span_window: usize,
    /// ...with mean p below this.
    #[arg(long, default_value_t = 0.15)]
    pub span_mean: f64,
    /// BFT's group-confidence window g for the sample weights shown beside the groups.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    #[arg(long, default_value_t = 1024)]
    pub cutoff_len: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Samples drawn in the HTML page (those with a group first).
    #[arg(long, default_value_t = 40)]
    pub html_samples: usize,
}

/// Counts over one group (or the remaining tokens).
#[derive(Default, serde::Serialize)]
struct Tally {
    tokens: usize,
    samples: usize,
    sum_p: f64,
    sum_nll: f64,
}

pub fn run(a: AnalyzeArgs) -> Result<()> {
    use crate::cli::{check_at_least, check_range};
    for (name, p) in [
        ("drop-p", a.drop_p),
        ("confident-p", a.confident_p),
        ("span-mean", a.span_mean),
    ] {
        check_range(name, p, 0.0, 1.0)?;
    }
    check_at_least("context", a.context, 2)?;
    check_at_least("span-window", a.span_window, 1)?;
    check_at_least("window", a.window, 1)?;
    check_at_least("batch-size", a.batch_size, 1)?;
    check_at_least("cutoff-len", a.cutoff_len, 2)?;
    let m = a.source.load(bft_engine::DType::F32)?;
    let template = m
        .template
        .clone()
        .with_context(|| format!("{} has no chat template", a.source.model.display()))?;
    let (_, encoded) = crate::cli::read_encoded(&m, &template, &a.data, false, a.cutoff_len)?;
    let group = GroupConfig {
        window: a.window,
        ..Default::default()
    };
    let bft = builtin(
        "bft",
        VariantParams {
            group,
            ..Default::default()
        },
    )?;
    let pad = m.stop_ids.first().copied().unwrap_or(0);
    eprintln!("scoring {} samples ...", encoded.len());
    let ev =
        bft_trainer::train::evaluate(&m.model, &encoded, bft.as_ref(), group, a.batch_size, pad)?;
    let cfg = AnalysisConfig {
        drop_p: a.drop_p,
        context: a.context,
        confident_p: a.confident_p,
        window: a.span_window,
        span_mean: a.span_mean,
    };
    let groups: Vec<Groups> = ev
        .samples
        .iter()
        .map(|s| find_groups(&probs(s), &cfg))
        .collect();

    let (mut ga, mut gb, mut rest) = (Tally::default(), Tally::default(), Tally::default());
    let (mut sb_with, mut sb_without) = (Vec::new(), Vec::new());
    for (s, g) in ev.samples.iter().zip(&groups) {
        for (i, &lp) in s.logprobs.iter().enumerate() {
            let t = if g.isolated.contains(&i) {
                &mut ga
            } else if g.in_span(i) {
                &mut gb
            } else {
                &mut rest
            };
            t.tokens += 1;
            t.sum_p += lp.exp();
            t.sum_nll -= lp;
        }
        ga.samples += usize::from(!g.isolated.is_empty());
        gb.samples += usize::from(!g.spans.is_empty());
        rest.samples += usize::from(s.n_valid > 0);
        if g.spans.is_empty() {
            sb_without.push(s.s_b);
        } else {
            sb_with.push(s.s_b);
        }
    }
    let total_tokens = ga.tokens + gb.tokens + rest.tokens;
    let total_nll = ga.sum_nll + gb.sum_nll + rest.sum_nll;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let rows = [
        ("Group A: isolated drops", &ga),
        ("Group B: sustained low spans", &gb),
        ("other target tokens", &rest),
    ];
    let mut table = format!(
        "{} samples, {total_tokens} target tokens\n{:<30} {:>8} {:>9} {:>9} {:>8} {:>10}\n",
        encoded.len(),
        "",
        "tokens",
        "per 1k",
        "samples",
        "mean p",
        "CE share"
    );
    for (name, t) in rows {
        writeln!(
            table,
            "{name:<30} {:>8} {:>9.2} {:>9} {:>8.3} {:>9.1}%",
            t.tokens,
            1000.0 * t.tokens as f64 / total_tokens.max(1) as f64,
            t.samples,
            t.sum_p / t.tokens.max(1) as f64,
            100.0 * t.sum_nll / total_nll.max(1e-12)
        )?;
    }
    writeln!(
        table,
        "BFT sample weight s_b (g={}): {:.3} mean over {} samples with a Group B span, {:.3} over {} without",
        a.window,
        mean(&sb_with),
        sb_with.len(),
        mean(&sb_without),
        sb_without.len()
    )?;
    print!("{table}");

    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let json = serde_json::json!({
        "model": a.source.model, "adapter": a.source.adapter, "data": a.data, "config": cfg, "bft_window": a.window,
        "summary": {
            "samples": encoded.len(), "target_tokens": total_tokens,
            "group_a": ga, "group_b": gb, "other": rest,
            "s_b_mean_with_span": mean(&sb_with), "s_b_mean_without_span": mean(&sb_without),
        },
        "samples": ev.samples.iter().zip(&groups).enumerate().map(|(i, (s, g))| serde_json::json!({
            "index": i, "n_valid": s.n_valid, "s_b": s.s_b, "p_conf": s.p_conf, "ce": s.ce,
            "isolated": g.isolated, "spans": g.spans,
        })).collect::<Vec<_>>(),
    });
    let json_path = a.out.join("analysis.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let html = page(&a, &m.tokenizer, &encoded, &ev.samples, &groups, &table)?;
    let html_path = a.out.join("analysis.html");
    std::fs::write(&html_path, html).with_context(|| format!("writing {}", html_path.display()))?;
    eprintln!("wrote {} and {}", json_path.display(), html_path.display());
    Ok(())
}

fn probs(s: &SampleStats) -> Vec<f64> {
    s.logprobs.iter().map(|l| l.exp()).collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The HTML page: the summary, a legend, and the chosen samples token by token.
fn page(
    a: &AnalyzeArgs,
    tok: &tokenizers::Tokenizer,
    encoded: &[Encoded],
    stats: &[SampleStats],
    groups: &[Groups],
    table: &str,
) -> Result<String> {
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| (groups[i].isolated.is_empty(), groups[i].spans.is_empty()));
    order.truncate(a.html_samples);
    let mut body = String::new();
    for &i in &order {
        let (e, s, g) = (&encoded[i], &stats[i], &groups[i]);
        writeln!(
            body,
            "<section><h3>sample {i}</h3><p class=meta>{} targets, CE {:.3}, BFT s_b {:.3}, \
             {} isolated drops, {} low spans</p><div class=tokens>",
            s.n_valid,
            s.ce,
            s.s_b,
            g.isolated.len(),
            g.spans.len()
        )?;
        // Targets are the masked tokens after the first position, in order: their k-th
        // log-prob is `s.logprobs[k]`.
        let mut k = 0;
        for (pos, &id) in e.ids.iter().enumerate() {
            let text = escape(&tok.decode(&[id], false).unwrap_or_default());
            if pos == 0 || !e.target_mask[pos] || k >= s.logprobs.len() {
                write!(body, "<span class=ctx>{text}</span>")?;
                continue;
            }
            let p = s.logprobs[k].exp();
            let mut class = String::new();
            if g.isolated.contains(&k) {
                class.push_str(" a");
            }
            if g.in_span(k) {
                class.push_str(" b");
            }
            write!(
                body,
                "<span class=\"t{class}\" style=\"background:rgba(220,50,47,{:.3})\" title=\"p = {p:.4}\">{text}</span>",
                (1.0 - p).clamp(0.0, 1.0) * 0.85
            )?;
            k += 1;
        }
        body.push_str("</div></section>\n");
    }
    Ok(format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>bft analyze: {data}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }}
pre {{ background: #f6f6f6; padding: 1rem; overflow-x: auto; }}
.tokens {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; }}
.ctx {{ color: #999; }}
.t {{ border-radius: 2px; }}
.a {{ outline: 2px solid #268bd2; }}
.b {{ border-bottom: 3px solid #b58900; }}
.meta {{ color: #555; margin: 0.2rem 0; }}
.legend span {{ padding: 0 0.4rem; margin-right: 1rem; }}
</style></head><body>
<h1>Token confidence: isolated drops vs sustained low spans</h1>
<p>Model <code>{model}</code>, data <code>{data}</code>. Each response token is shaded by
1 − p (its probability under the model); prompt tokens are grey. Group A: a token with
p &lt; {drop_p} in a {context}-token context whose other tokens average p ≥ {confident_p}, none below {drop_p}. Group B: a run covered by
{span_window}-token windows with mean p &lt; {span_mean}. Hover a token for its p.</p>
<p class=legend><span class="t a">Group A (isolated drop)</span><span class="t b">Group B (sustained low span)</span>
<span class=t style="background:rgba(220,50,47,0.85)">p ≈ 0</span><span class=t style="background:rgba(220,50,47,0.05)">p ≈ 1</span></p>
<pre>{table}</pre>
{body}</body></html>
"#,
        model = escape(&a.source.model.display().to_string()),
        data = escape(&a.data.display().to_string()),
        drop_p = a.drop_p,
        context = a.context,
        confident_p = a.confident_p,
        span_window = a.span_window,
        span_mean = a.span_mean,
        table = escape(table),
    ))
}
