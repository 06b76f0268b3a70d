//! Lowers an ONNX graph onto fam's execution engine (`fam_nn::engine`).
//!
//! At load, one probe pass at batch 1 (with the interpreter of [`crate::ops`]) gives every
//! value's shape and says which values depend on the input; nodes that depend only on
//! constants are folded into constants there. Then each node becomes an engine operator
//! where the engine has a kernel for it — convolutions of every shape, BatchNorm and other
//! per-channel affine maps, activations, element-wise binaries on feature maps
//! (squeeze-excite broadcasts included), pools, channel concatenation, `Identity` and
//! `Dropout` (dropped) — and an external operator, run by the interpreter on candle tensors,
//! everywhere else. The engine then folds, fuses and picks kernels (see its documentation).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_onnx::onnx::NodeProto;
use fam_core::candle::{DType, Device, Tensor};
use fam_core::{FamError, Result};
use fam_nn::engine::{self, Act, BinOp, Builder, ConvSpec, ExternalOp, Program, Split, ValueId};

use crate::graph::Graph;
use crate::ops;

/// Operators that run on engine kernels when their inputs allow it (constant weights,
/// 4-D feature maps; see [`lower`]); every other supported operator is interpreted.
pub const NATIVE: &[&str] = &[
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Clip",
    "Concat",
    "Conv",
    "Div",
    "Dropout",
    "Erf",
    "Gelu",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LayerNormalization",
    "LeakyRelu",
    "MatMul",
    "MaxPool",
    "Mul",
    "PRelu",
    "ReduceMean",
    "Relu",
    "Sigmoid",
    "Sub",
    "Tanh",
    "Transpose",
];

/// The supported operators as a Markdown list (docs/performance.md holds this text; a test
/// keeps the two equal): engine kernels in bold.
pub fn operators_markdown() -> String {
    let names: Vec<String> = ops::SUPPORTED
        .iter()
        .map(|op| {
            if NATIVE.contains(op) {
                format!("**{op}**")
            } else {
                op.to_string()
            }
        })
        .collect();
    let mut out = format!(
        "{} operators ({} on engine kernels, in bold; the rest interpreted on candle tensors):\n\n",
        ops::SUPPORTED.len(),
        NATIVE.len()
    );
    let mut line = String::new();
    for (i, n) in names.iter().enumerate() {
        let item = if i + 1 < names.len() {
            format!("{n}, ")
        } else {
            format!("{n}.")
        };
        if line.len() + item.len() > 92 {
            out.push_str(line.trim_end());
            out.push('\n');
            line.clear();
        }
        line.push_str(&item);
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

/// A node the engine has no kernel for, run by the interpreter.
struct OnnxOp {
    node: NodeProto,
    /// The node's dynamic inputs, in the order the engine passes them.
    dynamic: Vec<String>,
    constants: Arc<HashMap<String, Tensor>>,
    declared_batch: Option<i64>,
}

impl std::fmt::Debug for OnnxOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} `{}`", self.node.op_type, self.node.name)
    }
}

impl ExternalOp for OnnxOp {
    fn kind(&self) -> String {
        self.node.op_type.clone()
    }
    fn eval(&self, inputs: &[Tensor], batch: usize) -> Result<Vec<Tensor>> {
        let get =
            |name: &str| -> Result<Tensor> {
                match self.dynamic.iter().position(|d| d == name) {
                    Some(i) => Ok(inputs[i].clone()),
                    None => self.constants.get(name).cloned().ok_or_else(|| {
                        FamError::invalid(format!("input `{name}` is not available"))
                    }),
                }
            };
        eval_node(
            &self.node,
            batch,
            self.declared_batch,
            &self.constants,
            &get,
        )
    }
}

/// Evaluates one node with the interpreter ([`ops::eval_guarded`]).
pub fn eval_node(
    node: &NodeProto,
    batch: usize,
    declared_batch: Option<i64>,
    constants: &HashMap<String, Tensor>,
    get: &dyn Fn(&str) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let ctx = ops::Ctx {
        node,
        batch,
        declared_batch,
        constants,
    };
    ops::eval_guarded(&ctx, get)
}

