//! MobileNetV2 (torchvision layout), cut at any `features.N` layer.

use std::path::Path;

use fam_core::candle::{DType, Device, Tensor};
use fam_core::{Backbone, FamError, Features, InputSpec, Problem, Result};
use fam_weights::{self as weights, StateDict};

use fam_nn::{Act, ConvBn};

/// torchvision's inverted-residual settings: expansion t, channels c, repeats n, stride s.
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// Number of `features.N` stages: the stem, 17 inverted residual blocks, the last 1x1 conv.
pub const STAGES: usize = 19;

/// The stages as one engine program (input `[B, 3, H, W]`, output the last stage's maps).
fn engine_program(stages: &[Stage]) -> Result<fam_nn::engine::Program> {
    use fam_nn::engine::{BinOp, Builder};
    let mut b = Builder::new();
    let mut y = b.input();
    for (i, st) in stages.iter().enumerate() {
        let x = y;
        for (j, l) in st.layers.iter().enumerate() {
            let spec = l
                .engine_spec()
                .ok_or_else(|| FamError::invalid("mobilenet_v2: weights not in host memory"))?;
            y = b.conv(&format!("features.{i}.{j}"), y, spec)?;
        }
        if st.residual {
            y = b.binary(&format!("features.{i}.add"), BinOp::Add, y, x, false);
        }
    }
    b.build(&[y])
}

/// Names of the layers one can explain at.
pub fn layer_names() -> Vec<String> {
    (0..STAGES).map(|i| format!("features.{i}")).collect()
}

/// Strides of `features.0..=17`.
fn strides() -> Vec<usize> {
    let mut s = vec![2];
    for (_, _, n, stride) in SETTINGS {
        for i in 0..n {
            s.push(if i == 0 { stride } else { 1 });
        }
    }
    s
}

#[derive(Debug, Clone)]
struct Stage {
    layers: Vec<ConvBn>,
    residual: bool,
}

impl Stage {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        for l in &self.layers {
            y = l.forward(&y)?;
        }
        if self.residual {
            y = (y + x)?;
        }
        Ok(y)
    }
}

/// MobileNetV2 for inference.
#[derive(Debug, Clone)]
pub struct MobileNetV2 {
    stages: Vec<Stage>,
    /// The network on fam's engine (CPU models): BatchNorm folded, activations and residual
    /// adds fused into the convolutions.
    program: Option<std::sync::Arc<fam_nn::engine::Program>>,
    classifier: Option<(Tensor, Tensor)>,
    layer: usize,
    device: Device,
    spec: InputSpec,
}

/// Parses `features.N` into N, or explains what is accepted.
pub fn parse_layer(layer: &str) -> std::result::Result<usize, String> {
    layer
        .strip_prefix("features.")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n < STAGES)
        .ok_or_else(|| {
            let names = layer_names();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let hint = fam_core::error::closest(layer, &refs)
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            format!(
                "no layer `{layer}` in mobilenet_v2 (layers are features.0 to features.{}){hint}",
                STAGES - 1
            )
        })
}

/// Parameter naming of a MobileNetV2 checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// torchvision (`features.N.conv.0.0.weight`, ...).
    Torchvision,
    /// The original MobileNetV2 code, as used by deep-sort's re-id embedder
    /// (`features.N.conv.0.weight`, `conv.3`, `conv.6`, ...).
    Flat,
}

impl Layout {
    /// Detects the layout from the parameter names.
    pub fn detect(sd: &StateDict) -> Self {
        if sd.contains_key("features.1.conv.3.weight")
            && !sd.contains_key("features.1.conv.0.0.weight")
        {
            Layout::Flat
        } else {
            Layout::Torchvision
        }
    }

    /// A parameter that exists only in blocks with an expansion layer.
    fn expand_probe(self) -> &'static str {
        match self {
            Layout::Torchvision => "3",
            Layout::Flat => "7",
        }
    }
}

