//! The head between the feature layer and the embedding output, when it is affine
//! (`z = L(A) + z0`): face and re-id models often end in a depthwise "GDConv", a 1x1 conv
//! or an FC layer, a BatchNorm, a flatten; torchvision models in a global average pool
//! (`GlobalAveragePool`, or `ReduceMean` over the spatial axes) and a `Gemm`. FAM then pulls
//! embedding-space weights back through `Lᵀ` to spatial weights on the feature maps
//! (DESIGN.md section 1.3), so the decomposition of the model's real score is exact.
//!
//! The head is a chain of nodes from the layer to the output. Besides the flowing value a
//! node may read *static* values only: initializers, `Constant` outputs, and anything
//! computed from them and from shapes (`Identity` of a weight, `Shape -> Gather -> Concat`
//! targets of a `Reshape`), which the builder evaluates once.

use std::collections::HashMap;

use candle_onnx::onnx::NodeProto;
use fam_core::candle::{DType, Tensor};
use fam_core::{FamError, Result};

use crate::graph::Graph;
use crate::ops;

/// One affine step.
#[derive(Debug, Clone)]
enum Step {
    /// Conv whose kernel covers the whole input (output 1x1), no padding, stride 1.
    FullConv { w: Tensor, group: usize },
    /// 1x1 convolution, group 1, stride 1, no padding.
    Pointwise { w: Tensor },
    /// Per-channel scale (BatchNormalization, Mul by a channel vector).
    Scale { k: Tensor },
    /// Multiplication by a constant that broadcasts with the input.
    Mul { c: Tensor },
    /// Mean (or sum, `divisor` 1) over the given axes (GlobalAveragePool, ReduceMean,
    /// ReduceSum), of an input of `in_shape`.
    Mean { axes: Vec<usize>, divisor: f64 },
    /// `x @ B` (MatMul with a constant B, or Gemm with the flowing input as A).
    MatMul {
        b: Tensor,
        alpha: f64,
        trans_a: bool,
    },
    /// A permutation of the axes (batch first).
    Transpose { perm: Vec<usize> },
    /// Addition of a constant (which may broadcast the input up); `sign` -1 for `c - x`.
    Add { sign: f64 },
    /// Shape-only steps (Reshape, Flatten, Squeeze, Unsqueeze, Identity, Dropout).
    Reshape,
    /// `Gather` of the flowing value along `axis` at constant indices (the dynamo exporter's
    /// `as_strided`); `idx` flattened, non-negative.
    Gather { axis: usize, idx: Vec<u32> },
}

/// An affine head, ready to pull weights back.
#[derive(Debug, Clone)]
pub struct Head {
    /// Each step with the shapes of its flowing input and its output, for a batch of one
    /// image (the head is built and pulled back per image).
    steps: Vec<(Step, Vec<usize>, Vec<usize>)>,
    /// `z0 = head(0)`, the part of the embedding no pixel accounts for.
    pub offset: Vec<f32>,
    pub ops: Vec<String>,
}

fn not_linear(node: &NodeProto, why: &str) -> FamError {
    FamError::invalid(format!(
        "the head after the feature layer is not affine at node `{}` ({}): {why}; use `embedding = \"gap\"`",
        node.name, node.op_type
    ))
}

/// Operators that read only the shape of an input, never its data.
fn shape_only(op: &str) -> bool {
    matches!(op, "Shape" | "Size")
}

/// Values that do not depend on the data of the feature maps, evaluated on demand.
struct Statics<'a> {
    graph: &'a Graph,
    producer: HashMap<&'a str, usize>,
    /// Known values: constants, evaluated statics, and the flowing values so far (whose
    /// shapes `Shape` may read).
    known: HashMap<String, Tensor>,
    /// Values found not to be static (so that a graph is searched once).
    dynamic: std::collections::HashSet<String>,
}

