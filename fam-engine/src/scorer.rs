//! The model and the score being measured, `f(e(x))` for images `x`: what `fam-cli eval`
//! scores maps with and what the perturbation baselines probe.

use fam_core::candle::Tensor;
use fam_core::error::Result;
use fam_core::explain::Target;
use fam_core::traits::{Backbone, InputSpec, Similarity};

/// Normalized CHW values of an image given as float RGB in [0, 255].
pub fn chw(values: &[f32], w: usize, h: usize, spec: &InputSpec) -> Vec<f32> {
    let n = w * h;
    let mut out = vec![0f32; 3 * n];
    for c in 0..3 {
        for i in 0..n {
            out[c * n + i] = (values[3 * i + c] / 255.0 - spec.mean[c]) / spec.std[c];
        }
    }
    out
}

/// Scores the variants of one image in batches: `f(e(variant))` for each.
fn scores(
    backbone: &dyn Backbone,
    f: &dyn Fn(&[f32]) -> Result<f32>,
    spec: &InputSpec,
    (w, h): (usize, usize),
    variants: &[Vec<f32>],
    batch: usize,
) -> Result<Vec<f32>> {
    let device = backbone.device();
    let mut out = Vec::with_capacity(variants.len());
    for chunk in variants.chunks(batch.max(1)) {
        let data: Vec<f32> = chunk.iter().flat_map(|v| chw(v, w, h, spec)).collect();
        let t = Tensor::from_vec(data, (chunk.len(), 3, h, w), &device)?;
        let e: Vec<Vec<f32>> = backbone
            .forward(&t)?
            .embeddings
            .to_dtype(fam_core::candle::DType::F32)?
            .flatten_from(1)?
            .to_vec2()?;
        for ei in &e {
            out.push(f(ei)?);
        }
    }
    Ok(out)
}

/// The model and the score being measured: `f(e(x))` for an image `x`.
pub struct Scorer<'a> {
    pub backbone: &'a dyn Backbone,
    pub similarity: &'a dyn Similarity,
    pub spec: &'a InputSpec,
    pub target: &'a Target,
    /// Images per forward pass.
    pub batch: usize,
}

impl Scorer<'_> {
    /// `f(e(variant))` for each variant (RGB values in [0, 255], `w × h`).
    pub fn scores(&self, size: (usize, usize), variants: &[Vec<f32>]) -> Result<Vec<f32>> {
        let f = |z: &[f32]| self.target.score(self.similarity, z);
        scores(self.backbone, &f, self.spec, size, variants, self.batch)
    }
}
