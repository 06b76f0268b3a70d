//! Conv-4, the backbone of ProtoNet-style few-shot learners and of small contrastive
//! encoders: four blocks of 3x3 conv (64 channels), BatchNorm, ReLU, here with 2x2 max
//! pooling after the first two blocks only, so that a 28x28 digit keeps a 7x7 feature map
//! to explain. The embedding is the global average pool of the last block (64-d).
//!
//! Parameter names: `encoder.{i}.conv.{weight,bias}`, `encoder.{i}.bn.{weight,bias,
//! running_mean,running_var}`; with a SimCLR projection head, `projection.{0,1}.{weight,bias}`.

use candle_nn::{batch_norm, conv2d, BatchNorm, Conv2d, Conv2dConfig, VarBuilder};
use fam_core::candle::{Device, Module, ModuleT, Tensor};
use fam_core::{Backbone, FamError, Features, InputSpec, ResizePolicy, Result};

/// Blocks followed by 2x2 max pooling.
const POOLED: [bool; 4] = [true, true, false, false];

/// The encoder.
#[derive(Debug, Clone)]
pub struct Conv4 {
    blocks: Vec<(Conv2d, BatchNorm)>,
    /// Blocks to run: the explained layer is `encoder.{depth - 1}`.
    depth: usize,
    device: Device,
    input_size: u32,
    /// Embedding = the flattened feature map (ProtoNet) instead of its global average pool.
    flatten: bool,
}

/// Names of the layers one can explain at.
pub fn layer_names() -> Vec<String> {
    (0..4).map(|i| format!("encoder.{i}")).collect()
}

pub fn parse_layer(layer: &str) -> std::result::Result<usize, String> {
    layer
        .strip_prefix("encoder.")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n < 4)
        .map(|n| n + 1)
        .ok_or_else(|| format!("no layer `{layer}` in conv4 (layers are encoder.0 to encoder.3)"))
}

impl Conv4 {
    /// Builds (or, for training, creates) the encoder from a `VarBuilder`.
    pub fn new(
        vb: VarBuilder,
        hidden: usize,
        depth: usize,
        input_size: u32,
    ) -> fam_core::candle::Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mut blocks = Vec::new();
        for i in 0..4 {
            let vb = vb.pp(format!("encoder.{i}"));
            let cin = if i == 0 { 1 } else { hidden };
            blocks.push((
                conv2d(cin, hidden, 3, cfg, vb.pp("conv"))?,
                batch_norm(hidden, 1e-5, vb.pp("bn"))?,
            ));
        }
        Ok(Self {
            blocks,
            depth,
            device: vb.device().clone(),
            input_size,
            flatten: false,
        })
    }

    /// Uses the flattened feature map as the embedding (ProtoNet's choice: it keeps where
    /// each feature fires, which digits need). FAM is then exact per position: the
    /// "head" is the identity on the flattened map (DESIGN.md section 1.3).
    pub fn with_flatten(mut self, flatten: bool) -> Self {
        self.flatten = flatten;
        self
    }

    /// Feature maps `[B, 64, h, w]` of the chosen layer. Input `[B, 3, H, W]` (a grayscale
    /// image replicated, as fam's preprocessing makes it) or `[B, 1, H, W]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> fam_core::candle::Result<Tensor> {
        let mut y = if x.dim(1)? == 1 {
            x.clone()
        } else {
            x.mean_keepdim(1)?
        };
        for (i, (conv, bn)) in self.blocks.iter().take(self.depth).enumerate() {
            y = bn.forward_t(&conv.forward(&y)?, train)?.relu()?;
            if POOLED[i] && i + 1 < self.depth {
                y = y.max_pool2d(2)?;
            }
        }
        Ok(y)
    }

    /// The embedding used for training and matching: the GAP of the last block, or the
    /// flattened block with [`Conv4::with_flatten`].
    pub fn embed_t(&self, x: &Tensor, train: bool) -> fam_core::candle::Result<Tensor> {
        let maps = self.forward_t(x, train)?;
        if self.flatten {
            maps.flatten_from(1)
        } else {
            maps.mean((2, 3))
        }
    }
}

impl Backbone for Conv4 {
    fn describe(&self) -> String {
        let emb = if self.flatten { " (flattened)" } else { "" };
        format!("conv4@encoder.{}{emb}", self.depth - 1)
    }
    fn input_spec(&self) -> InputSpec {
        InputSpec {
            resize: ResizePolicy::Exact {
                width: self.input_size,
                height: self.input_size,
            },
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }
    fn device(&self) -> Device {
        self.device.clone()
    }
    fn forward(&self, batch: &Tensor) -> Result<Features> {
        let maps = self.forward_t(batch, false).map_err(|e| FamError::Candle {
            context: "conv4 forward".into(),
            source: e,
        })?;
        if self.flatten {
            let embeddings = maps.flatten_from(1)?;
            Ok(Features { maps, embeddings })
        } else {
            Features::from_maps(maps)
        }
    }
    fn pullback(&self, u: &Tensor) -> Result<Option<(Tensor, Vec<f32>)>> {
        if !self.flatten {
            return Ok(None);
        }
        // z = vec(A): Lᵀu is u laid back onto the map; no offset.
        let (p, d) = u.dims2()?;
        let c = self.blocks[0].0.weight().dims()[0];
        let hw = d / c;
        let side = (hw as f64).sqrt() as usize;
        if side * side * c != d {
            return Err(FamError::invalid(format!(
                "embedding of {d} values is not a square map of {c} channels"
            )));
        }
        Ok(Some((u.reshape((p, c, side, side))?, vec![0.0; d])))
    }
}
