//! A fam plugin with one similarity and one renderer, to copy and change.
//!
//! - similarity `mahalanobis_diag`: a diagonal Mahalanobis similarity with per-channel
//!   weights `w` (for example learned, or the inverse variance of each channel):
//!   `s(e, r) = ‖r‖²_W − ‖e − r‖²_W = Σ_k w_k e_k (2 r_k − e_k)`, whose exact channel
//!   contributions are `c_k = w_k e_k (2 r_k − e_k)`. With every `w_k = 1` it is fam's
//!   built-in `euclidean`.
//! - renderer `contours`: each map as outlines of its strongest regions (the pixels above
//!   each of `levels` times the map's maximum) drawn over the image the model saw.
//!
//! Each component's options are a serde struct read through `fam_core::options`, which
//! reports unknown keys (with a "did you mean"), wrong types and missing keys; a small
//! `check_*` function over the struct adds what serde cannot say (ranges, exclusive keys).
//!
//! `fam-cli plugins new NAME` writes a copy of this crate with `template` replaced by NAME.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use fam_core::explain::{Explanation, Rgb8, Side};
use fam_core::options::{self, serde::Deserialize};
use fam_core::output::OutputSink;
use fam_core::plugin::{Options, Registrar};
use fam_core::{FamError, Problem, Renderer, Result, Similarity};

// The declaration fam looks for: the plugin's name (as pipelines write it) and the function
// that registers what it provides.
fam_core::export_plugin!(name: "template", register: register);

/// Registers the plugin's similarity and renderer.
pub fn register(r: &mut Registrar) {
    r.similarity(
        "mahalanobis_diag",
        "diagonal Mahalanobis: s = Σ w_k e_k (2 r_k − e_k) (options: weights, weights_npy)",
        |o| options::check(o, "", check_similarity),
        |o| Ok(Box::new(MahalanobisDiag::from_options(o)?)),
    );
    r.renderer(
        "contours",
        "outlines of each map's strongest regions over the image (options: levels, width)",
        |o| options::check(o, "", check_contours),
        |o| Ok(Box::new(Contours::from_options(o)?)),
    );
}

/// The similarity's options, the keys of `[similarity]` besides `plugin` and `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "fam_core::options::serde", deny_unknown_fields)]
pub struct SimilarityOptions {
    /// One weight per channel, inline; default: every weight is 1.
    #[serde(default)]
    pub weights: Option<Vec<f32>>,
    /// Or a float32 vector saved with `numpy.save`, read when the similarity is created.
    #[serde(default)]
    pub weights_npy: Option<PathBuf>,
}

/// What serde cannot check; cheap and loads nothing, as `fam-cli validate` calls it.
fn check_similarity(o: &SimilarityOptions) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let Some(w) = &o.weights {
        if w.is_empty() || w.iter().any(|w| w.is_nan() || *w < 0.0) {
            problems.push(Problem::new(
                "weights",
                format!("{w:?} is not a list of non-negative numbers"),
            ));
        }
    }
    if o.weights.is_some() && o.weights_npy.is_some() {
        problems.push(Problem::new(
            "weights_npy",
            "give `weights` or `weights_npy`, not both",
        ));
    }
    problems
}

/// `s(e, r) = Σ_k w_k e_k (2 r_k − e_k)`.
pub struct MahalanobisDiag {
    /// Per-channel weights; `None` means every weight is 1.
    weights: Option<Vec<f32>>,
}

impl MahalanobisDiag {
    /// From the options of `[similarity]`: the same problems as `check_similarity`, as one
    /// error, or the similarity with its weights (read from `weights_npy` if given).
    pub fn from_options(o: &Options) -> Result<Self> {
        let o = options::load::<SimilarityOptions>(o, "", check_similarity)?;
        let weights = match (o.weights, o.weights_npy) {
            (Some(w), _) => Some(w),
            (None, Some(path)) => Some(read_weights(&path)?),
            (None, None) => None,
        };
        Ok(Self { weights })
    }

