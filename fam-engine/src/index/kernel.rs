//! The search's inner products: every query against a block of reference rows.
//!
//! Each product `q · r` is summed in one fixed order, `k = 0, 1, …, d − 1`, with one fused
//! multiply-add per term, whatever the number of queries, the block, the tiling or the
//! threads. So a query gets bit-identical keys in a single run and in any shard of a
//! sharded one, and the AVX2 kernel and the portable one agree bit for bit (both are FMA).
//!
//! The AVX2 kernel is an outer-product tile, as in a GEMM micro-kernel: 6 reference rows
//! times 16 queries (12 accumulator registers), each step broadcasting one value of each row
//! against 16 packed query values. A single query reads each reference value once, so the
//! search is bound by memory bandwidth; many queries reuse each row from L1.

/// Queries per packed panel.
const GROUP: usize = 16;
/// Reference rows per tile.
const TILE: usize = 6;

/// The queries, packed for the kernel: groups of 16, each `[d][16]` (query `g * 16 + l` at
/// lane `l`, zero where there is none).
#[derive(Debug, Clone)]
pub struct Packed {
    n: usize,
    d: usize,
    data: Vec<f32>,
}

impl Packed {
    /// Packs `n` queries of `d` values, row after row in `q`.
    pub fn new(q: &[f32], n: usize, d: usize) -> Self {
        assert_eq!(q.len(), n * d, "queries are n × d");
        let groups = n.div_ceil(GROUP);
        let mut data = vec![0.0; groups * d * GROUP];
        for i in 0..n {
            let (g, l) = (i / GROUP, i % GROUP);
            let panel = &mut data[g * d * GROUP..(g + 1) * d * GROUP];
            for (k, v) in q[i * d..(i + 1) * d].iter().enumerate() {
                panel[k * GROUP + l] = *v;
            }
        }
        Self { n, d, data }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn dims(&self) -> usize {
        self.d
    }

    fn panel(&self, g: usize) -> &[f32] {
        &self.data[g * self.d * GROUP..(g + 1) * self.d * GROUP]
    }
}

/// `out[i * m + j] = q_i · r_j` for the `n` packed queries and the `m` rows of `rows`
/// (`m × d`, row after row).
pub fn dots(q: &Packed, rows: &[f32], out: &mut [f32]) {
    let d = q.d;
    let m = if d == 0 { 0 } else { rows.len() / d };
    assert_eq!(rows.len(), m * d, "rows are m × d");
    assert_eq!(out.len(), q.n * m, "out is n × m");
    if m == 0 || q.n == 0 {
        return;
    }
    let simd = cpu_has_avx2_fma();
    let mut tile = [[0f32; GROUP]; TILE];
    for j0 in (0..m).step_by(TILE) {
        let live = TILE.min(m - j0);
        // Missing rows of the last tile repeat its last row; their results are dropped.
        let row: [&[f32]; TILE] =
            std::array::from_fn(|r| &rows[(j0 + r.min(live - 1)) * d..][..d]);
        for g in 0..q.n.div_ceil(GROUP) {
            let lanes = GROUP.min(q.n - g * GROUP);
            tile_dots(simd, q.panel(g), &row, d, lanes > 8, &mut tile);
            for (r, t) in tile.iter().enumerate().take(live) {
                for (l, v) in t.iter().enumerate().take(lanes) {
                    out[(g * GROUP + l) * m + j0 + r] = *v;
                }
            }
        }
    }
}

/// Squared norms of the `m` rows of `rows` (`m × d`), each summed in 8 lanes (`k mod 8`,
/// fused multiply-adds) and then pairwise: one fixed order, whatever the block.
pub fn squared_norms(rows: &[f32], d: usize, out: &mut Vec<f32>) {
    out.clear();
    if d == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if cpu_has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        unsafe { norms_avx2(rows, d, out) };
        return;
    }
    norms_portable(rows, d, out);
}

