//! `bft sweep`: the paper's comparison as one command. A TOML file names a base model, data,
//! evaluation suites and a grid (variants x learning rates x seeds); every run trains through
//! [`crate::run::train`] in its own directory, is evaluated with the project's suites, and the
//! sweep ends with `report.md` and `report.html` ([`crate::report`]).
//!
//! A killed sweep started again skips finished runs, evaluates a trained but unevaluated one,
//! and resumes an interrupted one from its last checkpoint. Every setting is checked, every
//! variant built and the data encoded before the first step; a bad file fails naming the line
//! and the key.
//!
//! Variants are built-in names with their parameters, or a researcher's own registered on a
//! [`Registry`] by a binary built on the library.

use crate::config_file::line_of;
use crate::data::{Conversation, Encoded};
use crate::eval::{geneagent, pubmedqa};
use crate::loss::{GroupConfig, GroupMean, LossVariant, VariantParams};
use crate::run::{Observer, RunOptions, RunSummary};
use crate::train::{StepMetrics, TrainError, Trainable};
use bft_model::{LoadedModel, LoraConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("{}:{line}: {msg}", path.display())]
    Config {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("run {run}: {error}")]
    Run { run: String, error: TrainError },
    #[error(transparent)]
    Model(#[from] bft_model::Error),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    #[error(transparent)]
    Train(#[from] TrainError),
}

type Result<T> = std::result::Result<T, SweepError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SweepError + '_ {
    move |error| SweepError::Io {
        path: path.to_owned(),
        error,
    }
}

/// The training data of a sweep.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum DataSource {
    /// `gene-sets`: gene set -> process name instructions (`genes::gene_set_instructions`),
    /// disjoint from the GO sets evaluated.
    GeneSets,
    /// `gene-summaries`: the demo's gene-function instructions (`genes::build`, training part).
    GeneSummaries,
    /// A JSONL file in any of the three formats `bft train` reads.
    File(PathBuf),
}

/// An evaluation suite run after every run (held-out cross-entropy is always measured).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Suite {
    Go,
    Nest,
    Msigdb,
    Pubmedqa,
}

impl Suite {
    pub const ALL: [Suite; 4] = [Suite::Go, Suite::Nest, Suite::Msigdb, Suite::Pubmedqa];

    pub fn name(self) -> &'static str {
        match self {
            Suite::Go => "go",
            Suite::Nest => "nest",
            Suite::Msigdb => "msigdb",
            Suite::Pubmedqa => "pubmedqa",
        }
    }
}

/// Evaluation settings: the suites, and how many items of each (`None`: all).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalConfig {
    pub suites: Vec<Suite>,
    pub limits: BTreeMap<Suite, usize>,
    /// Longest reply to a gene set, in tokens (a reply stops once it has named the process).
    pub max_new_tokens: usize,
    /// Evaluate the base model too, as the table's first row.
    pub baseline: bool,
}

/// One `[[variants]]` entry: the name a registry builds it by, its parameters, and its label
/// in run names and the report.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VariantEntry {
    pub label: String,
    pub loss: String,
    pub params: toml::Table,
    /// The entry's line in the config file.
    pub line: usize,
}

/// A parsed and checked sweep file.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SweepConfig {
    /// HF directory, .gguf file, or `smollm2` (the built-in model, fetched once).
    pub model: PathBuf,
    pub data: DataSource,
    /// Held-out data; without it `val_ratio` of the data is held out (seeded by the first
    /// seed, the same for every run).
    pub eval_data: Option<PathBuf>,
    pub val_ratio: f64,
    pub steps: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub cutoff_len: usize,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub warmup_ratio: f64,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    /// Held-out evaluation every this many steps (0: a tenth of the run).
    pub eval_every: u64,
    /// Checkpoint every this many steps, for resuming a killed sweep (0: a fifth of the run).
    pub save_steps: u64,
    pub seeds: Vec<u64>,
    pub lrs: Vec<f64>,
    pub eval: EvalConfig,
    pub variants: Vec<VariantEntry>,
}

/// The sweep `bft sweep` runs without `--config`: the reproduction of `docs/EXPERIMENTS.md`.
pub const DEFAULT_CONFIG: &str = include_str!("../sweeps/default.toml");

/// A constructor of a variant from its `[[variants]]` parameters.
pub type Constructor =
    Box<dyn Fn(&toml::Table) -> std::result::Result<Box<dyn LossVariant>, String>>;

/// The variants a sweep can name: the built-ins, and whatever a binary registers.
pub struct Registry {
    constructors: BTreeMap<String, Constructor>,
}

impl Default for Registry {
    /// The built-in variants (`loss::BUILTIN_NAMES`), taking `window`, `group_mean`
    /// (`arithmetic` or `geometric`), `gamma`, `floor` and `focal_gamma`.
    fn default() -> Registry {
        let mut r = Registry {
            constructors: BTreeMap::new(),
        };
        for &name in crate::loss::BUILTIN_NAMES {
            r.register(name, move |p| {
                crate::loss::builtin(name, builtin_params(p)?).map_err(|e| e.to_string())
            });
        }
        r
    }
}

impl Registry {
    /// Makes `name` usable as `loss = "name"`; `build` gets the entry's other keys (an unknown
    /// key should be an error: return it as a message naming the key).
    pub fn register(
        &mut self,
        name: &str,
        build: impl Fn(&toml::Table) -> std::result::Result<Box<dyn LossVariant>, String> + 'static,
    ) {
        self.constructors.insert(name.to_string(), Box::new(build));
    }

    pub fn names(&self) -> Vec<&str> {
        self.constructors.keys().map(String::as_str).collect()
    }

    fn build(&self, e: &VariantEntry) -> std::result::Result<Box<dyn LossVariant>, String> {
        let build = self.constructors.get(&e.loss).ok_or_else(|| {
            format!(
                "unknown loss `{}` (known: {})",
                e.loss,
                self.names().join(", ")
            )
        })?;
        build(&e.params)
    }
}

