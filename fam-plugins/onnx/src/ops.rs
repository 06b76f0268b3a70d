//! ONNX operators used by CNN exports, on candle tensors (NCHW, f32 data, i64 shapes and
//! indices, u8 booleans). Each follows the ONNX specification, including the forms that
//! changed between opsets: attributes that became inputs (Clip's bounds, the axes of the
//! reductions, Squeeze and Unsqueeze, Slice's starts/ends/axes/steps, Split's sizes, Resize's
//! scales and sizes), Split's `num_outputs` (18), Shape's `start`/`end` (15), Softmax's axis
//! (13: the loader marks older nodes with [`LEGACY_ATTR`]). [`SUPPORTED`] lists them all;
//! the loader refuses a model with any other operator, naming every one at once.

use std::collections::HashMap;

use candle_onnx::onnx::{AttributeProto, NodeProto};
use fam_core::candle::{DType, Tensor, D};
use fam_core::{FamError, Result};

pub struct Ctx<'a> {
    pub node: &'a NodeProto,
    /// Batch size of the current run.
    pub batch: usize,
    /// Batch size the model declares for its input (hard-coded in some Reshape targets).
    pub declared_batch: Option<i64>,
    #[allow(dead_code)]
    pub constants: &'a HashMap<String, Tensor>,
}

fn bad(msg: impl Into<String>) -> FamError {
    FamError::invalid(msg.into())
}

impl Ctx<'_> {
    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }
    fn int(&self, name: &str, default: i64) -> i64 {
        self.attr(name).map(|a| a.i).unwrap_or(default)
    }
    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.attr(name).map(|a| a.ints.clone())
    }
    fn float(&self, name: &str, default: f32) -> f32 {
        self.attr(name).map(|a| a.f).unwrap_or(default)
    }
    fn string(&self, name: &str, default: &str) -> String {
        self.attr(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
            .unwrap_or_else(|| default.to_string())
    }
    fn input(&self, i: usize) -> Option<&str> {
        self.node
            .input
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// Reads a 1-D integer tensor (shapes, axes, pads).
fn to_i64s(t: &Tensor) -> Result<Vec<i64>> {
    Ok(t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?)
}

fn axis(a: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if v < 0 || v >= r.max(1) {
        return Err(bad(format!("axis {a} out of range for rank {rank}")));
    }
    Ok(v as usize)
}

/// [`eval`], with a panic of candle's turned into an error: candle panics on some operator
/// and dtype combinations (e.g. `sqrt` of an integer tensor), and a hostile or odd model
/// gets an error, not a crash.
pub fn eval_guarded(ctx: &Ctx, get: &dyn Fn(&str) -> Result<Tensor>) -> Result<Vec<Tensor>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| eval(ctx, get))).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(FamError::invalid(format!(
            "cannot be evaluated on its inputs ({msg})"
        )))
    })
}

/// Runs one node. `get` returns an input value by name. Returns the node's outputs, in
/// order, as many as it declares (several for `Split`, `LayerNormalization`). Errors are one
/// line: no backtraces.
pub fn eval(ctx: &Ctx, get: &dyn Fn(&str) -> Result<Tensor>) -> Result<Vec<Tensor>> {
    let mut outs = eval_node(ctx, get).map_err(|e| match e {
        FamError::Candle { context, cause } => {
            let msg = cause.to_string();
            let msg = msg.lines().next().unwrap_or_default();
            bad(format!("{context}: {msg}"))
        }
        other => other,
    })?;
    // As many outputs as the node declares (LayerNormalization's statistics are optional).
    outs.truncate(ctx.node.output.len().max(1));
    Ok(outs)
}

