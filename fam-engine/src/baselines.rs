//! The maps `fam-cli eval` compares FAM with, other than FAM's own weightings: the methods
//! the literature on explaining similarity models proposes, and simple references.
//!
//! | method             | source                                         | forward passes per map |
//! |--------------------|------------------------------------------------|------------------------|
//! | `decomposition`    | Stylianou et al. 2019; Zhu et al. 2019 overall | 0 (the task's maps)    |
//! | `point-specific`   | Zhu et al. 2019, point-specific                | 0 (both images' maps)  |
//! | `sbsm`             | xaitk-saliency's `SBSMStack`                   | 1 + one per window     |
//! | `corrrise`         | Lu et al. 2024, CorrRISE                       | one per mask           |
//! | `occlusion`        | a 7 × 7 grid of removed patches                | 1 + one per patch      |
//! | `centre`, `random` | priors                                         | 0                      |
//!
//! No backward pass is needed by any of them. The decomposition maps use the exact split of
//! the score over locations ([`fam_core::decompose`]); the two papers' equations coincide
//! for an embedding that is a pooled (or linearly projected) feature map, so one method
//! stands for both.

use fam_core::decompose::{marginal, pairs, Locations};
use fam_core::error::Result;
use fam_core::explain::{Rgb8, Target};
use fam_core::traits::Similarity;

use crate::locations::norm;
pub use crate::locations::{locations, ImageFeatures};
use crate::scorer::Scorer;

/// Stylianou et al. 2019 / Zhu et al. 2019 (overall activation map): each location's exact
/// share of the score the map explains, at feature resolution (for a margin over other
/// references, the share of the margin). `None` where the metric has no inner-product form.
pub fn decomposition_map(
    similarity: &dyn Similarity,
    target: &Target,
    e: &Locations,
) -> Result<Option<Vec<f32>>> {
    let total = e.sum();
    let Some(form) = similarity.inner_product_form(&total, &target.reference)? else {
        return Ok(None);
    };
    let mut m = marginal(&form, e, &target.reference)?;
    let k = target.others.len() as f32;
    for o in &target.others {
        let Some(fo) = similarity.inner_product_form(&total, o)? else {
            return Ok(None);
        };
        for (a, b) in m.iter_mut().zip(marginal(&fo, e, o)?) {
            *a -= b / k;
        }
    }
    Ok(Some(m))
}

/// Zhu et al. 2019, point-specific activation map: the score's share of each location of
/// the explained image paired with one location of the reference image, the reference's
/// location with the largest share of the score. `None` where the reference is not that
/// image's embedding (a prototype, a margin), or the metric has no inner-product form.
pub fn point_specific_map(
    similarity: &dyn Similarity,
    target: &Target,
    e: &Locations,
    r: &Locations,
) -> Result<Option<Vec<f32>>> {
    if !target.others.is_empty() {
        return Ok(None);
    }
    let rs = r.sum();
    let gap = norm(
        &rs.iter()
            .zip(&target.reference)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>(),
    );
    if rs.len() != target.reference.len() || gap > 1e-3 * norm(&target.reference).max(1e-6) {
        return Ok(None);
    }
    let Some(form) = similarity.inner_product_form(&e.sum(), &target.reference)? else {
        return Ok(None);
    };
    let p = pairs(&form, e, r)?;
    let nr = r.len();
    let column = |j: usize| (0..e.len()).map(|i| p[i * nr + j]).sum::<f32>();
    let best = (0..nr)
        .max_by(|a, b| column(*a).total_cmp(&column(*b)).then(b.cmp(a)))
        .unwrap_or(0);
    Ok(Some((0..e.len()).map(|i| p[i * nr + best]).collect()))
}

/// A feature-resolution map brought to the view's size (bilinear, half-pixel centres) and
/// min-max normalized.
pub fn to_view(raw: &[f32], (fh, fw): (usize, usize), (w, h): (usize, usize)) -> Vec<f32> {
    fam_core::explain::min_max(&fam_core::explain::bilinear(raw, (fh, fw), (h, w)))
}

/// Window starts along one side as xaitk-saliency's `SlidingWindow` places them: every
/// `stride` from 0, shifted back by half the last window's overhang.
fn window_starts(side: usize, window: usize, stride: usize) -> Vec<isize> {
    let starts: Vec<isize> = (0..side)
        .step_by(stride.max(1))
        .map(|s| s as isize)
        .collect();
    let last = *starts.last().unwrap_or(&0);
    let overhang = window as isize - (side as isize - last);
    starts.iter().map(|s| s - overhang.div_euclid(2)).collect()
}

