//! ONNX external data: weights read from a file beside the model (as the dynamo exporter
//! writes them), checked against onnxruntime, and every unsafe or inconsistent reference
//! refused with a message that names the initializer, the location and the bad value.
//! The fixture is written by scripts/make-onnx-fixtures.py.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_onnx::onnx::{ModelProto, StringStringEntryProto};
use fam_core::candle::{Device, Tensor};
use fam_core::output::read_npy_f32;
use fam_plugin_onnx::graph::Graph;
use prost::Message;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/external")
}

fn npy(path: &Path) -> Tensor {
    let (shape, data) = read_npy_f32(&std::fs::read(path).unwrap()).unwrap();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn run(g: &Graph) -> Tensor {
    let x = npy(&dir().join("conv.input.npy"));
    let plan = g.plan(&["y"]).unwrap();
    g.run(&plan, HashMap::from([("x".to_string(), x)]), &["y"])
        .unwrap()
        .remove("y")
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn a_model_with_external_data_matches_onnxruntime() {
    let g = Graph::load(&dir().join("conv.onnx"), &Device::Cpu).unwrap();
    assert_eq!(g.constants["body.0.weight"].dims(), &[4, 3, 3, 3]);
    let d = max_diff(&run(&g), &npy(&dir().join("conv.expected.npy")));
    assert!(d < 1e-5, "max difference {d}");
}

#[test]
fn from_bytes_resolves_external_files_next_to_the_named_path() {
    let bytes = std::fs::read(dir().join("conv.onnx")).unwrap();
    let g = Graph::from_bytes(&bytes, &dir().join("conv.onnx"), &Device::Cpu).unwrap();
    let d = max_diff(&run(&g), &npy(&dir().join("conv.expected.npy")));
    assert!(d < 1e-5, "max difference {d}");
    // Named elsewhere, the data file is looked for there (and is not found).
    let e = Graph::from_bytes(
        &bytes,
        Path::new("/nonexistent-folder/conv.onnx"),
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("/nonexistent-folder/conv.onnx: weights: initializer `"),
        "{e}"
    );
    assert!(e.contains("external data"), "{e}");
}

/// A copy of the fixture in a fresh folder, with `edit` applied to the `external_data` of
/// the initializer `body.0.weight`; returns the load error.
fn load_edited(tag: &str, edit: impl Fn(&mut Vec<StringStringEntryProto>)) -> String {
    let tmp = std::env::temp_dir().join(format!("fam-onnx-external-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let folder = tmp.join("model");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(dir().join("conv.data"), folder.join("conv.data")).unwrap();
    // A file just outside the model's folder, which `..` would reach.
    std::fs::copy(dir().join("conv.data"), tmp.join("conv.data")).unwrap();
    let mut m =
        ModelProto::decode(std::fs::read(dir().join("conv.onnx")).unwrap().as_slice()).unwrap();
    let t = m
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name == "body.0.weight")
        .unwrap();
    edit(&mut t.external_data);
    let path = folder.join("conv.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    let e = Graph::load(&path, &Device::Cpu).unwrap_err().to_string();
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(
        e.contains("initializer `body.0.weight`"),
        "the message must name the initializer: {e}"
    );
    assert!(!e.contains('\n'), "one line: {e}");
    e
}

fn set(kv: &mut Vec<StringStringEntryProto>, key: &str, value: &str) {
    kv.retain(|e| e.key != key);
    kv.push(StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    });
}

#[test]
fn unsafe_or_inconsistent_references_are_refused() {
    let cases: Vec<(&str, Box<dyn Fn(&mut Vec<StringStringEntryProto>)>, &str)> = vec![
        (
            "parent",
            Box::new(|kv| set(kv, "location", "../conv.data")),
            "external data location `../conv.data` contains `..`",
        ),
        (
            "absolute",
            Box::new(|kv| set(kv, "location", "/etc/passwd")),
            "external data location `/etc/passwd` is an absolute path",
        ),
        (
            "missing",
            Box::new(|kv| set(kv, "location", "weights.bin")),
            "external data file `weights.bin` cannot be opened",
        ),
        (
            "offset",
            Box::new(|kv| set(kv, "offset", "100000")),
            "external data `conv.data`: offset 100000 is past the end of the file (568 bytes)",
        ),
        (
            "offset-end",
            Box::new(|kv| set(kv, "offset", "500")),
            "external data `conv.data`: 432 bytes at offset 500 run past the end of the file (568 bytes)",
        ),
        (
            "length",
            Box::new(|kv| set(kv, "length", "4")),
            "external data `conv.data`: length 4 does not match its shape [4, 3, 3, 3] (432 bytes)",
        ),
        (
            "offset-text",
            Box::new(|kv| set(kv, "offset", "12abc")),
            "external data offset `12abc` is not a non-negative integer",
        ),
        (
            "no-location",
            Box::new(|kv| kv.retain(|e| e.key != "location")),
            "is stored as external data but names no `location`",
        ),
    ];
    for (tag, edit, want) in cases {
        let e = load_edited(tag, edit);
        assert!(e.contains(want), "{tag}: `{want}` not in `{e}`");
    }
}

#[cfg(unix)]
#[test]
fn a_link_out_of_the_models_folder_is_refused() {
    let e = load_edited("link", |kv| set(kv, "location", "link.data"));
    // Without the link the file is missing; build the link in a second run.
    assert!(e.contains("`link.data` cannot be opened"), "{e}");
    let tmp =
        std::env::temp_dir().join(format!("fam-onnx-external-symlink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let folder = tmp.join("model");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(dir().join("conv.data"), tmp.join("outside.data")).unwrap();
    std::os::unix::fs::symlink(tmp.join("outside.data"), folder.join("conv.data")).unwrap();
    std::fs::copy(dir().join("conv.onnx"), folder.join("conv.onnx")).unwrap();
    let e = Graph::load(&folder.join("conv.onnx"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(
        e.contains("external data location `conv.data` resolves to")
            && e.contains("outside the model's folder"),
        "{e}"
    );
}