    /// The weight of each of `n` channels.
    fn weights(&self, e: &[f32], r: &[f32]) -> Result<Vec<f32>> {
        if e.len() != r.len() {
            return Err(FamError::invalid(format!(
                "embeddings have different sizes: {} and {}",
                e.len(),
                r.len()
            )));
        }
        match &self.weights {
            None => Ok(vec![1.0; e.len()]),
            Some(w) if w.len() == e.len() => Ok(w.clone()),
            Some(w) => Err(FamError::invalid(format!(
                "mahalanobis_diag has {} weights but the embedding has {} channels",
                w.len(),
                e.len()
            ))),
        }
    }
}

/// A vector of non-negative weights from a `.npy` file.
fn read_weights(path: &Path) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).map_err(|e| FamError::io(path, e))?;
    let (shape, data) = fam_core::output::read_npy_f32(&bytes)?;
    if shape.len() != 1 || data.iter().any(|w| w.is_nan() || *w < 0.0) {
        return Err(FamError::invalid(format!(
            "{}: the weights must be a vector of non-negative numbers, not shape {shape:?}",
            path.display()
        )));
    }
    Ok(data)
}
impl Similarity for MahalanobisDiag {
    fn name(&self) -> String {
        "mahalanobis_diag".into()
    }

    fn score(&self, e: &[f32], r: &[f32]) -> Result<f32> {
        Ok(self.contributions(e, r)?.iter().sum())
    }

    /// Exact: they add up to the score, so FAM's channel weights `c_k / Σ|c_j|` explain it.
    fn contributions(&self, e: &[f32], r: &[f32]) -> Result<Vec<f32>> {
        let w = self.weights(e, r)?;
        Ok((0..e.len())
            .map(|k| w[k] * e[k] * (2.0 * r[k] - e[k]))
            .collect())
    }

    /// `∂s/∂e_k = 2 w_k (r_k − e_k)`, for `weighting = "gradient"`.
    fn gradient(&self, e: &[f32], r: &[f32]) -> Result<Vec<f32>> {
        let w = self.weights(e, r)?;
        Ok((0..e.len()).map(|k| 2.0 * w[k] * (r[k] - e[k])).collect())
    }

    /// The Mahalanobis distance `‖e − r‖_W`, reported beside the score.
    fn distance(&self, e: &[f32], r: &[f32]) -> Result<Option<f32>> {
        let w = self.weights(e, r)?;
        let d2: f32 = (0..e.len()).map(|k| w[k] * (e[k] - r[k]).powi(2)).sum();
        Ok(Some(d2.sqrt()))
    }
}

/// The renderer's options, the keys of its `[[render]]` section besides `plugin` and `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "fam_core::options::serde", deny_unknown_fields)]
pub struct ContourOptions {
    /// Fractions of each map's maximum to outline, each between 0 and 1 (default 0.5, 0.8).
    #[serde(default = "default_levels")]
    pub levels: Vec<f32>,
    /// The outlines' width in pixels, 1 to 16 (default 2).
    #[serde(default = "default_width")]
    pub width: usize,
}

fn default_levels() -> Vec<f32> {
    vec![0.5, 0.8]
}

fn default_width() -> usize {
    2
}

fn check_contours(o: &ContourOptions) -> Vec<Problem> {
    let mut problems = Vec::new();
    if o.levels.is_empty() || !o.levels.iter().all(|l| *l > 0.0 && *l < 1.0) {
        problems.push(Problem::new(
            "levels",
            format!("{:?} is not a list of fractions between 0 and 1", o.levels),
        ));
    }
    if !(1..=16).contains(&o.width) {
        problems.push(Problem::new(
            "width",
            format!("{} is not 1 to 16 pixels", o.width),
        ));
    }
    problems
}

