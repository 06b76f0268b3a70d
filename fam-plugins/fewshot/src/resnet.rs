//! ResNets in torchvision's layout (ResNet-18/34 with BasicBlocks, ResNet-50/101/152 with
//! Bottlenecks, stride on the 3x3 conv), as SimCLR and MoCo checkpoints use them once their
//! prefix (`module.encoder_q.`, `backbone.`, ...) is stripped. Depth and widths are read from
//! the checkpoint; BatchNorm is folded into the convolutions at load time.

use std::collections::HashMap;
use std::path::Path;

use fam_core::candle::{DType, Device, Tensor};
use fam_core::{Backbone, FamError, Features, InputSpec, Result};
use fam_nn::{Act, ConvBn};
use fam_weights::StateDict;

#[derive(Debug, Clone)]
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
    /// ResNet-12: LeakyReLU(0.1) after the sum, then 2x2 max pooling.
    few_shot: bool,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        for c in &self.convs {
            y = c.forward(&y)?;
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        let y = (y + shortcut)?;
        if self.few_shot {
            Ok((y.relu()? + (y.minimum(0f32)? * 0.1)?)?.max_pool2d(2)?)
        } else {
            Ok(y.relu()?)
        }
    }
}

/// A ResNet cut after `layerN`.
#[derive(Debug, Clone)]
pub struct ResNet {
    /// conv1 + bn1 + ReLU, then 3x3 max pooling (none in ResNet-12).
    stem: Option<ConvBn>,
    layers: Vec<Vec<Block>>,
    /// The network on fam's engine (CPU models): residual adds and activations fused into
    /// the convolutions.
    program: Option<std::sync::Arc<fam_nn::engine::Program>>,
    device: Device,
    name: String,
    spec: InputSpec,
}

/// `layer1` .. `layer4` → how many stages to run.
pub fn parse_layer(layer: &str) -> std::result::Result<usize, String> {
    layer
        .strip_prefix("layer")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| (1..=4).contains(n))
        .ok_or_else(|| format!("no layer `{layer}` in a ResNet (layers are layer1 to layer4)"))
}

/// The parameter names a ResNet up to `depth` stages uses, discovered from the state dict.
pub fn expected_keys(sd: &StateDict, depth: usize) -> Vec<String> {
    let mut keys = Vec::new();
    let bn = |p: &str, keys: &mut Vec<String>| {
        for k in ["weight", "bias", "running_mean", "running_var"] {
            keys.push(format!("{p}.{k}"));
        }
    };
    keys.push("conv1.weight".into());
    bn("bn1", &mut keys);
    let bottleneck = sd.contains_key("layer1.0.conv3.weight");
    for l in 1..=depth {
        let mut b = 0;
        while b == 0 || sd.contains_key(&format!("layer{l}.{b}.conv1.weight")) {
            let p = format!("layer{l}.{b}");
            for i in 1..=(if bottleneck { 3 } else { 2 }) {
                keys.push(format!("{p}.conv{i}.weight"));
                bn(&format!("{p}.bn{i}"), &mut keys);
            }
            if sd.contains_key(&format!("{p}.downsample.0.weight")) {
                keys.push(format!("{p}.downsample.0.weight"));
                bn(&format!("{p}.downsample.1"), &mut keys);
            }
            b += 1;
        }
    }
    keys
}

/// Strips `prefix` from every key (checkpoints saved from wrapped models).
pub fn strip_prefix(sd: StateDict, prefix: &str) -> StateDict {
    if prefix.is_empty() {
        return sd;
    }
    sd.into_iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v)))
        .collect::<HashMap<_, _>>()
}

impl ResNet {
    /// Builds the network from a torchvision-style state dict, up to `layer{depth}`.
    pub fn from_state_dict(
        sd: &StateDict,
        path: &Path,
        depth: usize,
        device: &Device,
    ) -> Result<Self> {
        let bottleneck = sd.contains_key("layer1.0.conv3.weight");
        let stem = Some(ConvBn::load(
            sd,
            path,
            "conv1",
            "bn1",
            2,
            Act::Relu,
            device,
        )?);
        let mut layers = Vec::new();
        for l in 1..=depth {
            let mut blocks = Vec::new();
            let mut b = 0;
            while sd.contains_key(&format!("layer{l}.{b}.conv1.weight")) {
                let p = format!("layer{l}.{b}");
                let stride = if l > 1 && b == 0 { 2 } else { 1 };
                let c = |i: usize, stride: usize, act: Act| {
                    ConvBn::load(
                        sd,
                        path,
                        &format!("{p}.conv{i}"),
                        &format!("{p}.bn{i}"),
                        stride,
                        act,
                        device,
                    )
                };
                // torchvision puts the stride on the 3x3 convolution (conv2 in a Bottleneck).
                let convs = if bottleneck {
                    vec![
                        c(1, 1, Act::Relu)?,
                        c(2, stride, Act::Relu)?,
                        c(3, 1, Act::None)?,
                    ]
                } else {
                    vec![c(1, stride, Act::Relu)?, c(2, 1, Act::None)?]
                };
                let downsample = if sd.contains_key(&format!("{p}.downsample.0.weight")) {
                    Some(ConvBn::load(
                        sd,
                        path,
                        &format!("{p}.downsample.0"),
                        &format!("{p}.downsample.1"),
                        stride,
                        Act::None,
                        device,
                    )?)
                } else {
                    None
                };
                blocks.push(Block {
                    convs,
                    downsample,
                    few_shot: false,
                });
                b += 1;
            }
            if blocks.is_empty() {
                return Err(FamError::weights(
                    path,
                    format!("no blocks for layer{l} (expected `layer{l}.0.conv1.weight`)"),
                ));
            }
            layers.push(blocks);
        }
        let per_layer: Vec<String> = layers.iter().map(|l| l.len().to_string()).collect();
        Self {
            stem,
            layers,
            program: None,
            device: device.clone(),
            name: format!(
                "resnet ({} blocks [{}])@layer{depth}",
                if bottleneck { "bottleneck" } else { "basic" },
                per_layer.join(", ")
            ),
            spec: InputSpec::imagenet(),
        }
        .on_engine()
    }

