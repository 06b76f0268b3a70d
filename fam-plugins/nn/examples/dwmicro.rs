use fam_nn::cpu::{conv2d, HostConv};
use fam_nn::Act;
use std::time::Instant;
fn main() {
    for &(c, h, s) in &[
        (32usize, 112usize, 1usize),
        (96, 112, 2),
        (144, 56, 1),
        (960, 7, 1),
    ] {
        let conv = HostConv {
            weight: vec![0.01; c * 9],
            bias: vec![0.0; c],
            out_channels: c,
            in_per_group: 1,
            k: 3,
            stride: s,
            padding: 1,
            groups: c,
            act: Act::Relu6,
        };
        let x = vec![0.5f32; c * h * h];
        let _ = conv2d(&x, (1, c, h, h), &conv);
        let n = 50;
        let t = Instant::now();
        let mut outs = 0;
        for _ in 0..n {
            let (y, _) = conv2d(&x, (1, c, h, h), &conv);
            outs = y.len();
        }
        let dt = t.elapsed().as_secs_f64() / n as f64;
        println!(
            "c{c} h{h} s{s}: {:.3} ms, {:.2} ns/output",
            dt * 1e3,
            dt * 1e9 / outs as f64
        );
    }
}
