//! A small ONNX graph executor on candle: the model is parsed once and its weights converted
//! to tensors once (on the target device); a run evaluates only the nodes the requested
//! values need, and drops each intermediate value after its last use.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_onnx::onnx::{self, NodeProto};
use fam_core::candle::{Device, Tensor};
use fam_core::{FamError, Result};

use crate::ops;

use crate::external;

/// A parsed ONNX model, ready to run.
pub struct Graph {
    pub path: PathBuf,
    pub nodes: Vec<NodeProto>,
    /// Initializers and `Constant` outputs, converted once.
    pub constants: HashMap<String, Tensor>,
    /// The (non-initializer) graph inputs, with their declared shapes (0 = dynamic).
    pub inputs: Vec<(String, Vec<i64>)>,
    pub outputs: Vec<String>,
    /// Which node produces each value.
    producer: HashMap<String, usize>,
    pub device: Device,
    /// Declared batch size of the first input (1 in many exports), for `Reshape` targets that
    /// hard-code it.
    pub declared_batch: Option<i64>,
    /// The default-domain opset the model imports (0 when it declares none).
    pub opset: i64,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Graph({}, {} nodes)",
            self.path.display(),
            self.nodes.len()
        )
    }
}

fn err(path: &Path, msg: impl Into<String>) -> FamError {
    FamError::weights(path, msg.into())
}

/// Largest model file read (ONNX protobufs are limited to 2 GiB anyway).
pub const MAX_MODEL_BYTES: u64 = 2 << 30;

/// Largest input height or width accepted from a model's declared input shape.
pub const MAX_INPUT_SIDE: i64 = 4096;