/// The built-ins' parameters from a variant table; unknown keys and bad values are errors.
fn builtin_params(p: &toml::Table) -> std::result::Result<VariantParams, String> {
    let mut v = VariantParams::default();
    for (k, val) in p {
        let num = || {
            val.as_float()
                .or_else(|| val.as_integer().map(|i| i as f64))
                .ok_or_else(|| format!("`{k}` must be a number, not {val}"))
        };
        match k.as_str() {
            "window" => {
                let w = val.as_integer().filter(|&w| w >= 1).ok_or_else(|| {
                    format!("`window` must be a whole number of tokens >= 1, not {val}")
                })?;
                v.group.window = w as usize;
            }
            "group_mean" => {
                v.group.mean = match val.as_str() {
                    Some("arithmetic") => GroupMean::Arithmetic,
                    Some("geometric") => GroupMean::Geometric,
                    _ => {
                        return Err(format!(
                            "`group_mean` is `arithmetic` or `geometric`, not {val}"
                        ));
                    }
                }
            }
            "gamma" => v.gamma = num()?,
            "floor" => v.floor = num()?,
            "focal_gamma" => v.focal_gamma = num()?,
            _ => {
                return Err(format!(
                    "unknown key `{k}` for a built-in loss (window, group_mean, gamma, floor, focal_gamma)"
                ));
            }
        }
    }
    if !(v.gamma.is_finite() && v.gamma > 0.0) {
        return Err(format!("`gamma` {} must be above 0", v.gamma));
    }
    if !(0.0..=1.0).contains(&v.floor) {
        return Err(format!("`floor` {} must be between 0 and 1", v.floor));
    }
    if !(v.focal_gamma.is_finite() && v.focal_gamma >= 0.0) {
        return Err(format!(
            "`focal_gamma` {} must be at least 0",
            v.focal_gamma
        ));
    }
    Ok(v)
}

/// The line of `key = ...` at or after byte `from` (else `fallback`).
fn key_line(text: &str, key: &str, from: usize, fallback: usize) -> usize {
    let mut at = from.min(text.len());
    for l in text[at..].split_inclusive('\n') {
        let t = l.trim_start();
        if t.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return line_of(text, at);
        }
        at += l.len();
    }
    fallback
}

