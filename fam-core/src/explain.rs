//! The FAM algorithm (DESIGN.md sections 1.1 and 1.2) and the explanation records that
//! renderers consume.
//!
//! ```text
//! w_k   = c_k / sum_j |c_j|            contribution weights (or the gradient, or 1/C)
//! M     = ReLU( sum_k w_k A^k )        h x w raw map
//! M_up  = bilinear(M, H x W)           half-pixel centres (align_corners = false)
//! M_vis = (M_up - min) / (max - min)   an all-zero map stays zero
//! ```

use candle_core::Tensor;

use crate::error::{CandleContext, FamError, Result};
use crate::traits::Similarity;

pub use crate::records::{
    min_max, Comparison, Contrast, ContrastMap, Explanation, ImageRecord, Map2, Rgb8, RunInfo,
    SaliencyMap, Side, Target, Transform,
};

/// How channel weights are derived from the similarity (DESIGN.md section 1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// FAM: `w_k = c_k / sum_j |c_j|`.
    #[default]
    Contribution,
    /// Closed-form Grad-CAM with the similarity as target: `w_k = ds/de_k`.
    Gradient,
    /// Plain mean activation: `w_k = 1/C`.
    Activation,
}

impl Weighting {
    pub const ALL: [&'static str; 3] = ["contribution", "gradient", "activation"];

    pub fn as_str(self) -> &'static str {
        match self {
            Weighting::Contribution => "contribution",
            Weighting::Gradient => "gradient",
            Weighting::Activation => "activation",
        }
    }
}

/// Channel weights for explaining `e` with respect to `r`.
pub fn channel_weights(
    similarity: &dyn Similarity,
    weighting: Weighting,
    e: &[f32],
    r: &[f32],
) -> Result<Vec<f32>> {
    if e.len() != r.len() {
        return Err(FamError::invalid(format!(
            "embeddings have different sizes: {} and {}",
            e.len(),
            r.len()
        )));
    }
    let weights = match weighting {
        Weighting::Contribution => {
            let c = similarity.contributions(e, r)?;
            check_len("contributions", &c, e.len())?;
            normalize_contributions(&c)
        }
        Weighting::Gradient => {
            let g = similarity.gradient(e, r)?;
            check_len("gradient", &g, e.len())?;
            g
        }
        Weighting::Activation => vec![1.0 / e.len().max(1) as f32; e.len()],
    };
    if let Some(k) = weights.iter().position(|w| !w.is_finite()) {
        return Err(FamError::invalid(format!(
            "{} weight of channel {k} is {} (non-finite); the embeddings hold NaN or infinite values",
            weighting.as_str(),
            weights[k]
        )));
    }
    Ok(weights)
}

fn check_len(what: &str, v: &[f32], expected: usize) -> Result<()> {
    if v.len() != expected {
        return Err(FamError::contract(
            "similarity",
            format!(
                "returned {} {what} for an embedding of {expected} channels",
                v.len()
            ),
        ));
    }
    Ok(())
}

/// `w_k = c_k / sum_j |c_j|`; all zeros stay zeros.
pub fn normalize_contributions(c: &[f32]) -> Vec<f32> {
    let denom: f32 = c.iter().map(|x| x.abs()).sum();
    if denom == 0.0 || !denom.is_finite() {
        return vec![0.0; c.len()];
    }
    c.iter().map(|x| x / denom).collect()
}

/// Computes FAM maps for a batch of `P` explained items at once.
///
/// `maps` is `[P, C, h, w]` (the feature maps of each explained image, already gathered),
/// `weights` is `[P, C]`. Returns `(raw [P, h, w], upsampled [P, H, W])`, both on the maps'
/// device. One matrix product and one bilinear resize for the whole batch.
pub fn fam_maps(
    maps: &Tensor,
    weights: &Tensor,
    out_h: usize,
    out_w: usize,
) -> Result<(Tensor, Tensor)> {
    let raw = fam_raw(maps, weights)?;
    let up = upsample_bilinear(&raw.unsqueeze(1)?, out_h, out_w)?;
    Ok((raw, up.squeeze(1)?))
}