/// What the probe pass learned.
struct Probe {
    /// The batch the probe ran at (2, or 1 where the model cannot run 2 images at once).
    batch: usize,
    shapes: HashMap<String, Vec<usize>>,
    dtypes: HashMap<String, DType>,
    /// Values that depend on the graph input.
    dynamic: HashSet<String>,
    /// Initializers, `Constant` outputs and folded nodes.
    constants: HashMap<String, Tensor>,
}

/// Probes at batch 2, so that values whose first axis is not the batch show; a model that
/// cannot run two images at once is probed at batch 1 (and then always runs one at a time).
fn probe(graph: &Graph, plan: &[usize], input: &str, input_shape: &[usize]) -> Result<Probe> {
    let mut two = input_shape.to_vec();
    if let Some(b) = two.first_mut() {
        *b = 2;
    }
    match probe_at(graph, plan, input, &two) {
        Ok(p) => Ok(p),
        Err(e) => {
            let mut one = input_shape.to_vec();
            if let Some(b) = one.first_mut() {
                *b = 1;
            }
            let p = probe_at(graph, plan, input, &one)?;
            tracing::info!(model = %graph.path.display(), reason = %e, "the model cannot run two images at once: images will run one at a time");
            Ok(p)
        }
    }
}

fn probe_at(graph: &Graph, plan: &[usize], input: &str, input_shape: &[usize]) -> Result<Probe> {
    let batch = input_shape.first().copied().unwrap_or(1);
    let mut constants = graph.constants.clone();
    let mut values: HashMap<String, Tensor> = HashMap::new();
    let mut shapes = HashMap::new();
    let mut dtypes = HashMap::new();
    let mut dynamic = HashSet::from([input.to_string()]);
    let x = Tensor::zeros(input_shape, DType::F32, &Device::Cpu)?;
    shapes.insert(input.to_string(), x.dims().to_vec());
    dtypes.insert(input.to_string(), DType::F32);
    values.insert(input.to_string(), x);
    let mut last_use: HashMap<&str, usize> = HashMap::new();
    for (step, &i) in plan.iter().enumerate() {
        for inp in &graph.nodes[i].input {
            last_use.insert(inp.as_str(), step);
        }
    }
    for (step, &i) in plan.iter().enumerate() {
        let node = &graph.nodes[i];
        let is_dynamic = node.input.iter().any(|n| dynamic.contains(n));
        let outs = {
            let get = |name: &str| -> Result<Tensor> {
                values
                    .get(name)
                    .or_else(|| constants.get(name))
                    .cloned()
                    .ok_or_else(|| FamError::invalid(format!("input `{name}` is not available")))
            };
            eval_node(node, batch, graph.declared_batch, &constants, &get).map_err(|e| {
                FamError::weights(
                    &graph.path,
                    format!("node `{}` ({}): {e}", node.name, node.op_type),
                )
            })?
        };
        for (name, v) in node.output.iter().zip(outs) {
            shapes.insert(name.clone(), v.dims().to_vec());
            dtypes.insert(name.clone(), v.dtype());
            if is_dynamic {
                dynamic.insert(name.clone());
                values.insert(name.clone(), v);
            } else {
                constants.insert(name.clone(), v);
            }
        }
        for inp in &node.input {
            if last_use.get(inp.as_str()) == Some(&step) {
                values.remove(inp);
            }
        }
    }
    Ok(Probe {
        batch,
        shapes,
        dtypes,
        dynamic,
        constants,
    })
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a candle_onnx::onnx::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}
fn int(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map(|a| a.i).unwrap_or(default)
}
fn ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}
fn float(node: &NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name).map(|a| a.f).unwrap_or(default)
}
fn string(node: &NodeProto, name: &str) -> String {
    attr(node, name)
        .map(|a| String::from_utf8_lossy(&a.s).into_owned())
        .unwrap_or_else(|| "NOTSET".into())
}

/// Two positive values (one per spatial axis) from an attribute.
fn pair(v: Option<Vec<i64>>, default: usize) -> Option<(usize, usize)> {
    match v.as_deref() {
        None => Some((default, default)),
        Some([a, b]) if *a >= 1 && *b >= 1 && *a <= ops::MAX_ATTR && *b <= ops::MAX_ATTR => {
            Some((*a as usize, *b as usize))
        }
        _ => None,
    }
}

