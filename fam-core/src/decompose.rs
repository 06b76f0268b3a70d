//! The similarity of two images split over pairs of feature-map locations: the exact form
//! behind the spatial decomposition of Stylianou et al. 2019 ("Visualizing Deep Similarity
//! Networks"), the overall and point-specific activation maps of Zhu et al. 2019 ("Visual
//! Explanation for Deep Metric Learning"), and fam's point-to-point correspondence.
//!
//! An embedding is a sum of per-location vectors, `e = Σ_i e_i` (for a pooled backbone
//! `e_i = T(a_i) / N`; through an affine head, the head's share of each location, see
//! [`Locations`]). For a metric with an [`InnerProductForm`]
//! `s = α e·r + β ‖e‖² + γ ‖r‖² + δ` (coefficients held at the pair) the score splits
//! exactly over location pairs `(i, j)` of the two images:
//!
//! `P(i, j) = α e_i·r_j + β e_i·e / N_r + γ r_j·r / N_e + δ / (N_e N_r)`, `Σ_ij P = s`.
//!
//! Summing over the other image's locations gives the per-location map of one image,
//! `m_i = Σ_j P(i, j) = α e_i·r + β e_i·e + (γ ‖r‖² + δ) / N_e` (it needs only the other
//! image's embedding, so it also explains a match against a prototype or a centroid).

use crate::error::{FamError, Result};
use crate::traits::InnerProductForm;

/// Per-location vectors of one image: `n` locations (row-major over `h × w`) of `dim`
/// values each, whose sum is the image's embedding (in the metric's space).
#[derive(Debug, Clone, PartialEq)]
pub struct Locations {
    pub height: usize,
    pub width: usize,
    pub dim: usize,
    /// `[n, dim]`, row-major.
    pub data: Vec<f32>,
}

impl Locations {
    pub fn new(height: usize, width: usize, dim: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != height * width * dim {
            return Err(FamError::invalid(format!(
                "{} location values for {height}x{width} locations of {dim} values",
                data.len()
            )));
        }
        Ok(Self {
            height,
            width,
            dim,
            data,
        })
    }

