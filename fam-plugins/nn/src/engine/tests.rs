//! The engine against the definitions: each convolution kernel against a direct loop, each
//! rewrite against the same graph run without rewrites, and the per-image parallel path
//! against the single-thread one.

use super::kernels::{self, Buf, Conv, ConvKernel, Pool};
use super::*;

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

/// The convolution by its definition, NCHW in and out.
#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    bias: &[f32],
    (o, cg, kh, kw): (usize, usize, usize, usize),
    groups: usize,
    (sh, sw): (usize, usize),
    (dh, dw): (usize, usize),
    pads: [usize; 4],
) -> (Vec<f32>, (usize, usize)) {
    let ho = (h + pads[0] + pads[2] - (dh * (kh - 1) + 1)) / sh + 1;
    let wo = (w + pads[1] + pads[3] - (dw * (kw - 1) + 1)) / sw + 1;
    let og = o / groups;
    let mut out = vec![0f32; n * o * ho * wo];
    for b in 0..n {
        for oc in 0..o {
            let g = oc / og;
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = bias[oc];
                    for ci in 0..cg {
                        let cin = g * cg + ci;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * sh + ky * dh) as isize - pads[0] as isize;
                                let ix = (ox * sw + kx * dw) as isize - pads[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                acc += wt[((oc * cg + ci) * kh + ky) * kw + kx]
                                    * x[((b * c + cin) * h + iy as usize) * w + ix as usize];
                            }
                        }
                    }
                    out[((b * o + oc) * ho + oy) * wo + ox] = acc;
                }
            }
        }
    }
    (out, (ho, wo))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn layouts_round_trip() {
    let x = values(2 * 3 * 4 * 5, 1);
    let b = Buf::from_nchw(&x, (2, 3, 4, 5));
    assert_eq!(b.data[1], x[20], "channel 1 of pixel 0 of image 0");
    assert_eq!(b.to_nchw(), x);
}

