//! The objects a pipeline needs, created from its plugins once per run.

use std::path::PathBuf;

use fam_core::candle::Device;
use fam_core::error::{FamError, Result};
use fam_core::traits::{Backbone, InputSpec, Renderer, Similarity};

use crate::loader::PluginHost;
use crate::pipeline::LoadedPipeline;

/// Options that override the pipeline from the command line.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub device: Option<String>,
    pub output: Option<PathBuf>,
    /// Run only this part of the items (`--shard K/N`).
    pub shard: Option<crate::pipeline::Shard>,
    /// Reuse the forward passes an interrupted run left in the output folder's checkpoint
    /// (`--resume`).
    pub resume: bool,
}

/// The objects a pipeline needs, created from its plugins. Creating them loads the model.
pub struct Session {
    pub backbone: Box<dyn Backbone>,
    pub similarity: Box<dyn Similarity>,
    pub renderers: Vec<Box<dyn Renderer>>,
    pub spec: InputSpec,
    pub device: Device,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({})", self.backbone.describe())
    }
}

impl Session {
    /// Validates the pipeline (every problem at once), then loads the model and plugins.
    pub fn open(p: &LoadedPipeline, host: &mut PluginHost, opts: &RunOptions) -> Result<Self> {
        let problems = p.validate(host, opts.device.as_deref());
        if !problems.is_empty() {
            return Err(FamError::Validation {
                path: p.path.clone(),
                problems,
            });
        }
        let pl = &p.pipeline;
        let device = crate::device::open_device(opts.device.as_deref().unwrap_or(&pl.run.device))?;
        let backbone = host
            .backbone(&pl.backbone.plugin, &pl.backbone.kind)?
            .create(&p.backbone_config(), &device)?;
        let similarity = host
            .similarity(&pl.similarity.plugin, &pl.similarity.kind)?
            .create(&pl.similarity.options)?;
        let renderers = pl
            .render
            .iter()
            .map(|r| host.renderer(&r.plugin, &r.kind)?.create(&r.options))
            .collect::<Result<Vec<_>>>()?;
        let mut spec = backbone.input_spec();
        if let Some(pre) = &pl.preprocess {
            spec = pre.apply(spec);
        }
        Ok(Self {
            backbone,
            similarity,
            renderers,
            spec,
            device,
        })
    }
}
