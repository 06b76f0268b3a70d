//! The three extension points of fam: a [`Backbone`] turns images into feature maps and
//! embeddings, a [`Similarity`] scores two embeddings and splits the score into per-channel
//! contributions, and a [`Renderer`] turns finished explanations into files.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::output::OutputSink;
use crate::records::Explanation;

/// How images are resized before they reach the model (DESIGN.md section 1.4).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResizePolicy {
    /// torchvision's `Resize(resize)` (shorter side, antialiased bilinear) + `CenterCrop(crop)`.
    ResizeCrop { resize: u32, crop: u32 },
    /// Resize both sides to exactly `width`x`height` (no crop), e.g. aligned face crops.
    Exact { width: u32, height: u32 },
}

/// What a backbone expects as input. Pixel values are scaled to [0, 1], then
/// `(x - mean) / std` per channel in RGB order.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputSpec {
    pub resize: ResizePolicy,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl InputSpec {
    /// torchvision's ImageNet defaults: `Resize(256)`, `CenterCrop(224)`, ImageNet mean/std.
    pub fn imagenet() -> Self {
        Self {
            resize: ResizePolicy::ResizeCrop {
                resize: 256,
                crop: 224,
            },
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// Height and width of the tensor the model sees.
    pub fn input_size(&self) -> (u32, u32) {
        match self.resize {
            ResizePolicy::ResizeCrop { crop, .. } => (crop, crop),
            ResizePolicy::Exact { width, height } => (height, width),
        }
    }
}

/// The output of a backbone for a batch of `B` images.
#[derive(Debug, Clone)]
pub struct Features {
    /// Activations of the feature layer, `[B, C, h, w]`.
    pub maps: Tensor,
    /// Embeddings, `[B, C]`: global average pooling of `maps` for plain backbones.
    pub embeddings: Tensor,
}

impl Features {
    /// Features whose embedding is the global average pool of the maps (DESIGN.md section 1).
    pub fn from_maps(maps: Tensor) -> Result<Self> {
        let embeddings = maps.mean((2, 3))?;
        Ok(Self { maps, embeddings })
    }
}

/// A model cut at its feature layer.
pub trait Backbone: Send + Sync {
    /// A short description for logs and outputs, e.g. `mobilenet_v2@features.18`.
    fn describe(&self) -> String;
    /// Preprocessing this model was trained with.
    fn input_spec(&self) -> InputSpec;
    /// The device its weights live on; input batches are moved there.
    fn device(&self) -> Device;
    /// Runs a normalized batch `[B, 3, H, W]` (f32, on [`Backbone::device`]).
    fn forward(&self, batch: &Tensor) -> Result<Features>;

    /// The layers one can explain at, with their output shapes for one image.
    fn layers(&self) -> Result<Vec<LayerInfo>> {
        Ok(vec![])
    }

    /// For a backbone whose embedding is an affine head of the feature maps,
    /// `z = L(A) + z0` (DESIGN.md section 1.3): the pullback `Lᵀ u` of embedding-space
    /// weights `u` (`[P, D]`), as spatial weights `[P, C, h, w]`, and the offset `z0`.
    /// `None` (the default) means the embedding is the global average pool of the maps.
    fn pullback(&self, _u: &Tensor) -> Result<Option<(Tensor, Vec<f32>)>> {
        Ok(None)
    }
}

/// A layer a backbone can be explained at.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerInfo {
    pub name: String,
    /// The operator producing it (e.g. `Conv`, `PRelu`).
    pub op: String,
    /// Output shape for a batch of one, e.g. `[1, 512, 7, 7]`.
    pub shape: Vec<usize>,
}

/// A similarity between two embeddings whose score splits into per-channel contributions.
///
/// All methods take the explained embedding `e` and the reference `r` (same length).
pub trait Similarity: Send + Sync {
    /// The metric's name, e.g. `cosine`.
    fn name(&self) -> String;
    /// The similarity score `s(e, r)`; higher means more similar.
    fn score(&self, e: &[f32], r: &[f32]) -> Result<f32>;
    /// Per-channel contributions `c_k` with `sum_k c_k == score(e, r)`.
    fn contributions(&self, e: &[f32], r: &[f32]) -> Result<Vec<f32>>;
    /// The gradient `ds/de_k` (used by `weighting = "gradient"`).
    fn gradient(&self, e: &[f32], r: &[f32]) -> Result<Vec<f32>>;
    /// A distance to report beside the score, where the metric has one (Euclidean).
    fn distance(&self, _e: &[f32], _r: &[f32]) -> Result<Option<f32>> {
        Ok(None)
    }
    /// Ranking keys of `n` embeddings against `m` references from their inner products, so
    /// that a search scores a whole block of references with one matrix product instead of
    /// `n × m` calls to [`Similarity::score`].
    ///
    /// On entry `dots[i * m + j]` is `e_i · r_j` (`dots.len() == n * m`), `e_sq[i]` is
    /// `‖e_i‖²` and `r_sq[j]` is `‖r_j‖²`. On return `dots[i * m + j]` must order the
    /// references of each `i` as [`rank_key`](crate::explain::rank_key)`(score, distance)`
    /// does: higher is a better match. Keys are compared only within one `i`, so a positive
    /// factor or a term that depends on `i` alone may be dropped; a pair whose score is
    /// undefined gets a non-finite key and is never a hit. The search reports the exact
    /// [`Similarity::score`] and [`Similarity::distance`] of the hits it keeps, so keys only
    /// choose them.
    ///
    /// Returns `Ok(false)`, leaving `dots` alone, for a metric that is not a function of
    /// the inner product and the two norms (the default): the search then calls `score`
    /// and `distance` for every pair.
    fn keys_from_inner_products(
        &self,
        _dots: &mut [f32],
        _e_sq: &[f32],
        _r_sq: &[f32],
    ) -> Result<bool> {
        Ok(false)
    }
    /// The score at this pair as a function of the inner products,
    /// `s(e, r) = cross·(e·r) + self_e·‖e‖² + self_r·‖r‖² + constant`, with the coefficients
    /// evaluated at `(e, r)` (for cosine `cross = 1/(‖e‖‖r‖)`; for `‖r‖² − ‖e − r‖²`
    /// `cross = 2, self_e = −1`). Where `e` and `r` are means of per-location vectors (pooled
    /// feature maps), this splits the score exactly over pairs of locations, which is what
    /// the spatial-decomposition maps and the point-to-point correspondence are computed
    /// from (docs/evaluation.md). `None` (the default): the metric has no such form, and
    /// those maps are reported as unavailable.
    fn inner_product_form(&self, _e: &[f32], _r: &[f32]) -> Result<Option<InnerProductForm>> {
        Ok(None)
    }
}

/// The coefficients of [`Similarity::inner_product_form`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct InnerProductForm {
    pub cross: f32,
    pub self_e: f32,
    pub self_r: f32,
    pub constant: f32,
}

