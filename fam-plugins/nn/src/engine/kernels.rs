//! Channels-last (NHWC) CPU kernels of the engine, f32.
//!
//! Every kernel reads its input once and writes its output once: a convolution's bias (and
//! residual) is the matrix product's initial value and its activation is applied to each
//! output block while it is still in cache. Kernels are chosen by shape when a program is
//! built (see [`ConvKernel`]): a 1x1 convolution is one matrix product over all pixels, a
//! depthwise convolution is vectorized over channels, and other convolutions (grouped ones
//! included) are im2col plus one matrix product per group, written straight into the
//! group's columns of the output.

use rayon::prelude::*;

use super::Act;

/// An activation tensor in channels-last layout: `n` images of `h × w` pixels of `c`
/// channels, `data[((i·h + y)·w + x)·c + k]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Buf {
    pub data: Vec<f32>,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Buf {
    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Self {
        Self {
            data: vec![0f32; n * h * w * c],
            n,
            h,
            w,
            c,
        }
    }

    /// From channels-first data `[n, c, h, w]`.
    pub fn from_nchw(x: &[f32], (n, c, h, w): (usize, usize, usize, usize)) -> Self {
        let mut out = Self::zeros(n, h, w, c);
        let hw = h * w;
        if hw == 1 || c == 1 {
            out.data.copy_from_slice(x);
            return out;
        }
        for i in 0..n {
            let src = &x[i * c * hw..(i + 1) * c * hw];
            let dst = &mut out.data[i * c * hw..(i + 1) * c * hw];
            for (k, plane) in src.chunks_exact(hw).enumerate() {
                for (p, v) in plane.iter().enumerate() {
                    dst[p * c + k] = *v;
                }
            }
        }
        out
    }

    /// To channels-first data `[n, c, h, w]`.
    pub fn to_nchw(&self) -> Vec<f32> {
        let (n, c, hw) = (self.n, self.c, self.h * self.w);
        if hw == 1 || c == 1 {
            return self.data.clone();
        }
        let mut out = vec![0f32; self.data.len()];
        for i in 0..n {
            let src = &self.data[i * c * hw..(i + 1) * c * hw];
            let dst = &mut out[i * c * hw..(i + 1) * c * hw];
            for (p, px) in src.chunks_exact(c).enumerate() {
                for (k, v) in px.iter().enumerate() {
                    dst[k * hw + p] = *v;
                }
            }
        }
        out
    }

    pub fn pixels(&self) -> usize {
        self.n * self.h * self.w
    }
}

/// Applies `act` to every value, vectorized where the CPU allows.
pub fn activate(v: &mut [f32], act: Act) {
    #[cfg(target_arch = "x86_64")]
    {
        if !matches!(act, Act::None)
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { activate_avx2(v, act) };
            return;
        }
    }
    activate_body(v, act)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn activate_avx2(v: &mut [f32], act: Act) {
    activate_body(v, act)
}