/// top, left, bottom, right padding per `auto_pad` / `pads`.
fn pads(
    node: &NodeProto,
    (h, w): (usize, usize),
    (kh, kw): (usize, usize),
    (sh, sw): (usize, usize),
    (dh, dw): (usize, usize),
) -> Option<[usize; 4]> {
    match string(node, "auto_pad").as_str() {
        "NOTSET" | "" => match ints(node, "pads").as_deref() {
            None => Some([0; 4]),
            Some([t, l, b, r])
                if [t, l, b, r]
                    .iter()
                    .all(|p| (0..=ops::MAX_ATTR).contains(*p)) =>
            {
                Some([*t as usize, *l as usize, *b as usize, *r as usize])
            }
            _ => None,
        },
        "VALID" => Some([0; 4]),
        mode @ ("SAME_UPPER" | "SAME_LOWER") => {
            let need = |len: usize, k: usize, s: usize, d: usize| {
                let out = len.div_ceil(s);
                ((out - 1) * s + (k - 1) * d + 1).saturating_sub(len)
            };
            let (nh, nw) = (need(h, kh, sh, dh), need(w, kw, sw, dw));
            let split = |n: usize| {
                if mode == "SAME_UPPER" {
                    (n / 2, n - n / 2)
                } else {
                    (n - n / 2, n / 2)
                }
            };
            let ((t, b), (l, r)) = (split(nh), split(nw));
            Some([t, l, b, r])
        }
        _ => None,
    }
}

fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The per-channel values of a constant that broadcasts against `[n, c, h, w]` along the
/// channel axis only (or is a scalar), as `c` values.
fn channel_vector(t: &Tensor, c: usize) -> Option<Vec<f32>> {
    let dims = t.dims();
    let n = t.elem_count();
    let ok = if n == 1 {
        dims.len() <= 4
    } else {
        n == c
            && match dims {
                [d] => *d == c && c == 1,
                [a, b, e] => *a == c && *b == 1 && *e == 1,
                [o, a, b, e] => *o == 1 && *a == c && *b == 1 && *e == 1,
                _ => false,
            }
    };
    if !ok {
        return None;
    }
    let v = f32s(t).ok()?;
    Some(if n == 1 { vec![v[0]; c] } else { v })
}

/// The values of a constant that broadcasts against `[n, h, w, c]` along the last axis only
/// (or is a scalar), as `c` values.
fn last_axis_vector(t: &Tensor, c: usize) -> Option<Vec<f32>> {
    let dims = t.dims();
    let n = t.elem_count();
    let ok = n == 1 && dims.len() <= 4 || (n == c && dims.len() <= 4 && dims.last() == Some(&c));
    if !ok {
        return None;
    }
    let v = f32s(t).ok()?;
    Some(if n == 1 { vec![v[0]; c] } else { v })
}

/// The activation a node computes, when it is one the engine fuses.
fn activation(node: &NodeProto, constants: &HashMap<String, Tensor>) -> Option<Act> {
    Some(match node.op_type.as_str() {
        "Relu" => Act::Relu,
        "Sigmoid" => Act::Sigmoid,
        "Tanh" => Act::Tanh,
        "HardSwish" => Act::HardSwish,
        "Erf" => Act::Erf,
        "LeakyRelu" => Act::LeakyRelu(float(node, "alpha", 0.01)),
        "HardSigmoid" => Act::HardSigmoid(float(node, "alpha", 0.2), float(node, "beta", 0.5)),
        "Gelu" if string(node, "approximate") != "tanh" => Act::Gelu,
        "Clip" => {
            let bound = |i: usize, name: &str, default: f32| -> Option<f32> {
                match node.input.get(i).filter(|s| !s.is_empty()) {
                    Some(n) => constants
                        .get(n)
                        .and_then(|t| f32s(t).ok())
                        .and_then(|v| v.first().copied()),
                    None => Some(attr(node, name).map(|a| a.f).unwrap_or(default)),
                }
            };
            Act::Clip(
                bound(1, "min", f32::NEG_INFINITY)?,
                bound(2, "max", f32::INFINITY)?,
            )
        }
        _ => return None,
    })
}

/// The engine program for `targets`, and how its nodes were lowered.
pub struct Lowered {
    pub program: Program,
    /// ONNX nodes run by engine kernels / by the interpreter.
    pub native: usize,
    pub external: usize,
}

