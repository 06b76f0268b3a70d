//! `fam-cli bench`: where the time of an explanation goes, per image, on the pipeline's own
//! backbone, similarity and renderers.
//!
//! The benchmark copies `count` images (cycling through the given ones) into a scratch
//! folder, so every copy is decoded and forwarded, and explains them as pairs (image `2i`
//! with `2i+1`): each image is embedded once and gets one map. Models are loaded once; each
//! batch size runs `repeat` times after one warm-up run, and the median is reported.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::pipeline::{LoadedPipeline, PairSpec, TaskSection};
use crate::run::{run_with_session, Checkpointing, NoProgress, RunOptions, Session, Timings};
use fam_core::error::{FamError, Result};

/// Options of `fam-cli bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub run: RunOptions,
    /// Images to explain (cycled to `count`).
    pub images: Vec<PathBuf>,
    pub count: usize,
    pub batch_sizes: Vec<usize>,
    pub repeat: usize,
}

/// Per-image milliseconds of one batch size (medians over the repeats).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub batch_size: usize,
    pub images: usize,
    pub decode_preprocess_ms: f64,
    pub forward_ms: f64,
    /// Channel weights, weighted sum of the maps, ReLU, normalization and upsampling.
    pub fam_ms: f64,
    pub render_ms: f64,
    /// Wall time of the whole run (task, renderers, manifest) per image.
    pub end_to_end_ms: f64,
    /// FAM as a share of the forward pass, in percent.
    pub fam_share_of_forward: f64,
    /// The process's peak resident memory after this batch size, in MiB.
    pub peak_rss_mib: Option<f64>,
}

/// What `fam-cli bench` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub backbone: String,
    pub similarity: String,
    pub device: String,
    pub threads: usize,
    pub load_models_ms: f64,
    pub rows: Vec<BenchRow>,
}

/// The process's peak resident set size (Linux `VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Copies the images into `dir` as `img-0000.<ext>`, ... (cycling), and returns the pairs.
fn stage_images(images: &[PathBuf], count: usize, dir: &Path) -> Result<Vec<PairSpec>> {
    std::fs::create_dir_all(dir).map_err(|e| FamError::io(dir, e))?;
    let mut copies = Vec::with_capacity(count);
    for i in 0..count {
        let src = &images[i % images.len()];
        let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("img");
        let dst = dir.join(format!("img-{i:04}.{ext}"));
        std::fs::copy(src, &dst).map_err(|e| FamError::io(src, e))?;
        copies.push(dst);
    }
    Ok(copies
        .chunks_exact(2)
        .map(|c| PairSpec {
            a: c[0].clone(),
            b: c[1].clone(),
        })
        .collect())
}

/// Runs the benchmark. `scratch` receives the image copies and the runs' outputs.
pub fn run_bench(
    p: &LoadedPipeline,
    host: &mut crate::loader::PluginHost,
    opts: &BenchOptions,
    scratch: &Path,
) -> Result<BenchReport> {
    if opts.images.is_empty() {
        return Err(FamError::invalid("bench: no images given"));
    }
    let count = (opts.count.max(2) / 2) * 2;
    let t = Instant::now();
    let session = Session::open(p, host, &opts.run)?;
    let load_models_ms = t.elapsed().as_secs_f64() * 1e3;
    let pairs = stage_images(&opts.images, count, &scratch.join("images"))?;
    let mut rows = Vec::new();
    for &bs in &opts.batch_sizes {
        let mut pb = p.clone();
        pb.pipeline.run.batch_size = bs.max(1);
        pb.pipeline.task = TaskSection::Pair {
            pairs: pairs.clone(),
        };
        let out = scratch.join(format!("out-b{bs}"));
        let mut runs: Vec<(Timings, f64)> = Vec::new();
        for i in 0..=opts.repeat.max(1) {
            let t = Instant::now();
            let report = run_with_session(
                &pb,
                &session,
                &out,
                &NoProgress,
                0.0,
                None,
                Checkpointing::Off,
            )?;
            let wall = t.elapsed().as_secs_f64() * 1e3;
            if report.items_ok != report.items_total {
                return Err(FamError::invalid(format!(
                    "bench: {} of {} pairs failed: {:?}",
                    report.items_total - report.items_ok,
                    report.items_total,
                    report.failures.first()
                )));
            }
            tracing::info!(batch_size = bs, run = i, wall_ms = wall, "bench run");
            if i > 0 {
                runs.push((report.timings_ms, wall));
            }
        }
        let per = |f: &dyn Fn(&(Timings, f64)) -> f64| {
            median(runs.iter().map(f).collect()) / count as f64
        };
        let forward = per(&|r| r.0.forward);
        let fam = per(&|r| r.0.fam);
        rows.push(BenchRow {
            batch_size: bs,
            images: count,
            decode_preprocess_ms: per(&|r| r.0.decode_preprocess),
            forward_ms: forward,
            fam_ms: fam,
            render_ms: per(&|r| r.0.render),
            end_to_end_ms: per(&|r| r.1),
            fam_share_of_forward: if forward > 0.0 {
                100.0 * fam / forward
            } else {
                0.0
            },
            peak_rss_mib: peak_rss_mib(),
        });
    }
    Ok(BenchReport {
        backbone: session.backbone.describe(),
        similarity: session.similarity.name(),
        device: format!("{:?}", session.device),
        threads: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        load_models_ms,
        rows,
    })
}

/// The report as a text table.
pub fn table(r: &BenchReport) -> String {
    let mut s = format!(
        "{} ({}, {}, {} threads; models loaded in {:.0} ms)\nper image, ms (median of the repeats)\n{:>5} {:>7} {:>9} {:>9} {:>8} {:>8} {:>11} {:>9} {:>9}\n",
        r.backbone,
        r.similarity,
        r.device,
        r.threads,
        r.load_models_ms,
        "batch",
        "images",
        "decode",
        "forward",
        "fam",
        "render",
        "end-to-end",
        "fam/fwd",
        "peak MiB",
    );
    for row in &r.rows {
        s.push_str(&format!(
            "{:>5} {:>7} {:>9.2} {:>9.2} {:>8.3} {:>8.2} {:>11.2} {:>8.2}% {:>9.0}\n",
            row.batch_size,
            row.images,
            row.decode_preprocess_ms,
            row.forward_ms,
            row.fam_ms,
            row.render_ms,
            row.end_to_end_ms,
            row.fam_share_of_forward,
            row.peak_rss_mib.unwrap_or(f64::NAN),
        ));
    }
    s
}
