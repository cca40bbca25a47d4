//! `bft eval`: the GeneAgent gene-set benchmark (GO, MSigDB, NeST; ROUGE of the proposed
//! process name) and PubMedQA (accuracy, macro-F1). Prints a table, writes JSON.

use super::progress::Progress;
use anyhow::{Context, Result, bail};
use bft_trainer::eval::{chat, geneagent, pubmedqa};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub source: crate::cli::ModelArgs,
    /// Benchmarks, comma-separated: go, msigdb, nest (GeneAgent gene sets), pubmedqa, or all.
    #[arg(long, default_value = "nest,pubmedqa")]
    pub benchmark: String,
    /// Evaluate only the first N items of each benchmark (GO has 1,000, PubMedQA 500).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Longest reply to a gene set, in tokens (the process name is on its first line).
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    /// JSON report: scores and every item's answer.
    #[arg(long, default_value = "bft-eval.json")]
    pub out: PathBuf,
}

/// Summary rows of the printed table: (benchmark, n, metric columns).
pub type Row = (String, usize, Vec<(&'static str, f64)>);

pub fn run(a: EvalArgs) -> Result<()> {
    crate::cli::check_at_least("max-new-tokens", a.max_new_tokens, 1)?;
    crate::cli::check_out_dir("out", &a.out)?;
    if a.limit == Some(0) {
        bail!("--limit 0 evaluates nothing: give at least 1 (or leave it out for every item)");
    }
    let m = a.source.load(bft_engine::DType::F32)?;
    let names: Vec<String> = if a.benchmark == "all" {
        ["go", "msigdb", "nest", "pubmedqa"]
            .map(String::from)
            .to_vec()
    } else {
        a.benchmark
            .split(',')
            .map(|s| s.trim().to_lowercase())
            .collect()
    };
    for n in &names {
        if n != "pubmedqa" {
            n.parse::<geneagent::Collection>().map_err(|_| {
                anyhow::anyhow!("unknown benchmark `{n}` (go, msigdb, nest, pubmedqa, all)")
            })?;
        }
    }
    if names.is_empty() {
        bail!("no benchmark given");
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut report = serde_json::Map::new();
    for name in &names {
        let (row, json) = if name == "pubmedqa" {
            pubmedqa_run(&m, a.limit)?
        } else {
            gene_sets_run(&m, name.parse()?, a.limit, a.max_new_tokens)?
        };
        rows.push(row);
        report.insert(name.clone(), json);
    }
    print_table(&rows);
    let doc = serde_json::json!({
        "model": a.source.model, "adapter": a.source.adapter, "limit": a.limit,
        "max_new_tokens": a.max_new_tokens, "benchmarks": report,
    });
    crate::cli::write_atomically(&a.out, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// Answers every gene set of a collection and scores the process names.
pub fn gene_sets_run(
    m: &bft_model::LoadedModel,
    c: geneagent::Collection,
    limit: Option<usize>,
    max_new_tokens: usize,
) -> Result<(Row, serde_json::Value)> {
    let mut sets = geneagent::gene_sets(c)?;
    sets.truncate(limit.unwrap_or(sets.len()));
    let mut p = Progress::new(sets.len() as u64, c.name());
    let mut answers = Vec::new();
    for set in &sets {
        let messages = chat(Some(geneagent::SYSTEM), geneagent::prompt(&set.genes));
        let reply = bft_trainer::eval::reply(m, &messages, max_new_tokens)
            .with_context(|| format!("{} gene set {}", c.name(), set.id))?;
        let a = geneagent::score(set, reply);
        p.inc(&format!("ROUGE-L {:.3}", a.rouge.rouge_l.fmeasure));
        answers.push(a);
    }
    p.finish();
    let [r1, r2, rl] = geneagent::mean_f1(&answers);
    let row = (
        c.name().to_string(),
        answers.len(),
        vec![("ROUGE-1", r1), ("ROUGE-2", r2), ("ROUGE-L", rl)],
    );
    let json = serde_json::json!({
        "n": answers.len(), "rouge1_f1": r1, "rouge2_f1": r2, "rougeL_f1": rl, "items": answers,
    });
    Ok((row, json))
}

fn pubmedqa_run(
    m: &bft_model::LoadedModel,
    limit: Option<usize>,
) -> Result<(Row, serde_json::Value)> {
    let mut items = pubmedqa::test_items()?;
    items.truncate(limit.unwrap_or(items.len()));
    let mut p = Progress::new(items.len() as u64, "pubmedqa");
    let (mut pred, mut truth, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for item in &items {
        let (label, scores) =
            pubmedqa::answer(m, item).with_context(|| format!("PubMedQA PMID {}", item.pmid))?;
        pred.push(label);
        truth.push(item.label);
        let correct = pred.iter().zip(&truth).filter(|(a, b)| a == b).count();
        p.inc(&format!(
            "accuracy {:.3}",
            correct as f64 / pred.len() as f64
        ));
        rows.push(serde_json::json!({
            "pmid": item.pmid, "label": item.label, "answer": label, "logits": scores,
        }));
    }
    p.finish();
    let mt = pubmedqa::metrics(&pred, &truth);
    let row = (
        "pubmedqa".to_string(),
        mt.n,
        vec![("accuracy", mt.accuracy), ("macro-F1", mt.macro_f1)],
    );
    let json = serde_json::json!({
        "n": mt.n, "accuracy": mt.accuracy, "macro_f1": mt.macro_f1, "f1": mt.f1, "items": rows,
    });
    Ok((row, json))
}

pub fn print_table(rows: &[Row]) {
    println!("{:<10} {:>5}  metrics", "benchmark", "n");
    for (name, n, cols) in rows {
        let cols: Vec<String> = cols.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        println!("{name:<10} {n:>5}  {}", cols.join("  "));
    }
}
