//! A sweep's report: `report.md` and a self-contained `report.html` beside `runs/`. The table
//! of variants x metrics (mean ± sample standard deviation over seeds), the gene-set ROUGE
//! detail, held-out and training cross-entropy of every run overlaid, the distributions of the
//! sample weights `s_b` and mean token weights over training, and run time per variant.

use crate::plot::{Series, Style, loss_curve_svg};
use crate::sweep::{RunResult, SweepConfig};
use plotters::style::RGBColor;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("drawing {what}: {msg}")]
    Plot { what: String, msg: String },
}

type Result<T> = std::result::Result<T, ReportError>;

/// Mean and sample standard deviation (0 for one value) of the finite values; None if none.
pub fn mean_sd(xs: &[f64]) -> Option<(f64, f64, usize)> {
    let v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n == 0 {
        return None;
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Some((mean, var.sqrt(), n))
}

/// A metric of the main table: its header, and how to read it from one run.
struct Metric {
    header: &'static str,
    get: fn(&RunResult) -> Option<f64>,
    /// Decimal places shown.
    places: usize,
}

fn rouge_l(r: &RunResult, c: &str) -> Option<f64> {
    r.scores.gene_sets.get(c).map(|g| g.rouge_l)
}

fn metrics() -> Vec<Metric> {
    vec![
        Metric {
            header: "held-out CE",
            get: |r| r.scores.heldout_ce,
            places: 4,
        },
        Metric {
            header: "bio-process ROUGE-L",
            get: |r| {
                let v: Vec<f64> = r.scores.gene_sets.values().map(|g| g.rouge_l).collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            },
            places: 4,
        },
        Metric {
            header: "GO ROUGE-L",
            get: |r| rouge_l(r, "go"),
            places: 4,
        },
        Metric {
            header: "NeST ROUGE-L",
            get: |r| rouge_l(r, "nest"),
            places: 4,
        },
        Metric {
            header: "MSigDB ROUGE-L",
            get: |r| rouge_l(r, "msigdb"),
            places: 4,
        },
        Metric {
            header: "PubMedQA acc",
            get: |r| r.scores.pubmedqa.as_ref().map(|p| p.accuracy),
            places: 3,
        },
        Metric {
            header: "PubMedQA macro-F1",
            get: |r| r.scores.pubmedqa.as_ref().map(|p| p.macro_f1),
            places: 3,
        },
        Metric {
            header: "train s",
            get: |r| r.train.as_ref().map(|t| t.step_seconds),
            places: 0,
        },
        Metric {
            header: "tokens/s",
            get: |r| r.train.as_ref().map(|t| t.tokens_per_s),
            places: 0,
        },
        Metric {
            header: "eval s",
            get: |r| Some(r.scores.eval_seconds),
            places: 0,
        },
    ]
}

/// Runs grouped by variant label (and learning rate when the sweep has several), in run order.
fn groups(results: &[RunResult]) -> Vec<(String, Vec<&RunResult>)> {
    let several_lrs = {
        let mut lrs: Vec<String> = results
            .iter()
            .filter(|r| r.train.is_some())
            .map(|r| format!("{:e}", r.lr))
            .collect();
        lrs.sort();
        lrs.dedup();
        lrs.len() > 1
    };
    let mut out: Vec<(String, Vec<&RunResult>)> = Vec::new();
    for r in results {
        let key = if several_lrs && r.train.is_some() {
            format!("{} (lr {:e})", r.label, r.lr)
        } else {
            r.label.clone()
        };
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => out.push((key, vec![r])),
        }
    }
    out
}

fn cell(runs: &[&RunResult], m: &Metric) -> String {
    let xs: Vec<f64> = runs.iter().filter_map(|r| (m.get)(r)).collect();
    match mean_sd(&xs) {
        None => "–".into(),
        Some((mean, _, 1)) => format!("{mean:.*}", m.places),
        Some((mean, sd, _)) => format!("{mean:.p$} ± {sd:.p$}", p = m.places),
    }
}

/// The main table as (header, rows of cells); the first column is the variant, the second the
/// number of seeds.
pub fn table(results: &[RunResult]) -> (Vec<String>, Vec<Vec<String>>) {
    let ms = metrics();
    let mut header = vec!["variant".to_string(), "seeds".to_string()];
    header.extend(ms.iter().map(|m| m.header.to_string()));
    let rows = groups(results)
        .into_iter()
        .map(|(name, runs)| {
            let mut row = vec![name, runs.len().to_string()];
            row.extend(ms.iter().map(|m| cell(&runs, m)));
            row
        })
        .collect();
    (header, rows)
}