impl<'a> Statics<'a> {
    fn new(graph: &'a Graph) -> Self {
        let mut producer = HashMap::new();
        for (i, n) in graph.nodes.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.as_str(), i);
            }
        }
        Self {
            graph,
            producer,
            known: HashMap::new(),
            dynamic: Default::default(),
        }
    }

    /// `Shape` of a graph input, for one image: the declared dimensions with a batch of 1, if
    /// the ones selected (`start`, `end`) are known.
    fn input_shape(&self, node: &NodeProto) -> Option<Tensor> {
        let inp = node.input.first()?;
        let (_, declared) = self.graph.inputs.iter().find(|(n, _)| n == inp)?;
        if declared.is_empty() {
            return None;
        }
        let mut dims = declared.clone();
        dims[0] = 1;
        let r = dims.len() as i64;
        let attr = |n: &str, d: i64| {
            node.attribute
                .iter()
                .find(|a| a.name == n)
                .map(|a| a.i)
                .unwrap_or(d)
        };
        let clampi = |a: i64| (if a < 0 { a + r } else { a }).clamp(0, r) as usize;
        let (b, e) = (clampi(attr("start", 0)), clampi(attr("end", r)));
        let sel = &dims[b..e.max(b)];
        if sel.iter().any(|&d| d <= 0) {
            return None;
        }
        Tensor::new(sel, &self.graph.device).ok()
    }

    /// The value of `name` if it is static (`flowing` values only through `Shape`).
    fn get(
        &mut self,
        name: &str,
        flowing: &HashMap<String, Tensor>,
        depth: usize,
    ) -> Option<Tensor> {
        if let Some(v) = self
            .graph
            .constants
            .get(name)
            .or_else(|| self.known.get(name))
        {
            return Some(v.clone());
        }
        if depth > 64 || self.dynamic.contains(name) {
            return None;
        }
        let v = self.compute(name, flowing, depth);
        if v.is_none() {
            self.dynamic.insert(name.to_string());
        }
        v
    }

    fn compute(
        &mut self,
        name: &str,
        flowing: &HashMap<String, Tensor>,
        depth: usize,
    ) -> Option<Tensor> {
        let node = &self.graph.nodes[*self.producer.get(name)?];
        if node.op_type == "Shape" {
            if let Some(v) = self.input_shape(node) {
                self.known.insert(name.to_string(), v.clone());
                return Some(v);
            }
        }
        let mut inputs: HashMap<String, Tensor> = HashMap::new();
        for inp in node.input.iter().filter(|s| !s.is_empty()) {
            let v = if shape_only(&node.op_type) {
                flowing
                    .get(inp)
                    .cloned()
                    .or_else(|| self.get(inp, flowing, depth + 1))
            } else {
                self.get(inp, flowing, depth + 1)
            }?;
            inputs.insert(inp.clone(), v);
        }
        let ctx = ops::Ctx {
            node,
            batch: 1,
            declared_batch: self.graph.declared_batch,
            constants: &self.graph.constants,
        };
        let get = |n: &str| -> Result<Tensor> {
            inputs
                .get(n)
                .cloned()
                .ok_or_else(|| FamError::invalid(format!("`{n}` missing")))
        };
        let outs = ops::eval_guarded(&ctx, &get).ok()?;
        for (o, v) in node.output.iter().zip(outs) {
            self.known.insert(o.clone(), v);
        }
        self.known.get(name).cloned()
    }
}

/// Reduces `g` (broadcast shape, with a leading axis of weight vectors) to `shape` by summing
/// the broadcast axes.
fn unbroadcast(g: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let mut g = g.clone();
    // Axis 0 is the weight vectors' axis: never summed.
    while g.rank() > shape.len() {
        g = g.sum(1)?;
    }
    for (i, &d) in shape.iter().enumerate() {
        if d == 1 && g.dims()[i] != 1 {
            g = g.sum_keepdim(i)?;
        }
    }
    Ok(g.reshape(shape)?)
}

/// `shape` (for one image) with a leading axis of `p` weight vectors.
fn batched(shape: &[usize], p: usize) -> Vec<usize> {
    let mut s = Vec::with_capacity(shape.len() + 1);
    s.push(p);
    s.extend_from_slice(shape);
    s
}