/// Draws the outline of `{p : map(p) ≥ level · max}` for each level over the image.
pub struct Contours {
    levels: Vec<f32>,
    width: usize,
}

impl Contours {
    pub fn from_options(o: &Options) -> Result<Self> {
        let ContourOptions { mut levels, width } =
            options::load::<ContourOptions>(o, "", check_contours)?;
        levels.sort_by(f32::total_cmp);
        Ok(Self { levels, width })
    }

    /// The image with the outlines of `map` (`height × width`, row-major) drawn on it.
    pub fn draw(&self, view: &Rgb8, map: &[f32], height: usize, width: usize) -> Rgb8 {
        let (w, h) = (view.width as usize, view.height as usize);
        let mut out = view.clone();
        let max = map.iter().copied().fold(0.0f32, f32::max);
        if max <= 0.0 || map.len() != height * width {
            return out;
        }
        // The map value under image pixel (x, y) (nearest, in case the sizes differ).
        let value = |x: usize, y: usize| map[(y * height / h) * width + x * width / w];
        for (i, level) in self.levels.iter().enumerate() {
            // Yellow for the lowest level to red for the highest.
            let t = if self.levels.len() > 1 {
                i as f32 / (self.levels.len() - 1) as f32
            } else {
                1.0
            };
            let colour = [255u8, (220.0 * (1.0 - t)) as u8, 0];
            let inside = |x: usize, y: usize| value(x, y) >= level * max;
            for y in 0..h {
                for x in 0..w {
                    // A boundary pixel: inside, with a 4-neighbour outside (or the border).
                    let edge = inside(x, y)
                        && (x == 0
                            || y == 0
                            || x + 1 == w
                            || y + 1 == h
                            || !inside(x - 1, y)
                            || !inside(x + 1, y)
                            || !inside(x, y - 1)
                            || !inside(x, y + 1));
                    if !edge {
                        continue;
                    }
                    for dy in 0..self.width.min(h - y) {
                        for dx in 0..self.width.min(w - x) {
                            let p = ((y + dy) * w + x + dx) * 3;
                            out.data[p..p + 3].copy_from_slice(&colour);
                        }
                    }
                }
            }
        }
        out
    }
}

impl Renderer for Contours {
    fn name(&self) -> String {
        "contours".into()
    }

    /// One PNG per map: `contours/<comparison>_a.png` (the explained image) and `_b.png`.
    fn render(&self, e: &Explanation, out: &mut dyn OutputSink) -> Result<()> {
        for c in &e.comparisons {
            for (tag, side) in [("a", &c.query), ("b", &c.reference)] {
                let Some(png) = self.side_png(e, side)? else {
                    continue;
                };
                out.write(&format!("contours/{}_{tag}.png", c.id), &png)?;
            }
        }
        Ok(())
    }
}

