//! Subcommands of the `bft` binary that live in their own files.

pub mod analyze;
pub mod demo;
pub mod eval;
pub mod plot;
pub mod progress;
pub mod train;