impl Head {
    /// Follows the nodes from `layer` to `output`; every node must take the flowing value
    /// and static values only, and be affine in the flowing value. `layer_shape` is one
    /// image's feature map shape `[1, C, h, w]`.
    pub fn build(graph: &Graph, layer: &str, output: &str, layer_shape: &[usize]) -> Result<Self> {
        let plan = graph.plan(&[output])?;
        let mut current = layer.to_string();
        let mut value = Tensor::zeros(layer_shape, DType::F32, &graph.device)?;
        let mut flowing: HashMap<String, Tensor> =
            HashMap::from([(current.clone(), value.clone())]);
        let mut statics = Statics::new(graph);
        let mut steps = Vec::new();
        let mut names = Vec::new();
        let mut guard = 0;
        while current != output {
            guard += 1;
            if guard > 10_000 {
                return Err(FamError::invalid("head too long"));
            }
            // Nodes that read the flowing value's data (`Shape` reads its shape only).
            let consumers: Vec<&NodeProto> = plan
                .iter()
                .map(|&i| &graph.nodes[i])
                .filter(|n| n.input.contains(&current) && !shape_only(&n.op_type))
                .collect();
            let node = match consumers.as_slice() {
                [n] => *n,
                [] => {
                    return Err(FamError::invalid(format!(
                    "output `{output}` does not depend on layer `{layer}` through a chain of nodes"
                )))
                }
                many => {
                    let list: Vec<String> = many
                        .iter()
                        .map(|n| format!("`{}` ({})", n.name, n.op_type))
                        .collect();
                    return Err(FamError::invalid(format!(
                        "layer `{layer}`: value `{current}` feeds {} nodes on the way to `{output}` ({}); only a chain of affine nodes is supported; use `embedding = \"gap\"`",
                        many.len(),
                        list.join(", ")
                    )));
                }
            };
            let pos = node.input.iter().position(|x| *x == current).unwrap_or(0);
            if node.input.iter().filter(|x| **x == current).count() > 1 {
                return Err(not_linear(node, "it reads the flowing value twice"));
            }
            let mut inputs: HashMap<String, Tensor> = HashMap::new();
            for (i, inp) in node.input.iter().enumerate() {
                if i == pos || inp.is_empty() {
                    continue;
                }
                match statics.get(inp, &flowing, 0) {
                    Some(v) => {
                        inputs.insert(inp.clone(), v);
                    }
                    None => {
                        return Err(not_linear(
                            node,
                            &format!("input `{inp}` depends on the image, not only on constants"),
                        ))
                    }
                }
            }
            let c = |i: usize| -> Result<Tensor> {
                node.input
                    .get(i)
                    .and_then(|n| inputs.get(n))
                    .cloned()
                    .ok_or_else(|| not_linear(node, &format!("input {i} missing")))
            };
            let attr = |n: &str| node.attribute.iter().find(|a| a.name == n);
            let int = |n: &str, d: i64| attr(n).map(|a| a.i).unwrap_or(d);
            let in_shape = value.dims().to_vec();
            let rank = in_shape.len();
            let norm_axes = |axes: &[i64]| -> Result<Vec<usize>> {
                let mut out: Vec<usize> = axes
                    .iter()
                    .map(|&a| {
                        let v = if a < 0 { a + rank as i64 } else { a };
                        if v <= 0 || v >= rank as i64 {
                            Err(not_linear(
                                node,
                                &format!(
                                    "axes {axes:?} must be non-batch axes of a rank-{rank} value"
                                ),
                            ))
                        } else {
                            Ok(v as usize)
                        }
                    })
                    .collect::<Result<_>>()?;
                out.sort_unstable();
                out.dedup();
                Ok(out)
            };
            let step = match node.op_type.as_str() {
                "Conv" => {
                    let w = c(1)?;
                    let (_, _, kh, kw) = w.dims4()?;
                    let pads = attr("pads").map(|a| a.ints.clone()).unwrap_or_default();
                    let strides = attr("strides").map(|a| a.ints.clone()).unwrap_or_default();
                    let dil = attr("dilations")
                        .map(|a| a.ints.clone())
                        .unwrap_or_default();
                    let auto = attr("auto_pad")
                        .map(|a| String::from_utf8_lossy(&a.s).into_owned())
                        .unwrap_or_default();
                    if pads.iter().any(|p| *p != 0)
                        || strides.iter().any(|s| *s != 1)
                        || dil.iter().any(|s| *s != 1)
                        || (!auto.is_empty() && auto != "NOTSET" && auto != "VALID")
                    {
                        return Err(not_linear(
                            node,
                            "only unpadded, stride-1 convolutions are supported in a head",
                        ));
                    }
                    if pos != 0 || rank != 4 {
                        return Err(not_linear(node, "the flowing value must be the 4-D input"));
                    }
                    let group = int("group", 1) as usize;
                    if (kh, kw) == (in_shape[2], in_shape[3]) {
                        Step::FullConv { w, group }
                    } else if (kh, kw) == (1, 1) && group == 1 {
                        Step::Pointwise { w }
                    } else {
                        return Err(not_linear(
                            node,
                            "a head convolution must be 1x1 or cover the whole feature map",
                        ));
                    }
                }
                "BatchNormalization" if pos == 0 => {
                    let (scale, var) = (c(1)?, c(4)?);
                    let eps = attr("epsilon").map(|a| a.f).unwrap_or(1e-5) as f64;
                    Step::Scale {
                        k: (scale.to_dtype(DType::F32)?
                            / (var.to_dtype(DType::F32)? + eps)?.sqrt()?)?,
                    }
                }
                "GlobalAveragePool" if rank >= 3 => {
                    let axes: Vec<usize> = (2..rank).collect();
                    let n: usize = in_shape[2..].iter().product();
                    Step::Mean {
                        axes,
                        divisor: n as f64,
                    }
                }
                op @ ("ReduceMean" | "ReduceSum") if pos == 0 => {
                    let axes = match node.input.get(1).filter(|s| !s.is_empty()) {
                        Some(_) => c(1)?
                            .to_dtype(DType::I64)?
                            .flatten_all()?
                            .to_vec1::<i64>()?,
                        None => attr("axes").map(|a| a.ints.clone()).unwrap_or_default(),
                    };
                    if axes.is_empty() {
                        return Err(not_linear(
                            node,
                            "a reduction over every axis (the batch too) is not a per-image head",
                        ));
                    }
                    let axes = norm_axes(&axes)?;
                    let n: usize = axes.iter().map(|&a| in_shape[a]).product();
                    Step::Mean {
                        axes,
                        divisor: if op == "ReduceMean" { n as f64 } else { 1.0 },
                    }
                }
                "Transpose" => {
                    let perm: Vec<usize> = match attr("perm") {
                        Some(a) => a.ints.iter().map(|&p| p.max(0) as usize).collect(),
                        None => (0..rank).rev().collect(),
                    };
                    if perm.first() != Some(&0) {
                        return Err(not_linear(
                            node,
                            "a permutation must keep the batch axis first",
                        ));
                    }
                    Step::Transpose { perm }
                }
                "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity" | "Dropout"
                    if pos == 0 =>
                {
                    Step::Reshape
                }
                "Gather" if pos == 0 => {
                    let a = int("axis", 0);
                    let a = if a < 0 { a + rank as i64 } else { a };
                    if !(0..rank as i64).contains(&a) {
                        return Err(not_linear(node, &format!("axis {a} is out of range")));
                    }
                    let a = a as usize;
                    let n = in_shape[a] as i64;
                    let idx = c(1)?
                        .to_dtype(DType::I64)?
                        .flatten_all()?
                        .to_vec1::<i64>()?
                        .into_iter()
                        .map(|i| {
                            let j = if i < 0 { i + n } else { i };
                            if (0..n).contains(&j) {
                                Ok(j as u32)
                            } else {
                                Err(not_linear(node, &format!("index {i} is out of range")))
                            }
                        })
                        .collect::<Result<_>>()?;
                    Step::Gather { axis: a, idx }
                }
                "Add" => Step::Add { sign: 1.0 },
                "Sub" if pos == 0 => Step::Add { sign: 1.0 },
                "Sub" => Step::Add { sign: -1.0 },
                "Neg" => Step::Add { sign: -1.0 },
                "Mul" => Step::Mul {
                    c: c(1 - pos)?.to_dtype(DType::F32)?,
                },
                "Div" if pos == 0 => Step::Mul {
                    c: c(1)?.to_dtype(DType::F32)?.recip()?,
                },
                "MatMul" if pos == 0 => Step::MatMul {
                    b: c(1)?.to_dtype(DType::F32)?,
                    alpha: 1.0,
                    trans_a: false,
                },
                "Gemm" if pos == 0 => {
                    let b = c(1)?.to_dtype(DType::F32)?;
                    let b = if int("transB", 0) != 0 {
                        b.t()?.contiguous()?
                    } else {
                        b
                    };
                    Step::MatMul {
                        b,
                        alpha: attr("alpha").map(|a| a.f).unwrap_or(1.0) as f64,
                        trans_a: int("transA", 0) != 0,
                    }
                }
                _ => {
                    return Err(not_linear(
                        node,
                        "not an affine operator of the flowing value",
                    ))
                }
            };
            // Evaluate on the running value (zeros at the start) to learn shapes and z0.
            let ctx = ops::Ctx {
                node,
                batch: 1,
                declared_batch: graph.declared_batch,
                constants: &graph.constants,
            };
            let cur = current.clone();
            let v = value.clone();
            let get = |name: &str| -> Result<Tensor> {
                if name == cur {
                    Ok(v.clone())
                } else {
                    inputs
                        .get(name)
                        .cloned()
                        .ok_or_else(|| FamError::invalid(format!("`{name}` missing")))
                }
            };
            value = ops::eval_guarded(&ctx, &get)
                .map_err(|e| not_linear(node, &format!("it cannot be evaluated ({e})")))?
                .remove(0)
                .to_dtype(DType::F32)?;
            let out_shape = value.dims().to_vec();
            let step = match step {
                Step::Mul { c }
                    if c.elem_count() > 1
                        && c.rank() >= 1
                        && c.dims().iter().filter(|&&d| d > 1).count() == 1
                        && in_shape.len() == 4
                        && in_shape == out_shape
                        && c.elem_count() == in_shape[1]
                        && c.dims().len() >= 3
                        && c.dims()[c.rank() - 3] == in_shape[1] =>
                {
                    Step::Scale {
                        k: c.flatten_all()?,
                    }
                }
                s => s,
            };
            steps.push((step, in_shape, out_shape));
            names.push(node.op_type.clone());
            current = match node.output.first() {
                Some(o) => o.clone(),
                None => return Err(not_linear(node, "it has no output")),
            };
            flowing.insert(current.clone(), value.clone());
        }
        let offset: Vec<f32> = value.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        Ok(Self {
            steps,
            offset,
            ops: names,
        })
    }

