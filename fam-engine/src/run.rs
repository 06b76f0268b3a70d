//! Running a pipeline: plugins → images → forward passes (once per image, batched) →
//! similarity contributions → FAM maps (batched) → renderers → `manifest.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fam_core::candle::{Device, Tensor};

use crate::cache::FeatureCache;
use fam_core::error::{CandleContext, FamError, Result};
use fam_core::explain::{
    channel_weights, contrast_raw, embedding_weights, fam_raw, fam_raw_spatial,
    normalize_contributions, Comparison, Explanation, ImageRecord, Map2, RunInfo, SaliencyMap,
    Side, Target, Weighting,
};
use crate::output::{safe_stem, write_atomic, OutputDir};
use crate::pipeline::{LoadedPipeline, TaskSection};
use crate::loader::PluginHost;
use crate::preprocess::{self, Prepared};
use fam_core::traits::{Backbone, InputSpec, Renderer, Similarity};

/// Progress reporting; the CLI draws bars, a library user may ignore it.
pub trait Progress: Sync {
    fn stage(&self, _name: &str, _total: u64) {}
    fn advance(&self, _n: u64) {}
    fn finish_stage(&self) {}
}

/// A progress sink that shows nothing.
#[derive(Debug, Default)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// An item that could not be completed, with the reason.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub item: String,
    pub error: String,
}

impl Failure {
    /// The task item this failure belongs to (`pair N`, or `query PATH`), if it is one; a
    /// gallery, support or bank image, or a renderer, is not an item of the run.
    pub fn item_key(&self) -> Option<&str> {
        if let Some(rest) = self.item.strip_prefix("pair ") {
            let n = rest.split(' ').next().unwrap_or(rest);
            return Some(&self.item[..5 + n.len()]);
        }
        if self.item.starts_with("query ") {
            return Some(self.item.split(" hit ").next().unwrap_or(&self.item));
        }
        None
    }
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub output: PathBuf,
    pub items_total: usize,
    pub items_ok: usize,
    pub failures: Vec<Failure>,
    pub files_written: usize,
    pub counts: Counts,
    pub timings_ms: Timings,
}

/// How much work the run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Counts {
    /// Images that went through the backbone.
    pub images_forwarded: usize,
    /// Gallery embeddings and feature maps read from the cache instead.
    pub cache_hits: usize,
    /// Images whose embedding and feature maps came from the checkpoint of an interrupted
    /// run (`--resume`) instead of the backbone.
    pub resumed: usize,
    /// Output files an interrupted run of the same pipeline left complete, kept instead of
    /// being rendered again (`--resume`).
    pub files_reused: usize,
}

pub use fam_core::host::{check_interrupt, request_interrupt};

/// Wall time of each stage, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub load_models: f64,
    pub decode_preprocess: f64,
    pub forward: f64,
    pub fam: f64,
    pub render: f64,
    pub total: f64,
}

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

/// The forward-pass checkpoint of a run: `<output>/.fam-checkpoint/`.
///
/// Each batch's embeddings and feature maps are saved there as it completes (keyed by the
/// model and each image's content, like the gallery cache). A run that finishes deletes it;
/// an interrupted one leaves it, and `--resume` reads it back instead of running the
/// backbone again. A run without `--resume` starts with an empty checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpointing {
    /// No checkpoint (benchmarks, evaluation).
    Off,
    /// Start a new checkpoint, dropping one left by an earlier run.
    Fresh,
    /// Reuse what an interrupted run saved.
    Resume,
}

/// The checkpoint folder inside an output folder.
pub const CHECKPOINT_DIR: &str = ".fam-checkpoint";

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

/// Embeddings and feature maps of a set of images, each computed once.
#[derive(Debug)]
pub struct Embedded {
    /// Per input image: its index into `maps`/`embeddings`, or the error that stopped it.
    pub slot: Vec<std::result::Result<usize, String>>,
    pub views: Vec<Prepared>,
    /// `[N, C, h, w]` on the backbone's device, for the N images that succeeded.
    pub maps: Option<Tensor>,
    pub embeddings: Vec<Vec<f32>>,
}

