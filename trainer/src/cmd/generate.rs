//! `bft generate`: a reply from a model (and optional adapter), streamed as it is decoded.

use crate::cli::check_range;
use anyhow::{Context, Result, bail};
use bft_engine::DType;
use bft_model::{Message, Sampling, generate};
use std::io::Write;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub source: crate::cli::ModelArgs,
    /// The user message (or, with --raw, the exact text to continue).
    #[arg(long)]
    pub prompt: String,
    /// Optional system message for the chat template.
    #[arg(long)]
    pub system: Option<String>,
    /// Continue the prompt as plain text, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass (with --temperature > 0), in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the reply contains this text (repeatable). EOS always stops.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Compute device: cpu, wgpu (the first adapter), wgpu:N, cuda or cuda:N (`bft info` lists
    /// them).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    check_range("temperature", a.temperature, 0.0, f64::INFINITY)?;
    check_range("top-p", a.top_p, f64::MIN_POSITIVE, 1.0)?;
    let device = crate::cli::parse_device(&a.device)?;
    let t0 = Instant::now();
    let mut m = a.source.load(DType::F32)?;
    m.model = m
        .model
        .to_device(&device)
        .with_context(|| format!("moving the model to {device}"))?;
    let load_s = t0.elapsed().as_secs_f64();
    let text = if a.raw {
        a.prompt.clone()
    } else {
        let template = m.template.as_ref().with_context(|| {
            format!(
                "{} has no chat template; pass --raw to continue plain text",
                a.source.model.display()
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
