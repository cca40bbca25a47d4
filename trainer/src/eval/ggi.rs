//! GenePT's gene–gene interaction (GGI) benchmark on the Gene2vec pairs (`trainer/data/
//! gene2vec_ggi`, MIT): each pair of genes becomes the concatenation of the two genes'
//! embeddings, an L2-regularised logistic regression (`linfa-logistic`) is fitted on the
//! training pairs, and its probabilities on the test pairs are scored by ROC AUC. Only pairs
//! whose two genes both have an embedding count; the coverage is reported.

use super::{EvalError as Error, Result};
use bft_engine::Tensor;
use bft_model::SafetensorsDir;
use bft_model::weights::WeightSource;
use linfa::prelude::*;
use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use std::collections::HashMap;
use std::path::Path;

/// Labelled gene pairs of one split.
#[derive(Clone, Debug, PartialEq)]
pub struct Pairs {
    pub genes: Vec<[String; 2]>,
    pub labels: Vec<bool>,
}

/// The splits of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

/// The split as shipped in the binary.
pub fn builtin(split: Split) -> Pairs {
    let (text, labels) = match split {
        Split::Train => (
            include_str!("../../data/gene2vec_ggi/train_text.txt"),
            include_str!("../../data/gene2vec_ggi/train_label.txt"),
        ),
        Split::Valid => (
            include_str!("../../data/gene2vec_ggi/valid_text.txt"),
            include_str!("../../data/gene2vec_ggi/valid_label.txt"),
        ),
        Split::Test => (
            include_str!("../../data/gene2vec_ggi/test_text.txt"),
            include_str!("../../data/gene2vec_ggi/test_label.txt"),
        ),
    };
    // cannot fail: the shipped files are checked by a test.
    parse_pairs(text, labels, "built-in text", "built-in labels").expect("shipped GGI data")
}

/// `dir/{split}_text.txt` and `dir/{split}_label.txt`, in the Gene2vec layout.
pub fn load_dir(dir: &Path, split: Split) -> Result<Pairs> {
    let read = |suffix: &str| {
        let path = dir.join(format!("{}_{suffix}.txt", split.name()));
        std::fs::read_to_string(&path)
            .map(|t| (t, path.display().to_string()))
            .map_err(|e| Error::Data(format!("{}: {e}", path.display())))
    };
    let ((text, tname), (labels, lname)) = (read("text")?, read("label")?);
    parse_pairs(&text, &labels, &tname, &lname)
}

