//! The execution engine: a small graph of fused operators over channels-last CPU kernels.
//!
//! A model importer (the ONNX plugin) or a built-in architecture describes its network with
//! a [`Builder`]: convolutions, per-channel affine maps (an unfused BatchNorm), activations,
//! element-wise binaries, pools, channel concatenation, and [`ExternalOp`]s for whatever the
//! engine has no kernel for (those run on candle tensors in the framework's NCHW layout).
//! [`Builder::build`] rewrites the graph before anything runs, the way inference runtimes
//! do at load:
//!
//! 1. a per-channel affine map after a convolution (BatchNorm, a constant scale or shift)
//!    is folded into the convolution's weights and bias;
//! 2. `x · sigmoid(x)` becomes one SiLU activation, `x · hardsigmoid(x)` one HardSwish;
//! 3. a residual `Add` of a convolution's output is fused into that convolution (the other
//!    operand is the matrix product's initial value);
//! 4. an activation is fused into the epilogue of the convolution, affine map or binary
//!    that produces its input.
//!
//! A value is rewritten away only when no one else reads it and it is not a program output.
//! Then each convolution picks its kernel by shape ([`kernels::ConvKernel`]).
//!
//! Running: with several images and threads, images run in parallel, one image per thread
//! through the whole network, so its activations stay in cache; a single image splits the
//! work of each kernel instead. Values are converted between layouts only where a native
//! operator meets an external one, and each value is freed after its last use.

mod act;
pub mod kernels;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fam_core::candle::{DType, Device, Tensor};
use fam_core::{FamError, Result};
use rayon::prelude::*;

pub use act::Act;
pub use kernels::{BinOp, Buf, Pool};

/// A value of a program.
pub type ValueId = usize;

/// An operator the engine has no kernel for, evaluated on candle tensors in NCHW layout.
pub trait ExternalOp: Send + Sync + std::fmt::Debug {
    /// The operator's kind, for profiles (e.g. `Reshape`).
    fn kind(&self) -> String;
    /// Evaluates the operator; `inputs` are the node's dynamic inputs in order, `batch` the
    /// number of images in this run.
    fn eval(&self, inputs: &[Tensor], batch: usize) -> Result<Vec<Tensor>>;
}

/// A convolution as the builder receives it: weights `[O, C/groups, kh, kw]`.
#[derive(Debug, Clone)]
pub struct ConvSpec {
    pub weight: Vec<f32>,
    /// `(O, C/groups, kh, kw)`
    pub dims: (usize, usize, usize, usize),
    pub bias: Vec<f32>,
    pub groups: usize,
    pub stride: (usize, usize),
    pub dilation: (usize, usize),
    /// top, left, bottom, right
    pub pads: [usize; 4],
    pub act: Act,
    /// PReLU slopes per output channel, after `act` (set by the rewrites).
    pub prelu: Option<Vec<f32>>,
}

impl ConvSpec {
    /// A convolution with stride 1, no dilation, no padding, one group and no activation
    /// (set the other fields with struct update syntax).
    pub fn new(weight: Vec<f32>, dims: (usize, usize, usize, usize), bias: Vec<f32>) -> Self {
        Self {
            weight,
            dims,
            bias,
            groups: 1,
            stride: (1, 1),
            dilation: (1, 1),
            pads: [0; 4],
            act: Act::None,
            prelu: None,
        }
    }
}

/// Inference BatchNorm as a per-channel affine map: `scale = γ / sqrt(var + eps)`,
/// `shift = β − mean · scale`.
pub fn batch_norm_affine(
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = gamma
        .iter()
        .zip(var)
        .map(|(g, v)| g / (v + eps).sqrt())
        .collect();
    let shift = beta
        .iter()
        .zip(mean)
        .zip(&scale)
        .map(|((b, m), k)| b - m * k)
        .collect();
    (scale, shift)
}

/// Whether a program may run the images of a batch one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Some operator mixes images: always run the batch as a whole.
    Never,
    /// Images are independent: run them one per thread when that helps.
    Allowed,
    /// The model only runs one image at a time (e.g. a batch of 1 hard-coded in a shape).
    Always,
}

#[derive(Debug, Clone)]
enum Op {
    /// Inputs `[x]`, or `[x, residual]` when the residual add is fused.
    Conv(ConvSpec),
    Affine {
        scale: Vec<f32>,
        shift: Vec<f32>,
        act: Act,
    },
    Act(Act),
    /// `x < 0 ? x · slope : x` per channel.
    PRelu(Vec<f32>),
    /// `broadcast`: one operand is a per-image channel vector.
    Binary {
        op: BinOp,
        broadcast: bool,
        act: Act,
    },
    Pool(kernels::Pool),
    GlobalPool {
        max: bool,
    },
    Concat,
    /// Layer normalization over the channels of each pixel.
    LayerNorm {
        scale: Vec<f32>,
        shift: Vec<f32>,
        eps: f32,
    },
    /// The same buffer under another logical layout (a transpose that moves no data).
    Alias,
    External(Arc<dyn ExternalOp>),
    Removed,
}

