//! The subcommands of the `bft` binary, one file each (plus the plot and progress helpers they
//! share).

pub mod analyze;
pub mod convert;
pub mod demo;
pub mod embed;
pub mod eval;
pub mod generate;
pub mod info;
pub mod merge;
pub mod plot;
pub mod progress;
pub mod score;
pub mod sweep;
pub mod train;