/// SBSM (xaitk-saliency's `SBSMStack`, similarity-based saliency): windows of 50 × 50 pixels
/// every 20 pixels at 224 px (scaled to the view), filled with black; each window is weighted
/// by how much it lowers the score (`max(s − s_window, 0)`, the score in place of the
/// proximity), the weights summed per pixel over the windows covering it and divided by
/// their number, and the map scaled by its largest value. Returns the map and the passes.
pub fn sbsm_map(scorer: &Scorer, view: &Rgb8) -> Result<(Vec<f32>, usize)> {
    let (w, h) = (view.width as usize, view.height as usize);
    let scaled = |v: usize, side: usize| ((v * side) as f32 / 224.0).round().max(1.0) as usize;
    let (win_h, win_w) = (scaled(50, h), scaled(50, w));
    let (st_h, st_w) = (scaled(20, h), scaled(20, w));
    let orig: Vec<f32> = view.data.iter().map(|&v| v as f32).collect();
    let mut boxes = Vec::new();
    let mut variants = vec![orig.clone()];
    for r in window_starts(h, win_h, st_h) {
        for c in window_starts(w, win_w, st_w) {
            let (y0, y1) = (
                r.max(0) as usize,
                ((r + win_h as isize).max(0) as usize).min(h),
            );
            let (x0, x1) = (
                c.max(0) as usize,
                ((c + win_w as isize).max(0) as usize).min(w),
            );
            let mut v = orig.clone();
            for y in y0..y1 {
                for x in x0..x1 {
                    let p = y * w + x;
                    v[3 * p..3 * p + 3].fill(0.0);
                }
            }
            boxes.push((y0, y1, x0, x1));
            variants.push(v);
        }
    }
    let s = scorer.scores((w, h), &variants)?;
    let mut sal = vec![0f32; w * h];
    let mut count = vec![0f32; w * h];
    for (i, &(y0, y1, x0, x1)) in boxes.iter().enumerate() {
        let diff = (s[0] - s[i + 1]).max(0.0);
        for y in y0..y1 {
            for x in x0..x1 {
                sal[y * w + x] += diff;
                count[y * w + x] += 1.0;
            }
        }
    }
    for (v, n) in sal.iter_mut().zip(&count) {
        *v /= n.max(1.0);
    }
    let top = sal.iter().fold(0f32, |m, v| m.max(v.abs()));
    if top > 0.0 {
        sal.iter_mut()
            .for_each(|v| *v = (*v / top).clamp(-1.0, 1.0));
    }
    Ok((sal, variants.len()))
}

/// RISE masks (Petsiuk et al. 2018): a `grid × grid` binary grid, each cell kept with
/// probability `p`, upsampled bilinearly to `(grid + 1)` cells of `ceil(side / grid)` and
/// cropped at a random shift within one cell. Values in [0, 1], `h × w` each.
pub fn rise_masks(
    n: usize,
    grid: usize,
    p: f32,
    (w, h): (usize, usize),
    seed: u64,
) -> Vec<Vec<f32>> {
    let mut state = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let grid = grid.max(1);
    let (ch, cw) = (h.div_ceil(grid), w.div_ceil(grid));
    let (uh, uw) = ((grid + 1) * ch, (grid + 1) * cw);
    (0..n)
        .map(|_| {
            let cells: Vec<f32> = (0..grid * grid)
                .map(|_| if next() < p { 1.0 } else { 0.0 })
                .collect();
            let up = fam_core::explain::bilinear(&cells, (grid, grid), (uh, uw));
            let dy = ((next() * ch as f32) as usize).min(ch - 1);
            let dx = ((next() * cw as f32) as usize).min(cw - 1);
            (0..h)
                .flat_map(|y| {
                    let row = (y + dy) * uw;
                    let up = &up;
                    (0..w).map(move |x| up[row + x + dx])
                })
                .collect()
        })
        .collect()
}