#[test]
fn every_convolution_kernel_matches_the_definition() {
    // (n, c, o, h, w, kh, kw, groups, stride, dilation, pads, expected kernel)
    let cases = [
        (
            2,
            5,
            7,
            6,
            5,
            1,
            1,
            1,
            (1, 1),
            (1, 1),
            [0; 4],
            ConvKernel::Pointwise,
        ),
        (
            1,
            4,
            6,
            7,
            7,
            1,
            1,
            1,
            (2, 2),
            (1, 1),
            [0; 4],
            ConvKernel::Im2col,
        ),
        (
            2,
            3,
            8,
            9,
            7,
            3,
            3,
            1,
            (2, 2),
            (1, 1),
            [1; 4],
            ConvKernel::Im2col,
        ),
        (
            1,
            3,
            4,
            11,
            9,
            7,
            7,
            1,
            (2, 2),
            (1, 1),
            [3; 4],
            ConvKernel::Im2col,
        ),
        (
            1,
            6,
            6,
            8,
            8,
            3,
            3,
            6,
            (1, 1),
            (1, 1),
            [1; 4],
            ConvKernel::Depthwise,
        ),
        (
            2,
            5,
            5,
            9,
            6,
            5,
            5,
            5,
            (2, 2),
            (1, 1),
            [2; 4],
            ConvKernel::Depthwise,
        ),
        (
            1,
            4,
            4,
            9,
            9,
            3,
            3,
            4,
            (1, 1),
            (2, 2),
            [2; 4],
            ConvKernel::Depthwise,
        ),
        (
            1,
            4,
            4,
            7,
            8,
            3,
            3,
            4,
            (2, 1),
            (1, 1),
            [0, 1, 1, 0],
            ConvKernel::Depthwise,
        ),
        (
            1,
            8,
            12,
            6,
            6,
            3,
            3,
            4,
            (1, 1),
            (1, 1),
            [1; 4],
            ConvKernel::Im2col,
        ),
        (
            2,
            8,
            8,
            7,
            5,
            3,
            3,
            2,
            (2, 2),
            (1, 1),
            [1, 0, 1, 0],
            ConvKernel::Im2col,
        ),
        (
            1,
            4,
            8,
            5,
            5,
            3,
            3,
            4,
            (1, 1),
            (1, 1),
            [1; 4],
            ConvKernel::Im2col,
        ),
        (
            1,
            3,
            5,
            8,
            9,
            1,
            7,
            1,
            (1, 1),
            (1, 1),
            [0, 3, 0, 3],
            ConvKernel::Im2col,
        ),
        (
            1,
            3,
            5,
            9,
            8,
            7,
            1,
            1,
            (1, 1),
            (1, 1),
            [3, 0, 3, 0],
            ConvKernel::Im2col,
        ),
        (
            1,
            4,
            6,
            6,
            6,
            3,
            3,
            1,
            (1, 1),
            (2, 2),
            [2; 4],
            ConvKernel::Im2col,
        ),
    ];
    for (case, &(n, c, o, h, w, kh, kw, groups, stride, dilation, pads, kind)) in
        cases.iter().enumerate()
    {
        let cg = c / groups;
        let wt = values(o * cg * kh * kw, case as u32 + 3);
        let bias = values(o, case as u32 + 50);
        let x = values(n * c * h * w, case as u32 + 90);
        let (want, (ho, wo)) = naive_conv(
            &x,
            (n, c, h, w),
            &wt,
            &bias,
            (o, cg, kh, kw),
            groups,
            stride,
            dilation,
            pads,
        );
        let conv = Conv::new(
            &wt,
            bias.clone(),
            (o, cg, kh, kw),
            groups,
            stride,
            dilation,
            pads,
            Act::None,
        );
        assert_eq!(conv.kernel, kind, "case {case}");
        assert_eq!(conv.out_hw(h, w), (ho, wo), "case {case}");
        let xb = Buf::from_nchw(&x, (n, c, h, w));
        for threads in [1, 2] {
            let y = conv.run(&xb, None, threads);
            let d = max_diff(&y.to_nchw(), &want);
            assert!(d < 1e-4, "case {case} ({kind:?}, {threads} threads): {d}");
            // A residual is added before the activation.
            let r = Buf::from_nchw(&values(n * o * ho * wo, 7), (n, o, ho, wo));
            let relu = Conv {
                act: Act::Relu,
                ..conv.clone()
            };
            let y = relu.run(&xb, Some(&r), threads).to_nchw();
            let rn = r.to_nchw();
            let want_r: Vec<f32> = want
                .iter()
                .zip(&rn)
                .map(|(a, b)| (a + b).max(0.0))
                .collect();
            assert!(max_diff(&y, &want_r) < 1e-4, "case {case} with residual");
        }
    }
}

#[test]
fn activations_match_their_formulas() {
    let xs = [-5.0f32, -1.5, -0.25, 0.0, 0.3, 1.0, 2.5, 7.0];
    let gelu = |x: f32| 0.5 * x * (1.0 + erf_ref(x as f64 / 2f64.sqrt()) as f32);
    for (act, f) in [
        (
            Act::Relu,
            Box::new(|x: f32| x.max(0.0)) as Box<dyn Fn(f32) -> f32>,
        ),
        (Act::Clip(0.0, 6.0), Box::new(|x: f32| x.clamp(0.0, 6.0))),
        (
            Act::LeakyRelu(0.1),
            Box::new(|x: f32| if x < 0.0 { 0.1 * x } else { x }),
        ),
        (
            Act::HardSigmoid(0.2, 0.5),
            Box::new(|x: f32| (0.2 * x + 0.5).clamp(0.0, 1.0)),
        ),
        (
            Act::HardSwish,
            Box::new(|x: f32| x * (x / 6.0 + 0.5).clamp(0.0, 1.0)),
        ),
        (Act::Sigmoid, Box::new(|x: f32| 1.0 / (1.0 + (-x).exp()))),
        (Act::Silu, Box::new(|x: f32| x / (1.0 + (-x).exp()))),
        (Act::Tanh, Box::new(|x: f32| x.tanh())),
        (Act::Gelu, Box::new(gelu)),
    ] {
        let mut v = xs.to_vec();
        kernels::activate(&mut v, act);
        for (x, y) in xs.iter().zip(&v) {
            assert!(
                (f(*x) - y).abs() < 1e-6,
                "{act:?}({x}) = {y}, expected {}",
                f(*x)
            );
        }
    }
}