/// Decodes, preprocesses and embeds `paths` in batches of `batch_size`. A file that cannot
/// be read is reported in `slot` and the others go on.
/// With `keep_maps = false` only embeddings are kept (a gallery's maps are not needed).
#[allow(clippy::too_many_arguments)]
pub fn embed_images(
    backbone: &dyn Backbone,
    spec: &InputSpec,
    paths: &[PathBuf],
    batch_size: usize,
    keep_maps: bool,
    progress: &dyn Progress,
    timings: &mut Timings,
    counts: &mut Counts,
    checkpoint: Option<&FeatureCache>,
) -> Result<Embedded> {
    let t0 = Instant::now();
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let prepared = preprocess::prepare_files(&refs, spec);
    timings.decode_preprocess += ms(t0);

    let mut slot = Vec::with_capacity(paths.len());
    let mut views = Vec::new();
    let mut keys = Vec::new();
    for (path, r) in paths.iter().zip(prepared) {
        match r {
            Ok(p) => {
                slot.push(Ok(views.len()));
                views.push(p);
                keys.push(checkpoint.and_then(|_| checkpoint_key(path)));
            }
            Err(e) => {
                tracing::warn!(image = %path.display(), error = %e, "skipping image");
                slot.push(Err(e.to_string()));
            }
        }
    }

    let t1 = Instant::now();
    let device = backbone.device();
    // What an interrupted run already computed.
    let mut restored: Vec<Option<(Vec<f32>, Option<Tensor>)>> = vec![None; views.len()];
    if let Some(c) = checkpoint {
        for (r, key) in restored.iter_mut().zip(&keys) {
            let Some(key) = key else { continue };
            let Some(e) = c.embedding(key) else { continue };
            if !keep_maps {
                *r = Some((e, None));
                continue;
            }
            if let Some((shape, data)) = c.maps(key) {
                let t = Tensor::from_vec(data, (1, shape[0], shape[1], shape[2]), &device)?;
                *r = Some((e, Some(t)));
            }
        }
    }
    let todo: Vec<usize> = (0..views.len())
        .filter(|&i| restored[i].is_none())
        .collect();
    counts.resumed += views.len() - todo.len();
    if todo.len() < views.len() {
        tracing::info!(
            images = views.len(),
            restored = views.len() - todo.len(),
            "resuming from the checkpoint"
        );
    }

    progress.stage("forward", todo.len() as u64);
    let mut maps = Vec::new();
    let mut embeddings = Vec::with_capacity(views.len());
    let mut batch_shapes: Option<(Vec<usize>, usize)> = None;
    for chunk in todo.chunks(batch_size.max(1)) {
        check_interrupt()?;
        let items: Vec<&Prepared> = chunk.iter().map(|&i| &views[i]).collect();
        let batch = preprocess::batch_tensor(&items, &device)?;
        let f = backbone.forward(&batch)?;
        let (b, _, _, _) = f
            .maps
            .dims4()
            .ctx("backbone feature maps must be [B, C, h, w]")?;
        let (be, _) = f
            .embeddings
            .dims2()
            .ctx("backbone embeddings must be [B, C]")?;
        // The embedding may have another size than the channel count where the backbone
        // pulls weights back through its own head (flattened maps, an FC or GDConv head).
        if b != chunk.len() || be != b {
            return Err(FamError::invalid(format!(
                "backbone returned maps {:?} and embeddings {:?} for a batch of {}",
                f.maps.dims(),
                f.embeddings.dims(),
                chunk.len()
            )));
        }
        // Every batch must have the same shapes, or maps and embeddings of different images
        // could not be combined.
        let shapes = (f.maps.dims()[1..].to_vec(), f.embeddings.dims()[1]);
        match &batch_shapes {
            None => batch_shapes = Some(shapes),
            Some(first) if *first != shapes => {
                return Err(FamError::invalid(format!(
                    "backbone `{}` returned feature maps {:?} with {}-d embeddings for one batch but {:?} with {}-d embeddings for another; every image must get the same shapes",
                    backbone.describe(),
                    first.0,
                    first.1,
                    shapes.0,
                    shapes.1
                )))
            }
            Some(_) => {}
        }
        let batch_emb = f
            .embeddings
            .to_dtype(fam_core::candle::DType::F32)?
            .to_vec2::<f32>()
            .ctx("copy embeddings to host")?;
        if let Some(c) = checkpoint {
            save_checkpoint(c, chunk, &keys, &batch_emb, keep_maps.then_some(&f.maps))?;
        }
        embeddings.extend(batch_emb);
        if keep_maps {
            maps.push(f.maps);
        }
        counts.images_forwarded += chunk.len();
        progress.advance(chunk.len() as u64);
    }
    progress.finish_stage();
    // Put restored images back in their places.
    if todo.len() < views.len() {
        let computed = if maps.is_empty() {
            None
        } else {
            Some(Tensor::cat(&maps, 0).ctx("concatenate feature maps")?)
        };
        let mut fresh = embeddings.into_iter();
        let mut next_fresh = 0;
        embeddings = Vec::with_capacity(views.len());
        maps = Vec::new();
        for r in restored {
            match r {
                Some((e, m)) => {
                    embeddings.push(e);
                    maps.extend(m);
                }
                None => {
                    embeddings.push(fresh.next().expect("one embedding per computed image"));
                    if let Some(c) = &computed {
                        maps.push(c.narrow(0, next_fresh, 1)?);
                    }
                    next_fresh += 1;
                }
            }
        }
    }
    let maps = if maps.is_empty() {
        None
    } else {
        Some(Tensor::cat(&maps, 0).ctx("concatenate feature maps")?)
    };
    timings.forward += ms(t1);
    Ok(Embedded {
        slot,
        views,
        maps,
        embeddings,
    })
}