    pub fn len(&self) -> usize {
        self.height * self.width
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn at(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// `Σ_i e_i`: the embedding these locations add up to.
    pub fn sum(&self) -> Vec<f32> {
        let mut s = vec![0f32; self.dim];
        for i in 0..self.len() {
            for (a, b) in s.iter_mut().zip(self.at(i)) {
                *a += b;
            }
        }
        s
    }

    /// The vectors of a map in the embedding's space: `offset` (`z0` of an affine head and
    /// the centre taken off by a transform) is spread evenly over the locations, and all is
    /// scaled by `scale` (a transform's normalization, held at the pooled embedding).
    pub fn affine(mut self, offset: &[f32], scale: f32) -> Result<Self> {
        if offset.len() != self.dim {
            return Err(FamError::invalid(format!(
                "offset of {} values for {}-d locations",
                offset.len(),
                self.dim
            )));
        }
        let n = self.len().max(1) as f32;
        for i in 0..self.len() {
            for (v, o) in self.data[i * self.dim..(i + 1) * self.dim]
                .iter_mut()
                .zip(offset)
            {
                *v = (*v + o / n) * scale;
            }
        }
        Ok(self)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn check(e: &Locations, r: &[f32]) -> Result<()> {
    if e.dim != r.len() {
        return Err(FamError::invalid(format!(
            "locations of {} values against a {}-d embedding",
            e.dim,
            r.len()
        )));
    }
    Ok(())
}

/// `m_i = Σ_j P(i, j)`: each location's share of the score against the embedding `r`
/// (`Σ_i m_i = s`). Only the other image's embedding is needed.
pub fn marginal(form: &InnerProductForm, e: &Locations, r: &[f32]) -> Result<Vec<f32>> {
    check(e, r)?;
    let total = e.sum();
    let rest = (form.self_r * dot(r, r) + form.constant) / e.len().max(1) as f32;
    Ok((0..e.len())
        .map(|i| {
            let v = e.at(i);
            form.cross * dot(v, r) + form.self_e * dot(v, &total) + rest
        })
        .collect())
}

/// `P(i, j)` for every location `i` of `e` and `j` of `r`, `[N_e, N_r]` row-major
/// (`Σ_ij P = s`).
pub fn pairs(form: &InnerProductForm, e: &Locations, r: &Locations) -> Result<Vec<f32>> {
    check(e, &vec![0.0; r.dim])?;
    let (ne, nr) = (e.len().max(1) as f32, r.len().max(1) as f32);
    let (te, tr) = (e.sum(), r.sum());
    let self_e: Vec<f32> = (0..e.len())
        .map(|i| form.self_e * dot(e.at(i), &te) / nr)
        .collect();
    let self_r: Vec<f32> = (0..r.len())
        .map(|j| form.self_r * dot(r.at(j), &tr) / ne + form.constant / (ne * nr))
        .collect();
    let mut out = Vec::with_capacity(e.len() * r.len());
    for (i, se) in self_e.iter().enumerate() {
        let v = e.at(i);
        for (j, sr) in self_r.iter().enumerate() {
            out.push(form.cross * dot(v, r.at(j)) + se + sr);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locs(h: usize, w: usize, d: usize, seed: u32) -> Locations {
        let data = (0..h * w * d)
            .map(|i| {
                let x = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed * 7919);
                (x % 1000) as f32 / 500.0 - 0.6
            })
            .collect();
        Locations::new(h, w, d, data).unwrap()
    }

    fn cosine(e: &[f32], r: &[f32]) -> (f32, InnerProductForm) {
        let (ne, nr) = (dot(e, e).sqrt(), dot(r, r).sqrt());
        let f = InnerProductForm {
            cross: 1.0 / (ne * nr),
            ..Default::default()
        };
        (dot(e, r) / (ne * nr), f)
    }

    fn euclidean(e: &[f32], r: &[f32]) -> (f32, InnerProductForm) {
        let s = dot(r, r) - e.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum::<f32>();
        let f = InnerProductForm {
            cross: 2.0,
            self_e: -1.0,
            ..Default::default()
        };
        (s, f)
    }

    #[test]
    fn pairs_and_marginals_add_up_to_the_score() {
        let (a, b) = (locs(3, 4, 5, 1), locs(2, 3, 5, 2));
        let (e, r) = (a.sum(), b.sum());
        for (s, f) in [cosine(&e, &r), euclidean(&e, &r)] {
            let p = pairs(&f, &a, &b).unwrap();
            assert_eq!(p.len(), 12 * 6);
            let total: f32 = p.iter().sum();
            assert!(
                (total - s).abs() < 1e-4 * s.abs().max(1.0),
                "{total} vs {s}"
            );
            // The marginal is the row sum of the pairs.
            let m = marginal(&f, &a, &r).unwrap();
            for (i, mi) in m.iter().enumerate() {
                let row: f32 = p[i * 6..(i + 1) * 6].iter().sum();
                assert!((row - mi).abs() < 1e-4, "{i}: {row} vs {mi}");
            }
        }
    }

    #[test]
    fn hand_computed_pair_terms() {
        // Two locations of 1 value on each side: e = [1, 2] (sum 3), r = [4, -1] (sum 3).
        let a = Locations::new(1, 2, 1, vec![1.0, 2.0]).unwrap();
        let b = Locations::new(2, 1, 1, vec![4.0, -1.0]).unwrap();
        let f = InnerProductForm {
            cross: 2.0,
            self_e: -1.0,
            ..Default::default()
        };
        // P(i, j) = 2 e_i r_j − e_i·3 / 2: [[8 − 1.5, −2 − 1.5], [16 − 3, −4 − 3]]
        assert_eq!(pairs(&f, &a, &b).unwrap(), vec![6.5, -3.5, 13.0, -7.0]);
        // 2 e·r − ‖e‖² = 18 − 9 = 9.
        assert_eq!(marginal(&f, &a, &[3.0]).unwrap(), vec![3.0, 6.0]);
    }

    #[test]
    fn affine_spreads_the_offset_and_scales() {
        let a = Locations::new(1, 2, 2, vec![1.0, 0.0, 3.0, 2.0]).unwrap();
        let b = a.affine(&[2.0, -2.0], 0.5).unwrap();
        assert_eq!(b.data, vec![1.0, -0.5, 2.0, 0.5]);
        assert_eq!(b.sum(), vec![3.0, 0.0]);
        assert!(Locations::new(1, 2, 2, vec![0.0; 3]).is_err());
    }
}
