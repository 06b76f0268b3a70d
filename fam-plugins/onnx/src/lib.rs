//! fam plugin `onnx`: any ONNX CNN as a backbone, explained at any named value.
//!
//! ```toml
//! [backbone]
//! plugin = "onnx"
//! kind = "onnx"
//! weights = "model.onnx"
//! layer = "507"                  # any intermediate value (`fam-cli layers model.onnx`)
//! [backbone.options]
//! input = "input"                # default: the graph's first input
//! embedding = "output"           # "gap" (default): GAP of the layer; "output": the model's
//! output = "output"              #   own output, through its affine head (exact FAM)
//! size = [112, 112]              # input height, width (default: the graph's, else 224)
//! ```
//!
//! The model is parsed and its weights converted once; each batch evaluates only the nodes
//! the layer (and output) need, freeing intermediates after their last use.

pub mod external;
pub mod graph;
pub mod head;
pub mod lower;
pub mod ops;

use std::collections::HashMap;
use std::path::Path;

use fam_core::candle::{DType, Device, Tensor};
use fam_core::options::{self, serde::Deserialize};
use fam_core::plugin::{BackboneConfig, Registrar};
use fam_core::{Backbone, FamError, Features, InputSpec, LayerInfo, Problem, ResizePolicy, Result};

use graph::Graph;
use head::Head;

fam_core::export_plugin!(name: "onnx", register: register);

/// Registers the `onnx` backbone.
pub fn register(r: &mut Registrar) {
    r.backbone(
        "onnx",
        "any ONNX CNN; layer = a value name; embedding = \"gap\" or \"output\" (through an affine head)",
        validate_config,
        |cfg, device| Ok(Box::new(OnnxBackbone::load(cfg, device)?)),
    );
}

/// Options of the `onnx` backbone (`[backbone.options]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(crate = "fam_core::options::serde", deny_unknown_fields)]
pub struct OnnxOptions {
    /// The input value (default: the graph's first input).
    #[serde(default)]
    pub input: Option<String>,
    /// `gap` (default): GAP of the layer; `output`: the model's own output, through its
    /// affine head.
    #[serde(default)]
    pub embedding: Embedding,
    /// The embedding value with `embedding = "output"` (default: the graph's first output).
    #[serde(default)]
    pub output: Option<String>,
    /// Input `[height, width]` (default: the graph's declared size, else 224 x 224).
    #[serde(default)]
    pub size: Option<Vec<u32>>,
}

/// `embedding` of the `onnx` backbone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(crate = "fam_core::options::serde", rename_all = "lowercase")]
pub enum Embedding {
    #[default]
    Gap,
    Output,
}

/// What serde cannot check: `size` is two sides from 1 to 4096.
fn check_options(o: &OnnxOptions) -> Vec<Problem> {
    match &o.size {
        Some(s) if s.len() != 2 || s.iter().any(|v| !(1..=4096).contains(v)) => vec![Problem::new(
            "size",
            format!("{s:?} is not [height, width] (sides from 1 to 4096)"),
        )],
        _ => vec![],
    }
}

/// Checks a configuration (parses the model to check the layer name; loads no weights onto a device).
pub fn validate_config(cfg: &BackboneConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    match &cfg.weights {
        None => out.push(Problem::new(
            "weights",
            "the onnx backbone needs `weights = \"model.onnx\"`",
        )),
        Some(w) if w.extension().is_some_and(|e| e != "onnx") => out.push(Problem::new(
            "weights",
            format!("{} does not look like an ONNX model (.onnx)", w.display()),
        )),
        _ => {}
    }
    if cfg.layer.is_none() {
        out.push(Problem::new(
            "layer",
            "name the value to explain at (`fam-cli layers MODEL.onnx` lists them)",
        ));
    }
    out.extend(options::check(&cfg.options, "options", check_options));
    // Check the layer name against the graph: parsing the file is cheap next to a run.
    if let (Some(w), Some(layer)) = (&cfg.weights, &cfg.layer) {
        if w.is_file() {
            match Graph::load(w, &Device::Cpu) {
                Ok(g) => {
                    if !g.has_value(layer) {
                        let values = g.values();
                        let names: Vec<&str> = values.iter().map(|(n, _)| n.as_str()).collect();
                        let hint = fam_core::error::closest(layer, &names)
                            .map(|c| format!("; did you mean `{c}`?"))
                            .unwrap_or_default();
                        out.push(Problem::new(
                            "layer",
                            format!(
                                "no value `{layer}` in {}{hint} (`fam-cli layers {}` lists them)",
                                w.display(),
                                w.display()
                            ),
                        ));
                    }
                }
                Err(e) => out.push(Problem::new("weights", e.to_string())),
            }
        }
    }
    out
}