#[inline(always)]
fn norms_portable(rows: &[f32], d: usize, out: &mut Vec<f32>) {
    for row in rows.chunks_exact(d) {
        let mut lane = [0f32; 8];
        let mut chunks = row.chunks_exact(8);
        for c in chunks.by_ref() {
            for l in 0..8 {
                lane[l] = c[l].mul_add(c[l], lane[l]);
            }
        }
        for (l, v) in chunks.remainder().iter().enumerate() {
            lane[l] = v.mul_add(*v, lane[l]);
        }
        let a = [
            lane[0] + lane[4],
            lane[1] + lane[5],
            lane[2] + lane[6],
            lane[3] + lane[7],
        ];
        let b = [a[0] + a[2], a[1] + a[3]];
        out.push(b[0] + b[1]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn norms_avx2(rows: &[f32], d: usize, out: &mut Vec<f32>) {
    // The same code as the portable version: with FMA enabled, `mul_add` is one instruction
    // and the 8 lanes become one register.
    norms_portable(rows, d, out)
}

fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One tile: `tile[r][l] = row_r · query_l` for the 16 (or, with `wide = false`, the first
/// 8) queries of a panel.
fn tile_dots(
    simd: bool,
    panel: &[f32],
    row: &[&[f32]; TILE],
    d: usize,
    wide: bool,
    tile: &mut [[f32; GROUP]; TILE],
) {
    debug_assert!(panel.len() >= d * GROUP && row.iter().all(|r| r.len() >= d));
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the CPU has AVX2 and FMA; the panel holds `d * 16` values and each row
        // `d` (checked by the callers' slicing).
        unsafe {
            if wide {
                tile_avx2::<2>(panel.as_ptr(), row, d, tile)
            } else {
                tile_avx2::<1>(panel.as_ptr(), row, d, tile)
            }
        }
        return;
    }
    let _ = (simd, wide);
    for (r, t) in tile.iter_mut().enumerate() {
        let mut acc = [0f32; GROUP];
        for k in 0..d {
            let b = row[r][k];
            let q = &panel[k * GROUP..(k + 1) * GROUP];
            for l in 0..GROUP {
                acc[l] = b.mul_add(q[l], acc[l]);
            }
        }
        *t = acc;
    }
}

/// The AVX2 tile, `W` registers (8 queries each) wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const W: usize>(
    panel: *const f32,
    row: &[&[f32]; TILE],
    d: usize,
    tile: &mut [[f32; GROUP]; TILE],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); W]; TILE];
    let p: [*const f32; TILE] = std::array::from_fn(|r| row[r].as_ptr());
    for k in 0..d {
        // SAFETY: k < d, and the panel holds d * 16 values (see the caller).
        let q: [__m256; W] =
            std::array::from_fn(|w| unsafe { _mm256_loadu_ps(panel.add(k * GROUP + 8 * w)) });
        for r in 0..TILE {
            // SAFETY: each row holds d values.
            let b = unsafe { _mm256_broadcast_ss(&*p[r].add(k)) };
            for w in 0..W {
                acc[r][w] = _mm256_fmadd_ps(b, q[w], acc[r][w]);
            }
        }
    }
    for r in 0..TILE {
        for w in 0..W {
            // SAFETY: tile[r] holds 16 values, w < W <= 2.
            unsafe { _mm256_storeu_ps(tile[r].as_mut_ptr().add(8 * w), acc[r][w]) };
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

    /// The defining order: k = 0..d, one fused multiply-add per term.
    fn sequential(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0.0, |acc, (x, y)| y.mul_add(*x, acc))
    }

    #[test]
    fn every_product_is_the_sequential_fused_sum_whatever_the_shapes() {
        let d = 37;
        let rows = values(23 * d, 1);
        for n in [1, 3, 8, 9, 16, 17, 40] {
            let q = values(n * d, 2);
            let packed = Packed::new(&q, n, d);
            let mut out = vec![0.0; n * 23];
            dots(&packed, &rows, &mut out);
            for i in 0..n {
                for j in 0..23 {
                    let want = sequential(&q[i * d..(i + 1) * d], &rows[j * d..(j + 1) * d]);
                    assert_eq!(out[i * 23 + j].to_bits(), want.to_bits(), "n {n} q {i} r {j}");
                }
            }
            // The same values from a block that starts elsewhere.
            let mut part = vec![0.0; n * 5];
            dots(&packed, &rows[7 * d..12 * d], &mut part);
            for i in 0..n {
                assert_eq!(&part[i * 5..i * 5 + 5], &out[i * 23 + 7..i * 23 + 12]);
            }
        }
    }

    #[test]
    fn the_portable_path_agrees_bit_for_bit() {
        let d = 29;
        let rows = values(TILE * d, 3);
        let q = values(GROUP * d, 4);
        let packed = Packed::new(&q, GROUP, d);
        let row: [&[f32]; TILE] = std::array::from_fn(|r| &rows[r * d..(r + 1) * d]);
        let (mut a, mut b) = ([[0f32; GROUP]; TILE], [[0f32; GROUP]; TILE]);
        tile_dots(true && cpu_has_avx2_fma(), packed.panel(0), &row, d, true, &mut a);
        tile_dots(false, packed.panel(0), &row, d, true, &mut b);
        assert_eq!(a, b);
        let (mut na, mut nb) = (Vec::new(), Vec::new());
        squared_norms(&rows, d, &mut na);
        norms_portable(&rows, d, &mut nb);
        assert_eq!(na, nb);
        for (r, n) in na.iter().enumerate() {
            let exact: f64 = rows[r * d..(r + 1) * d]
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum();
            assert!((*n as f64 - exact).abs() < 1e-5 * exact.max(1.0));
        }
    }
}