#[inline(always)]
fn activate_body(v: &mut [f32], act: Act) {
    match act {
        Act::None => {}
        Act::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
        Act::Clip(lo, hi) => v.iter_mut().for_each(|x| *x = x.max(lo).min(hi)),
        Act::LeakyRelu(a) => v
            .iter_mut()
            .for_each(|x| *x = if *x < 0.0 { a * *x } else { *x }),
        Act::HardSigmoid(a, b) => v
            .iter_mut()
            .for_each(|x| *x = (a * *x + b).max(0.0).min(1.0)),
        Act::HardSwish => v
            .iter_mut()
            .for_each(|x| *x *= (*x * (1.0 / 6.0) + 0.5).max(0.0).min(1.0)),
        Act::Sigmoid => v.iter_mut().for_each(|x| *x = sigmoid(*x)),
        Act::Silu => v.iter_mut().for_each(|x| *x *= sigmoid(*x)),
        Act::Tanh => v.iter_mut().for_each(|x| *x = x.tanh()),
        Act::Gelu => v
            .iter_mut()
            .for_each(|x| *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2))),
    }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The error function, to about 1e-7 absolute (W. J. Cody's rational approximations, as in
/// most libm implementations, reduced to f32 use).
pub fn erf(x: f32) -> f32 {
    let xd = x as f64;
    let a = xd.abs();
    let r = if a < 0.5 {
        // erf(x) = x·P(x²)/Q(x²)
        let t = xd * xd;
        let p = 3.209_377_589_138_469_4e3
            + t * (3.774_852_376_853_020_2e2
                + t * (1.138_641_541_510_501_6e2
                    + t * (3.161_123_743_870_565_6 + t * 1.857_777_061_846_031_5e-1)));
        let q = 2.844_236_833_439_170_6e3
            + t * (1.282_616_526_077_372_3e3
                + t * (2.440_246_379_344_441_7e2 + t * (2.360_129_095_234_412_1e1 + t)));
        return (xd * p / q) as f32;
    } else if a < 4.0 {
        let p = 1.230_339_354_797_997_2e3
            + a * (2.051_078_377_826_071_5e3
                + a * (1.712_047_612_634_070_6e3
                    + a * (8.819_522_212_417_690_9e2
                        + a * (2.986_351_381_974_001_3e2
                            + a * (6.611_919_063_714_163e1
                                + a * (8.883_149_794_388_375_9
                                    + a * (5.641_884_969_886_700_9e-1
                                        + a * 2.153_115_354_744_038_5e-8)))))));
        let q = 1.230_339_354_803_749_4e3
            + a * (3.439_367_674_143_721_6e3
                + a * (4.362_619_090_143_247e3
                    + a * (3.290_799_235_733_459_7e3
                        + a * (1.621_389_574_566_690_2e3
                            + a * (5.371_811_018_620_098_6e2
                                + a * (1.176_939_508_913_124_9e2
                                    + a * (1.574_492_611_070_983_5e1 + a)))))));
        1.0 - (-a * a).exp() * p / q
    } else {
        1.0
    };
    (if xd < 0.0 { -r } else { r }) as f32
}

/// `dst[m×n] += lhs[m×k] · rhs[k×n]` with row strides `ld_dst`, `ld_lhs`, `ld_rhs` (column
/// stride 1 everywhere), split over `threads` threads when the product pays for it.
#[allow(clippy::too_many_arguments)]
pub fn gemm_acc(
    dst: &mut [f32],
    ld_dst: usize,
    lhs: &[f32],
    ld_lhs: usize,
    rhs: &[f32],
    ld_rhs: usize,
    (m, k, n): (usize, usize, usize),
    threads: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * ld_dst + n, "gemm dst too short");
    assert!(lhs.len() >= (m - 1) * ld_lhs + k, "gemm lhs too short");
    assert!(rhs.len() >= (k - 1) * ld_rhs + n, "gemm rhs too short");
    assert!(ld_dst >= n && ld_lhs >= k && ld_rhs >= n);
    let par = if threads > 1 && m * n * k > 1 << 17 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every access the strides describe inside the three
    // slices; `dst` is a `&mut` and cannot alias the inputs; gemm reads `dst` (alpha = 1)
    // before writing it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld_dst as isize,
            true,
            lhs.as_ptr(),
            1,
            ld_lhs as isize,
            rhs.as_ptr(),
            1,
            ld_rhs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// How a convolution is computed, chosen by shape when the program is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKernel {
    /// 1x1, stride 1, no padding, one group: one matrix product over all pixels.
    Pointwise,
    /// One input and one output channel per group: vectorized over channels.
    Depthwise,
    /// im2col per image and group, then one matrix product per group.
    Im2col,
}