impl SweepConfig {
    /// Parses and checks a sweep file's text; `path` names it in errors and anchors its
    /// relative paths. Every variant is built through `registry` to check its parameters.
    pub fn parse(text: &str, path: &Path, registry: &Registry) -> Result<SweepConfig> {
        let err = |line: usize, msg: String| SweepError::Config {
            path: path.to_owned(),
            line,
            msg,
        };
        let root: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e.span().map_or(1, |s| line_of(text, s.start));
            err(line, e.message().trim_end().to_string())
        })?;
        let line = |key: &str| key_line(text, key, 0, 1);
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &str| {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { base.join(p) }
        };
        const TOP: &[&str] = &[
            "model",
            "data",
            "eval_data",
            "val_ratio",
            "steps",
            "batch_size",
            "grad_accum",
            "cutoff_len",
            "lora_rank",
            "lora_alpha",
            "warmup_ratio",
            "max_grad_norm",
            "weight_decay",
            "eval_every",
            "save_steps",
            "seeds",
            "lrs",
            "eval",
            "variants",
        ];
        for k in root.keys() {
            if !TOP.contains(&k.as_str()) {
                return Err(err(
                    line(k),
                    format!("unknown key `{k}` (known: {})", TOP.join(", ")),
                ));
            }
        }
        let string = |k: &str, default: &str| -> Result<String> {
            match root.get(k) {
                None => Ok(default.to_string()),
                Some(toml::Value::String(s)) => Ok(s.clone()),
                Some(v) => Err(err(line(k), format!("`{k}` must be a string, not {v}"))),
            }
        };
        let count = |k: &str, default: u64, min: u64| -> Result<u64> {
            match root.get(k) {
                None => Ok(default),
                Some(toml::Value::Integer(i)) if *i >= min as i64 => Ok(*i as u64),
                Some(v) => Err(err(
                    line(k),
                    format!("`{k}` must be a whole number of at least {min}, not {v}"),
                )),
            }
        };
        let real = |k: &str, default: f64, lo: f64, hi: f64| -> Result<f64> {
            let v = match root.get(k) {
                None => return Ok(default),
                Some(v) => v,
            };
            match v.as_float().or_else(|| v.as_integer().map(|i| i as f64)) {
                Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x),
                _ => Err(err(
                    line(k),
                    format!("`{k}` must be a number between {lo} and {hi}, not {v}"),
                )),
            }
        };
        let model = string("model", "smollm2")?;
        let model = if model == "smollm2" {
            PathBuf::from(model)
        } else {
            rel(&model)
        };
        let data = match string("data", "gene-sets")?.as_str() {
            "gene-sets" => DataSource::GeneSets,
            "gene-summaries" => DataSource::GeneSummaries,
            p => {
                let p = rel(p);
                if !p.is_file() {
                    return Err(err(
                        line("data"),
                        format!(
                            "`data`: {} is not a file (or gene-sets, gene-summaries)",
                            p.display()
                        ),
                    ));
                }
                DataSource::File(p)
            }
        };
        let eval_data = match root.get("eval_data") {
            None => None,
            Some(toml::Value::String(s)) => {
                let p = rel(s);
                if !p.is_file() {
                    return Err(err(
                        line("eval_data"),
                        format!("`eval_data`: {} is not a file", p.display()),
                    ));
                }
                Some(p)
            }
            Some(v) => {
                return Err(err(
                    line("eval_data"),
                    format!("`eval_data` must be a path, not {v}"),
                ));
            }
        };
        let val_ratio = real(
            "val_ratio",
            if eval_data.is_some() { 0.0 } else { 0.05 },
            0.0,
            0.5,
        )?;
        if eval_data.is_some() && root.contains_key("val_ratio") {
            return Err(err(
                line("val_ratio"),
                "give either `eval_data` or `val_ratio`, not both".into(),
            ));
        }
        let list = |k: &str| -> Result<Option<&Vec<toml::Value>>> {
            match root.get(k) {
                None => Ok(None),
                Some(toml::Value::Array(a)) if !a.is_empty() => Ok(Some(a)),
                Some(v) => Err(err(
                    line(k),
                    format!("`{k}` must be a non-empty list, not {v}"),
                )),
            }
        };
        let seeds = match list("seeds")? {
            None => vec![1],
            Some(a) => a
                .iter()
                .map(|v| match v {
                    toml::Value::Integer(i) if *i >= 0 => Ok(*i as u64),
                    _ => Err(err(
                        line("seeds"),
                        format!("a seed must be a whole number >= 0, not {v}"),
                    )),
                })
                .collect::<Result<_>>()?,
        };
        let lrs = match list("lrs")? {
            None => vec![1e-4],
            Some(a) => a
                .iter()
                .map(
                    |v| match v.as_float().or_else(|| v.as_integer().map(|i| i as f64)) {
                        Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                        _ => Err(err(
                            line("lrs"),
                            format!("a learning rate must be a number above 0, not {v}"),
                        )),
                    },
                )
                .collect::<Result<_>>()?,
        };
        let shown: [(&str, Vec<String>); 2] = [
            ("seeds", seeds.iter().map(u64::to_string).collect()),
            ("lrs", lrs.iter().map(|x| format!("{x:e}")).collect()),
        ];
        for (k, vals) in shown {
            if let Some((_, v)) = vals
                .iter()
                .enumerate()
                .find(|(i, v)| vals[..*i].contains(v))
            {
                return Err(err(line(k), format!("`{k}` lists {v} twice")));
            }
        }
        let eval = parse_eval(text, root.get("eval"), &err)?;
        let variants = parse_variants(text, root.get("variants"), registry, &err)?;
        let cfg = SweepConfig {
            model,
            data,
            eval_data,
            val_ratio,
            steps: count("steps", 150, 1)?,
            batch_size: count("batch_size", 4, 1)? as usize,
            grad_accum: count("grad_accum", 1, 1)? as usize,
            cutoff_len: count("cutoff_len", 512, 2)? as usize,
            lora_rank: count("lora_rank", 16, 1)? as usize,
            lora_alpha: real("lora_alpha", 32.0, f64::MIN_POSITIVE, 1e6)?,
            warmup_ratio: real("warmup_ratio", 0.05, 0.0, 1.0)?,
            max_grad_norm: real("max_grad_norm", 1.0, 0.0, 1e6)?,
            weight_decay: real("weight_decay", 0.0, 0.0, 1e6)?,
            eval_every: count("eval_every", 0, 0)?,
            save_steps: count("save_steps", 0, 0)?,
            seeds,
            lrs,
            eval,
            variants,
        };
        Ok(cfg)
    }

    /// The `--quick` profile: two variants (the first, and the first `bft` one or else the
    /// second), the first seed and learning rate, 4 steps (a checkpoint at step 2) and a few
    /// items of each suite: a check that the whole pipeline runs, in about a minute.
    pub fn quick(mut self) -> SweepConfig {
        let second = (1..self.variants.len())
            .find(|&i| self.variants[i].loss == "bft")
            .unwrap_or(1);
        if second < self.variants.len() {
            self.variants.swap(1, second);
        }
        self.variants.truncate(2);
        self.seeds.truncate(1);
        self.lrs.truncate(1);
        self.steps = 4;
        self.save_steps = 2;
        self.eval_every = 2;
        for s in Suite::ALL {
            self.eval
                .limits
                .insert(s, if s == Suite::Pubmedqa { 4 } else { 2 });
        }
        self.val_ratio = self.val_ratio.min(0.01);
        self
    }

    /// The grid in run order: variants, then learning rates, then seeds.
    pub fn plan(&self) -> Vec<PlannedRun> {
        let mut out = Vec::new();
        for (vi, v) in self.variants.iter().enumerate() {
            for &lr in &self.lrs {
                for &seed in &self.seeds {
                    let lr_part = if self.lrs.len() > 1 {
                        format!("-lr{lr:e}")
                    } else {
                        String::new()
                    };
                    out.push(PlannedRun {
                        name: format!("{}{lr_part}-s{seed}", v.label),
                        variant: vi,
                        lr,
                        seed,
                    });
                }
            }
        }
        out
    }
}

