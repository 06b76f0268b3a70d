//! Faithfulness of maps for similarity models (DESIGN.md section 5), with the similarity
//! score in place of a class confidence.
//!
//! For an explained image `x`, its reference embedding `r` and a map `M` in [0, 1] at the
//! model's input size (min-max normalized, as rendered):
//! - **Average Drop** (Grad-CAM++): `x' = x ⊙ M` (pixel values in [0, 1], before mean/std),
//!   `drop = clip((s − s') / s, 0, 1)` with `s = f(e(x))`, `s' = f(e(x'))` and `f` the score
//!   the map explains ([`Target`]); averaged over the items with `s > 0` (others are counted
//!   as skipped), in percent. A similarity can fall below zero where a probability cannot,
//!   so the drop is clipped at 1: losing the whole score counts as 100%. Lower is better.
//! - **Increase in Confidence**: the percentage of items with `s' > s`. Higher is better.
//! - **Deletion / insertion** (RISE): pixels in order of decreasing saliency are replaced by a
//!   blurred copy of the image (deletion), or revealed on the blurred copy (insertion), in
//!   `steps` equal steps; the area under `(s_k − s_blur) / (s − s_blur)` over the fraction of
//!   pixels, by the trapezoid rule, with `s_blur` the score of the fully blurred image. The
//!   curves run from 1 to 0 (deletion) and from 0 to 1 (insertion) whatever the metric, so
//!   similarities that can be negative or tiny (Euclidean, margins) are comparable. Deletion:
//!   lower is better; insertion: higher is better.
//!
//! Every variant image of an item goes through the backbone in batches.

use fam_core::error::{FamError, Result};
use fam_core::explain::Rgb8;
use fam_core::records::{CurveEstimate, Estimate};

pub use crate::baselines::{centre_map, occlusion_map, random_map};
use crate::scorer::chw;
pub use crate::scorer::Scorer;

/// Faithfulness of one map.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Faithfulness {
    /// The unmodified score.
    pub score: f32,
    /// `s'` of the map-masked image.
    pub masked_score: f32,
    /// `(s − s') / s` clipped to [0, 1], or `None` where `s ≤ 0`.
    pub drop: Option<f32>,
    pub increase: bool,
    /// The score of the fully blurred image (where deletion ends and insertion starts).
    pub blurred_score: f32,
    /// `s_k / s` as pixels are removed (zeros where `s ≤ 0`).
    pub deletion: Vec<f32>,
    /// `s_k / s` as pixels are revealed on the blurred image.
    pub insertion: Vec<f32>,
    /// Areas under those curves (`None` where `s ≤ 0`).
    pub deletion_auc: Option<f32>,
    pub insertion_auc: Option<f32>,
    /// The areas with each curve rescaled to run between the removed image (0) and the
    /// unmodified one (1): `(s_k − s_blur) / (s − s_blur)`. `None` where removing every
    /// pixel does not lower the score by more than `min_range` (see [`faithfulness`]).
    pub deletion_auc_range: Option<f32>,
    pub insertion_auc_range: Option<f32>,
    /// The rescaled curves `(s_k − s_blur) / (s − s_blur)`, where the rescaled areas are
    /// defined.
    pub deletion_range: Option<Vec<f32>>,
    pub insertion_range: Option<Vec<f32>>,
}

/// A box blur (radius `r`, two passes: close to a Gaussian), the "removed" state of a pixel.
pub fn blur(img: &Rgb8, r: usize) -> Rgb8 {
    let (w, h) = (img.width as usize, img.height as usize);
    let pass = |src: &[f32], horizontal: bool| -> Vec<f32> {
        let mut out = vec![0f32; src.len()];
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let (mut acc, mut n) = (0f32, 0f32);
                    for d in -(r as isize)..=(r as isize) {
                        let (xx, yy) = if horizontal {
                            (x as isize + d, y as isize)
                        } else {
                            (x as isize, y as isize + d)
                        };
                        if xx >= 0 && yy >= 0 && (xx as usize) < w && (yy as usize) < h {
                            acc += src[(yy as usize * w + xx as usize) * 3 + c];
                            n += 1.0;
                        }
                    }
                    out[(y * w + x) * 3 + c] = acc / n;
                }
            }
        }
        out
    };
    let f: Vec<f32> = img.data.iter().map(|&v| v as f32).collect();
    let mut v = f;
    for _ in 0..2 {
        v = pass(&v, true);
        v = pass(&v, false);
    }
    Rgb8 {
        width: img.width,
        height: img.height,
        data: v
            .iter()
            .map(|x| x.round().clamp(0.0, 255.0) as u8)
            .collect(),
    }
}

/// What a pixel becomes when deletion removes it (and what insertion starts from).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Removal {
    /// A blurred copy of the image (box blur, radius side/28, two passes), as RISE does.
    #[default]
    Blur,
    /// The image's mean colour, per channel.
    Mean,
}

impl Removal {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "blur" => Ok(Self::Blur),
            "mean" => Ok(Self::Mean),
            other => Err(format!("unknown removal `{other}` (blur or mean)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Blur => "blur",
            Self::Mean => "mean",
        }
    }