/// A convolution ready to run on NHWC data, with its bias, activation and (optionally) a
/// residual input added before the activation.
#[derive(Debug, Clone)]
pub struct Conv {
    pub c: usize,
    pub o: usize,
    pub groups: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub dilation: (usize, usize),
    /// top, left, bottom, right
    pub pads: [usize; 4],
    pub act: Act,
    /// PReLU slopes per output channel, applied after `act`.
    pub prelu: Option<Vec<f32>>,
    pub kernel: ConvKernel,
    /// Pointwise / Im2col: per group `[kh·kw·cg, og]`, rows ordered (ky, kx, ci), groups
    /// one after another. Depthwise: `[kh·kw, C]`.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Conv {
    /// From ONNX-layout weights `[O, C/groups, kh, kw]`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &[f32],
        bias: Vec<f32>,
        (o, cg, kh, kw): (usize, usize, usize, usize),
        groups: usize,
        stride: (usize, usize),
        dilation: (usize, usize),
        pads: [usize; 4],
        act: Act,
    ) -> Self {
        let c = cg * groups;
        let og = o / groups;
        let kernel = if groups == 1 && kh == 1 && kw == 1 && stride == (1, 1) && pads == [0; 4] {
            ConvKernel::Pointwise
        } else if groups == c && cg == 1 && o == c {
            ConvKernel::Depthwise
        } else {
            ConvKernel::Im2col
        };
        let taps = kh * kw;
        let mut weight = vec![0f32; w.len()];
        if kernel == ConvKernel::Depthwise {
            for ch in 0..o {
                for t in 0..taps {
                    weight[t * o + ch] = w[ch * taps + t];
                }
            }
        } else {
            let rows = taps * cg;
            for g in 0..groups {
                let block = &mut weight[g * rows * og..(g + 1) * rows * og];
                for oo in 0..og {
                    let oc = g * og + oo;
                    for ci in 0..cg {
                        for t in 0..taps {
                            block[(t * cg + ci) * og + oo] = w[(oc * cg + ci) * taps + t];
                        }
                    }
                }
            }
        }
        Self {
            c,
            o,
            groups,
            kh,
            kw,
            stride,
            dilation,
            pads,
            act,
            prelu: None,
            kernel,
            weight,
            bias,
        }
    }

    /// The activation (and PReLU) of a block of whole output pixels.
    #[inline]
    fn epilogue(&self, dst: &mut [f32]) {
        activate(dst, self.act);
        if let Some(slope) = &self.prelu {
            prelu(dst, slope);
        }
    }

    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let eff = |k: usize, d: usize| d * (k - 1) + 1;
        let ho = (h + self.pads[0] + self.pads[2]).saturating_sub(eff(self.kh, self.dilation.0))
            / self.stride.0
            + 1;
        let wo = (w + self.pads[1] + self.pads[3]).saturating_sub(eff(self.kw, self.dilation.1))
            / self.stride.1
            + 1;
        (ho, wo)
    }

    /// Runs on `x` (`x.c == self.c`); `residual`, when given, has the output's shape and is
    /// added before the activation.
    pub fn run(&self, x: &Buf, residual: Option<&Buf>, threads: usize) -> Buf {
        let (ho, wo) = self.out_hw(x.h, x.w);
        let mut out = Buf::zeros(x.n, ho, wo, self.o);
        // Initial value: bias (+ residual).
        match residual {
            Some(r) => {
                debug_assert_eq!(r.data.len(), out.data.len());
                for (dst, src) in out
                    .data
                    .chunks_exact_mut(self.o)
                    .zip(r.data.chunks_exact(self.o))
                {
                    for ((d, s), b) in dst.iter_mut().zip(src).zip(&self.bias) {
                        *d = s + b;
                    }
                }
            }
            None => {
                for dst in out.data.chunks_exact_mut(self.o) {
                    dst.copy_from_slice(&self.bias);
                }
            }
        }
        match self.kernel {
            ConvKernel::Pointwise => {
                let m = x.pixels();
                // Split the rows into blocks so the activation runs on each block while it is
                // still in cache.
                let block = 256usize;
                if threads > 1 && m >= 2 * block {
                    out.data
                        .par_chunks_mut(block * self.o)
                        .zip(x.data.par_chunks(block * self.c))
                        .for_each(|(dst, src)| {
                            let rows = src.len() / self.c;
                            gemm_acc(
                                dst,
                                self.o,
                                src,
                                self.c,
                                &self.weight,
                                self.o,
                                (rows, self.c, self.o),
                                1,
                            );
                            self.epilogue(dst);
                        });
                } else {
                    for (dst, src) in out
                        .data
                        .chunks_mut(block * self.o)
                        .zip(x.data.chunks(block * self.c))
                    {
                        let rows = src.len() / self.c;
                        gemm_acc(
                            dst,
                            self.o,
                            src,
                            self.c,
                            &self.weight,
                            self.o,
                            (rows, self.c, self.o),
                            1,
                        );
                        self.epilogue(dst);
                    }
                }
            }
            ConvKernel::Depthwise => {
                let (h, w, c) = (x.h, x.w, x.c);
                let per_image = ho * wo * c;
                for (img, dst) in out.data.chunks_mut(per_image).enumerate() {
                    let xi = &x.data[img * h * w * c..(img + 1) * h * w * c];
                    let run = |(oy, row): (usize, &mut [f32])| {
                        depthwise_row(xi, (h, w, c), self, oy, row);
                        self.epilogue(row);
                    };
                    if threads > 1 && ho > 1 {
                        dst.par_chunks_mut(wo * c).enumerate().for_each(run);
                    } else {
                        dst.chunks_mut(wo * c).enumerate().for_each(run);
                    }
                }
            }
            ConvKernel::Im2col => {
                let cg = self.c / self.groups;
                let og = self.o / self.groups;
                let kk = self.kh * self.kw * cg;
                let per_image = ho * wo * self.o;
                let mut cols = vec![0f32; ho * wo * kk];
                for (img, dst) in out.data.chunks_mut(per_image).enumerate() {
                    let xi = &x.data[img * x.h * x.w * x.c..(img + 1) * x.h * x.w * x.c];
                    for g in 0..self.groups {
                        im2col(xi, (x.h, x.w, x.c), self, g * cg, cg, (ho, wo), &mut cols);
                        gemm_acc(
                            &mut dst[g * og..],
                            self.o,
                            &cols,
                            kk,
                            &self.weight[g * kk * og..(g + 1) * kk * og],
                            og,
                            (ho * wo, kk, og),
                            threads,
                        );
                    }
                    self.epilogue(dst);
                }
            }
        }
        out
    }
}