impl Contours {
    fn side_png(&self, e: &Explanation, side: &Side) -> Result<Option<Vec<u8>>> {
        let (Some(i), Some(map)) = (side.image, side.map.as_ref()) else {
            return Ok(None); // a class prototype has no image to draw on
        };
        let m = &map.upsampled;
        let drawn = self.draw(&e.images[i].view, &m.data, m.height, m.width);
        let img = fam_core::image::RgbImage::from_raw(drawn.width, drawn.height, drawn.data)
            .ok_or_else(|| FamError::invalid("image buffer of the wrong size"))?;
        let mut png = Vec::new();
        img.write_to(
            &mut Cursor::new(&mut png),
            fam_core::image::ImageFormat::Png,
        )
        .map_err(|e| FamError::invalid(format!("PNG encoding: {e}")))?;
        Ok(Some(png))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(text: &str) -> Options {
        fam_core::toml::from_str(text).unwrap()
    }

    #[test]
    fn contributions_add_up_to_the_score() {
        let s = MahalanobisDiag::from_options(&options("weights = [0.5, 2, 1]")).unwrap();
        let (e, r) = ([1.0, -2.0, 0.5], [0.5, 1.0, 3.0]);
        let c = s.contributions(&e, &r).unwrap();
        // By hand: 0.5·1·(1 − 1) = 0, 2·(−2)·(2 + 2) = −16, 1·0.5·(6 − 0.5) = 2.75.
        assert_eq!(c, vec![0.0, -16.0, 2.75]);
        assert_eq!(s.score(&e, &r).unwrap(), -13.25);
        // ‖e − r‖_W² = 0.5·0.25 + 2·9 + 1·6.25 = 24.375.
        assert!((s.distance(&e, &r).unwrap().unwrap() - 24.375f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let s = MahalanobisDiag::from_options(&options("weights = [0.5, 2, 1]")).unwrap();
        let (e, r) = ([1.0f32, -2.0, 0.5], [0.5f32, 1.0, 3.0]);
        let g = s.gradient(&e, &r).unwrap();
        for k in 0..3 {
            let (mut up, mut down) = (e, e);
            up[k] += 1e-2;
            down[k] -= 1e-2;
            let fd = (s.score(&up, &r).unwrap() - s.score(&down, &r).unwrap()) / 2e-2;
            assert!((fd - g[k]).abs() < 1e-3, "channel {k}: {fd} vs {}", g[k]);
        }
    }

    #[test]
    fn bad_options_and_sizes_are_reported() {
        // What `fam-cli validate` gets: every problem at once, each naming its key.
        let p = options::check(
            &options("weights = [1, -1]\nweight = 2"),
            "",
            check_similarity,
        );
        let text: Vec<String> = p.iter().map(|p| p.to_string()).collect();
        assert_eq!(p.len(), 2, "{text:?}");
        assert!(
            text.iter().any(|t| t.contains("did you mean `weights`")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("weights: [1.0, -1.0] is not a list of non-negative")),
            "{text:?}"
        );
        let p = options::check(
            &options("levels = [0.5, 1.5]\nwidth = 0"),
            "",
            check_contours,
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[1].to_string(), "width: 0 is not 1 to 16 pixels");
        // `create` builds from the same struct and checks: the same problems, as one error.
        let both = options("weights = [1]\nweights_npy = \"w.npy\"");
        let err = MahalanobisDiag::from_options(&both)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("weights_npy: give `weights` or `weights_npy`, not both"),
            "{err}"
        );
        let s = MahalanobisDiag::from_options(&options("weights = [1, 2]")).unwrap();
        let err = s.score(&[1.0; 3], &[1.0; 3]).unwrap_err().to_string();
        assert!(
            err.contains("2 weights but the embedding has 3 channels"),
            "{err}"
        );
    }

    #[test]
    fn options_take_their_defaults() {
        let s = MahalanobisDiag::from_options(&Options::new()).unwrap();
        assert_eq!(s.score(&[1.0, 2.0], &[1.0, 2.0]).unwrap(), 5.0);
        let c = Contours::from_options(&options("levels = [0.8, 0.3]")).unwrap();
        assert_eq!((c.levels, c.width), (vec![0.3, 0.8], 2));
    }

    #[test]
    fn contours_outline_the_peak() {
        // A 9x9 map with a 3x3 block of high values in the middle.
        let mut map = vec![0.1f32; 81];
        for y in 3..6 {
            for x in 3..6 {
                map[y * 9 + x] = 1.0;
            }
        }
        let view = Rgb8 {
            width: 9,
            height: 9,
            data: vec![0; 243],
        };
        let c = Contours::from_options(&options("levels = [0.5]\nwidth = 1")).unwrap();
        let drawn = c.draw(&view, &map, 9, 9);
        let red = |x: usize, y: usize| drawn.data[(y * 9 + x) * 3] == 255;
        // The block's border is drawn, its centre and the background are not.
        assert!(red(3, 3) && red(5, 4) && red(4, 5));
        assert!(!red(4, 4) && !red(0, 0) && !red(7, 4));
    }
}
