//! `bft`: the trainer binary. `generate` and `convert` run real checkpoints today; training,
//! scoring and evaluation subcommands arrive with the trainer issue.

use anyhow::{Context, Result, bail};
use bft_engine::DType;
use bft_model::{GgufFile, Message, Sampling, generate, load_model, save_hf_dir};
use clap::{Parser, Subcommand, ValueEnum};
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
}

#[derive(clap::Args, Debug)]
struct MergeArgs {
    /// Base model: HF directory or .gguf file.
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
    dtype: SaveDType,
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Model directory (config.json + safetensors + tokenizer.json) or .gguf file.
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

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SaveDType {
    F32,
    Bf16,
    F16,
}

#[derive(clap::Args, Debug)]
struct ConvertArgs {
    /// The .gguf file to convert.
    input: PathBuf,
    /// Output directory (must not exist yet).
    output: PathBuf,
    /// Storage dtype of the written weights.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: SaveDType,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info => info(),
        Command::Generate(a) => generate_cmd(a),
        Command::Convert(a) => convert(a),
        Command::Merge(a) => merge(a),
    }
}

fn info() -> Result<()> {
    use bft_engine::{Device, Op};
    println!("bft {}", env!("CARGO_PKG_VERSION"));
    println!(
        "backends: {} (CUDA and wgpu are not built yet)",
        Device::Cpu
    );
    println!(
        "cpu threads: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let ops: Vec<String> = Op::ALL.iter().map(|op| format!("{op:?}")).collect();
    println!("ops: {}", ops.join(", "));
    Ok(())
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
    if a.output.exists() {
        bail!(
            "{} already exists; choose a new output directory",
            a.output.display()
        );
    }
    let hf_config = hf_config_of(&a.input)?;
    let m = load_model(&a.input, DType::F32)
        .with_context(|| format!("loading {}", a.input.display()))?;
    write_dir(&m, &hf_config, &a.output, a.dtype)
}

fn merge(a: MergeArgs) -> Result<()> {
    if a.output.exists() {
        bail!(
            "{} already exists; choose a new output directory",
            a.output.display()
        );
    }
    let hf_config = hf_config_of(&a.model)?;
    let mut m = load_model(&a.model, DType::F32)
        .with_context(|| format!("loading {}", a.model.display()))?;
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
    dtype: SaveDType,
) -> Result<()> {
    let dtype = match dtype {
        SaveDType::F32 => DType::F32,
        SaveDType::Bf16 => DType::BF16,
        SaveDType::F16 => DType::F16,
    };
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

fn sibling_tmp(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    target.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}