    /// The image with every pixel removed.
    pub fn apply(self, img: &Rgb8) -> Rgb8 {
        match self {
            Self::Blur => blur(img, (img.width as usize / 28).max(2)),
            Self::Mean => {
                let n = (img.data.len() / 3).max(1) as f64;
                let mut sum = [0f64; 3];
                for px in img.data.chunks(3) {
                    for c in 0..3 {
                        sum[c] += px[c] as f64;
                    }
                }
                let mean: Vec<u8> = sum.iter().map(|s| (s / n).round() as u8).collect();
                Rgb8 {
                    width: img.width,
                    height: img.height,
                    data: mean.iter().copied().cycle().take(img.data.len()).collect(),
                }
            }
        }
    }
}

/// The mean of `values` with its 95% percentile-bootstrap interval over `resamples` resamples
/// of the items (a fixed seed, so reruns agree); `undefined` items are counted, not averaged.
pub fn estimate(values: &[f32], undefined: usize, resamples: usize, seed: u64) -> Estimate {
    let n = values.len();
    if n == 0 {
        return Estimate {
            mean: f32::NAN,
            lo: f32::NAN,
            hi: f32::NAN,
            n,
            undefined,
        };
    }
    let mean = (values.iter().map(|&v| v as f64).sum::<f64>() / n as f64) as f32;
    let mut next = resampler(seed);
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| {
            (0..n)
                .map(|_| values[(next() % n as u64) as usize] as f64)
                .sum::<f64>()
                / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * means.len() as f64) as usize).min(means.len() - 1)] as f32;
    Estimate {
        mean,
        lo: at(0.025),
        hi: at(0.975),
        n,
        undefined,
    }
}