/// The gene-set detail: ROUGE-1/2/L per collection, mean over seeds.
fn rouge_table(results: &[RunResult]) -> (Vec<String>, Vec<Vec<String>>) {
    let collections: Vec<String> = results
        .iter()
        .flat_map(|r| r.scores.gene_sets.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut header = vec!["variant".to_string()];
    for c in &collections {
        for k in ["R-1", "R-2", "R-L"] {
            header.push(format!("{c} {k}"));
        }
    }
    let rows = groups(results)
        .into_iter()
        .map(|(name, runs)| {
            let mut row = vec![name];
            for c in &collections {
                let picks: [fn(&crate::sweep::GeneSetScore) -> f64; 3] =
                    [|g| g.rouge1, |g| g.rouge2, |g| g.rouge_l];
                for pick in picks {
                    let xs: Vec<f64> = runs
                        .iter()
                        .filter_map(|r| r.scores.gene_sets.get(c).map(pick))
                        .collect();
                    row.push(mean_sd(&xs).map_or("–".into(), |(m, _, _)| format!("{m:.4}")));
                }
            }
            row
        })
        .collect();
    (header, rows)
}

const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn lighter(c: RGBColor) -> RGBColor {
    let f = |x: u8| ((x as u16 + 2 * 255) / 3) as u8;
    RGBColor(f(c.0), f(c.1), f(c.2))
}

/// (step, field) of a run's JSONL file.
fn col(dir: &Path, file: &str, field: &str) -> Vec<(f64, f64)> {
    crate::plot::column(&dir.join(file), field)
}

/// A moving average over `k` points (the first ones over what there is).
fn smooth(p: &[(f64, f64)], k: usize) -> Vec<(f64, f64)> {
    (0..p.len())
        .map(|i| {
            let w = &p[i.saturating_sub(k - 1)..=i];
            (p[i].0, w.iter().map(|q| q.1).sum::<f64>() / w.len() as f64)
        })
        .collect()
}

/// Held-out and (smoothed) training cross-entropy of every trained run, a colour per variant.
fn curves_svg(runs_dir: &Path, results: &[RunResult]) -> std::result::Result<String, String> {
    let (mut held, mut train) = (Vec::new(), Vec::new());
    for (i, (name, runs)) in groups(results)
        .into_iter()
        .filter(|(_, r)| r[0].train.is_some())
        .enumerate()
    {
        let color = PALETTE[i % PALETTE.len()];
        for (j, r) in runs.iter().enumerate() {
            let dir = runs_dir.join(&r.name);
            let label = if j == 0 { name.clone() } else { String::new() };
            held.push(Series {
                name: label.clone(),
                color,
                points: col(&dir, "eval.jsonl", "eval_ce"),
                style: Style::Line,
            });
            train.push(Series {
                name: label,
                color,
                points: smooth(&col(&dir, "metrics.jsonl", "ce"), 5),
                style: Style::Thin,
            });
        }
    }
    loss_curve_svg(
        "cross-entropy of every run (one colour per variant, one line per seed)",
        &[
            ("held-out CE (nats)", held),
            ("training CE, mean of 5 steps", train),
        ],
    )
}

/// A stretch of training: (mid-step, 10th, 50th and 90th percentile).
type Quantiles = (f64, f64, f64, f64);

/// Percentiles (10th, 50th, 90th) of `field`'s per-sample values in ten equal stretches of
/// training, over every seed of a variant.
fn distribution(dirs: &[PathBuf], field: &str) -> Vec<Quantiles> {
    let mut by_step: Vec<(u64, f64)> = Vec::new();
    for d in dirs {
        let text = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap_or_default();
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let step = v["step"].as_u64().unwrap_or(0);
            for x in v[field].as_array().into_iter().flatten() {
                if let Some(x) = x.as_f64().filter(|x| x.is_finite()) {
                    by_step.push((step, x));
                }
            }
        }
    }
    let Some(last) = by_step.iter().map(|p| p.0).max() else {
        return Vec::new();
    };
    let bins = 10.min(last as usize).max(1);
    let mut out = Vec::new();
    for b in 0..bins {
        let (lo, hi) = (
            1 + b as u64 * last / bins as u64,
            (b as u64 + 1) * last / bins as u64,
        );
        let mut v: Vec<f64> = by_step
            .iter()
            .filter(|p| p.0 >= lo && p.0 <= hi)
            .map(|p| p.1)
            .collect();
        if v.is_empty() {
            continue;
        }
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
        out.push(((lo + hi) as f64 / 2.0, q(0.1), q(0.5), q(0.9)));
    }
    out
}

/// The distributions of `s_b` and of the mean token weight over training, per variant: the
/// median as a line, the 10th and 90th percentiles as thin lines.
fn weights_svg(runs_dir: &Path, results: &[RunResult]) -> std::result::Result<String, String> {
    let mut panels: Vec<(&str, Vec<Series>)> = vec![
        ("sample weight s_b", Vec::new()),
        ("mean token weight", Vec::new()),
    ];
    for (i, (name, runs)) in groups(results)
        .into_iter()
        .filter(|(_, r)| r[0].train.is_some())
        .enumerate()
    {
        let color = PALETTE[i % PALETTE.len()];
        let dirs: Vec<PathBuf> = runs.iter().map(|r| runs_dir.join(&r.name)).collect();
        for (panel, field) in panels.iter_mut().zip(["sample_weights", "token_weights"]) {
            let d = distribution(&dirs, field);
            panel.1.push(Series {
                name: name.clone(),
                color,
                points: d.iter().map(|p| (p.0, p.2)).collect(),
                style: Style::Line,
            });
            for upper in [false, true] {
                panel.1.push(Series {
                    name: String::new(),
                    color: lighter(color),
                    points: d
                        .iter()
                        .map(|p| (p.0, if upper { p.3 } else { p.1 }))
                        .collect(),
                    style: Style::Thin,
                });
            }
        }
    }
    loss_curve_svg(
        "weights over training: median (thick), 10th and 90th percentiles (thin), all seeds",
        &panels,
    )
}