impl MobileNetV2 {
    /// Builds the network from a state dict (either [`Layout`]), up to and including `layer`.
    pub fn from_state_dict(
        sd: &StateDict,
        path: &Path,
        layer: usize,
        device: &Device,
    ) -> Result<Self> {
        let strides = strides();
        let layout = Layout::detect(sd);
        let mut stages = Vec::with_capacity(layer + 1);
        #[allow(clippy::needless_range_loop)] // i names the layer and indexes the strides
        for i in 0..=layer.min(STAGES - 1) {
            let p = format!("features.{i}");
            let stage = if i == 0 || i == STAGES - 1 {
                let stride = if i == 0 { 2 } else { 1 };
                Stage {
                    layers: vec![ConvBn::load(
                        sd,
                        path,
                        &format!("{p}.0"),
                        &format!("{p}.1"),
                        stride,
                        Act::Relu6,
                        device,
                    )?],
                    residual: false,
                }
            } else {
                let stride = strides[i];
                let c = |conv: &str, bn: &str, stride: usize, act: Act| {
                    ConvBn::load(
                        sd,
                        path,
                        &format!("{p}.conv.{conv}"),
                        &format!("{p}.conv.{bn}"),
                        stride,
                        act,
                        device,
                    )
                };
                let expand = sd.contains_key(&format!("{p}.conv.{}.weight", layout.expand_probe()));
                let layers = match (layout, expand) {
                    // torchvision: conv.0 = [pw, bn], conv.1 = [dw, bn], conv.2 = pw, conv.3 = bn
                    (Layout::Torchvision, true) => vec![
                        c("0.0", "0.1", 1, Act::Relu6)?,
                        c("1.0", "1.1", stride, Act::Relu6)?,
                        c("2", "3", 1, Act::None)?,
                    ],
                    (Layout::Torchvision, false) => vec![
                        c("0.0", "0.1", stride, Act::Relu6)?,
                        c("1", "2", 1, Act::None)?,
                    ],
                    // original MobileNetV2 code (flat Sequential, ReLU6 in slots 2 and 5):
                    // pw 0/1, dw 3/4, pw 6/7
                    (Layout::Flat, true) => vec![
                        c("0", "1", 1, Act::Relu6)?,
                        c("3", "4", stride, Act::Relu6)?,
                        c("6", "7", 1, Act::None)?,
                    ],
                    (Layout::Flat, false) => {
                        vec![c("0", "1", stride, Act::Relu6)?, c("3", "4", 1, Act::None)?]
                    }
                };
                let (cin, cout) = (
                    layers[0].in_channels(),
                    layers.last().unwrap().out_channels(),
                );
                Stage {
                    residual: stride == 1 && cin == cout,
                    layers,
                }
            };
            stages.push(stage);
        }
        // Consecutive stages must chain.
        for w in stages.windows(2) {
            let (out, inp) = (
                w[0].layers.last().unwrap().out_channels(),
                w[1].layers[0].in_channels(),
            );
            if out != inp {
                return Err(FamError::weights(path, format!("stage outputs {out} channels but the next takes {inp}: not a torchvision MobileNetV2")));
            }
        }
        let classifier = match (sd.get("classifier.1.weight"), sd.get("classifier.1.bias")) {
            (Some(w), Some(b)) if layer == STAGES - 1 => Some((
                w.to_dtype(DType::F32)?.to_device(device)?,
                b.to_dtype(DType::F32)?.to_device(device)?,
            )),
            _ => None,
        };
        let program = match device {
            Device::Cpu => Some(std::sync::Arc::new(engine_program(&stages)?)),
            _ => None,
        };
        Ok(Self {
            stages,
            program,
            classifier,
            layer,
            device: device.clone(),
            spec: InputSpec::imagenet(),
        })
    }

    /// Loads weights from a file (safetensors, zip or legacy `.pth`).
    pub fn load(path: &Path, layer: usize, device: &Device) -> Result<Self> {
        let sd = weights::load_state_dict(path)?;
        Self::from_state_dict(&sd, path, layer, device)
    }

    /// Feature maps at the chosen layer, `[B, C, h, w]`.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        if self.device.is_cpu() && x.dtype() == fam_core::candle::DType::F32 {
            return self.features_cpu(x);
        }
        let mut y = x.clone();
        for s in &self.stages {
            y = s.forward(&y)?;
        }
        Ok(y)
    }

    /// The CPU path: channels-last activations (every kernel vectorizes over channels), and
    /// with several images and threads, one image per thread through the whole network, so
    /// each image's activations stay in cache instead of a whole batch's streaming through
    /// memory layer by layer.
    fn features_cpu(&self, x: &Tensor) -> Result<Tensor> {
        match &self.program {
            Some(p) => Ok(p.run(std::slice::from_ref(x))?.remove(0)),
            None => Err(FamError::invalid("mobilenet_v2: no CPU program")),
        }
    }

    /// ImageNet logits `[B, 1000]` (only when cut at the last layer and the checkpoint has
    /// the classifier).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = self.classifier.as_ref().ok_or_else(|| {
            FamError::invalid("this MobileNetV2 has no classifier (cut before features.18, or none in the checkpoint)")
        })?;
        let pooled = self.features(x)?.mean((2, 3))?;
        Ok(pooled.matmul(&w.t()?)?.broadcast_add(b)?)
    }

    pub fn with_spec(mut self, spec: InputSpec) -> Self {
        self.spec = spec;
        self
    }
}

impl Backbone for MobileNetV2 {
    fn describe(&self) -> String {
        format!("mobilenet_v2@features.{}", self.layer)
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
    fn layers(&self) -> Result<Vec<fam_core::LayerInfo>> {
        let (h, w) = self.spec.input_size();
        let mut y = Tensor::zeros((1, 3, h as usize, w as usize), DType::F32, &self.device)?;
        let mut out = Vec::new();
        for (i, s) in self.stages.iter().enumerate() {
            y = s.forward(&y)?;
            out.push(fam_core::LayerInfo {
                name: format!("features.{i}"),
                op: if i == 0 || i == STAGES - 1 {
                    "ConvBNReLU6"
                } else {
                    "InvertedResidual"
                }
                .into(),
                shape: y.dims().to_vec(),
            });
        }
        Ok(out)
    }
}

/// Checks a backbone configuration without loading weights.
pub fn validate(cfg: &fam_core::plugin::BackboneConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    if cfg.weights.is_none() {
        out.push(Problem::new(
            "weights",
            "mobilenet_v2 needs a weights file (safetensors or .pth)",
        ));
    }
    if let Some(layer) = &cfg.layer {
        if let Err(e) = parse_layer(layer) {
            out.push(Problem::new("layer", e));
        }
    }
    out.extend(fam_core::options::check::<fam_core::options::NoOptions>(
        &cfg.options,
        "options",
        |_| vec![],
    ));
    out
}
