//! The records that cross the plugin boundary: the [`Explanation`] renderers receive (images,
//! comparisons, maps), what `fam-cli eval` measured, and the data of the report page.
//! Plain data: the FAM math that fills them is [`crate::explain`].

use std::path::PathBuf;

use candle_core::Tensor;

use crate::error::{FamError, Result};

/// Embedding transforms used by strong few-shot baselines (SimpleShot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    #[default]
    None,
    L2n,
    Cl2n,
}

impl Transform {
    /// Applies the transform to an embedding; `center` is the mean for CL2N.
    pub fn apply(self, e: &[f32], center: &[f32]) -> Vec<f32> {
        let v: Vec<f32> = match self {
            Transform::Cl2n => e.iter().zip(center).map(|(a, m)| a - m).collect(),
            _ => e.to_vec(),
        };
        if self == Transform::None {
            return v;
        }
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n > 0.0 {
            v.iter().map(|x| x / n).collect()
        } else {
            v
        }
    }
}

/// What a map explains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Contrast {
    /// The similarity to the reference.
    #[default]
    None,
    /// The reference's margin over the mean of the competing references.
    Others,
}

/// A 2-D map in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Map2 {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Map2 {
    pub fn new(height: usize, width: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != height * width {
            return Err(FamError::invalid(format!(
                "map of {height}x{width} needs {} values, got {}",
                height * width,
                data.len()
            )));
        }
        Ok(Self {
            height,
            width,
            data,
        })
    }

    /// Splits a `[P, h, w]` tensor into `P` maps (one device-to-host copy).
    pub fn from_batch(t: &Tensor) -> Result<Vec<Map2>> {
        let (p, h, w) = t.dims3()?;
        let flat: Vec<f32> = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        Ok((0..p)
            .map(|i| Map2 {
                height: h,
                width: w,
                data: flat[i * h * w..(i + 1) * h * w].to_vec(),
            })
            .collect())
    }

    pub fn max(&self) -> f32 {
        self.data.iter().copied().fold(f32::MIN, f32::max)
    }

    /// Min-max normalized copy in [0, 1]; a constant map becomes all zeros.
    pub fn normalized(&self) -> Vec<f32> {
        min_max(&self.data)
    }
}

/// `(x - min) / (max - min)`; a constant input (an all-zero map included) gives zeros.
pub fn min_max(values: &[f32]) -> Vec<f32> {
    let (lo, hi) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let span = hi - lo;
    if span.is_nan() || span <= 0.0 || span.is_infinite() {
        return vec![0.0; values.len()];
    }
    values.iter().map(|v| (v - lo) / span).collect()
}

/// A FAM map at feature resolution and at the model's input resolution.
#[derive(Debug, Clone)]
pub struct SaliencyMap {
    pub raw: Map2,
    pub upsampled: Map2,
}

/// An 8-bit RGB image in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb8 {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// One decoded input image as the model saw it (after resize and crop).
#[derive(Debug, Clone)]
pub struct ImageRecord {
    /// A short, file-name-safe id derived from the file name, unique within the run.
    pub id: String,
    pub source: PathBuf,
    pub view: Rgb8,
}

/// One side of a comparison: an image (with its map) or an abstract reference such as a
/// class prototype.
#[derive(Debug, Clone)]
pub struct Side {
    pub label: String,
    /// Index into [`Explanation::images`].
    pub image: Option<usize>,
    /// This side's map with respect to the other side.
    pub map: Option<SaliencyMap>,
    /// Beside a plain `map`, the contrast map: where this match rests more than the image's
    /// matches with the competing references do (its plain map before the ReLU as a share of
    /// its total, minus the mean share of the others; docs/architecture.md). Retrieval gives
    /// it to a query against each hit (the competitors: the query's other hits), few-shot
    /// to a query against each class (the other classes), where `[explain] contrast_maps`
    /// is on (the default).
    pub contrast: Option<ContrastMap>,
    /// The score this side's map explains, as a function of its image's embedding (used by
    /// `fam-cli eval` to re-score modified images).
    pub target: Option<Target>,
}

