//! The ONNX fuzz target's seeds load and run, and every saved crash input
//! (`fuzz/crashes/onnx-crash-*`, written by the fuzzer or by
//! `scripts/make-onnx-fuzz-regressions.py`) is refused with an error instead of a panic or
//! an enormous allocation.

use std::path::{Path, PathBuf};

use fam_core::candle::{DType, Device, Tensor};
use fam_core::plugin::BackboneConfig;
use fam_core::Backbone;
use fam_plugin_onnx::graph::Graph;
use fam_plugin_onnx::OnnxBackbone;

/// What the fuzz target does with an input, with the first error.
fn load_and_run(data: &[u8], embedding_output: bool) -> Result<(), String> {
    let device = Device::Cpu;
    let graph =
        Graph::from_bytes(data, Path::new("input.onnx"), &device).map_err(|e| e.to_string())?;
    let layer = graph
        .values()
        .last()
        .map(|(n, _)| n.clone())
        .ok_or("no values")?;
    let mut cfg = BackboneConfig {
        kind: "onnx".into(),
        layer: Some(layer),
        ..Default::default()
    };
    if embedding_output {
        cfg.options.insert("embedding".into(), "output".into());
    }
    let b = OnnxBackbone::from_graph(graph, &cfg, &device).map_err(|e| e.to_string())?;
    let (h, w) = b.input_spec().input_size();
    let x = Tensor::zeros((1, 3, h as usize, w as usize), DType::F32, &device).unwrap();
    b.forward(&x).map_err(|e| e.to_string())?;
    Ok(())
}

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    v.sort();
    v
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

#[test]
fn seeds_load_and_run() {
    let seeds = files(&fuzz_dir().join("corpus/onnx"), "");
    assert!(seeds.len() >= 10, "{seeds:?}");
    let mut ok = 0;
    for s in &seeds {
        let data = std::fs::read(s).unwrap();
        match load_and_run(&data, false) {
            Ok(()) => ok += 1,
            // The fuzz target explains at the last value, which is 2-D in a model with a
            // Flatten/Gemm head.
            Err(e) => assert!(
                e.contains("FAM needs a 4-D feature map"),
                "{}: {e}",
                s.display()
            ),
        }
    }
    assert!(ok + 2 >= seeds.len(), "{ok} of {} seeds ran", seeds.len());
}

#[test]
fn crash_inputs_are_refused_with_a_reason() {
    let expected = [
        ("no-graph-output", "the graph declares no output"),
        ("pad-huge", "pads [0, 0, 0, 0, 0, 0, 1099511627776, 1099511627776]: values must lie between 0 and 4096"),
        ("clip-empty-min", ""),
        ("conv-stride-0", "strides [0, 0]: values must lie between 1 and 4096"),
        ("conv-pads-huge", "pads [1073741824, 1073741824, 1073741824, 1073741824]: values must lie between 0 and 4096"),
        ("conv-kernel-larger-than-input", "kernel [4, 3, 9, 9] (dilation 1) is larger than the padded input [1, 3, 8, 8]"),
        ("conv-negative-dilation", "dilations [-1, -1]: values must lie between 1 and 4096"),
        ("maxpool-kernel-0", "kernel_shape [0, 0]: values must lie between 1 and 4096"),
        ("avgpool-stride-negative", "strides [-3, -3]: values must lie between 1 and 4096"),
        ("input-declares-huge-size", "input `x` declares 1048576x1048576 pixels; at most 4096 a side is supported"),
    ];
    let crashes = files(&fuzz_dir().join("crashes"), "onnx-crash-");
    assert!(crashes.len() >= expected.len(), "{crashes:?}");
    for path in crashes {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&path).unwrap();
        // Both ways of building the backbone: GAP of the layer, and through the output.
        let results = [load_and_run(&data, false), load_and_run(&data, true)];
        let Some((_, want)) = expected
            .iter()
            .find(|(n, _)| name == format!("onnx-crash-{n}"))
        else {
            continue; // a crash saved by the fuzzer: not panicking is the test
        };
        // An empty Clip bound means "no bound": that model is valid.
        if want.is_empty() {
            continue;
        }
        assert!(
            results
                .iter()
                .any(|r| r.as_ref().err().is_some_and(|e| e.contains(want))),
            "{name}: `{want}` not in {results:?}"
        );
    }
}