/// The random source of the bootstrap: xorshift64 from a fixed seed, so reruns agree.
fn resampler(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// The mean of `curves` (one per item, all of one length) with its pointwise 95% bootstrap
/// band: each resample draws items once and averages their whole curves, and each step's
/// band is the 2.5th and 97.5th percentiles of that step's resampled means.
pub fn curve_estimate(curves: &[&[f32]], resamples: usize, seed: u64) -> CurveEstimate {
    let n = curves.len();
    let len = curves.iter().map(|c| c.len()).max().unwrap_or(0);
    if n == 0 || len == 0 {
        return CurveEstimate::default();
    }
    let at = |c: &[f32], k: usize| c.get(k).copied().unwrap_or(f32::NAN) as f64;
    let mean: Vec<f32> = (0..len)
        .map(|k| (curves.iter().map(|c| at(c, k)).sum::<f64>() / n as f64) as f32)
        .collect();
    let mut next = resampler(seed);
    let resamples = resamples.max(1);
    // means[k][r]: step k's mean in resample r.
    let mut means = vec![vec![0f64; resamples]; len];
    let mut sum = vec![0f64; len];
    for r in 0..resamples {
        sum.iter_mut().for_each(|v| *v = 0.0);
        for _ in 0..n {
            let c = curves[(next() % n as u64) as usize];
            for (k, v) in sum.iter_mut().enumerate() {
                *v += at(c, k);
            }
        }
        for (k, v) in sum.iter().enumerate() {
            means[k][r] = v / n as f64;
        }
    }
    let (mut lo, mut hi) = (Vec::with_capacity(len), Vec::with_capacity(len));
    for m in &mut means {
        m.sort_by(f64::total_cmp);
        let q = |p: f64| m[((p * m.len() as f64) as usize).min(m.len() - 1)] as f32;
        lo.push(q(0.025));
        hi.push(q(0.975));
    }
    CurveEstimate { mean, lo, hi, n }
}

/// The area under a curve sampled at equal steps over [0, 1] (trapezoid rule).
pub fn auc(curve: &[f32]) -> f32 {
    if curve.len() < 2 {
        return curve.first().copied().unwrap_or(0.0);
    }
    let dx = 1.0 / (curve.len() - 1) as f32;
    curve.windows(2).map(|w| (w[0] + w[1]) / 2.0 * dx).sum()
}

/// Measures a map's faithfulness. `map` is `H × W` in [0, 1] (row-major, the view's size);
/// `blurred` is the image with every pixel removed ([`Removal`]). The rescaled areas are
/// left undefined unless removing every pixel lowers the score by more than `min_range` of
/// the larger of `|s|` and `|s_removed|`: below that they divide by noise.
pub fn faithfulness(
    scorer: &Scorer,
    view: &Rgb8,
    blurred: &Rgb8,
    map: &[f32],
    steps: usize,
    min_range: f32,
) -> Result<Faithfulness> {
    let (w, h) = (view.width as usize, view.height as usize);
    if map.len() != w * h {
        return Err(FamError::invalid(format!(
            "map of {} values for a {w}x{h} image",
            map.len()
        )));
    }
    let orig: Vec<f32> = view.data.iter().map(|&v| v as f32).collect();
    let blur: Vec<f32> = blurred.data.iter().map(|&v| v as f32).collect();
    // Pixels by decreasing saliency (ties by position, so runs are reproducible).
    let mut order: Vec<usize> = (0..w * h).collect();
    order.sort_by(|a, b| map[*b].total_cmp(&map[*a]).then(a.cmp(b)));
    let mut variants = vec![orig.clone()];
    variants.push(
        orig.iter()
            .enumerate()
            .map(|(i, v)| v * map[i / 3])
            .collect(),
    );
    for (start, fill) in [(&orig, &blur), (&blur, &orig)] {
        for k in 0..=steps {
            let n = (w * h * k) / steps.max(1);
            let mut v = start.clone();
            for &p in &order[..n] {
                v[3 * p..3 * p + 3].copy_from_slice(&fill[3 * p..3 * p + 3]);
            }
            variants.push(v);
        }
    }
    let s = scorer.scores((w, h), &variants)?;
    let (score, masked) = (s[0], s[1]);
    // Deletion ends, and insertion starts, at the fully blurred image.
    let blurred_score = s[2 + steps];
    let (del_raw, ins_raw) = (&s[2..3 + steps], &s[3 + steps..]);
    let positive = score > 0.0;
    let ratio = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|&x| if positive { x / score } else { 0.0 })
            .collect()
    };
    let range = score - blurred_score;
    let has_range = range > min_range.max(1e-6) * score.abs().max(blurred_score.abs()).max(1e-12);
    // AUCs are linear in the curve, so the rescaled areas follow from the raw ones.
    let (auc_del, auc_ins) = (auc(del_raw), auc(ins_raw));
    let rescaled = |v: &[f32]| -> Option<Vec<f32>> {
        has_range.then(|| v.iter().map(|&x| (x - blurred_score) / range).collect())
    };
    Ok(Faithfulness {
        score,
        masked_score: masked,
        drop: positive.then(|| ((score - masked) / score).clamp(0.0, 1.0)),
        increase: masked > score,
        blurred_score,
        deletion: ratio(del_raw),
        insertion: ratio(ins_raw),
        deletion_auc: positive.then(|| auc_del / score),
        insertion_auc: positive.then(|| auc_ins / score),
        deletion_auc_range: has_range.then(|| (auc_del - blurred_score) / range),
        insertion_auc_range: has_range.then(|| (auc_ins - blurred_score) / range),
        deletion_range: rescaled(del_raw),
        insertion_range: rescaled(ins_raw),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fam_core::candle::Tensor;
    use fam_core::explain::Target;
    use fam_core::traits::{Backbone, InputSpec, Similarity};

    /// The dot product, whose contributions, gradient and inner-product form are obvious
    /// (shared with the baselines' tests).
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
        fn inner_product_form(
            &self,
            _e: &[f32],
            _r: &[f32],
        ) -> Result<Option<fam_core::InnerProductForm>> {
            Ok(Some(fam_core::InnerProductForm {
                cross: 1.0,
                ..Default::default()
            }))
        }
    }
    use fam_core::candle::Device;
    use fam_core::traits::{Features, ResizePolicy};

    /// A model whose embedding is (mean of the left half, 1): only the left half matters.
    struct LeftHalf;
    impl Backbone for LeftHalf {
        fn describe(&self) -> String {
            "left-half".into()
        }
        fn input_spec(&self) -> InputSpec {
            InputSpec {
                resize: ResizePolicy::Exact {
                    width: 8,
                    height: 8,
                },
                mean: [0.0; 3],
                std: [1.0; 3],
            }
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn forward(&self, batch: &Tensor) -> Result<Features> {
            let left = batch.narrow(3, 0, 4)?.mean((1, 2, 3))?.unsqueeze(1)?;
            let one = Tensor::ones(left.dims(), left.dtype(), left.device())?;
            let e = Tensor::cat(&[left, one], 1)?;
            Ok(Features {
                maps: e.unsqueeze(2)?.unsqueeze(3)?,
                embeddings: e,
            })
        }
    }

    #[test]
    fn a_map_on_the_pixels_the_score_depends_on_beats_its_complement() {
        // 8x8: a bright left half with texture, a dark right half.
        let mut data = Vec::new();
        for y in 0..8 {
            for x in 0..8 {
                let v = if x < 4 {
                    if (x + y) % 2 == 0 {
                        255
                    } else {
                        120
                    }
                } else {
                    10
                };
                data.extend_from_slice(&[v, v, v]);
            }
        }
        let view = Rgb8 {
            width: 8,
            height: 8,
            data,
        };
        let blurred = blur(&view, 2);
        let (bb, sim) = (LeftHalf, Dot);
        let spec = bb.input_spec();
        let target = Target::new(&[1.0, 0.0]); // the score is the left half's mean
        let scorer = Scorer {
            backbone: &bb,
            similarity: &sim,
            spec: &spec,
            target: &target,
            batch: 16,
        };
        let left: Vec<f32> = (0..64).map(|i| if i % 8 < 4 { 1.0 } else { 0.0 }).collect();
        let right: Vec<f32> = left.iter().map(|v| 1.0 - v).collect();
        let good = faithfulness(&scorer, &view, &blurred, &left, 8, 0.05).unwrap();
        let bad = faithfulness(&scorer, &view, &blurred, &right, 8, 0.05).unwrap();
        assert!(
            good.deletion_auc < bad.deletion_auc,
            "{:?} vs {:?}",
            good.deletion_auc,
            bad.deletion_auc
        );
        assert!(
            good.insertion_auc > bad.insertion_auc,
            "{:?} vs {:?}",
            good.insertion_auc,
            bad.insertion_auc
        );
        assert!(good.drop.unwrap() < bad.drop.unwrap());
        assert_eq!(good.deletion[0], 1.0);
        assert!(good.deletion_auc_range.unwrap() < bad.deletion_auc_range.unwrap());
        assert!(good.insertion_auc_range.unwrap() > bad.insertion_auc_range.unwrap());
        // Occlusion finds the left half.
        let occ = occlusion_map(&scorer, &view, &blurred, 4).unwrap();
        assert!(occ[0] > occ[7] && occ[8 * 7] > occ[8 * 7 + 7], "{occ:?}");
        // So does SBSM: every left pixel above every right one.
        let (sbsm, passes) = crate::baselines::sbsm_map(&scorer, &view).unwrap();
        let lo_left = (0..64)
            .filter(|i| i % 8 < 4)
            .map(|i| sbsm[i])
            .fold(f32::MAX, f32::min);
        let hi_right = (0..64)
            .filter(|i| i % 8 >= 4)
            .map(|i| sbsm[i])
            .fold(0f32, f32::max);
        assert!(lo_left > hi_right, "{sbsm:?}");
        // CorrRISE's masks are smooth at a 7 x 7 grid, wider than a pixel here: its left
        // half correlates with the score several times more than its right half.
        let corr = crate::baselines::corrrise_map(&scorer, &view, 300, 1).unwrap();
        let half = |left: bool| -> f32 {
            (0..64)
                .filter(|i| (i % 8 < 4) == left)
                .map(|i| corr[i])
                .sum::<f32>()
                / 32.0
        };
        assert!(half(true) > 3.0 * half(false), "{corr:?}");
        // 8 px: windows of 2 every 1 px, as xaitk's 50 every 20 at 224 px.
        assert_eq!(passes, 1 + 8 * 8);
    }

    #[test]
    fn bootstrap_intervals_cover_the_mean_and_shrink_with_the_items() {
        // Constant values: no spread at all.
        let e = estimate(&[0.5; 40], 3, 500, 1);
        assert_eq!(
            (e.mean, e.lo, e.hi, e.n, e.undefined),
            (0.5, 0.5, 0.5, 40, 3)
        );
        // A 0/1 variable with p = 0.3: the interval of the mean is about ±1.96·sqrt(pq/n).
        let values =
            |n: usize| -> Vec<f32> { (0..n).map(|i| if i % 10 < 3 { 1.0 } else { 0.0 }).collect() };
        for n in [100, 1000] {
            let e = estimate(&values(n), 0, 2000, 7);
            let half = 1.96 * (0.3f32 * 0.7 / n as f32).sqrt();
            assert!((e.mean - 0.3).abs() < 1e-6);
            assert!(
                (e.hi - e.lo - 2.0 * half).abs() < 0.25 * 2.0 * half,
                "{n}: {e:?}"
            );
            assert!(e.lo < e.mean && e.mean < e.hi);
        }
        // Nothing defined: counted, no mean.
        let e = estimate(&[], 5, 100, 1);
        assert!(e.mean.is_nan() && e.n == 0 && e.undefined == 5);
        // Separation needs disjoint intervals.
        let (a, b) = (
            estimate(&values(1000), 0, 1000, 1),
            estimate(&[0.5; 10], 0, 100, 2),
        );
        assert!(a.separated(&b) && b.separated(&a));
        assert!(!a.separated(&a));
    }

    #[test]
    fn curve_bands_are_the_step_intervals_of_the_mean_curve() {
        // Step 0 is the same for every item (no spread); step 1 is a 0/1 variable with
        // p = 0.3, whose band must match the scalar bootstrap's width; step 2 is step 1 + 1.
        let n = 1000;
        let items: Vec<Vec<f32>> = (0..n)
            .map(|i| {
                let b = if i % 10 < 3 { 1.0 } else { 0.0 };
                vec![0.25, b, b + 1.0]
            })
            .collect();
        let refs: Vec<&[f32]> = items.iter().map(|v| v.as_slice()).collect();
        let c = curve_estimate(&refs, 2000, 3);
        assert_eq!(c.n, n);
        assert_eq!((c.mean[0], c.lo[0], c.hi[0]), (0.25, 0.25, 0.25));
        assert!((c.mean[1] - 0.3).abs() < 1e-6 && (c.mean[2] - 1.3).abs() < 1e-6);
        let half = 1.96 * (0.3f32 * 0.7 / n as f32).sqrt();
        assert!(
            (c.hi[1] - c.lo[1] - 2.0 * half).abs() < 0.25 * 2.0 * half,
            "{c:?}"
        );
        // The same resampled items at every step: step 2's band is step 1's, moved by 1.
        assert!((c.lo[2] - c.lo[1] - 1.0).abs() < 1e-5 && (c.hi[2] - c.hi[1] - 1.0).abs() < 1e-5);
        for k in 0..3 {
            assert!(c.lo[k] <= c.mean[k] && c.mean[k] <= c.hi[k]);
        }
        // No items: an empty curve, not NaNs.
        assert_eq!(curve_estimate(&[], 100, 1), CurveEstimate::default());
    }

    #[test]
    fn mean_removal_fills_the_image_with_its_mean_colour() {
        let img = Rgb8 {
            width: 2,
            height: 1,
            data: vec![0, 10, 255, 100, 30, 0],
        };
        let m = Removal::Mean.apply(&img);
        assert_eq!(m.data, vec![50, 20, 128, 50, 20, 128]);
        assert_eq!(Removal::parse("mean"), Ok(Removal::Mean));
        assert!(Removal::parse("zero").unwrap_err().contains("blur or mean"));
    }

    #[test]
    fn auc_of_simple_curves() {
        assert_eq!(auc(&[1.0, 1.0]), 1.0);
        assert_eq!(auc(&[1.0, 0.0]), 0.5);
        assert!((auc(&[0.0, 0.5, 1.0]) - 0.5).abs() < 1e-6);
        assert!(random_map(14, 14, 1)
            .iter()
            .all(|v| (0.0..=1.0).contains(v)));
        let c = centre_map(9, 9);
        assert_eq!(c[4 * 9 + 4], 1.0);
    }
}

/// Options of `fam-cli eval`.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub run: crate::run::RunOptions,
    /// Deletion / insertion steps.
    pub steps: usize,
    /// Items (explained image, reference) evaluated at most.
    pub max_items: usize,
    /// Replaces the pipeline's similarity kind (same plugin), e.g. `euclidean`.
    pub metric: Option<String>,
    /// Replaces a `few_shot` task's `contrast`.
    pub contrast: Option<crate::pipeline::Contrast>,
    /// Leaves out the occlusion baseline (which costs a forward pass per patch).
    pub skip_occlusion: bool,
    /// What deletion and insertion replace pixels with.
    pub removal: Removal,
    /// The rescaled areas need removing every pixel to lower the score by more than this
    /// share of it ([`faithfulness`]).
    pub min_range: f32,
    /// Bootstrap resamples per interval.
    pub resamples: usize,
    /// Only these methods (FAM is always first); `None`: all of [`methods`].
    pub methods: Option<Vec<String>>,
    /// Masks per CorrRISE map.
    pub rise_masks: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            run: Default::default(),
            steps: 16,
            max_items: 24,
            metric: None,
            contrast: None,
            skip_occlusion: false,
            removal: Removal::Blur,
            min_range: 0.05,
            resamples: 2000,
            methods: None,
            rise_masks: 500,
        }
    }
}