/// The checkpoint key of an image file: its absolute path, size and modification time (the
/// model is in the checkpoint folder's name). A checkpoint lives only until its run
/// finishes, so a file's identity is enough, and it costs a `stat`, not a second read.
fn checkpoint_key(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let modified = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    let abs = std::fs::canonicalize(path).ok()?;
    let id = format!("{}\n{}\n{modified}", abs.display(), meta.len());
    Some(crate::cache::sha256_hex(id.as_bytes()))
}

/// Saves one batch's embeddings (and feature maps) to the checkpoint.
fn save_checkpoint(
    c: &FeatureCache,
    chunk: &[usize],
    keys: &[Option<String>],
    embeddings: &[Vec<f32>],
    maps: Option<&Tensor>,
) -> Result<()> {
    for (j, &i) in chunk.iter().enumerate() {
        let Some(key) = &keys[i] else { continue };
        if let Some(m) = maps {
            let m = m.get(j)?.to_dtype(fam_core::candle::DType::F32)?;
            let shape = m.dims().to_vec();
            let data = m.flatten_all()?.to_vec1::<f32>()?;
            c.put_maps(key, &shape, &data)?;
        }
        // The embedding last: an entry counts once its embedding is there.
        c.put_embedding(key, &embeddings[j])?;
    }
    Ok(())
}

pub(crate) fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// One map to compute: explain image `image` with respect to embedding `reference`.
pub(crate) struct MapJob {
    pub image: usize,
    /// Channel weights (GAP backbones).
    pub weights: Vec<f32>,
    /// Embedding-space weights, pulled back through an affine head where there is one.
    pub u: Vec<f32>,
}