    /// ResNet-12 of the few-shot literature (MetaOptNet, FEAT, ...): four residual blocks
    /// `layer{1..4}.0` of three 3x3 conv + BN (LeakyReLU 0.1 between them), a 1x1 conv + BN
    /// shortcut, LeakyReLU after the sum and 2x2 max pooling; no stem. Widths are read from
    /// the checkpoint (64-160-320-640 or 64-128-256-512).
    pub fn resnet12_from_state_dict(
        sd: &StateDict,
        path: &Path,
        depth: usize,
        device: &Device,
    ) -> Result<Self> {
        let mut layers = Vec::new();
        for l in 1..=depth {
            let p = format!("layer{l}.0");
            let c = |i: usize, act: Act| {
                ConvBn::load(
                    sd,
                    path,
                    &format!("{p}.conv{i}"),
                    &format!("{p}.bn{i}"),
                    1,
                    act,
                    device,
                )
            };
            let convs = vec![
                c(1, Act::LeakyRelu01)?,
                c(2, Act::LeakyRelu01)?,
                c(3, Act::None)?,
            ];
            let downsample = Some(ConvBn::load(
                sd,
                path,
                &format!("{p}.downsample.0"),
                &format!("{p}.downsample.1"),
                1,
                Act::None,
                device,
            )?);
            layers.push(vec![Block {
                convs,
                downsample,
                few_shot: true,
            }]);
        }
        Self {
            stem: None,
            layers,
            program: None,
            device: device.clone(),
            name: format!("resnet12@layer{depth}"),
            spec: InputSpec {
                resize: fam_core::ResizePolicy::ResizeCrop {
                    resize: 92,
                    crop: 84,
                },
                mean: [0.485, 0.456, 0.406],
                std: [0.229, 0.224, 0.225],
            },
        }
        .on_engine()
    }

    /// Builds the engine program of a CPU model (called by the constructors).
    fn on_engine(mut self) -> Result<Self> {
        if !self.device.is_cpu() {
            return Ok(self);
        }
        use fam_nn::engine::{Act as EAct, BinOp, Builder, Pool};
        let spec = |c: &ConvBn, name: &str| {
            c.engine_spec()
                .ok_or_else(|| FamError::invalid(format!("{name}: weights not in host memory")))
        };
        let max_pool = |k: usize, s: usize, p: usize| Pool {
            max: true,
            kh: k,
            kw: k,
            stride: (s, s),
            pads: [p; 4],
            ceil: false,
            count_include_pad: false,
        };
        let mut b = Builder::new();
        let mut y = b.input();
        if let Some(stem) = &self.stem {
            y = b.conv("conv1", y, spec(stem, "conv1")?)?;
            y = b.pool("maxpool", y, max_pool(3, 2, 1));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            for (i, block) in layer.iter().enumerate() {
                let name = format!("layer{}.{i}", l + 1);
                let x = y;
                for (j, c) in block.convs.iter().enumerate() {
                    y = b.conv(&format!("{name}.conv{}", j + 1), y, spec(c, &name)?)?;
                }
                let shortcut = match &block.downsample {
                    Some(d) => b.conv(&format!("{name}.downsample"), x, spec(d, &name)?)?,
                    None => x,
                };
                y = b.binary(&format!("{name}.add"), BinOp::Add, y, shortcut, false);
                if block.few_shot {
                    y = b.act(&format!("{name}.act"), y, EAct::LeakyRelu(0.1));
                    y = b.pool(&format!("{name}.pool"), y, max_pool(2, 2, 0));
                } else {
                    y = b.act(&format!("{name}.act"), y, EAct::Relu);
                }
            }
        }
        self.program = Some(std::sync::Arc::new(b.build(&[y])?));
        Ok(self)
    }

    /// Feature maps of the last stage run.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        if let (Some(p), DType::F32) = (&self.program, x.dtype()) {
            return Ok(p.run(std::slice::from_ref(x))?.remove(0));
        }
        let Some(stem) = &self.stem else {
            let mut y = x.clone();
            for layer in &self.layers {
                for block in layer {
                    y = block.forward(&y)?;
                }
            }
            return Ok(y);
        };
        let y = stem.forward(x)?;
        // 3x3 max pooling, stride 2, padding 1 (padding never wins: pad with -inf).
        let (b, c, h, w) = y.dims4()?;
        let neg = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
            Ok(Tensor::full(f32::NEG_INFINITY, shape, y.device())?)
        };
        let y = Tensor::cat(&[neg((b, c, 1, w))?, y.clone(), neg((b, c, 1, w))?], 2)?;
        let y = Tensor::cat(&[neg((b, c, h + 2, 1))?, y, neg((b, c, h + 2, 1))?], 3)?;
        let mut y = y.max_pool2d_with_stride(3, 2)?;
        for layer in &self.layers {
            for block in layer {
                y = block.forward(&y)?;
            }
        }
        Ok(y)
    }
}

impl Backbone for ResNet {
    fn describe(&self) -> String {
        self.name.clone()
    }
    fn input_spec(&self) -> InputSpec {
        self.spec.clone()
    }
    fn device(&self) -> Device {
        self.device.clone()
    }
    fn forward(&self, batch: &Tensor) -> Result<Features> {
        Features::from_maps(self.features(batch)?)
    }
}