/// im2col of channels `c0..c0+cg` of one NHWC image: `[Ho·Wo, kh·kw·cg]`, rows (ky, kx, ci).
#[allow(clippy::too_many_arguments)]
fn im2col(
    x: &[f32],
    (h, w, c): (usize, usize, usize),
    cv: &Conv,
    c0: usize,
    cg: usize,
    (ho, wo): (usize, usize),
    cols: &mut [f32],
) {
    let kk = cv.kh * cv.kw * cg;
    let (sh, sw) = cv.stride;
    let (dh, dw) = cv.dilation;
    for oy in 0..ho {
        for ox in 0..wo {
            let row = &mut cols[(oy * wo + ox) * kk..][..kk];
            for ky in 0..cv.kh {
                let iy = (oy * sh + ky * dh) as isize - cv.pads[0] as isize;
                for kx in 0..cv.kw {
                    let ix = (ox * sw + kx * dw) as isize - cv.pads[1] as isize;
                    let dst = &mut row[(ky * cv.kw + kx) * cg..][..cg];
                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                        dst.fill(0.0);
                    } else {
                        let at = (iy as usize * w + ix as usize) * c + c0;
                        dst.copy_from_slice(&x[at..at + cg]);
                    }
                }
            }
        }
    }
}

/// One output row of a depthwise convolution, accumulated onto its initial value.
fn depthwise_row(x: &[f32], dims: (usize, usize, usize), cv: &Conv, oy: usize, row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { depthwise_row_avx512(x, dims, cv, oy, row) };
            return;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            unsafe { depthwise_row_avx2(x, dims, cv, oy, row) };
            return;
        }
    }
    depthwise_row_body::<false>(x, dims, cv, oy, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn depthwise_row_avx512(
    x: &[f32],
    dims: (usize, usize, usize),
    cv: &Conv,
    oy: usize,
    row: &mut [f32],
) {
    depthwise_row_body::<true>(x, dims, cv, oy, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_row_avx2(
    x: &[f32],
    dims: (usize, usize, usize),
    cv: &Conv,
    oy: usize,
    row: &mut [f32],
) {
    depthwise_row_body::<true>(x, dims, cv, oy, row)
}

/// Channels per register block of the depthwise kernel: the accumulators of one block stay
/// in vector registers across all the taps of a pixel.
const DW_BLOCK: usize = 32;

#[inline(always)]
fn depthwise_row_body<const FMA: bool>(
    x: &[f32],
    (h, w, c): (usize, usize, usize),
    cv: &Conv,
    oy: usize,
    row: &mut [f32],
) {
    let (sh, sw) = cv.stride;
    let (dh, dw) = cv.dilation;
    // The rows of the input this output row reads (row offsets, weight tap offsets).
    let mut taps: [(usize, usize); 64] = [(0, 0); 64];
    let mut ntaps = 0;
    let big = cv.kh * cv.kw > 64;
    for (ox, px) in row.chunks_exact_mut(c).enumerate() {
        ntaps = 0;
        if !big {
            for ky in 0..cv.kh {
                let iy = (oy * sh + ky * dh) as isize - cv.pads[0] as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                for kx in 0..cv.kw {
                    let ix = (ox * sw + kx * dw) as isize - cv.pads[1] as isize;
                    if ix < 0 || ix >= w as isize {
                        continue;
                    }
                    taps[ntaps] = ((iy as usize * w + ix as usize) * c, (ky * cv.kw + kx) * c);
                    ntaps += 1;
                }
            }
        }
        if big {
            // Kernels of more than 64 taps (rare): tap by tap over the channels.
            for ky in 0..cv.kh {
                let iy = (oy * sh + ky * dh) as isize - cv.pads[0] as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                for kx in 0..cv.kw {
                    let ix = (ox * sw + kx * dw) as isize - cv.pads[1] as isize;
                    if ix < 0 || ix >= w as isize {
                        continue;
                    }
                    let xs = &x[(iy as usize * w + ix as usize) * c..][..c];
                    let ws = &cv.weight[(ky * cv.kw + kx) * c..][..c];
                    for ((o, xv), wv) in px.iter_mut().zip(xs).zip(ws) {
                        *o = if FMA {
                            xv.mul_add(*wv, *o)
                        } else {
                            *o + xv * wv
                        };
                    }
                }
            }
            continue;
        }
        let taps = &taps[..ntaps];
        let mut c0 = 0;
        while c0 + DW_BLOCK <= c {
            let mut acc = [0f32; DW_BLOCK];
            acc.copy_from_slice(&px[c0..c0 + DW_BLOCK]);
            for &(xo, wo) in taps {
                let xs = &x[xo + c0..xo + c0 + DW_BLOCK];
                let ws = &cv.weight[wo + c0..wo + c0 + DW_BLOCK];
                for i in 0..DW_BLOCK {
                    acc[i] = if FMA {
                        xs[i].mul_add(ws[i], acc[i])
                    } else {
                        acc[i] + xs[i] * ws[i]
                    };
                }
            }
            px[c0..c0 + DW_BLOCK].copy_from_slice(&acc);
            c0 += DW_BLOCK;
        }
        if c0 < c {
            for &(xo, wo) in taps {
                let xs = &x[xo + c0..xo + c];
                let ws = &cv.weight[wo + c0..wo + c];
                for ((o, xv), wv) in px[c0..].iter_mut().zip(xs).zip(ws) {
                    *o = if FMA {
                        xv.mul_add(*wv, *o)
                    } else {
                        *o + xv * wv
                    };
                }
            }
        }
    }
    let _ = ntaps;
}

/// Max or average pooling on NHWC data, with ONNX's padding and `ceil_mode` semantics.
#[derive(Debug, Clone)]
pub struct Pool {
    pub max: bool,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    /// top, left, bottom, right
    pub pads: [usize; 4],
    pub ceil: bool,
    pub count_include_pad: bool,
}

fn pool_len(len: usize, k: usize, s: usize, pb: usize, pe: usize, ceil: bool) -> usize {
    let span = (len + pb + pe).saturating_sub(k);
    let mut out = if ceil {
        span.div_ceil(s) + 1
    } else {
        span / s + 1
    };
    // With ceil_mode the last window must start inside the input or its left padding.
    if ceil && (out - 1) * s >= len + pb {
        out -= 1;
    }
    out
}

impl Pool {
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            pool_len(
                h,
                self.kh,
                self.stride.0,
                self.pads[0],
                self.pads[2],
                self.ceil,
            ),
            pool_len(
                w,
                self.kw,
                self.stride.1,
                self.pads[1],
                self.pads[3],
                self.ceil,
            ),
        )
    }

    pub fn run(&self, x: &Buf) -> Buf {
        let (ho, wo) = self.out_hw(x.h, x.w);
        let c = x.c;
        let mut out = Buf::zeros(x.n, ho, wo, c);
        let init = if self.max { f32::NEG_INFINITY } else { 0.0 };
        for img in 0..x.n {
            let xi = &x.data[img * x.h * x.w * c..(img + 1) * x.h * x.w * c];
            let dst = &mut out.data[img * ho * wo * c..(img + 1) * ho * wo * c];
            for oy in 0..ho {
                let y0 = (oy * self.stride.0) as isize - self.pads[0] as isize;
                let y1 = y0 + self.kh as isize;
                let (ya, yb) = (y0.max(0) as usize, (y1.min(x.h as isize)).max(0) as usize);
                for ox in 0..wo {
                    let x0 = (ox * self.stride.1) as isize - self.pads[1] as isize;
                    let x1 = x0 + self.kw as isize;
                    let (xa, xb) = (x0.max(0) as usize, (x1.min(x.w as isize)).max(0) as usize);
                    let px = &mut dst[(oy * wo + ox) * c..][..c];
                    px.fill(init);
                    for iy in ya..yb {
                        for ix in xa..xb {
                            let src = &xi[(iy * x.w + ix) * c..][..c];
                            if self.max {
                                for (o, v) in px.iter_mut().zip(src) {
                                    *o = o.max(*v);
                                }
                            } else {
                                for (o, v) in px.iter_mut().zip(src) {
                                    *o += v;
                                }
                            }
                        }
                    }
                    if !self.max {
                        let count = if self.count_include_pad {
                            // The window clipped to the padded input (not the ceil extension).
                            let ye = y1.min((x.h + self.pads[2]) as isize);
                            let xe = x1.min((x.w + self.pads[3]) as isize);
                            ((ye - y0) * (xe - x0)) as f32
                        } else {
                            ((yb.saturating_sub(ya)) * (xb.saturating_sub(xa))) as f32
                        };
                        let inv = if count > 0.0 { 1.0 / count } else { 0.0 };
                        px.iter_mut().for_each(|v| *v *= inv);
                    } else if ya >= yb || xa >= xb {
                        px.fill(0.0);
                    }
                }
            }
        }
        out
    }
}

/// Global average or max pooling: `[n, 1, 1, c]`.
pub fn global_pool(x: &Buf, max: bool) -> Buf {
    let mut out = Buf::zeros(x.n, 1, 1, x.c);
    let hw = x.h * x.w;
    for (img, dst) in out.data.chunks_exact_mut(x.c).enumerate() {
        let xi = &x.data[img * hw * x.c..(img + 1) * hw * x.c];
        if max {
            dst.fill(f32::NEG_INFINITY);
            for px in xi.chunks_exact(x.c) {
                for (o, v) in dst.iter_mut().zip(px) {
                    *o = o.max(*v);
                }
            }
        } else {
            for px in xi.chunks_exact(x.c) {
                for (o, v) in dst.iter_mut().zip(px) {
                    *o += v;
                }
            }
            let inv = 1.0 / hw as f32;
            dst.iter_mut().for_each(|v| *v *= inv);
        }
    }
    out
}

/// `y = act(x · scale + shift)` per channel.
pub fn affine(x: &mut Buf, scale: &[f32], shift: &[f32], act: Act) {
    for px in x.data.chunks_exact_mut(x.c) {
        for ((v, s), b) in px.iter_mut().zip(scale).zip(shift) {
            *v = *v * s + b;
        }
    }
    activate(&mut x.data, act);
}

/// `x < 0 ? x · slope[k] : x` per channel `k`.
pub fn prelu(v: &mut [f32], slope: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { prelu_avx2(v, slope) };
            return;
        }
    }
    prelu_body(v, slope)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn prelu_avx2(v: &mut [f32], slope: &[f32]) {
    prelu_body(v, slope)
}

