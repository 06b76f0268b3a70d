//! What every task gets from the run, and what it gives back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fam_core::candle::Tensor;
use fam_core::error::Result;
use fam_core::explain::{Comparison, ContrastMap, Explanation, ImageRecord, RunInfo, SaliencyMap};

use crate::cache::FeatureCache;
use crate::embed::Embedded;
use crate::maps::{compute_maps, contrast_maps, linear_maps, MapJob};
use crate::output::{safe_stem, OutputDir};
use crate::pipeline::LoadedPipeline;
use crate::preprocess;
use crate::report::{Counts, Failure, PartialImage, Progress, Timings};
use crate::session::Session;

/// One image's comparisons against several references (at least 2), whose query sides get
/// contrast maps: each comparison's index with the plain job of its query side.
pub struct ContrastGroup {
    pub members: Vec<(usize, MapJob)>,
    /// What a reference is, for captions, one and several: `("hit", "hits")`.
    pub noun: (&'static str, &'static str),
}

/// A task: what a pipeline's `[task]` section runs. It embeds the images it needs through
/// its [`TaskContext`], scores them with the similarity, asks for the maps, and writes its
/// own documents (`retrieval.json`, `episode.json`, ...); the run then renders the
/// explanation it returns and writes the manifest. A task never calls back into the run.
pub trait Task {
    /// The task's name, as pipelines write it (`kind = "pair"`).
    fn name(&self) -> &'static str;
    /// Runs the task on this run's part of the items (all, or `--shard K/N`'s).
    fn run(&self, ctx: &mut TaskContext, out: &mut OutputDir) -> Result<TaskOutput>;
}

/// What a task produced.
#[derive(Debug)]
pub struct TaskOutput {
    /// Scores and maps, for the renderers.
    pub explanation: Explanation,
    /// How many items the task had (pairs, queries), failed ones included.
    pub items: usize,
}