pub use fam_core::records::{EvalReport, MethodSummary};

/// The baselines, in table order (FAM and, for `few_shot` tasks, FAM with the other
/// `contrast` come first).
pub const BASELINES: [&str; 9] = [
    "gradient",
    "activation",
    "decomposition",
    "point-specific",
    "sbsm",
    "corrrise",
    "occlusion",
    "centre",
    "random",
];

/// The methods of a run, in table order. `few_shot` tasks add FAM with the other
/// `contrast`, scored on the same target. `only` keeps the named ones (FAM always);
/// an unknown name is an error that lists the known ones.
pub fn methods(
    task: &crate::pipeline::TaskSection,
    skip_occlusion: bool,
    only: Option<&[String]>,
) -> Result<Vec<String>> {
    use crate::pipeline::{Contrast, TaskSection};
    let mut m = vec!["fam".to_string()];
    if let TaskSection::FewShot { contrast, .. } = task {
        m.push(match contrast {
            Contrast::None => "fam (contrast=others)".into(),
            Contrast::Others => "fam (contrast=none)".into(),
        });
    }
    for b in BASELINES {
        if !(skip_occlusion && b == "occlusion") {
            m.push(b.into());
        }
    }
    if let Some(only) = only {
        if let Some(bad) = only.iter().find(|o| !m.contains(o)) {
            return Err(FamError::invalid(format!(
                "--methods: unknown method `{bad}` (known: {})",
                m.join(", ")
            )));
        }
        m.retain(|x| x == "fam" || only.contains(x));
    }
    Ok(m)
}

