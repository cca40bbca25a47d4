//! Gene embeddings the GenePT way: a language model describes each gene (or the real NCBI
//! summary stands in), a sentence encoder embeds the text. This module holds what `bft embed`
//! needs besides the models: gene lists and text files with line-exact errors, the description
//! prompt and its on-disk cache, the gene summaries, a PCA to two components, and a coarse GO
//! category per gene for colouring the picture.

use crate::eval::EvalError as Error;
use crate::eval::Result;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The fixed request for a gene description: the wording of the built-in training data's
/// summary questions, so an adapter trained on it answers in kind.
pub fn describe_prompt(symbol: &str) -> String {
    format!("Summarize what is known about the human gene {symbol}.")
}

/// The real summary of each gene that has one, in file order: the NCBI/Alliance narrative
/// summary, else the GO-derived synopsis (GenePT embeds NCBI summaries).
pub fn gene_summaries() -> Vec<(String, String)> {
    #[derive(serde::Deserialize)]
    struct Gene {
        symbol: String,
        narrative_summary: Option<String>,
        ontological_synopsis: Option<String>,
    }
    crate::genes::GENE_SUMMARIES
        .lines()
        .filter_map(|l| serde_json::from_str::<Gene>(l).ok())
        .filter_map(|g| {
            let text = g.narrative_summary.or(g.ontological_synopsis)?;
            Some((g.symbol, text))
        })
        .collect()
}

/// Every gene symbol the shipped data mentions: the summaries, the GGI pairs and the GeneAgent
/// gene sets. A symbol outside it is most likely a typo.
pub fn known_genes() -> HashSet<String> {
    let mut out: HashSet<String> = gene_summaries().into_iter().map(|(g, _)| g).collect();
    for split in [
        crate::eval::ggi::Split::Train,
        crate::eval::ggi::Split::Valid,
        crate::eval::ggi::Split::Test,
    ] {
        out.extend(crate::eval::ggi::builtin(split).genes.into_iter().flatten());
    }
    for c in crate::eval::geneagent::Collection::ALL {
        if let Ok(sets) = crate::eval::geneagent::gene_sets(c) {
            out.extend(sets.into_iter().flat_map(|s| s.genes));
        }
    }
    out
}

/// The genes of the GGI benchmark (train and test pairs), sorted.
pub fn ggi_genes() -> Vec<String> {
    let mut out: Vec<String> = [
        crate::eval::ggi::Split::Train,
        crate::eval::ggi::Split::Test,
    ]
    .into_iter()
    .flat_map(|s| crate::eval::ggi::builtin(s).genes.into_iter().flatten())
    .collect::<HashSet<_>>()
    .into_iter()
    .collect();
    out.sort();
    out
}

/// A gene list: one symbol a line; blank lines and `#` comments are skipped. A symbol that is
/// not a gene symbol, unknown to the shipped data, or repeated is an error naming the line.
pub fn parse_gene_list(text: &str, name: &str, known: &HashSet<String>) -> Result<Vec<String>> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let s = line.split('#').next().unwrap_or("").trim();
        if s.is_empty() {
            continue;
        }
        let at = format!("{name}:{}", i + 1);
        if s.split_whitespace().count() > 1 {
            return Err(Error::Data(format!(
                "{at}: one gene symbol a line, got {s:?}"
            )));
        }
        if !known.contains(s) {
            return Err(Error::Data(format!(
                "{at}: unknown gene symbol {s:?} (not in the gene summaries, the GGI pairs or \
                 the GeneAgent gene sets; symbols are case-sensitive HGNC symbols)"
            )));
        }
        if let Some(first) = seen.insert(s, i + 1) {
            return Err(Error::Data(format!("{at}: {s} is already on line {first}")));
        }
        out.push(s.to_string());
    }
    if out.is_empty() {
        return Err(Error::Data(format!("{name}: no gene symbols")));
    }
    Ok(out)
}

