//! The head between the feature layer and the embedding output, when it is affine
//! (`z = L(A) + z0`): face and re-id models often end in a depthwise "GDConv", a 1x1 conv
//! or an FC layer, a BatchNorm, a flatten. FAM then pulls embedding-space weights back
//! through `Lᵀ` to spatial weights on the feature maps (DESIGN.md section 1.3), so the
//! decomposition of the model's real score is exact.

use candle_onnx::onnx::NodeProto;
use fam_core::candle::{DType, Tensor};
use fam_core::{FamError, Result};

use crate::graph::Graph;
use crate::ops;

/// One affine step, with the shape of its (flowing) input.
#[derive(Debug, Clone)]
enum Step {
    /// Conv whose kernel covers the whole input (output 1x1), no padding, stride 1.
    FullConv {
        w: Tensor,
        group: usize,
    },
    /// 1x1 convolution, group 1, stride 1, no padding.
    Pointwise {
        w: Tensor,
    },
    /// Per-channel scale (BatchNormalization, Mul by a channel vector).
    Scale {
        k: Tensor,
    },
    /// Multiplication by a constant of the input's broadcast shape.
    Mul {
        c: Tensor,
    },
    GlobalAveragePool,
    /// `x @ B` (MatMul with a constant B, or Gemm with the flowing input as A).
    MatMul {
        b: Tensor,
        alpha: f64,
        trans_a: bool,
    },
    /// Sub with the flowing input second: `c - x`.
    Negate,
    /// Shape-only steps (Reshape, Flatten, Squeeze, Identity, ...) and constant additions.
    Reshape,
}

