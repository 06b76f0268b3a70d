//! fam's ResNets against onnxruntime on narrow ResNet-18 and ResNet-50-style networks with
//! random weights under torchvision's names, and the few-shot ResNet-12 (fixtures by scripts/make-resnet-fixtures.py).

use std::path::{Path, PathBuf};

use fam_core::candle::{Device, Tensor};
use fam_core::output::read_npy_f32;
use fam_core::plugin::BackboneConfig;
use fam_core::Backbone;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn npy(name: &str) -> Tensor {
    let (shape, data) = read_npy_f32(&std::fs::read(fixture(name)).unwrap()).unwrap();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

#[test]
fn resnets_match_onnxruntime() {
    for (kind, name) in [
        ("resnet18", "resnet_basic"),
        ("resnet50", "resnet_bottleneck"),
        ("resnet12", "resnet12"),
    ] {
        let cfg = BackboneConfig {
            kind: kind.into(),
            weights: Some(fixture(&format!("{name}.safetensors"))),
            layer: Some("layer4".into()),
            options: Default::default(),
        };
        let net = fam_plugin_fewshot::load_resnet(&cfg, &Device::Cpu).unwrap();
        let f = net.forward(&npy(&format!("{name}.input.npy"))).unwrap();
        let expected = npy(&format!("{name}.layer4.npy"));
        assert_eq!(f.maps.dims(), expected.dims(), "{name}");
        let diff: f32 = (&f.maps - &expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let scale: f32 = expected
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        println!(
            "{name} ({}): relative error {:.2e}",
            net.describe(),
            diff / scale
        );
        assert!(diff / scale < 1e-4, "{name}: {diff} / {scale}");
    }
}

#[test]
fn a_prefixed_checkpoint_loads_with_the_prefix_option_and_names_missing_keys_without() {
    // Rewrite the fixture with MoCo's `module.encoder_q.` prefix.
    let sd = fam_weights::load_state_dict(&fixture("resnet_basic.safetensors")).unwrap();
    let prefixed: std::collections::HashMap<String, Tensor> = sd
        .into_iter()
        .map(|(k, v)| (format!("module.encoder_q.{k}"), v))
        .collect();
    let path = std::env::temp_dir().join(format!("fam-moco-{}.safetensors", std::process::id()));
    fam_weights::save_safetensors(&prefixed, &path).unwrap();
    let mut cfg = BackboneConfig {
        kind: "resnet18".into(),
        weights: Some(path.clone()),
        layer: Some("layer2".into()),
        options: Default::default(),
    };
    let err = fam_plugin_fewshot::load_resnet(&cfg, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing")
            && err.contains("conv1.weight")
            && err.contains("unexpected: module.encoder_q."),
        "{err}"
    );
    cfg.options
        .insert("prefix".into(), "module.encoder_q.".into());
    let net = fam_plugin_fewshot::load_resnet(&cfg, &Device::Cpu).unwrap();
    let x = Tensor::zeros((1, 3, 64, 64), fam_core::candle::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(net.forward(&x).unwrap().maps.dims(), &[1, 8, 8, 8]);
    std::fs::remove_file(&path).unwrap();
}
