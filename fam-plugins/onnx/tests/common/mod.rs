//! Helpers shared by the ONNX plugin's integration tests.

use std::path::{Path, PathBuf};

use fam_core::candle::{DType, Device, Tensor};
use fam_core::output::read_npy_f32;

/// `fam-plugins/onnx/tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A `.npy` file (f32) as a CPU tensor.
pub fn npy(path: &Path) -> Tensor {
    let (shape, data) = read_npy_f32(&std::fs::read(path).unwrap()).unwrap();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// max |a − b| / max(1, max |b|), after `a` is made f32.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let diff: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let scale: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    diff / scale.max(1.0)
}

/// The operator fixtures (`ops/<case>.onnx`), sorted by name.
pub fn op_cases(dir: &Path) -> Vec<String> {
    let mut cases: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.strip_suffix(".onnx").map(String::from)
        })
        .collect();
    cases.sort();
    cases
}