/// erf by its Taylor series / continued fraction, in f64, for checking the kernel's.
fn erf_ref(x: f64) -> f64 {
    if x.abs() > 3.0 {
        // erfc asymptotic is tiny here; the series below loses accuracy.
        let t = 1.0 / (1.0 + 0.5 * x.abs());
        let y = 1.0
            - t * (-x * x - 1.26551223
                + t * (1.00002368
                    + t * (0.37409196
                        + t * (0.09678418
                            + t * (-0.18628806
                                + t * (0.27886807
                                    + t * (-1.13520398
                                        + t * (1.48851587
                                            + t * (-0.82215223 + t * 0.17087277)))))))))
                .exp();
        return if x < 0.0 { -y } else { y };
    }
    let mut sum = 0.0;
    let mut term = x;
    let mut n = 0.0;
    while term.abs() > 1e-17 {
        sum += term / (2.0 * n + 1.0);
        n += 1.0;
        term *= -x * x / n;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn exp_is_accurate() {
    for i in -870..=880 {
        let x = i as f32 / 10.0;
        let (got, want) = (kernels::exp(x) as f64, (x as f64).exp());
        assert!(
            ((got - want) / want).abs() < 4e-7,
            "exp({x}): {got} vs {want}"
        );
    }
}

#[test]
fn erf_is_accurate() {
    for i in -60..=60 {
        let x = i as f64 / 10.0;
        let e = (kernels::erf(x as f32) as f64 - erf_ref(x)).abs();
        assert!(e < 5e-7, "erf({x}): {e}");
    }
}

#[test]
fn pools_follow_onnx_padding_rules() {
    // 1 image, 1 channel, 5x5 ramp.
    let x: Vec<f32> = (0..25).map(|v| v as f32).collect();
    let b = Buf::from_nchw(&x, (1, 1, 5, 5));
    let max = Pool {
        max: true,
        kh: 3,
        kw: 3,
        stride: (2, 2),
        pads: [1; 4],
        ceil: false,
        count_include_pad: false,
    };
    assert_eq!(
        max.run(&b).data,
        vec![6.0, 8.0, 9.0, 16.0, 18.0, 19.0, 21.0, 23.0, 24.0]
    );
    // Top-left window covers (0,0),(0,1),(1,0),(1,1): mean 3 excluding the pad, 12/9 including.
    let avg = Pool {
        max: false,
        ..max.clone()
    };
    assert_eq!(avg.run(&b).data[0], 3.0);
    let inc = Pool {
        count_include_pad: true,
        ..avg.clone()
    };
    assert!((inc.run(&b).data[0] - 12.0 / 9.0).abs() < 1e-6);
    // ceil_mode: 5 wide, k 2, s 2 -> 3 outputs, the last window clipped (not counted).
    let ceil = Pool {
        max: false,
        kh: 2,
        kw: 2,
        stride: (2, 2),
        pads: [0; 4],
        ceil: true,
        count_include_pad: true,
    };
    assert_eq!(ceil.out_hw(5, 5), (3, 3));
    assert_eq!(
        ceil.run(&b).data[8],
        24.0,
        "the corner window holds one cell"
    );
    let g = kernels::global_pool(&b, false);
    assert_eq!(g.data, vec![12.0]);
}

fn tensor(data: Vec<f32>, dims: (usize, usize, usize, usize)) -> Tensor {
    Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
}

fn conv_spec(c: usize, o: usize, k: usize, groups: usize, stride: usize, seed: u32) -> ConvSpec {
    ConvSpec {
        weight: values(o * (c / groups) * k * k, seed),
        dims: (o, c / groups, k, k),
        bias: values(o, seed + 1),
        groups,
        stride: (stride, stride),
        dilation: (1, 1),
        pads: [k / 2; 4],
        act: Act::None,
        prelu: None,
    }
}

/// A residual block with an unfused BatchNorm, SiLU, a squeeze-excite gate and a concat:
/// every rewrite has something to do.
fn block(b: &mut Builder) -> Vec<ValueId> {
    let x = b.input();
    let c1 = b.conv("c1", x, conv_spec(4, 8, 3, 1, 1, 1)).unwrap();
    let bn = b.affine("bn1", c1, values(8, 10), values(8, 11));
    let sg = b.act("sig", bn, Act::Sigmoid);
    let silu = b.binary("silu", BinOp::Mul, bn, sg, false);
    let dw = b.conv("dw", silu, conv_spec(8, 8, 3, 8, 1, 2)).unwrap();
    let r1 = b.act("relu6", dw, Act::Clip(0.0, 6.0));
    // Squeeze-excite.
    let gap = b.global_pool("gap", r1, false);
    let s1 = b.conv("se1", gap, conv_spec(8, 2, 1, 1, 1, 3)).unwrap();
    let s1 = b.act("se_relu", s1, Act::Relu);
    let s2 = b.conv("se2", s1, conv_spec(2, 8, 1, 1, 1, 4)).unwrap();
    let s2 = b.act("se_hsig", s2, Act::HardSigmoid(0.2, 0.5));
    let se = b.binary("se", BinOp::Mul, r1, s2, true);
    let pw = b.conv("pw", se, conv_spec(8, 8, 1, 1, 1, 5)).unwrap();
    let short = b.conv("short", x, conv_spec(4, 8, 1, 1, 1, 6)).unwrap();
    let add = b.binary("add", BinOp::Add, pw, short, false);
    let out = b.act("relu", add, Act::Relu);
    let pool = b.pool(
        "pool",
        out,
        Pool {
            max: true,
            kh: 3,
            kw: 3,
            stride: (2, 2),
            pads: [1; 4],
            ceil: false,
            count_include_pad: false,
        },
    );
    let cat = b.concat("cat", vec![pool, pool]);
    let emb = b.global_pool("emb", cat, false);
    vec![cat, emb]
}

#[test]
fn rewrites_keep_the_values_and_fuse() {
    let x = tensor(values(3 * 4 * 9 * 7, 77), (3, 4, 9, 7));
    let mut plain = Builder::new();
    let outs = block(&mut plain);
    let plain = plain.build_unoptimized(&outs).unwrap();
    let mut fused = Builder::new();
    let outs = block(&mut fused);
    let fused = fused.build(&outs).unwrap();
    let (all_plain, _) = plain.counts();
    let (all_fused, native) = fused.counts();
    assert_eq!(all_plain, 19);
    assert_eq!(native, all_fused);
    // bn1 + silu folded into c1; relu6 into dw; se_relu / se_hsig into se1 / se2; the
    // residual add and its relu into pw: 19 - 8 steps.
    let summary = fused.summary();
    assert_eq!(all_fused, 11, "{summary:?}");
    let want = plain.run(&[x.clone()]).unwrap();
    for pool in [1usize, 2] {
        let got = rayon::ThreadPoolBuilder::new()
            .num_threads(pool)
            .build()
            .unwrap()
            .install(|| fused.run(&[x.clone()]))
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.dims(), w.dims());
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            assert!(max_diff(&g, &w) < 1e-4, "{pool} threads");
        }
    }
}