    /// `Lᵀ u` for embedding-space weights `u` `[P, D]`: spatial weights `[P, C, h, w]`.
    /// Each row is pulled back through the head of one image: the gradients carry a leading
    /// axis of `P` before the one-image shapes the head was built with.
    pub fn pullback(&self, u: &Tensor) -> Result<Tensor> {
        let p = u.dims()[0];
        let mut g = u.to_dtype(DType::F32)?;
        for (step, in_shape, out_shape) in self.steps.iter().rev() {
            let shape = batched(in_shape, p);
            g = g.reshape(batched(out_shape, p))?;
            g = match step {
                Step::Reshape => g.reshape(shape.as_slice())?,
                Step::Add { sign } => unbroadcast(&(g * *sign)?, &shape)?,
                Step::Scale { k } => {
                    // The channel axis: 1 of the image's shape, 2 of the gradient's.
                    let c = k.elem_count();
                    let bshape: Vec<usize> = (0..shape.len())
                        .map(|i| if i == 2 { c } else { 1 })
                        .collect();
                    g.broadcast_mul(&k.reshape(bshape.as_slice())?)?
                        .reshape(shape.as_slice())?
                }
                Step::Mul { c } => unbroadcast(&g.broadcast_mul(c)?, &shape)?,
                Step::Mean { axes, divisor } => {
                    let mut kept = shape.clone();
                    for &a in axes {
                        kept[a + 1] = 1;
                    }
                    (g.reshape(kept.as_slice())?.broadcast_as(shape.as_slice())? / *divisor)?
                        .contiguous()?
                }
                Step::Transpose { perm } => {
                    let mut inv = vec![0; perm.len() + 1];
                    for (i, &q) in perm.iter().enumerate() {
                        inv[q + 1] = i + 1;
                    }
                    g.permute(inv)?.contiguous()?
                }
                Step::Gather { axis, idx } => {
                    let n = idx.len();
                    let mut src = batched(&in_shape[..*axis], p);
                    src.push(n);
                    src.extend_from_slice(&in_shape[axis + 1..]);
                    let g = g.reshape(src.as_slice())?.contiguous()?;
                    let ids = Tensor::new(idx.as_slice(), g.device())?;
                    Tensor::zeros(shape.as_slice(), DType::F32, g.device())?.index_add(
                        &ids,
                        &g,
                        axis + 1,
                    )?
                }
                Step::FullConv { w, group } => {
                    // y[o] = sum_{c,ij} W[o, c, i, j] x[c, i, j] (per group)
                    let (o, cg, kh, kw) = w.dims4()?;
                    let w = w.to_dtype(DType::F32)?;
                    let g2 = g.reshape((p, o))?;
                    let gx = if *group == 1 {
                        g2.matmul(&w.reshape((o, cg * kh * kw))?)?
                    } else if *group == o && cg == 1 {
                        g2.reshape((p, o, 1, 1))?
                            .broadcast_mul(&w.reshape((1, o, kh, kw))?)?
                    } else {
                        return Err(FamError::invalid(
                            "grouped head convolution: only group 1 or depthwise",
                        ));
                    };
                    gx.reshape(shape.as_slice())?
                }
                Step::Pointwise { w } => {
                    let (o, c, _, _) = w.dims4()?;
                    let (h, wd) = (in_shape[2], in_shape[3]);
                    let g2 = g.reshape((p, o, h * wd))?;
                    w.to_dtype(DType::F32)?
                        .reshape((o, c))?
                        .t()?
                        .contiguous()?
                        .broadcast_matmul(&g2)?
                        .reshape(shape.as_slice())?
                }
                Step::MatMul { b, alpha, trans_a } => {
                    if *trans_a {
                        // y = xᵀ B (Gemm, 2-D): the gradient of x is B gᵀ.
                        let gt = g.transpose(1, 2)?.contiguous()?;
                        (b.broadcast_matmul(&gt)? * *alpha)?.reshape(shape.as_slice())?
                    } else {
                        // y = x B: the gradient of x is g Bᵀ.
                        let gx = (g.broadcast_matmul(&b.t()?.contiguous()?)? * *alpha)?;
                        unbroadcast(&gx, &shape)?
                    }
                }
            };
        }
        // [P, 1, C, h, w] -> [P, C, h, w]
        let dims = g.dims().to_vec();
        if dims.len() < 2 {
            return Ok(g);
        }
        let mut out = vec![p];
        out.extend_from_slice(&dims[2..]);
        Ok(g.reshape(out)?)
    }
}