/// Runs the pipeline's task once per weighting (and, for `few_shot`, once with the other
/// `contrast`), then scores every map it produced, and the baselines, on the same items.
/// An item is one side of a comparison that has an image and a map: it is re-scored against
/// the score its map explains ([`Target`]), so prototypes, centroids and contrasts are
/// handled exactly. Items are taken best rank first (rank-1 matches of every query, then
/// rank 2, ...).
pub fn run_eval(
    p: &crate::pipeline::LoadedPipeline,
    host: &mut crate::loader::PluginHost,
    opts: &EvalOptions,
    progress: &dyn crate::run::Progress,
) -> Result<EvalReport> {
    use crate::pipeline::{Contrast, TaskSection};
    use fam_core::explain::Weighting;
    let mut p = p.clone();
    if let Some(m) = &opts.metric {
        p.pipeline.similarity.kind = m.clone();
    }
    // The eval scores each side's map; the contrast maps beside them would go unused.
    p.pipeline.explain.contrast_maps = false;
    if let Some(c) = opts.contrast {
        match &mut p.pipeline.task {
            TaskSection::FewShot { contrast, .. } => *contrast = c,
            _ => return Err(FamError::invalid(
                "--contrast applies to few_shot tasks only (the task has no competing references)",
            )),
        }
    }
    let p = &p;
    let (session, mut out, output) = open_eval(p, host, opts)?;
    let methods = methods(
        &p.pipeline.task,
        opts.skip_occlusion,
        opts.methods.as_deref(),
    )?;
    let flipped = match &p.pipeline.task {
        TaskSection::FewShot { contrast, .. } => Some(match contrast {
            Contrast::None => Contrast::Others,
            Contrast::Others => Contrast::None,
        }),
        _ => None,
    };
    // Explanations by method name.
    let mut explanations = std::collections::HashMap::new();
    let mut runs = vec![
        ("fam", Weighting::Contribution, None),
        ("gradient", Weighting::Gradient, None),
        ("activation", Weighting::Activation, None),
    ];
    runs.retain(|(name, _, _)| methods.iter().any(|m| m == name));
    if let (Some(c), Some(flip)) = (flipped, methods.iter().find(|m| m.starts_with("fam ("))) {
        runs.push((flip.as_str(), Weighting::Contribution, Some(c)));
    }
    for (name, w, contrast) in runs {
        let mut pw = p.clone();
        pw.pipeline.explain.weighting = w;
        if let (Some(c), TaskSection::FewShot { contrast: tc, .. }) =
            (contrast, &mut pw.pipeline.task)
        {
            *tc = c;
        }
        let (mut timings, mut counts, mut failures, mut partial) = Default::default();
        let mut ctx = crate::tasks::TaskContext {
            p: &pw,
            session: &session,
            output: &output,
            progress,
            timings: &mut timings,
            counts: &mut counts,
            failures: &mut failures,
            partial: &mut partial,
            shard: None,
            checkpoint: None,
        };
        let e = crate::tasks::task_of(&pw.pipeline.task)
            .run(&mut ctx, &mut out)?
            .explanation;
        explanations.insert(name.to_string(), e);
    }
    let base = &explanations["fam"];
    // (comparison index, side), best rank first.
    let mut items = Vec::new();
    for (ci, c) in base.comparisons.iter().enumerate() {
        for (side, s) in [(0, &c.query), (1, &c.reference)] {
            if s.image.is_some() && s.map.is_some() && s.target.is_some() {
                items.push((c.rank.unwrap_or(usize::MAX), ci, side));
            }
        }
    }
    items.sort();
    items.truncate(opts.max_items);
    if items.is_empty() {
        return Err(FamError::invalid(
            "nothing to evaluate: the task produced no maps of images",
        ));
    }
    let side_of = |e: &fam_core::explain::Explanation, ci: usize, side: usize| {
        e.comparisons.get(ci).map(|c| {
            if side == 0 {
                c.query.clone()
            } else {
                c.reference.clone()
            }
        })
    };
    let target_name = match &p.pipeline.task {
        TaskSection::FewShot {
            contrast: Contrast::Others,
            ..
        } => "margin over the other classes",
        _ => "similarity",
    };
    progress.stage("evaluate", (items.len() * methods.len()) as u64);
    let mut per_method: Vec<Vec<Faithfulness>> = vec![Vec::new(); methods.len()];
    // Forward passes per map beyond the task's own (SBSM's depend on the view's size). The
    // decompositions need only the feature maps the task computes anyway (eval computes
    // them again, one pass per image, because the task does not keep them).
    let mut passes: Vec<usize> = methods
        .iter()
        .map(|m| match m.as_str() {
            "corrrise" => opts.rise_masks.max(2),
            "occlusion" => 1 + h_cells(&items, base),
            _ => 0,
        })
        .collect();
    let mut rows = Vec::new();
    // The first items, with every method's map, for the renderers' figure.
    const EXAMPLES: usize = 4;
    let mut examples = Vec::new();
    for (n, &(_, ci, side)) in items.iter().enumerate() {
        let s = side_of(base, ci, side).expect("item from base");
        let (q, target) = (s.image.unwrap(), s.target.clone().unwrap());
        let view = &base.images[q].view;
        let (w, h) = (view.width as usize, view.height as usize);
        let blurred = opts.removal.apply(view);
        let scorer = Scorer {
            backbone: session.backbone.as_ref(),
            similarity: session.similarity.as_ref(),
            spec: &session.spec,
            target: &target,
            batch: p.pipeline.run.batch_size,
        };
        let c = &base.comparisons[ci];
        let other = if side == 0 { &c.reference } else { &c.query };
        let mut row = serde_json::Map::new();
        row.insert("comparison".into(), c.id.clone().into());
        row.insert(
            "image".into(),
            base.images[q].source.display().to_string().into(),
        );
        row.insert("reference".into(), other.label.clone().into());
        // Feature maps of both images, for the decomposition baselines.
        let wants = |m: &str| methods.iter().any(|x| x == m);
        let features = |image: usize| -> Result<crate::baselines::ImageFeatures> {
            let v = &base.images[image].view;
            let (vw, vh) = (v.width as usize, v.height as usize);
            let px: Vec<f32> = v.data.iter().map(|&x| x as f32).collect();
            crate::baselines::ImageFeatures::of(
                session.backbone.as_ref(),
                chw(&px, vw, vh, &session.spec),
                (vw, vh),
            )
        };
        let (mut own, mut theirs) = (None, None);
        if wants("decomposition") || wants("point-specific") {
            let f = features(q)?;
            let size = (f.height, f.width);
            let e = crate::baselines::locations(session.backbone.as_ref(), &f, &target)?;
            own = Some((e, size));
            if let (true, Some(oi)) = (wants("point-specific"), other.image) {
                let fo = features(oi)?;
                theirs = Some(crate::baselines::locations(
                    session.backbone.as_ref(),
                    &fo,
                    &target,
                )?);
            }
        }
        let mut example_maps = Vec::new();
        for (mi, method) in methods.iter().enumerate() {
            let map = match method.as_str() {
                "decomposition" => match &own {
                    Some((e, size)) => crate::baselines::decomposition_map(
                        session.similarity.as_ref(),
                        &target,
                        e,
                    )?
                    .map(|m| crate::baselines::to_view(&m, *size, (w, h))),
                    None => None,
                },
                "point-specific" => match (&own, &theirs) {
                    (Some((e, size)), Some(r)) => crate::baselines::point_specific_map(
                        session.similarity.as_ref(),
                        &target,
                        e,
                        r,
                    )?
                    .map(|m| crate::baselines::to_view(&m, *size, (w, h))),
                    _ => None,
                },
                "sbsm" => {
                    let (m, n) = crate::baselines::sbsm_map(&scorer, view)?;
                    passes[mi] = n;
                    Some(m)
                }
                "corrrise" => Some(crate::baselines::corrrise_map(
                    &scorer,
                    view,
                    opts.rise_masks,
                    n as u64 + 1,
                )?),
                "occlusion" => Some(occlusion_map(&scorer, view, &blurred, (w / 7).max(1))?),
                "centre" => Some(centre_map(w, h)),
                "random" => Some(random_map(w, h, n as u64 + 1)),
                name => explanations
                    .get(name)
                    .and_then(|e| side_of(e, ci, side))
                    .and_then(|s| s.map)
                    .map(|m| m.upsampled.normalized()),
            };
            let Some(map) = map else {
                progress.advance(1);
                continue;
            };
            if n < EXAMPLES {
                example_maps.push((method.clone(), map.clone()));
            }
            let f = faithfulness(&scorer, view, &blurred, &map, opts.steps, opts.min_range)?;
            row.insert(
                method.to_string(),
                serde_json::json!({"score": f.score, "drop": f.drop, "increase": f.increase, "deletion_auc": f.deletion_auc, "insertion_auc": f.insertion_auc, "deletion_auc_range": f.deletion_auc_range, "insertion_auc_range": f.insertion_auc_range}),
            );
            per_method[mi].push(f);
            progress.advance(1);
        }
        rows.push(serde_json::Value::Object(row));
        if n < EXAMPLES {
            examples.push(fam_core::records::EvalExample {
                label: format!("{} vs {}", s.label, other.label),
                view: view.clone(),
                maps: example_maps,
            });
        }
    }
    progress.finish_stage();
    let summaries = methods
        .iter()
        .zip(&per_method)
        .zip(&passes)
        .map(|((m, fs), &passes)| summarize(m, fs, opts.steps, opts.resamples, passes))
        .collect();
    let report = EvalReport {
        pipeline: p.path.display().to_string(),
        backbone: session.backbone.describe(),
        similarity: session.similarity.name(),
        target: target_name.into(),
        steps: opts.steps,
        removal: opts.removal.name().into(),
        resamples: opts.resamples,
        summaries,
        items: rows,
        examples,
    };
    use crate::output::OutputSink;
    render_eval(&session, &mut out, &report)?;
    out.set_writer("fam eval");
    out.write(
        "eval.json",
        &serde_json::to_vec_pretty(&report).map_err(|e| FamError::invalid(e.to_string()))?,
    )?;
    Ok(report)
}