fn parse_eval(
    text: &str,
    v: Option<&toml::Value>,
    err: &dyn Fn(usize, String) -> SweepError,
) -> Result<EvalConfig> {
    let mut cfg = EvalConfig {
        suites: Suite::ALL.to_vec(),
        limits: BTreeMap::new(),
        max_new_tokens: 48,
        baseline: true,
    };
    let Some(v) = v else {
        return Ok(cfg);
    };
    let from = text.find("[eval]").unwrap_or(0);
    let line = |k: &str| key_line(text, k, from, line_of(text, from));
    let t = v.as_table().ok_or_else(|| {
        err(
            line_of(text, from),
            "`eval` must be a table ([eval])".into(),
        )
    })?;
    for (k, val) in t {
        let bad = |msg: String| err(line(k), msg);
        match k.as_str() {
            "suites" => {
                let names = val
                    .as_array()
                    .ok_or_else(|| bad(format!("`suites` must be a list, not {val}")))?;
                cfg.suites = names
                    .iter()
                    .map(|n| {
                        Suite::ALL
                            .into_iter()
                            .find(|s| n.as_str() == Some(s.name()))
                            .ok_or_else(|| {
                                bad(format!(
                                    "unknown suite {n} (go, nest, msigdb, pubmedqa; held-out cross-entropy is always measured)"
                                ))
                            })
                    })
                    .collect::<Result<_>>()?;
            }
            "max_new_tokens" => {
                cfg.max_new_tokens =
                    val.as_integer().filter(|&n| n >= 1).ok_or_else(|| {
                        bad(format!("`max_new_tokens` must be at least 1, not {val}"))
                    })? as usize;
            }
            "baseline" => {
                cfg.baseline = val
                    .as_bool()
                    .ok_or_else(|| bad(format!("`baseline` must be true or false, not {val}")))?;
            }
            _ => {
                let suite = k
                    .strip_suffix("_limit")
                    .and_then(|s| Suite::ALL.into_iter().find(|x| x.name() == s))
                    .ok_or_else(|| {
                        bad(format!(
                            "unknown key `{k}` in [eval] (suites, max_new_tokens, baseline, go_limit, nest_limit, msigdb_limit, pubmedqa_limit)"
                        ))
                    })?;
                let n = val
                    .as_integer()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| bad(format!("`{k}` must be at least 1, not {val}")))?;
                if suite == Suite::Go && n as usize > crate::genes::GO_EVAL_SETS {
                    return Err(bad(format!(
                        "`go_limit` {n} would evaluate GO sets the gene-sets training data holds: at most {}",
                        crate::genes::GO_EVAL_SETS
                    )));
                }
                cfg.limits.insert(suite, n as usize);
            }
        }
    }
    Ok(cfg)
}

fn parse_variants(
    text: &str,
    v: Option<&toml::Value>,
    registry: &Registry,
    err: &dyn Fn(usize, String) -> SweepError,
) -> Result<Vec<VariantEntry>> {
    let tables = match v {
        Some(toml::Value::Array(a)) if !a.is_empty() => a,
        _ => {
            return Err(err(
                key_line(text, "variants", 0, 1),
                "no variants: add `[[variants]]` tables with `loss = \"...\"`".into(),
            ));
        }
    };
    // Each `[[variants]]` header, in order: where its keys are looked for.
    let headers: Vec<usize> = text.match_indices("[[variants]]").map(|(i, _)| i).collect();
    let mut out: Vec<VariantEntry> = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let from = headers.get(i).copied().unwrap_or(0);
        let at = line_of(text, from);
        let t = t
            .as_table()
            .ok_or_else(|| err(at, "a variant must be a table".into()))?;
        let mut params = t.clone();
        let loss = match params.remove("loss") {
            Some(toml::Value::String(s)) => s,
            Some(v) => {
                return Err(err(
                    key_line(text, "loss", from, at),
                    format!("`loss` must be a name, not {v}"),
                ));
            }
            None => return Err(err(at, "this variant has no `loss = \"...\"`".into())),
        };
        let label = match params.remove("label") {
            Some(toml::Value::String(s)) => s,
            Some(v) => {
                return Err(err(
                    key_line(text, "label", from, at),
                    format!("`label` must be a string, not {v}"),
                ));
            }
            None => default_label(&loss, &params),
        };
        if label.is_empty()
            || !label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(err(
                key_line(text, "label", from, at),
                format!(
                    "label `{label}` must be letters, digits, '-', '_' or '.' (it names run directories)"
                ),
            ));
        }
        if label == "base" {
            return Err(err(
                key_line(text, "label", from, at),
                "the label `base` names the untrained model's row; choose another".into(),
            ));
        }
        if let Some(prev) = out.iter().find(|e| e.label == label) {
            return Err(err(
                at,
                format!(
                    "two variants are labelled `{label}` (lines {} and {at}); give one a `label`",
                    prev.line
                ),
            ));
        }
        let e = VariantEntry {
            label,
            loss,
            params,
            line: at,
        };
        if !registry.constructors.contains_key(&e.loss) {
            return Err(err(
                key_line(text, "loss", from, at),
                format!(
                    "unknown loss `{}` (known: {})",
                    e.loss,
                    registry.names().join(", ")
                ),
            ));
        }
        registry.build(&e).map_err(|msg| {
            // Point at the key the message names, when it names one.
            let key = msg.split('`').nth(1).unwrap_or("loss");
            err(key_line(text, key, from, at), msg)
        })?;
        out.push(e);
    }
    Ok(out)
}

/// `loss` with its parameters, e.g. `bft-g128` or `dft-floor0.1`.
fn default_label(loss: &str, params: &toml::Table) -> String {
    let mut label = loss.to_string();
    for (k, v) in params {
        let short = match k.as_str() {
            "window" => "g".to_string(),
            "group_mean" => String::new(),
            other => other.replace('_', ""),
        };
        let val = match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        label.push_str(&format!("-{short}{val}"));
    }
    label
}

/// One run of the grid.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PlannedRun {
    /// Its directory under `runs/`: `<label>[-lr<lr>]-s<seed>`.
    pub name: String,
    /// Index into `SweepConfig::variants`.
    pub variant: usize,
    pub lr: f64,
    pub seed: u64,
}

/// Scores of one model on the suites.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scores {
    /// Held-out cross-entropy (nats per response token).
    pub heldout_ce: Option<f64>,
    /// Per gene-set collection: n, ROUGE-1, ROUGE-2, ROUGE-L F1.
    pub gene_sets: BTreeMap<String, GeneSetScore>,
    pub pubmedqa: Option<PubmedqaScore>,
    /// Seconds the evaluation took.
    pub eval_seconds: f64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GeneSetScore {
    pub n: usize,
    pub rouge1: f64,
    pub rouge2: f64,
    pub rouge_l: f64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PubmedqaScore {
    pub n: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
}

/// `runs/<name>/result.json`: a finished, evaluated run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunResult {
    pub name: String,
    /// The variant's label (`base` for the untrained model).
    pub label: String,
    pub loss: String,
    pub seed: u64,
    pub lr: f64,
    /// None for the base model.
    pub train: Option<RunSummary>,
    pub scores: Scores,
}

