//! Evaluation: ROUGE as Google's rouge-score computes it, the GeneAgent gene-set process-naming
//! benchmark and PubMedQA.

pub mod porter;
pub mod rouge;
