//! The built-in biomedical dataset: instruction data built deterministically from 1,436 human
//! gene summaries (NCBI RefSeq and Alliance of Genome Resources texts; provenance and licenses
//! in `trainer/data/SOURCES.md`), with a held-out set of genes for evaluation.

use crate::data::Conversation;
use bft_model::Message;

/// The source data, embedded so the demo runs from any directory.
pub const GENE_SUMMARIES: &str = include_str!("../data/gene_summaries.jsonl");

/// One gene's record.
#[derive(serde::Deserialize)]
struct Gene {
    symbol: String,
    narrative_summary: Option<String>,
    ontological_synopsis: Option<String>,
}

/// Training and held-out conversations (disjoint genes).
pub struct GeneData {
    pub train: Vec<Conversation>,
    pub eval: Vec<Conversation>,
    /// Held-out gene symbols, in file order.
    pub eval_genes: Vec<String>,
}

/// Whether a gene is held out: FNV-1a of its symbol, about 1 in 10, stable across runs.
pub fn held_out(symbol: &str) -> bool {
    let h = symbol.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    h % 10 == 0
}

/// Sentences of a synopsis ("Enables …. Involved in …. Located in ….").
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let b = text.as_bytes();
    for i in 0..b.len() {
        // A period followed by a space and a capital letter ends a sentence (not "E.coli").
        if b[i] == b'.' && (i + 2 >= b.len() || (b[i + 1] == b' ' && b[i + 2].is_ascii_uppercase()))
        {
            out.push(text[start..=i].trim());
            start = i + 1;
        }
    }
    if start < text.len() && !text[start..].trim().is_empty() {
        out.push(text[start..].trim());
    }
    out
}

fn qa(question: String, answer: String, line: usize) -> Conversation {
    let msg = |role: &str, content: String| Message {
        role: role.into(),
        content,
    };
    Conversation {
        messages: vec![msg("user", question), msg("assistant", answer)],
        line,
    }
}

/// The instruction examples of one gene, in a fixed order.
fn examples(g: &Gene, line: usize) -> Vec<Conversation> {
    let s = &g.symbol;
    let mut out = Vec::new();
    if let Some(syn) = &g.ontological_synopsis {
        let parts = sentences(syn);
        let pick = |prefixes: &[&str]| -> Option<String> {
            let v: Vec<&str> = parts
                .iter()
                .copied()
                .filter(|p| prefixes.iter().any(|x| p.starts_with(x)))
                .collect();
            (!v.is_empty()).then(|| v.join(" "))
        };
        if let Some(a) = pick(&["Enables", "Predicted to enable", "Exhibits"]) {
            out.push(qa(
                format!("What molecular functions does the human gene {s} have?"),
                a,
                line,
            ));
        }
        if let Some(a) = pick(&[
            "Involved in",
            "Acts upstream of",
            "Predicted to be involved in",
        ]) {
            out.push(qa(
                format!("Which biological processes is the human gene {s} involved in?"),
                a,
                line,
            ));
        }
        if let Some(a) = pick(&["Implicated in", "Biomarker of"]) {
            out.push(qa(
                format!("Which human diseases is the gene {s} associated with?"),
                a,
                line,
            ));
        }
        out.push(qa(
            format!("Give the Gene Ontology synopsis of the human gene {s}."),
            syn.clone(),
            line,
        ));
    }
    if let Some(n) = &g.narrative_summary {
        // Drop the "[provided by …]" attribution and keep the first three sentences.
        let text = n.split(" [provided by").next().unwrap_or(n);
        let first: Vec<&str> = sentences(text).into_iter().take(3).collect();
        if !first.is_empty() {
            out.push(qa(
                format!("Summarize what is known about the human gene {s}."),
                first.join(" "),
                line,
            ));
        }
    }
    out
}

/// Builds the dataset from the embedded summaries.
pub fn build() -> GeneData {
    let mut data = GeneData {
        train: Vec::new(),
        eval: Vec::new(),
        eval_genes: Vec::new(),
    };
    for (i, line) in GENE_SUMMARIES.lines().enumerate() {
        // cannot fail: the file is embedded at build time and a unit test parses every line.
        let g: Gene =
            serde_json::from_str(line).expect("the embedded gene summaries are valid JSON");
        let ex = examples(&g, i + 1);
        if held_out(&g.symbol) {
            data.eval_genes.push(g.symbol.clone());
            data.eval.extend(ex);
        } else {
            data.train.extend(ex);
        }
    }
    data
}

/// GeneAgent GO sets kept out of training: the first `GO_EVAL_SETS` of `GO_terms.csv` in file
/// order, which `bft eval --benchmark go --limit N` (N at most this) evaluates.
pub const GO_EVAL_SETS: usize = 200;

/// Genes whose summary sentence an answer quotes, at most.
const GROUNDED_GENES: usize = 4;

