//! fam plugin `retrieval`: CNN backbones for retrieval and re-identification, explained at
//! any named layer.
//!
//! - `mobilenet_v2`: torchvision's MobileNetV2 (ImageNet weights, or any checkpoint with the
//!   same layout), feature layers `features.0` .. `features.18` (default: `features.18`,
//!   1280x7x7 at 224 px); embedding = global average pooling of the feature layer.

pub mod mobilenet;

use fam_core::options::{self, NoOptions};
use fam_core::plugin::Registrar;
use fam_core::FamError;

fam_core::export_plugin!(name: "retrieval", register: register);

/// Registers this plugin's backbones.
pub fn register(r: &mut Registrar) {
    r.backbone(
        "mobilenet_v2",
        "torchvision MobileNetV2 (layers features.0..features.18, default features.18); embedding = GAP",
        mobilenet::validate,
        |cfg, device| {
            // mobilenet_v2 takes no options ([`NoOptions`]); `validate` reports any.
            options::load::<NoOptions>(&cfg.options, "options", |_| vec![])?;
            let layer = cfg.layer.as_deref().unwrap_or("features.18");
            let layer = mobilenet::parse_layer(layer).map_err(FamError::invalid)?;
            let weights = cfg
                .weights
                .as_ref()
                .ok_or_else(|| FamError::invalid("mobilenet_v2 needs `weights`"))?;
            let t = std::time::Instant::now();
            let model = mobilenet::MobileNetV2::load(weights, layer, device)?;
            tracing::info!(weights = %weights.display(), layer, ms = t.elapsed().as_millis() as u64, "mobilenet_v2 loaded");
            Ok(Box::new(model))
        },
    );
}

#[cfg(test)]
mod tests {
    use fam_core::plugin::BackboneConfig;

    #[test]
    fn mobilenet_v2_takes_no_options() {
        let mut cfg = BackboneConfig {
            kind: "mobilenet_v2".into(),
            weights: Some("w.safetensors".into()),
            ..Default::default()
        };
        assert!(super::mobilenet::validate(&cfg).is_empty());
        cfg.options.insert("width".into(), 1.into());
        let problems: Vec<String> = super::mobilenet::validate(&cfg)
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            problems,
            ["options.width: unknown option `width` (this kind takes no options)"]
        );
    }
}