/// Parses one pair of space-separated symbols a line and the matching 0/1 labels; errors name
/// the file and the line.
pub fn parse_pairs(text: &str, labels: &str, text_name: &str, label_name: &str) -> Result<Pairs> {
    let genes = text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let mut it = line.split_whitespace();
            match (it.next(), it.next(), it.next()) {
                (Some(a), Some(b), None) => Ok([a.to_string(), b.to_string()]),
                _ => Err(Error::Data(format!(
                    "{text_name}:{}: expected two gene symbols, got {line:?}",
                    i + 1
                ))),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let labels = labels
        .lines()
        .enumerate()
        .map(|(i, line)| match line.trim() {
            "1" => Ok(true),
            "0" => Ok(false),
            other => Err(Error::Data(format!(
                "{label_name}:{}: expected a label 0 or 1, got {other:?}",
                i + 1
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    if genes.len() != labels.len() {
        return Err(Error::Data(format!(
            "{text_name} has {} pairs but {label_name} has {} labels",
            genes.len(),
            labels.len()
        )));
    }
    Ok(Pairs { genes, labels })
}

/// Gene embeddings: one row per gene, `dim` wide.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneEmbeddings {
    pub genes: Vec<String>,
    pub dim: usize,
    /// `(genes, dim)`, row-major.
    pub data: Vec<f32>,
}

impl GeneEmbeddings {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Gene symbol -> row.
    pub fn index(&self) -> HashMap<&str, usize> {
        self.genes
            .iter()
            .enumerate()
            .map(|(i, g)| (g.as_str(), i))
            .collect()
    }

    /// The file `bft embed` writes: tensor `embeddings (N, D)` (f32) and the header metadata
    /// `genes`, a JSON list of the N symbols in row order. Every inconsistency is an error
    /// naming the file.
    pub fn read(path: &Path) -> Result<GeneEmbeddings> {
        let bad = |m: String| Error::Data(format!("{}: {m}", path.display()));
        let st = SafetensorsDir::open_file(path)?;
        let t = st
            .tensor("embeddings")?
            .ok_or_else(|| bad("no tensor `embeddings` (write it with bft embed)".into()))?;
        let [n, dim] = t.dims() else {
            return Err(bad(format!(
                "`embeddings` must be (genes, dim), got shape {:?}",
                t.dims()
            )));
        };
        let (n, dim) = (*n, *dim);
        let genes: Vec<String> = match st.metadata()?.get("genes") {
            Some(text) => serde_json::from_str(text).map_err(|e| {
                bad(format!(
                    "metadata `genes` is not a JSON list of symbols: {e}"
                ))
            })?,
            None => return Err(bad("no `genes` metadata: which row is which gene?".into())),
        };
        if genes.len() != n {
            return Err(bad(format!(
                "{} gene symbols for {n} embedding rows",
                genes.len()
            )));
        }
        if n == 0 || dim == 0 {
            return Err(bad(format!("empty embeddings ({n} x {dim})")));
        }
        let mut seen = HashMap::new();
        for (i, g) in genes.iter().enumerate() {
            if let Some(j) = seen.insert(g.as_str(), i) {
                return Err(bad(format!("gene {g} appears twice (rows {j} and {i})")));
            }
        }
        let data = t.to_dtype(bft_engine::DType::F32)?.to_vec::<f32>()?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "gene {} has a non-finite value {}",
                genes[i / dim],
                data[i]
            )));
        }
        Ok(GeneEmbeddings { genes, dim, data })
    }

    /// Writes the file `read` reads, atomically; `extra` metadata (how the rows were made) is
    /// kept beside `genes`.
    pub fn write(&self, path: &Path, extra: &[(&str, String)]) -> Result<()> {
        let t = Tensor::from_vec(
            self.data.clone(),
            [self.genes.len(), self.dim],
            &bft_engine::Device::Cpu,
        )?;
        let mut meta: HashMap<String, String> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        meta.insert(
            "genes".into(),
            serde_json::to_string(&self.genes).map_err(|e| Error::Data(e.to_string()))?,
        );
        bft_model::weights::write_safetensors_with_metadata(
            path,
            &[("embeddings".to_string(), &t)],
            Some(meta),
        )?;
        Ok(())
    }
}

/// How a GGI run went: coverage of each split and the test ROC AUC.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GgiScore {
    pub train_pairs: usize,
    pub train_covered: usize,
    pub test_pairs: usize,
    pub test_covered: usize,
    pub test_positive: usize,
    pub auc: f64,
    /// Hanley–McNeil standard error of `auc` for these class sizes: how far apart two AUCs
    /// on the same few hundred pairs must be before the difference means anything.
    pub auc_se: f64,
}

/// The L2 weight of the logistic regression: loss `sum log-loss + alpha / 2 |w|^2`, i.e.
/// scikit-learn's default `C = 1 / alpha = 1` (GenePT fits with scikit-learn's defaults).
pub const ALPHA: f64 = 1.0;

/// Covered pairs as features `(pairs, 2 * dim)` (the two embeddings side by side) and labels.
fn features(emb: &GeneEmbeddings, pairs: &Pairs) -> (Array2<f64>, Vec<bool>, usize) {
    let index = emb.index();
    let covered: Vec<(usize, usize, bool)> = pairs
        .genes
        .iter()
        .zip(&pairs.labels)
        .filter_map(|([a, b], &y)| Some((*index.get(a.as_str())?, *index.get(b.as_str())?, y)))
        .collect();
    let d = emb.dim;
    let mut x = Array2::<f64>::zeros((covered.len(), 2 * d));
    for (r, &(a, b, _)) in covered.iter().enumerate() {
        let mut row = x.row_mut(r);
        for (j, v) in emb.row(a).iter().chain(emb.row(b)).enumerate() {
            row[j] = *v as f64;
        }
    }
    let y = covered.iter().map(|c| c.2).collect();
    (x, y, pairs.genes.len())
}

