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

use candle_core::Tensor;

use crate::error::{FamError, Result};
use crate::records::{TopCorrespondence, TopShares};
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

/// The terms of `P(i, j)` that depend on one side only: `P(i, j) = cross · e_i·r_j + a_i + b_j`
/// with `a_i = self_e · e_i·e / N_r` and `b_j = self_r · r_j·r / N_e + constant / (N_e N_r)`
/// (`(a, b)`), for computing the cross term in blocks elsewhere.
pub fn pair_terms(
    form: &InnerProductForm,
    e: &Locations,
    r: &Locations,
) -> Result<(Vec<f32>, Vec<f32>)> {
    check(e, &vec![0.0; r.dim])?;
    let (ne, nr) = (e.len().max(1) as f32, r.len().max(1) as f32);
    let (te, tr) = (e.sum(), r.sum());
    let self_e = (0..e.len())
        .map(|i| form.self_e * dot(e.at(i), &te) / nr)
        .collect();
    let self_r = (0..r.len())
        .map(|j| form.self_r * dot(r.at(j), &tr) / ne + form.constant / (ne * nr))
        .collect();
    Ok((self_e, self_r))
}

/// `P(i, j)` for every location `i` of `e` and `j` of `r`, `[N_e, N_r]` row-major
/// (`Σ_ij P = s`).
pub fn pairs(form: &InnerProductForm, e: &Locations, r: &Locations) -> Result<Vec<f32>> {
    let (self_e, self_r) = pair_terms(form, e, r)?;
    let mut out = Vec::with_capacity(e.len() * r.len());
    for (i, se) in self_e.iter().enumerate() {
        let v = e.at(i);
        for (j, sr) in self_r.iter().enumerate() {
            out.push(form.cross * dot(v, r.at(j)) + se + sr);
        }
    }
    Ok(out)
}

/// Each location's `k` largest shares `P(i, j)` (and its whole share), for both images,
/// without holding every pair: the cross terms come in blocks of query locations, one
/// matrix product each.
pub fn top_shares(
    form: &InnerProductForm,
    e: &Locations,
    r: &Locations,
    k: usize,
) -> Result<TopCorrespondence> {
    let (a, b) = pair_terms(form, e, r)?;
    let (ne, nr, d) = (e.len(), r.len(), e.dim);
    let (kq, kr) = (k.min(nr), k.min(ne));
    let device = candle_core::Device::Cpu;
    let rt = Tensor::from_slice(&r.data, (nr, d), &device)?
        .t()?
        .contiguous()?;
    let mut query = TopShares {
        index: Vec::with_capacity(ne * kq),
        share: Vec::with_capacity(ne * kq),
        total: Vec::with_capacity(ne),
    };
    // Per reference location: its kept (share, query location), and the smallest kept.
    let mut columns: Vec<Vec<(f32, u32)>> = vec![Vec::with_capacity(kr); nr];
    let mut column_min = vec![f32::NEG_INFINITY; nr];
    let mut column_total = vec![0f64; nr];
    const BLOCK: usize = 256;
    // One row's shares and their order, reused from row to row.
    let mut order: Vec<u32> = Vec::with_capacity(nr);
    let mut shares: Vec<f32> = Vec::with_capacity(nr);
    for start in (0..ne).step_by(BLOCK) {
        let rows = BLOCK.min(ne - start);
        let eb = Tensor::from_slice(&e.data[start * d..(start + rows) * d], (rows, d), &device)?;
        let cross: Vec<f32> = eb.matmul(&rt)?.flatten_all()?.to_vec1()?;
        for ii in 0..rows {
            let i = start + ii;
            shares.clear();
            shares.extend(
                cross[ii * nr..(ii + 1) * nr]
                    .iter()
                    .zip(&b)
                    .map(|(x, bj)| form.cross * x + a[i] + bj),
            );
            query
                .total
                .push(shares.iter().map(|&v| v as f64).sum::<f64>() as f32);
            order.clear();
            order.extend(0..nr as u32);
            let larger = |x: &u32, y: &u32| shares[*y as usize].total_cmp(&shares[*x as usize]);
            if kq < nr {
                order.select_nth_unstable_by(kq, larger);
            }
            order.truncate(kq);
            order.sort_by(larger);
            query.index.extend_from_slice(&order);
            query
                .share
                .extend(order.iter().map(|&j| shares[j as usize]));
            for (j, &v) in shares.iter().enumerate() {
                column_total[j] += v as f64;
                let kept = &mut columns[j];
                if kept.len() < kr {
                    kept.push((v, i as u32));
                    if kept.len() == kr {
                        column_min[j] = kept.iter().map(|x| x.0).fold(f32::INFINITY, f32::min);
                    }
                } else if v > column_min[j] {
                    let low = (0..kept.len())
                        .min_by(|&x, &y| kept[x].0.total_cmp(&kept[y].0))
                        .unwrap_or(0);
                    kept[low] = (v, i as u32);
                    column_min[j] = kept.iter().map(|x| x.0).fold(f32::INFINITY, f32::min);
                }
            }
        }
    }
    let mut reference = TopShares {
        index: Vec::with_capacity(nr * kr),
        share: Vec::with_capacity(nr * kr),
        total: column_total.iter().map(|&t| t as f32).collect(),
    };
    for mut kept in columns {
        kept.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        reference.index.extend(kept.iter().map(|x| x.1));
        reference.share.extend(kept.iter().map(|x| x.0));
    }
    // Both sides keep the same number per location, the smaller of the two.
    let k = kq.min(kr);
    Ok(TopCorrespondence {
        k,
        query: truncate_top(query, kq, k),
        reference: truncate_top(reference, kr, k),
    })
}

