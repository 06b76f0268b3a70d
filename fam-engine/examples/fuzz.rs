//! A mutation fuzzer for the parsers that read untrusted input, on the stable toolchain
//! (cargo-fuzz needs nightly, which this project's machines cannot fetch):
//!
//! ```text
//! cargo run --release -p fam-core --example fuzz -- TARGET [SECONDS] [SEED]
//! ```
//!
//! Targets: `pipeline` (TOML parsing and validation), `checkpoint` (the restricted pickle
//! reader for zip and legacy `.pth`, and safetensors), `image` (decoding within the limits,
//! resize and crop). The ONNX target lives with the ONNX plugin
//! (`cargo run --release -p fam-plugin-onnx --example fuzz_onnx -- onnx`). The engine is
//! `fuzz/engine.rs`; the last line gives the executions, crashes and slow inputs.

use std::path::{Path, PathBuf};

use fam_core::traits::InputSpec;
use fam_engine::pipeline::LoadedPipeline;
use fam_engine::PluginHost;

#[path = "../../fuzz/engine.rs"]
mod engine;

fn main() {
    let (target, seconds, seed) = engine::args("pipeline|checkpoint|image");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut host = PluginHost::new(&[]);
    let spec = InputSpec::imagenet();
    let name = PathBuf::from(format!("fuzz-input.{target}"));
    let mut run = |data: &[u8]| match target.as_str() {
        "pipeline" => {
            let text = String::from_utf8_lossy(data);
            if let Ok(p) = LoadedPipeline::parse(&name, &text) {
                let _ = p.validate(&mut host, None);
            }
        }
        "checkpoint" => {
            let _ = fam_weights::state_dict_from_bytes(data, &name);
        }
        "image" => {
            if let Ok(img) = fam_engine::preprocess::decode_rgb8(data, &name) {
                let _ = fam_engine::preprocess::prepare(&img, &spec);
            }
        }
        other => {
            eprintln!("unknown target `{other}` (pipeline, checkpoint, image; onnx is in fam-plugin-onnx)");
            std::process::exit(2)
        }
    };
    engine::fuzz(&root, &target.clone(), seconds, seed, &mut run);
}