/// The maps of [`fam_maps`] at feature resolution, `[P, h, w]`.
pub fn fam_raw(maps: &Tensor, weights: &Tensor) -> Result<Tensor> {
    Ok(fam_linear(maps, weights)?.relu()?)
}

/// [`fam_raw`] before its ReLU: `Σ_k w_k A^k`, `[P, h, w]`. Linear in the weights, so maps
/// of one image can be subtracted here (the contrast maps beside the plain ones).
pub fn fam_linear(maps: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let (p, c, h, w) = maps.dims4().ctx("feature maps must be [P, C, h, w]")?;
    let (pw, cw) = weights.dims2().ctx("weights must be [P, C]")?;
    if (pw, cw) != (p, c) {
        return Err(FamError::invalid(format!(
            "weights are {pw}x{cw} but the feature maps have {p} items of {c} channels"
        )));
    }
    let a = maps.reshape((p, c, h * w)).ctx("flatten feature maps")?;
    let weights = weights.to_dtype(maps.dtype())?.unsqueeze(1)?;
    let raw = weights
        .matmul(&a)
        .ctx("weighted sum of activation maps")?
        .reshape((p, h, w))?;
    Ok(raw)
}

/// Bilinear upsampling of `[P, 1, h, w]` maps to `[P, 1, H, W]` (half-pixel centres, as
/// PyTorch's `align_corners=False`). On the CPU it is separable: each output row blends two
/// rows that were interpolated along x once, so a 7x7 → 224x224 map costs about two
/// multiply-adds per output pixel. Other devices use candle's kernel.
pub fn upsample_bilinear(raw: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    if !raw.device().is_cpu() || raw.dtype() != candle_core::DType::F32 {
        return raw
            .upsample_bilinear2d(out_h, out_w, false)
            .ctx("bilinear upsampling of maps");
    }
    let (p, one, h, w) = raw.dims4().ctx("maps must be [P, 1, h, w]")?;
    let data: Vec<f32> = raw.flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(p * one * out_h * out_w);
    for src in data.chunks_exact(h * w) {
        out.extend(bilinear(src, (h, w), (out_h, out_w)));
    }
    Ok(Tensor::from_vec(out, (p, one, out_h, out_w), raw.device())?)
}

/// Separable bilinear resize of one `h × w` map (half-pixel centres).
pub fn bilinear(src: &[f32], (h, w): (usize, usize), (out_h, out_w): (usize, usize)) -> Vec<f32> {
    // Source index pairs and weights along one axis.
    let axis = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|o| {
                let s = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (s.floor() as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                (i0, i1, s - i0 as f32)
            })
            .collect()
    };
    let (ys, xs) = (axis(h, out_h), axis(w, out_w));
    let mut rows = vec![0f32; h * out_w];
    for y in 0..h {
        let s = &src[y * w..(y + 1) * w];
        for (o, &(x0, x1, t)) in rows[y * out_w..(y + 1) * out_w].iter_mut().zip(&xs) {
            *o = s[x0] + (s[x1] - s[x0]) * t;
        }
    }
    let mut out = vec![0f32; out_h * out_w];
    for (drow, &(y0, y1, t)) in out.chunks_exact_mut(out_w).zip(&ys) {
        let (r0, r1) = (&rows[y0 * out_w..][..out_w], &rows[y1 * out_w..][..out_w]);
        for ((o, a), b) in drow.iter_mut().zip(r0).zip(r1) {
            *o = a + (b - a) * t;
        }
    }
    out
}

/// The key references are ranked by (higher is nearer): minus the distance where the metric
/// reports one, else the score. Euclidean's similarity `‖r‖² − ‖e − r‖²` explains a match with
/// one reference exactly, but across references of different norms only the distance ranks
/// them as nearest-prototype and nearest-neighbour methods do.
pub fn rank_key(score: f32, distance: Option<f32>) -> f32 {
    distance.map(|d| -d).unwrap_or(score)
}