impl InnerProductForm {
    /// The score this form gives for `e` and `r` (equals [`Similarity::score`] at the pair
    /// the form was taken at).
    pub fn score(&self, e: &[f32], r: &[f32]) -> f32 {
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        self.cross * dot(e, r) + self.self_e * dot(e, e) + self.self_r * dot(r, r) + self.constant
    }
}

/// Turns explanations into files, written through an [`OutputSink`] so that each file is
/// written atomically and listed in the run's manifest.
pub trait Renderer: Send + Sync {
    /// The renderer's name, e.g. `overlay`.
    fn name(&self) -> String;
    fn render(&self, explanation: &Explanation, out: &mut dyn OutputSink) -> Result<()>;
    /// `true` for a renderer that summarises the other renderers' files (such as the `html`
    /// report, which links every panel): it runs after all the others, whatever the order
    /// of `[[render]]` sections. `fam-cli merge` runs it again on the merged folder, with an
    /// explanation of every shard's comparisons (their ids, labels, scores, groups and
    /// ranks, without images or maps), so it must need nothing else.
    fn runs_last(&self) -> bool {
        false
    }
    /// Renders the results of `fam-cli eval` (for example a plot of the mean deletion and
    /// insertion curves). The default writes nothing.
    fn render_eval(
        &self,
        _report: &crate::records::EvalReport,
        _out: &mut dyn OutputSink,
    ) -> Result<()> {
        Ok(())
    }
}
