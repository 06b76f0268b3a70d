//! Exact top-k search: every query against every reference row, streamed in blocks.
//!
//! Rows come from a [`Rows`] source (the in-memory gallery of a plain run, or the
//! memory-mapped parts of an index) as segments. Segments are searched in parallel; each
//! block of a segment is scored with one product of all the queries against its rows
//! ([`super::kernel::dots`]), turned into ranking keys by the similarity
//! ([`Similarity::keys_from_inner_products`]), and only the best few per query are kept. An
//! index's blocks are read into one buffer per thread, so memory holds the queries, one
//! block per thread and the kept candidates, whatever the number of rows.
//!
//! Keys only choose candidates: each query keeps `top_k + slack` of them, which are then
//! scored exactly with [`Similarity::score`] and [`Similarity::distance`] and ranked by
//! [`rank_key`], ties going to the earlier row. Rows that must not match a query
//! (`exclude_self`) are dropped after the scan; a query that loses so many that fewer than
//! `top_k` are left is searched again with more candidates.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;

use super::kernel::{dots, squared_norms};
use fam_core::error::Result;
use fam_core::explain::rank_key;
use fam_core::Similarity;

/// Rows per block: 1.25 MiB of 1,280-value rows per read; the block's keys for 1,000
/// queries take 1 MiB. (Measured on 10^6 rows: 64 to 512 rows per block are within noise of
/// each other, 128 was 20 % slower.)
const BLOCK: usize = 256;

/// A source of reference rows, in segments that can be searched at the same time.
pub trait Rows: Sync {
    /// Values per row.
    fn dims(&self) -> usize;
    /// The segments: `(first row, rows)`, in row order, covering every row once.
    fn segments(&self) -> Vec<(u64, usize)>;
    /// Rows `first..first + count` of one segment (as [`Rows::segments`] gives them),
    /// `count × dims` values: borrowed from the source, or read into `buf`.
    fn rows<'a>(&'a self, first: u64, count: usize, buf: &'a mut Vec<f32>) -> Result<&'a [f32]>;
    /// One row, for scoring a candidate exactly.
    fn row(&self, index: u64) -> Result<Vec<f32>> {
        let mut buf = Vec::new();
        Ok(self.rows(index, 1, &mut buf)?.to_vec())
    }
}

/// Rows held in memory: a plain run's gallery.
pub struct MemoryRows {
    pub dims: usize,
    pub values: Vec<f32>,
}

impl Rows for MemoryRows {
    fn dims(&self) -> usize {
        self.dims
    }
    fn segments(&self) -> Vec<(u64, usize)> {
        let n = self.values.len() / self.dims.max(1);
        split(0, n)
    }
    fn rows<'a>(&'a self, first: u64, count: usize, _: &'a mut Vec<f32>) -> Result<&'a [f32]> {
        let start = first as usize * self.dims;
        Ok(&self.values[start..start + count * self.dims])
    }
}

/// Segments of 32 blocks covering `first..first + n`.
pub fn split(first: u64, n: usize) -> Vec<(u64, usize)> {
    const SEGMENT: usize = 32 * BLOCK;
    (0..n)
        .step_by(SEGMENT)
        .map(|s| (first + s as u64, SEGMENT.min(n - s)))
        .collect()
}

/// A kept hit: its row, exact score and distance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub row: u64,
    pub score: f32,
    pub distance: Option<f32>,
}

/// What [`search`] found for one query.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// Up to `top_k` hits, best first.
    Hits(Vec<Hit>),
    /// Scoring one of its candidates failed (e.g. a cosine of a zero-norm query).
    Failed(String),
}

/// How many rows the search went through, for the log and the benchmark.
#[derive(Debug, Clone, Default)]
pub struct SearchStats {
    /// Rows scanned (once per pass; a pass repeated for `exclude` counts again).
    pub rows_scanned: u64,
    /// Passes over the rows.
    pub passes: usize,
    /// `false` when the similarity has no inner-product form and every pair was scored
    /// with [`Similarity::score`].
    pub inner_products: bool,
}

/// Which candidates must not match their query: given `(query, candidate rows)` for some
/// queries, one mask per query (`true`: drop the row).
pub type Exclude<'a> = dyn FnMut(&[(usize, &[u64])]) -> Result<Vec<Vec<bool>>> + 'a;

