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
    /// Inference on fam's engine (CPU, 3-channel input): BatchNorm folded into the
    /// convolutions, ReLU fused ([`Conv4::for_inference`]).
    program: Option<std::sync::Arc<fam_nn::engine::Program>>,
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
            program: None,
        })
    }

    /// Prepares CPU inference on fam's engine: the grayscale mean of the 3-channel input is a
    /// 1x1 convolution, each block's BatchNorm (running statistics) is folded into its
    /// convolution and the ReLU fused. Other devices keep candle's modules.
    pub fn for_inference(mut self) -> Result<Self> {
        if !self.device.is_cpu() {
            return Ok(self);
        }
        use fam_nn::engine::{batch_norm_affine, Act, Builder, ConvSpec, Pool};
        let v = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let mut b = Builder::new();
        let x = b.input();
        let gray = ConvSpec::new(vec![1.0 / 3.0; 3], (1, 3, 1, 1), vec![0.0]);
        let mut y = b.conv("gray", x, gray)?;
        for (i, (conv, bn)) in self.blocks.iter().take(self.depth).enumerate() {
            let w = conv.weight();
            let (o, c, kh, kw) = w.dims4()?;
            let bias = match conv.bias() {
                Some(t) => v(t)?,
                None => vec![0.0; o],
            };
            let pad = conv.config().padding;
            let spec = ConvSpec {
                pads: [pad; 4],
                ..ConvSpec::new(v(w)?, (o, c, kh, kw), bias)
            };
            y = b.conv(&format!("encoder.{i}.conv"), y, spec)?;
            let (mean, var) = (v(bn.running_mean())?, v(bn.running_var())?);
            let (gamma, beta) = match bn.weight_and_bias() {
                Some((g, bb)) => (v(g)?, v(bb)?),
                None => (vec![1.0; o], vec![0.0; o]),
            };
            let (scale, shift) = batch_norm_affine(&gamma, &beta, &mean, &var, bn.eps() as f32);
            y = b.affine(&format!("encoder.{i}.bn"), y, scale, shift);
            y = b.act(&format!("encoder.{i}.relu"), y, Act::Relu);
            if POOLED[i] && i + 1 < self.depth {
                let pool = Pool {
                    max: true,
                    kh: 2,
                    kw: 2,
                    stride: (2, 2),
                    pads: [0; 4],
                    ceil: false,
                    count_include_pad: false,
                };
                y = b.pool(&format!("encoder.{i}.pool"), y, pool);
            }
        }
        self.program = Some(std::sync::Arc::new(b.build(&[y])?));
        Ok(self)
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
        let maps = match &self.program {
            Some(p) if batch.dims().get(1) == Some(&3) => {
                p.run(std::slice::from_ref(batch))?.remove(0)
            }
            _ => self.forward_t(batch, false).map_err(|e| FamError::Candle {
                context: "conv4 forward".into(),
                cause: e,
            })?,
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;
    use fam_core::candle::DType;

    /// The engine program (BatchNorm folded, ReLU fused) gives candle's values, with
    /// non-trivial BatchNorm statistics.
    #[test]
    fn engine_inference_matches_candle_modules() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let net = Conv4::new(vb, 8, 4, 28).unwrap();
        for (name, var) in vm.data().lock().unwrap().iter() {
            let shape = var.as_tensor().dims().to_vec();
            let t = if name.ends_with("running_var") {
                Tensor::rand(0.5f32, 2.0, shape.as_slice(), &dev).unwrap()
            } else {
                Tensor::randn(0f32, 0.5, shape.as_slice(), &dev).unwrap()
            };
            var.set(&t).unwrap();
        }
        let x = Tensor::rand(0f32, 1.0, (3, 3, 28, 28), &dev).unwrap();
        let want = net.forward_t(&x, false).unwrap();
        let fast = net.clone().for_inference().unwrap();
        assert!(fast.program.is_some());
        let got = fast.forward(&x).unwrap().maps;
        assert_eq!(got.dims(), want.dims());
        let d: f32 = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let peak: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d <= 1e-5 * peak.max(1.0), "{d} (peak {peak})");
    }
}
