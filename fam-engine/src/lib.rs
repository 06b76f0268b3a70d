//! # fam-engine
//!
//! The fam application, built on the plugin API in `fam-core`: what `fam-cli` runs.
//!
//! - [`pipeline`]: the TOML pipeline schema and its validation;
//! - [`loader`]: finding, checking (ABI fingerprint) and loading plugin libraries;
//! - [`preprocess`]: image decoding and torchvision-compatible preprocessing;
//! - [`run`]: running a pipeline: embed, task, maps, render; [`tasks`]: the tasks;
//! - [`cache`]: the feature cache and checkpoints of `--resume`;
//! - [`eval`], [`bench`], [`merge`]: `fam-cli eval`, `bench` and `merge`;
//! - [`output`]: the output folder (atomic writes) and [`device`]: device names.

pub mod bench;
pub mod cache;
pub mod device;
pub mod eval;
pub mod loader;
pub mod merge;
pub mod output;
pub mod pipeline;
pub mod preprocess;
pub mod run;
pub mod tasks;

pub use fam_core::{FamError, Problem, Result};
pub use loader::PluginHost;
