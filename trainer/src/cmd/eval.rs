//! `bft eval`: the GeneAgent gene-set benchmark (GO, MSigDB, NeST; ROUGE of the proposed
//! process name) and PubMedQA (accuracy, macro-F1). Prints a table, writes JSON.

use super::progress::Progress;
use anyhow::{Context, Result, bail};
use bft_trainer::eval::{geneagent, ggi, pubmedqa};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub source: crate::cli::ModelArgs,
    /// Benchmarks, comma-separated: go, msigdb, nest (GeneAgent gene sets), pubmedqa, all (these
    /// four), or ggi (gene-gene interactions from --embeddings; needs no model).
    #[arg(long, default_value = "nest,pubmedqa")]
    pub benchmark: String,
    /// Gene embeddings for the ggi benchmark (the file `bft embed` writes).
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    /// A directory with the GGI pairs in the Gene2vec layout (train_text.txt, train_label.txt,
    /// test_text.txt, test_label.txt) instead of the built-in copy.
    #[arg(long)]
    pub ggi_dir: Option<PathBuf>,
    /// Evaluate only the first N items of each benchmark (GO has 1,000, PubMedQA 500).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Longest reply to a gene set, in tokens (the process name is on its first line).
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    /// JSON report: scores and every item's answer.
    #[arg(long, default_value = "bft-eval.json")]
    pub out: PathBuf,
    /// Compute device for generation: cpu, wgpu (the first adapter), wgpu:N, cuda or cuda:N
    /// (`bft info` lists them).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Summary rows of the printed table: (benchmark, n, metric columns).
pub type Row = (String, usize, Vec<(&'static str, f64)>);

pub fn run(a: EvalArgs) -> Result<()> {
    crate::cli::check_at_least("max-new-tokens", a.max_new_tokens, 1)?;
    crate::cli::check_out_dir("out", &a.out)?;
    let device = crate::cli::parse_device(&a.device)?;
    if a.limit == Some(0) {
        bail!("--limit 0 evaluates nothing: give at least 1 (or leave it out for every item)");
    }
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
        if n != "pubmedqa" && n != "ggi" {
            n.parse::<geneagent::Collection>().map_err(|_| {
                anyhow::anyhow!("unknown benchmark `{n}` (go, msigdb, nest, pubmedqa, all, ggi)")
            })?;
        }
    }
    if names.is_empty() {
        bail!("no benchmark given");
    }
    // The ggi benchmark's inputs (embeddings, training and test pairs), read up front.
    let ggi_inputs = match (names.iter().any(|n| n == "ggi"), &a.embeddings) {
        (true, Some(p)) => {
            let emb = ggi::GeneEmbeddings::read(p).context("reading --embeddings")?;
            let pairs = match &a.ggi_dir {
                Some(dir) => (
                    ggi::load_dir(dir, ggi::Split::Train)?,
                    ggi::load_dir(dir, ggi::Split::Test)?,
                ),
                None => (
                    ggi::builtin(ggi::Split::Train),
                    ggi::builtin(ggi::Split::Test),
                ),
            };
            Some((emb, pairs))
        }
        (true, None) => bail!("--benchmark ggi needs --embeddings FILE (written by bft embed)"),
        (false, Some(_)) => bail!("--embeddings is for --benchmark ggi"),
        (false, None) => None,
    };
    // Only the generative benchmarks need the language model.
    let m = if names.iter().any(|n| n != "ggi") {
        let mut source = a.source.clone();
        source.model = crate::cli::model_path(&source.model)?;
        let mut m = source.load(bft_engine::DType::F32)?;
        m.model = m
            .model
            .to_device(&device)
            .with_context(|| format!("moving the model to {device}"))?;
        Some(m)
    } else {
        None
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut report = serde_json::Map::new();
    for name in &names {
        if name == "ggi" {
            let (emb, (train, test)) = ggi_inputs.as_ref().context("the ggi inputs")?;
            let (ggi_rows, json) = ggi_run(emb, train, test)?;
            rows.extend(ggi_rows);
            report.insert(name.clone(), json);
            continue;
        }
        let m = m.as_ref().context("the model")?;
        let (row, json) = if name == "pubmedqa" {
            pubmedqa_run(m, a.limit)?
        } else {
            gene_sets_run(m, name.parse()?, a.limit, a.max_new_tokens)?
        };
        rows.push(row);
        report.insert(name.clone(), json);
    }
    print_table(&rows);
    let doc = serde_json::json!({
        "embeddings": a.embeddings,
        "model": a.source.model, "adapter": a.source.adapter, "limit": a.limit,
        "max_new_tokens": a.max_new_tokens, "benchmarks": report,
    });
    crate::cli::write_atomically(&a.out, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// The GGI benchmark: the embeddings, then the two sanity rows (random unit vectors for the
/// same genes; the real embeddings with shuffled training labels), each fitted and scored.
fn ggi_run(
    emb: &ggi::GeneEmbeddings,
    train: &ggi::Pairs,
    test: &ggi::Pairs,
) -> Result<(Vec<Row>, serde_json::Value)> {
    let t0 = std::time::Instant::now();
    let real = ggi::evaluate(emb, train, test, None)?;
    eprintln!(
        "ggi: {} genes x {}; {} of {} training and {} of {} test pairs covered ({} positive); \
         fitted and scored in {:.1} s",
        emb.genes.len(),
        emb.dim,
        real.train_covered,
        real.train_pairs,
        real.test_covered,
        real.test_pairs,
        real.test_positive,
        t0.elapsed().as_secs_f64()
    );
    let random = ggi::evaluate(&ggi::random_like(emb, 1)?, train, test, None)?;
    let shuffled = ggi::evaluate(emb, train, test, Some(1))?;
    let row = |name: &str, s: &ggi::GgiScore| -> Row {
        (
            name.to_string(),
            s.test_covered,
            vec![("ROC-AUC", s.auc), ("s.e.", s.auc_se)],
        )
    };
    let rows = vec![
        row("ggi", &real),
        row("ggi-random", &random),
        row("ggi-shuffled", &shuffled),
    ];
    let json = serde_json::json!({
        "auc": real.auc, "coverage": real, "alpha": ggi::ALPHA,
        "sanity": {"random_embeddings": random, "shuffled_labels": shuffled},
    });
    Ok((rows, json))
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
    let mut shown = 0;
    let answers = geneagent::answer_sets(m, &sets, max_new_tokens, |so_far| {
        let [_, _, rl] = geneagent::mean_f1(so_far);
        for _ in shown..so_far.len() {
            p.inc(&format!("ROUGE-L {rl:.3}"));
        }
        shown = so_far.len();
    })
    .with_context(|| format!("the {} gene sets", c.name()))?;
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