/// CorrRISE (Lu et al. 2024, "Towards Visual Saliency Explanations of Face Verification"):
/// the image under `n` RISE masks (7 × 7 grid, p = 0.5; masked pixels blend towards the
/// model's mean colour, the zero of its normalized input, as RISE does), and each pixel's
/// Pearson correlation, over the masks, between its mask value and the score. The
/// similarity map is the positive part (the negative part is the paper's dissimilarity
/// map).
pub fn corrrise_map(scorer: &Scorer, view: &Rgb8, n: usize, seed: u64) -> Result<Vec<f32>> {
    let (w, h) = (view.width as usize, view.height as usize);
    let masks = rise_masks(n.max(2), 7, 0.5, (w, h), seed);
    let fill: Vec<f32> = scorer.spec.mean.iter().map(|m| m * 255.0).collect();
    let orig: Vec<f32> = view.data.iter().map(|&v| v as f32).collect();
    // Scored in slices so that only a batch of masked images is held at once.
    let mut s = Vec::with_capacity(masks.len());
    for chunk in masks.chunks(scorer.batch.max(1)) {
        let variants: Vec<Vec<f32>> = chunk
            .iter()
            .map(|m| {
                orig.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let k = m[i / 3];
                        k * v + (1.0 - k) * fill[i % 3]
                    })
                    .collect()
            })
            .collect();
        s.extend(scorer.scores((w, h), &variants)?);
    }
    let nm = masks.len() as f64;
    let s_mean = s.iter().map(|&v| v as f64).sum::<f64>() / nm;
    let s_var = s.iter().map(|&v| (v as f64 - s_mean).powi(2)).sum::<f64>();
    let mut map = vec![0f32; w * h];
    if s_var <= 0.0 {
        return Ok(map);
    }
    for (p, out) in map.iter_mut().enumerate() {
        let m_mean = masks.iter().map(|m| m[p] as f64).sum::<f64>() / nm;
        let (mut cov, mut var) = (0f64, 0f64);
        for (m, &sv) in masks.iter().zip(&s) {
            let dm = m[p] as f64 - m_mean;
            cov += dm * (sv as f64 - s_mean);
            var += dm * dm;
        }
        if var > 0.0 {
            *out = ((cov / (var * s_var).sqrt()) as f32).max(0.0);
        }
    }
    Ok(map)
}

/// Occlusion baseline: slide a `patch`-pixel square (replaced by the blurred image) over a
/// grid; the map is the score drop of each position, spread over its patch.
pub fn occlusion_map(
    scorer: &Scorer,
    view: &Rgb8,
    blurred: &Rgb8,
    patch: usize,
) -> Result<Vec<f32>> {
    let (w, h) = (view.width as usize, view.height as usize);
    let orig: Vec<f32> = view.data.iter().map(|&v| v as f32).collect();
    let blur: Vec<f32> = blurred.data.iter().map(|&v| v as f32).collect();
    let patch = patch.max(1);
    let mut cells = Vec::new();
    let mut variants = vec![orig.clone()];
    for y0 in (0..h).step_by(patch) {
        for x0 in (0..w).step_by(patch) {
            let mut v = orig.clone();
            for y in y0..(y0 + patch).min(h) {
                for x in x0..(x0 + patch).min(w) {
                    let p = y * w + x;
                    v[3 * p..3 * p + 3].copy_from_slice(&blur[3 * p..3 * p + 3]);
                }
            }
            cells.push((x0, y0));
            variants.push(v);
        }
    }
    let s = scorer.scores((w, h), &variants)?;
    let mut map = vec![0f32; w * h];
    for (i, &(x0, y0)) in cells.iter().enumerate() {
        let drop = s[0] - s[i + 1];
        for y in y0..(y0 + patch).min(h) {
            for x in x0..(x0 + patch).min(w) {
                map[y * w + x] = drop;
            }
        }
    }
    Ok(fam_core::explain::min_max(&map))
}

/// A centred Gaussian prior (sigma a quarter of the side), in [0, 1].
pub fn centre_map(w: usize, h: usize) -> Vec<f32> {
    let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
    let (sx, sy) = (w as f32 / 4.0, h as f32 / 4.0);
    (0..h)
        .flat_map(|y| {
            (0..w).map(move |x| {
                (-((x as f32 - cx).powi(2) / (2.0 * sx * sx)
                    + (y as f32 - cy).powi(2) / (2.0 * sy * sy)))
                    .exp()
            })
        })
        .collect()
}

