//! Subcommands of the `bft` binary that live in their own files.

pub mod eval;
pub mod progress;