/// Instructions for the task the paper evaluates: a gene set in, its biological process out,
/// in GeneAgent's format. Built from the GeneAgent GO sets after the first `GO_EVAL_SETS`
/// (disjoint from the evaluated ones): GeneAgent's system message and prompt with the set's
/// genes, and an answer `Process: <curated GO name>` followed by one grounding line per gene
/// (up to four, in set order) that has a real summary: `GENE: <its first sentence>`.
pub fn gene_set_instructions() -> Vec<Conversation> {
    use crate::eval::geneagent::{Collection, SYSTEM, gene_sets, prompt};
    let first_sentence: std::collections::HashMap<String, String> = crate::embed::gene_summaries()
        .into_iter()
        .filter_map(|(g, text)| {
            let s = sentences(&text).into_iter().next()?.to_string();
            Some((g, s))
        })
        .collect();
    // cannot fail: the GO file is embedded and a unit test in eval::geneagent parses it.
    let sets = gene_sets(Collection::Go).expect("the embedded GO sets parse");
    sets.iter()
        .enumerate()
        .skip(GO_EVAL_SETS)
        .map(|(i, set)| {
            let mut answer = format!("Process: {}", set.name);
            let grounded = set
                .genes
                .iter()
                .filter_map(|g| Some((g, first_sentence.get(g)?)))
                .take(GROUNDED_GENES);
            for (g, sentence) in grounded {
                answer.push_str(&format!("\n{g}: {sentence}"));
            }
            let msg = |role: &str, content: String| Message {
                role: role.into(),
                content,
            };
            Conversation {
                messages: vec![
                    msg("system", SYSTEM.to_string()),
                    msg("user", prompt(&set.genes)),
                    msg("assistant", answer),
                ],
                // The set's data line in GO_terms.csv (after the header).
                line: i + 2,
            }
        })
        .collect()
}

/// Writes conversations as OpenAI-style `messages` JSONL.
pub fn write_jsonl(convs: &[Conversation], path: &std::path::Path) -> std::io::Result<()> {
    let body: String = convs
        .iter()
        .map(|c| serde_json::json!({ "messages": c.messages }).to_string() + "\n")
        .collect();
    std::fs::write(path, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gene-set instructions: every GO set after the evaluated ones, none of the evaluated,
    /// GeneAgent's prompt, and answers whose first line is the curated name (what
    /// `extract_process` reads back) followed by real summary sentences of the set's genes.
    #[test]
    fn gene_set_instructions_skip_the_evaluated_sets_and_ground_their_answers() {
        use crate::eval::geneagent::{Collection, extract_process, gene_sets};
        let go = gene_sets(Collection::Go).unwrap();
        let data = gene_set_instructions();
        assert_eq!(data.len(), go.len() - GO_EVAL_SETS);
        let evaluated: std::collections::HashSet<&str> =
            go[..GO_EVAL_SETS].iter().map(|s| s.id.as_str()).collect();
        for (c, set) in data.iter().zip(&go[GO_EVAL_SETS..]) {
            assert!(!evaluated.contains(set.id.as_str()));
            assert_eq!(c.messages.len(), 3);
            assert!(c.messages[1].content.contains(&set.genes.join(",")));
            let answer = &c.messages[2].content;
            assert_eq!(extract_process(answer), set.name.trim_end_matches('.'));
            for line in answer.lines().skip(1) {
                let (gene, _) = line.split_once(": ").unwrap();
                assert!(set.genes.iter().any(|g| g == gene), "{line}");
            }
        }
        let grounded = data
            .iter()
            .filter(|c| c.messages[2].content.contains('\n'))
            .count();
        assert!(
            grounded > 500,
            "{grounded} of {} answers quote a summary",
            data.len()
        );
        // Deterministic: the same text twice.
        let again = gene_set_instructions();
        assert!(
            data.iter()
                .zip(&again)
                .all(|(a, b)| a.messages == b.messages)
        );
    }

    #[test]
    fn dataset_is_deterministic_with_disjoint_held_out_genes() {
        let d = build();
        assert_eq!(
            d.eval_genes.len(),
            GENE_SUMMARIES
                .lines()
                .filter(|l| {
                    let g: Gene = serde_json::from_str(l).unwrap();
                    held_out(&g.symbol)
                })
                .count()
        );
        assert!(
            (100..200).contains(&d.eval_genes.len()),
            "{} held-out genes",
            d.eval_genes.len()
        );
        assert!(
            d.train.len() > 4000 && d.eval.len() > 400,
            "{} / {}",
            d.train.len(),
            d.eval.len()
        );
        // No training question mentions a held-out gene.
        let mentions = |c: &Conversation, g: &str| {
            c.messages[0].content.ends_with(&format!(" {g}?"))
                || c.messages[0].content.contains(&format!(" {g}."))
        };
        assert!(
            d.eval_genes
                .iter()
                .all(|g| !d.train.iter().any(|c| mentions(c, g)))
        );
        let again = build();
        assert_eq!(again.train.len(), d.train.len());
        assert_eq!(again.train[100].messages, d.train[100].messages);
    }

    #[test]
    fn examples_split_synopses_into_kinds() {
        let g = Gene {
            symbol: "AARS1".into(),
            narrative_summary: Some(
                "First. Second E.coli sentence. Third. Fourth. [provided by RefSeq, Jul 2008]"
                    .into(),
            ),
            ontological_synopsis: Some(
                "Enables A activity. Involved in B. Located in C. Implicated in D disease.".into(),
            ),
        };
        let ex = examples(&g, 1);
        let answers: Vec<&str> = ex.iter().map(|c| c.messages[1].content.as_str()).collect();
        assert_eq!(
            answers,
            vec![
                "Enables A activity.",
                "Involved in B.",
                "Implicated in D disease.",
                "Enables A activity. Involved in B. Located in C. Implicated in D disease.",
                "First. Second E.coli sentence. Third.",
            ]
        );
    }
}