/// An ONNX model cut at a named value.
pub struct OnnxBackbone {
    graph: Graph,
    input: String,
    layer: String,
    output: Option<String>,
    plan: Vec<usize>,
    head: Option<Head>,
    spec: InputSpec,
    /// The graph lowered onto fam's engine (CPU); `None` runs the interpreter.
    engine: Option<lower::Lowered>,
}

impl std::fmt::Debug for OnnxBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OnnxBackbone({}@{})",
            self.graph.path.display(),
            self.layer
        )
    }
}

impl OnnxBackbone {
    pub fn load(cfg: &BackboneConfig, device: &Device) -> Result<Self> {
        let path = cfg
            .weights
            .as_deref()
            .ok_or_else(|| FamError::invalid("onnx needs `weights`"))?;
        let t = std::time::Instant::now();
        let graph = Graph::load(path, device)?;
        let me = Self::from_graph(graph, cfg, device)?;
        tracing::info!(model = %path.display(), layer = %me.layer, nodes = me.plan.len(), ms = t.elapsed().as_millis() as u64, "onnx model loaded");
        Ok(me)
    }

    /// The backbone over a parsed graph (`cfg.weights` is not read again).
    pub fn from_graph(graph: Graph, cfg: &BackboneConfig, device: &Device) -> Result<Self> {
        let path = graph.path.clone();
        let path = path.as_path();
        // Without a layer (e.g. `fam-cli layers`), the first output stands in.
        let layer = match cfg.layer.clone().or_else(|| graph.outputs.first().cloned()) {
            Some(l) => l,
            None => return Err(FamError::weights(path, "the graph declares no output")),
        };
        let options = options::load(&cfg.options, "options", check_options)?;
        let input = match options
            .input
            .clone()
            .or_else(|| graph.inputs.first().map(|i| i.0.clone()))
        {
            Some(i) => i,
            None => return Err(FamError::weights(path, "the graph has no input")),
        };
        let declared = graph
            .inputs
            .iter()
            .find(|(n, _)| *n == input)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| FamError::weights(path, format!("no graph input `{input}`")))?;
        let size = match options.size.as_deref() {
            Some(&[h, w]) => (h, w),
            _ => match declared.as_slice() {
                [_, _, h, w] if *h > 0 && *w > 0 => {
                    if *h > graph::MAX_INPUT_SIDE || *w > graph::MAX_INPUT_SIDE {
                        return Err(FamError::weights(
                            path,
                            format!(
                                "input `{input}` declares {h}x{w} pixels; at most {} a side is supported (set options.size)",
                                graph::MAX_INPUT_SIDE
                            ),
                        ));
                    }
                    (*h as u32, *w as u32)
                }
                _ => (224, 224),
            },
        };
        if !graph.has_value(&layer) {
            return Err(FamError::weights(
                path,
                format!("no value `{layer}` in the graph"),
            ));
        }
        let output = match options.embedding {
            Embedding::Output => Some(match options.output {
                Some(o) => o,
                None => graph
                    .outputs
                    .first()
                    .cloned()
                    .ok_or_else(|| FamError::weights(path, "the graph declares no output"))?,
            }),
            Embedding::Gap => None,
        };
        let mut targets = vec![layer.as_str()];
        if let Some(o) = &output {
            targets.push(o.as_str());
        }
        let plan = graph.plan(&targets)?;
        let spec = InputSpec {
            resize: ResizePolicy::Exact {
                width: size.1,
                height: size.0,
            },
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        };
        let mut me = Self {
            graph,
            input,
            layer,
            output,
            plan,
            head: None,
            spec,
            engine: None,
        };
        if device.is_cpu() && std::env::var("FAM_ONNX_ENGINE").as_deref() != Ok("off") {
            let mut targets = vec![me.layer.as_str()];
            if let Some(o) = &me.output {
                targets.push(o.as_str());
            }
            let dims = [1, 3, size.0 as usize, size.1 as usize];
            let lowered = lower::lower(&me.graph, &me.plan, &me.input, &targets, &dims)?;
            tracing::info!(
                model = %path.display(),
                engine_nodes = lowered.native,
                interpreted_nodes = lowered.external,
                steps = lowered.program.counts().0,
                "onnx graph lowered onto the engine"
            );
            me.engine = Some(lowered);
        }
        if let Some(o) = me.output.clone() {
            // One probe batch gives the layer's shape; the head is then built on zeros.
            let probe =
                Tensor::zeros((1, 3, size.0 as usize, size.1 as usize), DType::F32, device)?;
            let maps = me
                .run(&probe)?
                .remove(&me.layer)
                .ok_or_else(|| FamError::invalid("layer not computed"))?;
            let head = Head::build(&me.graph, &me.layer, &o, maps.dims())?;
            tracing::info!(head = %head::describe(&head), "affine head after the feature layer");
            me.head = Some(head);
        }
        Ok(me)
    }

    fn run(&self, batch: &Tensor) -> Result<HashMap<String, Tensor>> {
        let mut targets = vec![self.layer.as_str()];
        if let Some(o) = &self.output {
            targets.push(o.as_str());
        }
        if let Some(e) = &self.engine {
            let outs = e
                .program
                .run(std::slice::from_ref(batch))
                .map_err(|err| match err {
                    FamError::Invalid(m) => FamError::weights(&self.graph.path, m),
                    other => other,
                })?;
            return Ok(targets.iter().map(|t| t.to_string()).zip(outs).collect());
        }
        let feeds = HashMap::from([(self.input.clone(), batch.clone())]);
        self.graph.run(&self.plan, feeds, &targets)
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Steps of the engine program after rewrites, and how many of them run on engine
    /// kernels (`None` when the model runs on the interpreter).
    pub fn engine_counts(&self) -> Option<(usize, usize)> {
        self.engine.as_ref().map(|e| e.program.counts())
    }
}

