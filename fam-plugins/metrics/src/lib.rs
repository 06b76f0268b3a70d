//! fam plugin `metrics`: cosine and Euclidean similarities with exact per-channel
//! contributions (DESIGN.md section 1.1).
//!
//! | metric    | score                      | contribution `c_k`          |
//! |-----------|----------------------------|-----------------------------|
//! | cosine    | `e·r / (‖e‖‖r‖)`           | `e_k r_k / (‖e‖‖r‖)`        |
//! | euclidean | `‖r‖² − ‖e − r‖²`          | `e_k (2 r_k − e_k)`         |

use fam_core::options::{self, NoOptions};
use fam_core::plugin::{Options, Registrar};
use fam_core::{FamError, InnerProductForm, Problem, Result, Similarity};

fam_core::export_plugin!(name: "metrics", register: register);

/// Registers `cosine` and `euclidean`; neither takes options ([`NoOptions`]).
pub fn register(r: &mut Registrar) {
    r.similarity(
        "cosine",
        "cosine similarity; c_k = e_k r_k / (|e||r|)",
        validate_no_options,
        |o| {
            options::load::<NoOptions>(o, "", |_| vec![])?;
            Ok(Box::new(Cosine))
        },
    );
    r.similarity(
        "euclidean",
        "similarity |r|^2 - |e - r|^2 (reports the distance |e - r|); c_k = e_k (2 r_k - e_k)",
        validate_no_options,
        |o| {
            options::load::<NoOptions>(o, "", |_| vec![])?;
            Ok(Box::new(Euclidean))
        },
    );
}

fn validate_no_options(o: &Options) -> Vec<Problem> {
    options::check::<NoOptions>(o, "", |_| vec![])
}

fn check(e: &[f32], r: &[f32]) -> Result<()> {
    if e.len() != r.len() {
        return Err(FamError::invalid(format!(
            "embeddings have different sizes: {} and {}",
            e.len(),
            r.len()
        )));
    }
    if let Some(k) = e.iter().chain(r).position(|v| !v.is_finite()) {
        return Err(FamError::invalid(format!(
            "embedding value {} at index {} is not finite",
            e.iter().chain(r).nth(k).unwrap(),
            k % e.len().max(1)
        )));
    }
    Ok(())
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt()
}

/// Cosine similarity.
#[derive(Debug, Clone, Copy)]
pub struct Cosine;

impl Cosine {
    fn norms(e: &[f32], r: &[f32]) -> Result<(f64, f64)> {
        check(e, r)?;
        let (ne, nr) = (norm(e), norm(r));
        if ne == 0.0 || nr == 0.0 {
            return Err(FamError::invalid(format!(
                "cosine similarity is undefined for a zero-norm embedding (norms {ne} and {nr}): every activation of the feature layer is zero, e.g. an all-black image behind ReLU"
            )));
        }
        Ok((ne, nr))
    }
}

impl Similarity for Cosine {
    fn name(&self) -> String {
        "cosine".into()
    }
    fn score(&self, e: &[f32], r: &[f32]) -> Result<f32> {
        let (ne, nr) = Self::norms(e, r)?;
        let dot: f64 = e.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum();
        Ok((dot / (ne * nr)) as f32)
    }
    fn contributions(&self, e: &[f32], r: &[f32]) -> Result<Vec<f32>> {
        let (ne, nr) = Self::norms(e, r)?;
        let s = 1.0 / (ne * nr);
        Ok(e.iter()
            .zip(r)
            .map(|(a, b)| (*a as f64 * *b as f64 * s) as f32)
            .collect())
    }
    /// `ds/de_k = r_k / (‖e‖‖r‖) − s e_k / ‖e‖²`.
    fn gradient(&self, e: &[f32], r: &[f32]) -> Result<Vec<f32>> {
        let (ne, nr) = Self::norms(e, r)?;
        let s = self.score(e, r)? as f64;
        Ok(e.iter()
            .zip(r)
            .map(|(a, b)| (*b as f64 / (ne * nr) - s * *a as f64 / (ne * ne)) as f32)
            .collect())
    }
    /// Key `e·r / ‖r‖`: the score times `‖e‖`, which is the same for every reference of a
    /// query. A zero-norm reference gets a non-finite key (never a hit).
    fn keys_from_inner_products(
        &self,
        dots: &mut [f32],
        e_sq: &[f32],
        r_sq: &[f32],
    ) -> Result<bool> {
        let inv: Vec<f32> = r_sq.iter().map(|s| 1.0 / s.sqrt()).collect();
        for row in dots.chunks_exact_mut(r_sq.len().max(1)).take(e_sq.len()) {
            for (d, i) in row.iter_mut().zip(&inv) {
                *d *= i;
            }
        }
        Ok(true)
    }
    /// `s = (e·r) / (‖e‖‖r‖)`: `cross = 1/(‖e‖‖r‖)`, the norms held at this pair.
    fn inner_product_form(&self, e: &[f32], r: &[f32]) -> Result<Option<InnerProductForm>> {
        let (ne, nr) = Self::norms(e, r)?;
        Ok(Some(InnerProductForm {
            cross: (1.0 / (ne * nr)) as f32,
            ..Default::default()
        }))
    }
}

