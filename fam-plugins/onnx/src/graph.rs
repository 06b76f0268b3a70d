//! A small ONNX graph executor on candle: the model is parsed once and its weights converted
//! to tensors once (on the target device); a run evaluates only the nodes the requested
//! values need, and drops each intermediate value after its last use.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_onnx::onnx::{self, NodeProto};
use fam_core::candle::{Device, Tensor};
use fam_core::{FamError, Result};

use crate::ops;

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
        let graph = model
            .graph
            .ok_or_else(|| err(path, "the model has no graph"))?;
        let mut constants = HashMap::new();
        for t in &graph.initializer {
            let v = candle_onnx::eval::get_tensor(t, &t.name)
                .and_then(|v| v.to_device(device))
                .map_err(|e| err(path, format!("initializer `{}`: {e}", t.name)))?;
            constants.insert(t.name.clone(), v);
        }
        let mut nodes = Vec::new();
        for n in graph.node {
            if n.op_type == "Constant" {
                let value = n
                    .attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_ref())
                    .ok_or_else(|| {
                        err(
                            path,
                            format!("Constant node `{}` without a tensor value", n.name),
                        )
                    })?;
                let v = candle_onnx::eval::get_tensor(value, &n.name)
                    .and_then(|v| v.to_device(device))
                    .map_err(|e| err(path, format!("Constant `{}`: {e}", n.name)))?;
                for o in &n.output {
                    constants.insert(o.clone(), v.clone());
                }
                continue;
            }
            nodes.push(n);
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
            // candle panics on some operator and dtype combinations (e.g. `sqrt` of an
            // integer tensor): a hostile or odd model gets an error, not a crash.
            let outs =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ops::eval(&ctx, &get)))
                    .unwrap_or_else(|p| {
                        let msg = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        Err(FamError::invalid(format!(
                            "cannot be evaluated on its inputs ({msg})"
                        )))
                    });
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
