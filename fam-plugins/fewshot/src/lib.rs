//! fam plugin `fewshot`: backbones of few-shot and contrastive models.
//!
//! - `conv4`: Conv-4 (ProtoNet and small SimCLR encoders), layers `encoder.0` .. `encoder.3`
//!   (default `encoder.3`, 64x7x7 for a 28x28 input). Options: `embedding` ("gap", the
//!   default, or "flatten" as ProtoNet), `hidden` (channels, default 64), `size` (input side,
//!   default 28).
//!
//! Checkpoints: safetensors or PyTorch (`.pth`, zip or legacy) state dicts with the usual
//! parameter names; missing keys are errors, unexpected ones are listed.

pub mod conv4;
pub mod resnet;

use std::collections::HashMap;
use std::path::Path;

use candle_nn::VarBuilder;
use fam_core::candle::{DType, Device, Tensor};
use fam_core::options::{self, serde::Deserialize};
use fam_core::plugin::{BackboneConfig, Registrar};
use fam_core::{FamError, Problem, Result};

fam_core::export_plugin!(name: "fewshot", register: register);

/// Registers the backbones.
pub fn register(r: &mut Registrar) {
    for (kind, desc) in [
        (
            "resnet18",
            "ResNet-18 (torchvision layout; SimCLR/MoCo); layers layer1..layer4; embedding = GAP",
        ),
        (
            "resnet50",
            "ResNet-50 (torchvision layout; SimCLR/MoCo); layers layer1..layer4; embedding = GAP",
        ),
        (
            "resnet12",
            "ResNet-12 of few-shot learning (84 px); layers layer1..layer4; embedding = GAP",
        ),
    ] {
        r.backbone(kind, desc, validate_resnet, |cfg, device| {
            Ok(Box::new(load_resnet(cfg, device)?))
        });
    }
    r.backbone(
        "conv4",
        "Conv-4 (ProtoNet / SimCLR encoders); layers encoder.0..encoder.3; embedding = GAP",
        validate,
        |cfg, device| Ok(Box::new(load_conv4(cfg, device)?)),
    );
}

fn validate(cfg: &BackboneConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    if cfg.weights.is_none() {
        out.push(Problem::new("weights", "conv4 needs a weights file"));
    }
    if let Some(l) = &cfg.layer {
        if let Err(e) = conv4::parse_layer(l) {
            out.push(Problem::new("layer", e));
        }
    }
    out.extend(options::check(&cfg.options, "options", check_conv4));
    out
}

/// Options of `conv4` (`[backbone.options]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(crate = "fam_core::options::serde", deny_unknown_fields)]
pub struct Conv4Options {
    /// Channels of each block (default 64).
    #[serde(default = "default_hidden")]
    pub hidden: usize,
    /// Input side in pixels (default 28).
    #[serde(default = "default_size")]
    pub size: u32,
    /// How the embedding is made from the feature layer (default `gap`).
    #[serde(default)]
    pub embedding: Conv4Embedding,
}

/// `embedding` of `conv4`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(crate = "fam_core::options::serde", rename_all = "lowercase")]
pub enum Conv4Embedding {
    /// Global average pooling.
    #[default]
    Gap,
    /// The flattened feature map, as ProtoNet.
    Flatten,
}

fn default_hidden() -> usize {
    64
}

fn default_size() -> u32 {
    28
}

/// What serde cannot check: the sizes are from 1 to 4096.
fn check_conv4(o: &Conv4Options) -> Vec<Problem> {
    [("hidden", o.hidden), ("size", o.size as usize)]
        .into_iter()
        .filter(|(_, v)| !(1..=4096).contains(v))
        .map(|(k, v)| Problem::new(k, format!("{v} is not a positive integer (1 to 4096)")))
        .collect()
}

/// Options of `resnet18`, `resnet50` and `resnet12` (`[backbone.options]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(crate = "fam_core::options::serde", deny_unknown_fields)]
pub struct ResNetOptions {
    /// Stripped from the checkpoint's keys first, e.g. `module.encoder_q.` (default none).
    #[serde(default)]
    pub prefix: String,
}

/// The parameter names a Conv-4 checkpoint must hold.
pub fn conv4_keys() -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..4 {
        for k in [
            "conv.weight",
            "conv.bias",
            "bn.weight",
            "bn.bias",
            "bn.running_mean",
            "bn.running_var",
        ] {
            keys.push(format!("encoder.{i}.{k}"));
        }
    }
    keys
}

/// Compares a state dict with the expected keys: an error naming the missing ones; the
/// unexpected ones (besides `ignored_prefixes`) are logged.
pub fn check_keys(
    sd: &HashMap<String, Tensor>,
    expected: &[String],
    ignored_prefixes: &[&str],
    path: &Path,
) -> Result<()> {
    let missing: Vec<&String> = expected.iter().filter(|k| !sd.contains_key(*k)).collect();
    let mut unexpected: Vec<&String> = sd
        .keys()
        .filter(|k| {
            !expected.contains(k)
                && !ignored_prefixes.iter().any(|p| k.starts_with(p))
                && !k.ends_with("num_batches_tracked")
        })
        .collect();
    unexpected.sort();
    if !missing.is_empty() {
        return Err(FamError::weights(
            path,
            format!(
                "missing {} tensor(s): {}{}",
                missing.len(),
                missing
                    .iter()
                    .take(8)
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if unexpected.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; unexpected: {}",
                        unexpected
                            .iter()
                            .take(8)
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            ),
        ));
    }
    if !unexpected.is_empty() {
        tracing::warn!(weights = %path.display(), unexpected = ?unexpected, "ignoring unexpected tensors");
    }
    Ok(())
}