impl Op {
    fn kind(&self) -> String {
        match self {
            Op::Conv(s) => {
                let (o, cg, kh, kw) = s.dims;
                if s.groups > 1 && s.groups == o && cg == 1 {
                    format!("Conv dw{kh}x{kw}")
                } else if s.groups > 1 {
                    format!("Conv grouped{kh}x{kw}")
                } else {
                    format!("Conv {kh}x{kw}")
                }
            }
            Op::Affine { .. } => "Affine".into(),
            Op::Act(a) => format!("{a:?}"),
            Op::PRelu(_) => "PRelu".into(),
            Op::Binary { op, .. } => format!("{op:?}"),
            Op::Pool(p) => if p.max { "MaxPool" } else { "AveragePool" }.into(),
            Op::GlobalPool { max } => if *max {
                "GlobalMaxPool"
            } else {
                "GlobalAveragePool"
            }
            .into(),
            Op::Concat => "Concat".into(),
            Op::LayerNorm { .. } => "LayerNorm".into(),
            Op::Alias => "Transpose (no copy)".into(),
            Op::External(e) => e.kind(),
            Op::Removed => "-".into(),
        }
    }
}

#[derive(Debug, Clone)]
struct Node {
    op: Op,
    inputs: Vec<ValueId>,
    outputs: Vec<ValueId>,
    /// The name the model gave the node, for messages.
    name: String,
}

/// Describes a network; [`Builder::build`] optimizes it into a [`Program`].
#[derive(Debug, Default)]
pub struct Builder {
    nodes: Vec<Node>,
    values: usize,
    inputs: Vec<ValueId>,
    split: Option<Split>,
    /// Values whose logical layout (the one external operators see) is `[n, h, w, c]`.
    channels_last: std::collections::HashSet<ValueId>,
}

impl Builder {
    pub fn new() -> Self {
        Self::default()
    }

    fn value(&mut self) -> ValueId {
        self.values += 1;
        self.values - 1
    }

    fn push(&mut self, name: &str, op: Op, inputs: Vec<ValueId>) -> ValueId {
        let out = self.value();
        self.nodes.push(Node {
            op,
            inputs,
            outputs: vec![out],
            name: name.to_string(),
        });
        out
    }

    /// A program input: a batch of NCHW tensors.
    pub fn input(&mut self) -> ValueId {
        let v = self.value();
        self.inputs.push(v);
        v
    }

    pub fn conv(&mut self, name: &str, x: ValueId, spec: ConvSpec) -> Result<ValueId> {
        let (o, cg, kh, kw) = spec.dims;
        if spec.weight.len() != o * cg * kh * kw
            || spec.bias.len() != o
            || spec.groups == 0
            || o % spec.groups != 0
            || spec.stride.0 == 0
            || spec.stride.1 == 0
            || spec.dilation.0 == 0
            || spec.dilation.1 == 0
        {
            return Err(FamError::invalid(format!(
                "convolution `{name}`: inconsistent kernel {:?} ({} weights, {} biases, {} groups)",
                spec.dims,
                spec.weight.len(),
                spec.bias.len(),
                spec.groups
            )));
        }
        Ok(self.push(name, Op::Conv(spec), vec![x]))
    }

    /// `act(x · scale + shift)` per channel.
    pub fn affine(&mut self, name: &str, x: ValueId, scale: Vec<f32>, shift: Vec<f32>) -> ValueId {
        self.push(
            name,
            Op::Affine {
                scale,
                shift,
                act: Act::None,
            },
            vec![x],
        )
    }

    pub fn act(&mut self, name: &str, x: ValueId, act: Act) -> ValueId {
        self.push(name, Op::Act(act), vec![x])
    }

    /// PReLU with one slope per channel.
    pub fn prelu(&mut self, name: &str, x: ValueId, slope: Vec<f32>) -> ValueId {
        self.push(name, Op::PRelu(slope), vec![x])
    }

    /// How the images of a batch may be run (default: [`Split::Allowed`]).
    pub fn split(&mut self, split: Split) {
        self.split = Some(split);
    }

    /// `a ∘ b`; `broadcast` when one of them is a per-image channel vector `[n, c, 1, 1]`.
    pub fn binary(
        &mut self,
        name: &str,
        op: BinOp,
        a: ValueId,
        b: ValueId,
        broadcast: bool,
    ) -> ValueId {
        self.push(
            name,
            Op::Binary {
                op,
                broadcast,
                act: Act::None,
            },
            vec![a, b],
        )
    }

    pub fn pool(&mut self, name: &str, x: ValueId, pool: kernels::Pool) -> ValueId {
        self.push(name, Op::Pool(pool), vec![x])
    }

    pub fn global_pool(&mut self, name: &str, x: ValueId, max: bool) -> ValueId {
        self.push(name, Op::GlobalPool { max }, vec![x])
    }

    pub fn concat(&mut self, name: &str, xs: Vec<ValueId>) -> ValueId {
        self.push(name, Op::Concat, xs)
    }

    /// Layer normalization over each pixel's channels, then `· scale + shift`.
    pub fn layer_norm(
        &mut self,
        name: &str,
        x: ValueId,
        scale: Vec<f32>,
        shift: Vec<f32>,
        eps: f32,
    ) -> ValueId {
        self.push(name, Op::LayerNorm { scale, shift, eps }, vec![x])
    }