impl Backbone for OnnxBackbone {
    fn describe(&self) -> String {
        let name = Path::new(&self.graph.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match &self.output {
            Some(o) => format!("{name}@{} (embedding: {o})", self.layer),
            None => format!("{name}@{}", self.layer),
        }
    }
    fn input_spec(&self) -> InputSpec {
        self.spec.clone()
    }
    fn device(&self) -> Device {
        self.graph.device.clone()
    }
    fn forward(&self, batch: &Tensor) -> Result<Features> {
        let mut out = self.run(batch)?;
        let maps = out
            .remove(&self.layer)
            .ok_or_else(|| FamError::invalid("layer not computed"))?;
        if maps.rank() != 4 {
            return Err(FamError::invalid(format!(
                "layer `{}` has shape {:?}; FAM needs a 4-D feature map [B, C, h, w]",
                self.layer,
                maps.dims()
            )));
        }
        let maps = maps.to_dtype(DType::F32)?;
        match &self.output {
            None => Features::from_maps(maps),
            Some(o) => {
                let z = out
                    .remove(o)
                    .ok_or_else(|| FamError::invalid("output not computed"))?;
                let b = maps.dims()[0];
                let embeddings = z
                    .to_dtype(DType::F32)?
                    .reshape((b, z.elem_count() / b.max(1)))?;
                Ok(Features { maps, embeddings })
            }
        }
    }
    fn layers(&self) -> Result<Vec<LayerInfo>> {
        let (h, w) = self.spec.input_size();
        let probe = Tensor::zeros(
            (1, 3, h as usize, w as usize),
            DType::F32,
            &self.graph.device,
        )?;
        let values = self.graph.values();
        let names: Vec<&str> = values.iter().map(|(n, _)| n.as_str()).collect();
        let plan = self.graph.plan(&names)?;
        let out = self
            .graph
            .run(&plan, HashMap::from([(self.input.clone(), probe)]), &names)?;
        Ok(values
            .iter()
            .map(|(n, op)| LayerInfo {
                name: n.clone(),
                op: op.clone(),
                shape: out.get(n).map(|t| t.dims().to_vec()).unwrap_or_default(),
            })
            .collect())
    }
    fn pullback(&self, u: &Tensor) -> Result<Option<(Tensor, Vec<f32>)>> {
        match &self.head {
            None => Ok(None),
            Some(h) => Ok(Some((h.pullback(u)?, h.offset.clone()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(options: &str) -> BackboneConfig {
        BackboneConfig {
            kind: "onnx".into(),
            weights: Some("missing.onnx".into()),
            layer: Some("x".into()),
            options: fam_core::toml::from_str(options).unwrap(),
        }
    }

    fn problems(options: &str) -> Vec<String> {
        validate_config(&cfg(options))
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn options_are_typed() {
        assert_eq!(
            problems("embedding = \"output\"\nsize = [112, 96]"),
            Vec::<String>::new()
        );
        let o: OnnxOptions =
            options::parse(&cfg("size = [112, 96]\ninput = \"x\"").options).unwrap();
        assert_eq!(o.size, Some(vec![112, 96]));
        assert_eq!(o.embedding, Embedding::Gap);
        let p = problems("embedding = \"pool\"\nsize = [1, 2, 3]\ninput = 3\noutptu = \"z\"");
        assert_eq!(p.len(), 4, "{p:?}");
        for needle in [
            "options.embedding: unknown variant `pool`, expected `gap` or `output`",
            "options.size: [1, 2, 3] is not [height, width]",
            "options.input: invalid type: integer `3`, expected a string",
            "options.outptu: unknown option `outptu`; did you mean `output`?",
        ] {
            assert!(p.iter().any(|p| p.contains(needle)), "{needle}: {p:?}");
        }
        assert!(problems("size = [0, 5000]")[0].contains("is not [height, width]"));
    }
}