/// What a sweep reports as it goes. Every method has an empty default.
pub trait SweepObserver {
    /// The plan: run names, steps of training still to do, runs already finished.
    fn planned(&mut self, _runs: &[String], _steps_to_do: u64, _finished: usize) {}
    fn run_started(&mut self, _name: &str, _index: usize, _of: usize) {}
    fn step(&mut self, _name: &str, _s: &StepMetrics, _total: u64) {}
    /// A phase of a run, e.g. `evaluating go (100 items)`.
    fn phase(&mut self, _name: &str, _what: &str) {}
    fn run_finished(&mut self, _r: &RunResult) {}
}

/// A sweep observer that reports nothing.
pub struct QuietSweep;
impl SweepObserver for QuietSweep {}

/// Forwards a run's steps to the sweep's observer.
struct Forward<'a> {
    name: &'a str,
    obs: &'a mut dyn SweepObserver,
}

impl Observer for Forward<'_> {
    fn step(&mut self, s: &StepMetrics, total: u64) {
        self.obs.step(self.name, s, total);
    }
}

/// Resolves the model argument (`smollm2` fetches the built-in model into `cache`).
pub fn model_path(model: &Path, cache: &Path) -> Result<PathBuf> {
    if model == Path::new("smollm2") && !model.exists() {
        return Ok(bft_model::fetch::smollm2_gguf(cache)?);
    }
    Ok(model.to_owned())
}

/// The sweep's training and held-out conversations.
fn conversations(cfg: &SweepConfig) -> Result<(Vec<Conversation>, Option<Vec<Conversation>>)> {
    let train = match &cfg.data {
        DataSource::GeneSets => crate::genes::gene_set_instructions(),
        DataSource::GeneSummaries => crate::genes::build().train,
        DataSource::File(p) => crate::data::read_jsonl(p, false)?.conversations,
    };
    let held = match &cfg.eval_data {
        Some(p) => Some(crate::data::read_jsonl(p, false)?.conversations),
        None => None,
    };
    Ok((train, held))
}

/// Runs (or continues) the sweep `cfg` in `out` with the model at `model` (resolved), then
/// writes the report. Returns every run's result, the base model's first when it is evaluated.
pub fn run_sweep(
    cfg: &SweepConfig,
    config_text: &str,
    model: &Path,
    registry: &Registry,
    out: &Path,
    obs: &mut dyn SweepObserver,
) -> Result<Vec<RunResult>> {
    // Everything that can be checked is checked before anything is written.
    let plan = cfg.plan();
    let variants: Vec<Box<dyn LossVariant>> = cfg
        .variants
        .iter()
        .map(|e| {
            registry
                .build(e)
                .map_err(|m| SweepError::Invalid(format!("variant {}: {m}", e.label)))
        })
        .collect::<Result<_>>()?;
    let load =
        || -> Result<LoadedModel> { Ok(bft_model::load_model(model, bft_engine::DType::F32)?) };
    let probe = load()?;
    let template = probe
        .template
        .clone()
        .ok_or_else(|| SweepError::Invalid(format!("{} has no chat template", model.display())))?;
    let encode = |c: &[Conversation]| {
        crate::data::encode_all(
            c,
            &probe.tokenizer,
            &template,
            &probe.eos_token,
            cfg.cutoff_len,
        )
    };
    let (train_convs, held_convs) = conversations(cfg)?;
    // A sample cut at cutoff_len has lost the end of its answer (or all of it): it would train
    // on a truncated target. Such samples are left out, and counted.
    let whole = |convs: Vec<Conversation>| -> Result<Vec<(Conversation, Encoded)>> {
        let enc = encode(&convs)?;
        Ok(convs
            .into_iter()
            .zip(enc)
            .filter(|(_, e)| e.ids.len() < cfg.cutoff_len)
            .collect())
    };
    let offered = train_convs.len();
    let mut train = whole(train_convs)?;
    let dropped = offered - train.len();
    let held_out = match held_convs {
        Some(h) => whole(h)?,
        None => crate::run::split_held_out(&mut train, cfg.val_ratio, cfg.seeds[0])?,
    };
    let (train_convs, train): (Vec<Conversation>, Vec<Encoded>) = train.into_iter().unzip();
    let (held_convs, held_out): (Vec<Conversation>, Vec<Encoded>) = held_out.into_iter().unzip();
    obs.phase(
        "data",
        &format!(
            "{} training and {} held-out samples ({dropped} of {offered} training samples longer than cutoff_len {} left out)",
            train.len(),
            held_out.len(),
            cfg.cutoff_len
        ),
    );
    if crate::data::count_targets(&train) == 0 {
        return Err(SweepError::Invalid(format!(
            "no response token survives cutoff_len {} in the training data",
            cfg.cutoff_len
        )));
    }
    drop(probe);
    // A directory holds one sweep: its settings must match the ones it was started with.
    // The model as the file names it: a cache moved between sessions does not change a sweep.
    let settings = serde_json::json!({ "config": cfg, "plan": plan });
    let settings_text =
        serde_json::to_string_pretty(&settings).map_err(|e| SweepError::Invalid(e.to_string()))?;
    let settings_path = out.join("sweep.json");
    if let Ok(old) = std::fs::read_to_string(&settings_path)
        && old != settings_text
    {
        return Err(SweepError::Invalid(format!(
            "{} holds a sweep with other settings (see {}); choose a new --output or remove it",
            out.display(),
            settings_path.display()
        )));
    }
    let runs_dir = out.join("runs");
    std::fs::create_dir_all(&runs_dir).map_err(io(&runs_dir))?;
    std::fs::write(&settings_path, &settings_text).map_err(io(&settings_path))?;
    let copy = out.join("sweep.toml");
    std::fs::write(&copy, config_text).map_err(io(&copy))?;
    // The exact samples every run trains and is measured on: `bft train --data
    // data/train.jsonl --eval-data data/held_out.jsonl` with a run's settings repeats it.
    let data_dir = out.join("data");
    std::fs::create_dir_all(&data_dir).map_err(io(&data_dir))?;
    for (name, convs) in [
        ("train.jsonl", &train_convs),
        ("held_out.jsonl", &held_convs),
    ] {
        let p = data_dir.join(name);
        crate::genes::write_jsonl(convs, &p).map_err(io(&p))?;
    }

    let result_path = |name: &str| runs_dir.join(name).join("result.json");
    let read_result = |name: &str| -> Option<RunResult> {
        serde_json::from_str(&std::fs::read_to_string(result_path(name)).ok()?).ok()
    };
    let mut names: Vec<String> = plan.iter().map(|r| r.name.clone()).collect();
    if cfg.eval.baseline {
        names.insert(0, "base".into());
    }
    let finished = names.iter().filter(|n| read_result(n).is_some()).count();
    let steps_to_do: u64 = plan
        .iter()
        .filter(|r| read_result(&r.name).is_none())
        .map(|r| cfg.steps - done_steps(&runs_dir.join(&r.name)).min(cfg.steps))
        .sum();
    obs.planned(&names, steps_to_do, finished);
    let mut results = Vec::new();
    let of = names.len();
    if cfg.eval.baseline {
        let r = match read_result("base") {
            Some(r) => r,
            None => {
                obs.run_started("base", 0, of);
                let m = load()?;
                let (scores, answers) = evaluate_model(&m, &held_out, cfg, "base", obs)?;
                write_json(&runs_dir.join("base/answers.json"), &answers)?;
                let r = RunResult {
                    name: "base".into(),
                    label: "base".into(),
                    loss: "none".into(),
                    seed: 0,
                    lr: 0.0,
                    train: None,
                    scores,
                };
                write_json(&result_path("base"), &r)?;
                obs.run_finished(&r);
                r
            }
        };
        results.push(r);
    }
    for (i, p) in plan.iter().enumerate() {
        if let Some(r) = read_result(&p.name) {
            results.push(r);
            continue;
        }
        let index = i + usize::from(cfg.eval.baseline);
        obs.run_started(&p.name, index, of);
        let dir = runs_dir.join(&p.name);
        let entry = &cfg.variants[p.variant];
        let mut m = load()?;
        let wrap = |error| SweepError::Run {
            run: p.name.clone(),
            error,
        };
        let summary_path = dir.join("summary.json");
        let summary: RunSummary = match std::fs::read_to_string(&summary_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            // Trained before the sweep was stopped: only the evaluation is left.
            Some(s) => {
                m.model.load_peft(&dir.join("adapter"))?;
                s
            }
            None => {
                let opts = run_options(cfg, p, &dir, model)?;
                let mut fwd = Forward {
                    name: &p.name,
                    obs: &mut *obs,
                };
                crate::run::train(
                    &mut m,
                    &train,
                    &held_out,
                    variants[p.variant].as_ref(),
                    &opts,
                    &mut fwd,
                )
                .map_err(wrap)?
            }
        };
        // The adapter is kept; the checkpoints were only for resuming.
        let ckpts = dir.join("checkpoints");
        if ckpts.exists() {
            std::fs::remove_dir_all(&ckpts).map_err(io(&ckpts))?;
        }
        let (mut scores, answers) = evaluate_model(&m, &[], cfg, &p.name, obs)?;
        write_json(&dir.join("answers.json"), &answers)?;
        scores.heldout_ce = summary.eval_ce;
        let r = RunResult {
            name: p.name.clone(),
            label: entry.label.clone(),
            loss: entry.loss.clone(),
            seed: p.seed,
            lr: p.lr,
            train: Some(summary),
            scores,
        };
        write_json(&result_path(&p.name), &r)?;
        obs.run_finished(&r);
        results.push(r);
    }
    obs.phase("report", "writing report.md and report.html");
    crate::report::write(out, cfg, &results).map_err(|e| SweepError::Invalid(e.to_string()))?;
    Ok(results)
}

