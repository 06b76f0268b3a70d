//! The ONNX fuzz target: model bytes are parsed (protobuf, initializers, constants), the
//! backbone is built at the graph's last value with the model's output as embedding
//! (which runs a probe forward pass and builds the affine head where there is one), and one
//! batch is run.
//!
//! ```text
//! cargo run --release -p fam-plugin-onnx --example fuzz_onnx -- onnx [SECONDS] [SEED]
//! ```
//!
//! Seeds: `fuzz/corpus/onnx/` (the operator fixtures of this plugin's tests). The engine is
//! `fuzz/engine.rs`.

use std::path::Path;

use fam_core::candle::{DType, Device, Tensor};
use fam_core::plugin::BackboneConfig;
use fam_core::Backbone;
use fam_plugin_onnx::graph::Graph;
use fam_plugin_onnx::OnnxBackbone;

#[path = "../../../fuzz/engine.rs"]
mod engine;

/// One input through everything the plugin does with a model file.
pub fn run(data: &[u8]) {
    let device = Device::Cpu;
    let Ok(graph) = Graph::from_bytes(data, Path::new("fuzz-input.onnx"), &device) else {
        return;
    };
    let Some(layer) = graph.values().last().map(|(n, _)| n.clone()) else {
        return;
    };
    let mut cfg = BackboneConfig {
        kind: "onnx".into(),
        layer: Some(layer),
        ..Default::default()
    };
    if data.len() % 2 == 0 {
        cfg.options
            .insert("embedding".into(), fam_core::toml::Value::from("output"));
    }
    let Ok(b) = OnnxBackbone::from_graph(graph, &cfg, &device) else {
        return;
    };
    let _ = b.layers();
    let spec = b.input_spec();
    let (h, w) = spec.input_size();
    if let Ok(x) = Tensor::zeros((1, 3, h as usize, w as usize), DType::F32, &device) {
        if let Ok(f) = b.forward(&x) {
            let _ = b.pullback(&f.embeddings);
        }
    }
}

fn main() {
    let (target, seconds, seed) = engine::args("onnx");
    if target != "onnx" {
        eprintln!("unknown target `{target}` (onnx; the others are in fam-core's fuzz example)");
        std::process::exit(2)
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    engine::fuzz(&root, "onnx", seconds, seed, &mut run);
}