/// Channel weights explaining why `e` matches `r` rather than the `others` (DESIGN.md
/// section 1.2, `contrast = "others"`): the contributions to `s(e, r) − mean_j s(e, r_j)`,
/// i.e. `c(e, r) − mean_j c(e, r_j)`, normalized like [`channel_weights`]. Exact for any
/// metric whose contributions add up to its score.
pub fn contrast_weights(
    similarity: &dyn Similarity,
    weighting: Weighting,
    e: &[f32],
    r: &[f32],
    others: &[&[f32]],
) -> Result<Vec<f32>> {
    if others.is_empty() || weighting == Weighting::Activation {
        return channel_weights(similarity, weighting, e, r);
    }
    let c = contrast_raw(similarity, weighting, e, r, others)?;
    Ok(match weighting {
        Weighting::Gradient => c,
        _ => normalize_contributions(&c),
    })
}

/// The unnormalized contrast: `c(e, r) − mean_j c(e, r_j)` (or the same with gradients).
pub fn contrast_raw(
    similarity: &dyn Similarity,
    weighting: Weighting,
    e: &[f32],
    r: &[f32],
    others: &[&[f32]],
) -> Result<Vec<f32>> {
    let raw = |x: &[f32]| -> Result<Vec<f32>> {
        match weighting {
            Weighting::Gradient => similarity.gradient(e, x),
            _ => similarity.contributions(e, x),
        }
    };
    let mut c = raw(r)?;
    let n = others.len() as f32;
    for o in others {
        for (ci, oi) in c.iter_mut().zip(raw(o)?) {
            *ci -= oi / n;
        }
    }
    Ok(c)
}

/// Per-dimension weights `u` of the embedding, such that the score's linear part is `u · z`
/// (contribution: `c_k = z_k u_k`, so `u = c / z`, 0 where `z_k = 0`; gradient: `∂s/∂z`).
/// Pulled back through an affine head they become spatial weights (DESIGN.md section 1.3).
pub fn embedding_weights(
    similarity: &dyn Similarity,
    weighting: Weighting,
    z: &[f32],
    r: &[f32],
) -> Result<Vec<f32>> {
    Ok(match weighting {
        Weighting::Contribution => similarity
            .contributions(z, r)?
            .iter()
            .zip(z)
            .map(|(c, z)| if *z == 0.0 { 0.0 } else { c / z })
            .collect(),
        Weighting::Gradient => similarity.gradient(z, r)?,
        Weighting::Activation => vec![0.0; z.len()],
    })
}

/// Spatial contributions `C = A ⊙ W` (`[P, C, h, w]`): with `W = Lᵀ u` they add up, with
/// `u · z0`, to the score.
pub fn spatial_contributions(maps: &Tensor, spatial_weights: &Tensor) -> Result<Tensor> {
    Ok(maps.mul(&spatial_weights.to_dtype(maps.dtype())?)?)
}

/// FAM maps through an affine head, at feature resolution: `M = ReLU(Σ_k C_k) / Σ|C|`,
/// `[P, h, w]` (upsampled per map by the caller).
pub fn fam_raw_spatial(maps: &Tensor, spatial_weights: &Tensor) -> Result<Tensor> {
    Ok(fam_linear_spatial(maps, spatial_weights)?.relu()?)
}

/// [`fam_raw_spatial`] before its ReLU: `Σ_k C_k / Σ|C|`, `[P, h, w]`.
pub fn fam_linear_spatial(maps: &Tensor, spatial_weights: &Tensor) -> Result<Tensor> {
    let (p, _, h, w) = maps.dims4().ctx("feature maps must be [P, C, h, w]")?;
    if spatial_weights.dims() != maps.dims() {
        return Err(FamError::invalid(format!(
            "spatial weights {:?} do not match feature maps {:?}",
            spatial_weights.dims(),
            maps.dims()
        )));
    }
    let c = spatial_contributions(maps, spatial_weights)?;
    let denom = c.abs()?.flatten_from(1)?.sum_keepdim(1)?; // [P, 1]
    let denom = denom.maximum(f32::MIN_POSITIVE)?;
    let raw = c
        .sum(1)?
        .reshape((p, h * w))?
        .broadcast_div(&denom)?
        .reshape((p, h, w))?;
    Ok(raw)
}