/// Steps a run directory has trained (its last metrics line; 0 without one).
fn done_steps(dir: &Path) -> u64 {
    crate::plot::column(&dir.join("metrics.jsonl"), "ce")
        .last()
        .map_or(0, |p| p.0 as u64)
}

fn run_options(cfg: &SweepConfig, p: &PlannedRun, dir: &Path, model: &Path) -> Result<RunOptions> {
    let entry = &cfg.variants[p.variant];
    // The per-sample statistics use the variant's own window when it has one.
    let group = builtin_params(&entry.params)
        .map(|v| v.group)
        .unwrap_or_else(|_| GroupConfig::default());
    let targets = LoraConfig::parse_targets("all").map_err(SweepError::Model)?;
    Ok(RunOptions {
        lr: p.lr,
        warmup_ratio: cfg.warmup_ratio,
        batch_size: cfg.batch_size,
        grad_accum: cfg.grad_accum,
        max_grad_norm: cfg.max_grad_norm,
        weight_decay: cfg.weight_decay,
        seed: p.seed,
        save_steps: if cfg.save_steps > 0 {
            cfg.save_steps
        } else {
            (cfg.steps / 5).max(1)
        },
        keep_last: 1,
        trainable: Trainable::Lora(LoraConfig {
            rank: cfg.lora_rank,
            alpha: cfg.lora_alpha,
            dropout: 0.0,
            targets,
        }),
        group,
        eval_every: cfg.eval_every,
        // A run directory with metrics is an interrupted run of this sweep (the settings
        // were checked against sweep.json): continue it from its checkpoint.
        resume: dir.join("metrics.jsonl").exists(),
        base_model: model.display().to_string(),
        ..RunOptions::new(dir, cfg.steps)
    })
}

fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| SweepError::Invalid(e.to_string()))?;
    // Written whole under a temporary name, then renamed: a result file is complete or absent.
    let tmp = path.with_extension("json.partial");
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Every item's answer, by suite: gene sets as (id, reference, extracted process, reply),
/// PubMedQA as (PMID, label, answer).
pub type Answers = BTreeMap<String, Vec<serde_json::Value>>;