fn eval_node(ctx: &Ctx, get: &dyn Fn(&str) -> Result<Tensor>) -> Result<Vec<Tensor>> {
    let x = |i: usize| -> Result<Tensor> {
        let name = ctx
            .input(i)
            .ok_or_else(|| bad(format!("missing input {i}")))?;
        get(name)
    };
    let opt = |i: usize| -> Result<Option<Tensor>> { ctx.input(i).map(get).transpose() };
    let out = match ctx.node.op_type.as_str() {
        "Conv" => conv(ctx, &x(0)?, &x(1)?, opt(2)?.as_ref())?,
        "Relu" => x(0)?.relu()?,
        "PRelu" => {
            let (v, slope) = (x(0)?, x(1)?);
            let neg = v.minimum(0f32)?.broadcast_mul(&slope)?;
            (v.relu()? + neg)?
        }
        "LeakyRelu" => {
            let v = x(0)?;
            (v.relu()? + (v.minimum(0f32)? * ctx.float("alpha", 0.01) as f64)?)?
        }
        "Sigmoid" => fam_core::candle::Tensor::exp(&x(0)?.neg()?)?
            .affine(1.0, 1.0)?
            .recip()?,
        "Tanh" => x(0)?.tanh()?,
        "HardSigmoid" => {
            let (a, b) = (
                ctx.float("alpha", 0.2) as f64,
                ctx.float("beta", 0.5) as f64,
            );
            x(0)?.affine(a, b)?.clamp(0f32, 1f32)?
        }
        "HardSwish" => {
            let v = x(0)?;
            (v.affine(1.0 / 6.0, 0.5)?.clamp(0f32, 1f32)? * v)?
        }
        "Clip" => {
            let v = x(0)?;
            // opset < 11: attributes; opset >= 11: optional inputs.
            let lo = match opt(1)? {
                Some(t) => t
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?
                    .first()
                    .copied(),
                None => ctx.attr("min").map(|a| a.f),
            };
            let hi = match opt(2)? {
                Some(t) => t
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?
                    .first()
                    .copied(),
                None => ctx.attr("max").map(|a| a.f),
            };
            let v = match lo {
                Some(l) => v.maximum(l)?,
                None => v,
            };
            match hi {
                Some(h) => v.minimum(h)?,
                None => v,
            }
        }
        "Add" | "Sub" | "Mul" | "Div" => {
            let (a, b) = (x(0)?, x(1)?);
            let b = if b.dtype() != a.dtype() {
                b.to_dtype(a.dtype())?
            } else {
                b
            };
            match ctx.node.op_type.as_str() {
                "Add" => a.broadcast_add(&b)?,
                "Sub" => a.broadcast_sub(&b)?,
                "Mul" => a.broadcast_mul(&b)?,
                _ => a.broadcast_div(&b)?,
            }
        }
        "BatchNormalization" => {
            let (v, scale, bias, mean, var) = (x(0)?, x(1)?, x(2)?, x(3)?, x(4)?);
            let c = scale.dims1()?;
            let shape: Vec<usize> = (0..v.rank()).map(|i| if i == 1 { c } else { 1 }).collect();
            let eps = ctx.float("epsilon", 1e-5) as f64;
            let k = (scale / (var + eps)?.sqrt()?)?;
            let b = (bias - (mean * &k)?)?;
            v.broadcast_mul(&k.reshape(shape.as_slice())?)?
                .broadcast_add(&b.reshape(shape.as_slice())?)?
        }
        "GlobalAveragePool" => x(0)?.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?,
        "GlobalMaxPool" => x(0)?.max_keepdim(D::Minus1)?.max_keepdim(D::Minus2)?,
        "MaxPool" => max_pool(ctx, &x(0)?)?,
        "AveragePool" => avg_pool(ctx, &x(0)?)?,
        "Flatten" => {
            let v = x(0)?;
            let a = axis(ctx.int("axis", 1), v.rank() + 1)?;
            let dims = v.dims();
            let outer: usize = dims[..a].iter().product();
            v.reshape((outer, v.elem_count() / outer.max(1)))?
        }
        "Reshape" => reshape(ctx, &x(0)?, &to_i64s(&x(1)?)?)?,
        "Gemm" => {
            let (mut a, mut b) = (x(0)?, x(1)?);
            if ctx.int("transA", 0) != 0 {
                a = a.t()?;
            }
            if ctx.int("transB", 0) != 0 {
                b = b.t()?;
            }
            let y = (a.matmul(&b.contiguous()?)? * ctx.float("alpha", 1.0) as f64)?;
            match opt(2)? {
                Some(c) => y.broadcast_add(&(c * ctx.float("beta", 1.0) as f64)?)?,
                None => y,
            }
        }
        "MatMul" => x(0)?.broadcast_matmul(&x(1)?)?,
        "Concat" => {
            let vals: Vec<Tensor> = (0..ctx.node.input.len()).map(&x).collect::<Result<_>>()?;
            let rank = vals.first().map(|v| v.rank()).unwrap_or(1);
            let a = axis(ctx.int("axis", 0), rank)?;
            Tensor::cat(&vals, a)?
        }
        "Identity" | "Dropout" => x(0)?,
        "Pad" => pad(ctx, &x(0)?, opt(1)?, opt(2)?)?,
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceL2" | "ReduceSumSquare"
        | "ReduceL1" | "ReduceProd" => reduce(ctx, &x(0)?, opt(1)?)?,
        "Squeeze" | "Unsqueeze" => {
            let v = x(0)?;
            let axes = match opt(1)? {
                Some(t) => to_i64s(&t)?,
                None => ctx.ints("axes").unwrap_or_default(),
            };
            if ctx.node.op_type == "Squeeze" {
                let mut axes: Vec<usize> = if axes.is_empty() {
                    (0..v.rank()).filter(|&i| v.dims()[i] == 1).collect()
                } else {
                    axes.iter()
                        .map(|&a| axis(a, v.rank()))
                        .collect::<Result<_>>()?
                };
                axes.sort_unstable();
                let mut y = v;
                for &a in axes.iter().rev() {
                    y = y.squeeze(a)?;
                }
                y
            } else {
                let out_rank = v.rank() + axes.len();
                let mut axes: Vec<usize> = axes
                    .iter()
                    .map(|&a| axis(a, out_rank))
                    .collect::<Result<_>>()?;
                axes.sort_unstable();
                let mut y = v;
                for &a in &axes {
                    y = y.unsqueeze(a)?;
                }
                y
            }
        }
        "Transpose" => {
            let v = x(0)?;
            let perm: Vec<usize> = match ctx.ints("perm") {
                Some(p) => p.iter().map(|&a| a as usize).collect(),
                None => (0..v.rank()).rev().collect(),
            };
            v.permute(perm)?.contiguous()?
        }
        "Shape" => {
            // opset 15: `start` and `end` select a range of the dimensions.
            let v = x(0)?;
            let r = v.rank() as i64;
            let clampi = |a: i64| (if a < 0 { a + r } else { a }).clamp(0, r) as usize;
            let (b, e) = (clampi(ctx.int("start", 0)), clampi(ctx.int("end", r)));
            let dims: Vec<i64> = v.dims()[b..e.max(b)].iter().map(|&d| d as i64).collect();
            Tensor::new(dims.as_slice(), v.device())?
        }
        "Size" => {
            let v = x(0)?;
            Tensor::new(v.elem_count() as i64, v.device())?
        }
        "Gather" => {
            let (v, idx) = (x(0)?, x(1)?);
            let a = axis(ctx.int("axis", 0), v.rank())?;
            let n = v.dims()[a] as i64;
            let ids: Vec<u32> = to_i64s(&idx)?
                .iter()
                .map(|&i| {
                    let j = if i < 0 { i + n } else { i };
                    if (0..n).contains(&j) {
                        Ok(j as u32)
                    } else {
                        Err(bad(format!(
                            "Gather index {i} is out of range for an axis of {n}"
                        )))
                    }
                })
                .collect::<Result<_>>()?;
            let sel = v
                .contiguous()?
                .index_select(&Tensor::new(ids.as_slice(), v.device())?, a)?;
            // Output shape: v's dims before `a`, the indices' dims, v's dims after `a`.
            let mut shape = v.dims()[..a].to_vec();
            shape.extend_from_slice(idx.dims());
            shape.extend_from_slice(&v.dims()[a + 1..]);
            sel.reshape(shape)?
        }
        "Abs" => x(0)?.abs()?,
        "Neg" => {
            let v = x(0)?;
            if v.dtype().is_float() {
                v.neg()?
            } else {
                v.zeros_like()?.sub(&v)?
            }
        }
        "Sqrt" => float_in(&x(0)?)?.sqrt()?,
        "Exp" => float_in(&x(0)?)?.exp()?,
        "Log" => float_in(&x(0)?)?.log()?,
        "Reciprocal" => float_in(&x(0)?)?.recip()?,
        "Erf" => float_in(&x(0)?)?.erf()?,
        "Floor" => float_in(&x(0)?)?.floor()?,
        "Ceil" => float_in(&x(0)?)?.ceil()?,
        "Softplus" => softplus(&float_in(&x(0)?)?)?,
        "Mish" => {
            let v = float_in(&x(0)?)?;
            (softplus(&v)?.tanh()? * v)?
        }
        "Elu" => {
            let v = float_in(&x(0)?)?;
            let alpha = ctx.float("alpha", 1.0) as f64;
            let neg = (v.minimum(0f32)?.exp()? - 1.0)?.affine(alpha, 0.0)?;
            (v.relu()? + neg)?
        }
        "Gelu" => {
            let v = float_in(&x(0)?)?;
            match ctx.string("approximate", "none").as_str() {
                "none" => v.gelu_erf()?,
                "tanh" => v.gelu()?,
                other => {
                    return Err(bad(format!(
                        "Gelu approximate `{other}` is not `none` or `tanh`"
                    )))
                }
            }
        }
        "Softmax" | "LogSoftmax" => softmax(ctx, &float_in(&x(0)?)?)?,
        "LayerNormalization" => return layer_norm(ctx, &x(0)?, &x(1)?, opt(2)?.as_ref()),
        "Pow" => pow(&x(0)?, &x(1)?)?,
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" => {
            let (a, b) = (x(0)?, x(1)?);
            let b = same_dtype(&b, &a)?;
            match ctx.node.op_type.as_str() {
                "Equal" => a.broadcast_eq(&b)?,
                "Less" => a.broadcast_lt(&b)?,
                "Greater" => a.broadcast_gt(&b)?,
                "LessOrEqual" => a.broadcast_le(&b)?,
                _ => a.broadcast_ge(&b)?,
            }
        }
        "Not" => x(0)?.eq(0u8)?,
        "And" | "Or" | "Xor" => {
            let (a, b) = (x(0)?.ne(0u8)?, x(1)?.ne(0u8)?);
            match ctx.node.op_type.as_str() {
                "And" => a.broadcast_mul(&b)?,
                "Or" => a.broadcast_maximum(&b)?,
                _ => a.broadcast_ne(&b)?,
            }
        }
        "Where" => {
            let (c, a, b) = (x(0)?, x(1)?, x(2)?);
            let b = same_dtype(&b, &a)?;
            let shape = broadcast_shape(&[c.dims(), a.dims(), b.dims()])?;
            check_elements(&shape, "Where")?;
            let c = c.ne(0u8)?.broadcast_as(shape.as_slice())?.contiguous()?;
            c.where_cond(
                &a.broadcast_as(shape.as_slice())?.contiguous()?,
                &b.broadcast_as(shape.as_slice())?.contiguous()?,
            )?
        }
        "Min" | "Max" | "Sum" | "Mean" => {
            let vals: Vec<Tensor> = (0..ctx.node.input.len()).map(&x).collect::<Result<_>>()?;
            let first = vals.first().ok_or_else(|| bad("no inputs"))?.clone();
            let mut y = first.clone();
            for v in &vals[1..] {
                let v = same_dtype(v, &first)?;
                y = match ctx.node.op_type.as_str() {
                    "Min" => y.broadcast_minimum(&v)?,
                    "Max" => y.broadcast_maximum(&v)?,
                    _ => y.broadcast_add(&v)?,
                };
            }
            if ctx.node.op_type == "Mean" {
                (y / vals.len() as f64)?
            } else {
                y
            }
        }
        "Cast" => cast(&x(0)?, ctx.int("to", 0))?,
        "CastLike" => {
            let (v, like) = (x(0)?, x(1)?);
            same_dtype(&v, &like)?
        }
        "Expand" => {
            let v = x(0)?;
            let target = to_i64s(&x(1)?)?;
            if target.iter().any(|&d| d < 0) {
                return Err(bad(format!(
                    "Expand shape {target:?} has a negative dimension"
                )));
            }
            let target: Vec<usize> = target.iter().map(|&d| d as usize).collect();
            let shape = broadcast_shape(&[v.dims(), target.as_slice()])?;
            check_elements(&shape, "Expand")?;
            v.broadcast_as(shape.as_slice())?.contiguous()?
        }
        "Tile" => {
            let v = x(0)?;
            let reps = to_i64s(&x(1)?)?;
            if reps.len() != v.rank() || reps.iter().any(|&r| r < 0) {
                return Err(bad(format!(
                    "Tile repeats {reps:?} do not fit rank {}",
                    v.rank()
                )));
            }
            let shape: Vec<usize> = v
                .dims()
                .iter()
                .zip(&reps)
                .map(|(&d, &r)| d.saturating_mul(r as usize))
                .collect();
            check_elements(&shape, "Tile")?;
            let reps: Vec<usize> = reps.iter().map(|&r| r as usize).collect();
            v.repeat(reps.as_slice())?
        }
        "ConstantOfShape" => {
            let shape = match opt(0)? {
                Some(s) => to_i64s(&s)?,
                None => vec![],
            };
            if shape.iter().any(|&d| d < 0) {
                return Err(bad(format!(
                    "ConstantOfShape shape {shape:?} has a negative dimension"
                )));
            }
            let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            check_elements(&shape, "ConstantOfShape")?;
            let value = match ctx.attr("value").and_then(|a| a.t.as_ref()) {
                Some(t) if t.data_location == 1 => {
                    return Err(bad(
                        "attribute `value` refers to external data, which an attribute may not",
                    ))
                }
                Some(t) => crate::external::tensor_from_proto(t, std::path::Path::new(""))
                    .map_err(|e| bad(format!("attribute `value` {e}")))?,
                None => Tensor::zeros(1, DType::F32, &fam_core::candle::Device::Cpu)?,
            };
            if value.elem_count() != 1 {
                return Err(bad(format!(
                    "attribute `value` has {} elements; it must have one",
                    value.elem_count()
                )));
            }
            let device = match opt(0)? {
                Some(s) => s.device().clone(),
                None => fam_core::candle::Device::Cpu,
            };
            value
                .flatten_all()?
                .to_device(&device)?
                .reshape(vec![1; shape.len()])?
                .broadcast_as(shape.as_slice())?
                .contiguous()?
        }
        "Range" => range(&x(0)?, &x(1)?, &x(2)?)?,
        "Slice" => slice(ctx, &x(0)?, opt(1)?, opt(2)?, opt(3)?, opt(4)?)?,
        "Split" => return split(ctx, &x(0)?, opt(1)?),
        "Resize" | "Upsample" => resize(ctx, &x(0)?, opt(1)?, opt(2)?, opt(3)?)?,
        other => {
            return Err(bad(format!(
                "operator `{other}` is not supported by fam's ONNX backbone (supported: {})",
                SUPPORTED.join(", ")
            )))
        }
    };
    Ok(vec![out])
}