    /// `x` seen in the other logical layout: `channels_last` makes external operators see
    /// `[n, h, w, c]` (a transpose to channels-last that moves no data), else `[n, c, h, w]`.
    pub fn alias(&mut self, name: &str, x: ValueId, channels_last: bool) -> ValueId {
        let v = self.push(name, Op::Alias, vec![x]);
        self.set_channels_last(v, channels_last);
        v
    }

    /// Declares the logical layout of a value (default channels-first, `[n, c, h, w]`).
    pub fn set_channels_last(&mut self, v: ValueId, channels_last: bool) {
        if channels_last {
            self.channels_last.insert(v);
        } else {
            self.channels_last.remove(&v);
        }
    }

    /// An operator without a native kernel, with `outputs` results.
    pub fn external(
        &mut self,
        name: &str,
        op: Arc<dyn ExternalOp>,
        inputs: Vec<ValueId>,
        outputs: usize,
    ) -> Vec<ValueId> {
        let outs: Vec<ValueId> = (0..outputs).map(|_| self.value()).collect();
        self.nodes.push(Node {
            op: Op::External(op),
            inputs,
            outputs: outs.clone(),
            name: name.to_string(),
        });
        outs
    }

    /// Optimizes the graph (see the module documentation) into a program computing
    /// `outputs`.
    pub fn build(mut self, outputs: &[ValueId]) -> Result<Program> {
        if std::env::var_os("FAM_ENGINE_NO_REWRITES").is_some() {
            return self.build_unoptimized(outputs);
        }
        self.prune(outputs);
        self.fold_affine(outputs);
        self.fuse_gelu(outputs);
        self.prune(outputs);
        self.fuse_gated_activations(outputs);
        self.fuse_residual(outputs);
        self.fuse_activations(outputs);
        self.prune(outputs);
        Program::new(self, outputs)
    }

    /// The program without rewrites (each operator on its own), for comparisons.
    pub fn build_unoptimized(mut self, outputs: &[ValueId]) -> Result<Program> {
        self.prune(outputs);
        Program::new(self, outputs)
    }

