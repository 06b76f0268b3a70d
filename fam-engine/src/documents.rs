//! The documents a run writes besides the renderers' files, as types shared by the writers
//! (the run and the tasks), `fam-cli merge` and the tests: `manifest.json`,
//! `retrieval.json`, `episode.json` and `predictions.json` (`scores.json`, the `scores`
//! renderer's, is [`fam_core::records::ScoresDocument`]). Every document is written with
//! [`fam_core::records::document_bytes`]: pretty JSON with sorted keys.

use std::collections::BTreeMap;

use fam_core::explain::{Contrast, RunInfo, Transform};
use fam_core::records::ReportRow;
use fam_core::traits::InputSpec;

use crate::output::WrittenFile;
use crate::pipeline::ClassifyMethod;
use crate::report::{Counts, Failure, PartialImage, Timings};

/// `manifest.json`: what a run did, every file it wrote, every failure.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub fam_version: String,
    /// The pipeline file the run was started with.
    pub pipeline: String,
    /// `K/N` for a part of a sharded run (`--shard`), else null.
    pub shard: Option<String>,
    /// The shard folders a merged output was made from (`fam-cli merge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_from: Option<Vec<String>>,
    pub info: RunInfo,
    pub device: String,
    pub input: InputSpec,
    pub items: Items,
    pub counts: Counts,
    /// Every comparison of the run: id, labels, score, group and rank (what a summarising
    /// renderer such as `html` shows; `fam-cli merge` gives it every shard's).
    pub comparisons: Vec<ReportRow>,
    pub files: Vec<WrittenFile>,
    pub failures: Vec<Failure>,
    /// Images explained although they decoded only in part (`run.decoding = "lenient"`);
    /// absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partial_images: Vec<PartialImage>,
    pub timings_ms: Timings,
}

/// Item counts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Items {
    pub total: usize,
    pub ok: usize,
    pub failed: usize,
}

/// `retrieval.json`: the ranking of every query.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RetrievalDocument {
    pub top_k: usize,
    pub gallery_size: usize,
    /// Gallery images that could be read and embedded.
    pub gallery_embedded: usize,
    pub queries: Vec<QueryRanking>,
}

/// One query's hits, best first.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueryRanking {
    pub query: String,
    pub hits: Vec<Hit>,
}

/// One hit of a query.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hit {
    /// From 1.
    pub rank: usize,
    pub image: String,
    pub score: f32,
    pub distance: Option<f32>,
}

/// `episode.json`: the prediction of every query of a few-shot episode.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpisodeDocument {
    pub classes: Vec<String>,
    /// Support images per class.
    pub shots: BTreeMap<String, usize>,
    pub transform: Transform,
    pub contrast: Contrast,
    /// Over the labelled queries; null without labels.
    pub accuracy: Option<f64>,
    pub predictions: Vec<Prediction>,
}

/// `predictions.json`: the prediction of every query of a `classify` task.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PredictionsDocument {
    pub method: ClassifyMethod,
    pub k: usize,
    pub classes: Vec<String>,
    pub transform: Transform,
    pub accuracy: Option<f64>,
    pub predictions: Vec<Prediction>,
}

/// One query's prediction, with its per-class numbers: `scores` (similarity to each
/// prototype, few-shot) or `votes` (classify).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Prediction {
    pub query: String,
    pub label: Option<String>,
    pub predicted: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<BTreeMap<String, f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub votes: Option<BTreeMap<String, f32>>,
}

/// The accuracy of `predictions` over the labelled ones; `None` without labels.
pub fn accuracy(predictions: &[Prediction]) -> Option<f64> {
    let labelled: Vec<&Prediction> = predictions.iter().filter(|p| p.label.is_some()).collect();
    let correct = labelled
        .iter()
        .filter(|p| p.label.as_deref() == Some(p.predicted.as_str()))
        .count();
    (!labelled.is_empty()).then(|| correct as f64 / labelled.len() as f64)
}
