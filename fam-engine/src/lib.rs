//! # fam-engine
//!
//! The fam application, built on the plugin API in `fam-core`: what `fam-cli` runs.
//!
//! - [`pipeline`]: the TOML pipeline schema and its validation;
//! - [`loader`]: finding, checking (ABI fingerprint) and loading plugin libraries;
//! - [`preprocess`]: image decoding and torchvision-compatible preprocessing;
//! - [`session`]: the plugins' objects for one run; [`embed`]: the forward passes;
//!   [`maps`]: FAM maps in batches; [`tasks`]: the tasks, behind one trait;
//! - [`run`]: running a pipeline (it orchestrates: embed, task, maps, render); [`report`]:
//!   what a run reports;
//! - [`cache`]: the feature cache and checkpoints of `--resume`; [`index`]: the gallery
//!   index (`fam-cli index`) and the exact streaming top-k search every retrieval uses;
//! - [`eval`], [`bench`], [`merge`]: `fam-cli eval`, `bench` and `merge`;
//! - [`output`]: the output folder (atomic writes); [`documents`]: the typed JSON documents
//!   (manifest, retrieval, episode, predictions); [`device`]: device names.

pub mod baselines;
pub mod bench;
pub mod cache;
pub mod device;
pub mod documents;
pub mod embed;
pub mod eval;
pub mod index;
pub mod loader;
pub mod locations;
pub mod maps;
pub mod merge;
pub mod output;
pub mod pipeline;
pub mod preprocess;
pub mod report;
pub mod run;
pub mod scorer;
pub mod session;
pub mod tasks;

pub use fam_core::{FamError, Problem, Result};
pub use loader::PluginHost;