impl MapJob {
    /// The job explaining why `e` matches `r` rather than the `others` (`contrast =
    /// "others"`): channel weights from `c(e, r) − mean_j c(e, r_j)`, and the matching
    /// embedding-space weights for backbones with a head.
    pub fn contrast(
        similarity: &dyn Similarity,
        weighting: Weighting,
        image: usize,
        e: &[f32],
        r: &[f32],
        others: &[&[f32]],
    ) -> Result<Self> {
        let mut job = Self::new(similarity, weighting, image, e, r)?;
        if others.is_empty() || weighting == Weighting::Activation {
            return Ok(job);
        }
        // One pass over the references gives both the channel weights and `u`.
        let c = contrast_raw(similarity, weighting, e, r, others)?;
        job.weights = match weighting {
            Weighting::Gradient => c.clone(),
            _ => normalize_contributions(&c),
        };
        job.u = match weighting {
            Weighting::Gradient => c,
            _ => c
                .iter()
                .zip(e)
                .map(|(c, z)| if *z == 0.0 { 0.0 } else { c / z })
                .collect(),
        };
        Ok(job)
    }

    /// The job explaining embedding `e` (of image `image`) with respect to `r`.
    pub fn new(
        similarity: &dyn Similarity,
        weighting: Weighting,
        image: usize,
        e: &[f32],
        r: &[f32],
    ) -> Result<Self> {
        Ok(Self {
            image,
            weights: channel_weights(similarity, weighting, e, r)?,
            u: embedding_weights(similarity, weighting, e, r)?,
        })
    }
}

