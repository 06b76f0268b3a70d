//! Every model of the zoo that scripts/make-zoo.py exports (torchvision architectures and
//! two face / re-id nets with affine heads; legacy and dynamo exporters, opsets 13 to 18,
//! external data and inline) against onnxruntime's outputs on the same input: feature maps,
//! embeddings, and FAM maps computed from fam's features versus from onnxruntime's.
//!
//! The test suite runs the CI subset (`scripts/make-zoo.py --subset ci`, small inputs);
//! `FAM_ZOO_DIR=models/zoo cargo test -p fam-plugin-onnx --release --test zoo` runs the full
//! zoo at 224 px.

use std::path::{Path, PathBuf};

use fam_core::candle::{Device, Tensor};
use fam_core::explain::{
    embedding_weights, fam_raw, fam_raw_spatial, normalize_contributions, Weighting,
};
use fam_core::output::read_npy_f32;
use fam_core::plugin::BackboneConfig;
use fam_core::Backbone;
use fam_plugin_onnx::OnnxBackbone;

/// Largest relative difference accepted (max |fam − ort| / max |ort|), unless onnxruntime
/// itself differs from PyTorch by more on that model (float32 summation order, amplified by
/// the network: Inception-v3 at 224 px, 1.8e-4); then 1.5 times that difference.
const TOLERANCE: f32 = 1e-4;

fn zoo_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    match std::env::var_os("FAM_ZOO_DIR") {
        Some(d) => root.join(d),
        None => root.join("models/zoo/ci"),
    }
}

fn npy(path: &Path) -> Tensor {
    let (shape, data) = read_npy_f32(&std::fs::read(path).unwrap()).unwrap();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// max |a − b| / max |b|
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (values(a), values(b));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let peak = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    diff / peak.max(f32::MIN_POSITIVE)
}

fn cosine_contributions(e: &[f32], r: &[f32]) -> Vec<f32> {
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let d = n(e) * n(r);
    e.iter().zip(r).map(|(a, b)| a * b / d).collect()
}

struct Cosine;
impl fam_core::Similarity for Cosine {
    fn name(&self) -> String {
        "cosine".into()
    }
    fn score(&self, e: &[f32], r: &[f32]) -> fam_core::Result<f32> {
        Ok(cosine_contributions(e, r).iter().sum())
    }
    fn contributions(&self, e: &[f32], r: &[f32]) -> fam_core::Result<Vec<f32>> {
        Ok(cosine_contributions(e, r))
    }
    fn gradient(&self, _: &[f32], _: &[f32]) -> fam_core::Result<Vec<f32>> {
        unimplemented!("not needed here")
    }
}

/// The FAM map of image 0 explained against image 1, at feature resolution.
fn fam_map(b: &OnnxBackbone, maps: &Tensor, emb: &Tensor, affine: bool) -> Tensor {
    let z: Vec<Vec<f32>> = emb.to_vec2().unwrap();
    let m0 = maps.narrow(0, 0, 1).unwrap();
    if affine {
        let u = embedding_weights(&Cosine, Weighting::Contribution, &z[0], &z[1]).unwrap();
        let ut = Tensor::from_vec(u.clone(), (1, u.len()), &Device::Cpu).unwrap();
        let (w, _) = b.pullback(&ut).unwrap().expect("an affine head");
        fam_raw_spatial(&m0, &w).unwrap()
    } else {
        let w = normalize_contributions(&cosine_contributions(&z[0], &z[1]));
        let wt = Tensor::from_vec(w.clone(), (1, w.len()), &Device::Cpu).unwrap();
        fam_raw(&m0, &wt).unwrap()
    }
}

#[test]
fn every_zoo_model_matches_onnxruntime() {
    let dir = zoo_dir();
    let manifest = dir.join("zoo.json");
    assert!(
        manifest.is_file(),
        "{} is missing: run scripts/zoo-env.sh, then .cache/zoo-venv/bin/python scripts/make-zoo.py --subset ci",
        manifest.display()
    );
    let zoo: fam_core::serde_json::Value =
        fam_core::serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let models = zoo["models"].as_array().expect("zoo.json lists models");
    let only = std::env::var("FAM_ZOO_ONLY").ok();
    let mut failures = Vec::new();
    let mut checked = 0;
    println!(
        "{:<36} {:>9} {:>9} {:>9} {:>8}",
        "model", "features", "embedding", "FAM map", "native"
    );
    for m in models {
        let name = m["name"].as_str().unwrap();
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        if let Some(e) = m["error"].as_str() {
            failures.push(format!("{name}: the exporter failed: {e}"));
            continue;
        }
        let s = |k: &str| {
            m[k].as_str()
                .unwrap_or_else(|| panic!("{name}: no `{k}`"))
                .to_string()
        };
        let affine = s("head") == "affine";
        let mut options = fam_core::plugin::Options::new();
        options.insert(
            "embedding".into(),
            if affine { "output" } else { "gap" }.into(),
        );
        if affine {
            options.insert("output".into(), s("embedding").into());
        }
        let size = m["size"].as_array().unwrap();
        options.insert(
            "size".into(),
            fam_core::toml::Value::Array(
                size.iter()
                    .map(|v| fam_core::toml::Value::Integer(v.as_i64().unwrap()))
                    .collect(),
            ),
        );
        let cfg = BackboneConfig {
            kind: "onnx".into(),
            weights: Some(dir.join(s("file"))),
            layer: Some(s("features")),
            options,
        };
        let tol = TOLERANCE.max(1.5 * m["ort_vs_torch_max_rel"].as_f64().unwrap_or(0.0) as f32);
        let result = (|| -> Result<(f32, f32, f32, String), String> {
            let b = OnnxBackbone::load(&cfg, &Device::Cpu).map_err(|e| e.to_string())?;
            let x = npy(&dir.join(s("ref_input")));
            let f = b.forward(&x).map_err(|e| e.to_string())?;
            let (ort_maps, ort_emb) = (
                npy(&dir.join(s("ref_features"))),
                npy(&dir.join(s("ref_embedding"))),
            );
            let e_maps = rel(&f.maps, &ort_maps);
            let e_emb = rel(
                &f.embeddings,
                &ort_emb.reshape(f.embeddings.dims()).unwrap(),
            );
            let ours = fam_map(&b, &f.maps, &f.embeddings, affine);
            let theirs = fam_map(
                &b,
                &ort_maps,
                &ort_emb.reshape(f.embeddings.dims()).unwrap(),
                affine,
            );
            let e_fam = rel(&ours, &theirs);
            let native = b
                .engine_counts()
                .map(|(s, n)| format!("{n}/{s}"))
                .unwrap_or_default();
            Ok((e_maps, e_emb, e_fam, native))
        })();
        checked += 1;
        match result {
            Ok((a, e, f, native)) => {
                println!("{name:<36} {a:>9.1e} {e:>9.1e} {f:>9.1e} {native:>8}");
                if !(a < tol && e < tol && f < tol) {
                    failures.push(format!(
                        "{name}: features {a:.1e}, embedding {e:.1e}, FAM map {f:.1e} (tolerance {tol:.1e})"
                    ));
                }
            }
            Err(e) => {
                println!("{name:<36} error: {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    assert!(
        checked > 0 || only.is_some(),
        "the zoo manifest lists no model"
    );
    assert!(
        failures.is_empty(),
        "{} of {checked} zoo models fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