impl Graph {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| FamError::io(path, e))?;
        if meta.len() > MAX_MODEL_BYTES {
            return Err(err(
                path,
                format!("{} bytes is larger than an ONNX model can be", meta.len()),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| FamError::io(path, e))?;
        Self::from_bytes(&bytes, path, device)
    }

    /// Parses a model from its bytes (`path` names it in messages). Untrusted input: every
    /// problem is an error, sizes are bounded (see [`MAX_INPUT_SIDE`]).
    pub fn from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Self> {
        use prost::Message;
        let model = onnx::ModelProto::decode(bytes).map_err(|e| {
            // Keep the first line only (no backtraces in user-facing messages).
            let msg = e.to_string();
            let msg = msg.lines().next().unwrap_or_default().to_string();
            err(path, format!("not a readable ONNX model: {msg}"))
        })?;
        let opset = model
            .opset_import
            .iter()
            .find(|o| is_default_domain(&o.domain))
            .map(|o| o.version)
            .unwrap_or(0);
        let graph = model
            .graph
            .ok_or_else(|| err(path, "the model has no graph"))?;
        // External data lives beside the model.
        let model_dir = path.parent().unwrap_or(Path::new(""));
        let mut constants = HashMap::new();
        for t in &graph.initializer {
            let v = external::tensor_from_proto(t, model_dir)
                .map_err(|e| err(path, format!("initializer `{}`: {e}", t.name)))
                .and_then(|v| Ok(v.to_device(device)?))?;
            constants.insert(t.name.clone(), v);
        }
        let mut nodes = Vec::new();
        for n in graph.node {
            if n.op_type == "Constant" && is_default_domain(&n.domain) {
                let name = if n.name.is_empty() {
                    n.output.first().cloned().unwrap_or_default()
                } else {
                    n.name.clone()
                };
                let v = constant_value(&n, model_dir)
                    .map_err(|e| err(path, format!("Constant node `{name}`: {e}")))
                    .and_then(|v| Ok(v.to_device(device)?))?;
                for o in &n.output {
                    constants.insert(o.clone(), v.clone());
                }
                continue;
            }
            let mut n = n;
            mark_legacy(&mut n, opset);
            nodes.push(n);
        }
        if let Some(message) = unsupported_report(&nodes) {
            return Err(FamError::UnsupportedOperator {
                path: path.to_path_buf(),
                message,
            });
        }
        let inputs: Vec<(String, Vec<i64>)> = graph
            .input
            .iter()
            .filter(|i| !constants.contains_key(&i.name))
            .map(|i| (i.name.clone(), value_shape(i)))
            .collect();
        if inputs.is_empty() {
            return Err(err(path, "the graph has no input"));
        }
        let mut producer = HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.clone(), i);
            }
        }
        let declared_batch = inputs[0].1.first().copied().filter(|b| *b > 0);
        Ok(Self {
            path: path.to_path_buf(),
            nodes,
            constants,
            outputs: graph.output.iter().map(|o| o.name.clone()).collect(),
            inputs,
            producer,
            device: device.clone(),
            declared_batch,
            opset,
        })
    }

    /// Every value a layer can be taken from: node outputs, in graph order, with op types.
    pub fn values(&self) -> Vec<(String, String)> {
        self.nodes
            .iter()
            .flat_map(|n| n.output.iter().map(move |o| (o.clone(), n.op_type.clone())))
            .collect()
    }

    pub fn has_value(&self, name: &str) -> bool {
        self.producer.contains_key(name) || self.constants.contains_key(name)
    }

    /// The nodes needed to compute `targets`, in graph order.
    pub fn plan(&self, targets: &[&str]) -> Result<Vec<usize>> {
        let mut needed = HashSet::new();
        let mut stack: Vec<String> = targets.iter().map(|s| s.to_string()).collect();
        while let Some(v) = stack.pop() {
            if let Some(&i) = self.producer.get(&v) {
                if needed.insert(i) {
                    stack.extend(
                        self.nodes[i]
                            .input
                            .iter()
                            .filter(|s| !s.is_empty())
                            .cloned(),
                    );
                }
            } else if !self.constants.contains_key(&v) && !self.inputs.iter().any(|(n, _)| *n == v)
            {
                return Err(err(
                    &self.path,
                    format!("no value named `{v}` in the graph"),
                ));
            }
        }
        let mut order: Vec<usize> = needed.into_iter().collect();
        order.sort_unstable();
        Ok(order)
    }

    /// Runs the nodes in `plan` on `feeds`, returning the `targets`. Intermediates are
    /// dropped after their last use.
    pub fn run(
        &self,
        plan: &[usize],
        feeds: HashMap<String, Tensor>,
        targets: &[&str],
    ) -> Result<HashMap<String, Tensor>> {
        let mut last_use: HashMap<&str, usize> = HashMap::new();
        for (step, &i) in plan.iter().enumerate() {
            for inp in &self.nodes[i].input {
                last_use.insert(inp.as_str(), step);
            }
        }
        let keep: HashSet<&str> = targets.iter().copied().collect();
        let mut values: HashMap<String, Tensor> = feeds;
        let batch = values
            .values()
            .next()
            .map(|t| t.dims().first().copied().unwrap_or(1));
        for (step, &i) in plan.iter().enumerate() {
            let node = &self.nodes[i];
            let get = |name: &str| -> Result<Tensor> {
                values
                    .get(name)
                    .or_else(|| self.constants.get(name))
                    .cloned()
                    .ok_or_else(|| {
                        err(
                            &self.path,
                            format!(
                                "node `{}` ({}): input `{name}` is not available",
                                node.name, node.op_type
                            ),
                        )
                    })
            };
            let ctx = ops::Ctx {
                node,
                batch: batch.unwrap_or(1),
                declared_batch: self.declared_batch,
                constants: &self.constants,
            };
            let outs = ops::eval_guarded(&ctx, &get);
            let outs = outs.map_err(|e| match e {
                FamError::Weights { .. } => e,
                other => err(
                    &self.path,
                    format!("node `{}` ({}): {other}", node.name, node.op_type),
                ),
            })?;
            for (name, v) in node.output.iter().zip(outs) {
                values.insert(name.clone(), v);
            }
            // Free what no later node reads.
            for inp in &node.input {
                if last_use.get(inp.as_str()) == Some(&step) && !keep.contains(inp.as_str()) {
                    values.remove(inp);
                }
            }
        }
        targets
            .iter()
            .map(|t| {
                values
                    .remove(*t)
                    .or_else(|| self.constants.get(*t).cloned())
                    .map(|v| (t.to_string(), v))
                    .ok_or_else(|| err(&self.path, format!("value `{t}` was not computed")))
            })
            .collect()
    }
}

