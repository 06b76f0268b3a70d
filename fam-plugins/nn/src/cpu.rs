//! Direct channels-first (NCHW) CPU kernels for a single folded convolution (f32), used by
//! [`crate::ConvBn::forward`] outside the engine: a pointwise convolution as one matrix
//! product per image, other dense convolutions as im2col plus a matrix product, and a direct
//! depthwise convolution per plane. Whole networks run on [`crate::engine`] instead
//! (channels-last, fused).
//!
//! The bias is the matrix product's initial value and the activation is applied in the same
//! pass over the output, so each layer reads its input once and writes its output once.

use rayon::prelude::*;

use crate::act::Act;

/// A convolution with BatchNorm folded in, as plain host memory.
#[derive(Debug, Clone)]
pub struct HostConv {
    /// `[O, I/groups, k, k]`, row-major.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub out_channels: usize,
    /// Input channels per group.
    pub in_per_group: usize,
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
    pub act: Act,
}

/// Output spatial size of a convolution.
pub fn out_size(n: usize, k: usize, stride: usize, padding: usize) -> usize {
    (n + 2 * padding).saturating_sub(k) / stride + 1
}

#[inline]
fn activate(v: &mut [f32], act: Act) {
    match act {
        Act::None => {}
        Act::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
        Act::Relu6 => v.iter_mut().for_each(|x| *x = x.clamp(0.0, 6.0)),
        Act::LeakyRelu01 => v
            .iter_mut()
            .for_each(|x| *x = if *x < 0.0 { 0.1 * *x } else { *x }),
    }
}

/// `dst += lhs · rhs` for row-major `m × k` and `k × n` matrices, split over `threads`
/// threads when the product is large enough to pay for it.
fn gemm_accumulate(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    (m, k, n): (usize, usize, usize),
    threads: usize,
) {
    assert!(dst.len() == m * n && lhs.len() == m * k && rhs.len() == k * n);
    let par = if threads > 1 && m * n * k > 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three buffers have exactly the sizes the strides describe (asserted
    // above), `dst` does not alias the inputs (a `&mut` and two `&`), and gemm reads `dst`
    // before writing it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            true,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// `dst[m, n] = bias[m] + Σ_k lhs[m, k] · rhs[k, n]` (all row-major), then the activation.
#[allow(clippy::too_many_arguments)]
fn matmul_bias_act(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    bias: &[f32],
    (m, k, n): (usize, usize, usize),
    act: Act,
    threads: usize,
) {
    for (row, b) in dst.chunks_exact_mut(n).zip(bias) {
        row.fill(*b);
    }
    gemm_accumulate(dst, lhs, rhs, (m, k, n), threads);
    activate(dst, act);
}

/// im2col for one image: `[C·k·k, Ho·Wo]`, zeros where a tap falls into the padding.
fn im2col(x: &[f32], (c, h, w): (usize, usize, usize), conv: &HostConv, cols: &mut [f32]) {
    let (k, s, p) = (conv.k, conv.stride, conv.padding);
    let (ho, wo) = (out_size(h, k, s, p), out_size(w, k, s, p));
    for ci in 0..c {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut cols[((ci * k + ky) * k + kx) * ho * wo..][..ho * wo];
                for oy in 0..ho {
                    let iy = (oy * s + ky) as isize - p as isize;
                    let out = &mut row[oy * wo..(oy + 1) * wo];
                    if iy < 0 || iy >= h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                    for (ox, o) in out.iter_mut().enumerate() {
                        let ix = (ox * s + kx) as isize - p as isize;
                        *o = if ix < 0 || ix >= w as isize {
                            0.0
                        } else {
                            src[ix as usize]
                        };
                    }
                }
            }
        }
    }
}

/// One depthwise plane: `out = bias + Σ_taps w · shifted(in)`, then the activation.
fn depthwise_plane(
    x: &[f32],
    (h, w): (usize, usize),
    wk: &[f32],
    bias: f32,
    conv: &HostConv,
    out: &mut [f32],
) {
    let (k, s, p) = (conv.k, conv.stride, conv.padding);
    let wo = out_size(w, k, s, p);
    for (oy, orow) in out.chunks_exact_mut(wo).enumerate() {
        orow.fill(bias);
        for ky in 0..k {
            let iy = (oy * s + ky) as isize - p as isize;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            let irow = &x[iy as usize * w..(iy as usize + 1) * w];
            for kx in 0..k {
                let wv = wk[ky * k + kx];
                // Output columns whose tap ix = ox·s + kx − p lies inside the row.
                let lo = if kx >= p { 0 } else { (p - kx).div_ceil(s) };
                let hi = if w + p > kx {
                    ((w + p - kx - 1) / s + 1).min(wo)
                } else {
                    0
                };
                if lo >= hi {
                    continue;
                }
                let first = lo * s + kx - p;
                if s == 1 {
                    let src = &irow[first..first + (hi - lo)];
                    for (o, i) in orow[lo..hi].iter_mut().zip(src) {
                        *o += wv * i;
                    }
                } else {
                    for (j, o) in orow[lo..hi].iter_mut().enumerate() {
                        *o += wv * irow[first + j * s];
                    }
                }
            }
        }
        activate(orow, conv.act);
    }
}

