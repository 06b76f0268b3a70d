//! Where the forward pass of an ONNX model spends its time on fam's engine, per operator
//! kind, with the engine's steps after rewrites.
//!
//! ```sh
//! cargo run --release -p fam-plugin-onnx --example onnx_profile -- MODEL.onnx \
//!     [--layer NAME] [--output NAME] [--size 224] [--batch 16] [--iters 5]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use fam_core::candle::{DType, Device, Tensor};
use fam_plugin_onnx::graph::Graph;
use fam_plugin_onnx::lower;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The engine reads this when a program is built.
    if std::env::var_os("FAM_ENGINE_PROFILE").is_none() {
        std::env::set_var("FAM_ENGINE_PROFILE", "1");
    }
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(args.next().ok_or("usage: onnx_profile MODEL.onnx [--layer NAME] [--output NAME] [--size PX] [--batch N] [--iters N]")?);
    let (mut layer, mut output, mut size, mut batch, mut iters) =
        (None, None, 224usize, 16usize, 5usize);
    while let Some(a) = args.next() {
        let v = args.next().ok_or(format!("{a} needs a value"))?;
        match a.as_str() {
            "--layer" => layer = Some(v),
            "--output" => output = Some(v),
            "--size" => size = v.parse()?,
            "--batch" => batch = v.parse()?,
            "--iters" => iters = v.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let g = Graph::load(&model, &Device::Cpu)?;
    let layer = layer
        .or_else(|| g.outputs.first().cloned())
        .ok_or("no output")?;
    let mut targets = vec![layer.as_str()];
    if let Some(o) = &output {
        targets.push(o.as_str());
    }
    let input = g.inputs[0].0.clone();
    let plan = g.plan(&targets)?;
    let t = Instant::now();
    let l = lower::lower(&g, &plan, &input, &targets, &[1, 3, size, size])?;
    println!(
        "{} (lowered in {:.0} ms)",
        lower::describe(&l, &model),
        t.elapsed().as_secs_f64() * 1e3
    );
    println!("steps: {:?}", l.program.summary());
    let x = Tensor::randn(0f32, 1., (batch, 3, size, size), &Device::Cpu)?.to_dtype(DType::F32)?;
    l.program.run(std::slice::from_ref(&x))?; // warm-up
    let mut times = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        l.program.run(std::slice::from_ref(&x))?;
        times.push(t.elapsed().as_secs_f64() * 1e3 / batch as f64);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "forward: {:.2} ms per image (median of {iters}, batch {batch}, {} threads)",
        times[times.len() / 2],
        rayon::current_num_threads()
    );
    let prof = l.program.profile();
    let total: f64 = prof.iter().map(|p| p.1).sum();
    let images = (batch * (iters + 1)) as f64;
    println!(
        "{:<24} {:>10} {:>8} {:>7}",
        "operator", "ms/image", "calls", "share"
    );
    for (kind, ms, calls) in prof {
        println!(
            "{kind:<24} {:>10.3} {:>8} {:>6.1}%",
            ms / images,
            calls,
            100.0 * ms / total.max(1e-9)
        );
    }
    Ok(())
}