fn value_shape(v: &onnx::ValueInfoProto) -> Vec<i64> {
    use onnx::tensor_shape_proto::dimension::Value;
    use onnx::type_proto::Value as TV;
    let Some(t) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return vec![];
    };
    let TV::TensorType(tt) = t else { return vec![] };
    tt.shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(Value::DimValue(v)) => *v,
                    _ => 0,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a node's domain is the default ONNX operator set.
fn is_default_domain(domain: &str) -> bool {
    domain.is_empty() || domain == "ai.onnx"
}

/// The value of a `Constant` node, in any of its attribute forms (`value`, and since opset
/// 12 `value_float(s)`, `value_int(s)`).
fn constant_value(n: &NodeProto, model_dir: &Path) -> std::result::Result<Tensor, String> {
    let cpu = &Device::Cpu;
    let attr = n.attribute.first().ok_or("it has no value attribute")?;
    let built = match attr.name.as_str() {
        "value" => {
            let t = attr.t.as_ref().ok_or("attribute `value` holds no tensor")?;
            return external::tensor_from_proto(t, model_dir);
        }
        "value_float" => Tensor::new(attr.f, cpu),
        "value_floats" => Tensor::new(attr.floats.as_slice(), cpu),
        "value_int" => Tensor::new(attr.i, cpu),
        "value_ints" => Tensor::new(attr.ints.as_slice(), cpu),
        other @ ("sparse_value" | "value_string" | "value_strings") => {
            return Err(format!("attribute `{other}` is not supported"))
        }
        other => return Err(format!("unknown attribute `{other}`")),
    };
    built.map_err(|e| e.to_string().lines().next().unwrap_or_default().to_string())
}

/// Every operator of `nodes` that [`ops::eval`] does not implement, with its node count, in
/// one message (most frequent first); `None` when all are supported.
pub fn unsupported_report(nodes: &[NodeProto]) -> Option<String> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for n in nodes {
        let name = if is_default_domain(&n.domain) {
            if ops::SUPPORTED.binary_search(&n.op_type.as_str()).is_ok() {
                continue;
            }
            n.op_type.clone()
        } else {
            format!("{}.{}", n.domain, n.op_type)
        };
        *counts.entry(name).or_default() += 1;
    }
    if counts.is_empty() {
        return None;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    // A hostile file may name thousands: list the first ones.
    const LISTED: usize = 20;
    let mut list: Vec<String> = counts
        .iter()
        .take(LISTED)
        .map(|(o, c)| {
            // Names come from the file: keep them printable and short.
            let o: String = o.chars().filter(|c| !c.is_control()).take(80).collect();
            format!("`{o}` ({c} node{})", if *c == 1 { "" } else { "s" })
        })
        .collect();
    let k = counts.len();
    if k > LISTED {
        list.push(format!("and {} more", k - LISTED));
    }
    Some(format!(
        "{k} operator{} not supported: {}; supported: {}",
        if k == 1 { " is" } else { "s are" },
        list.join(", "),
        ops::SUPPORTED.join(", ")
    ))
}

/// Operators whose meaning changed at opset 13 without a change of inputs or attributes
/// (`Softmax`'s axis): the loader marks them with [`ops::LEGACY_ATTR`] in older models.
fn mark_legacy(n: &mut NodeProto, opset: i64) {
    if (1..13).contains(&opset)
        && is_default_domain(&n.domain)
        && matches!(n.op_type.as_str(), "Softmax" | "LogSoftmax")
    {
        n.attribute.push(onnx::AttributeProto {
            name: ops::LEGACY_ATTR.into(),
            r#type: onnx::attribute_proto::AttributeType::Int as i32,
            i: 1,
            ..Default::default()
        });
    }
}