/// Runs `conv` on a contiguous NCHW batch; returns the output and its shape.
pub fn conv2d(
    x: &[f32],
    (b, c, h, w): (usize, usize, usize, usize),
    conv: &HostConv,
) -> (Vec<f32>, (usize, usize, usize, usize)) {
    let (k, s, p, o) = (conv.k, conv.stride, conv.padding, conv.out_channels);
    let (ho, wo) = (out_size(h, k, s, p), out_size(w, k, s, p));
    let mut out = vec![0f32; b * o * ho * wo];
    let threads = rayon::current_num_threads();
    if conv.groups > 1 {
        // Depthwise (one input channel per group): every plane is independent.
        out.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(i, plane)| {
                let ch = i % o;
                depthwise_plane(
                    &x[i * h * w..(i + 1) * h * w],
                    (h, w),
                    &conv.weight[ch * k * k..(ch + 1) * k * k],
                    conv.bias[ch],
                    conv,
                    plane,
                );
            });
        return (out, (b, o, ho, wo));
    }
    let kk = c * k * k;
    let pointwise = k == 1 && s == 1 && p == 0;
    // Images in parallel when there are enough of them, else threads inside each product.
    let per_image = |(img, dst): (usize, &mut [f32]), inner: usize| {
        let xi = &x[img * c * h * w..(img + 1) * c * h * w];
        if pointwise {
            matmul_bias_act(
                dst,
                &conv.weight,
                xi,
                &conv.bias,
                (o, c, h * w),
                conv.act,
                inner,
            );
        } else {
            let mut cols = vec![0f32; kk * ho * wo];
            im2col(xi, (c, h, w), conv, &mut cols);
            matmul_bias_act(
                dst,
                &conv.weight,
                &cols,
                &conv.bias,
                (o, kk, ho * wo),
                conv.act,
                inner,
            );
        }
    };
    if b >= threads && threads > 1 {
        out.par_chunks_mut(o * ho * wo)
            .enumerate()
            .for_each(|item| per_image(item, 1));
    } else {
        out.chunks_mut(o * ho * wo)
            .enumerate()
            .for_each(|item| per_image(item, threads));
    }
    (out, (b, o, ho, wo))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The convolution by its definition, for comparison.
    fn naive(x: &[f32], (b, c, h, w): (usize, usize, usize, usize), cv: &HostConv) -> Vec<f32> {
        let (k, s, p, o) = (cv.k, cv.stride, cv.padding, cv.out_channels);
        let (ho, wo) = (out_size(h, k, s, p), out_size(w, k, s, p));
        let ipg = cv.in_per_group;
        let opg = o / cv.groups;
        let mut out = vec![0f32; b * o * ho * wo];
        for bi in 0..b {
            for oc in 0..o {
                let g = oc / opg;
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = cv.bias[oc];
                        for ic in 0..ipg {
                            let cin = g * ipg + ic;
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * s + ky) as isize - p as isize;
                                    let ix = (ox * s + kx) as isize - p as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    acc += cv.weight[((oc * ipg + ic) * k + ky) * k + kx]
                                        * x[((bi * c + cin) * h + iy as usize) * w + ix as usize];
                                }
                            }
                        }
                        out[((bi * o + oc) * ho + oy) * wo + ox] = match cv.act {
                            Act::Relu6 => acc.clamp(0.0, 6.0),
                            _ => acc,
                        };
                    }
                }
            }
        }
        let _ = c;
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn kernels_match_the_definition() {
        // (batch, in, out, h, w, k, stride, padding, depthwise)
        let cases = [
            (2, 3, 5, 9, 7, 3, 2, 1, false),
            (3, 4, 6, 5, 5, 1, 1, 0, false),
            (1, 4, 3, 6, 8, 1, 2, 0, false),
            (2, 6, 6, 7, 7, 3, 1, 1, true),
            (2, 5, 5, 8, 6, 3, 2, 1, true),
            (1, 3, 3, 7, 9, 3, 2, 1, true),
            (1, 2, 2, 1, 2, 3, 2, 1, true),
            (1, 2, 2, 2, 1, 3, 1, 1, true),
            (1, 3, 3, 9, 9, 5, 2, 2, true),
            (1, 2, 4, 7, 5, 7, 1, 3, false),
        ];
        for (n, &(b, c, o, h, w, k, s, p, dw)) in cases.iter().enumerate() {
            let ipg = if dw { 1 } else { c };
            let cv = HostConv {
                weight: values(o * ipg * k * k, n as u32 + 1),
                bias: values(o, n as u32 + 100),
                out_channels: o,
                in_per_group: ipg,
                k,
                stride: s,
                padding: p,
                groups: if dw { c } else { 1 },
                act: if n % 2 == 0 { Act::Relu6 } else { Act::None },
            };
            let x = values(b * c * h * w, n as u32 + 7);
            let (ours, shape) = conv2d(&x, (b, c, h, w), &cv);
            let want = naive(&x, (b, c, h, w), &cv);
            assert_eq!(ours.len(), want.len(), "case {n}");
            assert_eq!(shape.0 * shape.1 * shape.2 * shape.3, want.len());
            for (i, (a, e)) in ours.iter().zip(&want).enumerate() {
                assert!((a - e).abs() < 1e-4, "case {n} at {i}: {a} vs {e}");
            }
        }
    }
}
