//! The GeneAgent gene-set benchmark (Wang et al., ncbi-nlp/GeneAgent): name the biological
//! process of a gene set; the name is scored against the curated one with ROUGE. Three sets of
//! gene sets ship in the binary (`trainer/data/geneagent`, public domain): 1,000 GO biological
//! processes, 56 MSigDB sets and 50 NeST systems.

use super::rouge::{self, Rouge};
use super::{EvalError as Error, Result};

/// Which collection of gene sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Collection {
    Go,
    Msigdb,
    Nest,
}

impl Collection {
    pub const ALL: [Collection; 3] = [Collection::Go, Collection::Msigdb, Collection::Nest];

    pub fn name(self) -> &'static str {
        match self {
            Collection::Go => "go",
            Collection::Msigdb => "msigdb",
            Collection::Nest => "nest",
        }
    }
}

impl std::str::FromStr for Collection {
    type Err = Error;
    fn from_str(s: &str) -> Result<Collection> {
        Collection::ALL
            .into_iter()
            .find(|c| c.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown gene-set collection `{s}` (go, msigdb, nest)"
                ))
            })
    }
}

/// One gene set with its curated process name.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GeneSet {
    pub id: String,
    pub name: String,
    pub genes: Vec<String>,
}

/// The gene sets of a collection, in file order.
pub fn gene_sets(c: Collection) -> Result<Vec<GeneSet>> {
    // (file text, delimiter, id column, name column, genes column, gene separator)
    let (text, delim, cols, sep): (&str, u8, [&str; 3], char) = match c {
        Collection::Go => (
            include_str!("../../data/geneagent/GO_terms.csv"),
            b',',
            ["GO", "Term_Description", "Genes"],
            ' ',
        ),
        Collection::Msigdb => (
            include_str!("../../data/geneagent/MsigDB.csv"),
            b',',
            ["ID", "Name", "Genes"],
            ' ',
        ),
        Collection::Nest => (
            include_str!("../../data/geneagent/NeST.tsv"),
            b'\t',
            ["NEST ID", "name_new", "Genes"],
            ',',
        ),
    };
    let bad = |m: String| Error::Data(format!("geneagent/{}: {m}", c.name()));
    let mut r = csv::ReaderBuilder::new()
        .delimiter(delim)
        .from_reader(text.as_bytes());
    let headers = r.headers().map_err(|e| bad(e.to_string()))?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| bad(format!("no column `{name}`")))
    };
    let idx = [col(cols[0])?, col(cols[1])?, col(cols[2])?];
    let mut sets = Vec::new();
    for row in r.records() {
        let row = row.map_err(|e| bad(e.to_string()))?;
        let field = |i: usize| row.get(idx[i]).unwrap_or("").trim().to_string();
        sets.push(GeneSet {
            id: field(0),
            name: field(1),
            genes: field(2)
                .split(sep)
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(String::from)
                .collect(),
        });
    }
    Ok(sets)
}

/// GeneAgent's system message for the baseline (`main_cascade.py`).
pub const SYSTEM: &str = "You are an efficient and insightful assistant to a molecular biologist.";

/// GeneAgent's baseline prompt for a gene set (`main_cascade.py`, genes joined by commas).
pub fn prompt(genes: &[String]) -> String {
    format!(
        "\nWrite a critical analysis of the biological processes performed by this system of \
         interacting proteins.\nPropose a brief name for the most prominent biological process \
         performed by the system. \nPut the name at the top of the analysis as \"Process: \
         <name>\".\nBe concise, do not use unnecessary words.\nBe specific, avoid overly general \
         statements such as \"the proteins are involved in various cellular processes\".\nBe \
         factual, do not editorialize.\nFor each important point, describe your reasoning and \
         supporting information.\nFor each biological function name, show the corresponding \
         gene names.\nHere is the gene set: {}\n",
        genes.join(",")
    )
}

/// The process name in a reply. GeneAgent takes what follows `Process: ` on the first line;
/// small models often add markdown or an opening sentence, so this takes the first line that
/// holds `process:` (any case), else the first non-empty line, without markdown emphasis,
/// quotes or a closing period.
pub fn extract_process(reply: &str) -> String {
    let lines: Vec<&str> = reply
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let named = lines.iter().find_map(|l| {
        let lower = l.to_ascii_lowercase();
        lower.find("process:").map(|i| &l[i + "process:".len()..])
    });
    let raw = named.or(lines.first().copied()).unwrap_or("");
    raw.trim_matches(|c: char| c.is_whitespace() || matches!(c, '*' | '#' | '"' | '\'' | '`'))
        .trim_end_matches('.')
        .trim()
        .to_string()
}

/// Whether `extract_process` of `text` is final whatever follows: a complete line (ended by a
/// newline) holds `process:`, so generation can stop there.
pub fn process_named(text: &str) -> bool {
    text.rfind('\n')
        .is_some_and(|end| text[..end].to_ascii_lowercase().contains("process:"))
}

/// Gene sets answered per batched generation: decoding is bound by reading the weights, which
/// one batch shares, so 16 rows cost little more than one.
pub const ANSWER_BATCH: usize = 16;