fn md_table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut s = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for r in rows {
        // cannot fail: writing to a String.
        writeln!(s, "| {} |", r.join(" | ")).expect("String");
    }
    s
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn html_table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table><tr>");
    for h in header {
        s.push_str(&format!("<th>{}</th>", html_escape(h)));
    }
    s.push_str("</tr>\n");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            s.push_str(&format!("<td>{}</td>", html_escape(c)));
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n");
    s
}

/// Writes `report.md`, `report.html`, `curves.svg` and `weights.svg` into `out` from the runs'
/// results (and their metrics under `out/runs`).
pub fn write(out: &Path, cfg: &SweepConfig, results: &[RunResult]) -> Result<()> {
    let runs_dir = out.join("runs");
    let plot_err = |what: &str| {
        let what = what.to_string();
        move |msg| ReportError::Plot { what, msg }
    };
    let curves = curves_svg(&runs_dir, results).map_err(plot_err("curves.svg"))?;
    let weights = weights_svg(&runs_dir, results).map_err(plot_err("weights.svg"))?;
    let (header, rows) = table(results);
    let (rheader, rrows) = rouge_table(results);
    let limits: Vec<String> = cfg
        .eval
        .suites
        .iter()
        .map(|s| match cfg.eval.limits.get(s) {
            Some(n) => format!("{} (first {n})", s.name()),
            None => s.name().to_string(),
        })
        .collect();
    let intro = format!(
        "Model `{}`, data `{}`, {} steps of {} x {} samples per run, LoRA r={} alpha={}, \
         learning rates {:?}, seeds {:?}. Evaluated: held-out cross-entropy, {}. Cells are the \
         mean ± sample standard deviation over seeds. *bio-process ROUGE-L* is the mean ROUGE-L \
         F1 over the gene-set collections (the paper's biological-process panel). *train s* is \
         the time in optimizer steps, *eval s* the evaluation's.",
        cfg.model.display(),
        match &cfg.data {
            crate::sweep::DataSource::File(p) => p.display().to_string(),
            d => format!("{d:?}"),
        },
        cfg.steps,
        cfg.batch_size,
        cfg.grad_accum,
        cfg.lora_rank,
        cfg.lora_alpha,
        cfg.lrs,
        cfg.seeds,
        limits.join(", ")
    );
    let per_run: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let mut row = vec![r.name.clone()];
            row.extend(
                metrics()
                    .iter()
                    .map(|m| (m.get)(r).map_or("–".into(), |x| format!("{x:.*}", m.places))),
            );
            row
        })
        .collect();
    let mut per_run_header = vec!["run".to_string()];
    per_run_header.extend(metrics().iter().map(|m| m.header.to_string()));
    let md = format!(
        "# Sweep report\n\n{intro}\n\n## Variants\n\n{}\n## Gene-set ROUGE F1 (mean over seeds)\n\n{}\n\
         ## Curves\n\n![cross-entropy](curves.svg)\n\n## Sample and token weights\n\n![weights](weights.svg)\n\n\
         ## Every run\n\n{}",
        md_table(&header, &rows),
        md_table(&rheader, &rrows),
        md_table(&per_run_header, &per_run),
    );
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>bft sweep report</title><style>\
         body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}\
         </style></head><body>\n<h1>Sweep report</h1>\n<p>{}</p>\n<h2>Variants</h2>\n{}<h2>Gene-set ROUGE F1 (mean over seeds)</h2>\n{}\
         <h2>Curves</h2>\n{curves}\n<h2>Sample and token weights</h2>\n{weights}\n<h2>Every run</h2>\n{}</body></html>\n",
        html_escape(&intro),
        html_table(&header, &rows),
        html_table(&rheader, &rrows),
        html_table(&per_run_header, &per_run),
    );
    for (name, text) in [
        ("report.md", md.as_str()),
        ("report.html", html.as_str()),
        ("curves.svg", curves.as_str()),
        ("weights.svg", weights.as_str()),
    ] {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|error| ReportError::Io { path: p, error })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_sd() {
        let (m, sd, n) = mean_sd(&[1.0, 2.0, 3.0, f64::NAN]).unwrap();
        assert_eq!((m, n), (2.0, 3));
        assert!((sd - 1.0).abs() < 1e-15);
        assert_eq!(mean_sd(&[5.0]), Some((5.0, 0.0, 1)));
        assert_eq!(mean_sd(&[f64::NAN]), None);
    }
}
