//! # fam-core
//!
//! The plugin API of fam, the Feature Activation Map framework for explaining
//! similarity-based CNN embedding models (few-shot, contrastive, retrieval). Every plugin
//! links this crate, and only this crate of fam's:
//!
//! - [`traits`]: the [`Backbone`], [`Similarity`] and [`Renderer`] extension points;
//! - [`decompose`]: the similarity of two images split over pairs of feature-map locations;
//! - [`explain`]: the FAM algorithm (channel contributions → weights → maps) and the
//!   explanation records renderers receive; [`records`]: the other records they receive;
//! - [`plugin`]: the declaration, the registrar and the panic guards;
//! - [`abi`]: the fingerprint the host checks before it calls into a library;
//! - [`host`]: what the host shares with plugins (interrupt flag, thread count, logging);
//! - [`output`]: the [`output::OutputSink`] renderers write through;
//! - [`error`]: the one error type.
//!
//! fam-core knows no concrete model and runs nothing: the application (pipelines, loading,
//! the run, tasks) is `fam-engine`; models, metrics and renderers live in plugins.

pub mod abi;
pub mod decompose;
pub mod error;
pub mod explain;
pub mod host;
pub mod options;
pub mod output;
pub mod plugin;
pub mod records;
pub mod traits;

pub use candle_core as candle;
pub use error::{FamError, Problem, Result};
pub use explain::{Explanation, Weighting};
pub use traits::{
    Backbone, Features, InnerProductForm, InputSpec, LayerInfo, Renderer, ResizePolicy, Similarity,
};
pub use {image, serde_json, toml, tracing};