/// Texts to embed, in input order: JSONL with a `text` field when `jsonl`, else one text a
/// line. An empty text, or a JSONL line that is not an object with a string `text`, is an error
/// naming the line.
pub fn parse_texts(text: &str, name: &str, jsonl: bool) -> Result<Vec<String>> {
    let lines: Vec<&str> = text.lines().collect();
    // A final empty line is the file's last newline, not an empty text.
    let n = lines.len() - usize::from(lines.last().is_some_and(|l| l.trim().is_empty()));
    let out = lines[..n]
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let at = format!("{name}:{}", i + 1);
            let t = if jsonl {
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| Error::Data(format!("{at}: not JSON: {e}")))?;
                v.get("text")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| Error::Data(format!("{at}: no string field `text`")))?
                    .to_string()
            } else {
                line.to_string()
            };
            if t.trim().is_empty() {
                return Err(Error::Data(format!("{at}: empty text")));
            }
            Ok(t)
        })
        .collect::<Result<Vec<_>>>()?;
    if out.is_empty() {
        return Err(Error::Data(format!("{name}: no texts")));
    }
    Ok(out)
}

/// Generated descriptions kept beside the embeddings (`emb.descriptions.jsonl`), so a rerun, or
/// a run killed part-way, does not generate them again. Each line records the setting it was
/// made under (model, adapter, prompt, length); only lines of the current setting are reused.
pub struct DescriptionCache {
    path: PathBuf,
    setting: String,
    /// The file ends inside a line (a write cut short): the next append starts a new line.
    torn: bool,
    pub texts: HashMap<String, String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CacheLine {
    gene: String,
    text: String,
    setting: String,
}

impl DescriptionCache {
    /// Opens (or starts) the cache at `path`; lines that do not parse (a write cut short by a
    /// kill) are skipped.
    pub fn open(path: &Path, setting: String) -> Result<DescriptionCache> {
        let mut texts = HashMap::new();
        let mut torn = false;
        match std::fs::read_to_string(path) {
            Ok(body) => {
                torn = !body.is_empty() && !body.ends_with('\n');
                for line in body.lines() {
                    if let Ok(c) = serde_json::from_str::<CacheLine>(line)
                        && c.setting == setting
                    {
                        texts.insert(c.gene, c.text);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::Data(format!("{}: {e}", path.display()))),
        }
        Ok(DescriptionCache {
            path: path.to_owned(),
            setting,
            torn,
            texts,
        })
    }

    /// Appends descriptions (flushed at once, one line each) and keeps them.
    pub fn add(&mut self, new: Vec<(String, String)>) -> Result<()> {
        let io = |e: std::io::Error| Error::Data(format!("{}: {e}", self.path.display()));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        let mut buf = String::new();
        if std::mem::take(&mut self.torn) {
            buf.push('\n');
        }
        for (gene, text) in &new {
            let line = CacheLine {
                gene: gene.clone(),
                text: text.clone(),
                setting: self.setting.clone(),
            };
            buf.push_str(&serde_json::to_string(&line).map_err(|e| Error::Data(e.to_string()))?);
            buf.push('\n');
        }
        f.write_all(buf.as_bytes()).map_err(io)?;
        self.texts.extend(new);
        Ok(())
    }
}

/// The first two principal components of the rows of `data (n, d)` (centred): each row's
/// coordinates and the share of the total variance each component explains. Power iteration
/// on the covariance, the second component after deflating the first.
pub fn pca2(data: &[f32], n: usize, d: usize) -> (Vec<[f64; 2]>, [f64; 2]) {
    let mut mean = vec![0f64; d];
    for row in data.chunks(d) {
        mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= n.max(1) as f64);
    let centred: Vec<f64> = data
        .chunks(d)
        .flat_map(|row| row.iter().zip(&mean).map(|(&v, m)| v as f64 - m))
        .collect();
    // (d, d) covariance.
    let mut cov = vec![0f64; d * d];
    for row in centred.chunks(d) {
        for i in 0..d {
            let ri = row[i];
            for j in 0..d {
                cov[i * d + j] += ri * row[j];
            }
        }
    }
    cov.iter_mut().for_each(|c| *c /= n.max(1) as f64);
    let total: f64 = (0..d).map(|i| cov[i * d + i]).sum();
    let mut comps: Vec<Vec<f64>> = Vec::new();
    let mut vars = [0f64; 2];
    for (k, var) in vars.iter_mut().enumerate() {
        // A deterministic start that is not orthogonal to the leading eigenvectors in practice.
        let mut v: Vec<f64> = (0..d)
            .map(|i| 1.0 + ((i * 7 + k * 3) % 11) as f64 / 10.0)
            .collect();
        let mut lambda = 0.0;
        for _ in 0..500 {
            for c in &comps {
                let p: f64 = v.iter().zip(c).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(c).for_each(|(a, b)| *a -= p * b);
            }
            let w: Vec<f64> = (0..d)
                .map(|i| (0..d).map(|j| cov[i * d + j] * v[j]).sum())
                .collect();
            let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm == 0.0 {
                break;
            }
            let next: Vec<f64> = w.iter().map(|x| x / norm).collect();
            let moved: f64 = next.iter().zip(&v).map(|(a, b)| (a - b).abs()).sum();
            v = next;
            lambda = norm;
            if moved < 1e-12 {
                break;
            }
        }
        *var = if total > 0.0 { lambda / total } else { 0.0 };
        comps.push(v);
    }
    let coords = centred
        .chunks(d)
        .map(|row| {
            let p = |c: &[f64]| row.iter().zip(c).map(|(a, b)| a * b).sum::<f64>();
            [p(&comps[0]), p(&comps[1])]
        })
        .collect();
    (coords, vars)
}

/// Coarse biological-process categories for colouring genes, matched in the names of the GO
/// gene sets (GeneAgent's 1,000 GO:BP sets) that contain a gene.
pub const CATEGORIES: [(&str, &[&str]); 7] = [
    (
        "immune",
        &[
            "immune",
            "lymphocyte",
            "leukocyte",
            "T cell",
            "B cell",
            "inflamm",
            "cytokine",
            "interferon",
            "interleukin",
        ],
    ),
    (
        "metabolism",
        &[
            "metabolic",
            "biosynthetic",
            "catabolic",
            "oxidation",
            "glycoly",
        ],
    ),
    (
        "signalling",
        &["signaling", "signal transduction", "receptor", "kinase"],
    ),
    (
        "transport",
        &["transport", "secretion", "localization", "export", "import"],
    ),
    (
        "development",
        &[
            "development",
            "differentiation",
            "morphogenesis",
            "proliferation",
        ],
    ),
    (
        "gene expression",
        &[
            "transcription",
            "RNA",
            "DNA",
            "chromatin",
            "translation",
            "histone",
        ],
    ),
    (
        "cell cycle & death",
        &[
            "cell cycle",
            "mitotic",
            "apoptotic",
            "cell death",
            "division",
        ],
    ),
];

/// Each gene's category: the one most GO sets containing it fall into (ties to the earlier
/// category), "other GO process" when none matches, "not in a GO set" when no set has it.
pub fn go_categories(genes: &[String]) -> Vec<&'static str> {
    let sets = crate::eval::geneagent::gene_sets(crate::eval::geneagent::Collection::Go)
        .unwrap_or_default();
    let mut counts: HashMap<&str, [usize; CATEGORIES.len() + 1]> = HashMap::new();
    for s in &sets {
        let name = s.name.to_lowercase();
        let cat = CATEGORIES
            .iter()
            .position(|(_, keys)| keys.iter().any(|k| name.contains(&k.to_lowercase())))
            .unwrap_or(CATEGORIES.len());
        for g in &s.genes {
            counts.entry(g.as_str()).or_default()[cat] += 1;
        }
    }
    genes
        .iter()
        .map(|g| match counts.get(g.as_str()) {
            None => "not in a GO set",
            Some(c) => {
                let best = (0..CATEGORIES.len()).fold(0, |b, i| if c[i] > c[b] { i } else { b });
                if c[best] == 0 {
                    "other GO process"
                } else {
                    CATEGORIES[best].0
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gene_lists_and_texts_fail_on_the_right_line() {
        let known: HashSet<String> = ["TP53", "BRCA1"].map(String::from).into();
        let ok = parse_gene_list("# header\nTP53\n\nBRCA1  # a comment\n", "g.txt", &known);
        assert_eq!(ok.unwrap(), vec!["TP53", "BRCA1"]);
        for (text, says) in [
            ("TP53\nTP5e\n", "g.txt:2: unknown gene symbol \"TP5e\""),
            ("TP53\nBRCA1 TP53\n", "g.txt:2: one gene symbol a line"),
            ("TP53\n\nTP53\n", "g.txt:3: TP53 is already on line 1"),
            ("# nothing\n", "no gene symbols"),
        ] {
            let err = parse_gene_list(text, "g.txt", &known)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err}");
        }
        assert_eq!(
            parse_texts("a b\nc\n", "t", false).unwrap(),
            vec!["a b", "c"]
        );
        let jsonl = "{\"text\": \"x\"}\n{\"text\": \"y\", \"id\": 2}\n";
        assert_eq!(parse_texts(jsonl, "t", true).unwrap(), vec!["x", "y"]);
        for (text, jsonl, says) in [
            ("a\n\nb\n", false, "t:2: empty text"),
            (
                "{\"text\": \"x\"}\n{\"txt\": 1}\n",
                true,
                "t:2: no string field `text`",
            ),
            ("{\"text\": \"x\"}\nnope\n", true, "t:2: not JSON"),
        ] {
            let err = parse_texts(text, "t", jsonl).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    /// Points on a tilted plane in 3-D: the two components span it (all the variance), and
    /// the coordinates keep the points' distances.
    #[test]
    fn pca_recovers_a_plane() {
        let pts: Vec<[f64; 2]> = (0..40)
            .map(|i| [(i as f64 * 0.37).sin() * 3.0, (i as f64 * 0.91).cos()])
            .collect();
        let (u, v) = ([0.6, 0.8, 0.0], [0.0, 0.0, 1.0]);
        let data: Vec<f32> = pts
            .iter()
            .flat_map(|p| (0..3).map(move |k| (p[0] * u[k] + p[1] * v[k] + 5.0) as f32))
            .collect();
        let (coords, var) = pca2(&data, 40, 3);
        assert!((var[0] + var[1] - 1.0).abs() < 1e-6, "{var:?}");
        assert!(var[0] > var[1]);
        let dist =
            |a: [f64; 2], b: [f64; 2]| ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt();
        for (i, j) in [(0, 1), (3, 17), (5, 39)] {
            assert!((dist(coords[i], coords[j]) - dist(pts[i], pts[j])).abs() < 1e-4);
        }
    }

    #[test]
    fn description_cache_reuses_only_its_setting_and_survives_a_torn_line() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let path = dir.join("d.jsonl");
        let mut c = DescriptionCache::open(&path, "a".into()).unwrap();
        c.add(vec![("TP53".into(), "tumour suppressor".into())])
            .unwrap();
        let mut other = DescriptionCache::open(&path, "b".into()).unwrap();
        assert!(other.texts.is_empty());
        other.add(vec![("TP53".into(), "other".into())]).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"gene\": \"BRCA1\", \"te").unwrap();
        let mut again = DescriptionCache::open(&path, "a".into()).unwrap();
        assert_eq!(again.texts.len(), 1);
        assert_eq!(again.texts["TP53"], "tumour suppressor");
        // An append after the torn line is a line of its own.
        again.add(vec![("BRCA1".into(), "repair".into())]).unwrap();
        let last = DescriptionCache::open(&path, "a".into()).unwrap();
        assert_eq!(last.texts["BRCA1"], "repair");
    }

    #[test]
    fn shipped_data_gives_summaries_categories_and_known_genes() {
        let s = gene_summaries();
        assert_eq!(s.len(), 1436);
        let genes: Vec<String> = s.iter().map(|(g, _)| g.clone()).collect();
        let cats = go_categories(&genes);
        let immune = cats.iter().filter(|c| **c == "immune").count();
        assert!(immune > 20, "{immune} immune genes");
        let known = known_genes();
        assert!(known.contains("TP53") && known.len() > 8_000);
        assert_eq!(ggi_genes().len(), 11_299);
    }
}
