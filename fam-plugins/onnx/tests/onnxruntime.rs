//! fam's ONNX executor against onnxruntime: operator fixtures and the real MobileFaceNet
//! (references written by scripts/make-onnx-fixtures.py).

mod common;
use common::{fixtures, npy, op_cases, rel_err};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fam_core::candle::{Device, Tensor};
use fam_core::plugin::BackboneConfig;
use fam_core::Backbone;
use fam_plugin_onnx::graph::Graph;
use fam_plugin_onnx::OnnxBackbone;

#[test]
fn operators_match_onnxruntime() {
    let dir = fixtures().join("ops");
    let cases = op_cases(&dir);
    assert!(cases.len() >= 90, "{cases:?}");
    // Every case runs; the failures are listed together.
    let mut failures = Vec::new();
    for case in cases {
        let run = || -> Result<f32, String> {
            let g = Graph::load(&dir.join(format!("{case}.onnx")), &Device::Cpu)
                .map_err(|e| e.to_string())?;
            let x = npy(&dir.join(format!("{case}.input.npy")));
            let expected = npy(&dir.join(format!("{case}.expected.npy")));
            let plan = g.plan(&["y"]).map_err(|e| e.to_string())?;
            let out = g
                .run(&plan, HashMap::from([("x".to_string(), x)]), &["y"])
                .map_err(|e| e.to_string())?;
            let y = out["y"].to_dtype(fam_core::candle::DType::F32).unwrap();
            if y.dims() != expected.dims() {
                return Err(format!(
                    "shape {:?}, expected {:?}",
                    y.dims(),
                    expected.dims()
                ));
            }
            Ok(rel_err(&y, &expected))
        };
        match run() {
            Ok(err) if err < 1e-4 => println!("{case}: relative error {err:.2e}"),
            Ok(err) => failures.push(format!("{case}: relative error {err}")),
            Err(e) => failures.push(format!("{case}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn face_model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fetched/mobilefacenet.onnx");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models.sh first",
        p.display()
    );
    p
}

fn face_backbone(embedding: &str) -> OnnxBackbone {
    let mut options = fam_core::plugin::Options::new();
    options.insert("embedding".into(), embedding.into());
    let cfg = BackboneConfig {
        kind: "onnx".into(),
        weights: Some(face_model()),
        layer: Some("507".into()),
        options,
    };
    OnnxBackbone::load(&cfg, &Device::Cpu).unwrap()
}

#[test]
fn mobilefacenet_matches_onnxruntime_with_a_dynamic_batch() {
    let b = face_backbone("output");
    // The export declares batch 1; fam runs both reference images in one batch.
    let x = npy(&fixtures().join("mobilefacenet.ref.input.npy"));
    let f = b.forward(&x).unwrap();
    let maps_err = rel_err(&f.maps, &npy(&fixtures().join("mobilefacenet.ref.507.npy")));
    let emb_err = rel_err(
        &f.embeddings,
        &npy(&fixtures().join("mobilefacenet.ref.output.npy")),
    );
    println!("feature map 507: {maps_err:.2e}, embedding: {emb_err:.2e}");
    assert!(maps_err < 1e-4 && emb_err < 1e-4, "{maps_err} {emb_err}");
}

#[test]
fn head_contributions_add_up_to_the_models_cosine_score() {
    use fam_core::explain::{embedding_weights, spatial_contributions, Weighting};
    use fam_core::Similarity;
    let b = face_backbone("output");
    // Two real face crops of the same person: the crop and its re-lit version.
    let spec = fam_core::InputSpec {
        resize: fam_core::ResizePolicy::Exact {
            width: 112,
            height: 112,
        },
        mean: [127.0 / 255.0; 3],
        std: [128.0 / 255.0; 3],
    };
    let faces = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/faces");
    let prepared: Vec<_> = ["gallery/astronaut.png", "queries/astronaut_relit.png"]
        .iter()
        .map(|f| {
            let img = fam_engine::preprocess::load_rgb8(&faces.join(f)).unwrap();
            fam_engine::preprocess::prepare(&img, &spec).unwrap()
        })
        .collect();
    let x =
        fam_engine::preprocess::batch_tensor(&prepared.iter().collect::<Vec<_>>(), &Device::Cpu)
            .unwrap();
    let f = b.forward(&x).unwrap();
    let z: Vec<Vec<f32>> = f.embeddings.to_vec2().unwrap();
    let cosine = Cosine;
    let s = cosine.score(&z[0], &z[1]).unwrap();
    let u = embedding_weights(&cosine, Weighting::Contribution, &z[0], &z[1]).unwrap();
    let ut = Tensor::from_vec(u.clone(), (1, u.len()), &Device::Cpu).unwrap();
    let (w, offset) = b
        .pullback(&ut)
        .unwrap()
        .expect("MobileFaceNet has an affine head");
    let c = spatial_contributions(&f.maps.narrow(0, 0, 1).unwrap(), &w).unwrap();
    let spatial: f32 = c.sum_all().unwrap().to_scalar().unwrap();
    let bias: f32 = u.iter().zip(&offset).map(|(a, b)| a * b).sum();
    println!("cosine {s:.6} = spatial {spatial:.6} + head offset {bias:.6}");
    assert!(
        (spatial + bias - s).abs() < 1e-4,
        "{spatial} + {bias} != {s}"
    );
    assert!(
        spatial.abs() > 5.0 * bias.abs(),
        "the pixels, not the bias, must carry the score"
    );
}

/// Cosine similarity (the metrics plugin's, restated: two plugin libraries cannot be linked
/// into one test binary, each exports the plugin symbol).
struct Cosine;

impl fam_core::Similarity for Cosine {
    fn name(&self) -> String {
        "cosine".into()
    }
    fn score(&self, e: &[f32], r: &[f32]) -> fam_core::Result<f32> {
        Ok(self.contributions(e, r)?.iter().sum())
    }
    fn contributions(&self, e: &[f32], r: &[f32]) -> fam_core::Result<Vec<f32>> {
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let d = n(e) * n(r);
        Ok(e.iter().zip(r).map(|(a, b)| a * b / d).collect())
    }
    fn gradient(&self, _: &[f32], _: &[f32]) -> fam_core::Result<Vec<f32>> {
        unimplemented!("not needed here")
    }
}

#[test]
fn a_missing_layer_is_named_with_a_suggestion() {
    let mut cfg = BackboneConfig {
        kind: "onnx".into(),
        weights: Some(face_model()),
        layer: Some("508".into()),
        options: Default::default(),
    };
    let problems = fam_plugin_onnx::validate_config(&cfg);
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("no value `508`") && t.contains("did you mean `5")),
        "{text:?}"
    );
    cfg.layer = Some("output".into());
    let b = OnnxBackbone::load(&cfg, &Device::Cpu).unwrap();
    let x = Tensor::zeros((1, 3, 112, 112), fam_core::candle::DType::F32, &Device::Cpu).unwrap();
    let err = b.forward(&x).unwrap_err().to_string();
    assert!(
        err.contains("layer `output` has shape [1, 512]; FAM needs a 4-D feature map"),
        "{err}"
    );
}