/// `f(z)`: the score a [`Target`] explains, for a raw embedding `z`.
impl Target {
    /// `f(z)` for a raw embedding `z`.
    pub fn score(&self, similarity: &dyn Similarity, z: &[f32]) -> Result<f32> {
        let e = self.transform.apply(z, &self.center);
        let mut s = similarity.score(&e, &self.reference)?;
        if !self.others.is_empty() {
            let mut m = 0.0;
            for o in &self.others {
                m += similarity.score(&e, o)?;
            }
            s -= m / self.others.len() as f32;
        }
        Ok(s)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;

    /// The dot product, whose contributions and gradient are obvious (shared by tests).
    pub(crate) struct Dot;
    impl Similarity for Dot {
        fn name(&self) -> String {
            "dot".into()
        }
        fn score(&self, e: &[f32], r: &[f32]) -> Result<f32> {
            Ok(e.iter().zip(r).map(|(a, b)| a * b).sum())
        }
        fn contributions(&self, e: &[f32], r: &[f32]) -> Result<Vec<f32>> {
            Ok(e.iter().zip(r).map(|(a, b)| a * b).collect())
        }
        fn gradient(&self, _e: &[f32], r: &[f32]) -> Result<Vec<f32>> {
            Ok(r.to_vec())
        }
    }

    #[test]
    fn separable_upsampling_matches_candles_bilinear() {
        let dev = Device::Cpu;
        for (h, w, oh, ow) in [(7, 7, 224, 224), (3, 5, 10, 9), (4, 4, 4, 4), (1, 2, 3, 5)] {
            let raw = Tensor::randn(0f32, 1., (2, 1, h, w), &dev).unwrap();
            let ours = upsample_bilinear(&raw, oh, ow).unwrap();
            let theirs = raw.upsample_bilinear2d(oh, ow, false).unwrap();
            let diff: f32 = (ours - theirs)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-5, "{h}x{w} -> {oh}x{ow}: {diff}");
        }
    }

    #[test]
    fn contribution_weights_are_scale_free_and_signed() {
        let w = channel_weights(
            &Dot,
            Weighting::Contribution,
            &[1.0, 2.0, 3.0],
            &[2.0, -1.0, 1.0],
        )
        .unwrap();
        // c = [2, -2, 3], sum |c| = 7
        assert_eq!(w, vec![2.0 / 7.0, -2.0 / 7.0, 3.0 / 7.0]);
        let w = channel_weights(&Dot, Weighting::Activation, &[1.0, 2.0], &[0.0, 0.0]).unwrap();
        assert_eq!(w, vec![0.5, 0.5]);
        let w = channel_weights(&Dot, Weighting::Contribution, &[0.0, 0.0], &[1.0, 1.0]).unwrap();
        assert_eq!(w, vec![0.0, 0.0]);
    }

    #[test]
    fn contrast_contributions_add_up_to_the_margin_over_the_others() {
        let e = [1.0, 2.0, 0.5];
        let (r, o1, o2) = ([2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 1.0]);
        let w = contrast_weights(&Dot, Weighting::Contribution, &e, &r, &[&o1, &o2]).unwrap();
        // raw contrast contributions: c(e,r) - (c(e,o1) + c(e,o2)) / 2
        // c(e,r) = [2, 2, 0]; c(e,o1) = [0, 2, 1.5]; c(e,o2) = [1, 0, 0.5]
        let raw = [2.0 - 0.5, 2.0 - 1.0, 0.0 - 1.0];
        let margin: f32 = raw.iter().sum();
        let (s, s1, s2) = (4.0, 3.5, 1.5);
        assert!((margin - (s - (s1 + s2) / 2.0)).abs() < 1e-6);
        let norm: f32 = raw.iter().map(|x: &f32| x.abs()).sum();
        for (a, b) in w.iter().zip(raw) {
            assert!((a - b / norm).abs() < 1e-6);
        }
    }

