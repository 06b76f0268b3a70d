//! # fam-core
//!
//! The model-agnostic heart of fam, the Feature Activation Map framework for explaining
//! similarity-based CNN embedding models (few-shot, contrastive, retrieval):
//!
//! - [`traits`]: the [`Backbone`], [`Similarity`] and [`Renderer`] extension points;
//! - [`explain`]: the FAM algorithm (channel contributions → weights → maps);
//! - [`pipeline`]: the TOML pipeline schema and its validation;
//! - [`plugin`]: the plugin declaration, registrar, panic guards and dynamic loader;
//! - [`preprocess`]: image decoding and torchvision-compatible preprocessing;
//! - [`weights`] and [`pickle`]: safetensors and PyTorch checkpoints (zip and legacy);
//! - [`run`]: running a pipeline end to end; [`output`]: atomic outputs and the manifest.
//!
//! fam-core knows no concrete model: models, metrics and renderers live in plugins.

pub mod bench;
pub mod cache;
pub mod device;
pub mod error;
pub mod eval;
pub mod explain;
pub mod fewshot;
pub mod merge;
pub mod output;
pub mod pickle;
pub mod pipeline;
pub mod plugin;
pub mod preprocess;
pub mod report;
pub mod retrieval;
pub mod run;
pub mod traits;
pub mod weights;

pub use candle_core as candle;
pub use error::{FamError, Problem, Result};
pub use explain::{Explanation, Weighting};
pub use traits::{Backbone, Features, InputSpec, LayerInfo, Renderer, ResizePolicy, Similarity};
pub use {image, serde_json, toml, tracing};