#[test]
fn outputs_are_never_fused_away() {
    // The conv's output is a program output: the ReLU must not be folded into it.
    let mut b = Builder::new();
    let x = b.input();
    let c = b.conv("c", x, conv_spec(2, 3, 1, 1, 1, 9)).unwrap();
    let r = b.act("r", c, Act::Relu);
    let p = b.build(&[c, r]).unwrap();
    assert_eq!(p.counts(), (2, 2));
    let out = p
        .run(&[tensor(values(2 * 2 * 3 * 3, 4), (2, 2, 3, 3))])
        .unwrap();
    let c: Vec<f32> = out[0].flatten_all().unwrap().to_vec1().unwrap();
    let r: Vec<f32> = out[1].flatten_all().unwrap().to_vec1().unwrap();
    assert!(c.iter().any(|v| *v < 0.0));
    assert_eq!(c.iter().map(|v| v.max(0.0)).collect::<Vec<_>>(), r);
}

#[derive(Debug)]
struct Negate;
impl ExternalOp for Negate {
    fn kind(&self) -> String {
        "Negate".into()
    }
    fn eval(&self, inputs: &[Tensor], _batch: usize) -> Result<Vec<Tensor>> {
        Ok(vec![inputs[0].neg()?])
    }
}

#[test]
fn external_operators_meet_native_ones() {
    let mut b = Builder::new();
    let x = b.input();
    let c = b.conv("c", x, conv_spec(3, 4, 3, 1, 2, 12)).unwrap();
    let n = b.external("neg", Arc::new(Negate), vec![c], 1)[0];
    let r = b.act("relu", n, Act::Relu);
    let p = b.build(&[r]).unwrap();
    assert_eq!(p.counts(), (3, 2));
    let xt = tensor(values(2 * 3 * 8 * 8, 5), (2, 3, 8, 8));
    let got: Vec<f32> = p.run(&[xt.clone()]).unwrap()[0]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let spec = conv_spec(3, 4, 3, 1, 2, 12);
    let xs: Vec<f32> = xt.flatten_all().unwrap().to_vec1().unwrap();
    let (want, _) = naive_conv(
        &xs,
        (2, 3, 8, 8),
        &spec.weight,
        &spec.bias,
        spec.dims,
        1,
        (2, 2),
        (1, 1),
        [1; 4],
    );
    let want: Vec<f32> = want.iter().map(|v| (-v).max(0.0)).collect();
    assert!(max_diff(&got, &want) < 1e-4);
}

