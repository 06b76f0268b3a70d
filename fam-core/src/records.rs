//! The records renderers receive besides [`Explanation`](crate::explain::Explanation): what
//! `fam-cli eval` measured, and the data of the report page.

use crate::explain::{Explanation, RunInfo};

/// The mean faithfulness of one method.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MethodSummary {
    pub method: String,
    pub items: usize,
    /// Items with a non-positive score, left out of Average Drop and the `s_k / s` curves.
    pub skipped: usize,
    pub average_drop: f32,
    pub increase_in_confidence: f32,
    pub deletion_auc: f32,
    pub insertion_auc: f32,
    /// With each curve rescaled between the blurred (0) and unmodified (1) image.
    pub deletion_auc_range: f32,
    pub insertion_auc_range: f32,
    pub mean_deletion: Vec<f32>,
    pub mean_insertion: Vec<f32>,
}

/// What `fam-cli eval` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub pipeline: String,
    pub backbone: String,
    pub similarity: String,
    /// What the scores are: `similarity`, or `margin over the other classes`.
    pub target: String,
    pub steps: usize,
    pub summaries: Vec<MethodSummary>,
    /// Per item and method.
    pub items: Vec<serde_json::Value>,
}

/// What the page shows, embedded in it as JSON (`<script id="fam-report-data">`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReportData {
    pub title: String,
    pub info: RunInfo,
    pub comparisons: Vec<ReportRow>,
}

/// One comparison on the page.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReportRow {
    pub id: String,
    pub query: String,
    pub reference: String,
    pub score: f32,
    pub distance: Option<f32>,
    pub group: Option<String>,
    pub rank: Option<usize>,
}

impl ReportData {
    /// The data of an explanation; the title defaults to the task and backbone.
    pub fn new(title: Option<&str>, e: &Explanation) -> Self {
        Self {
            title: title
                .map(String::from)
                .unwrap_or_else(|| format!("fam: {} with {}", e.info.task, e.info.backbone)),
            info: e.info.clone(),
            comparisons: e
                .comparisons
                .iter()
                .map(|c| ReportRow {
                    id: c.id.clone(),
                    query: c.query.label.clone(),
                    reference: c.reference.label.clone(),
                    score: c.score,
                    distance: c.distance,
                    group: c.group.clone(),
                    rank: c.rank,
                })
                .collect(),
        }
    }
}