/// Reads a saved `eval.json` and draws its figures again with the pipeline's renderers into
/// the output folder (no model runs): `fam-cli eval --replot`. The figure of scored maps
/// needs the maps, which `eval.json` does not keep, so only the curves are drawn.
pub fn replot(
    p: &crate::pipeline::LoadedPipeline,
    host: &mut crate::loader::PluginHost,
    opts: &EvalOptions,
    saved: &std::path::Path,
) -> Result<EvalReport> {
    let bytes = std::fs::read(saved).map_err(|e| FamError::io(saved, e))?;
    let report: EvalReport = serde_json::from_slice(&bytes).map_err(|e| {
        FamError::invalid(format!(
            "{}: not an eval.json of this version of fam ({e})",
            saved.display()
        ))
    })?;
    let (session, mut out, _) = open_eval(p, host, opts)?;
    render_eval(&session, &mut out, &report)?;
    Ok(report)
}

/// The plugins' objects and the output folder of an eval (`--output`, or the pipeline's),
/// with its path.
fn open_eval(
    p: &crate::pipeline::LoadedPipeline,
    host: &mut crate::loader::PluginHost,
    opts: &EvalOptions,
) -> Result<(
    crate::run::Session,
    crate::output::OutputDir,
    std::path::PathBuf,
)> {
    let output = opts
        .run
        .output
        .clone()
        .unwrap_or_else(|| p.pipeline.run.output.clone());
    let session = crate::run::Session::open(p, host, &opts.run)?;
    let out = crate::output::OutputDir::create(&output)?;
    Ok((session, out, output))
}

