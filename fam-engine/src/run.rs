//! Running a pipeline, which only orchestrates: open the session (plugins, model), run the
//! task ([`crate::tasks`]: it embeds through [`crate::embed`] and gets its maps from
//! [`crate::maps`]), render what it returns, write `manifest.json`.

use std::path::Path;
use std::time::Instant;

use fam_core::error::{FamError, Result};
use fam_core::explain::Explanation;

use fam_core::records::{document_bytes, ReportRow};

use crate::cache::FeatureCache;
use crate::documents::{Items, Manifest};
use crate::loader::PluginHost;
use crate::output::{write_atomic, OutputDir};
use crate::pipeline::LoadedPipeline;
use crate::tasks::{task_of, TaskContext};

pub use crate::report::{ms, Counts, Failure, NoProgress, Progress, RunReport, Timings};
pub use crate::session::{RunOptions, Session};
pub use fam_core::host::{check_interrupt, request_interrupt};

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
    let mut partial_images = Vec::new();
    let mut counts = Counts::default();
    let mut ctx = TaskContext {
        p,
        session,
        output,
        progress,
        timings: &mut timings,
        counts: &mut counts,
        failures: &mut failures,
        partial: &mut partial_images,
        shard,
        checkpoint: checkpoint.as_ref(),
    };
    let task = task_of(&p.pipeline.task);
    let done = task.run(&mut ctx, &mut out)?;
    let (explanation, items_total) = (done.explanation, done.items);

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
        partial_images,
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
    let manifest = Manifest {
        fam_version: env!("CARGO_PKG_VERSION").into(),
        pipeline: p.path.display().to_string(),
        shard: shard.map(|s| format!("{}/{}", s.index + 1, s.count)),
        merged_from: None,
        info: explanation.info.clone(),
        device: format!("{:?}", session.device),
        input: session.spec.clone(),
        items: Items {
            total: report.items_total,
            ok: report.items_ok,
            failed: report.items_total - report.items_ok,
        },
        counts: report.counts.clone(),
        comparisons: explanation.comparisons.iter().map(ReportRow::of).collect(),
        files: out.written().to_vec(),
        failures: report.failures.clone(),
        partial_images: report.partial_images.clone(),
        timings_ms: report.timings_ms.clone(),
    };
    let bytes = document_bytes(&manifest)?;
    out.set_writer("fam");
    write_atomic(&out.root().join("manifest.json"), &bytes)
}