/// Lowers the nodes in `plan` (which compute `targets` from `input`), probing with one
/// input of `input_shape` (batch 1).
pub fn lower(
    graph: &Graph,
    plan: &[usize],
    input: &str,
    targets: &[&str],
    input_shape: &[usize],
) -> Result<Lowered> {
    lower_with(graph, plan, input, targets, input_shape, true)
}

/// [`lower`] without the engine's rewrites (every node its own step), for comparisons.
pub fn lower_unoptimized(
    graph: &Graph,
    plan: &[usize],
    input: &str,
    targets: &[&str],
    input_shape: &[usize],
) -> Result<Lowered> {
    lower_with(graph, plan, input, targets, input_shape, false)
}

fn lower_with(
    graph: &Graph,
    plan: &[usize],
    input: &str,
    targets: &[&str],
    input_shape: &[usize],
    rewrites: bool,
) -> Result<Lowered> {
    let p = probe(graph, plan, input, input_shape)?;
    let mut b = Builder::new();
    b.split(split_mode(graph, plan, &p, targets));
    let constants = Arc::new(p.constants);
    let mut ids: HashMap<String, ValueId> = HashMap::new();
    // Values computed by engine kernels, and whether their logical layout is channels-last
    // (`[n, h, w, c]`, after a Transpose that moved no data) rather than `[n, c, h, w]`.
    let mut layout: HashMap<String, bool> = HashMap::new();
    ids.insert(input.to_string(), b.input());
    let (mut n_native, mut n_external) = (0, 0);
    let err = |node: &NodeProto, m: String| {
        FamError::weights(
            &graph.path,
            format!("node `{}` ({}): {m}", node.name, node.op_type),
        )
    };
    for &i in plan {
        let node = &graph.nodes[i];
        if !node.input.iter().any(|n| p.dynamic.contains(n)) {
            continue; // folded into a constant by the probe
        }
        let dyn_inputs: Vec<&String> = node
            .input
            .iter()
            .filter(|n| !n.is_empty() && p.dynamic.contains(*n))
            .collect();
        let shape = |n: &str| p.shapes.get(n).cloned().unwrap_or_default();
        let is_f32_4d = |n: &str| shape(n).len() == 4 && p.dtypes.get(n) == Some(&DType::F32);
        let konst = |k: usize| -> Option<&Tensor> {
            node.input
                .get(k)
                .filter(|n| !n.is_empty() && !p.dynamic.contains(*n))
                .and_then(|n| constants.get(n))
        };
        let x0 = node.input.first().cloned().unwrap_or_default();
        let out0 = node.output.first().cloned().unwrap_or_default();
        // A value kernels may read as `[n, c, h, w]`: native channels-first, or a tensor.
        let cf = |n: &str| layout.get(n) != Some(&true) && is_f32_4d(n);
        let single_output = node.output.iter().skip(1).all(|o| o.is_empty());
        let mut out_cl = false;
        let lowered: Option<ValueId> = match node.op_type.as_str() {
            "Identity" | "Dropout" if dyn_inputs.len() == 1 && *dyn_inputs[0] == x0 => {
                // The value itself: no step at all.
                ids.insert(out0.clone(), ids[&x0]);
                if let Some(&l) = layout.get(&x0) {
                    layout.insert(out0.clone(), l);
                }
                n_native += 1;
                continue;
            }
            "Transpose"
                if dyn_inputs.len() == 1 && layout.contains_key(&x0) && shape(&x0).len() == 4 =>
            {
                let perm = ints(node, "perm").unwrap_or_default();
                match (layout[&x0], perm.as_slice()) {
                    (false, [0, 2, 3, 1]) => {
                        out_cl = true;
                        Some(b.alias(&node.name, ids[&x0], true))
                    }
                    (true, [0, 3, 1, 2]) => Some(b.alias(&node.name, ids[&x0], false)),
                    _ => None,
                }
            }
            "LayerNormalization"
                if dyn_inputs.len() == 1 && layout.get(&x0) == Some(&true) && single_output =>
            {
                let s = shape(&x0);
                let axis = int(node, "axis", -1).rem_euclid(s.len().max(1) as i64);
                let c = s[3];
                let scale = konst(1).and_then(|t| f32s(t).ok()).filter(|v| v.len() == c);
                let shift = match node.input.get(2).filter(|n| !n.is_empty()) {
                    None => Some(vec![0f32; c]),
                    Some(_) => konst(2).and_then(|t| f32s(t).ok()).filter(|v| v.len() == c),
                };
                match (axis, scale, shift) {
                    (3, Some(scale), Some(shift)) => {
                        out_cl = true;
                        Some(b.layer_norm(
                            &node.name,
                            ids[&x0],
                            scale,
                            shift,
                            float(node, "epsilon", 1e-5),
                        ))
                    }
                    _ => None,
                }
            }
            "MatMul"
                if dyn_inputs.len() == 1
                    && *dyn_inputs[0] == x0
                    && layout.get(&x0) == Some(&true) =>
            {
                // [n, h, w, c] · [c, k]: a 1x1 convolution on the channels.
                let c = shape(&x0)[3];
                match konst(1).map(|t| (t.dims().to_vec(), t)) {
                    Some((d, t)) if d.len() == 2 && d[0] == c => {
                        let k = d[1];
                        let wt = f32s(t)?;
                        let mut weight = vec![0f32; c * k];
                        for ci in 0..c {
                            for ko in 0..k {
                                weight[ko * c + ci] = wt[ci * k + ko];
                            }
                        }
                        let spec = ConvSpec::new(weight, (k, c, 1, 1), vec![0f32; k]);
                        out_cl = true;
                        Some(b.conv(&node.name, ids[&x0], spec)?)
                    }
                    _ => None,
                }
            }
            "Conv" if dyn_inputs.len() == 1 && cf(&x0) => {
                lower_conv(node, &mut b, ids[&x0], &shape(&x0), konst(1), konst(2))
                    .map_err(|m| err(node, m))?
            }
            "BatchNormalization" if dyn_inputs.len() == 1 && cf(&x0) => {
                match (konst(1), konst(2), konst(3), konst(4)) {
                    (Some(s), Some(bias), Some(m), Some(v)) => {
                        let eps = float(node, "epsilon", 1e-5);
                        let (s, bias, m, v) = (f32s(s)?, f32s(bias)?, f32s(m)?, f32s(v)?);
                        let c = shape(&x0)[1];
                        if [s.len(), bias.len(), m.len(), v.len()]
                            .iter()
                            .any(|&l| l != c)
                        {
                            return Err(err(node, format!("parameters do not have {c} channels")));
                        }
                        let (scale, shift) = engine::batch_norm_affine(&s, &bias, &m, &v, eps);
                        Some(b.affine(&node.name, ids[&x0], scale, shift))
                    }
                    _ => None,
                }
            }
            "PRelu" if dyn_inputs.len() == 1 && cf(&x0) => konst(1)
                .and_then(|t| channel_vector(t, shape(&x0)[1]))
                .map(|slope| b.prelu(&node.name, ids[&x0], slope)),
            "Add" | "Sub" | "Mul" | "Div" if dyn_inputs.len() == 2 => {
                let (a, c) = (&node.input[0], &node.input[1]);
                let (sa, sc) = (shape(a), shape(c));
                let op = binop(&node.op_type);
                match (layout.get(a), layout.get(c)) {
                    (Some(&la), Some(&lc)) if la == lc && sa.len() == 4 && sc.len() == 4 => {
                        let same = sa == sc;
                        let vec_of = |s: &[usize], t: &[usize]| {
                            s[0] == t[0] && s[1] == t[1] && s[2] * s[3] == 1
                        };
                        out_cl = la;
                        if same || (!la && (vec_of(&sc, &sa) || vec_of(&sa, &sc))) {
                            Some(b.binary(&node.name, op, ids[a], ids[c], !same))
                        } else {
                            None
                        }
                    }
                    _ => None,
                }
            }
            "MaxPool" | "AveragePool" if dyn_inputs.len() == 1 && cf(&x0) => {
                let s = shape(&x0);
                lower_pool(node, (s[2], s[3])).map(|pool| b.pool(&node.name, ids[&x0], pool))
            }
            "GlobalAveragePool" | "GlobalMaxPool" if cf(&x0) => {
                Some(b.global_pool(&node.name, ids[&x0], node.op_type == "GlobalMaxPool"))
            }
            "ReduceMean" if cf(&x0) && dyn_inputs.len() == 1 && int(node, "keepdims", 1) != 0 => {
                let axes = match konst(1) {
                    Some(t) => t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>().ok(),
                    None => ints(node, "axes"),
                };
                let mut axes: Vec<i64> = axes
                    .unwrap_or_default()
                    .iter()
                    .map(|a| a.rem_euclid(4))
                    .collect();
                axes.sort_unstable();
                (axes == [2, 3]).then(|| b.global_pool(&node.name, ids[&x0], false))
            }
            "Concat"
                if dyn_inputs.len() == node.input.len()
                    && node.input.iter().all(|n| cf(n))
                    && int(node, "axis", 0).rem_euclid(4) == 1 =>
            {
                let xs = node.input.iter().map(|n| ids[n]).collect();
                Some(b.concat(&node.name, xs))
            }
            _ if dyn_inputs.len() == 1 && layout.contains_key(dyn_inputs[0]) => {
                let x = dyn_inputs[0].clone();
                let channels_last = layout[&x];
                out_cl = channels_last;
                match activation(node, &constants) {
                    Some(act) if x == x0 => Some(b.act(&node.name, ids[&x], act)),
                    Some(_) => None,
                    None => lower_binary_const(
                        node,
                        &mut b,
                        &ids,
                        &x,
                        &shape(&x),
                        channels_last,
                        &konst,
                    ),
                }
            }
            _ => None,
        };
        match lowered {
            Some(v) => {
                b.set_channels_last(v, out_cl);
                ids.insert(out0.clone(), v);
                layout.insert(out0, out_cl);
                n_native += 1;
            }
            None => {
                let op = OnnxOp {
                    node: node.clone(),
                    dynamic: dyn_inputs.iter().map(|s| s.to_string()).collect(),
                    constants: constants.clone(),
                    declared_batch: graph.declared_batch,
                };
                let ins = dyn_inputs.iter().map(|n| ids[*n]).collect();
                let outs = b.external(&node.name, Arc::new(op), ins, node.output.len());
                for (name, v) in node.output.iter().zip(outs) {
                    ids.insert(name.clone(), v);
                }
                n_external += 1;
            }
        }
    }
    let outs = targets
        .iter()
        .map(|t| {
            ids.get(*t).copied().ok_or_else(|| {
                FamError::weights(
                    &graph.path,
                    format!("value `{t}` does not depend on the input"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Lowered {
        program: if rewrites {
            b.build(&outs)?
        } else {
            b.build_unoptimized(&outs)?
        },
        native: n_native,
        external: n_external,
    })
}

/// Whether the images of a batch are independent: every floating-point value that depends
/// on the input keeps the batch as its first axis, and no operator normalizes across it.
fn split_mode(graph: &Graph, plan: &[usize], p: &Probe, targets: &[&str]) -> Split {
    if p.batch == 1 {
        return Split::Always;
    }
    let float = |n: &str| {
        matches!(
            p.dtypes.get(n),
            Some(DType::F32 | DType::F64 | DType::F16 | DType::BF16)
        )
    };
    for &i in plan {
        let node = &graph.nodes[i];
        let axis0 = matches!(
            node.op_type.as_str(),
            "Softmax"
                | "LogSoftmax"
                | "Hardmax"
                | "CumSum"
                | "LayerNormalization"
                | "LpNormalization"
        ) && int(node, "axis", 1)
            .rem_euclid(p.shapes.get(&node.input[0]).map_or(1, |s| s.len().max(1)) as i64)
            == 0;
        if axis0 {
            return Split::Never;
        }
        for o in &node.output {
            if p.dynamic.contains(o)
                && float(o)
                && p.shapes.get(o).and_then(|s| s.first()) != Some(&p.batch)
            {
                return Split::Never;
            }
        }
    }
    if targets
        .iter()
        .any(|t| p.shapes.get(*t).and_then(|s| s.first()) != Some(&p.batch))
    {
        return Split::Never;
    }
    Split::Allowed
}

fn binop(op: &str) -> BinOp {
    match op {
        "Add" => BinOp::Add,
        "Sub" => BinOp::Sub,
        "Mul" => BinOp::Mul,
        _ => BinOp::Div,
    }
}

/// `x ∘ c` or `c ∘ x` with a per-channel (or scalar) constant `c`: an affine map.
fn lower_binary_const<'a>(
    node: &NodeProto,
    b: &mut Builder,
    ids: &HashMap<String, ValueId>,
    x: &str,
    xs: &[usize],
    channels_last: bool,
    konst: &dyn Fn(usize) -> Option<&'a Tensor>,
) -> Option<ValueId> {
    if xs.len() != 4 || !matches!(node.op_type.as_str(), "Add" | "Sub" | "Mul" | "Div") {
        return None;
    }
    let first = node.input.first().map(String::as_str) == Some(x);
    let c = konst(if first { 1 } else { 0 })?;
    let v = if channels_last {
        last_axis_vector(c, xs[3])?
    } else {
        channel_vector(c, xs[1])?
    };
    let ones = vec![1f32; v.len()];
    let zeros = vec![0f32; v.len()];
    let (scale, shift) = match (node.op_type.as_str(), first) {
        ("Add", _) => (ones, v),
        ("Mul", _) => (v, zeros),
        ("Sub", true) => (ones, v.iter().map(|c| -c).collect()),
        ("Sub", false) => (vec![-1f32; v.len()], v),
        ("Div", true) => (v.iter().map(|c| 1.0 / c).collect(), zeros),
        _ => return None,
    };
    Some(b.affine(&node.name, ids[x], scale, shift))
}

fn lower_conv(
    node: &NodeProto,
    b: &mut Builder,
    x: ValueId,
    xs: &[usize],
    w: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> std::result::Result<Option<ValueId>, String> {
    let Some(w) = w else { return Ok(None) };
    let Ok((o, cg, kh, kw)) = w.dims4() else {
        return Ok(None);
    };
    if node.input.get(2).is_some_and(|n| !n.is_empty()) && bias.is_none() {
        return Ok(None); // a bias computed at run time
    }
    let groups = int(node, "group", 1);
    if groups < 1 || groups as usize * cg != xs[1] || o % groups as usize != 0 {
        return Err(format!(
            "kernel {:?} with group {groups} does not fit {} input channels",
            w.dims(),
            xs[1]
        ));
    }
    let (Some(stride), Some(dilation)) = (
        pair(ints(node, "strides"), 1),
        pair(ints(node, "dilations"), 1),
    ) else {
        return Ok(None);
    };
    let Some(pads) = pads(node, (xs[2], xs[3]), (kh, kw), stride, dilation) else {
        return Ok(None);
    };
    if xs[2] + pads[0] + pads[2] < dilation.0 * (kh - 1) + 1
        || xs[3] + pads[1] + pads[3] < dilation.1 * (kw - 1) + 1
    {
        return Err(format!(
            "kernel {:?} (dilation {dilation:?}) is larger than the padded input {xs:?}",
            w.dims()
        ));
    }
    let weight = f32s(w).map_err(|e| e.to_string())?;
    let bias = match bias {
        Some(t) => f32s(t).map_err(|e| e.to_string())?,
        None => vec![0f32; o],
    };
    if bias.len() != o {
        return Err(format!("{} biases for {o} output channels", bias.len()));
    }
    let spec = ConvSpec {
        groups: groups as usize,
        stride,
        dilation,
        pads,
        ..ConvSpec::new(weight, (o, cg, kh, kw), bias)
    };
    b.conv(&node.name, x, spec)
        .map(Some)
        .map_err(|e| e.to_string())
}

fn lower_pool(node: &NodeProto, hw: (usize, usize)) -> Option<engine::kernels::Pool> {
    let (kh, kw) = pair(Some(ints(node, "kernel_shape")?), 1)?;
    let stride = pair(ints(node, "strides"), 1)?;
    if pair(ints(node, "dilations"), 1)? != (1, 1) {
        return None;
    }
    let pads = pads(node, hw, (kh, kw), stride, (1, 1))?;
    Some(engine::kernels::Pool {
        max: node.op_type == "MaxPool",
        kh,
        kw,
        stride,
        pads,
        ceil: int(node, "ceil_mode", 0) != 0,
        count_include_pad: int(node, "count_include_pad", 0) != 0,
    })
}

/// Where a lowered program's messages point.
pub fn describe(l: &Lowered, path: &Path) -> String {
    let (steps, native) = l.program.counts();
    format!(
        "{}: {} nodes on engine kernels, {} interpreted; {steps} steps after rewrites ({native} native)",
        PathBuf::from(path).display(),
        l.native,
        l.external
    )
}
