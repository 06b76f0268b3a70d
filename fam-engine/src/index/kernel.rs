//! The search's inner products: every query against a block of reference rows.
//!
//! Every product `q · r` (and every squared norm `r · r`) is summed in one fixed order,
//! whatever the number of queries, the block, the tiling or the threads: 8 lanes, lane `l`
//! summing the terms `k ≡ l (mod 8)` in increasing `k` with one fused multiply-add each (the
//! last partial chunk as if padded with zeros), then the lanes pairwise,
//! `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`. So a query gets bit-identical keys
//! in a single run and in any shard of a sharded one, and the AVX2 kernel and the portable
//! one agree bit for bit (both use fused multiply-adds).
//!
//! The AVX2 kernel computes a tile of 2 rows × 6 queries (12 accumulators) per step of 8
//! values; a first pass (4 rows × the first query) also accumulates the rows' squared norms. With
//! one query each row value is loaded once and used once, so the search runs at memory
//! speed; with many, each query chunk stays in L1 while the block's rows stream from L2.

/// Reference rows per tile of the first pass (one query, and the norms).
const ROWS: usize = 4;
/// Rows and queries per tile of the other passes: 2 × 6 accumulators, the 6 queries (30 KiB
/// of 1,280 values) in L1, the rows streaming from L2.
const ROWS_N: usize = 2;
const QUERIES: usize = 6;

/// `out[i * m + j] = q_i · r_j` for the `n` queries of `q` (`n × d`) and the `m` rows of
/// `rows` (`m × d`), and `norms[j] = r_j · r_j`.
pub fn dots(q: &[f32], n: usize, rows: &[f32], d: usize, out: &mut [f32], norms: &mut Vec<f32>) {
    let m = rows.len().checked_div(d).unwrap_or(0);
    assert_eq!(q.len(), n * d, "queries are n × d");
    assert_eq!(rows.len(), m * d, "rows are m × d");
    assert_eq!(out.len(), n * m, "out is n × m");
    norms.clear();
    norms.resize(m, 0.0);
    if m == 0 || d == 0 {
        return;
    }
    let simd = cpu_has_avx2_fma();
    let row = |j: usize| &rows[j.min(m - 1) * d..][..d];
    let query = |i: usize| &q[i.min(n.max(1) - 1) * d..][..d];
    // Pass 1: the first query, and the norms.
    let mut tile = [[0f32; 1]; ROWS];
    let mut tile_norms = [0f32; ROWS];
    for j0 in (0..m).step_by(ROWS) {
        let r: [&[f32]; ROWS] = std::array::from_fn(|t| row(j0 + t));
        let live = ROWS.min(m - j0);
        if n == 0 {
            tile_dots::<ROWS, 1, true>(simd, &r, &[r[0]], &mut tile, &mut tile_norms);
        } else {
            tile_dots::<ROWS, 1, true>(simd, &r, &[query(0)], &mut tile, &mut tile_norms);
        }
        for t in 0..live {
            norms[j0 + t] = tile_norms[t];
            if n > 0 {
                out[j0 + t] = tile[t][0];
            }
        }
    }
    // Then the other queries, six at a time: each chunk stays in L1 over the block.
    let mut tile = [[0f32; QUERIES]; ROWS_N];
    let mut no_norms = [0f32; ROWS_N];
    for i0 in (1..n).step_by(QUERIES) {
        let qs: [&[f32]; QUERIES] = std::array::from_fn(|c| query(i0 + c));
        let live_q = QUERIES.min(n - i0);
        for j0 in (0..m).step_by(ROWS_N) {
            let r: [&[f32]; ROWS_N] = std::array::from_fn(|t| row(j0 + t));
            let live = ROWS_N.min(m - j0);
            tile_dots::<ROWS_N, QUERIES, false>(simd, &r, &qs, &mut tile, &mut no_norms);
            for t in 0..live {
                for c in 0..live_q {
                    out[(i0 + c) * m + j0 + t] = tile[t][c];
                }
            }
        }
    }
}

/// Squared norms of the `m` rows of `rows` (`m × d`), in the order of [`dots`].
pub fn squared_norms(rows: &[f32], d: usize, out: &mut Vec<f32>) {
    let m = rows.len().checked_div(d).unwrap_or(0);
    let mut none = Vec::new();
    dots(&[], 0, rows, d, &mut none, out);
    debug_assert_eq!(out.len(), m);
}

fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The pairwise sum of 8 lanes.
#[inline(always)]
fn reduce(l: [f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// One tile: `tile[t][c] = r_t · q_c` for `R` rows and `Q` queries, and with `NORMS`
/// `norms[t] = r_t · r_t`.
fn tile_dots<const R: usize, const Q: usize, const NORMS: bool>(
    simd: bool,
    r: &[&[f32]; R],
    q: &[&[f32]; Q],
    tile: &mut [[f32; Q]; R],
    norms: &mut [f32; R],
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the CPU has AVX2 and FMA (checked by `cpu_has_avx2_fma`).
        unsafe { tile_avx2::<R, Q, NORMS>(r, q, tile, norms) };
        return;
    }
    let _ = simd;
    let d = r[0].len();
    let mut acc = [[[0f32; 8]; Q]; R];
    let mut nacc = [[0f32; 8]; R];
    for k0 in (0..d).step_by(8) {
        let w = 8.min(d - k0);
        for t in 0..R {
            let mut rv = [0f32; 8];
            rv[..w].copy_from_slice(&r[t][k0..k0 + w]);
            for c in 0..Q {
                let mut qv = [0f32; 8];
                qv[..w].copy_from_slice(&q[c][k0..k0 + w]);
                for l in 0..8 {
                    acc[t][c][l] = rv[l].mul_add(qv[l], acc[t][c][l]);
                }
            }
            if NORMS {
                for l in 0..8 {
                    nacc[t][l] = rv[l].mul_add(rv[l], nacc[t][l]);
                }
            }
        }
    }
    for t in 0..R {
        for c in 0..Q {
            tile[t][c] = reduce(acc[t][c]);
        }
        if NORMS {
            norms[t] = reduce(nacc[t]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize, const Q: usize, const NORMS: bool>(
    r: &[&[f32]; R],
    q: &[&[f32]; Q],
    tile: &mut [[f32; Q]; R],
    norms: &mut [f32; R],
) {
    use std::arch::x86_64::*;
    let d = r[0].len();
    let rp: [*const f32; R] = std::array::from_fn(|t| r[t].as_ptr());
    let qp: [*const f32; Q] = std::array::from_fn(|c| q[c].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); Q]; R];
    let mut nacc = [_mm256_setzero_ps(); R];
    let full = d / 8 * 8;
    let mut k = 0;
    while k < full {
        // SAFETY: k + 8 <= d, and every row and query holds d values.
        let rv: [__m256; R] = std::array::from_fn(|t| unsafe { _mm256_loadu_ps(rp[t].add(k)) });
        for c in 0..Q {
            // SAFETY: as above.
            let qv = unsafe { _mm256_loadu_ps(qp[c].add(k)) };
            for t in 0..R {
                acc[t][c] = _mm256_fmadd_ps(rv[t], qv, acc[t][c]);
            }
        }
        if NORMS {
            for t in 0..R {
                nacc[t] = _mm256_fmadd_ps(rv[t], rv[t], nacc[t]);
            }
        }
        k += 8;
    }
    if full < d {
        // The last values, zero-padded to 8 lanes (a fused 0 · 0 + x is x).
        let pad = |p: *const f32| {
            let mut v = [0f32; 8];
            // SAFETY: p + full .. p + d is inside the row or query.
            unsafe { std::ptr::copy_nonoverlapping(p.add(full), v.as_mut_ptr(), d - full) };
            // SAFETY: v holds 8 values.
            unsafe { _mm256_loadu_ps(v.as_ptr()) }
        };
        let rv: [__m256; R] = std::array::from_fn(|t| pad(rp[t]));
        for c in 0..Q {
            let qv = pad(qp[c]);
            for t in 0..R {
                acc[t][c] = _mm256_fmadd_ps(rv[t], qv, acc[t][c]);
            }
        }
        if NORMS {
            for t in 0..R {
                nacc[t] = _mm256_fmadd_ps(rv[t], rv[t], nacc[t]);
            }
        }
    }
    let lanes = |v: __m256| {
        let mut l = [0f32; 8];
        // SAFETY: l holds 8 values.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), v) };
        reduce(l)
    };
    for t in 0..R {
        for c in 0..Q {
            tile[t][c] = lanes(acc[t][c]);
        }
        if NORMS {
            norms[t] = lanes(nacc[t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 20001) as f32 / 10000.0 - 1.0
            })
            .collect()
    }

    /// The defining order, written out plainly.
    fn reference(a: &[f32], b: &[f32]) -> f32 {
        let mut lane = [0f32; 8];
        for (k, (x, y)) in a.iter().zip(b).enumerate() {
            lane[k % 8] = x.mul_add(*y, lane[k % 8]);
        }
        reduce(lane)
    }

    #[test]
    fn every_product_is_the_defined_sum_whatever_the_shapes() {
        for d in [37, 8, 1280] {
            let rows = values(23 * d, 1);
            for n in [1, 2, 3, 4, 7, 16] {
                let q = values(n * d, 2);
                let (mut out, mut norms) = (vec![0.0; n * 23], Vec::new());
                dots(&q, n, &rows, d, &mut out, &mut norms);
                for j in 0..23 {
                    let r = &rows[j * d..(j + 1) * d];
                    assert_eq!(
                        norms[j].to_bits(),
                        reference(r, r).to_bits(),
                        "d {d} norm {j}"
                    );
                    for i in 0..n {
                        let want = reference(&q[i * d..(i + 1) * d], r);
                        assert_eq!(
                            out[i * 23 + j].to_bits(),
                            want.to_bits(),
                            "d {d} n {n} q {i} r {j}"
                        );
                    }
                }
                // The same values from a block that starts elsewhere, and for one query alone.
                let (mut part, mut pn) = (vec![0.0; n * 5], Vec::new());
                dots(&q, n, &rows[7 * d..12 * d], d, &mut part, &mut pn);
                for i in 0..n {
                    assert_eq!(&part[i * 5..i * 5 + 5], &out[i * 23 + 7..i * 23 + 12]);
                }
                let mut one = vec![0.0; 23];
                dots(&q[(n - 1) * d..], 1, &rows, d, &mut one, &mut pn);
                assert_eq!(&one[..], &out[(n - 1) * 23..n * 23]);
            }
        }
    }

    #[test]
    fn the_portable_path_agrees_bit_for_bit() {
        let d = 29;
        let rows = values(ROWS * d, 3);
        let q = values(QUERIES * d, 4);
        let r: [&[f32]; ROWS] = std::array::from_fn(|t| &rows[t * d..(t + 1) * d]);
        let qs: [&[f32]; QUERIES] = std::array::from_fn(|c| &q[c * d..(c + 1) * d]);
        let (mut a, mut b) = ([[0f32; QUERIES]; ROWS], [[0f32; QUERIES]; ROWS]);
        let (mut na, mut nb) = ([0f32; ROWS], [0f32; ROWS]);
        tile_dots::<ROWS, QUERIES, true>(cpu_has_avx2_fma(), &r, &qs, &mut a, &mut na);
        tile_dots::<ROWS, QUERIES, true>(false, &r, &qs, &mut b, &mut nb);
        assert_eq!((a, na), (b, nb));
        for (t, n) in na.iter().enumerate() {
            let exact: f64 = r[t].iter().map(|v| (*v as f64).powi(2)).sum();
            assert!((*n as f64 - exact).abs() < 1e-5 * exact.max(1.0));
        }
    }

    #[test]
    #[ignore]
    fn kernel_speed() {
        let (d, m) = (1280, 128);
        let rows = values(m * d, 5);
        for n in [1usize, 10, 100] {
            let q = values(n * d, 6);
            let (mut out, mut norms) = (vec![0.0; n * m], Vec::new());
            let reps = 2000 / n + 10;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                dots(&q, n, &rows, d, &mut out, &mut norms);
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            eprintln!(
                "n {n}: {:.1} us per block of {m} rows ({:.1} GB/s of rows, {:.1} GFLOP/s)",
                dt * 1e6,
                (m * d * 4) as f64 / dt / 1e9,
                (2 * (n + 1) * m * d) as f64 / dt / 1e9
            );
        }
    }
}