/// No row is excluded.
pub fn exclude_none(c: &[(usize, &[u64])]) -> Result<Vec<Vec<bool>>> {
    Ok(c.iter().map(|(_, r)| vec![false; r.len()]).collect())
}

/// The best `top_k` rows of `rows` for each query, without the rows `exclude` drops.
/// `progress(rows)` is called as blocks finish.
pub fn search(
    queries: &[Vec<f32>],
    rows: &dyn Rows,
    sim: &dyn Similarity,
    top_k: usize,
    exclude: &mut Exclude<'_>,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<(Vec<Found>, SearchStats)> {
    let mut stats = SearchStats::default();
    let mut found: Vec<Option<Found>> = vec![None; queries.len()];
    let mut todo: Vec<usize> = (0..queries.len()).collect();
    let mut keep = top_k + top_k.max(16);
    while !todo.is_empty() && top_k > 0 {
        let subset: Vec<&[f32]> = todo.iter().map(|&i| queries[i].as_slice()).collect();
        let t = std::time::Instant::now();
        let (candidates, pass) = scan(&subset, rows, sim, keep, progress)?;
        tracing::debug!(
            queries = subset.len(),
            rows = pass.rows_scanned,
            ms = t.elapsed().as_secs_f64() * 1e3,
            "scan"
        );
        stats.rows_scanned += pass.rows_scanned;
        stats.passes += 1;
        stats.inner_products = pass.inner_products;
        let asked: Vec<(usize, &[u64])> = todo
            .iter()
            .zip(&candidates)
            .map(|(&i, c)| (i, c.as_slice()))
            .collect();
        let masks = exclude(&asked)?;
        let mut again = Vec::new();
        for ((&i, cands), mask) in todo.iter().zip(&candidates).zip(masks) {
            let full = cands.len() == keep;
            let cands: Vec<u64> = cands
                .iter()
                .zip(mask)
                .filter(|(_, x)| !x)
                .map(|(r, _)| *r)
                .collect();
            if full && cands.len() < top_k {
                again.push(i);
                continue;
            }
            found[i] = Some(rescore(&queries[i], &cands, rows, sim, top_k)?);
        }
        todo = again;
        keep *= 4;
    }
    Ok((
        found
            .into_iter()
            .map(|f| f.unwrap_or(Found::Hits(Vec::new())))
            .collect(),
        stats,
    ))
}

/// Exact scores of the candidates, ranked, best `top_k`.
fn rescore(
    e: &[f32],
    candidates: &[u64],
    rows: &dyn Rows,
    sim: &dyn Similarity,
    top_k: usize,
) -> Result<Found> {
    let mut hits = Vec::with_capacity(candidates.len());
    for &row in candidates {
        let r = rows.row(row)?;
        let score = match sim.score(e, &r) {
            Ok(s) => s,
            Err(err) => return Ok(Found::Failed(err.to_string())),
        };
        let distance = sim.distance(e, &r).ok().flatten();
        hits.push(Hit {
            row,
            score,
            distance,
        });
    }
    hits.sort_by(|a, b| {
        rank_key(b.score, b.distance)
            .total_cmp(&rank_key(a.score, a.distance))
            .then(a.row.cmp(&b.row))
    });
    hits.truncate(top_k);
    Ok(Found::Hits(hits))
}

/// A candidate in a bounded heap whose top is the worst kept: lower key, then later row.
#[derive(Debug, Clone, Copy)]
struct Cand {
    key: f32,
    row: u64,
}

impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    /// Greater = worse, so that the max-heap's top is the one to drop.
    fn cmp(&self, o: &Self) -> Ordering {
        o.key.total_cmp(&self.key).then(self.row.cmp(&o.row))
    }
}

/// The best `keep` candidates of one query.
#[derive(Debug, Clone)]
struct Best {
    keep: usize,
    heap: BinaryHeap<Cand>,
}

impl Best {
    fn new(keep: usize) -> Self {
        Self {
            keep,
            heap: BinaryHeap::with_capacity(keep + 1),
        }
    }

    #[inline]
    fn offer(&mut self, key: f32, row: u64) {
        if !key.is_finite() {
            return;
        }
        let c = Cand { key, row };
        if self.heap.len() < self.keep {
            self.heap.push(c);
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if c < *worst {
                *worst = c;
            }
        }
    }

    /// The worst key kept, once full: a block's key below it cannot enter.
    #[inline]
    fn bar(&self) -> f32 {
        if self.heap.len() < self.keep {
            f32::NEG_INFINITY
        } else {
            self.heap.peek().map_or(f32::NEG_INFINITY, |c| c.key)
        }
    }