/// Fits on `train` and scores `test`. `shuffle_seed` permutes the training labels first (the
/// shuffled-label sanity row: its AUC should be near 0.5).
pub fn evaluate(
    emb: &GeneEmbeddings,
    train: &Pairs,
    test: &Pairs,
    shuffle_seed: Option<u64>,
) -> Result<GgiScore> {
    let (xtr, mut ytr, train_pairs) = features(emb, train);
    let (xte, yte, test_pairs) = features(emb, test);
    let need = |what: &str, y: &[bool]| {
        if y.iter().all(|&v| v) || y.iter().all(|&v| !v) {
            return Err(Error::Data(format!(
                "{} covered {what} pairs: both classes are needed (do the embeddings cover the \
                 benchmark's genes?)",
                y.len()
            )));
        }
        Ok(())
    };
    need("training", &ytr)?;
    need("test", &yte)?;
    if let Some(seed) = shuffle_seed {
        ytr.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    }
    let data = Dataset::new(xtr, Array1::from(ytr));
    let model = linfa_logistic::LogisticRegression::default()
        .alpha(ALPHA)
        .max_iterations(200)
        .fit(&data)
        .map_err(|e| Error::Data(format!("logistic regression: {e}")))?;
    let p = model.predict_probabilities(&xte);
    // linfa's probability is of the class it took as positive: whichever label it saw first.
    let positive_is_true = model.labels().pos.class;
    let scores: Vec<f64> = p
        .iter()
        .map(|&v| if positive_is_true { v } else { 1.0 - v })
        .collect();
    let auc = roc_auc(&scores, &yte);
    let pos = yte.iter().filter(|&&v| v).count();
    Ok(GgiScore {
        train_pairs,
        train_covered: data.nsamples(),
        test_pairs,
        test_covered: yte.len(),
        test_positive: pos,
        auc,
        auc_se: auc_standard_error(auc, pos, yte.len() - pos),
    })
}

/// Hanley & McNeil (1982): the standard error of an AUC from `pos` positives and `neg`
/// negatives.
pub fn auc_standard_error(auc: f64, pos: usize, neg: usize) -> f64 {
    let (n1, n2) = (pos as f64, neg as f64);
    let q1 = auc / (2.0 - auc);
    let q2 = 2.0 * auc * auc / (1.0 + auc);
    let var = (auc * (1.0 - auc) + (n1 - 1.0) * (q1 - auc * auc) + (n2 - 1.0) * (q2 - auc * auc))
        / (n1 * n2);
    var.max(0.0).sqrt()
}

