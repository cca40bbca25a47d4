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
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Model directory (config.json + safetensors + tokenizer.json) or .gguf file.
    #[arg(long)]
    model: PathBuf,
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
    let g = GgufFile::open(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let hf_config = g.hf_config()?;
    drop(g);
    let m = load_model(&a.input, DType::F32)
        .with_context(|| format!("loading {}", a.input.display()))?;
    let dtype = match a.dtype {
        SaveDType::F32 => DType::F32,
        SaveDType::Bf16 => DType::BF16,
        SaveDType::F16 => DType::F16,
    };
    // Written beside the target and renamed at the end: no half-written directory on failure.
    let tmp = sibling_tmp(&a.output);
    let result = save_hf_dir(&m, &hf_config, &tmp, dtype).and_then(|()| {
        std::fs::rename(&tmp, &a.output).map_err(|e| bft_model::Error::Io {
            path: a.output.clone(),
            error: e,
        })
    });
    if let Err(e) = result {
        std::fs::remove_dir_all(&tmp).ok();
        return Err(e).with_context(|| format!("writing {}", a.output.display()));
    }
    eprintln!(
        "wrote {} ({} tensors)",
        a.output.display(),
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