fn validate_resnet(cfg: &BackboneConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    if cfg.weights.is_none() {
        out.push(Problem::new(
            "weights",
            format!("{} needs a weights file", cfg.kind),
        ));
    }
    if let Some(l) = &cfg.layer {
        if let Err(e) = resnet::parse_layer(l) {
            out.push(Problem::new("layer", e));
        }
    }
    out.extend(options::check::<ResNetOptions>(
        &cfg.options,
        "options",
        |_| vec![],
    ));
    out
}

/// Loads a ResNet; `options.prefix` is stripped from the checkpoint's keys first.
pub fn load_resnet(cfg: &BackboneConfig, device: &Device) -> Result<resnet::ResNet> {
    let path = cfg
        .weights
        .as_deref()
        .ok_or_else(|| FamError::invalid("a ResNet needs `weights`"))?;
    let depth =
        resnet::parse_layer(cfg.layer.as_deref().unwrap_or("layer4")).map_err(FamError::invalid)?;
    let options = options::load::<ResNetOptions>(&cfg.options, "options", |_| vec![])?;
    let sd = resnet::strip_prefix(fam_weights::load_state_dict(path)?, &options.prefix);
    if cfg.kind == "resnet12" {
        let mut keys = Vec::new();
        for l in 1..=depth {
            for (conv, bn) in [
                ("conv1", "bn1"),
                ("conv2", "bn2"),
                ("conv3", "bn3"),
                ("downsample.0", "downsample.1"),
            ] {
                keys.push(format!("layer{l}.0.{conv}.weight"));
                for k in ["weight", "bias", "running_mean", "running_var"] {
                    keys.push(format!("layer{l}.0.{bn}.{k}"));
                }
            }
        }
        check_keys(&sd, &keys, &["fc.", "layer"], path)?;
        return resnet::ResNet::resnet12_from_state_dict(&sd, path, depth, device);
    }
    // Keys of deeper layers than the one explained are not needed ("layer" is ignored).
    check_keys(
        &sd,
        &resnet::expected_keys(&sd, depth),
        &["fc.", "layer"],
        path,
    )?;
    resnet::ResNet::from_state_dict(&sd, path, depth, device)
}

fn load_conv4(cfg: &BackboneConfig, device: &Device) -> Result<conv4::Conv4> {
    let path = cfg
        .weights
        .as_deref()
        .ok_or_else(|| FamError::invalid("conv4 needs `weights`"))?;
    let depth = conv4::parse_layer(cfg.layer.as_deref().unwrap_or("encoder.3"))
        .map_err(FamError::invalid)?;
    let options = options::load(&cfg.options, "options", check_conv4)?;
    let sd = fam_weights::load_state_dict(path)?;
    check_keys(&sd, &conv4_keys(), &["projection."], path)?;
    let sd: HashMap<String, Tensor> = sd
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let vb = VarBuilder::from_tensors(sd, DType::F32, device);
    let Conv4Options {
        hidden,
        size,
        embedding,
    } = options;
    conv4::Conv4::new(vb, hidden, depth, size)
        .map_err(|e| FamError::weights(path, e.to_string()))?
        .with_flatten(embedding == Conv4Embedding::Flatten)
        .for_inference()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_unexpected_keys_are_named() {
        let mut sd: HashMap<String, Tensor> = conv4_keys()
            .into_iter()
            .map(|k| (k, Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap()))
            .collect();
        sd.remove("encoder.2.conv.weight");
        sd.insert(
            "fc.weight".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        sd.insert(
            "projection.0.weight".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = check_keys(&sd, &conv4_keys(), &["projection."], Path::new("m.pth")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "m.pth: weights: missing 1 tensor(s): encoder.2.conv.weight; unexpected: fc.weight"
        );
    }

    #[test]
    fn layers_and_options_are_validated() {
        let mut cfg = BackboneConfig {
            kind: "conv4".into(),
            weights: Some("w.safetensors".into()),
            layer: Some("encoder.4".into()),
            ..Default::default()
        };
        cfg.options.insert("embeding".into(), "flatten".into());
        let problems: Vec<String> = validate(&cfg).iter().map(|p| p.to_string()).collect();
        assert!(
            problems.iter().any(|p| p.contains("no layer `encoder.4`")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("did you mean `embedding`?")),
            "{problems:?}"
        );
    }

    #[test]
    fn options_are_typed() {
        let mut cfg = BackboneConfig {
            kind: "conv4".into(),
            weights: Some("w.safetensors".into()),
            ..Default::default()
        };
        assert!(validate(&cfg).is_empty());
        cfg.options.insert("hidden".into(), 0.into());
        cfg.options.insert("size".into(), "big".into());
        cfg.options.insert("embedding".into(), "mean".into());
        let problems: Vec<String> = validate(&cfg).iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        for needle in [
            "options.embedding: unknown variant `mean`, expected `gap` or `flatten`",
            "options.size: invalid type: string \"big\"",
            "options.hidden: 0 is not a positive integer (1 to 4096)",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{needle}: {problems:?}"
            );
        }
        let err = load_conv4(&cfg, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("options.hidden: 0 is not"), "{err}");
        let mut cfg = BackboneConfig {
            kind: "resnet18".into(),
            weights: Some("w.safetensors".into()),
            ..Default::default()
        };
        cfg.options.insert("prefix".into(), 1.into());
        cfg.options.insert("prefx".into(), "m.".into());
        let problems: Vec<String> = validate_resnet(&cfg)
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().any(
                |p| p.contains("options.prefx: unknown option `prefx`; did you mean `prefix`?")
            ),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p
                    .starts_with("options.prefix: invalid type: integer `1`, expected a string")),
            "{problems:?}"
        );
    }
}
