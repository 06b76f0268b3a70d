//! FAM maps in one batched pass: the channel weights of each comparison applied to the
//! feature maps of its image, upsampled to the model's input size.

use fam_core::candle::Tensor;
use fam_core::error::{FamError, Result};
use fam_core::explain::{
    channel_weights, contrast_raw, embedding_weights, fam_linear, fam_linear_spatial,
    normalize_contributions, Map2, SaliencyMap, Weighting,
};
use fam_core::traits::{Backbone, Similarity};

/// One map to compute: explain image `image` with respect to embedding `reference`.
#[derive(Debug, Clone)]
pub struct MapJob {
    pub image: usize,
    /// Channel weights (GAP backbones).
    pub weights: Vec<f32>,
    /// Embedding-space weights, pulled back through an affine head where there is one.
    pub u: Vec<f32>,
}

impl MapJob {
    /// The job explaining why `e` matches `r` rather than the `others` (`contrast =
    /// "others"`): channel weights from `c(e, r) − mean_j c(e, r_j)`, and the matching
    /// embedding-space weights for backbones with a head.
    pub fn contrast(
        similarity: &dyn Similarity,
        weighting: Weighting,
        image: usize,
        e: &[f32],
        r: &[f32],
        others: &[&[f32]],
    ) -> Result<Self> {
        let mut job = Self::new(similarity, weighting, image, e, r)?;
        if others.is_empty() || weighting == Weighting::Activation {
            return Ok(job);
        }
        // One pass over the references gives both the channel weights and `u`.
        let c = contrast_raw(similarity, weighting, e, r, others)?;
        job.weights = match weighting {
            Weighting::Gradient => c.clone(),
            _ => normalize_contributions(&c),
        };
        job.u = match weighting {
            Weighting::Gradient => c,
            _ => c
                .iter()
                .zip(e)
                .map(|(c, z)| if *z == 0.0 { 0.0 } else { c / z })
                .collect(),
        };
        Ok(job)
    }

    /// The job explaining embedding `e` (of image `image`) with respect to `r`.
    pub fn new(
        similarity: &dyn Similarity,
        weighting: Weighting,
        image: usize,
        e: &[f32],
        r: &[f32],
    ) -> Result<Self> {
        Ok(Self {
            image,
            weights: channel_weights(similarity, weighting, e, r)?,
            u: embedding_weights(similarity, weighting, e, r)?,
        })
    }
}

/// Computes all maps in one batched pass: gathers the explained images' feature maps and
/// applies their channel weights.
pub fn compute_maps(
    backbone: &dyn Backbone,
    weighting: Weighting,
    use_head: bool,
    maps: &Tensor,
    jobs: &[MapJob],
    size: (usize, usize),
) -> Result<Vec<SaliencyMap>> {
    if jobs.is_empty() {
        return Ok(vec![]);
    }
    finish(
        &linear_maps(backbone, weighting, use_head, maps, jobs)?.relu()?,
        size,
    )
}

/// The contrast maps of one image against several references (`Side::contrast`), from its
/// plain maps before their ReLU (`linear`, `[n, h, w]`: [`linear_maps`] of the image's plain
/// jobs, one per reference, `n` ≥ 2). Each map is first made a share of its own total,
/// `p_i = m_i / Σ|m_i|` (so a close match and a distant one weigh alike: the plain maps of
/// one image differ more in level than in shape), then `ReLU(p_i − mean_{j≠i} p_j)`: where
/// this match rests more than the image's other matches do. Upsampled like the plain maps.
pub fn contrast_maps(linear: &Tensor, size: (usize, usize)) -> Result<Vec<SaliencyMap>> {
    let n = linear.dims()[0];
    if n < 2 {
        return Err(FamError::invalid(format!(
            "a contrast map needs at least 2 references, not {n}"
        )));
    }
    let total = linear
        .abs()?
        .sum_keepdim((1, 2))?
        .maximum(f32::MIN_POSITIVE)?;
    let shares = linear.broadcast_div(&total)?;
    // p_i − (Σ_j p_j − p_i) / (n − 1) = (n p_i − Σ_j p_j) / (n − 1)
    let sum = shares.sum_keepdim(0)?;
    let contrast = ((shares * n as f64)?.broadcast_sub(&sum)? / (n - 1) as f64)?;
    finish(&contrast.relu()?, size)
}

/// Raw maps (`[P, h, w]`, after the ReLU) with their upsampled copies at `size`.
fn finish(raw: &Tensor, size: (usize, usize)) -> Result<Vec<SaliencyMap>> {
    let device = raw.device();
    let maps_raw = Map2::from_batch(raw)?;
    // On the CPU each map is upsampled straight into its own buffer, without a batch tensor
    // and its copies.
    let up = if device.is_cpu() {
        maps_raw
            .iter()
            .map(|m| {
                let data = fam_core::explain::bilinear(&m.data, (m.height, m.width), size);
                Map2::new(size.0, size.1, data)
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        let up = fam_core::explain::upsample_bilinear(&raw.unsqueeze(1)?, size.0, size.1)?;
        Map2::from_batch(&up.squeeze(1)?)?
    };
    Ok(maps_raw
        .into_iter()
        .zip(up)
        .map(|(raw, upsampled)| SaliencyMap { raw, upsampled })
        .collect())
}

/// The jobs' maps before their ReLU, at feature resolution (`[P, h, w]`): linear in each
/// job's weights.
pub fn linear_maps(
    backbone: &dyn Backbone,
    weighting: Weighting,
    use_head: bool,
    maps: &Tensor,
    jobs: &[MapJob],
) -> Result<Tensor> {
    let device = maps.device();
    let idx: Vec<u32> = jobs.iter().map(|j| j.image as u32).collect();
    let idx = Tensor::new(idx.as_slice(), device)?;
    let gathered = maps.index_select(&idx, 0)?;
    let d = jobs[0].u.len();
    let flat_u: Vec<f32> = jobs.iter().flat_map(|j| j.u.iter().copied()).collect();
    let u = Tensor::from_vec(flat_u, (jobs.len(), d), device)?;
    let pulled = if weighting == Weighting::Activation || !use_head {
        None
    } else {
        backbone.pullback(&u)?
    };
    let raw = match pulled {
        // Affine head: exact spatial contributions (contribution), or Grad-CAM's spatially
        // averaged gradient (gradient).
        Some((w, _offset)) if weighting == Weighting::Contribution => {
            fam_linear_spatial(&gathered, &w)?
        }
        Some((w, _offset)) => fam_linear(&gathered, &w.mean((2, 3))?)?,
        // The activation baseline is the mean of the feature channels, whatever the head.
        None if weighting == Weighting::Activation => {
            let c = gathered.dims()[1];
            let w = Tensor::full(1.0 / c as f32, (jobs.len(), c), device)?;
            fam_linear(&gathered, &w)?
        }
        None => {
            let c = jobs[0].weights.len();
            if c != gathered.dims()[1] {
                return Err(FamError::contract(
                    format!("backbone `{}`", backbone.describe()),
                    format!(
                        "gives {c}-d embeddings but {} feature channels, and no pullback to map one onto the other",
                        gathered.dims()[1]
                    ),
                ));
            }
            let flat: Vec<f32> = jobs
                .iter()
                .flat_map(|j| j.weights.iter().copied())
                .collect();
            let w = Tensor::from_vec(flat, (jobs.len(), c), device)?;
            fam_linear(&gathered, &w)?
        }
    };
    Ok(raw)
}