/// A random map (fixed seed), smooth at the scale of a 7x7 grid like CNN maps.
pub fn random_map(w: usize, h: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let grid: Vec<f32> = (0..49).map(|_| next()).collect();
    (0..h)
        .flat_map(|y| (0..w).map(move |x| (y * 7 / h.max(1), x * 7 / w.max(1))))
        .map(|(gy, gx)| grid[gy * 7 + gx])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use fam_core::candle::{Device, Tensor};
    use fam_core::traits::{Backbone, Features, InputSpec, ResizePolicy};

    /// The image itself as a 3-channel feature map, pooled: every location is a pixel.
    struct Pixels;
    impl Backbone for Pixels {
        fn describe(&self) -> String {
            "pixels".into()
        }
        fn input_spec(&self) -> InputSpec {
            InputSpec {
                resize: ResizePolicy::Exact {
                    width: 5,
                    height: 4,
                },
                mean: [0.0; 3],
                std: [1.0; 3],
            }
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn forward(&self, batch: &Tensor) -> Result<Features> {
            Features::from_maps(batch.clone())
        }
    }

    use crate::eval::tests::Dot;

    /// A 5 × 4 image, channel-major, with a spot of `colour` at `(x, y)` on a dim ground.
    fn spot(x: usize, y: usize, colour: [f32; 3]) -> Vec<f32> {
        let mut v = vec![0.05f32; 3 * 20];
        for (c, k) in colour.iter().enumerate() {
            v[c * 20 + y * 5 + x] = *k;
        }
        v
    }

    #[test]
    fn decomposition_adds_up_and_point_specific_finds_the_shifted_spot() {
        let bb = Pixels;
        // The same red spot, moved from (1, 1) to (3, 2), beside a blue spot at (4, 0)/(0, 3).
        let mut a = spot(1, 1, [1.0, 0.0, 0.0]);
        let mut b = spot(3, 2, [1.0, 0.0, 0.0]);
        a[2 * 20 + 4] = 0.6;
        b[2 * 20 + 3 * 5] = 0.6;
        let fa = ImageFeatures::of(&bb, a, (5, 4)).unwrap();
        let fb = ImageFeatures::of(&bb, b, (5, 4)).unwrap();
        let target = Target::new(&fb.embedding);
        let ea = locations(&bb, &fa, &target).unwrap();
        let eb = locations(&bb, &fb, &target).unwrap();
        let s = Dot.score(&fa.embedding, &fb.embedding).unwrap();
        let m = decomposition_map(&Dot, &target, &ea).unwrap().unwrap();
        assert!((m.iter().sum::<f32>() - s).abs() < 1e-5);
        // Location by location: a_i · b̄ / N.
        let n = 20.0;
        for (i, mi) in m.iter().enumerate() {
            let want: f32 = (0..3)
                .map(|c| fa.maps[c * 20 + i] * fb.embedding[c])
                .sum::<f32>()
                / n;
            assert!((mi - want).abs() < 1e-6);
        }
        // The reference's best location is its red spot; the point-specific map of `a`
        // for it peaks at the red spot of `a`.
        let p = point_specific_map(&Dot, &target, &ea, &eb)
            .unwrap()
            .unwrap();
        let peak = (0..20).max_by(|x, y| p[*x].total_cmp(&p[*y])).unwrap();
        assert_eq!(peak, 5 + 1);
        // A reference that is not the other image's embedding has no point-specific map.
        let proto = Target::new(&[1.0, 1.0, 1.0]);
        assert!(point_specific_map(&Dot, &proto, &ea, &eb)
            .unwrap()
            .is_none());
    }

    #[test]
    fn windows_are_placed_like_xaitk() {
        // xaitk: rows = arange(0, 224, 20) = 0..220; overhang = 50 − (224 − 220) = 46;
        // rows −= 23.
        let s = window_starts(224, 50, 20);
        assert_eq!(s.len(), 12);
        assert_eq!((s[0], s[11]), (-23, 197));
        // A window larger than the image still covers all of it.
        // rows = [0, 20], overhang 50 − 8 = 42, shifted back by 21.
        assert_eq!(window_starts(28, 50, 20), vec![-21, -1]);
    }

    #[test]
    fn rise_masks_keep_about_p_and_are_reproducible() {
        let a = rise_masks(200, 7, 0.5, (28, 28), 3);
        let b = rise_masks(200, 7, 0.5, (28, 28), 3);
        assert_eq!(a, b);
        let mean: f32 = a.iter().flatten().sum::<f32>() / (200.0 * 784.0);
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
        assert!(a.iter().flatten().all(|v| (0.0..=1.0).contains(v)));
    }
}