/// GELU in the five nodes exporters write, with the 0.5 applied last or first.
fn gelu_graph(b: &mut Builder, half_first: bool) -> Vec<ValueId> {
    let x = b.input();
    let c = b.conv("c", x, conv_spec(3, 6, 1, 1, 1, 21)).unwrap();
    let d = b.affine(
        "div",
        c,
        vec![std::f32::consts::FRAC_1_SQRT_2; 6],
        vec![0.0; 6],
    );
    let e = b.act("erf", d, Act::Erf);
    let p = b.affine("add1", e, vec![1.0; 6], vec![1.0; 6]);
    let out = if half_first {
        let h = b.affine("half", c, vec![0.5; 6], vec![0.0; 6]);
        b.binary("mul", BinOp::Mul, h, p, false)
    } else {
        let m = b.binary("mul", BinOp::Mul, c, p, false);
        b.affine("half", m, vec![0.5; 6], vec![0.0; 6])
    };
    vec![out]
}

#[test]
fn exported_gelu_becomes_one_fused_activation() {
    let x = tensor(values(2 * 3 * 5 * 4, 8), (2, 3, 5, 4));
    for half_first in [false, true] {
        let mut plain = Builder::new();
        let outs = gelu_graph(&mut plain, half_first);
        let plain = plain.build_unoptimized(&outs).unwrap();
        let mut fused = Builder::new();
        let outs = gelu_graph(&mut fused, half_first);
        let fused = fused.build(&outs).unwrap();
        assert_eq!(fused.counts(), (1, 1), "{:?}", fused.summary());
        let (w, g) = (
            plain.run(&[x.clone()]).unwrap(),
            fused.run(&[x.clone()]).unwrap(),
        );
        let (w, g): (Vec<f32>, Vec<f32>) = (
            w[0].flatten_all().unwrap().to_vec1().unwrap(),
            g[0].flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert!(max_diff(&g, &w) < 1e-5, "half first {half_first}");
    }
}