    /// Node index producing each value.
    fn producers(&self) -> HashMap<ValueId, usize> {
        let mut p = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !matches!(n.op, Op::Removed) {
                for &o in &n.outputs {
                    p.insert(o, i);
                }
            }
        }
        p
    }

    /// How many node inputs read each value (program outputs count as readers too).
    fn readers(&self, outputs: &[ValueId]) -> HashMap<ValueId, usize> {
        let mut r: HashMap<ValueId, usize> = HashMap::new();
        for n in &self.nodes {
            if !matches!(n.op, Op::Removed) {
                for &i in &n.inputs {
                    *r.entry(i).or_default() += 1;
                }
            }
        }
        for &o in outputs {
            *r.entry(o).or_default() += 1;
        }
        r
    }

    /// Removes nodes whose outputs nobody reads.
    fn prune(&mut self, outputs: &[ValueId]) {
        loop {
            let readers = self.readers(outputs);
            let mut changed = false;
            for n in &mut self.nodes {
                if !matches!(n.op, Op::Removed)
                    && n.outputs.iter().all(|o| !readers.contains_key(o))
                {
                    n.op = Op::Removed;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
    }

    /// The producer of `v` when `v` has exactly one reader and is not an output.
    fn sole_producer(
        &self,
        v: ValueId,
        readers: &HashMap<ValueId, usize>,
        outputs: &[ValueId],
    ) -> Option<usize> {
        if outputs.contains(&v) || readers.get(&v).copied() != Some(1) {
            return None;
        }
        self.producers().get(&v).copied()
    }

    /// Conv → Affine: scale the kernel and bias.
    fn fold_affine(&mut self, outputs: &[ValueId]) {
        for j in 0..self.nodes.len() {
            let Op::Affine { scale, shift, act } = self.nodes[j].op.clone() else {
                continue;
            };
            let x = self.nodes[j].inputs[0];
            let readers = self.readers(outputs);
            let Some(mut i) = self.sole_producer(x, &readers, outputs) else {
                continue;
            };
            // Through a transpose that moves no data: a per-channel map is the same in
            // either layout (ConvNeXt's layer scale after its channels-last MLP).
            let mut through_alias = None;
            if matches!(self.nodes[i].op, Op::Alias) {
                let y = self.nodes[i].inputs[0];
                match self.sole_producer(y, &readers, outputs) {
                    Some(k) if matches!(self.nodes[k].op, Op::Conv(_)) => {
                        through_alias = Some(i);
                        i = k;
                    }
                    _ => continue,
                }
            }
            let affine_outputs = self.nodes[j].outputs.clone();
            let node_i = &mut self.nodes[i];
            let Op::Conv(spec) = &mut node_i.op else {
                continue;
            };
            if spec.act != Act::None
                || spec.prelu.is_some()
                || node_i.inputs.len() != 1
                || spec.bias.len() != scale.len()
            {
                continue;
            }
            let per = spec.weight.len() / spec.bias.len();
            for (o, (s, t)) in scale.iter().zip(&shift).enumerate() {
                spec.weight[o * per..(o + 1) * per]
                    .iter_mut()
                    .for_each(|w| *w *= s);
                spec.bias[o] = spec.bias[o] * s + t;
            }
            spec.act = act;
            match through_alias {
                // The convolution keeps its output; the alias now yields the affine's.
                Some(a) => self.nodes[a].outputs = affine_outputs,
                None => node_i.outputs = affine_outputs,
            }
            self.nodes[j].op = Op::Removed;
        }
    }

    /// GELU as exporters write it, `0.5 · x · (1 + erf(x / √2))` in five nodes (the 0.5
    /// applied first or last), → one GELU activation.
    fn fuse_gelu(&mut self, outputs: &[ValueId]) {
        // A uniform affine map `x · s + t`: (s, t).
        let uniform = |op: &Op| -> Option<(f32, f32)> {
            let Op::Affine {
                scale,
                shift,
                act: Act::None,
            } = op
            else {
                return None;
            };
            let (s, t) = (*scale.first()?, *shift.first()?);
            (scale.iter().all(|v| *v == s) && shift.iter().all(|v| *v == t)).then_some((s, t))
        };
        let near = |a: f32, b: f32| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
        for j in 0..self.nodes.len() {
            let readers = self.readers(outputs);
            let producers = self.producers();
            let node = |v: ValueId| producers.get(&v).map(|&i| (i, &self.nodes[i]));
            let sole = |v: ValueId| !outputs.contains(&v) && readers.get(&v) == Some(&1);
            // The last node: Affine(0.5) of Mul(x, p), or Mul(Affine(0.5)(x), p).
            let (mul, last_is_half) = match &self.nodes[j].op {
                op if uniform(op).is_some_and(|(s, t)| near(s, 0.5) && t == 0.0) => {
                    let m = self.nodes[j].inputs[0];
                    match node(m) {
                        Some((i, n))
                            if sole(m)
                                && matches!(
                                    n.op,
                                    Op::Binary {
                                        op: BinOp::Mul,
                                        broadcast: false,
                                        act: Act::None
                                    }
                                ) =>
                        {
                            (i, true)
                        }
                        _ => continue,
                    }
                }
                Op::Binary {
                    op: BinOp::Mul,
                    broadcast: false,
                    act: Act::None,
                } => (j, false),
                _ => continue,
            };
            let (a, b) = (self.nodes[mul].inputs[0], self.nodes[mul].inputs[1]);
            // One operand is p = Affine(1, 1)(Erf(Affine(1/√2)(x))); the other is x (or
            // Affine(0.5)(x) when the Mul is the last node).
            let mut found = None;
            for (other, p) in [(a, b), (b, a)] {
                let Some((ip, np)) = node(p) else { continue };
                if !sole(p) || !uniform(&np.op).is_some_and(|(s, t)| s == 1.0 && t == 1.0) {
                    continue;
                }
                let e = np.inputs[0];
                let Some((ie, ne)) = node(e) else { continue };
                if !sole(e) || !matches!(ne.op, Op::Act(Act::Erf)) {
                    continue;
                }
                let d = ne.inputs[0];
                let Some((id, nd)) = node(d) else { continue };
                if !sole(d)
                    || !uniform(&nd.op)
                        .is_some_and(|(s, t)| near(s, std::f32::consts::FRAC_1_SQRT_2) && t == 0.0)
                {
                    continue;
                }
                let x = nd.inputs[0];
                let mut removed = vec![ip, ie, id];
                let ok = if last_is_half {
                    other == x
                } else {
                    // other = Affine(0.5)(x), read only here.
                    match node(other) {
                        Some((ih, nh))
                            if sole(other)
                                && nh.inputs[0] == x
                                && uniform(&nh.op)
                                    .is_some_and(|(s, t)| near(s, 0.5) && t == 0.0) =>
                        {
                            removed.push(ih);
                            true
                        }
                        _ => false,
                    }
                };
                if ok {
                    if last_is_half {
                        removed.push(mul);
                    }
                    found = Some((x, removed));
                    break;
                }
            }
            let Some((x, removed)) = found else { continue };
            for i in removed {
                self.nodes[i].op = Op::Removed;
            }
            self.nodes[j].op = Op::Act(Act::Gelu);
            self.nodes[j].inputs = vec![x];
        }
    }

    /// `x · sigmoid(x)` → SiLU(x); `x · hardsigmoid(x)` (1/6, 1/2) → HardSwish(x).
    fn fuse_gated_activations(&mut self, outputs: &[ValueId]) {
        for j in 0..self.nodes.len() {
            let Op::Binary {
                op: BinOp::Mul,
                broadcast: false,
                act: Act::None,
            } = self.nodes[j].op
            else {
                continue;
            };
            let (a, b) = (self.nodes[j].inputs[0], self.nodes[j].inputs[1]);
            let readers = self.readers(outputs);
            for (x, gate) in [(a, b), (b, a)] {
                let Some(g) = self.sole_producer(gate, &readers, outputs) else {
                    continue;
                };
                let fused = match self.nodes[g].op {
                    Op::Act(Act::Sigmoid) => Act::Silu,
                    Op::Act(Act::HardSigmoid(a, b))
                        if (a - 1.0 / 6.0).abs() < 1e-7 && (b - 0.5).abs() < 1e-7 =>
                    {
                        Act::HardSwish
                    }
                    _ => continue,
                };
                if self.nodes[g].inputs[0] != x {
                    continue;
                }
                self.nodes[g].op = Op::Removed;
                self.nodes[j].op = Op::Act(fused);
                self.nodes[j].inputs = vec![x];
                break;
            }
        }
    }

    /// Add(conv(x), r) → conv(x) with r as the initial value, run where the Add was.
    fn fuse_residual(&mut self, outputs: &[ValueId]) {
        for j in 0..self.nodes.len() {
            let Op::Binary {
                op: BinOp::Add,
                broadcast: false,
                act,
            } = self.nodes[j].op
            else {
                continue;
            };
            let readers = self.readers(outputs);
            let (a, b) = (self.nodes[j].inputs[0], self.nodes[j].inputs[1]);
            for (c, r) in [(a, b), (b, a)] {
                let Some(i) = self.sole_producer(c, &readers, outputs) else {
                    continue;
                };
                let ok = matches!(&self.nodes[i].op, Op::Conv(s) if s.act == Act::None && s.prelu.is_none())
                    && self.nodes[i].inputs.len() == 1
                    && r != c;
                if !ok {
                    continue;
                }
                let mut conv = std::mem::replace(
                    &mut self.nodes[i],
                    Node {
                        op: Op::Removed,
                        inputs: vec![],
                        outputs: vec![],
                        name: String::new(),
                    },
                );
                if let Op::Conv(s) = &mut conv.op {
                    s.act = act;
                }
                conv.inputs.push(r);
                conv.outputs = self.nodes[j].outputs.clone();
                self.nodes[j] = conv;
                break;
            }
        }
    }

    /// Act after Conv / Affine / Binary → that operator's epilogue.
    fn fuse_activations(&mut self, outputs: &[ValueId]) {
        for j in 0..self.nodes.len() {
            if let Op::PRelu(slope) = &self.nodes[j].op {
                let slope = slope.clone();
                let x = self.nodes[j].inputs[0];
                let readers = self.readers(outputs);
                if let Some(i) = self.sole_producer(x, &readers, outputs) {
                    if let Op::Conv(s) = &mut self.nodes[i].op {
                        if s.prelu.is_none() && s.bias.len() == slope.len() {
                            s.prelu = Some(slope);
                            self.nodes[i].outputs = self.nodes[j].outputs.clone();
                            self.nodes[j].op = Op::Removed;
                        }
                    }
                }
                continue;
            }
            let Op::Act(act) = self.nodes[j].op else {
                continue;
            };
            let x = self.nodes[j].inputs[0];
            let readers = self.readers(outputs);
            let Some(i) = self.sole_producer(x, &readers, outputs) else {
                continue;
            };
            let slot = match &mut self.nodes[i].op {
                Op::Conv(s) if s.prelu.is_none() => &mut s.act,
                Op::Affine { act, .. } => act,
                Op::Binary { act, .. } => act,
                _ => continue,
            };
            if *slot != Act::None {
                continue;
            }
            *slot = act;
            self.nodes[i].outputs = self.nodes[j].outputs.clone();
            self.nodes[j].op = Op::Removed;
        }
    }
}

/// What a step runs: a convolution with its weights arranged for its kernel, or any other
/// operator as the graph holds it.
#[derive(Debug)]
enum Exec {
    Conv(kernels::Conv),
    Op(Op),
}

#[derive(Debug)]
struct Step {
    exec: Exec,
    kind: String,
    name: String,
    inputs: Vec<ValueId>,
    outputs: Vec<ValueId>,
    /// Inputs read for the last time by this step.
    frees: Vec<ValueId>,
}

/// An optimized network, ready to run.
#[derive(Debug)]
pub struct Program {
    steps: Vec<Step>,
    values: usize,
    inputs: Vec<ValueId>,
    outputs: Vec<ValueId>,
    split: Split,
    /// Per value: its logical layout is `[n, h, w, c]`.
    channels_last: Vec<bool>,
    profile: Option<Mutex<HashMap<String, (f64, usize)>>>,
}

/// A value while a program runs: channels-last for native operators, a tensor for external
/// ones; each form is made once, when first needed.
#[derive(Debug, Default, Clone)]
struct Slot {
    buf: Option<Arc<Buf>>,
    tensor: Option<Tensor>,
    /// The tensor form is `[n, h, w, c]` (else `[n, c, h, w]`).
    channels_last: bool,
}

impl Program {
    fn new(b: Builder, outputs: &[ValueId]) -> Result<Self> {
        let mut steps = Vec::new();
        for mut n in b.nodes {
            flush_denormals(&mut n.op);
            let kind = n.op.kind();
            let exec = match n.op {
                Op::Removed => continue,
                Op::Conv(s) => {
                    let mut cv = kernels::Conv::new(
                        &s.weight, s.bias, s.dims, s.groups, s.stride, s.dilation, s.pads, s.act,
                    );
                    cv.prelu = s.prelu;
                    Exec::Conv(cv)
                }
                op => Exec::Op(op),
            };
            steps.push(Step {
                exec,
                kind,
                name: n.name,
                inputs: n.inputs,
                outputs: n.outputs,
                frees: vec![],
            });
        }
        let mut last: HashMap<ValueId, usize> = HashMap::new();
        for (i, s) in steps.iter().enumerate() {
            for &v in &s.inputs {
                last.insert(v, i);
            }
        }
        for (v, i) in last {
            if !outputs.contains(&v) {
                steps[i].frees.push(v);
            }
        }
        // FAM_ENGINE_PROFILE=1 sums time per operator kind; `=steps`, per step.
        let by_step = std::env::var("FAM_ENGINE_PROFILE").as_deref() == Ok("steps");
        let profile = std::env::var_os("FAM_ENGINE_PROFILE").map(|_| Mutex::new(HashMap::new()));
        if by_step {
            for s in &mut steps {
                s.kind = format!("{} {}", s.kind, s.name);
            }
        }
        Ok(Self {
            steps,
            values: b.values,
            inputs: b.inputs,
            outputs: outputs.to_vec(),
            split: b.split.unwrap_or(Split::Allowed),
            channels_last: (0..b.values)
                .map(|v| b.channels_last.contains(&v))
                .collect(),
            profile,
        })
    }

    /// Number of steps after optimization, and how many run natively.
    pub fn counts(&self) -> (usize, usize) {
        let native = self
            .steps
            .iter()
            .filter(|s| !matches!(s.exec, Exec::Op(Op::External(_))))
            .count();
        (self.steps.len(), native)
    }

    /// Step counts by kind, e.g. `Conv 1x1: 52`.
    pub fn summary(&self) -> Vec<(String, usize)> {
        let mut m: HashMap<String, usize> = HashMap::new();
        for s in &self.steps {
            *m.entry(s.kind.clone()).or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Accumulated time per operator kind (ms, calls) when `FAM_ENGINE_PROFILE` is set.
    pub fn profile(&self) -> Vec<(String, f64, usize)> {
        let Some(p) = &self.profile else {
            return vec![];
        };
        let mut v: Vec<_> = p
            .lock()
            .map(|m| m.iter().map(|(k, (ms, n))| (k.clone(), *ms, *n)).collect())
            .unwrap_or_default();
        v.sort_by(|a: &(String, f64, usize), b| b.1.total_cmp(&a.1));
        v
    }

    /// Runs on CPU tensors (NCHW, batch first); returns the outputs as CPU tensors.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        if inputs.len() != self.inputs.len() {
            return Err(FamError::invalid(format!(
                "the program takes {} inputs, got {}",
                self.inputs.len(),
                inputs.len()
            )));
        }
        let batch = inputs
            .first()
            .map(|t| t.dims().first().copied().unwrap_or(1))
            .unwrap_or(1);
        let threads = rayon::current_num_threads();
        let split = match self.split {
            Split::Never => false,
            // One image at a time keeps its activations in cache, threads or not.
            Split::Allowed => batch > 1,
            Split::Always => batch > 1,
        };
        if split {
            let image = |i: usize| {
                let one: Vec<Tensor> = inputs
                    .iter()
                    .map(|t| t.narrow(0, i, 1))
                    .collect::<std::result::Result<_, _>>()?;
                self.run_one(&one, 1, 1)
            };
            let per_image = if threads > 1 {
                (0..batch)
                    .into_par_iter()
                    .map(image)
                    .collect::<Result<Vec<_>>>()?
            } else {
                (0..batch).map(image).collect::<Result<Vec<_>>>()?
            };
            (0..self.outputs.len())
                .map(|k| {
                    let parts: Vec<Tensor> = per_image.iter().map(|o| o[k].clone()).collect();
                    Ok(Tensor::cat(&parts, 0)?)
                })
                .collect()
        } else if threads > 1 && rayon::current_thread_index().is_none() {
            // Run on a worker of the pool, so that this thread takes part in the work it
            // splits (and finds the others awake) instead of waiting for them.
            rayon::join(|| self.run_one(inputs, batch, threads), || ()).0
        } else {
            self.run_one(inputs, batch, threads)
        }
    }

    fn run_one(&self, inputs: &[Tensor], batch: usize, threads: usize) -> Result<Vec<Tensor>> {
        let _ftz = kernels::FlushToZero::on();
        let mut slots: Vec<Slot> = vec![Slot::default(); self.values];
        for (&v, t) in self.inputs.iter().zip(inputs) {
            slots[v].tensor = Some(t.to_dtype(DType::F32)?);
        }
        for step in &self.steps {
            let t0 = self.profile.as_ref().map(|_| Instant::now());
            let outs = self
                .exec(step, &mut slots, batch, threads)
                .map_err(|e| match e {
                    FamError::Invalid(m) if !m.starts_with("node `") => {
                        FamError::invalid(format!("node `{}` ({}): {m}", step.name, step.kind))
                    }
                    other => other,
                })?;
            for (&v, mut s) in step.outputs.iter().zip(outs) {
                s.channels_last = self.channels_last[v];
                slots[v] = s;
            }
            for &v in &step.frees {
                slots[v] = Slot::default();
            }
            if let (Some(p), Some(t0)) = (&self.profile, t0) {
                if let Ok(mut m) = p.lock() {
                    let e = m.entry(step.kind.clone()).or_default();
                    e.0 += t0.elapsed().as_secs_f64() * 1e3;
                    e.1 += 1;
                }
            }
        }
        self.outputs
            .iter()
            .map(|&v| {
                tensor_of(&mut slots[v])
                    .map_err(|e| FamError::invalid(format!("output value {v}: {e}")))
            })
            .collect()
    }

    fn exec(
        &self,
        step: &Step,
        slots: &mut [Slot],
        batch: usize,
        threads: usize,
    ) -> Result<Vec<Slot>> {
        let native = |b: Buf| -> Vec<Slot> {
            vec![Slot {
                buf: Some(Arc::new(b)),
                ..Slot::default()
            }]
        };
        Ok(match &step.exec {
            Exec::Op(Op::External(op)) => {
                let ins = step
                    .inputs
                    .iter()
                    .map(|&v| tensor_of(&mut slots[v]))
                    .collect::<Result<Vec<_>>>()?;
                let outs = op.eval(&ins, batch)?;
                if outs.len() < step.outputs.len() {
                    return Err(FamError::invalid(format!(
                        "returned {} values, {} expected",
                        outs.len(),
                        step.outputs.len()
                    )));
                }
                outs.into_iter()
                    .map(|t| Slot {
                        tensor: Some(t),
                        ..Slot::default()
                    })
                    .collect()
            }
            Exec::Conv(cv) => {
                let x = buf_of(&mut slots[step.inputs[0]])?;
                if x.c != cv.c {
                    return Err(FamError::invalid(format!(
                        "the convolution takes {} channels, its input has {}",
                        cv.c, x.c
                    )));
                }
                let r = match step.inputs.get(1) {
                    Some(&v) => Some(buf_of(&mut slots[v])?),
                    None => None,
                };
                if let Some(r) = &r {
                    let (ho, wo) = cv.out_hw(x.h, x.w);
                    if (r.n, r.h, r.w, r.c) != (x.n, ho, wo, cv.o) {
                        return Err(FamError::invalid(format!(
                            "residual [{}, {}, {}, {}] does not match the output [{}, {}, {ho}, {wo}]",
                            r.n, r.c, r.h, r.w, x.n, cv.o
                        )));
                    }
                }
                native(cv.run(&x, r.as_deref(), threads))
            }
            Exec::Op(Op::Affine { scale, shift, act }) => {
                let x = buf_of(&mut slots[step.inputs[0]])?;
                if x.c != scale.len() {
                    return Err(FamError::invalid(format!(
                        "{} channel scales for {} channels",
                        scale.len(),
                        x.c
                    )));
                }
                let mut y = take_or_clone(x, &step.frees, step.inputs[0]);
                per_pixels(&mut y, threads, |d| kernels::affine(d, scale, shift, *act));
                native(y)
            }
            Exec::Op(Op::Act(act)) => {
                let x = buf_of(&mut slots[step.inputs[0]])?;
                let mut y = take_or_clone(x, &step.frees, step.inputs[0]);
                per_pixels(&mut y, threads, |d| kernels::activate(d, *act));
                native(y)
            }
            Exec::Op(Op::PRelu(slope)) => {
                let x = buf_of(&mut slots[step.inputs[0]])?;
                if x.c != slope.len() {
                    return Err(FamError::invalid(format!(
                        "{} PReLU slopes for {} channels",
                        slope.len(),
                        x.c
                    )));
                }
                let mut y = take_or_clone(x, &step.frees, step.inputs[0]);
                per_pixels(&mut y, threads, |d| kernels::prelu(d, slope));
                native(y)
            }
            Exec::Op(Op::Binary { op, act, .. }) => {
                let a = buf_of(&mut slots[step.inputs[0]])?;
                let b = buf_of(&mut slots[step.inputs[1]])?;
                let same = (a.n, a.h, a.w, a.c) == (b.n, b.h, b.w, b.c);
                let bcast = (a.n, a.c) == (b.n, b.c) && (b.h * b.w == 1 || a.h * a.w == 1);
                if !same && !bcast {
                    return Err(FamError::invalid(format!(
                        "operands [{}, {}, {}, {}] and [{}, {}, {}, {}] do not broadcast",
                        a.n, a.c, a.h, a.w, b.n, b.c, b.h, b.w
                    )));
                }
                native(kernels::binary(&a, &b, *op, *act))
            }
            Exec::Op(Op::Pool(p)) => {
                let x = buf_of(&mut slots[step.inputs[0]])?;
                native(p.run(&x))
            }
            Exec::Op(Op::GlobalPool { max }) => {
                let x = buf_of(&mut slots[step.inputs[0]])?;
                native(kernels::global_pool(&x, *max))
            }
            Exec::Op(Op::LayerNorm { scale, shift, eps }) => {
                let x = buf_of(&mut slots[step.inputs[0]])?;
                if x.c != scale.len() {
                    return Err(FamError::invalid(format!(
                        "{} normalization scales for {} channels",
                        scale.len(),
                        x.c
                    )));
                }
                let mut y = take_or_clone(x, &step.frees, step.inputs[0]);
                per_pixels(&mut y, threads, |d| {
                    kernels::layer_norm(d, scale, shift, *eps)
                });
                native(y)
            }
            Exec::Op(Op::Alias) => {
                let x = buf_of(&mut slots[step.inputs[0]])?;
                vec![Slot {
                    buf: Some(x),
                    ..Slot::default()
                }]
            }
            Exec::Op(Op::Conv(_) | Op::Removed) => {
                // Program::new prepares every convolution and drops removed nodes.
                return Err(FamError::invalid("an unprepared step reached the executor"));
            }
            Exec::Op(Op::Concat) => {
                let parts = step
                    .inputs
                    .iter()
                    .map(|&v| buf_of(&mut slots[v]))
                    .collect::<Result<Vec<_>>>()?;
                let (n, h, w) = (parts[0].n, parts[0].h, parts[0].w);
                if parts.iter().any(|p| (p.n, p.h, p.w) != (n, h, w)) {
                    return Err(FamError::invalid("concatenated maps differ in size"));
                }
                let refs: Vec<&Buf> = parts.iter().map(|p| p.as_ref()).collect();
                native(kernels::concat(&refs))
            }
        })
    }
}

/// Sets subnormal parameters to zero. Folding a BatchNorm whose channel was pruned (γ ≈ 0)
/// leaves weights below f32's normal range, and x86 processors take a slow path on every
/// multiplication with them: measured on MobileFaceNet, whose 1x1 kernels hold 8,938 such
/// weights, they made its 1x1 convolutions 10-20 times slower. Changes each value by less
/// than 1.2e-38.
fn flush_denormals(op: &mut Op) {
    let flush = |v: &mut [f32]| {
        v.iter_mut()
            .filter(|x| x.is_subnormal())
            .for_each(|x| *x = 0.0)
    };
    match op {
        Op::Conv(s) => {
            flush(&mut s.weight);
            flush(&mut s.bias);
            if let Some(p) = &mut s.prelu {
                flush(p);
            }
        }
        Op::Affine { scale, shift, .. } => {
            flush(scale);
            flush(shift);
        }
        Op::PRelu(p) => flush(p),
        _ => {}
    }
}

/// Runs `f` on blocks of whole pixels of `x`, in parallel when there are threads and enough
/// values to share.
fn per_pixels(x: &mut Buf, threads: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
    let len = x.data.len();
    if threads > 1 && len >= 1 << 15 {
        let pixels = x.pixels().div_ceil(2 * threads).max(1);
        x.data.par_chunks_mut(pixels * x.c).for_each(|d| {
            let _ftz = kernels::FlushToZero::on();
            f(d)
        });
    } else {
        f(&mut x.data);
    }
}

/// The value as a buffer that can be written: the value itself when this step is its last
/// reader and no one else holds it, else a copy.
fn take_or_clone(x: Arc<Buf>, frees: &[ValueId], v: ValueId) -> Buf {
    if frees.contains(&v) {
        Arc::try_unwrap(x).unwrap_or_else(|a| (*a).clone())
    } else {
        (*x).clone()
    }
}

/// The channels-last form of a value (made from its tensor the first time).
fn buf_of(slot: &mut Slot) -> Result<Arc<Buf>> {
    if let Some(b) = &slot.buf {
        return Ok(b.clone());
    }
    let t = slot
        .tensor
        .as_ref()
        .ok_or_else(|| FamError::invalid("a value was read after it was freed"))?;
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = match (t.dims(), slot.channels_last) {
        (&[n, h, w, c], true) => Buf { data, n, h, w, c },
        (&[n, c, h, w], false) => Buf::from_nchw(&data, (n, c, h, w)),
        (&[n, c], _) => Buf {
            data,
            n,
            h: 1,
            w: 1,
            c,
        },
        (d, _) => {
            return Err(FamError::invalid(format!(
                "a native operator needs a 4-D feature map, got shape {d:?}"
            )))
        }
    };
    let b = Arc::new(b);
    slot.buf = Some(b.clone());
    Ok(b)
}

/// The tensor form of a value (made from its buffer the first time).
fn tensor_of(slot: &mut Slot) -> Result<Tensor> {
    if let Some(t) = &slot.tensor {
        return Ok(t.clone());
    }
    let b = slot
        .buf
        .as_ref()
        .ok_or_else(|| FamError::invalid("a value was read after it was freed"))?;
    let t = if slot.channels_last {
        Tensor::from_vec(b.data.clone(), (b.n, b.h, b.w, b.c), &Device::Cpu)?
    } else {
        Tensor::from_vec(b.to_nchw(), (b.n, b.c, b.h, b.w), &Device::Cpu)?
    };
    slot.tensor = Some(t.clone());
    Ok(t)
}

#[cfg(test)]
mod tests;