/// What a task needs from the run.
pub struct TaskContext<'a> {
    pub p: &'a LoadedPipeline,
    pub session: &'a Session,
    /// The output folder (a task may keep a cache there).
    pub output: &'a Path,
    pub progress: &'a dyn Progress,
    pub timings: &'a mut Timings,
    pub counts: &'a mut Counts,
    pub failures: &'a mut Vec<Failure>,
    /// Images explained although they decoded only in part.
    pub partial: &'a mut Vec<PartialImage>,
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
        let mut computed = self.compute(maps, jobs, use_head)?.into_iter();
        // Each job's image is its row of `maps`; a row's per-location vectors are computed
        // once, however many comparisons it is in (a query and its hits).
        let mut rows = jobs.iter().map(|j| j.image);
        let mut located = std::collections::HashMap::new();
        for c in comparisons.iter_mut() {
            c.query.map = computed.next();
            let query_row = rows.next();
            let mut reference_row = None;
            if reference_mapped(c) {
                c.reference.map = computed.next();
                reference_row = rows.next();
            }
            if let (Some(q), Some(r)) = (query_row, reference_row) {
                c.correspondence = self.correspondence(maps, c, q, r, &mut located);
            }
        }
        Ok(())
    }

    /// Every job's map, in chunks, so that the batched pass's intermediate tensors stay
    /// bounded however many comparisons the task has.
    fn compute(&self, maps: &Tensor, jobs: &[MapJob], use_head: bool) -> Result<Vec<SaliencyMap>> {
        let (h, w) = self.session.spec.input_size();
        const CHUNK: usize = 256;
        let mut all = Vec::with_capacity(jobs.len());
        for part in jobs.chunks(CHUNK) {
            all.extend(compute_maps(
                self.session.backbone.as_ref(),
                self.p.pipeline.explain.weighting,
                use_head,
                maps,
                part,
                (h as usize, w as usize),
            )?);
        }
        Ok(all)
    }

    /// Whether the task should add contrast maps: `[explain] contrast_maps` is on and the
    /// weighting depends on the reference (the mean activation does not).
    pub fn wants_contrast_maps(&self) -> bool {
        let explain = &self.p.pipeline.explain;
        explain.contrast_maps && explain.weighting != fam_core::explain::Weighting::Activation
    }

    /// Computes the contrast maps of each group ([`crate::maps::contrast_maps`]) and attaches
    /// them to the query sides of its comparisons.
    pub fn attach_contrast_maps(
        &self,
        maps: &Tensor,
        comparisons: &mut [Comparison],
        groups: Vec<ContrastGroup>,
        use_head: bool,
    ) -> Result<()> {
        let (h, w) = self.session.spec.input_size();
        for group in groups {
            let n = group.members.len();
            if n < 2 {
                continue;
            }
            let (at, jobs): (Vec<usize>, Vec<MapJob>) = group.members.into_iter().unzip();
            let linear = linear_maps(
                self.session.backbone.as_ref(),
                self.p.pipeline.explain.weighting,
                use_head,
                maps,
                &jobs,
            )?;
            let against = match n - 1 {
                1 => format!("the other {}", group.noun.0),
                k => format!("the other {k} {}", group.noun.1),
            };
            for (i, map) in at
                .into_iter()
                .zip(contrast_maps(&linear, (h as usize, w as usize))?)
            {
                comparisons[i].query.contrast = Some(ContrastMap {
                    map,
                    against: against.clone(),
                });
            }
        }
        Ok(())
    }

    /// The correspondence of a comparison of two images whose maps explain their plain
    /// similarity (each side's target is the other's embedding), or `None`. A failure is
    /// logged and costs only the correspondence.
    fn correspondence(
        &self,
        maps: &Tensor,
        c: &Comparison,
        query_row: usize,
        reference_row: usize,
        located: &mut std::collections::HashMap<usize, fam_core::decompose::Locations>,
    ) -> Option<fam_core::records::Correspondence> {
        let (tq, tr) = (c.query.target.as_ref()?, c.reference.target.as_ref()?);
        if !tr.others.is_empty() || tr.transform != fam_core::records::Transform::None {
            return None;
        }
        let result = (|| {
            use crate::locations::{correspondence, has_correspondence, locations, ImageFeatures};
            let q = ImageFeatures::from_batch(maps, query_row, tr.reference.clone())?;
            let r = ImageFeatures::from_batch(maps, reference_row, tq.reference.clone())?;
            if !has_correspondence(tq, &q, &r) {
                return Ok(None);
            }
            // Without a transform the vectors depend on the image alone (the target's
            // reference only checks the split), so they are kept by row.
            let backbone = self.session.backbone.as_ref();
            for (row, f) in [(query_row, &q), (reference_row, &r)] {
                if !located.contains_key(&row) {
                    located.insert(row, locations(backbone, f, tq)?);
                }
            }
            correspondence(
                self.session.similarity.as_ref(),
                tq,
                &q,
                &located[&query_row],
                &located[&reference_row],
            )
        })();
        match result {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(comparison = %c.id, error = %e, "no correspondence");
                None
            }
        }
    }

    /// The items of this run among `len` (all without `--shard`).
    pub fn shard_range(&self, len: usize) -> std::ops::Range<usize> {
        self.shard.map(|s| s.range(len)).unwrap_or(0..len)
    }

    pub fn embed(&mut self, paths: &[PathBuf], keep_maps: bool) -> Result<Embedded> {
        crate::embed::embed_images(
            self.session.backbone.as_ref(),
            &self.session.spec,
            paths,
            self.p.pipeline.run.batch_size,
            keep_maps,
            self.progress,
            self.timings,
            self.counts,
            self.checkpoint,
            self.p.pipeline.run.decoding,
            self.partial,
            crate::embed::Overlap::for_device(&self.session.backbone.device()),
        )
    }
}

/// Records of the images that were embedded, with ids unique within the run.
pub fn image_records(paths: &[PathBuf], emb: &Embedded) -> Vec<ImageRecord> {
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
pub struct UniqueIds(HashMap<String, usize>);

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
