//! Times the CPU kernels on MobileNetV2's layer shapes (224 px), by layer kind:
//! `cargo run --release -p fam-nn --example profile [batch]`.

use fam_nn::cpu::{conv2d, out_size, HostConv, NhwcConv};
use fam_nn::Act;
use rayon::prelude::*;
use std::time::Instant;

fn main() {
    let b: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    // (in, out, k, stride, depthwise) of every convolution, with its input size.
    let mut layers = vec![(3usize, 32usize, 3usize, 2usize, false, 224usize)];
    let mut h = 112;
    let mut c = 32;
    // First block: depthwise + project.
    layers.push((32, 32, 3, 1, true, h));
    layers.push((32, 16, 1, 1, false, h));
    c = c.min(16);
    for (t, co, n, s) in [
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ] {
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            let e = c * t;
            layers.push((c, e, 1, 1, false, h));
            layers.push((e, e, 3, stride, true, h));
            h = out_size(h, 3, stride, 1);
            layers.push((e, co, 1, 1, false, h));
            c = co;
        }
    }
    layers.push((320, 1280, 1, 1, false, 7));
    let mut totals = std::collections::BTreeMap::<&str, (f64, f64)>::new();
    for _ in 0..if std::env::var("FAM_PROFILE_DEPTHWISE").is_ok() {
        50
    } else {
        2
    } {
        totals.clear();
        let only_dw = std::env::var("FAM_PROFILE_DEPTHWISE").is_ok();
        for &(ci, co, k, s, dw, hh) in &layers {
            if only_dw && !dw {
                continue;
            }
            let conv = HostConv {
                weight: vec![0.01; co * if dw { 1 } else { ci } * k * k],
                bias: vec![0.0; co],
                out_channels: co,
                in_per_group: if dw { 1 } else { ci },
                k,
                stride: s,
                padding: k / 2,
                groups: if dw { ci } else { 1 },
                act: Act::Relu6,
            };
            let x = vec![0.5f32; b * ci * hh * hh];
            let nhwc = std::env::var("FAM_PROFILE_NCHW").is_err();
            let nc = NhwcConv::new(conv.clone());
            let t = Instant::now();
            let (_y, (_, _, ho, wo)) = if nhwc && b > 1 {
                let n = ci * hh * hh;
                let outs: Vec<_> = (0..b)
                    .into_par_iter()
                    .map(|i| nc.forward(&x[i * n..(i + 1) * n], (1, hh, hh, ci), 1))
                    .collect();
                let (_, (_, ho, wo, _)) = outs[0];
                (outs, (b, co, ho, wo))
            } else if nhwc {
                let (y, (_, ho, wo, _)) =
                    nc.forward(&x, (b, hh, hh, ci), rayon::current_num_threads());
                (vec![(y, (b, ho, wo, co))], (b, co, ho, wo))
            } else {
                let (y, d) = conv2d(&x, (b, ci, hh, hh), &conv);
                (vec![(y, (0, 0, 0, 0))], d)
            };
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let flops = 2.0 * (b * co * ho * wo * k * k * if dw { 1 } else { ci }) as f64;
            let kind = if dw {
                "depthwise"
            } else if k == 1 {
                "pointwise"
            } else {
                "dense 3x3"
            };
            if std::env::var("FAM_PROFILE_LAYERS").is_ok() {
                println!(
                    "{kind:<10} {ci:>5}->{co:<5} {hh:>4} s{s} {:>8.3} ms {:>6.1} GFLOP/s",
                    ms / b as f64,
                    flops / ms / 1e6
                );
            }
            let e = totals.entry(kind).or_default();
            e.0 += ms;
            e.1 += flops;
        }
    }
    let all: f64 = totals.values().map(|v| v.0).sum();
    for (k, (ms, fl)) in &totals {
        println!(
            "{k:<10} {:>8.2} ms/image {:>7.1} GFLOP/s",
            ms / b as f64,
            fl / ms / 1e6
        );
    }
    println!("total      {:>8.2} ms/image (batch {b})", all / b as f64);
}
