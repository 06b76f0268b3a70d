//! The `pair` task: explicit pairs of images, one score and two maps per pair.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use fam_core::error::{FamError, Result};
use fam_core::explain::{Comparison, Explanation, Side, Target};

use super::context::{image_records, Task, TaskContext, TaskOutput};
use crate::maps::MapJob;
use crate::output::OutputDir;
use crate::pipeline::PairSpec;
use crate::report::{ms, Failure};

/// The `pair` task of a pipeline.
#[derive(Debug, Clone)]
pub struct Pair {
    pub pairs: Vec<PairSpec>,
}

impl Task for Pair {
    fn name(&self) -> &'static str {
        "pair"
    }

    fn run(&self, ctx: &mut TaskContext, _out: &mut OutputDir) -> Result<TaskOutput> {
        let range = ctx.shard_range(self.pairs.len());
        let first = range.start;
        let pairs: Vec<(PathBuf, PathBuf)> = self.pairs[range]
            .iter()
            .map(|p| (p.a.clone(), p.b.clone()))
            .collect();
        let (explanation, items) = run_pairs(ctx, &pairs, first)?;
        Ok(TaskOutput { explanation, items })
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
            let failed = |path: &PathBuf, message: String| FamError::Item {
                item: path.display().to_string(),
                message,
            };
            let ia = emb.slot[ua].clone().map_err(|m| failed(a, m))?;
            let ib = emb.slot[ub].clone().map_err(|m| failed(b, m))?;
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
                    correspondence: None,
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
