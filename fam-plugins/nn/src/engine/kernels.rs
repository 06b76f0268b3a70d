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

use super::act::Act;

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

/// Flush-to-zero and denormals-are-zero on the current thread while it lives (x86-64), as
/// inference runtimes run (set by every task of a program, worker threads included): a subnormal activation takes the processor's slow path on every
/// operation it meets (measured on MobileFaceNet with random inputs: 16 vs 9 ms per image).
/// Results change by less than f32's smallest normal number, 1.2e-38.
pub struct FlushToZero {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

impl FlushToZero {
    pub fn on() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let mut saved: u32 = 0;
            // SAFETY: stmxcsr/ldmxcsr read and write the SSE control register of this thread
            // only; setting FTZ (bit 15) and DAZ (bit 6) changes rounding of subnormals alone.
            unsafe {
                std::arch::asm!("stmxcsr [{}]", in(reg) &mut saved, options(nostack));
                let on = saved | 0x8040;
                std::arch::asm!("ldmxcsr [{}]", in(reg) &on, options(nostack));
            }
            Self { saved }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Self {}
    }
}

impl Drop for FlushToZero {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: restores the value read in `on`.
        unsafe {
            std::arch::asm!("ldmxcsr [{}]", in(reg) &self.saved, options(nostack));
        }
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
    // Plain loops (no closures), so that the caller's target features apply.
    match act {
        Act::None => {}
        Act::Relu => {
            for x in v.iter_mut() {
                *x = x.max(0.0);
            }
        }
        Act::Clip(lo, hi) => {
            for x in v.iter_mut() {
                *x = x.max(lo).min(hi);
            }
        }
        Act::LeakyRelu(a) => {
            for x in v.iter_mut() {
                *x = x.max(0.0) + a * x.min(0.0);
            }
        }
        Act::HardSigmoid(a, b) => {
            for x in v.iter_mut() {
                *x = (a * *x + b).clamp(0.0, 1.0);
            }
        }
        Act::HardSwish => {
            for x in v.iter_mut() {
                *x *= (*x * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0);
            }
        }
        Act::Sigmoid => {
            for x in v.iter_mut() {
                *x = sigmoid(*x);
            }
        }
        Act::Silu => {
            for x in v.iter_mut() {
                *x *= sigmoid(*x);
            }
        }
        Act::Tanh => {
            for x in v.iter_mut() {
                *x = tanh(*x);
            }
        }
        Act::Gelu => {
            for x in v.iter_mut() {
                *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
        Act::Erf => {
            for x in v.iter_mut() {
                *x = erf(*x);
            }
        }
    }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `e^x` in plain arithmetic that the compiler vectorizes (libm's `expf` is one call per
/// value): Cephes' range reduction `x = n·ln 2 + r` and its degree-6 polynomial for `e^r`,
/// then `2^n` from the exponent bits. Relative error about 2e-7 over the clamped range.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.336_55, 88.376_26);
    // n = round(x·log2 e) by the 1.5·2^23 trick, which vectorizes without a rounding
    // instruction; its integer value is in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let m = x * std::f32::consts::LOG2_E + MAGIC;
    let n = m - MAGIC;
    let ni = (m.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r2 + r + 1.0;
    y * f32::from_bits((ni.wrapping_add(127) as u32) << 23)
}

/// `tanh x = 1 − 2 / (e^{2x} + 1)`, vectorizable.
#[inline(always)]
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// The error function, vectorizable: Abramowitz and Stegun 7.1.26 (absolute error 1.5e-7
/// in exact arithmetic, about 3e-7 in f32).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    // Branch-free sign transfer (vectorizes).
    f32::from_bits(y.to_bits() | (x.to_bits() & 0x8000_0000))
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
    // slices; `dst` is a `&mut` and cannot alias the inputs.
    unsafe {
        gemm_raw(
            dst.as_mut_ptr(),
            ld_dst,
            lhs,
            ld_lhs,
            rhs,
            ld_rhs,
            (m, k, n),
            par,
        )
    }
}

/// `dst += lhs · rhs` through a raw output pointer.
///
/// # Safety
/// `dst` must be valid for writes at `i·ld_dst + j` for every `i < m`, `j < n`, no other
/// thread may access those elements meanwhile, and `lhs`/`rhs` must hold `m×k` / `k×n`
/// matrices with the given row strides.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    dst: *mut f32,
    ld_dst: usize,
    lhs: &[f32],
    ld_lhs: usize,
    rhs: &[f32],
    ld_rhs: usize,
    (m, k, n): (usize, usize, usize),
    par: gemm::Parallelism,
) {
    debug_assert!(lhs.len() >= (m - 1) * ld_lhs + k && rhs.len() >= (k - 1) * ld_rhs + n);
    // SAFETY: as the caller promises; gemm reads `dst` (alpha = 1) before writing it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
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

/// [`gemm_acc`] with the output columns split over `threads` threads: each thread packs
/// only its share of `rhs`, which is what a product with few rows and a large weight matrix
/// needs (a 7x7 map against 512 x 2048 weights).
#[allow(clippy::too_many_arguments)]
pub fn gemm_acc_cols(
    dst: &mut [f32],
    ld_dst: usize,
    lhs: &[f32],
    ld_lhs: usize,
    rhs: &[f32],
    ld_rhs: usize,
    (m, k, n): (usize, usize, usize),
    threads: usize,
) {
    if threads <= 1 || n < 32 || m == 0 {
        return gemm_acc(dst, ld_dst, lhs, ld_lhs, rhs, ld_rhs, (m, k, n), 1);
    }
    assert!(dst.len() >= (m - 1) * ld_dst + n, "gemm dst too short");
    assert!(lhs.len() >= (m - 1) * ld_lhs + k, "gemm lhs too short");
    assert!(rhs.len() >= (k - 1) * ld_rhs + n, "gemm rhs too short");
    assert!(ld_dst >= n && ld_lhs >= k && ld_rhs >= n);
    let parts = threads.min(n / 16).max(1);
    let step = n.div_ceil(parts).div_ceil(16) * 16;
    /// The output's base pointer, shared by tasks that write disjoint columns.
    struct Out(*mut f32);
    // SAFETY: the tasks below write disjoint columns of `dst` only.
    unsafe impl Sync for Out {}
    let out = Out(dst.as_mut_ptr());
    (0..n.div_ceil(step)).into_par_iter().for_each(|b| {
        let _ftz = FlushToZero::on();
        let (j0, j1) = (b * step, ((b + 1) * step).min(n));
        let out = &out;
        // SAFETY: rows i < m, columns j0..j1 lie inside `dst` (asserted above); each task
        // owns columns j0..j1 alone; `dst` is borrowed mutably for the whole call.
        unsafe {
            gemm_raw(
                out.0.add(j0),
                ld_dst,
                lhs,
                ld_lhs,
                &rhs[j0..],
                ld_rhs,
                (m, k, j1 - j0),
                gemm::Parallelism::None,
            )
        };
    });
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

    /// The initial value of output pixels starting at element `off`: the bias, plus the
    /// residual's values there when there is one.
    #[inline]
    fn init(&self, dst: &mut [f32], off: usize, residual: Option<&[f32]>) {
        match residual {
            Some(r) => {
                let r = &r[off..off + dst.len()];
                for (d, s) in dst.chunks_exact_mut(self.o).zip(r.chunks_exact(self.o)) {
                    for ((d, s), b) in d.iter_mut().zip(s).zip(&self.bias) {
                        *d = s + b;
                    }
                }
            }
            None => {
                for d in dst.chunks_exact_mut(self.o) {
                    d.copy_from_slice(&self.bias);
                }
            }
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
        let res = residual.map(|r| r.data.as_slice());
        if let Some(r) = res {
            assert_eq!(r.len(), out.data.len(), "residual size");
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
                        .enumerate()
                        .for_each(|(k, (dst, src))| {
                            let _ftz = FlushToZero::on();
                            self.init(dst, k * block * self.o, res);
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
                } else if threads > 1 {
                    // Few pixels (a 7x7 or 14x14 map): one product, its output channels
                    // split over the threads.
                    self.init(&mut out.data, 0, res);
                    gemm_acc_cols(
                        &mut out.data,
                        self.o,
                        &x.data,
                        self.c,
                        &self.weight,
                        self.o,
                        (m, self.c, self.o),
                        threads,
                    );
                    self.epilogue(&mut out.data);
                } else {
                    for (k, (dst, src)) in out
                        .data
                        .chunks_mut(block * self.o)
                        .zip(x.data.chunks(block * self.c))
                        .enumerate()
                    {
                        self.init(dst, k * block * self.o, res);
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
                // Several output rows a task: enough work to pay for the hand-off.
                let rows = if threads > 1 {
                    ho.div_ceil(4 * threads).max(1)
                } else {
                    ho
                };
                for (img, dst) in out.data.chunks_mut(per_image).enumerate() {
                    let xi = &x.data[img * h * w * c..(img + 1) * h * w * c];
                    let run = |(t, block): (usize, &mut [f32])| {
                        let _ftz = FlushToZero::on();
                        self.init(block, img * per_image + t * rows * wo * c, res);
                        for (r, row) in block.chunks_mut(wo * c).enumerate() {
                            depthwise_row(xi, (h, w, c), self, t * rows + r, row);
                        }
                        self.epilogue(block);
                    };
                    if threads > 1 && ho > rows {
                        dst.par_chunks_mut(rows * wo * c).enumerate().for_each(run);
                    } else {
                        dst.chunks_mut(rows * wo * c).enumerate().for_each(run);
                    }
                }
            }
            ConvKernel::Im2col => {
                let cg = self.c / self.groups;
                let og = self.o / self.groups;
                let kk = self.kh * self.kw * cg;
                let per_image = ho * wo * self.o;
                // Tiles of output rows: each one's im2col block stays in cache, and with
                // several threads the tiles of one image run in parallel.
                // At least 256 pixels a tile (a small map is one tile, whose product the
                // matrix-product crate splits over the threads).
                let rows = (256 / wo.max(1)).max(1);
                let gemm_threads = if ho <= rows { threads } else { 1 };
                let (xh, xw, xc) = (x.h, x.w, x.c);
                for (img, dst) in out.data.chunks_mut(per_image).enumerate() {
                    let xi = &x.data[img * xh * xw * xc..(img + 1) * xh * xw * xc];
                    let tile = |(t, dtile): (usize, &mut [f32])| {
                        let _ftz = FlushToZero::on();
                        self.init(dtile, img * per_image + t * rows * wo * self.o, res);
                        let oy0 = t * rows;
                        let n = dtile.len() / (wo * self.o);
                        COLS.with(|cols| {
                            let mut cols = cols.borrow_mut();
                            if cols.len() < n * wo * kk {
                                cols.resize(n * wo * kk, 0.0);
                            }
                            let cols = &mut cols[..n * wo * kk];
                            for g in 0..self.groups {
                                im2col(xi, (xh, xw, xc), self, g * cg, cg, (oy0, n, wo), cols);
                                gemm_acc_cols(
                                    &mut dtile[g * og..],
                                    self.o,
                                    cols,
                                    kk,
                                    &self.weight[g * kk * og..(g + 1) * kk * og],
                                    og,
                                    (n * wo, kk, og),
                                    gemm_threads,
                                );
                            }
                        });
                        self.epilogue(dtile);
                    };
                    if threads > 1 && ho > rows {
                        dst.par_chunks_mut(rows * wo * self.o)
                            .enumerate()
                            .for_each(tile);
                    } else {
                        dst.chunks_mut(rows * wo * self.o)
                            .enumerate()
                            .for_each(tile);
                    }
                }
            }
        }
        out
    }
}

thread_local! {
    /// The im2col block of the current thread, reused from tile to tile.
    static COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// im2col of channels `c0..c0+cg` of one NHWC image, for `n` output rows from `oy0`:
/// `[n·Wo, kh·kw·cg]`, columns ordered (ky, kx, ci).
fn im2col(
    x: &[f32],
    (h, w, c): (usize, usize, usize),
    cv: &Conv,
    c0: usize,
    cg: usize,
    (oy0, n, wo): (usize, usize, usize),
    cols: &mut [f32],
) {
    let kk = cv.kh * cv.kw * cg;
    let (sh, sw) = cv.stride;
    let (dh, dw) = cv.dilation;
    for r in 0..n {
        let oy = oy0 + r;
        for ox in 0..wo {
            let row = &mut cols[(r * wo + ox) * kk..][..kk];
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

/// Channels per vector block of the depthwise kernel (one AVX-512 register).
const DW_BLOCK: usize = 16;

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
    let (pt, pl) = (cv.pads[0], cv.pads[1]);
    let wo = row.len() / c;
    // Kernel rows that fall inside the input: (ky, iy).
    let kys: Vec<(usize, usize)> = (0..cv.kh)
        .filter_map(|ky| {
            let iy = (oy * sh + ky * dh) as isize - pt as isize;
            (iy >= 0 && iy < h as isize).then_some((ky, iy as usize))
        })
        .collect();
    // Output columns whose every tap lies inside the row: no checks there.
    let span = (cv.kw - 1) * dw;
    let lo = pl.div_ceil(sw).min(wo);
    let hi = if w + pl > span {
        ((w + pl - span - 1) / sw + 1).min(wo)
    } else {
        0
    }
    .max(lo);
    let full = c / DW_BLOCK * DW_BLOCK;
    for ox in 0..wo {
        let interior = ox >= lo && ox < hi;
        // Input offsets and weight offsets of this pixel's taps.
        let mut taps: [(usize, usize); 49] = [(0, 0); 49];
        let mut n = 0;
        let small = cv.kh * cv.kw <= 49;
        for &(ky, iy) in &kys {
            for kx in 0..cv.kw {
                let ix = (ox * sw + kx * dw) as isize - pl as isize;
                if !interior && (ix < 0 || ix >= w as isize) {
                    continue;
                }
                if small {
                    taps[n] = ((iy * w + ix as usize) * c, (ky * cv.kw + kx) * c);
                    n += 1;
                }
            }
        }
        let px = &mut row[ox * c..(ox + 1) * c];
        if !small {
            // Kernels of more than 49 taps (rare): tap by tap over all channels.
            for &(ky, iy) in &kys {
                for kx in 0..cv.kw {
                    let ix = (ox * sw + kx * dw) as isize - pl as isize;
                    if ix < 0 || ix >= w as isize {
                        continue;
                    }
                    let (xo, wo_) = ((iy * w + ix as usize) * c, (ky * cv.kw + kx) * c);
                    for i in 0..c {
                        px[i] = if FMA {
                            x[xo + i].mul_add(cv.weight[wo_ + i], px[i])
                        } else {
                            px[i] + x[xo + i] * cv.weight[wo_ + i]
                        };
                    }
                }
            }
            continue;
        }
        let taps = &taps[..n];
        let mut c0 = 0;
        while c0 < full {
            // A full block: the accumulator is one register.
            let out: &mut [f32; DW_BLOCK] = (&mut px[c0..c0 + DW_BLOCK]).try_into().expect("block");
            let mut acc = *out;
            for &(xo, wo_) in taps {
                let xs: &[f32; DW_BLOCK] =
                    x[xo + c0..xo + c0 + DW_BLOCK].try_into().expect("block");
                let ws: &[f32; DW_BLOCK] = cv.weight[wo_ + c0..wo_ + c0 + DW_BLOCK]
                    .try_into()
                    .expect("block");
                for i in 0..DW_BLOCK {
                    acc[i] = if FMA {
                        xs[i].mul_add(ws[i], acc[i])
                    } else {
                        acc[i] + xs[i] * ws[i]
                    };
                }
            }
            *out = acc;
            c0 += DW_BLOCK;
        }
        if full < c {
            for &(xo, wo_) in taps {
                for i in full..c {
                    px[i] = if FMA {
                        x[xo + i].mul_add(cv.weight[wo_ + i], px[i])
                    } else {
                        px[i] + x[xo + i] * cv.weight[wo_ + i]
                    };
                }
            }
        }
    }
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
pub fn affine(data: &mut [f32], scale: &[f32], shift: &[f32], act: Act) {
    for px in data.chunks_exact_mut(scale.len()) {
        for ((v, s), b) in px.iter_mut().zip(scale).zip(shift) {
            *v = *v * s + b;
        }
    }
    activate(data, act);
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

/// Layer normalization over each pixel's channels: `(x − mean) / sqrt(var + eps) · scale +
/// shift`, with the biased variance, as ONNX's LayerNormalization.
pub fn layer_norm(data: &mut [f32], scale: &[f32], shift: &[f32], eps: f32) {
    let c = scale.len();
    for px in data.chunks_exact_mut(c) {
        let mean = px.iter().sum::<f32>() / c as f32;
        let var = px.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, s), b) in px.iter_mut().zip(scale).zip(shift) {
            *v = (*v - mean) * inv * s + b;
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