/// Answers gene sets greedily and scores them, calling `progress` after each batch with the
/// answers so far. Prompts go through the model in batches of `ANSWER_BATCH`, sorted by length
/// (left padding masked); a reply stops as soon as its process name is final
/// (`process_named`), else at `max_new_tokens`. Answers come back in `sets` order.
pub fn answer_sets(
    m: &bft_model::LoadedModel,
    sets: &[GeneSet],
    max_new_tokens: usize,
    mut progress: impl FnMut(&[Answer]),
) -> Result<Vec<Answer>> {
    let prompts: Vec<Vec<u32>> = sets
        .iter()
        .map(|set| super::prompt_ids(m, &super::chat(Some(SYSTEM), prompt(&set.genes))))
        .collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..sets.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let decode = |ids: &[u32]| {
        m.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    };
    let mut answers: Vec<Option<Answer>> = vec![None; sets.len()];
    let mut done = Vec::new();
    for chunk in order.chunks(ANSWER_BATCH) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let replies = bft_model::generate_batch_until(
            &m.model,
            &batch,
            &m.stop_ids,
            max_new_tokens,
            |_, ids| decode(ids).is_ok_and(|t| process_named(&t)),
        )?;
        for (&i, ids) in chunk.iter().zip(replies) {
            let a = score(&sets[i], decode(&ids)?.trim().to_string());
            done.push(a.clone());
            answers[i] = Some(a);
        }
        progress(&done);
    }
    Ok(answers.into_iter().flatten().collect())
}

/// One gene set answered and scored.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Answer {
    pub id: String,
    pub reference: String,
    pub process: String,
    pub reply: String,
    pub rouge: Rouge,
}

/// Scores a reply against a gene set's curated name.
pub fn score(set: &GeneSet, reply: String) -> Answer {
    let process = extract_process(&reply);
    Answer {
        id: set.id.clone(),
        reference: set.name.clone(),
        rouge: rouge::score(&set.name, &process),
        process,
        reply,
    }
}

/// Mean ROUGE-1/2/L F1 over answers.
pub fn mean_f1(answers: &[Answer]) -> [f64; 3] {
    let n = answers.len().max(1) as f64;
    let sum = |f: fn(&Rouge) -> f64| answers.iter().map(|a| f(&a.rouge)).sum::<f64>() / n;
    [
        sum(|r| r.rouge1.fmeasure),
        sum(|r| r.rouge2.fmeasure),
        sum(|r| r.rouge_l.fmeasure),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stopping at `process_named` never changes what `extract_process` reads: for every
    /// prefix of these replies at which it holds, the prefix's process equals the whole reply's.
    #[test]
    fn stopping_once_the_process_is_named_keeps_the_answer() {
        let replies = [
            "Process: DNA repair\nThe genes BRCA1 ...",
            "Sure! Here is the analysis.\n**Process: Cell cycle regulation.**\nMore text",
            "Some line\nanother line\nno name at all",
            "process:\nname below",
        ];
        for r in replies {
            let whole = extract_process(r);
            let mut stopped = false;
            for (i, _) in r.char_indices().skip(1) {
                if process_named(&r[..i]) {
                    assert_eq!(extract_process(&r[..i]), whole, "{r:?} cut at {i}");
                    stopped = true;
                    break;
                }
            }
            assert_eq!(
                stopped,
                r.to_ascii_lowercase().contains("process:"),
                "{r:?}"
            );
        }
    }

    #[test]
    fn collections_load_whole() {
        let go = gene_sets(Collection::Go).unwrap();
        assert_eq!(go.len(), 1000);
        assert_eq!(go[0].id, "GO:0032385");
        assert_eq!(go[0].genes, ["LDLRAP1", "SCP2D1", "ANXA2", "SCP2"]);
        assert_eq!(go[2].name, "nucleotide-excision repair, DNA incision");
        let msig = gene_sets(Collection::Msigdb).unwrap();
        assert_eq!(msig.len(), 56);
        assert_eq!(
            (msig[0].name.as_str(), msig[0].genes.len()),
            ("Progeria", 4)
        );
        let nest = gene_sets(Collection::Nest).unwrap();
        assert_eq!(nest.len(), 50);
        assert_eq!(nest[0].name, "MAPK signaling");
        assert_eq!(
            nest[0].genes,
            ["ERBB2", "ERBB4", "FGFR2", "FGFR4", "HRAS", "KRAS"]
        );
        assert!(
            [go, msig, nest]
                .iter()
                .flatten()
                .all(|s| !s.genes.is_empty() && !s.name.is_empty())
        );
    }

    #[test]
    fn prompt_is_geneagents() {
        let p = prompt(&["TP53".into(), "MDM2".into()]);
        assert!(p.starts_with("\nWrite a critical analysis of the biological processes"));
        assert!(p.contains("performed by the system. \nPut the name at the top"));
        assert!(p.ends_with("Here is the gene set: TP53,MDM2\n"));
        assert_eq!(p.lines().count(), 10);
    }

    #[test]
    fn process_names_are_extracted() {
        assert_eq!(
            extract_process("Process: DNA repair\n\nThe genes..."),
            "DNA repair"
        );
        assert_eq!(
            extract_process("**Process: Cell cycle regulation.**\n1. ..."),
            "Cell cycle regulation"
        );
        assert_eq!(
            extract_process("Here is my analysis.\n### Process: \"Lipid transport\"\n"),
            "Lipid transport"
        );
        assert_eq!(extract_process("Glycolysis\nThe enzymes ..."), "Glycolysis");
        assert_eq!(extract_process(""), "");
        let a = score(
            &GeneSet {
                id: "x".into(),
                name: "DNA repair".into(),
                genes: vec![],
            },
            "Process: DNA repair pathway".into(),
        );
        assert!((a.rouge.rouge1.fmeasure - 0.8).abs() < 1e-12);
        let m = mean_f1(&[a.clone(), a]);
        assert!(
            (m[0] - 0.8).abs() < 1e-12 && m[1] > 0.6 && m[2] > 0.79,
            "{m:?}"
        );
    }
}