/// Operators [`eval`] implements.
pub const SUPPORTED: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "CastLike",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Div",
    "Dropout",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "GreaterOrEqual",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LayerNormalization",
    "LeakyRelu",
    "Less",
    "LessOrEqual",
    "Log",
    "LogSoftmax",
    "MatMul",
    "Max",
    "MaxPool",
    "Mean",
    "Min",
    "Mish",
    "Mul",
    "Neg",
    "Not",
    "Or",
    "PRelu",
    "Pad",
    "Pow",
    "Range",
    "Reciprocal",
    "ReduceL1",
    "ReduceL2",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "ReduceSumSquare",
    "Relu",
    "Reshape",
    "Resize",
    "Shape",
    "Sigmoid",
    "Size",
    "Slice",
    "Softmax",
    "Softplus",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Tanh",
    "Tile",
    "Transpose",
    "Unsqueeze",
    "Upsample",
    "Where",
    "Xor",
];

/// Largest padding, stride, dilation or pooling window taken from a model's attributes: a
/// hostile file must not be able to ask for an enormous allocation.
pub const MAX_ATTR: i64 = 1 << 12;
/// Largest tensor an operator creates from attributes (elements; 1 GiB of f32).
pub const MAX_ELEMENTS: usize = 1 << 28;

/// Attribute values that must lie in `lo..=MAX_ATTR`.
fn bounded(v: Vec<i64>, lo: i64, what: &str) -> Result<Vec<usize>> {
    if v.iter().any(|x| !(lo..=MAX_ATTR).contains(x)) {
        return Err(bad(format!(
            "{what} {v:?}: values must lie between {lo} and {MAX_ATTR}"
        )));
    }
    Ok(v.into_iter().map(|x| x as usize).collect())
}

/// Refuses a shape with more than [`MAX_ELEMENTS`] elements before it is allocated.
fn check_elements(shape: &[usize], what: &str) -> Result<()> {
    let n = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS);
    match n {
        Some(_) => Ok(()),
        None => Err(bad(format!(
            "{what} would create a tensor of shape {shape:?}, more than {MAX_ELEMENTS} elements"
        ))),
    }
}