/// Every renderer draws the report (the `panel` renderer: `eval-curves.png`, `eval-maps.png`).
fn render_eval(
    session: &crate::run::Session,
    out: &mut crate::output::OutputDir,
    report: &EvalReport,
) -> Result<()> {
    for r in &session.renderers {
        out.set_writer(&r.name());
        r.render_eval(report, out)?;
    }
    Ok(())
}

/// Occlusion's patches per map: a 7x7 grid of side/7 squares (more where side/7 rounds
/// down), for the first item's view.
fn h_cells(items: &[(usize, usize, usize)], base: &fam_core::explain::Explanation) -> usize {
    items
        .first()
        .and_then(|&(_, ci, side)| {
            let c = base.comparisons.get(ci)?;
            let s = if side == 0 { &c.query } else { &c.reference };
            let v = &base.images.get(s.image?)?.view;
            let (w, h) = (v.width as usize, v.height as usize);
            let p = (w / 7).max(1);
            Some(w.div_ceil(p) * h.div_ceil(p))
        })
        .unwrap_or(49)
}

/// Means over the items with their bootstrap intervals. Average Drop and the `s_k / s`
/// curves use the items with a positive score (a share of the score means something only
/// there; the others are counted in `skipped` and as undefined); the rescaled areas use the
/// items whose score removing every pixel lowers enough ([`faithfulness`]).
fn summarize(
    method: &str,
    fs: &[Faithfulness],
    steps: usize,
    resamples: usize,
    passes_per_map: usize,
) -> MethodSummary {
    let pos: Vec<&Faithfulness> = fs.iter().filter(|f| f.score > 0.0).collect();
    let curve = |seed: u64, get: &dyn Fn(&Faithfulness) -> Option<&[f32]>| {
        let curves: Vec<&[f32]> = fs
            .iter()
            .filter_map(get)
            .filter(|c| c.len() == steps + 1)
            .collect();
        curve_estimate(&curves, resamples, seed)
    };
    // Each metric gets its own seed, so that two metrics' intervals are not resampled alike.
    let est = |seed: u64, get: &dyn Fn(&Faithfulness) -> Option<f32>| {
        let v: Vec<f32> = fs.iter().filter_map(get).collect();
        estimate(&v, fs.len() - v.len(), resamples, seed)
    };
    MethodSummary {
        method: method.to_string(),
        items: fs.len(),
        skipped: fs.len() - pos.len(),
        average_drop: est(1, &|f| f.drop.map(|d| 100.0 * d)),
        increase_in_confidence: est(2, &|f| Some(if f.increase { 100.0 } else { 0.0 })),
        deletion_auc: est(3, &|f| f.deletion_auc),
        insertion_auc: est(4, &|f| f.insertion_auc),
        deletion_auc_range: est(5, &|f| f.deletion_auc_range),
        insertion_auc_range: est(6, &|f| f.insertion_auc_range),
        deletion_curve: curve(7, &|f| (f.score > 0.0).then_some(f.deletion.as_slice())),
        insertion_curve: curve(8, &|f| (f.score > 0.0).then_some(f.insertion.as_slice())),
        deletion_curve_range: curve(9, &|f| f.deletion_range.as_deref()),
        insertion_curve_range: curve(10, &|f| f.insertion_range.as_deref()),
        passes_per_map,
    }
}