/// A contrast map and what it contrasts against.
#[derive(Debug, Clone)]
pub struct ContrastMap {
    pub map: SaliencyMap,
    /// The competing references, for captions: `the other 4 hits`, `the other classes`.
    pub against: String,
}

/// The score a map explains, as a function of the explained image's raw embedding `z`:
/// `f(z) = s(T(z), r) − mean_j s(T(z), r_j)` with `T` the task's embedding transform, `r`
/// the reference and `r_j` the competing references (`contrast = "others"`; none otherwise).
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub reference: Vec<f32>,
    pub others: Vec<Vec<f32>>,
    pub transform: Transform,
    /// The CL2N centre (empty otherwise).
    pub center: Vec<f32>,
}

impl Target {
    /// The plain similarity to `reference`, without a transform.
    pub fn new(reference: &[f32]) -> Self {
        Self {
            reference: reference.to_vec(),
            ..Default::default()
        }
    }
}

impl Side {
    /// An image of the run (index into [`Explanation::images`]); its map comes later.
    pub fn image(label: impl Into<String>, index: usize) -> Self {
        Self {
            label: label.into(),
            image: Some(index),
            map: None,
            contrast: None,
            target: None,
        }
    }

    /// The same side with the score its map explains.
    pub fn with_target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    /// A reference that is not an image: a prototype, a centroid.
    pub fn reference(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            image: None,
            map: None,
            contrast: None,
            target: None,
        }
    }
}

/// One scored, explained comparison between a query and a reference.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub id: String,
    pub query: Side,
    pub reference: Side,
    pub score: f32,
    pub distance: Option<f32>,
    /// Comparisons that belong together (a retrieval query and its hits) share a group.
    pub group: Option<String>,
    /// Position in the group's ranking, from 1.
    pub rank: Option<usize>,
    /// Which location of the query matches which location of the reference, where both
    /// sides are images and the metric splits over pairs of locations.
    pub correspondence: Option<Correspondence>,
}

/// The score of a comparison split exactly over pairs of feature-map locations
/// ([`crate::decompose::pairs`]): `pairs[i * n_r + j]` is the share of query location `i`
/// (row-major over `query_size`) with reference location `j`; all shares add up to the score.
/// A correspondence too large to keep whole keeps each location's largest shares instead
/// (`top`; `pairs` is then empty).
#[derive(Debug, Clone, PartialEq)]
pub struct Correspondence {
    /// `(height, width)` of the query's feature map.
    pub query_size: (usize, usize),
    /// `(height, width)` of the reference's feature map.
    pub reference_size: (usize, usize),
    pub pairs: Vec<f32>,
    pub top: Option<TopCorrespondence>,
}

/// Each location's `k` largest shares of a correspondence, for both images.
#[derive(Debug, Clone, PartialEq)]
pub struct TopCorrespondence {
    pub k: usize,
    /// Per query location: its `k` largest shares with reference locations.
    pub query: TopShares,
    /// Per reference location: its `k` largest shares with query locations.
    pub reference: TopShares,
}

/// `k` shares per location, largest first: `index[i * k + t]` is the other image's location
/// (row-major) of location `i`'s `t`-th largest share `share[i * k + t]`; `total[i]` is the
/// location's whole share (its row or column sum, over every pair, not only the kept ones).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TopShares {
    pub index: Vec<u32>,
    pub share: Vec<f32>,
    pub total: Vec<f32>,
}

impl Correspondence {
    /// The shares of query location `i` with every reference location (row `i`; with only
    /// the top shares kept, 0 for the others).
    pub fn of_query(&self, i: usize) -> Vec<f32> {
        let n = self.reference_size.0 * self.reference_size.1;
        match &self.top {
            Some(t) => t.query.dense(i, t.k, n),
            None => self.pairs[i * n..(i + 1) * n].to_vec(),
        }
    }