/// Computes all maps in one batched pass: gathers the explained images' feature maps and
/// applies their channel weights.
pub(crate) fn compute_maps(
    backbone: &dyn Backbone,
    weighting: Weighting,
    use_head: bool,
    maps: &Tensor,
    jobs: &[MapJob],
    size: (usize, usize),
) -> Result<Vec<SaliencyMap>> {
    if jobs.is_empty() {
        return Ok(vec![]);
    }
    let device = maps.device();
    let idx: Vec<u32> = jobs.iter().map(|j| j.image as u32).collect();
    let idx = Tensor::new(idx.as_slice(), device)?;
    let gathered = maps.index_select(&idx, 0)?;
    let d = jobs[0].u.len();
    let flat_u: Vec<f32> = jobs.iter().flat_map(|j| j.u.iter().copied()).collect();
    let u = Tensor::from_vec(flat_u, (jobs.len(), d), device)?;
    let pulled = if weighting == Weighting::Activation || !use_head {
        None
    } else {
        backbone.pullback(&u)?
    };
    let raw = match pulled {
        // Affine head: exact spatial contributions (contribution), or Grad-CAM's spatially
        // averaged gradient (gradient).
        Some((w, _offset)) if weighting == Weighting::Contribution => {
            fam_raw_spatial(&gathered, &w)?
        }
        Some((w, _offset)) => fam_raw(&gathered, &w.mean((2, 3))?)?,
        // The activation baseline is the mean of the feature channels, whatever the head.
        None if weighting == Weighting::Activation => {
            let c = gathered.dims()[1];
            let w = Tensor::full(1.0 / c as f32, (jobs.len(), c), device)?;
            fam_raw(&gathered, &w)?
        }
        None => {
            let c = jobs[0].weights.len();
            if c != gathered.dims()[1] {
                return Err(FamError::invalid(format!(
                    "the embedding has {c} dimensions but the feature layer {} channels, and the backbone provides no pullback to map one onto the other",
                    gathered.dims()[1]
                )));
            }
            let flat: Vec<f32> = jobs
                .iter()
                .flat_map(|j| j.weights.iter().copied())
                .collect();
            let w = Tensor::from_vec(flat, (jobs.len(), c), device)?;
            fam_raw(&gathered, &w)?
        }
    };
    let maps_raw = Map2::from_batch(&raw)?;
    // On the CPU each map is upsampled straight into its own buffer, without a batch tensor
    // and its copies.
    let up = if device.is_cpu() {
        maps_raw
            .iter()
            .map(|m| {
                let data = fam_core::explain::bilinear(&m.data, (m.height, m.width), size);
                Map2::new(size.0, size.1, data)
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        let up = fam_core::explain::upsample_bilinear(&raw.unsqueeze(1)?, size.0, size.1)?;
        Map2::from_batch(&up.squeeze(1)?)?
    };
    Ok(maps_raw
        .into_iter()
        .zip(up)
        .map(|(raw, upsampled)| SaliencyMap { raw, upsampled })
        .collect())
}

/// Runs a validated pipeline and writes its outputs. Item failures are recorded in the
/// report and the manifest; an `Err` means the run as a whole could not go on.
pub fn run_pipeline(
    p: &LoadedPipeline,
    host: &mut PluginHost,
    opts: &RunOptions,
    progress: &dyn Progress,
) -> Result<RunReport> {
    let start = Instant::now();
    // A shard writes to its own folder unless told otherwise: `<output>/shard-K-of-N`.
    let output = opts.output.clone().unwrap_or_else(|| match opts.shard {
        Some(s) => p.pipeline.run.output.join(format!("shard-{}", s.label())),
        None => p.pipeline.run.output.clone(),
    });
    let session = Session::open(p, host, opts)?;
    let load_models = ms(start);
    tracing::info!(backbone = %session.backbone.describe(), similarity = %session.similarity.name(), device = ?session.device, "models loaded");
    let checkpointing = match (p.pipeline.run.checkpoint, opts.resume) {
        (true, true) => Checkpointing::Resume,
        (true, false) => Checkpointing::Fresh,
        (false, resume) => {
            if resume {
                tracing::warn!(
                    "--resume: the pipeline sets run.checkpoint = false; running everything"
                );
            }
            Checkpointing::Off
        }
    };
    run_with_session(
        p,
        &session,
        &output,
        progress,
        load_models,
        opts.shard,
        checkpointing,
    )
}

/// Runs the pipeline's task and renderers with models already loaded (which took
/// `load_models` ms), and writes the manifest.
pub fn run_with_session(
    p: &LoadedPipeline,
    session: &Session,
    output: &Path,
    progress: &dyn Progress,
    load_models: f64,
    shard: Option<crate::pipeline::Shard>,
    checkpointing: Checkpointing,
) -> Result<RunReport> {
    let start = Instant::now();
    let mut timings = Timings {
        load_models,
        ..Default::default()
    };
    let mut out = OutputDir::create(output)?;
    let checkpoint_root = output.join(CHECKPOINT_DIR);
    if checkpointing == Checkpointing::Fresh && checkpoint_root.exists() {
        std::fs::remove_dir_all(&checkpoint_root).map_err(|e| FamError::io(&checkpoint_root, e))?;
    }
    if checkpointing == Checkpointing::Resume && !checkpoint_root.exists() {
        tracing::warn!(output = %output.display(), "--resume: no checkpoint in the output folder; running everything");
    }
    let checkpoint = match checkpointing {
        Checkpointing::Off => None,
        _ => Some(FeatureCache::open(
            &checkpoint_root,
            p.backbone_config().weights.as_deref(),
            &session.backbone.describe(),
            &session.spec,
        )?),
    };
    // Rendered files are kept on resume only if the pipeline is the one that wrote them:
    // the checkpoint records its fingerprint.
    let fingerprint_file = checkpoint_root.join("pipeline.sha256");
    let fingerprint = crate::cache::sha256_hex(
        format!(
            "{}\n{}\n{}",
            env!("CARGO_PKG_VERSION"),
            shard.map(|s| s.label()).unwrap_or_default(),
            p.source
        )
        .as_bytes(),
    );
    match checkpointing {
        Checkpointing::Off => {}
        Checkpointing::Fresh => write_atomic(&fingerprint_file, fingerprint.as_bytes())?,
        Checkpointing::Resume => {
            let recorded = std::fs::read_to_string(&fingerprint_file).unwrap_or_default();
            if recorded == fingerprint {
                out.set_reuse_existing(true);
            } else if checkpoint_root.exists() {
                tracing::warn!(pipeline = %p.path.display(), "the pipeline changed since the interrupted run: every file is rendered again");
                let _ = std::fs::remove_file(&fingerprint_file);
            }
        }
    }
    let mut failures = Vec::new();
    let mut counts = Counts::default();
    let mut ctx = TaskContext {
        p,
        session,
        progress,
        timings: &mut timings,
        counts: &mut counts,
        failures: &mut failures,
        shard,
        checkpoint: checkpoint.as_ref(),
    };
    let (explanation, items_total) = run_task(&mut ctx, &mut out, output)?;

    let t = Instant::now();
    let (last, first): (Vec<_>, Vec<_>) = session.renderers.iter().partition(|r| r.runs_last());
    for r in first.into_iter().chain(last) {
        let name = r.name();
        out.set_writer(&name);
        if let Err(e) = r.render(&explanation, &mut out) {
            if matches!(e, FamError::Interrupted) {
                return Err(e);
            }
            tracing::error!(renderer = %name, error = %e, "renderer failed");
            failures.push(Failure {
                item: format!("renderer {name}"),
                error: e.to_string(),
            });
        }
    }
    timings.render = ms(t);
    timings.total = ms(start) + load_models;
    counts.files_reused = out.reused();

    let items_failed = failures
        .iter()
        .filter_map(Failure::item_key)
        .collect::<std::collections::HashSet<_>>()
        .len();
    let report = RunReport {
        output: output.to_path_buf(),
        items_total,
        items_ok: items_total.saturating_sub(items_failed),
        files_written: out.written().len() + 1,
        counts,
        failures,
        timings_ms: timings,
    };
    write_manifest(&mut out, p, session, &explanation, &report, shard)?;
    // Every file is complete: the checkpoint is not needed any more.
    if checkpoint.is_some() {
        if let Err(e) = std::fs::remove_dir_all(&checkpoint_root) {
            tracing::warn!(folder = %checkpoint_root.display(), error = %e, "could not remove the checkpoint");
        }
    }
    Ok(report)
}

fn write_manifest(
    out: &mut OutputDir,
    p: &LoadedPipeline,
    session: &Session,
    explanation: &Explanation,
    report: &RunReport,
    shard: Option<crate::pipeline::Shard>,
) -> Result<()> {
    let manifest = serde_json::json!({
        "fam_version": env!("CARGO_PKG_VERSION"),
        "pipeline": p.path.display().to_string(),
        "shard": shard.map(|s| format!("{}/{}", s.index + 1, s.count)),
        "info": explanation.info,
        "device": format!("{:?}", session.device),
        "input": session.spec,
        "items": {
            "total": report.items_total,
            "ok": report.items_ok,
            "failed": report.items_total - report.items_ok,
        },
        "counts": report.counts,
        "files": out.written(),
        "failures": report.failures,
        "timings_ms": report.timings_ms,
    });
    let bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|e| FamError::invalid(e.to_string()))?;
    out.set_writer("fam");
    write_atomic(&out.root().join("manifest.json"), &bytes)
}

/// Runs the pipeline's task: scores, predictions and maps, without rendering.
pub(crate) fn run_task(
    ctx: &mut TaskContext,
    out: &mut OutputDir,
    output: &Path,
) -> Result<(Explanation, usize)> {
    match &ctx.p.pipeline.task {
        TaskSection::Pair { pairs } => {
            let range = ctx.shard_range(pairs.len());
            let first = range.start;
            let pairs: Vec<(PathBuf, PathBuf)> = pairs[range]
                .iter()
                .map(|p| (p.a.clone(), p.b.clone()))
                .collect();
            run_pairs(ctx, &pairs, first)
        }
        TaskSection::Retrieval { .. } => crate::tasks::retrieval::run_retrieval(ctx, out, output),
        TaskSection::FewShot { .. } => crate::tasks::few_shot::run_few_shot(ctx, out),
        TaskSection::Classify { .. } => crate::tasks::few_shot::run_classify(ctx, out),
    }
}

/// What a task needs from the run.
pub(crate) struct TaskContext<'a> {
    pub p: &'a LoadedPipeline,
    pub session: &'a Session,
    pub progress: &'a dyn Progress,
    pub timings: &'a mut Timings,
    pub counts: &'a mut Counts,
    pub failures: &'a mut Vec<Failure>,
    /// The part of the items to run (`--shard`), or all.
    pub shard: Option<crate::pipeline::Shard>,
    /// Where forward passes are saved and, on `--resume`, read back.
    pub checkpoint: Option<&'a FeatureCache>,
}