/// The metrics of a summary: name, whether lower is better, and the estimate.
pub fn metrics(m: &MethodSummary) -> [(&'static str, bool, Estimate); 6] {
    [
        ("AvgDrop%", true, m.average_drop),
        ("IC%", false, m.increase_in_confidence),
        ("Del/s", true, m.deletion_auc),
        ("Ins/s", false, m.insertion_auc),
        ("Del(rng)", true, m.deletion_auc_range),
        ("Ins(rng)", false, m.insertion_auc_range),
    ]
}

/// FAM (the first method) against each other method, metric by metric: `win` or `loss`
/// where the 95% intervals separate, `tie` where they overlap (lists, one line a method).
pub fn verdicts(report: &EvalReport) -> Vec<String> {
    let Some(first) = report.summaries.first() else {
        return Vec::new();
    };
    report.summaries[1..]
        .iter()
        .map(|other| {
            let parts: Vec<String> = metrics(first)
                .iter()
                .zip(metrics(other))
                .filter(|((_, _, a), (_, _, b))| a.n > 0 && b.n > 0)
                .map(|((name, lower, a), (_, _, b))| {
                    let word = if !a.separated(&b) {
                        "tie"
                    } else if (a.mean < b.mean) == *lower {
                        "win"
                    } else {
                        "loss"
                    };
                    format!("{name} {word}")
                })
                .collect();
            let said = if parts.is_empty() {
                "no map for any item".to_string()
            } else {
                parts.join(", ")
            };
            format!("{} vs {}: {said}", first.method, other.method)
        })
        .collect()
}

/// The summary as a text table: each metric's mean and 95% interval, then FAM's wins and
/// losses (intervals that separate).
pub fn table(report: &EvalReport) -> String {
    let mut s = format!(
        "{} ({}, {}, {} steps, removal {}, 95% bootstrap intervals over {} resamples)\n{:<21} {:>5} {:>5}",
        report.backbone,
        report.similarity,
        report.target,
        report.steps,
        report.removal,
        report.resamples,
        "method",
        "items",
        "s<=0",
    );
    let cell = |e: &Estimate, wide: bool| {
        if e.n == 0 {
            "—".to_string()
        } else if wide {
            format!("{:.1} [{:.1}, {:.1}]", e.mean, e.lo, e.hi)
        } else {
            format!("{:.3} [{:.3}, {:.3}]", e.mean, e.lo, e.hi)
        }
    };
    if let Some(m) = report.summaries.first() {
        for (name, lower, _) in metrics(m) {
            let arrow = if lower { "↓" } else { "↑" };
            s.push_str(&format!(" {:>22}", format!("{name}{arrow}")));
        }
        s.push_str(&format!(" {:>7}\n", "passes"));
    }
    for m in &report.summaries {
        s.push_str(&format!("{:<21} {:>5} {:>5}", m.method, m.items, m.skipped));
        for (i, (_, _, e)) in metrics(m).iter().enumerate() {
            s.push_str(&format!(" {:>22}", cell(e, i < 2)));
        }
        s.push_str(&format!(" {:>7}\n", m.passes_per_map));
    }
    if let Some(m) = report.summaries.first() {
        let undefined: Vec<String> = metrics(m)
            .iter()
            .filter(|(_, _, e)| e.undefined > 0)
            .map(|(name, _, e)| format!("{name} {}", e.undefined))
            .collect();
        if !undefined.is_empty() {
            s.push_str(&format!(
                "undefined, left out (of {} items): {}\n",
                m.items,
                undefined.join(", ")
            ));
        }
    }
    for v in verdicts(report) {
        s.push_str(&v);
        s.push('\n');
    }
    s
}