/// Names of the head's steps, for logs.
pub fn describe(h: &Head) -> String {
    h.ops.join(" -> ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_onnx::onnx::{
        self, AttributeProto, GraphProto, ModelProto, TensorProto, ValueInfoProto,
    };
    use fam_core::candle::Device;
    use prost::Message;

    fn tensor(name: &str, dims: &[i64], data: Vec<f32>) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: 1,
            float_data: data,
            ..Default::default()
        }
    }

    fn ints(name: &str, data: &[i64]) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: vec![data.len() as i64],
            data_type: 7,
            int64_data: data.to_vec(),
            ..Default::default()
        }
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: onnx::attribute_proto::AttributeType::Ints as i32,
            ints: v.to_vec(),
            ..Default::default()
        }
    }

    fn attr_int(name: &str, v: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: onnx::attribute_proto::AttributeType::Int as i32,
            i: v,
            ..Default::default()
        }
    }

    fn node(
        op: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            name: name.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        }
    }

    fn constant(name: &str, t: TensorProto) -> NodeProto {
        node(
            "Constant",
            name,
            &[],
            &[name],
            vec![AttributeProto {
                name: "value".into(),
                r#type: onnx::attribute_proto::AttributeType::Tensor as i32,
                t: Some(t),
                ..Default::default()
            }],
        )
    }

    /// A graph whose input `x` is the feature map.
    fn graph(nodes: Vec<NodeProto>, inits: Vec<TensorProto>) -> Graph {
        let model = ModelProto {
            ir_version: 8,
            opset_import: vec![onnx::OperatorSetIdProto {
                domain: String::new(),
                version: 18,
            }],
            graph: Some(GraphProto {
                node: nodes,
                initializer: inits,
                input: vec![ValueInfoProto {
                    name: "x".into(),
                    ..Default::default()
                }],
                output: vec![ValueInfoProto {
                    name: "y".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        Graph::from_bytes(
            &model.encode_to_vec(),
            std::path::Path::new("head.onnx"),
            &Device::Cpu,
        )
        .unwrap()
    }

    fn z(g: &Graph, a: &Tensor) -> Tensor {
        let plan = g.plan(&["y"]).unwrap();
        let out = g
            .run(&plan, HashMap::from([("x".to_string(), a.clone())]), &["y"])
            .unwrap();
        out["y"].clone()
    }

    /// The exactness identity: `<pullback(u), A> = <u, z(A) - z0>` for random `u` and `A`,
    /// and `z0 = z(0)`.
    fn check(g: &Graph, shape: &[usize]) -> Head {
        let head = Head::build(g, "x", "y", shape).unwrap();
        let n: usize = shape.iter().product();
        let zero = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let z0: Vec<f32> = z(g, &zero).flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(z0.len(), head.offset.len());
        for (a, b) in z0.iter().zip(&head.offset) {
            assert!(
                (a - b).abs() < 1e-5,
                "z0 {z0:?} != offset {:?}",
                head.offset
            );
        }
        let d = z0.len();
        let u = Tensor::from_vec(rand(2 * d, 7), (2, d), &Device::Cpu).unwrap();
        let w = head.pullback(&u).unwrap();
        assert_eq!(w.dims()[1..], shape[1..], "pullback shape");
        for seed in 0..3 {
            let a = Tensor::from_vec(rand(n, 100 + seed), shape, &Device::Cpu).unwrap();
            let za: Vec<f32> = z(g, &a).flatten_all().unwrap().to_vec1().unwrap();
            for row in 0..2 {
                let ur: Vec<f32> = u.get(row).unwrap().to_vec1().unwrap();
                let rhs: f32 = ur
                    .iter()
                    .zip(za.iter().zip(&z0))
                    .map(|(u, (a, b))| u * (a - b))
                    .sum();
                let lhs: f32 = (w.get(row).unwrap().flatten_all().unwrap()
                    * a.flatten_all().unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
                assert!(
                    (lhs - rhs).abs() < 1e-4 * (1.0 + rhs.abs()),
                    "{}: <Lᵀu, A> = {lhs}, <u, z(A) - z0> = {rhs}",
                    describe(&head)
                );
            }
        }
        head
    }

    #[test]
    fn spatial_reduce_mean_then_gemm_through_identity_weights() {
        // torchvision: x.mean([2, 3]) (axes as input, keepdims 0) -> fc, whose weight is
        // reached through an Identity node (dynamo) and whose bias is a Constant.
        for keep in [0, 1] {
            let nodes = vec![
                node(
                    "ReduceMean",
                    "gap",
                    &["x", "axes"],
                    &["m"],
                    vec![attr_int("keepdims", keep)],
                ),
                node("Flatten", "flat", &["m"], &["f"], vec![]),
                node("Identity", "w_id", &["w0"], &["w"], vec![]),
                constant("b", tensor("b", &[3], rand(3, 2))),
                node(
                    "Gemm",
                    "fc",
                    &["f", "w", "b"],
                    &["y"],
                    vec![attr_int("transB", 1)],
                ),
            ];
            let g = graph(
                nodes,
                vec![ints("axes", &[2, 3]), tensor("w0", &[3, 4], rand(12, 1))],
            );
            let h = check(&g, &[1, 4, 3, 5]);
            assert_eq!(describe(&h), "ReduceMean -> Flatten -> Gemm");
        }
        // Axes as an attribute (opset < 18), negative.
        let nodes = vec![
            node(
                "ReduceMean",
                "gap",
                &["x"],
                &["m"],
                vec![attr_ints("axes", &[-1, -2]), attr_int("keepdims", 0)],
            ),
            node("MatMul", "fc", &["m", "w"], &["y"], vec![]),
        ];
        let g = graph(nodes, vec![tensor("w", &[4, 2], rand(8, 3))]);
        check(&g, &[1, 4, 3, 5]);
    }

    #[test]
    fn transpose_before_flatten_and_computed_reshape_targets() {
        // Channels-last flatten: Transpose [0, 2, 3, 1], then Reshape to [N, -1] with the
        // target computed from Shape (legacy export), then a Linear with a broadcast Add.
        let nodes = vec![
            node(
                "Transpose",
                "nhwc",
                &["x"],
                &["t"],
                vec![attr_ints("perm", &[0, 2, 3, 1])],
            ),
            node("Shape", "shape", &["t"], &["s"], vec![]),
            node(
                "Gather",
                "n",
                &["s", "zero"],
                &["n0"],
                vec![attr_int("axis", 0)],
            ),
            node("Unsqueeze", "n1", &["n0", "axes0"], &["n1"], vec![]),
            node(
                "Concat",
                "target",
                &["n1", "minus1"],
                &["target"],
                vec![attr_int("axis", 0)],
            ),
            node("Reshape", "flat", &["t", "target"], &["f"], vec![]),
            node("MatMul", "fc", &["f", "w"], &["mm"], vec![]),
            node("Add", "bias", &["mm", "b"], &["y"], vec![]),
        ];
        let zero = TensorProto {
            name: "zero".into(),
            data_type: 7,
            int64_data: vec![0],
            ..Default::default()
        };
        let g = graph(
            nodes,
            vec![
                zero,
                ints("axes0", &[0]),
                ints("minus1", &[-1]),
                tensor("w", &[24, 3], rand(72, 4)),
                tensor("b", &[3], rand(3, 5)),
            ],
        );
        check(&g, &[1, 2, 3, 4]);
    }

    #[test]
    fn squeeze_unsqueeze_with_axes_inputs_scale_and_sub() {
        let nodes = vec![
            node("GlobalAveragePool", "gap", &["x"], &["p"], vec![]),
            node("Squeeze", "sq", &["p", "axes23"], &["s"], vec![]),
            node("Unsqueeze", "unsq", &["s", "axes2"], &["u"], vec![]),
            node("Mul", "scale", &["k", "u"], &["m"], vec![]),
            node("Sub", "flip", &["c", "m"], &["d"], vec![]),
            node("Div", "div", &["d", "two"], &["dd"], vec![]),
            node("Identity", "id", &["dd"], &["y"], vec![]),
        ];
        let g = graph(
            nodes,
            vec![
                ints("axes23", &[2, 3]),
                ints("axes2", &[2]),
                tensor("k", &[3, 1], rand(3, 8)),
                tensor("c", &[1], vec![0.25]),
                tensor("two", &[], vec![2.0]),
            ],
        );
        check(&g, &[1, 3, 2, 2]);
    }

    #[test]
    fn conv_heads_and_batch_norm() {
        // A GDConv (depthwise, full kernel), BatchNorm, 1x1 conv, flatten.
        let nodes = vec![
            node(
                "Conv",
                "gd",
                &["x", "wd"],
                &["a"],
                vec![attr_int("group", 3)],
            ),
            node(
                "BatchNormalization",
                "bn",
                &["a", "g", "be", "mu", "var"],
                &["b"],
                vec![],
            ),
            node("Conv", "pw", &["b", "wp", "bp"], &["c"], vec![]),
            node("Flatten", "flat", &["c"], &["y"], vec![]),
        ];
        let g = graph(
            nodes,
            vec![
                tensor("wd", &[3, 1, 2, 3], rand(18, 11)),
                tensor("g", &[3], rand(3, 12)),
                tensor("be", &[3], rand(3, 13)),
                tensor("mu", &[3], rand(3, 14)),
                tensor("var", &[3], vec![0.5, 1.0, 2.0]),
                tensor("wp", &[2, 3, 1, 1], rand(6, 15)),
                tensor("bp", &[2], rand(2, 16)),
            ],
        );
        check(&g, &[1, 3, 2, 3]);
    }

    #[test]
    fn dynamo_as_strided_gather_with_indices_computed_from_shapes() {
        // torch.export's `flatten` of a pooled map: Reshape to 1-D, Gather at indices built from
        // the batch size (Shape -> Squeeze -> Range -> Mul -> Add), Reshape back; here with
        // repeated and permuted indices so that the pullback must add up.
        let nodes = vec![
            node(
                "ReduceMean",
                "mean",
                &["x", "axes"],
                &["m"],
                vec![attr_int("keepdims", 1)],
            ),
            node("Reshape", "flat", &["m", "minus1"], &["f"], vec![]),
            node(
                "Shape",
                "shape",
                &["x"],
                &["s"],
                vec![attr_int("start", 0), attr_int("end", 1)],
            ),
            node("Squeeze", "batch", &["s"], &["b"], vec![]),
            node("Range", "rows", &["zero", "b", "one"], &["r"], vec![]),
            node("Mul", "stride", &["r", "c"], &["rc"], vec![]),
            node("Unsqueeze", "col", &["rc", "ax1"], &["rc1"], vec![]),
            node("Add", "index", &["rc1", "cols"], &["idx"], vec![]),
            node(
                "Gather",
                "as_strided",
                &["f", "idx"],
                &["g"],
                vec![attr_int("axis", 0)],
            ),
            node(
                "Concat",
                "target",
                &["s", "four"],
                &["t"],
                vec![attr_int("axis", 0)],
            ),
            node(
                "Reshape",
                "rows_back",
                &["g", "t"],
                &["gr"],
                vec![attr_int("allowzero", 1)],
            ),
            node(
                "Gemm",
                "fc",
                &["gr", "w", "bias"],
                &["y"],
                vec![attr_int("transB", 1)],
            ),
        ];
        let scalar = |name: &str, v: i64| TensorProto {
            name: name.into(),
            data_type: 7,
            int64_data: vec![v],
            ..Default::default()
        };
        let g = graph(
            nodes,
            vec![
                ints("axes", &[2, 3]),
                ints("minus1", &[-1]),
                scalar("zero", 0),
                scalar("one", 1),
                scalar("c", 3),
                ints("ax1", &[1]),
                ints("cols", &[2, 0, 2, 1]),
                ints("four", &[4]),
                tensor("w", &[2, 4], rand(8, 21)),
                tensor("bias", &[2], rand(2, 22)),
            ],
        );
        let h = check(&g, &[1, 3, 2, 2]);
        assert!(describe(&h).contains("Gather"), "{}", describe(&h));
    }

    #[test]
    fn a_non_affine_node_is_named() {
        let nodes = vec![
            node("GlobalAveragePool", "gap", &["x"], &["p"], vec![]),
            node("Relu", "act", &["p"], &["r"], vec![]),
            node("Flatten", "flat", &["r"], &["y"], vec![]),
        ];
        let g = graph(nodes, vec![]);
        let e = Head::build(&g, "x", "y", &[1, 2, 2, 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not affine at node `act` (Relu)"), "{e}");
        // An input that depends on the image's data, not only on its shape.
        let nodes = vec![
            node("GlobalAveragePool", "gap", &["x"], &["p"], vec![]),
            node("Flatten", "flat", &["p"], &["f"], vec![]),
            node("Mul", "square", &["f", "f"], &["y"], vec![]),
        ];
        let g = graph(nodes, vec![]);
        let e = Head::build(&g, "x", "y", &[1, 2, 2, 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("node `square` (Mul)"), "{e}");
    }
}