/// Begin/end padding of each spatial axis per `auto_pad` (or the explicit `pads`).
fn spatial_pads(
    ctx: &Ctx,
    input: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
) -> Result<Vec<(usize, usize)>> {
    let n = input.len();
    match ctx.string("auto_pad", "NOTSET").as_str() {
        "NOTSET" => {
            let pads = ctx.ints("pads").unwrap_or_else(|| vec![0; 2 * n]);
            if pads.len() != 2 * n {
                return Err(bad(format!("pads {pads:?} do not fit {n} spatial axes")));
            }
            let pads = bounded(pads, 0, "pads")?;
            Ok((0..n).map(|i| (pads[i], pads[i + n])).collect())
        }
        "VALID" => Ok(vec![(0, 0); n]),
        mode @ ("SAME_UPPER" | "SAME_LOWER") => Ok((0..n
            .min(kernel.len())
            .min(strides.len())
            .min(dilations.len()))
            .map(|i| {
                let out = input[i].div_ceil(strides[i]);
                let need = ((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1)
                    .saturating_sub(input[i]);
                let small = need / 2;
                if mode == "SAME_UPPER" {
                    (small, need - small)
                } else {
                    (need - small, small)
                }
            })
            .collect()),
        other => Err(bad(format!("auto_pad `{other}` is not an ONNX mode"))),
    }
}

fn pad_spatial(v: &Tensor, pads: &[(usize, usize)], value: f32) -> Result<Tensor> {
    let mut shape = v.dims().to_vec();
    for (i, &(b, e)) in pads.iter().enumerate() {
        if let Some(d) = shape.get_mut(2 + i) {
            *d += b + e;
        }
    }
    check_elements(&shape, "padding")?;
    let mut y = v.clone();
    for (i, &(b, e)) in pads.iter().enumerate() {
        let dim = 2 + i;
        if b == 0 && e == 0 {
            continue;
        }
        y = if value == 0.0 {
            y.pad_with_zeros(dim, b, e)?
        } else {
            let mut parts = Vec::new();
            let mut shape = y.dims().to_vec();
            if b > 0 {
                shape[dim] = b;
                parts.push(Tensor::full(value, shape.as_slice(), y.device())?.to_dtype(y.dtype())?);
            }
            parts.push(y.clone());
            if e > 0 {
                shape[dim] = e;
                parts.push(Tensor::full(value, shape.as_slice(), y.device())?.to_dtype(y.dtype())?);
            }
            Tensor::cat(&parts, dim)?
        };
    }
    Ok(y)
}

fn two(v: &[usize], what: &str) -> Result<usize> {
    match v {
        [a, b] if a == b => Ok(*a),
        [a] => Ok(*a),
        _ => Err(bad(format!(
            "{what} {v:?}: only equal values on both spatial axes are supported"
        ))),
    }
}

fn conv(ctx: &Ctx, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (_, cin, h, wd) = x.dims4()?;
    let (cout, cin_g, kh, kw) = w.dims4()?;
    let group = ctx.int("group", 1) as usize;
    if cin_g * group != cin {
        return Err(bad(format!(
            "kernel {:?} with group {group} does not fit {cin} input channels",
            w.dims()
        )));
    }
    let strides = bounded(ctx.ints("strides").unwrap_or(vec![1, 1]), 1, "strides")?;
    let dilations = bounded(ctx.ints("dilations").unwrap_or(vec![1, 1]), 1, "dilations")?;
    let (stride, dilation) = (two(&strides, "strides")?, two(&dilations, "dilations")?);
    let (strides, dilations) = ([stride; 2], [dilation; 2]);
    let pads = spatial_pads(ctx, &[h, wd], &[kh, kw], &strides, &dilations)?;
    for (len, k, (b, e)) in [(h, kh, pads[0]), (wd, kw, pads[1])] {
        if len + b + e < dilation * (k.max(1) - 1) + 1 {
            return Err(bad(format!(
                "kernel {:?} (dilation {dilation}) is larger than the padded input {:?}",
                w.dims(),
                x.dims()
            )));
        }
    }
    let symmetric = pads[0].0 == pads[0].1 && pads[1].0 == pads[1].1 && pads[0].0 == pads[1].0;
    let (x, padding) = if symmetric {
        (x.clone(), pads[0].0)
    } else {
        (pad_spatial(x, &pads, 0.0)?, 0)
    };
    let y = if group == cin && cin_g == 1 && cout == cin && dilation == 1 && kh == kw {
        fam_nn::depthwise(&x, w, stride, padding)?
    } else if group == 1 && (kh, kw, stride, padding) == (1, 1, 1, 0) {
        // Pointwise: one matrix product per image (a strided batched GEMM on a GPU), with
        // no im2col copy and the output already in NCHW.
        let (n, _, h, wd) = x.dims4()?;
        w.reshape((cout, cin))?
            .broadcast_matmul(&x.reshape((n, cin, h * wd))?)?
            .reshape((n, cout, h, wd))?
    } else {
        x.conv2d(w, padding, stride, dilation, group)?
    };
    Ok(match b {
        Some(b) => y.broadcast_add(&b.reshape((1, cout, 1, 1))?)?,
        None => y,
    })
}

/// Kernel, stride, (begin, end) padding per axis, output (height, width).
type PoolSetup = (usize, usize, Vec<(usize, usize)>, (usize, usize));

/// Output size of a pooling window along one axis, per the ONNX formula.
fn pool_out(len: usize, k: usize, s: usize, pads: (usize, usize), ceil: bool) -> usize {
    let span = (len + pads.0 + pads.1).saturating_sub(k);
    let mut out = if ceil {
        span.div_ceil(s) + 1
    } else {
        span / s + 1
    };
    // With ceil_mode the last window must start inside the input or its left padding.
    if ceil && (out - 1) * s >= len + pads.0 {
        out -= 1;
    }
    out
}

fn pool_setup(ctx: &Ctx, x: &Tensor) -> Result<PoolSetup> {
    let (_, _, h, w) = x.dims4()?;
    let k = ctx
        .ints("kernel_shape")
        .ok_or_else(|| bad("kernel_shape missing"))?;
    let k = bounded(k, 1, "kernel_shape")?;
    let s = bounded(ctx.ints("strides").unwrap_or(vec![1, 1]), 1, "strides")?;
    let (k, s) = (two(&k, "kernel_shape")?, two(&s, "strides")?);
    let pads = spatial_pads(ctx, &[h, w], &[k; 2], &[s; 2], &[1, 1])?;
    let ceil = ctx.int("ceil_mode", 0) != 0;
    let out = (
        pool_out(h, k, s, pads[0], ceil),
        pool_out(w, k, s, pads[1], ceil),
    );
    Ok((k, s, pads, out))
}

fn max_pool(ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (k, s, mut pads, (oh, ow)) = pool_setup(ctx, x)?;
    // Extend the end padding so that every output window fits.
    pads[0].1 = ((oh - 1) * s + k).saturating_sub(h + pads[0].0);
    pads[1].1 = ((ow - 1) * s + k).saturating_sub(w + pads[1].0);
    let xp = pad_spatial(x, &pads, f32::NEG_INFINITY)?;
    let y = xp.max_pool2d_with_stride(k, s)?;
    Ok(y.narrow(2, 0, oh)?.narrow(3, 0, ow)?)
}

fn avg_pool(ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (k, s, declared, (oh, ow)) = pool_setup(ctx, x)?;
    // Extra end padding so that every output window fits (ceil_mode); never counted.
    let extra_h = ((oh - 1) * s + k).saturating_sub(h + declared[0].0 + declared[0].1);
    let extra_w = ((ow - 1) * s + k).saturating_sub(w + declared[1].0 + declared[1].1);
    let xp = pad_spatial(x, &declared, 0.0)?
        .pad_with_zeros(2, 0, extra_h)?
        .pad_with_zeros(3, 0, extra_w)?;
    let sum = (xp.avg_pool2d_with_stride(k, s)? * (k * k) as f64)?;
    // Divide by the cells that count: the input, plus the declared padding when
    // count_include_pad = 1.
    let include = if ctx.int("count_include_pad", 0) != 0 {
        1.0
    } else {
        0.0
    };
    let ones = Tensor::ones((1, 1, h, w), x.dtype(), x.device())?;
    let mask = if include == 1.0 {
        let full = (
            h + declared[0].0 + declared[0].1,
            w + declared[1].0 + declared[1].1,
        );
        Tensor::ones((1, 1, full.0, full.1), x.dtype(), x.device())?
    } else {
        pad_spatial(&ones, &declared, 0.0)?
    };
    let mask = mask
        .pad_with_zeros(2, 0, extra_h)?
        .pad_with_zeros(3, 0, extra_w)?;
    let count = (mask.avg_pool2d_with_stride(k, s)? * (k * k) as f64)?;
    let y = sum.broadcast_div(&count)?;
    Ok(y.narrow(2, 0, oh)?.narrow(3, 0, ow)?)
}

fn reshape(ctx: &Ctx, v: &Tensor, shape: &[i64]) -> Result<Tensor> {
    let allow_zero = ctx.int("allowzero", 0) != 0;
    let dims = v.dims();
    let mut out: Vec<i64> = shape
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            if s == 0 && !allow_zero {
                dims.get(i).map(|&d| d as i64).unwrap_or(0)
            } else {
                s
            }
        })
        .collect();
    // Exports often hard-code the batch they were traced with (e.g. [1, -1]); keep the
    // batch of this run instead.
    if let (Some(first), Some(declared)) = (out.first_mut(), ctx.declared_batch) {
        if *first == declared && ctx.batch as i64 != declared && dims.first() == Some(&ctx.batch) {
            *first = ctx.batch as i64;
        }
    }
    if out.iter().any(|&s| s < -1) || out.iter().filter(|&&s| s == -1).count() > 1 {
        return Err(bad(format!(
            "Reshape target {shape:?}: dimensions must be -1 (once), 0 or positive"
        )));
    }
    let known: i64 = out
        .iter()
        .filter(|&&s| s != -1)
        .try_fold(1i64, |n, &s| n.checked_mul(s))
        .ok_or_else(|| bad(format!("Reshape target {shape:?} has too many elements")))?;
    if let Some(i) = out.iter().position(|&s| s == -1) {
        if known == 0 {
            return Err(bad(format!("cannot infer -1 in shape {shape:?}")));
        }
        out[i] = v.elem_count() as i64 / known;
    }
    let out: Vec<usize> = out.iter().map(|&s| s.max(0) as usize).collect();
    if out.iter().product::<usize>() != v.elem_count() {
        return Err(bad(format!("cannot reshape {:?} to {shape:?}", v.dims())));
    }
    Ok(v.reshape(out)?)
}