/// An affine head, ready to pull weights back.
#[derive(Debug, Clone)]
pub struct Head {
    steps: Vec<(Step, Vec<usize>)>,
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

impl Head {
    /// Follows the nodes from `layer` to `output`; every node must take the flowing value
    /// and constants only, and be affine in the flowing value. `layer_shape` is one image's
    /// feature map shape `[1, C, h, w]`.
    pub fn build(graph: &Graph, layer: &str, output: &str, layer_shape: &[usize]) -> Result<Self> {
        let plan = graph.plan(&[output])?;
        let mut current = layer.to_string();
        let mut value = Tensor::zeros(layer_shape, DType::F32, &graph.device)?;
        let mut steps = Vec::new();
        let mut names = Vec::new();
        let consts = &graph.constants;
        let mut guard = 0;
        while current != output {
            guard += 1;
            if guard > 10_000 {
                return Err(FamError::invalid("head too long"));
            }
            let consumers: Vec<&NodeProto> = plan
                .iter()
                .map(|&i| &graph.nodes[i])
                .filter(|n| n.input.contains(&current))
                .collect();
            let node = match consumers.as_slice() {
                [n] => *n,
                [] => {
                    return Err(FamError::invalid(format!(
                        "output `{output}` does not depend on layer `{layer}` through a chain of nodes"
                    )))
                }
                many => {
                    return Err(FamError::invalid(format!(
                        "layer `{layer}`: value `{current}` feeds {} nodes on the way to `{output}`; only a chain of affine nodes is supported",
                        many.len()
                    )))
                }
            };
            let pos = node.input.iter().position(|x| *x == current).unwrap_or(0);
            for (i, inp) in node.input.iter().enumerate() {
                if i != pos && !inp.is_empty() && !consts.contains_key(inp) {
                    return Err(not_linear(
                        node,
                        &format!("input `{inp}` is not a constant"),
                    ));
                }
            }
            let c = |i: usize| -> Result<Tensor> {
                node.input
                    .get(i)
                    .and_then(|n| consts.get(n))
                    .cloned()
                    .ok_or_else(|| not_linear(node, &format!("input {i} missing")))
            };
            let attr = |n: &str| node.attribute.iter().find(|a| a.name == n);
            let int = |n: &str, d: i64| attr(n).map(|a| a.i).unwrap_or(d);
            let in_shape = value.dims().to_vec();
            let step = match node.op_type.as_str() {
                "Conv" => {
                    let w = c(1)?;
                    let (_, _, kh, kw) = w.dims4()?;
                    let pads = attr("pads").map(|a| a.ints.clone()).unwrap_or_default();
                    let strides = attr("strides").map(|a| a.ints.clone()).unwrap_or_default();
                    let auto = attr("auto_pad")
                        .map(|a| String::from_utf8_lossy(&a.s).into_owned())
                        .unwrap_or_default();
                    if pads.iter().any(|p| *p != 0)
                        || strides.iter().any(|s| *s != 1)
                        || (!auto.is_empty() && auto != "NOTSET" && auto != "VALID")
                    {
                        return Err(not_linear(
                            node,
                            "only unpadded, stride-1 convolutions are supported in a head",
                        ));
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
                "BatchNormalization" => {
                    let (scale, var) = (c(1)?, c(4)?);
                    let eps = attr("epsilon").map(|a| a.f).unwrap_or(1e-5) as f64;
                    Step::Scale {
                        k: (scale / (var + eps)?.sqrt()?)?,
                    }
                }
                "GlobalAveragePool" => Step::GlobalAveragePool,
                "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity" | "Dropout" => {
                    Step::Reshape
                }
                "Add" => Step::Reshape,
                "Sub" if pos == 0 => Step::Reshape,
                "Sub" => Step::Negate,
                "Mul" => Step::Mul { c: c(1 - pos)? },
                "MatMul" if pos == 0 => Step::MatMul {
                    b: c(1)?,
                    alpha: 1.0,
                    trans_a: false,
                },
                "Gemm" if pos == 0 => {
                    let b = c(1)?;
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
                _ => return Err(not_linear(node, "not an affine operator")),
            };
            // Evaluate on the running value (zeros at the start) to learn shapes and z0.
            let ctx = ops::Ctx {
                node,
                batch: 1,
                declared_batch: graph.declared_batch,
                constants: consts,
            };
            let cur = current.clone();
            let v = value.clone();
            let get = |name: &str| -> Result<Tensor> {
                if name == cur {
                    Ok(v.clone())
                } else {
                    consts
                        .get(name)
                        .cloned()
                        .ok_or_else(|| FamError::invalid(format!("`{name}` missing")))
                }
            };
            value = ops::eval(&ctx, &get)?.remove(0);
            let step = match step {
                Step::Mul { c }
                    if c.elem_count() > 1
                        && c.rank() >= 1
                        && c.dims().iter().filter(|&&d| d > 1).count() == 1
                        && in_shape.len() == 4
                        && c.elem_count() == in_shape[1] =>
                {
                    Step::Scale {
                        k: c.flatten_all()?,
                    }
                }
                s => s,
            };
            steps.push((step, in_shape));
            names.push(node.op_type.clone());
            current = match node.output.first() {
                Some(o) => o.clone(),
                None => return Err(not_linear(node, "it has no output")),
            };
        }
        let offset: Vec<f32> = value.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        Ok(Self {
            steps,
            offset,
            ops: names,
        })
    }

    /// `Lᵀ u` for embedding-space weights `u` `[P, D]`: spatial weights `[P, C, h, w]`.
    pub fn pullback(&self, u: &Tensor) -> Result<Tensor> {
        let p = u.dims()[0];
        let mut g = u.clone();
        for (step, in_shape) in self.steps.iter().rev() {
            let mut shape = in_shape.clone();
            shape[0] = p;
            g = match step {
                Step::Reshape => g.reshape(shape.as_slice())?,
                Step::Negate => g.neg()?.reshape(shape.as_slice())?,
                Step::Scale { k } => {
                    let c = k.elem_count();
                    let bshape: Vec<usize> = (0..shape.len())
                        .map(|i| if i == 1 { c } else { 1 })
                        .collect();
                    g.reshape(g.dims())?
                        .broadcast_mul(&k.reshape(bshape.as_slice())?)?
                        .reshape(shape.as_slice())?
                }
                Step::Mul { c } => g.broadcast_mul(c)?.reshape(shape.as_slice())?,
                Step::GlobalAveragePool => {
                    let (h, w) = (shape[2], shape[3]);
                    (g.reshape((p, shape[1], 1, 1))?
                        .broadcast_as(shape.as_slice())?
                        / (h * w) as f64)?
                        .contiguous()?
                }
                Step::FullConv { w, group } => {
                    // y[o] = sum_{c,ij} W[o, c, i, j] x[c, i, j] (per group)
                    let (o, cg, kh, kw) = w.dims4()?;
                    let g2 = g.reshape((p, o))?;
                    if *group == 1 {
                        g2.matmul(&w.reshape((o, cg * kh * kw))?)?
                            .reshape((p, cg, kh, kw))?
                    } else if *group == o && cg == 1 {
                        g2.reshape((p, o, 1, 1))?
                            .broadcast_mul(&w.reshape((1, o, kh, kw))?)?
                    } else {
                        return Err(FamError::invalid(
                            "grouped head convolution: only group 1 or depthwise",
                        ));
                    }
                }
                Step::Pointwise { w } => {
                    let (o, c, _, _) = w.dims4()?;
                    let (h, wd) = (shape[2], shape[3]);
                    let g2 = g.reshape((p, o, h * wd))?;
                    w.reshape((o, c))?
                        .t()?
                        .contiguous()?
                        .broadcast_matmul(&g2)?
                        .reshape((p, c, h, wd))?
                }
                Step::MatMul { b, alpha, trans_a } => {
                    let gx = (g.broadcast_matmul(&b.t()?.contiguous()?)? * *alpha)?;
                    let gx = if *trans_a { gx.t()?.contiguous()? } else { gx };
                    gx.reshape(shape.as_slice())?
                }
            };
        }
        Ok(g)
    }
}

/// Names of the head's steps, for logs.
pub fn describe(h: &Head) -> String {
    h.ops.join(" -> ")
}
