//! bft-trainer: the loss library (SFT, DFT, BFT and research variants through one fused,
//! memory-bounded LM-head loss) and, as the `bft` binary, the trainer.

pub mod analysis;
pub mod batch;
pub mod config_file;
pub mod data;
pub mod embed;
pub mod eval;
pub mod genes;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod report;
pub mod run;
pub mod sweep;
pub mod train;