/// Keeps the first `k` of every location's `per` shares.
fn truncate_top(t: TopShares, per: usize, k: usize) -> TopShares {
    fn first<T: Copy>(v: &[T], per: usize, k: usize) -> Vec<T> {
        v.chunks(per).flat_map(|c| c[..k].iter().copied()).collect()
    }
    if per == k {
        return t;
    }
    TopShares {
        index: first(&t.index, per, k),
        share: first(&t.share, per, k),
        total: t.total,
    }
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

    #[test]
    fn top_shares_are_the_largest_of_the_whole_correspondence() {
        let (e, r) = (locs(9, 7, 5, 1), locs(6, 8, 5, 2));
        for form in [
            InnerProductForm {
                cross: 0.3,
                ..Default::default()
            },
            InnerProductForm {
                cross: 2.0,
                self_e: -1.0,
                self_r: 0.5,
                constant: 0.25,
            },
        ] {
            let all = pairs(&form, &e, &r).unwrap();
            let (ne, nr) = (e.len(), r.len());
            let t = top_shares(&form, &e, &r, 5).unwrap();
            assert_eq!(t.k, 5);
            let largest = |mut v: Vec<(f32, u32)>| {
                v.sort_by(|x, y| y.0.total_cmp(&x.0));
                v.truncate(5);
                v
            };
            for i in 0..ne {
                let row: Vec<(f32, u32)> = (0..nr).map(|j| (all[i * nr + j], j as u32)).collect();
                let want = largest(row.clone());
                for (t_, (v, j)) in want.iter().enumerate() {
                    assert_eq!(t.query.index[i * 5 + t_], *j, "row {i}");
                    assert!((t.query.share[i * 5 + t_] - v).abs() < 1e-4);
                }
                let total: f32 = row.iter().map(|x| x.0).sum();
                assert!((t.query.total[i] - total).abs() < 1e-3);
            }
            for j in 0..nr {
                let col: Vec<(f32, u32)> = (0..ne).map(|i| (all[i * nr + j], i as u32)).collect();
                let want = largest(col.clone());
                for (t_, (v, i)) in want.iter().enumerate() {
                    assert_eq!(t.reference.index[j * 5 + t_], *i, "column {j}");
                    assert!((t.reference.share[j * 5 + t_] - v).abs() < 1e-4);
                }
                let total: f32 = col.iter().map(|x| x.0).sum();
                assert!((t.reference.total[j] - total).abs() < 1e-3);
            }
            // The totals add up to the whole split, as the full matrix does.
            let sum: f32 = all.iter().sum();
            assert!((t.query.total.iter().sum::<f32>() - sum).abs() < 1e-2);
            assert!((t.reference.total.iter().sum::<f32>() - sum).abs() < 1e-2);
        }
        // `k` above a side's size keeps everything there.
        let t = top_shares(
            &InnerProductForm {
                cross: 1.0,
                ..Default::default()
            },
            &locs(1, 2, 3, 3),
            &locs(1, 3, 3, 4),
            16,
        )
        .unwrap();
        assert_eq!(t.k, 2);
        assert_eq!((t.query.index.len(), t.reference.index.len()), (4, 6));
    }
}