    /// The shares of every query location with reference location `j` (column `j`; with
    /// only the top shares kept, 0 for the others).
    pub fn of_reference(&self, j: usize) -> Vec<f32> {
        let n = self.reference_size.0 * self.reference_size.1;
        match &self.top {
            Some(t) => t
                .reference
                .dense(j, t.k, self.query_size.0 * self.query_size.1),
            None => self
                .pairs
                .iter()
                .skip(j)
                .step_by(n.max(1))
                .copied()
                .collect(),
        }
    }
}

impl TopShares {
    /// Location `i`'s kept shares over the `n` locations of the other image, 0 elsewhere.
    fn dense(&self, i: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        for t in i * k..(i + 1) * k {
            if let (Some(&j), Some(&v)) = (self.index.get(t), self.share.get(t)) {
                if let Some(o) = out.get_mut(j as usize) {
                    *o = v;
                }
            }
        }
        out
    }
}

/// Facts about the run that renderers print beside the maps.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    pub task: String,
    pub backbone: String,
    pub similarity: String,
    pub weighting: String,
    /// How inputs were prepared, e.g. `resize 256, center crop 224`.
    pub preprocessing: String,
}

/// Everything a renderer needs.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub info: RunInfo,
    pub images: Vec<ImageRecord>,
    pub comparisons: Vec<Comparison>,
}

/// A mean over items with its 95% bootstrap interval (NaN where no item is defined, which
/// JSON writes as `null` and reads back as NaN).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Estimate {
    #[serde(deserialize_with = "nan_if_null")]
    pub mean: f32,
    /// The 2.5th and 97.5th percentiles of the mean over bootstrap resamples of the items.
    #[serde(deserialize_with = "nan_if_null")]
    pub lo: f32,
    #[serde(deserialize_with = "nan_if_null")]
    pub hi: f32,
    /// Items the mean is taken over.
    pub n: usize,
    /// Items for which the value is undefined, left out of the mean and counted here.
    pub undefined: usize,
}

/// An `f32` that JSON may hold as `null` (serde_json writes NaN so): NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f32, D::Error> {
    use serde::Deserialize;
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

impl Estimate {
    /// `a` is better than `b` beyond doubt when their intervals do not overlap.
    pub fn separated(&self, other: &Estimate) -> bool {
        self.n > 0 && other.n > 0 && (self.lo > other.hi || other.lo > self.hi)
    }
}

/// A mean curve over items (one value per step) with its pointwise 95% bootstrap band: at
/// each step, the 2.5th and 97.5th percentiles of the mean over resamples of the items (the
/// same resampled items for every step).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CurveEstimate {
    pub mean: Vec<f32>,
    pub lo: Vec<f32>,
    pub hi: Vec<f32>,
    /// Items the curve is the mean of.
    pub n: usize,
}

/// The faithfulness of one method: each metric's mean over the items, with its interval.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MethodSummary {
    pub method: String,
    pub items: usize,
    /// Items with a non-positive score, left out of Average Drop and the `s_k / s` curves.
    pub skipped: usize,
    pub average_drop: Estimate,
    pub increase_in_confidence: Estimate,
    pub deletion_auc: Estimate,
    pub insertion_auc: Estimate,
    /// With each curve rescaled between the removed (0) and unmodified (1) image; undefined
    /// where removing every pixel takes less than the eval's `min_range` of the score.
    pub deletion_auc_range: Estimate,
    pub insertion_auc_range: Estimate,
    /// The mean `s_k / s` curves over the items with `s > 0`, step by step.
    pub deletion_curve: CurveEstimate,
    pub insertion_curve: CurveEstimate,
    /// The mean rescaled curves, over the items whose rescaled areas are defined.
    pub deletion_curve_range: CurveEstimate,
    pub insertion_curve_range: CurveEstimate,
    /// Forward passes per map beyond the task's own (occlusion's patches, for example).
    pub passes_per_map: usize,
}