/// Euclidean similarity `‖r‖² − ‖e − r‖²`, reported with the distance `‖e − r‖`.
#[derive(Debug, Clone, Copy)]
pub struct Euclidean;

impl Similarity for Euclidean {
    fn name(&self) -> String {
        "euclidean".into()
    }
    fn score(&self, e: &[f32], r: &[f32]) -> Result<f32> {
        Ok(self
            .contributions(e, r)?
            .iter()
            .map(|c| *c as f64)
            .sum::<f64>() as f32)
    }
    /// `c_k = r_k² − (e_k − r_k)² = e_k (2 r_k − e_k)`: how much the squared distance grows
    /// if channel `k` of the query is switched off.
    fn contributions(&self, e: &[f32], r: &[f32]) -> Result<Vec<f32>> {
        check(e, r)?;
        Ok(e.iter().zip(r).map(|(a, b)| a * (2.0 * b - a)).collect())
    }
    /// `ds/de_k = 2 (r_k − e_k)`.
    fn gradient(&self, e: &[f32], r: &[f32]) -> Result<Vec<f32>> {
        check(e, r)?;
        Ok(e.iter().zip(r).map(|(a, b)| 2.0 * (b - a)).collect())
    }
    fn distance(&self, e: &[f32], r: &[f32]) -> Result<Option<f32>> {
        check(e, r)?;
        Ok(Some(
            e.iter()
                .zip(r)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                .sqrt() as f32,
        ))
    }
    /// Key `2 e·r − ‖r‖² = ‖e‖² − ‖e − r‖²`: minus the squared distance, up to `‖e‖²`,
    /// which is the same for every reference of a query.
    fn keys_from_inner_products(
        &self,
        dots: &mut [f32],
        e_sq: &[f32],
        r_sq: &[f32],
    ) -> Result<bool> {
        for row in dots.chunks_exact_mut(r_sq.len().max(1)).take(e_sq.len()) {
            for (d, r) in row.iter_mut().zip(r_sq) {
                *d = 2.0 * *d - r;
            }
        }
        Ok(true)
    }
    /// `‖r‖² − ‖e − r‖² = 2 e·r − ‖e‖²`.
    fn inner_product_form(&self, e: &[f32], r: &[f32]) -> Result<Option<InnerProductForm>> {
        check(e, r)?;
        Ok(Some(InnerProductForm {
            cross: 2.0,
            self_e: -1.0,
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u32) -> Vec<f32> {
        // deterministic pseudo-random values in [-1, 2)
        (0..n)
            .map(|i| {
                let x = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(97));
                (x % 3000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn metrics() -> [Box<dyn Similarity>; 2] {
        [Box::new(Cosine), Box::new(Euclidean)]
    }

    #[test]
    fn inner_product_forms_give_the_score() {
        for m in metrics() {
            for s in 0..5 {
                let (e, r) = (sample(16, s), sample(16, s + 40));
                let f = m.inner_product_form(&e, &r).unwrap().unwrap();
                let (a, b) = (f.score(&e, &r), m.score(&e, &r).unwrap());
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{}: {a} vs {b}",
                    m.name()
                );
            }
        }
    }

    #[test]
    fn keys_from_inner_products_rank_references_like_the_scores() {
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let queries: Vec<Vec<f32>> = (0..3).map(|s| sample(24, s)).collect();
        let refs: Vec<Vec<f32>> = (10..30).map(|s| sample(24, s)).collect();
        for m in metrics() {
            let mut dots: Vec<f32> = queries
                .iter()
                .flat_map(|q| refs.iter().map(|r| dot(q, r)))
                .collect();
            let e_sq: Vec<f32> = queries.iter().map(|q| dot(q, q)).collect();
            let r_sq: Vec<f32> = refs.iter().map(|r| dot(r, r)).collect();
            assert!(m.keys_from_inner_products(&mut dots, &e_sq, &r_sq).unwrap());
            for (i, q) in queries.iter().enumerate() {
                let exact: Vec<f32> = refs
                    .iter()
                    .map(|r| {
                        let s = m.score(q, r).unwrap();
                        fam_core::explain::rank_key(s, m.distance(q, r).unwrap())
                    })
                    .collect();
                let keys = &dots[i * refs.len()..(i + 1) * refs.len()];
                let order = |v: &[f32]| {
                    let mut idx: Vec<usize> = (0..v.len()).collect();
                    idx.sort_by(|a, b| v[*b].total_cmp(&v[*a]));
                    idx
                };
                assert_eq!(order(keys), order(&exact), "{} query {i}", m.name());
            }
        }
        // A zero-norm reference is never a hit under cosine.
        let mut dots = vec![0.0, 1.0];
        assert!(Cosine
            .keys_from_inner_products(&mut dots, &[1.0], &[0.0, 1.0])
            .unwrap());
        assert!(!dots[0].is_finite() && dots[1] == 1.0);
    }

    #[test]
    fn contributions_add_up_to_the_score() {
        for m in metrics() {
            for seed in 0..5 {
                let (e, r) = (sample(64, seed), sample(64, seed + 100));
                let s = m.score(&e, &r).unwrap();
                let sum: f32 = m.contributions(&e, &r).unwrap().iter().sum();
                assert!(
                    (s - sum).abs() < 1e-4 * s.abs().max(1.0),
                    "{}: {s} vs {sum}",
                    m.name()
                );
            }
        }
    }

    #[test]
    fn hand_computed_values() {
        let (e, r) = ([3.0f32, 4.0], [4.0f32, 3.0]);
        // cosine: 24 / 25
        assert!((Cosine.score(&e, &r).unwrap() - 0.96).abs() < 1e-6);
        assert_eq!(
            Cosine.contributions(&e, &r).unwrap(),
            vec![12.0 / 25.0, 12.0 / 25.0]
        );
        // euclidean: |r|^2 - |e-r|^2 = 25 - 2 = 23; c = [3*(8-3), 4*(6-4)] = [15, 8]
        assert_eq!(Euclidean.contributions(&e, &r).unwrap(), vec![15.0, 8.0]);
        assert_eq!(Euclidean.score(&e, &r).unwrap(), 23.0);
        assert!((Euclidean.distance(&e, &r).unwrap().unwrap() - 2f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for m in metrics() {
            let (e, r) = (sample(16, 7), sample(16, 8));
            let g = m.gradient(&e, &r).unwrap();
            for k in 0..e.len() {
                let h = 1e-3f64;
                let (mut ep, mut em) = (e.clone(), e.clone());
                ep[k] += h as f32;
                em[k] -= h as f32;
                let fd = (m.score(&ep, &r).unwrap() as f64 - m.score(&em, &r).unwrap() as f64)
                    / (2.0 * h);
                assert!(
                    (fd - g[k] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                    "{} k={k}: fd {fd} vs {}",
                    m.name(),
                    g[k]
                );
            }
        }
    }

    #[test]
    fn euclidean_contribution_is_the_distance_change_when_a_channel_is_switched_off() {
        let (e, r) = (sample(8, 1), sample(8, 2));
        let c = Euclidean.contributions(&e, &r).unwrap();
        let d2 = |e: &[f32]| -> f32 { e.iter().zip(&r).map(|(a, b)| (a - b) * (a - b)).sum() };
        for k in 0..e.len() {
            let mut off = e.clone();
            off[k] = 0.0;
            assert!((d2(&off) - d2(&e) - c[k]).abs() < 1e-4);
        }
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let err = Cosine
            .score(&[0.0, 0.0], &[1.0, 0.0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("zero-norm"), "{err}");
        let err = Euclidean
            .score(&[1.0], &[1.0, 2.0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("different sizes: 1 and 2"), "{err}");
        let err = Cosine
            .score(&[f32::NAN, 1.0], &[1.0, 2.0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not finite"), "{err}");
        assert_eq!(validate_no_options(&Options::new()), vec![]);
    }

    #[test]
    fn the_metrics_take_no_options() {
        let mut o = Options::new();
        o.insert("scale".into(), 2.into());
        let problems = validate_no_options(&o);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "scale");
        assert!(
            problems[0].message.contains("unknown option `scale`"),
            "{problems:?}"
        );
        let mut r = Registrar::new();
        register(&mut r);
        let r = r.finish().unwrap();
        let err = r.similarities[0].create(&o).err().unwrap().to_string();
        assert!(err.contains("scale: unknown option `scale`"), "{err}");
        assert!(r.similarities[1].create(&Options::new()).is_ok());
    }
}