#[inline(always)]
fn prelu_body(v: &mut [f32], slope: &[f32]) {
    for px in v.chunks_exact_mut(slope.len()) {
        for (x, s) in px.iter_mut().zip(slope) {
            *x = x.max(0.0) + x.min(0.0) * s;
        }
    }
}

/// Element-wise binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    #[inline(always)]
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
        }
    }
}

/// `a ∘ b` where `b` has `a`'s shape, or is one channel vector per image (`[n, 1, 1, c]`,
/// squeeze-excite), or `a` is (then the result has `b`'s shape); then `act`.
pub fn binary(a: &Buf, b: &Buf, op: BinOp, act: Act) -> Buf {
    let mut out;
    if a.data.len() == b.data.len() {
        out = a.clone();
        for (o, v) in out.data.iter_mut().zip(&b.data) {
            *o = op.apply(*o, *v);
        }
    } else if b.h * b.w == 1 && b.n == a.n && b.c == a.c {
        out = a.clone();
        let per = a.h * a.w * a.c;
        for (img, chunk) in out.data.chunks_exact_mut(per).enumerate() {
            let v = &b.data[img * a.c..(img + 1) * a.c];
            for px in chunk.chunks_exact_mut(a.c) {
                for (o, s) in px.iter_mut().zip(v) {
                    *o = op.apply(*o, *s);
                }
            }
        }
    } else {
        // a is the per-image vector.
        out = b.clone();
        let per = b.h * b.w * b.c;
        for (img, chunk) in out.data.chunks_exact_mut(per).enumerate() {
            let v = &a.data[img * b.c..(img + 1) * b.c];
            for px in chunk.chunks_exact_mut(b.c) {
                for (o, s) in px.iter_mut().zip(v) {
                    *o = op.apply(*s, *o);
                }
            }
        }
    }
    activate(&mut out.data, act);
    out
}

/// Concatenation along channels.
pub fn concat(parts: &[&Buf]) -> Buf {
    let (n, h, w) = (parts[0].n, parts[0].h, parts[0].w);
    let c: usize = parts.iter().map(|p| p.c).sum();
    let mut out = Buf::zeros(n, h, w, c);
    let mut off = 0;
    for p in parts {
        for (dst, src) in out.data.chunks_exact_mut(c).zip(p.data.chunks_exact(p.c)) {
            dst[off..off + p.c].copy_from_slice(src);
        }
        off += p.c;
    }
    out
}