/// What `fam-cli eval` measured (`eval.json`; read back by `fam-cli eval --replot`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EvalReport {
    pub pipeline: String,
    pub backbone: String,
    pub similarity: String,
    /// What the scores are: `similarity`, or `margin over the other classes`.
    pub target: String,
    pub steps: usize,
    /// What a removed pixel becomes in deletion and insertion: `blur` or `mean`.
    pub removal: String,
    /// Bootstrap resamples behind each interval.
    pub resamples: usize,
    pub summaries: Vec<MethodSummary>,
    /// Per item and method.
    pub items: Vec<serde_json::Value>,
    /// The first few items with every method's map, for renderers to draw (not in
    /// eval.json).
    #[serde(skip)]
    pub examples: Vec<EvalExample>,
}

/// One evaluated image with the map of each method (in [0, 1], at the image's size).
#[derive(Debug, Clone)]
pub struct EvalExample {
    /// `image vs reference`.
    pub label: String,
    pub view: Rgb8,
    /// `(method, map)` in table order; methods without a map for this item are absent.
    pub maps: Vec<(String, Vec<f32>)>,
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
            comparisons: e.comparisons.iter().map(ReportRow::of).collect(),
        }
    }
}

/// `scores.json`, written by the `scores` renderer and merged by `fam-cli merge`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScoresDocument {
    pub info: RunInfo,
    pub comparisons: Vec<ScoredComparison>,
}

/// One comparison of `scores.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScoredComparison {
    pub id: String,
    pub query: ScoredSide,
    pub reference: ScoredSide,
    pub score: f32,
    pub distance: Option<f32>,
}

/// One side of a comparison in `scores.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScoredSide {
    pub label: String,
    /// The image file, where the side is an image.
    pub image: Option<String>,
    /// The largest value of the side's raw map, where it has one.
    pub map_peak: Option<f32>,
}

/// The bytes of an output document: pretty JSON with the keys of every object in sorted
/// order, whatever the order of the struct's fields (fam's documents have always been
/// written so), and `f32` values written as the `f64` they widen to.
pub fn document_bytes<T: serde::Serialize>(doc: &T) -> Result<Vec<u8>> {
    let value = serde_json::to_value(doc).map_err(|e| FamError::invalid(e.to_string()))?;
    serde_json::to_vec_pretty(&value).map_err(|e| FamError::invalid(e.to_string()))
}

impl ReportRow {
    /// The comparison a row describes, without images or maps: what a renderer that
    /// summarises a run ([`crate::Renderer::runs_last`]) receives from `fam-cli merge`.
    pub fn to_comparison(&self) -> Comparison {
        Comparison {
            id: self.id.clone(),
            query: Side::reference(self.query.clone()),
            reference: Side::reference(self.reference.clone()),
            score: self.score,
            distance: self.distance,
            group: self.group.clone(),
            rank: self.rank,
            correspondence: None,
        }
    }

    /// The row of a comparison.
    pub fn of(c: &Comparison) -> Self {
        Self {
            id: c.id.clone(),
            query: c.query.label.clone(),
            reference: c.reference.label.clone(),
            score: c.score,
            distance: c.distance,
            group: c.group.clone(),
            rank: c.rank,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_undefined_estimate_survives_json() {
        let e = Estimate {
            mean: f32::NAN,
            lo: f32::NAN,
            hi: f32::NAN,
            n: 0,
            undefined: 7,
        };
        let text = serde_json::to_string(&e).unwrap();
        assert!(text.contains("\"mean\":null"), "{text}");
        let back: Estimate = serde_json::from_str(&text).unwrap();
        assert!(back.mean.is_nan() && back.lo.is_nan() && back.hi.is_nan());
        assert_eq!((back.n, back.undefined), (0, 7));
        let d = Estimate {
            mean: 0.5,
            lo: 0.25,
            hi: 0.75,
            n: 3,
            undefined: 0,
        };
        let text = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Estimate>(&text).unwrap(), d);
    }
}
