//! PubMedQA (Jin et al. 2019, PQA-L, MIT): yes/no/maybe questions on PubMed abstracts. The 500
//! official test questions ship in the binary (`trainer/data/pubmedqa`). The model's answer is
//! the label whose first token it finds most likely right after the question (constrained
//! choice, as evaluation harnesses score multiple-choice items), so a small model is measured
//! on what it knows rather than on following the output format.

use super::{EvalError, Result, chat, next_token_logits, prompt_ids};
use bft_model::LoadedModel;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    Yes,
    No,
    Maybe,
}

impl Label {
    pub const ALL: [Label; 3] = [Label::Yes, Label::No, Label::Maybe];

    pub fn name(self) -> &'static str {
        match self {
            Label::Yes => "yes",
            Label::No => "no",
            Label::Maybe => "maybe",
        }
    }

    fn parse(s: &str) -> Option<Label> {
        Label::ALL.into_iter().find(|l| l.name() == s)
    }
}

/// One question with its abstract and expert label.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Item {
    pub pmid: String,
    pub question: String,
    pub contexts: Vec<String>,
    pub label: Label,
}

#[derive(serde::Deserialize)]
struct Raw {
    #[serde(rename = "QUESTION")]
    question: String,
    #[serde(rename = "CONTEXTS")]
    contexts: Vec<String>,
    final_decision: String,
}

/// The 500 official test questions, ordered by PMID.
pub fn test_items() -> Result<Vec<Item>> {
    let bad = |m: String| EvalError::Data(format!("pubmedqa: {m}"));
    let all: BTreeMap<String, Raw> =
        serde_json::from_str(include_str!("../../data/pubmedqa/ori_pqal.json"))
            .map_err(|e| bad(format!("ori_pqal.json: {e}")))?;
    let test: BTreeMap<String, String> =
        serde_json::from_str(include_str!("../../data/pubmedqa/test_ground_truth.json"))
            .map_err(|e| bad(format!("test_ground_truth.json: {e}")))?;
    test.iter()
        .map(|(pmid, truth)| {
            let raw = all
                .get(pmid)
                .ok_or_else(|| bad(format!("test PMID {pmid} is not in ori_pqal.json")))?;
            let label =
                Label::parse(truth).ok_or_else(|| bad(format!("PMID {pmid}: label `{truth}`")))?;
            if raw.final_decision != *truth {
                return Err(bad(format!("PMID {pmid}: the two files disagree")));
            }
            Ok(Item {
                pmid: pmid.clone(),
                question: raw.question.clone(),
                contexts: raw.contexts.clone(),
                label,
            })
        })
        .collect()
}

/// The user message for an item.
pub fn prompt(item: &Item) -> String {
    format!(
        "Answer the biomedical question using the abstract.\n\nAbstract: {}\n\nQuestion: {}\n\
         Answer with one word: yes, no or maybe.",
        item.contexts.join(" "),
        item.question
    )
}

/// The model's answer to an item and the logit of each label (yes, no, maybe): the best logit
/// over the first tokens of the label's spellings (`yes`, `Yes`).
pub fn answer(m: &LoadedModel, item: &Item) -> Result<(Label, [f64; 3])> {
    let ids = prompt_ids(m, &chat(None, prompt(item)))?;
    let logits = next_token_logits(m, &ids)?;
    let mut scores = [f64::NEG_INFINITY; 3];
    for (k, l) in Label::ALL.iter().enumerate() {
        let name = l.name();
        let capital = format!("{}{}", name[..1].to_uppercase(), &name[1..]);
        for spelling in [name, capital.as_str()] {
            let enc = m
                .tokenizer
                .encode(spelling, false)
                .map_err(|e| EvalError::Tokenizer(e.to_string()))?;
            if let Some(&id) = enc.get_ids().first() {
                scores[k] = scores[k].max(logits[id as usize]);
            }
        }
    }
    let best = (0..3).fold(0, |b, k| if scores[k] > scores[b] { k } else { b });
    Ok((Label::ALL[best], scores))
}

/// Accuracy and macro-F1 (scikit-learn's: the mean F1 over the labels that occur in either
/// list; a label never predicted or never true scores 0).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Metrics {
    pub n: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub f1: BTreeMap<Label, f64>,
}

pub fn metrics(pred: &[Label], truth: &[Label]) -> Metrics {
    let n = pred.len().min(truth.len());
    let correct = (0..n).filter(|&i| pred[i] == truth[i]).count();
    let mut f1 = BTreeMap::new();
    for l in Label::ALL {
        let tp = (0..n).filter(|&i| pred[i] == l && truth[i] == l).count();
        let fp = (0..n).filter(|&i| pred[i] == l && truth[i] != l).count();
        let fn_ = (0..n).filter(|&i| pred[i] != l && truth[i] == l).count();
        if tp + fp + fn_ > 0 {
            f1.insert(l, 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64);
        }
    }
    Metrics {
        n,
        accuracy: correct as f64 / n.max(1) as f64,
        macro_f1: f1.values().sum::<f64>() / f1.len().max(1) as f64,
        f1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Label::*;

    #[test]
    fn the_official_test_split_loads() {
        let items = test_items().unwrap();
        assert_eq!(items.len(), 500);
        assert!(items.windows(2).all(|w| w[0].pmid < w[1].pmid));
        let count = |l| items.iter().filter(|i| i.label == l).count();
        assert_eq!(count(Yes) + count(No) + count(Maybe), 500);
        assert!(count(Yes) > count(No) && count(No) > count(Maybe) && count(Maybe) > 0);
        assert!(
            items
                .iter()
                .all(|i| !i.contexts.is_empty() && i.question.ends_with('?'))
        );
        let p = prompt(&items[0]);
        assert!(p.contains(&items[0].question) && p.ends_with("yes, no or maybe."));
    }

    #[test]
    fn metrics_match_scikit_learn() {
        // sklearn: accuracy_score = 4/6; f1_score(average="macro") = (0.8 + 0.5 + 0.5) / 3.
        let truth = [Yes, Yes, Yes, No, No, Maybe];
        let pred = [Yes, Yes, No, No, Yes, Maybe];
        let m = metrics(&pred, &truth);
        assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-15);
        // yes: tp 2 fp 1 fn 1 -> 4/6; no: tp 1 fp 1 fn 1 -> 0.5; maybe: tp 1 -> 1.
        assert!((m.f1[&Yes] - 2.0 / 3.0).abs() < 1e-15);
        assert!((m.macro_f1 - (2.0 / 3.0 + 0.5 + 1.0) / 3.0).abs() < 1e-15);
        // A label in neither list does not count.
        let m = metrics(&[Yes, No], &[Yes, No]);
        assert_eq!((m.macro_f1, m.f1.len()), (1.0, 2));
    }
}
