//! Micro-benchmark of the engine's convolution kernels on typical CNN shapes (GFLOP/s).
//!
//! ```sh
//! cargo run --release -p fam-nn --example engine_micro
//! ```
use fam_nn::engine::kernels::{Buf, Conv};
use fam_nn::engine::Act;
use std::time::Instant;

fn main() {
    // (name, h, w, c, o, k, stride, groups)
    let cases = [
        ("pointwise 56x56 64->128", 56, 56, 64, 128, 1, 1, 1),
        ("pointwise 112x112 16->96", 112, 112, 16, 96, 1, 1, 1),
        ("pointwise 7x7 1152->192", 7, 7, 1152, 192, 1, 1, 1),
        ("se 1x1 1152->48", 1, 1, 1152, 48, 1, 1, 1),
        ("dense 3x3 56x56 64->64", 56, 56, 64, 64, 3, 1, 1),
        ("dense 3x3 14x14 256->256", 14, 14, 256, 256, 3, 1, 1),
        ("dense 7x7/2 224 3->64", 224, 224, 3, 64, 7, 2, 1),
        ("dw 3x3 112x112x32", 112, 112, 32, 32, 3, 1, 32),
        ("dw 3x3/2 112x112x96", 112, 112, 96, 96, 3, 2, 96),
        ("dw 5x5 28x28x240", 28, 28, 240, 240, 5, 1, 240),
        ("dw 3x3 14x14x480", 14, 14, 480, 480, 3, 1, 480),
        ("grouped 3x3 56x56 128 g32", 56, 56, 128, 128, 3, 1, 32),
        ("grouped 3x3 28x28 208 g26", 28, 28, 208, 208, 3, 1, 26),
    ];
    for (name, h, w, c, o, k, s, g) in cases {
        let cg = c / g;
        let wt: Vec<f32> = (0..o * cg * k * k)
            .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
            .collect();
        let conv = Conv::new(
            &wt,
            vec![0.0; o],
            (o, cg, k, k),
            g,
            (s, s),
            (1, 1),
            [k / 2; 4],
            Act::Relu,
        );
        let x = Buf {
            data: (0..h * w * c).map(|i| (i % 13) as f32 * 0.1).collect(),
            n: 1,
            h,
            w,
            c,
        };
        let (ho, wo) = conv.out_hw(h, w);
        let flops = 2.0 * (ho * wo * o * cg * k * k) as f64;
        let iters = ((2e9 / flops) as usize).clamp(3, 2000);
        for threads in [1, rayon::current_num_threads()] {
            conv.run(&x, None, threads);
            let t = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(conv.run(&x, None, threads));
            }
            let ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
            println!(
                "{name:<28} {:?} {threads} threads {ms:>8.3} ms {:>7.1} GFLOP/s",
                conv.kernel,
                flops / ms / 1e6
            );
        }
    }
    let src: Vec<f32> = (0..1 << 20)
        .map(|i| (i % 200) as f32 * 0.05 - 5.0)
        .collect();
    let mut v = src.clone();
    for act in [
        Act::Relu,
        Act::HardSwish,
        Act::Sigmoid,
        Act::Silu,
        Act::Tanh,
        Act::Gelu,
    ] {
        let t = Instant::now();
        for _ in 0..20 {
            v.copy_from_slice(&src);
            fam_nn::engine::kernels::activate(&mut v, act);
            std::hint::black_box(&mut v);
        }
        let ns = t.elapsed().as_secs_f64() * 1e9 / (20 * v.len()) as f64;
        println!("activation {act:?}: {ns:.2} ns per value");
    }
}