/// ROC AUC as the Mann–Whitney statistic: the probability that a random positive scores above
/// a random negative, ties counting one half (average ranks). NaN without both classes.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their average.
        let avg = (i + j + 2) as f64 / 2.0;
        rank_sum_pos += avg * order[i..=j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&v| v).count() as f64;
    let neg = labels.len() as f64 - pos;
    (rank_sum_pos - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// Random unit vectors for the same genes (the random-embedding sanity row).
pub fn random_like(emb: &GeneEmbeddings, seed: u64) -> Result<GeneEmbeddings> {
    let t = Tensor::randn(
        [emb.genes.len(), emb.dim],
        1.0,
        seed,
        bft_engine::DType::F32,
        &bft_engine::Device::Cpu,
    )?;
    let mut data = t.to_vec::<f32>()?;
    for row in data.chunks_mut(emb.dim) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= n);
    }
    Ok(GeneEmbeddings {
        genes: emb.genes.clone(),
        dim: emb.dim,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_splits_have_the_documented_sizes() {
        let (train, valid, test) = (
            builtin(Split::Train),
            builtin(Split::Valid),
            builtin(Split::Test),
        );
        assert_eq!(train.genes.len(), 263_016);
        assert_eq!(train.labels.iter().filter(|&&v| v).count(), 130_455);
        assert_eq!(valid.genes.len(), 5_568);
        assert_eq!(
            (test.genes.len(), test.labels.iter().filter(|&&v| v).count()),
            (21_448, 10_848)
        );
    }

    #[test]
    fn auc_is_the_mann_whitney_statistic() {
        // Perfect, reversed, and with ties: positives {0.8, 0.4}, negatives {0.4, 0.1}:
        // pairs (0.8>0.4) (0.8>0.1) (0.4=0.4: 1/2) (0.4>0.1) -> 3.5 / 4.
        assert_eq!(roc_auc(&[0.1, 0.9], &[false, true]), 1.0);
        assert_eq!(roc_auc(&[0.9, 0.1], &[false, true]), 0.0);
        assert_eq!(
            roc_auc(&[0.8, 0.4, 0.4, 0.1], &[true, true, false, false]),
            0.875
        );
        assert!(roc_auc(&[0.3, 0.5], &[true, true]).is_nan());
        // The formula's value for AUC 0.8 and 50 + 50, worked by hand; four times the pairs
        // halve it (to first order).
        let se = auc_standard_error(0.8, 50, 50);
        assert!((se - 0.044_502).abs() < 1e-6, "{se}");
        let ratio = se / auc_standard_error(0.8, 200, 200);
        assert!((ratio - 2.0).abs() < 0.05, "{ratio}");
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let err = parse_pairs("A B\nC\n", "1\n0\n", "t.txt", "l.txt").unwrap_err();
        assert!(err.to_string().contains("t.txt:2"), "{err}");
        let err = parse_pairs("A B\nC D\n", "1\nyes\n", "t.txt", "l.txt").unwrap_err();
        assert!(err.to_string().contains("l.txt:2"), "{err}");
        let err = parse_pairs("A B\nC D\n", "1\n", "t.txt", "l.txt").unwrap_err();
        assert!(err.to_string().contains("2 pairs but l.txt has 1"), "{err}");
    }

    /// Embeddings whose first coordinate is +1 for the genes of group A and -1 otherwise; a pair
    /// is positive when both genes are in A, which a linear model on the concatenation ranks
    /// almost perfectly. Random embeddings score far lower; shuffled labels near chance.
    #[test]
    fn separable_embeddings_score_high_and_sanity_rows_low() {
        let n = 60;
        let genes: Vec<String> = (0..n).map(|i| format!("G{i}")).collect();
        let dim = 4;
        let mut data = vec![0f32; n * dim];
        for i in 0..n {
            data[i * dim] = if i < n / 2 { 1.0 } else { -1.0 };
            data[i * dim + 1 + i % 3] = 0.5;
        }
        let emb = GeneEmbeddings {
            genes: genes.clone(),
            dim,
            data,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut pairs = |count: usize| {
            let mut p = Pairs {
                genes: Vec::new(),
                labels: Vec::new(),
            };
            for _ in 0..count {
                let (a, b) = (
                    rand::Rng::random_range(&mut rng, 0..n),
                    rand::Rng::random_range(&mut rng, 0..n),
                );
                p.genes.push([genes[a].clone(), genes[b].clone()]);
                p.labels.push(a < n / 2 && b < n / 2);
            }
            p
        };
        let (train, test) = (pairs(2000), pairs(600));
        let real = evaluate(&emb, &train, &test, None).unwrap();
        assert!(real.auc > 0.97, "{real:?}");
        assert_eq!((real.train_covered, real.test_covered), (2000, 600));
        let random = evaluate(&random_like(&emb, 1).unwrap(), &train, &test, None).unwrap();
        // Random vectors still tell genes apart, so a little signal about which genes pair
        // remains; far less than the real structure.
        assert!(random.auc < real.auc - 0.25, "{random:?}");
        let shuffled = evaluate(&emb, &train, &test, Some(7)).unwrap();
        assert!((shuffled.auc - 0.5).abs() < 0.1, "{shuffled:?}");
    }

    #[test]
    fn embeddings_round_trip_and_bad_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let path = dir.join("e.safetensors");
        let emb = GeneEmbeddings {
            genes: vec!["TP53".into(), "BRCA1".into()],
            dim: 3,
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        emb.write(&path, &[("encoder", "minilm".into())]).unwrap();
        assert_eq!(GeneEmbeddings::read(&path).unwrap(), emb);
        let wrong = GeneEmbeddings {
            genes: vec!["TP53".into()],
            ..emb.clone()
        };
        // One symbol for two rows: the writer does not check, the reader must.
        let t = Tensor::from_vec(wrong.data.clone(), [2, 3], &bft_engine::Device::Cpu).unwrap();
        let meta = HashMap::from([("genes".to_string(), "[\"TP53\"]".to_string())]);
        bft_model::weights::write_safetensors_with_metadata(
            &path,
            &[("embeddings".into(), &t)],
            Some(meta),
        )
        .unwrap();
        let err = GeneEmbeddings::read(&path).unwrap_err().to_string();
        assert!(
            err.contains("e.safetensors") && err.contains("1 gene symbols for 2"),
            "{err}"
        );
    }
}
