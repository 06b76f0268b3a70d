//! ONNX operators used by CNN exports, on candle tensors (NCHW, f32 data, i64 shapes).
//! Each follows the ONNX specification, including the attribute forms that changed between
//! opsets (Clip's bounds, ReduceMean's and Squeeze's axes as attributes or inputs).

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

/// Runs one node. `get` returns an input value by name.
pub fn eval(ctx: &Ctx, get: &dyn Fn(&str) -> Result<Tensor>) -> Result<Vec<Tensor>> {
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
        "ReduceMean" => {
            let v = x(0)?;
            let axes = match opt(1)? {
                Some(t) => Some(to_i64s(&t)?),
                None => ctx.ints("axes"),
            };
            let keep = ctx.int("keepdims", 1) != 0;
            let mut axes: Vec<usize> = match axes {
                Some(a) if !a.is_empty() => a
                    .iter()
                    .map(|&a| axis(a, v.rank()))
                    .collect::<Result<_>>()?,
                _ if ctx.int("noop_with_empty_axes", 0) != 0 => return Ok(vec![v]),
                _ => (0..v.rank()).collect(),
            };
            axes.sort_unstable();
            let mut y = v;
            for &a in axes.iter().rev() {
                y = if keep { y.mean_keepdim(a)? } else { y.mean(a)? };
            }
            y
        }
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
            let v = x(0)?;
            let dims: Vec<i64> = v.dims().iter().map(|&d| d as i64).collect();
            Tensor::new(dims.as_slice(), v.device())?
        }
        "Gather" => {
            let (v, idx) = (x(0)?, x(1)?);
            let a = axis(ctx.int("axis", 0), v.rank())?;
            let n = v.dims()[a] as i64;
            let ids: Vec<u32> = to_i64s(&idx)?
                .iter()
                .map(|&i| (if i < 0 { i + n } else { i }) as u32)
                .collect();
            let scalar = idx.rank() == 0;
            let sel = v.index_select(&Tensor::new(ids.as_slice(), v.device())?, a)?;
            if scalar {
                sel.squeeze(a)?
            } else {
                sel
            }
        }
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
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Clip",
    "Concat",
    "Constant",
    "Conv",
    "Div",
    "Dropout",
    "Flatten",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LeakyRelu",
    "MatMul",
    "MaxPool",
    "Mul",
    "PRelu",
    "Pad",
    "ReduceMean",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
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
    let known: i64 = out.iter().filter(|&&s| s != -1).product();
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