    fn merge(&mut self, other: Best) {
        for c in other.heap {
            self.offer(c.key, c.row);
        }
    }

    /// Rows, best first.
    fn rows(self) -> Vec<u64> {
        let mut v = self.heap.into_vec();
        v.sort();
        v.into_iter().map(|c| c.row).collect()
    }
}

/// One worker's heaps and buffers, reused over the segments it folds.
#[derive(Default)]
struct Worker {
    best: Vec<Best>,
    keys: Vec<f32>,
    r_sq: Vec<f32>,
    buf: Vec<f32>,
}

struct Pass {
    rows_scanned: u64,
    inner_products: bool,
}

/// One pass over every row: the best `keep` rows of each query by key.
fn scan(
    queries: &[&[f32]],
    rows: &dyn Rows,
    sim: &dyn Similarity,
    keep: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<(Vec<Vec<u64>>, Pass)> {
    let n = queries.len();
    let d = rows.dims();
    let flat: Vec<f32> = queries.iter().flat_map(|q| q.iter().copied()).collect();
    if flat.len() != n * d {
        return Err(fam_core::FamError::invalid(format!(
            "the queries' embeddings have {} values, the references {d}",
            queries.first().map_or(0, |q| q.len())
        )));
    }
    let mut e_sq = Vec::new();
    squared_norms(&flat, d, &mut e_sq);
    // Does the metric have an inner-product form? Ask once, on a 1 × 1 block.
    let inner = sim.keys_from_inner_products(&mut [0.0], &[1.0], &[1.0])?;
    let segments = rows.segments();
    let scanned: u64 = segments.iter().map(|s| s.1 as u64).sum();
    // Each worker folds its segments into one set of heaps, and the sets are merged as the
    // workers finish: memory holds a few sets, not one per segment.
    let total = segments
        .par_iter()
        .try_fold(
            || Worker {
                best: vec![Best::new(keep); n],
                ..Default::default()
            },
            |mut w, &(first, count)| -> Result<Worker> {
                fam_core::host::check_interrupt()?;
                let Worker {
                    best,
                    keys,
                    r_sq,
                    buf,
                } = &mut w;
                for b0 in (0..count).step_by(BLOCK) {
                    let m = BLOCK.min(count - b0);
                    let start = first + b0 as u64;
                    let block = rows.rows(start, m, buf)?;
                    keys.clear();
                    keys.resize(n * m, 0.0);
                    if inner {
                        dots(&flat, n, block, d, keys, r_sq);
                        sim.keys_from_inner_products(keys, &e_sq, r_sq)?;
                    } else {
                        for (i, q) in queries.iter().enumerate() {
                            for (j, r) in block.chunks_exact(d.max(1)).enumerate() {
                                keys[i * m + j] = match sim.score(q, r) {
                                    Ok(s) => rank_key(s, sim.distance(q, r).ok().flatten()),
                                    Err(_) => f32::NAN,
                                };
                            }
                        }
                    }
                    for (i, b) in best.iter_mut().enumerate() {
                        let mut bar = b.bar();
                        for (j, &key) in keys[i * m..(i + 1) * m].iter().enumerate() {
                            // An equal key may still win on its row: the heap decides.
                            if key >= bar {
                                b.offer(key, start + j as u64);
                                bar = b.bar();
                            }
                        }
                    }
                    progress(m);
                }
                Ok(w)
            },
        )
        .try_reduce(Worker::default, |mut a, b| {
            if a.best.is_empty() {
                return Ok(b);
            }
            for (x, y) in a.best.iter_mut().zip(b.best) {
                x.merge(y);
            }
            Ok(a)
        })?;
    let total = if total.best.is_empty() {
        vec![Best::new(keep); n]
    } else {
        total.best
    };
    Ok((
        total.into_iter().map(Best::rows).collect(),
        Pass {
            rows_scanned: scanned,
            inner_products: inner,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fam_core::explain::rank_key;

    struct Cosine;
    impl Similarity for Cosine {
        fn name(&self) -> String {
            "cosine".into()
        }
        fn score(&self, e: &[f32], r: &[f32]) -> Result<f32> {
            let dot: f32 = e.iter().zip(r).map(|(a, b)| a * b).sum();
            let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            Ok(dot / (n(e) * n(r)))
        }
        fn contributions(&self, _: &[f32], _: &[f32]) -> Result<Vec<f32>> {
            unimplemented!()
        }
        fn gradient(&self, _: &[f32], _: &[f32]) -> Result<Vec<f32>> {
            unimplemented!()
        }
        fn keys_from_inner_products(
            &self,
            dots: &mut [f32],
            _e_sq: &[f32],
            r_sq: &[f32],
        ) -> Result<bool> {
            for row in dots.chunks_exact_mut(r_sq.len()) {
                for (d, s) in row.iter_mut().zip(r_sq) {
                    *d /= s.sqrt();
                }
            }
            Ok(true)
        }
    }

    /// The same metric without the inner-product form: the per-pair path.
    struct PairwiseCosine;
    impl Similarity for PairwiseCosine {
        fn name(&self) -> String {
            "pairwise".into()
        }
        fn score(&self, e: &[f32], r: &[f32]) -> Result<f32> {
            Cosine.score(e, r)
        }
        fn contributions(&self, _: &[f32], _: &[f32]) -> Result<Vec<f32>> {
            unimplemented!()
        }
        fn gradient(&self, _: &[f32], _: &[f32]) -> Result<Vec<f32>> {
            unimplemented!()
        }
    }

    fn rows(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                (0..d)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((x >> 33) % 2000) as f32 / 1000.0 - 1.0
                    })
                    .collect()
            })
            .collect()
    }

    fn brute(q: &[f32], g: &[Vec<f32>], k: usize, skip: impl Fn(u64) -> bool) -> Vec<u64> {
        let mut v: Vec<(f32, u64)> = g
            .iter()
            .enumerate()
            .filter(|(j, _)| !skip(*j as u64))
            .map(|(j, r)| (rank_key(Cosine.score(q, r).unwrap(), None), j as u64))
            .collect();
        v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        v.into_iter().take(k).map(|x| x.1).collect()
    }

    fn hits(f: &Found) -> Vec<u64> {
        match f {
            Found::Hits(h) => h.iter().map(|h| h.row).collect(),
            Found::Failed(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_streamed_top_k_is_the_brute_force_one() {
        let d = 19;
        let mut gallery = rows(9000, d, 7);
        // Duplicates tie exactly: the earlier row wins.
        gallery[8500] = gallery[10].clone();
        gallery[20] = gallery[10].clone();
        let queries = {
            let mut q = rows(21, d, 9);
            q[0] = gallery[10].clone();
            q
        };
        let source = MemoryRows {
            dims: d,
            values: gallery.iter().flatten().copied().collect(),
        };
        for sim in [&Cosine as &dyn Similarity, &PairwiseCosine] {
            let (found, stats) =
                search(&queries, &source, sim, 5, &mut exclude_none, &|_| {}).unwrap();
            assert_eq!(stats.rows_scanned, 9000);
            for (q, f) in queries.iter().zip(&found) {
                assert_eq!(hits(f), brute(q, &gallery, 5, |_| false));
            }
            assert_eq!(&hits(&found[0])[..3], &[10, 20, 8500]);
            // One query alone finds the same hits as among many.
            let (one, _) =
                search(&queries[3..4], &source, sim, 5, &mut exclude_none, &|_| {}).unwrap();
            assert_eq!(one[0], found[3]);
        }
    }

    #[test]
    fn excluded_rows_are_replaced_even_when_many_are_excluded() {
        let d = 8;
        let mut gallery = rows(500, d, 3);
        let q = gallery[0].clone();
        // 60 copies of the query: more than the first pass keeps.
        for row in &mut gallery[100..160] {
            row.clone_from(&q);
        }
        let source = MemoryRows {
            dims: d,
            values: gallery.iter().flatten().copied().collect(),
        };
        let same = |_: usize, r: u64| r == 0 || (100..160).contains(&r);
        let mut exclude = |c: &[(usize, &[u64])]| -> Result<Vec<Vec<bool>>> {
            Ok(c.iter()
                .map(|(i, rows)| rows.iter().map(|r| same(*i, *r)).collect())
                .collect())
        };
        let (found, stats) = search(
            std::slice::from_ref(&q),
            &source,
            &Cosine,
            3,
            &mut exclude,
            &|_| {},
        )
        .unwrap();
        assert!(stats.passes > 1);
        assert_eq!(hits(&found[0]), brute(&q, &gallery, 3, |r| same(0, r)));
    }
}