impl TaskContext<'_> {
    pub fn info(&self, task: &str) -> RunInfo {
        RunInfo {
            task: task.into(),
            backbone: self.session.backbone.describe(),
            similarity: self.session.similarity.name(),
            weighting: self.p.pipeline.explain.weighting.as_str().into(),
            preprocessing: preprocess::describe(&self.session.spec),
        }
    }

    /// Computes every job's map in one batch and attaches them, in order, to the query side
    /// of each comparison and, where `reference_mapped` says so, to its reference side.
    pub fn attach_maps(
        &self,
        maps: &Tensor,
        comparisons: &mut [Comparison],
        jobs: &[MapJob],
        use_head: bool,
        reference_mapped: impl Fn(&Comparison) -> bool,
    ) -> Result<()> {
        let (h, w) = self.session.spec.input_size();
        let mut computed = compute_maps(
            self.session.backbone.as_ref(),
            self.p.pipeline.explain.weighting,
            use_head,
            maps,
            jobs,
            (h as usize, w as usize),
        )?
        .into_iter();
        for c in comparisons.iter_mut() {
            c.query.map = computed.next();
            if reference_mapped(c) {
                c.reference.map = computed.next();
            }
        }
        Ok(())
    }

    /// The items of this run among `len` (all without `--shard`).
    pub fn shard_range(&self, len: usize) -> std::ops::Range<usize> {
        self.shard.map(|s| s.range(len)).unwrap_or(0..len)
    }

    pub fn embed(&mut self, paths: &[PathBuf], keep_maps: bool) -> Result<Embedded> {
        embed_images(
            self.session.backbone.as_ref(),
            &self.session.spec,
            paths,
            self.p.pipeline.run.batch_size,
            keep_maps,
            self.progress,
            self.timings,
            self.counts,
            self.checkpoint,
        )
    }
}