fn pad(ctx: &Ctx, v: &Tensor, pads: Option<Tensor>, value: Option<Tensor>) -> Result<Tensor> {
    let mode = ctx.string("mode", "constant");
    if mode != "constant" {
        return Err(bad(format!(
            "Pad mode `{mode}` is not supported (only `constant`)"
        )));
    }
    let pads = match pads {
        Some(p) => to_i64s(&p)?,
        None => ctx.ints("pads").unwrap_or_default(),
    };
    let value = match value {
        Some(t) => t
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .first()
            .copied()
            .unwrap_or(0.0),
        None => ctx.float("value", 0.0),
    };
    let r = v.rank();
    if pads.len() != 2 * r || pads.iter().any(|p| *p < 0) {
        return Err(bad(format!(
            "pads {pads:?} do not fit rank {r} (negative pads are not supported)"
        )));
    }
    let pads = bounded(pads, 0, "pads")?;
    let out: Vec<usize> = (0..r)
        .map(|d| v.dims()[d] + pads[d] + pads[d + r])
        .collect();
    check_elements(&out, "Pad")?;
    let mut y = v.clone();
    for d in 0..r {
        let (b, e) = (pads[d], pads[d + r]);
        if b == 0 && e == 0 {
            continue;
        }
        let mut parts = Vec::new();
        let mut shape = y.dims().to_vec();
        if b > 0 {
            shape[d] = b;
            parts.push((Tensor::ones(shape.as_slice(), y.dtype(), y.device())? * value as f64)?);
        }
        parts.push(y.clone());
        if e > 0 {
            shape[d] = e;
            parts.push((Tensor::ones(shape.as_slice(), y.dtype(), y.device())? * value as f64)?);
        }
        y = Tensor::cat(&parts, d)?;
    }
    Ok(y)
}

/// A float version of `v` (integer inputs of float-only operators are computed in f32).
fn float_in(v: &Tensor) -> Result<Tensor> {
    Ok(if v.dtype().is_float() {
        v.clone()
    } else {
        v.to_dtype(DType::F32)?
    })
}

/// `v` in `like`'s dtype.
fn same_dtype(v: &Tensor, like: &Tensor) -> Result<Tensor> {
    Ok(if v.dtype() == like.dtype() {
        v.clone()
    } else {
        v.to_dtype(like.dtype())?
    })
}

/// The numpy broadcast of several shapes.
fn broadcast_shape(shapes: &[&[usize]]) -> Result<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        let off = rank - s.len();
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[off + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return Err(bad(format!("shapes {shapes:?} do not broadcast")));
            }
        }
    }
    Ok(out)
}

/// `ln(1 + exp(x))`, computed stably as `relu(x) + ln(1 + exp(-|x|))`.
fn softplus(v: &Tensor) -> Result<Tensor> {
    let tail = (v.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((v.relu()? + tail)?)
}

/// Softmax and LogSoftmax. Before opset 13 (`_fam_legacy`, set when the model is loaded) the
/// input is coerced to 2-D at `axis` (default 1); from 13 on, one axis (default -1).
fn softmax(ctx: &Ctx, v: &Tensor) -> Result<Tensor> {
    let legacy = ctx.int(LEGACY_ATTR, 0) != 0;
    let dims = v.dims().to_vec();
    let a = axis(ctx.int("axis", if legacy { 1 } else { -1 }), v.rank())?;
    let (w, a) = if legacy {
        let outer: usize = dims[..a].iter().product();
        (v.reshape((outer, v.elem_count() / outer.max(1)))?, 1)
    } else {
        (v.clone(), a)
    };
    let m = w.max_keepdim(a)?;
    let d = w.broadcast_sub(&m)?;
    let e = d.exp()?;
    let s = e.sum_keepdim(a)?;
    let y = if ctx.node.op_type == "LogSoftmax" {
        d.broadcast_sub(&s.log()?)?
    } else {
        e.broadcast_div(&s)?
    };
    Ok(y.reshape(dims)?)
}

/// The attribute the loader adds to opset-dependent nodes of models older than opset 13.
pub const LEGACY_ATTR: &str = "_fam_before_opset13";

fn layer_norm(ctx: &Ctx, x: &Tensor, scale: &Tensor, bias: Option<&Tensor>) -> Result<Vec<Tensor>> {
    let dims = x.dims().to_vec();
    let a = axis(ctx.int("axis", -1), x.rank())?;
    let eps = ctx.float("epsilon", 1e-5) as f64;
    let outer: usize = dims[..a].iter().product();
    let inner = x.elem_count() / outer.max(1);
    let xf = x.to_dtype(DType::F32)?.reshape((outer, inner))?;
    let mean = xf.mean_keepdim(1)?;
    let d = xf.broadcast_sub(&mean)?;
    let inv = (d.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
    let mut y = d
        .broadcast_mul(&inv)?
        .reshape(dims.as_slice())?
        .broadcast_mul(&scale.to_dtype(DType::F32)?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
    }
    let stat_shape: Vec<usize> = (0..dims.len())
        .map(|i| if i < a { dims[i] } else { 1 })
        .collect();
    Ok(vec![
        y.to_dtype(x.dtype())?,
        mean.reshape(stat_shape.as_slice())?,
        inv.reshape(stat_shape.as_slice())?,
    ])
}

/// `Pow`: the common exponents on the device, others element by element.
fn pow(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if b.elem_count() == 1 && a.dtype().is_float() {
        let e = b.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
        if e == 1.0 {
            return Ok(a.clone());
        } else if e == 2.0 {
            return Ok(a.sqr()?);
        } else if e == 3.0 {
            return Ok((a.sqr()? * a)?);
        } else if e == 0.5 {
            return Ok(a.sqrt()?);
        } else if e == -1.0 {
            return Ok(a.recip()?);
        }
    }
    let shape = broadcast_shape(&[a.dims(), b.dims()])?;
    check_elements(&shape, "Pow")?;
    let cpu = fam_core::candle::Device::Cpu;
    let flat = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.broadcast_as(shape.as_slice())?
            .to_device(&cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    };
    let (av, bv) = (flat(a)?, flat(b)?);
    let y: Vec<f64> = if a.dtype().is_float() {
        av.iter()
            .zip(&bv)
            .map(|(&x, &e)| (x as f32).powf(e as f32) as f64)
            .collect()
    } else {
        av.iter()
            .zip(&bv)
            .map(|(&x, &e)| x.powf(e).trunc())
            .collect()
    };
    Ok(Tensor::from_vec(y, shape, &cpu)?
        .to_dtype(a.dtype())?
        .to_device(a.device())?)
}

fn cast(v: &Tensor, to: i64) -> Result<Tensor> {
    let dt = i32::try_from(to)
        .ok()
        .and_then(crate::external::candle_dtype)
        .ok_or_else(|| bad(format!("Cast to ONNX data type {to} is not supported")))?;
    if to == 9 {
        // BOOL: any non-zero value is true.
        return Ok(v.ne(0u8)?);
    }
    if dt == v.dtype() {
        return Ok(v.clone());
    }
    // Float to integer truncates toward zero (as ONNX and C do); candle's casts do too.
    Ok(v.to_dtype(dt)?)
}

fn scalar_f64(t: &Tensor, what: &str) -> Result<f64> {
    if t.elem_count() != 1 {
        return Err(bad(format!(
            "{what} must be a scalar, got shape {:?}",
            t.dims()
        )));
    }
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0])
}