    #[test]
    fn mismatched_and_nan_embeddings_are_errors() {
        let err = channel_weights(&Dot, Weighting::Gradient, &[1.0], &[1.0, 2.0]).unwrap_err();
        assert!(
            err.to_string().contains("different sizes: 1 and 2"),
            "{err}"
        );
        let err = channel_weights(&Dot, Weighting::Gradient, &[1.0], &[f32::NAN]).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
    }

    #[test]
    fn map_matches_hand_computation() {
        // Two channels of 2x2; weights [0.5, -0.25]:
        // A0 = [[1, 2], [3, 4]], A1 = [[4, 0], [0, 8]]
        // 0.5*A0 - 0.25*A1 = [[-0.5, 1], [1.5, 0]] -> ReLU -> [[0, 1], [1.5, 0]]
        let dev = Device::Cpu;
        let maps = Tensor::new(&[[[[1f32, 2.], [3., 4.]], [[4., 0.], [0., 8.]]]], &dev).unwrap();
        let w = Tensor::new(&[[0.5f32, -0.25]], &dev).unwrap();
        let (raw, up) = fam_maps(&maps, &w, 4, 4).unwrap();
        let raw = Map2::from_batch(&raw).unwrap();
        assert_eq!(raw[0].data, vec![0.0, 1.0, 1.5, 0.0]);
        // Bilinear with half-pixel centres, 2 -> 4: output pixel i samples source
        // (i + 0.5) / 2 - 0.5 = [-0.25, 0.25, 0.75, 1.25], clamped to [0, 1].
        // Row 0 (source row 0 only): [0, 0.25, 0.75, 1].
        // Row 1 (source y = 0.25): 0.75*row0 + 0.25*row1, row1 = [1.5, 1.125, 0.375, 0].
        let up = Map2::from_batch(&up).unwrap();
        let expect_row0 = [0.0, 0.25, 0.75, 1.0];
        let row1 = [1.5, 1.125, 0.375, 0.0];
        for x in 0..4 {
            assert!((up[0].data[x] - expect_row0[x]).abs() < 1e-6);
            let e = 0.75 * expect_row0[x] + 0.25 * row1[x];
            assert!(
                (up[0].data[4 + x] - e).abs() < 1e-6,
                "{x}: {}",
                up[0].data[4 + x]
            );
            assert!((up[0].data[12 + x] - row1[x]).abs() < 1e-6);
        }
    }

    #[test]
    fn min_max_handles_constant_maps() {
        assert_eq!(min_max(&[0.0, 0.0, 0.0]), vec![0.0; 3]);
        assert_eq!(min_max(&[1.0, 3.0, 2.0]), vec![0.0, 1.0, 0.5]);
        assert_eq!(min_max(&[]), Vec::<f32>::new());
    }

    #[test]
    fn batched_maps_equal_one_by_one() {
        let dev = Device::Cpu;
        let maps = Tensor::rand(0f32, 1., (3, 5, 4, 3), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (3, 5), &dev).unwrap();
        let (raw, _) = fam_maps(&maps, &w, 8, 6).unwrap();
        let all = Map2::from_batch(&raw).unwrap();
        for (i, all_i) in all.iter().enumerate() {
            let (r1, _) = fam_maps(
                &maps.narrow(0, i, 1).unwrap(),
                &w.narrow(0, i, 1).unwrap(),
                8,
                6,
            )
            .unwrap();
            let one = Map2::from_batch(&r1).unwrap();
            for (a, b) in all_i.data.iter().zip(&one[0].data) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }
}