/// The pair task: every pair gives a score and two maps (each image with respect to the
/// other).
/// `first` is the index of the first pair in the pipeline (for ids, when sharded).
fn run_pairs(
    ctx: &mut TaskContext,
    pairs: &[(PathBuf, PathBuf)],
    first: usize,
) -> Result<(Explanation, usize)> {
    let (p, session) = (ctx.p, ctx.session);
    // Each distinct image is decoded and embedded once, however many pairs use it.
    let mut unique: Vec<PathBuf> = Vec::new();
    let mut index: HashMap<PathBuf, usize> = HashMap::new();
    for (a, b) in pairs {
        for path in [a, b] {
            let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            index.entry(key).or_insert_with(|| {
                unique.push(path.clone());
                unique.len() - 1
            });
        }
    }
    let slot_of = |path: &PathBuf| {
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        index[&key]
    };
    let emb = ctx.embed(&unique, true)?;

    let images = image_records(&unique, &emb);
    let t = Instant::now();
    let weighting = p.pipeline.explain.weighting;
    let mut comparisons = Vec::new();
    let mut jobs = Vec::new();
    for (i, (a, b)) in pairs.iter().enumerate() {
        let i = first + i;
        let (ua, ub) = (slot_of(a), slot_of(b));
        let item = format!("pair {} ({} vs {})", i + 1, a.display(), b.display());
        let result = (|| -> Result<(Comparison, [MapJob; 2])> {
            let ia = emb.slot[ua].clone().map_err(FamError::invalid)?;
            let ib = emb.slot[ub].clone().map_err(FamError::invalid)?;
            let (ea, eb) = (&emb.embeddings[ia], &emb.embeddings[ib]);
            let sim = session.similarity.as_ref();
            let score = sim.score(ea, eb)?;
            let distance = sim.distance(ea, eb)?;
            let ja = MapJob::new(sim, weighting, ia, ea, eb)?;
            let jb = MapJob::new(sim, weighting, ib, eb, ea)?;
            let id = format!("pair-{:02}_{}_vs_{}", i + 1, images[ia].id, images[ib].id);
            let side = |idx: usize| Side::image(images[idx].id.clone(), idx);
            Ok((
                Comparison {
                    id,
                    query: side(ia).with_target(Target::new(eb)),
                    reference: side(ib).with_target(Target::new(ea)),
                    score,
                    distance,
                    group: None,
                    rank: None,
                },
                [ja, jb],
            ))
        })();
        match result {
            Ok((c, [ja, jb])) => {
                tracing::debug!(pair = i + 1, score = c.score, "scored");
                comparisons.push(c);
                jobs.push(ja);
                jobs.push(jb);
            }
            Err(e) => {
                tracing::error!(pair = i + 1, error = %e, "pair failed");
                ctx.failures.push(Failure {
                    item,
                    error: e.to_string(),
                });
            }
        }
    }
    if let Some(maps) = &emb.maps {
        ctx.attach_maps(maps, &mut comparisons, &jobs, true, |_| true)?;
    }
    ctx.timings.fam += ms(t);

    let explanation = Explanation {
        info: ctx.info("pair"),
        images,
        comparisons,
    };
    Ok((explanation, pairs.len()))
}