/// Evaluates a model on the sweep's suites (and on `held_out` when it is not empty): the
/// scores, and every item's answer for `answers.json`.
pub fn evaluate_model(
    m: &LoadedModel,
    held_out: &[Encoded],
    cfg: &SweepConfig,
    name: &str,
    obs: &mut dyn SweepObserver,
) -> Result<(Scores, Answers)> {
    let t0 = Instant::now();
    let mut scores = Scores::default();
    let mut all = Answers::new();
    if !held_out.is_empty() {
        obs.phase(
            name,
            &format!("held-out cross-entropy ({} samples)", held_out.len()),
        );
        let pad = m.stop_ids.first().copied().unwrap_or(0);
        let e = crate::train::evaluate(
            &m.model,
            held_out,
            &crate::loss::Sft,
            GroupConfig::default(),
            cfg.batch_size,
            pad,
        )?;
        scores.heldout_ce = Some(e.ce);
    }
    for &suite in &cfg.eval.suites {
        let limit = cfg.eval.limits.get(&suite).copied();
        let collection = match suite {
            Suite::Go => Some(geneagent::Collection::Go),
            Suite::Nest => Some(geneagent::Collection::Nest),
            Suite::Msigdb => Some(geneagent::Collection::Msigdb),
            Suite::Pubmedqa => None,
        };
        if let Some(c) = collection {
            let mut sets = geneagent::gene_sets(c)?;
            sets.truncate(limit.unwrap_or(sets.len()));
            obs.phase(
                name,
                &format!("evaluating {} ({} gene sets)", c.name(), sets.len()),
            );
            let answers = geneagent::answer_sets(m, &sets, cfg.eval.max_new_tokens, |_| {})?;
            let [rouge1, rouge2, rouge_l] = geneagent::mean_f1(&answers);
            all.insert(
                c.name().to_string(),
                answers
                    .iter()
                    .map(|a| {
                        serde_json::json!({"id": a.id, "reference": a.reference,
                            "process": a.process, "reply": a.reply})
                    })
                    .collect(),
            );
            scores.gene_sets.insert(
                c.name().to_string(),
                GeneSetScore {
                    n: answers.len(),
                    rouge1,
                    rouge2,
                    rouge_l,
                },
            );
        } else {
            let mut items = pubmedqa::test_items()?;
            items.truncate(limit.unwrap_or(items.len()));
            obs.phase(
                name,
                &format!("evaluating pubmedqa ({} questions)", items.len()),
            );
            let (mut pred, mut truth, mut rows) = (Vec::new(), Vec::new(), Vec::new());
            for item in &items {
                let answer = pubmedqa::answer(m, item)?.0;
                rows.push(
                    serde_json::json!({"pmid": item.pmid, "label": item.label, "answer": answer}),
                );
                pred.push(answer);
                truth.push(item.label);
            }
            all.insert("pubmedqa".into(), rows);
            let mt = pubmedqa::metrics(&pred, &truth);
            scores.pubmedqa = Some(PubmedqaScore {
                n: mt.n,
                accuracy: mt.accuracy,
                macro_f1: mt.macro_f1,
            });
        }
    }
    scores.eval_seconds = t0.elapsed().as_secs_f64();
    Ok((scores, all))
}

/// Reads the sweep file at `config` (the built-in default sweep when None), applies the
/// `--quick` profile if asked, resolves the model (`smollm2` is fetched into `cache`) and runs
/// the sweep in `out`: what `bft sweep` does, for a binary with its own `registry`.
pub fn run_file(
    config: Option<&Path>,
    quick: bool,
    out: &Path,
    cache: &Path,
    registry: &Registry,
    obs: &mut dyn SweepObserver,
) -> Result<Vec<RunResult>> {
    let (text, path) = match config {
        Some(p) => (std::fs::read_to_string(p).map_err(io(p))?, p.to_owned()),
        None => (
            DEFAULT_CONFIG.to_string(),
            PathBuf::from("<built-in default sweep>"),
        ),
    };
    let mut cfg = SweepConfig::parse(&text, &path, registry)?;
    if config.is_none() {
        // The built-in file's relative paths mean nothing outside the source tree.
        cfg.model = PathBuf::from("smollm2");
    }
    if quick {
        cfg = cfg.quick();
    }
    let model = model_path(&cfg.model, cache)?;
    run_sweep(&cfg, &text, &model, registry, out, obs)
}

/// Sweep progress on stderr: one bar over every training step still to do (the ETA is the
/// bar's), with the current run and phase beside it; plain lines without a terminal.
pub struct ConsoleProgress {
    bar: Option<indicatif::ProgressBar>,
    /// "run i/n", shown with every step.
    run: String,
    last_plain: Instant,
    start: Instant,
    /// Training steps to do in this process, and done so far (for the plain lines' ETA).
    steps: (u64, u64),
}

impl Default for ConsoleProgress {
    fn default() -> Self {
        ConsoleProgress {
            bar: None,
            run: String::new(),
            last_plain: Instant::now(),
            start: Instant::now(),
            steps: (0, 0),
        }
    }
}

impl ConsoleProgress {
    fn line(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }
}