fn range(start: &Tensor, limit: &Tensor, delta: &Tensor) -> Result<Tensor> {
    let (s, l, d) = (
        scalar_f64(start, "start")?,
        scalar_f64(limit, "limit")?,
        scalar_f64(delta, "delta")?,
    );
    if d == 0.0 || !d.is_finite() || !s.is_finite() || !l.is_finite() {
        return Err(bad(format!("Range({s}, {l}, {d}) is not a finite range")));
    }
    let n = ((l - s) / d).ceil().max(0.0);
    if n > MAX_ELEMENTS as f64 {
        return Err(bad(format!(
            "Range({s}, {l}, {d}) would have more than {MAX_ELEMENTS} elements"
        )));
    }
    let n = n as usize;
    let dev = start.device();
    Ok(if start.dtype().is_float() {
        let v: Vec<f32> = (0..n).map(|i| (s + i as f64 * d) as f32).collect();
        Tensor::from_vec(v, n, dev)?.to_dtype(start.dtype())?
    } else {
        let (s, d) = (s as i64, d as i64);
        let v: Vec<i64> = (0..n as i64).map(|i| s + i * d).collect();
        Tensor::from_vec(v, n, dev)?.to_dtype(start.dtype())?
    })
}

/// One axis of a `Slice`: the first index, the step and the number of elements, per the ONNX
/// rules (negative indices count from the end; out-of-range values, `INT_MAX` included, are
/// clamped).
fn slice_range(dim: usize, start: i64, end: i64, step: i64) -> Result<(i64, i64, usize)> {
    if step == 0 {
        return Err(bad("Slice step 0"));
    }
    let d = dim as i128;
    let norm = |v: i64| -> i128 {
        let v = v as i128;
        if v < 0 {
            v + d
        } else {
            v
        }
    };
    let (start, end) = (norm(start), norm(end));
    let (start, end) = if step > 0 {
        (start.clamp(0, d), end.clamp(0, d))
    } else {
        (start.clamp(0, (d - 1).max(0)), end.clamp(-1, d - 1))
    };
    let s = step as i128;
    let n = if step > 0 {
        (end - start + s - 1).div_euclid(s).max(0)
    } else {
        (start - end + (-s) - 1).div_euclid(-s).max(0)
    };
    let n = if d == 0 { 0 } else { n };
    Ok((start as i64, step, n as usize))
}

fn slice(
    ctx: &Ctx,
    v: &Tensor,
    starts: Option<Tensor>,
    ends: Option<Tensor>,
    axes: Option<Tensor>,
    steps: Option<Tensor>,
) -> Result<Tensor> {
    // opset < 10: attributes; opset >= 10: inputs.
    let (starts, ends, axes, steps) = match starts {
        Some(s) => (
            to_i64s(&s)?,
            to_i64s(&ends.ok_or_else(|| bad("Slice without `ends`"))?)?,
            axes.map(|a| to_i64s(&a)).transpose()?,
            steps.map(|a| to_i64s(&a)).transpose()?,
        ),
        None => (
            ctx.ints("starts")
                .ok_or_else(|| bad("Slice without `starts`"))?,
            ctx.ints("ends")
                .ok_or_else(|| bad("Slice without `ends`"))?,
            ctx.ints("axes"),
            None,
        ),
    };
    let k = starts.len();
    let axes = axes.unwrap_or_else(|| (0..k as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; k]);
    if ends.len() != k || axes.len() != k || steps.len() != k {
        return Err(bad(format!(
            "Slice starts {starts:?}, ends {ends:?}, axes {axes:?}, steps {steps:?} differ in length"
        )));
    }
    let mut seen = Vec::new();
    let mut y = v.clone();
    for i in 0..k {
        let a = axis(axes[i], v.rank())?;
        if seen.contains(&a) {
            return Err(bad(format!("Slice axes {axes:?} repeat an axis")));
        }
        seen.push(a);
        let (first, step, n) = slice_range(y.dims()[a], starts[i], ends[i], steps[i])?;
        y = if step == 1 || n <= 1 {
            y.narrow(a, first.max(0) as usize, n)?
        } else {
            let idx: Vec<u32> = (0..n as i64).map(|j| (first + j * step) as u32).collect();
            y.contiguous()?
                .index_select(&Tensor::new(idx.as_slice(), y.device())?, a)?
        };
    }
    Ok(y)
}

fn split(ctx: &Ctx, v: &Tensor, sizes: Option<Tensor>) -> Result<Vec<Tensor>> {
    let a = axis(ctx.int("axis", 0), v.rank())?;
    let d = v.dims()[a];
    let outputs = ctx.node.output.len();
    let sizes: Vec<i64> = match (sizes, ctx.ints("split")) {
        (Some(t), _) => to_i64s(&t)?,
        (None, Some(s)) if !s.is_empty() => s,
        _ => {
            let n = ctx.int("num_outputs", outputs as i64);
            if n < 1 || n != outputs as i64 {
                return Err(bad(format!("Split into {n} parts for {outputs} outputs")));
            }
            let n = n as usize;
            let chunk = d.div_ceil(n);
            if chunk * (n - 1) > d {
                return Err(bad(format!(
                    "Split: an axis of {d} cannot be split into {n} outputs"
                )));
            }
            let mut v = vec![chunk as i64; n - 1];
            v.push((d - chunk * (n - 1)) as i64);
            v
        }
    };
    let total = sizes.iter().try_fold(0i64, |t, &s| t.checked_add(s));
    if sizes.iter().any(|&s| s < 0) || total != Some(d as i64) {
        return Err(bad(format!(
            "Split sizes {sizes:?} do not add up to the axis length {d}"
        )));
    }
    if sizes.len() != outputs {
        return Err(bad(format!(
            "Split sizes {sizes:?} give {} parts for {outputs} outputs",
            sizes.len()
        )));
    }
    let mut out = Vec::with_capacity(sizes.len());
    let mut at = 0usize;
    for s in sizes {
        out.push(v.narrow(a, at, s as usize)?);
        at += s as usize;
    }
    Ok(out)
}

fn reduce(ctx: &Ctx, v: &Tensor, axes_input: Option<Tensor>) -> Result<Tensor> {
    let op = ctx.node.op_type.as_str();
    let axes = match axes_input {
        Some(t) => Some(to_i64s(&t)?),
        None => ctx.ints("axes"),
    };
    let keep = ctx.int("keepdims", 1) != 0;
    let mut axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|&a| axis(a, v.rank()))
            .collect::<Result<_>>()?,
        _ if ctx.int("noop_with_empty_axes", 0) != 0 => return Ok(v.clone()),
        _ => (0..v.rank()).collect(),
    };
    axes.sort_unstable();
    axes.dedup();
    let mut y = match op {
        "ReduceL2" | "ReduceSumSquare" => float_in(v)?.sqr()?,
        "ReduceL1" => v.abs()?,
        _ => v.clone(),
    };
    for &a in axes.iter().rev() {
        y = match (op, keep) {
            ("ReduceMean", true) => y.mean_keepdim(a)?,
            ("ReduceMean", false) => y.mean(a)?,
            ("ReduceMax", true) => y.max_keepdim(a)?,
            ("ReduceMax", false) => y.max(a)?,
            ("ReduceMin", true) => y.min_keepdim(a)?,
            ("ReduceMin", false) => y.min(a)?,
            (_, true) => y.sum_keepdim(a)?,
            (_, false) => y.sum(a)?,
        };
    }
    if op == "ReduceL2" {
        y = y.sqrt()?;
    }
    Ok(y)
}