/// Records of the images that were embedded, with ids unique within the run.
fn image_records(paths: &[PathBuf], emb: &Embedded) -> Vec<ImageRecord> {
    let mut ids = UniqueIds::default();
    let mut out = Vec::new();
    for (path, slot) in paths.iter().zip(&emb.slot) {
        let Ok(i) = slot else { continue };
        debug_assert_eq!(out.len(), *i);
        out.push(ImageRecord {
            id: ids.id(path),
            source: path.clone(),
            view: emb.views[*i].view.clone(),
        });
    }
    out
}

/// File-name-safe ids, unique within a run (`cat`, `cat-2`, ...).
#[derive(Debug, Default)]
pub(crate) struct UniqueIds(HashMap<String, usize>);

impl UniqueIds {
    pub fn id(&mut self, path: &Path) -> String {
        let stem = safe_stem(path);
        let n = self.0.entry(stem.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            stem
        } else {
            format!("{stem}-{n}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Failure;

    #[test]
    fn only_pairs_and_queries_are_items() {
        let f = |item: &str| Failure {
            item: item.into(),
            error: String::new(),
        };
        assert_eq!(f("pair 3 (a.png vs b.png)").item_key(), Some("pair 3"));
        assert_eq!(f("query q/cat.png").item_key(), Some("query q/cat.png"));
        assert_eq!(
            f("query q/cat.png hit g/dog.png").item_key(),
            Some("query q/cat.png")
        );
        assert_eq!(f("gallery g/broken.png").item_key(), None);
        assert_eq!(f("support image s/1/x.png").item_key(), None);
        assert_eq!(f("renderer panel").item_key(), None);
    }
}