impl SweepObserver for ConsoleProgress {
    fn planned(&mut self, runs: &[String], steps_to_do: u64, finished: usize) {
        use std::io::IsTerminal;
        self.start = Instant::now();
        self.steps = (steps_to_do, 0);
        eprintln!(
            "sweep: {} runs ({finished} already finished), {steps_to_do} training steps to do",
            runs.len()
        );
        if std::io::stderr().is_terminal() {
            let b = indicatif::ProgressBar::new(steps_to_do.max(1));
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "sweep [{bar:30}] {pos}/{len} steps {elapsed_precise} (eta {eta}) {msg}",
                )
                // cannot fail: the template is a constant that parses.
                .expect("a valid template")
                .progress_chars("=> "),
            );
            self.bar = Some(b);
        }
    }

    fn run_started(&mut self, name: &str, index: usize, of: usize) {
        self.run = format!("run {}/{of}", index + 1);
        self.line(&format!("{}: {name}", self.run));
    }

    fn step(&mut self, name: &str, s: &StepMetrics, total: u64) {
        self.steps.1 += 1;
        let msg = format!(
            "{} {name} step {}/{total} loss {:.4} ce {:.4}",
            self.run, s.step, s.loss, s.ce
        );
        match &self.bar {
            Some(b) => {
                b.set_message(msg);
                b.inc(1);
            }
            // A line every 10 s at most keeps a log readable.
            None if self.last_plain.elapsed().as_secs() >= 10 || s.step == total => {
                self.last_plain = Instant::now();
                // The time per step so far includes the evaluations, so the ETA does too.
                let (todo, done) = self.steps;
                let per_step = self.start.elapsed().as_secs_f64() / done.max(1) as f64;
                let eta = per_step * todo.saturating_sub(done) as f64;
                eprintln!(
                    "  {msg}  (sweep eta {}h{:02}m)",
                    (eta / 3600.0) as u64,
                    (eta / 60.0) as u64 % 60
                );
            }
            None => {}
        }
    }

    fn phase(&mut self, name: &str, what: &str) {
        match &self.bar {
            Some(b) => b.set_message(format!("{name}: {what}")),
            None => eprintln!("  {name}: {what}"),
        }
    }

    fn run_finished(&mut self, r: &RunResult) {
        let rl: Vec<String> = r
            .scores
            .gene_sets
            .iter()
            .map(|(c, g)| format!("{c} ROUGE-L {:.4}", g.rouge_l))
            .collect();
        let ce = r
            .scores
            .heldout_ce
            .map_or(String::new(), |c| format!("held-out ce {c:.4}  "));
        self.line(&format!("  {}: {ce}{}", r.name, rl.join("  ")));
    }
}

impl Drop for ConsoleProgress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SweepConfig> {
        SweepConfig::parse(text, Path::new("s.toml"), &Registry::default())
    }

    #[test]
    fn the_default_sweep_parses_into_the_papers_grid() {
        let cfg = parse(DEFAULT_CONFIG).unwrap();
        let labels: Vec<&str> = cfg.variants.iter().map(|v| v.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "sft",
                "dft",
                "bft-g128",
                "bft-g256",
                "bft-g512",
                "bft-no-token-g256",
                "bft-no-sample"
            ]
        );
        assert_eq!(cfg.plan().len(), 7 * 3);
        assert_eq!(cfg.data, DataSource::GeneSets);
        assert!(cfg.eval.limits[&Suite::Go] <= crate::genes::GO_EVAL_SETS);
        let q = cfg.quick();
        let names: Vec<String> = q.plan().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["sft-s1", "bft-g128-s1"]);
        assert_eq!((q.steps, q.save_steps), (4, 2));
    }

    #[test]
    fn several_learning_rates_name_their_runs() {
        let cfg =
            parse("lrs = [1e-4, 3e-4]\nseeds = [7]\n[[variants]]\nloss = \"dft\"\nfloor = 0.1\n")
                .unwrap();
        let names: Vec<String> = cfg.plan().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["dft-floor0.1-lr1e-4-s7", "dft-floor0.1-lr3e-4-s7"]);
    }

    /// Each bad file fails before any training, naming the line and the key.
    #[test]
    fn bad_files_name_the_line_and_the_key() {
        let v = "[[variants]]\nloss = \"sft\"\n";
        let cases: Vec<(String, &str)> = vec![
            (format!("stepz = 3\n{v}"), "s.toml:1: unknown key `stepz`"),
            (
                format!("steps = 0\n{v}"),
                "s.toml:1: `steps` must be a whole number of at least 1",
            ),
            (
                format!("\nseeds = [1, 1]\n{v}"),
                "s.toml:2: `seeds` lists 1 twice",
            ),
            (
                format!("lrs = [-1e-4]\n{v}"),
                "s.toml:1: a learning rate must be",
            ),
            (
                format!("data = \"nope.jsonl\"\n{v}"),
                "s.toml:1: `data`: nope.jsonl is not a file",
            ),
            ("steps = 3\n".into(), "s.toml:1: no variants"),
            (
                format!("{v}\n[[variants]]\nloss = \"bft\"\nwindow = 0\n"),
                "s.toml:6: `window` must be",
            ),
            (
                format!("{v}[[variants]]\nloss = \"bft\"\nwindo = 3\n"),
                "s.toml:5: unknown key `windo`",
            ),
            (
                format!("{v}[[variants]]\nloss = \"bfd\"\n"),
                "s.toml:4: unknown loss `bfd`",
            ),
            (
                format!("{v}[[variants]]\nloss = \"sft\"\n"),
                "two variants are labelled `sft`",
            ),
            (
                format!("{v}[[variants]]\nloss = \"bft\"\nlabel = \"base\"\n"),
                "s.toml:5: the label `base`",
            ),
            (
                format!("{v}[eval]\nsuites = [\"go\", \"mmlu\"]\n"),
                "s.toml:4: unknown suite \"mmlu\"",
            ),
            (
                format!("{v}[eval]\n\ngo_limit = 500\n"),
                "s.toml:5: `go_limit` 500 would evaluate GO sets",
            ),
            (
                format!("{v}[eval]\nbaseline = 1\n"),
                "s.toml:4: `baseline` must be true or false",
            ),
            ("steps = [\n".into(), "s.toml:1:"),
        ];
        for (text, want) in cases {
            let err = parse(&text)
                .err()
                .unwrap_or_else(|| panic!("accepted:\n{text}"));
            assert!(
                err.to_string().contains(want),
                "{text}\n-> {err}\nwanted {want}"
            );
        }
    }
}