/// How `Resize` maps an output coordinate to an input coordinate.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Coord {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfHalfPixelForNn,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Nearest {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
    /// Resize-10 and Upsample: floor when upsampling, ceil when downsampling.
    Simple,
}

fn source_coord(mode: Coord, x: usize, scale: f32, len_in: usize, len_out: usize) -> f32 {
    let x = x as f32;
    match mode {
        Coord::HalfPixel => (x + 0.5) / scale - 0.5,
        Coord::HalfPixelSymmetric => {
            let adjustment = len_out as f32 / (scale * len_in as f32);
            let center = len_in as f32 / 2.0;
            let offset = center * (1.0 - adjustment);
            offset + (x + 0.5) / scale - 0.5
        }
        Coord::PytorchHalfPixel => {
            if len_out > 1 {
                (x + 0.5) / scale - 0.5
            } else {
                0.0
            }
        }
        Coord::AlignCorners => {
            if len_out == 1 {
                0.0
            } else {
                x * (len_in as f32 - 1.0) / (len_out as f32 - 1.0)
            }
        }
        Coord::Asymmetric => x / scale,
        Coord::TfHalfPixelForNn => (x + 0.5) / scale,
    }
}

/// Resize (opset 10 to 19) and Upsample: `nearest` and `linear` (separable: linear on every
/// resized axis, so bilinear on images).
fn resize(
    ctx: &Ctx,
    v: &Tensor,
    a1: Option<Tensor>,
    a2: Option<Tensor>,
    a3: Option<Tensor>,
) -> Result<Tensor> {
    let non_empty = |t: Option<Tensor>| t.filter(|t| t.elem_count() > 0);
    // Upsample-7 (scales attribute), Upsample-9 and Resize-10 (X, scales), Resize-11+ (X, roi,
    // scales, sizes).
    let legacy = ctx.node.op_type == "Upsample" || ctx.node.input.len() <= 2;
    let (scales, sizes): (Option<Vec<f32>>, Option<Vec<i64>>) = if legacy {
        let s = match non_empty(a1) {
            Some(t) => Some(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => ctx.attr("scales").map(|a| a.floats.clone()),
        };
        (s, None)
    } else {
        (
            non_empty(a2)
                .map(|t| -> Result<Vec<f32>> {
                    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
                })
                .transpose()?,
            non_empty(a3).map(|t| to_i64s(&t)).transpose()?,
        )
    };
    let mode = ctx.string("mode", "nearest");
    let linear = match mode.as_str() {
        "nearest" => false,
        "linear" | "bilinear" => true,
        other => {
            return Err(bad(format!(
                "Resize mode `{other}` is not supported (only `nearest` and `linear`)"
            )))
        }
    };
    let coord = if legacy {
        Coord::Asymmetric
    } else {
        match ctx
            .string("coordinate_transformation_mode", "half_pixel")
            .as_str()
        {
            "half_pixel" => Coord::HalfPixel,
            "half_pixel_symmetric" => Coord::HalfPixelSymmetric,
            "pytorch_half_pixel" => Coord::PytorchHalfPixel,
            "align_corners" => Coord::AlignCorners,
            "asymmetric" => Coord::Asymmetric,
            "tf_half_pixel_for_nn" => Coord::TfHalfPixelForNn,
            other => {
                return Err(bad(format!(
                    "Resize coordinate_transformation_mode `{other}` is not supported"
                )))
            }
        }
    };
    let nearest = if legacy {
        Nearest::Simple
    } else {
        match ctx.string("nearest_mode", "round_prefer_floor").as_str() {
            "round_prefer_floor" => Nearest::RoundPreferFloor,
            "round_prefer_ceil" => Nearest::RoundPreferCeil,
            "floor" => Nearest::Floor,
            "ceil" => Nearest::Ceil,
            other => {
                return Err(bad(format!(
                    "Resize nearest_mode `{other}` is not an ONNX mode"
                )))
            }
        }
    };
    let rank = v.rank();
    let axes: Vec<usize> = match ctx.ints("axes") {
        Some(a) => a.iter().map(|&a| axis(a, rank)).collect::<Result<_>>()?,
        None => (0..rank).collect(),
    };
    let dims = v.dims().to_vec();
    // Per resized axis: (axis, output length, scale).
    let mut plan: Vec<(usize, usize, f32)> = Vec::new();
    match (scales, sizes) {
        (_, Some(sizes)) => {
            if sizes.len() != axes.len() || sizes.iter().any(|&s| s < 1) {
                return Err(bad(format!(
                    "Resize sizes {sizes:?} do not fit {} axes",
                    axes.len()
                )));
            }
            let policy = ctx.string("keep_aspect_ratio_policy", "stretch");
            let ratios: Vec<f32> = axes
                .iter()
                .zip(&sizes)
                .map(|(&a, &s)| s as f32 / dims[a].max(1) as f32)
                .collect();
            let common = match policy.as_str() {
                "stretch" => None,
                "not_larger" => ratios.iter().copied().reduce(f32::min),
                "not_smaller" => ratios.iter().copied().reduce(f32::max),
                other => {
                    return Err(bad(format!(
                        "Resize keep_aspect_ratio_policy `{other}` is not an ONNX policy"
                    )))
                }
            };
            for (i, &a) in axes.iter().enumerate() {
                let (out, scale) = match common {
                    None => (sizes[i] as usize, ratios[i]),
                    Some(r) => (((dims[a] as f32 * r) + 0.5).floor().max(1.0) as usize, r),
                };
                plan.push((a, out, scale));
            }
        }
        (Some(scales), None) => {
            if scales.len() != axes.len() || scales.iter().any(|&s| !(s > 0.0) || !s.is_finite()) {
                return Err(bad(format!(
                    "Resize scales {scales:?} do not fit {} axes (each must be positive)",
                    axes.len()
                )));
            }
            for (i, &a) in axes.iter().enumerate() {
                let out = (dims[a] as f64 * scales[i] as f64).floor();
                if out < 1.0 || out > MAX_ELEMENTS as f64 {
                    return Err(bad(format!(
                        "Resize scale {} gives {out} elements on axis {a} of length {}",
                        scales[i], dims[a]
                    )));
                }
                plan.push((a, out as usize, scales[i]));
            }
        }
        (None, None) => return Err(bad("Resize needs `scales` or `sizes`")),
    }
    if let Some(&(a, _, _)) = plan.iter().find(|&&(a, _, _)| dims[a] == 0) {
        return Err(bad(format!("Resize of an empty axis {a} (shape {dims:?})")));
    }
    let mut out_shape = dims.clone();
    for &(a, out, _) in &plan {
        out_shape[a] = out;
    }
    check_elements(&out_shape, "Resize")?;
    if ctx.int("antialias", 0) != 0 && plan.iter().any(|&(a, out, _)| out < dims[a]) {
        return Err(bad(
            "Resize with antialias = 1 when downscaling is not supported",
        ));
    }
    let mut y = v.clone();
    for (a, out, scale) in plan {
        let len = dims[a];
        if out == len && scale == 1.0 {
            continue;
        }
        let src: Vec<f32> = (0..out)
            .map(|i| source_coord(coord, i, scale, len, out))
            .collect();
        let last = len as i64 - 1;
        y = if !linear {
            let idx: Vec<u32> = src
                .iter()
                .map(|&x| {
                    let i = match nearest {
                        Nearest::RoundPreferFloor => (x - 0.5).ceil(),
                        Nearest::RoundPreferCeil => (x + 0.5).floor(),
                        Nearest::Floor => x.floor(),
                        Nearest::Ceil => x.ceil(),
                        Nearest::Simple if scale < 1.0 => x.ceil(),
                        Nearest::Simple => x.floor(),
                    };
                    (i as i64).clamp(0, last) as u32
                })
                .collect();
            y.contiguous()?
                .index_select(&Tensor::new(idx.as_slice(), y.device())?, a)?
        } else {
            // out x len interpolation matrix, applied along axis `a`.
            check_elements(&[out, len], "Resize's interpolation matrix")?;
            let mut m = vec![0f32; out * len];
            for (i, &x) in src.iter().enumerate() {
                let x = x.clamp(0.0, last as f32);
                let x0 = (x.floor() as i64).clamp(0, last) as usize;
                let x1 = (x0 + 1).min(last as usize);
                let w1 = x - x0 as f32;
                m[i * len + x0] += 1.0 - w1;
                m[i * len + x1] += w1;
            }
            let mt = Tensor::from_vec(m, (out, len), y.device())?
                .t()?
                .contiguous()?;
            let dtype = y.dtype();
            let moved = y
                .to_dtype(DType::F32)?
                .transpose(a, rank - 1)?
                .contiguous()?;
            moved
                .broadcast_matmul(&mt)?
                .transpose(a, rank - 1)?
                .contiguous()?
                .to_dtype(dtype)?
        };
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_is_sorted_and_unique() {
        let mut sorted = SUPPORTED.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted, SUPPORTED,
            "SUPPORTED must stay sorted (binary search)"
        );
    }

    #[test]
    fn slice_ranges_follow_the_onnx_rules() {
        // [start, end) with clamping, INT_MAX ends and negative steps.
        assert_eq!(slice_range(10, 2, i64::MAX, 1).unwrap(), (2, 1, 8));
        assert_eq!(slice_range(10, -3, -1, 1).unwrap(), (7, 1, 2));
        assert_eq!(slice_range(10, i64::MIN, 3, 2).unwrap(), (0, 2, 2));
        assert_eq!(slice_range(10, -1, i64::MIN, -1).unwrap(), (9, -1, 10));
        assert_eq!(slice_range(10, 8, 1, -3).unwrap(), (8, -3, 3));
        assert_eq!(slice_range(10, 5, 5, 1).unwrap(), (5, 1, 0));
        assert_eq!(slice_range(0, 0, 5, 1).unwrap().2, 0);
        assert!(slice_range(10, 0, 5, 0).is_err());
    }

    /// Runs one node on named inputs.
    fn run(
        op: &str,
        inputs: &[(&str, Tensor)],
        attrs: Vec<AttributeProto>,
        outputs: usize,
    ) -> Result<Vec<Tensor>> {
        let node = NodeProto {
            op_type: op.into(),
            name: "n".into(),
            input: inputs.iter().map(|(n, _)| n.to_string()).collect(),
            output: (0..outputs).map(|i| format!("o{i}")).collect(),
            attribute: attrs,
            ..Default::default()
        };
        let constants = HashMap::new();
        let ctx = Ctx {
            node: &node,
            batch: 1,
            declared_batch: None,
            constants: &constants,
        };
        let values: HashMap<String, Tensor> = inputs
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        eval(&ctx, &|n: &str| {
            values.get(n).cloned().ok_or_else(|| bad(format!("no {n}")))
        })
    }

    fn int_attr(name: &str, i: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            i,
            ..Default::default()
        }
    }

    #[test]
    fn pointwise_and_depthwise_convolutions_match_candles() {
        let cpu = &fam_core::candle::Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 6, 5, 7), cpu).unwrap();
        let b = Tensor::randn(0f32, 1., 6, cpu).unwrap();
        for (w, group) in [
            (Tensor::randn(0f32, 1., (6, 6, 1, 1), cpu).unwrap(), 1),
            (Tensor::randn(0f32, 1., (6, 1, 3, 3), cpu).unwrap(), 6),
        ] {
            let k = w.dims()[2];
            let pads = AttributeProto {
                name: "pads".into(),
                ints: vec![(k / 2) as i64; 4],
                ..Default::default()
            };
            let y = run(
                "Conv",
                &[("x", x.clone()), ("w", w.clone()), ("b", b.clone())],
                vec![int_attr("group", group), pads],
                1,
            )
            .unwrap()
            .remove(0);
            let want = x
                .conv2d(&w, k / 2, 1, 1, group as usize)
                .unwrap()
                .broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap())
                .unwrap();
            let d = (y - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "group {group}");
        }
    }

    #[test]
    fn hostile_shapes_are_errors() {
        let cpu = &fam_core::candle::Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, cpu).unwrap();
        let i64s = |v: &[i64]| Tensor::new(v, cpu).unwrap();
        let err = |r: Result<Vec<Tensor>>| r.unwrap_err().to_string();
        let e = err(run(
            "Reshape",
            &[("x", x.clone()), ("s", i64s(&[i64::MAX, i64::MAX, -1]))],
            vec![],
            1,
        ));
        assert!(e.contains("too many elements"), "{e}");
        let e = err(run(
            "Reshape",
            &[("x", x.clone()), ("s", i64s(&[-1, -1]))],
            vec![],
            1,
        ));
        assert!(e.contains("-1 (once)"), "{e}");
        let e = err(run(
            "Split",
            &[("x", x.clone()), ("s", i64s(&[i64::MAX, 4]))],
            vec![int_attr("axis", 1)],
            2,
        ));
        assert!(e.contains("do not add up to the axis length 3"), "{e}");
        let e = err(run(
            "Split",
            &[("x", x.clone())],
            vec![int_attr("axis", 1), int_attr("num_outputs", 1 << 40)],
            2,
        ));
        assert!(e.contains("parts for 2 outputs"), "{e}");
        let e = err(run(
            "Expand",
            &[("x", x.clone()), ("s", i64s(&[1 << 20, 1 << 20, 2, 3]))],
            vec![],
            1,
        ));
        assert!(e.contains("more than"), "{e}");
        let e = err(run("ConstantOfShape", &[("s", i64s(&[-2]))], vec![], 1));
        assert!(e.contains("negative dimension"), "{e}");
        let e = err(run(
            "Gather",
            &[("x", x.clone()), ("i", i64s(&[3]))],
            vec![int_attr("axis", 1)],
            1,
        ));
        assert!(
            e.contains("Gather index 3 is out of range for an axis of 3"),
            "{e}"
        );
        let f = |v: f32| Tensor::new(v, cpu).unwrap();
        let e = err(run(
            "Range",
            &[("a", f(0.0)), ("b", f(1e30)), ("c", f(1e-3))],
            vec![],
            1,
        ));
        assert!(e.contains("more than"), "{e}");
        let e = err(run(
            "Range",
            &[("a", f(0.0)), ("b", f(1.0)), ("c", f(0.0))],
            vec![],
            1,
        ));
        assert!(e.contains("not a finite range"), "{e}");
        // Integer inputs of float-only operators are computed in f32, not a panic.
        let n = run("Sqrt", &[("x", i64s(&[4, 9]))], vec![], 1).unwrap();
        assert_eq!(n[0].to_vec1::<f32>().unwrap(), vec![2.0, 3.0]);
        let n = run("Neg", &[("x", i64s(&[4, -9]))], vec![], 1).unwrap();
        assert_eq!(n[0].to_vec1::<i64>().unwrap(), vec![-4, 9]);
        // LayerNormalization returns only the outputs the node declares.
        let g = Tensor::ones(3, DType::F32, cpu).unwrap();
        assert_eq!(
            run(
                "LayerNormalization",
                &[("x", x.clone()), ("g", g.clone())],
                vec![],
                1
            )
            .unwrap()
            .len(),
            1
        );
        assert_eq!(
            run("LayerNormalization", &[("x", x), ("g", g)], vec![], 3)
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn broadcast_shapes() {
        assert_eq!(
            broadcast_shape(&[&[2, 1, 4], &[3, 1]]).unwrap(),
            vec![2, 3, 4]
        );
        assert!(broadcast_shape(&[&[2, 3], &[4, 3]]).is_err());
    }
}
