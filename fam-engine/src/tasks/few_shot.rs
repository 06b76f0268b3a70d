//! The `few_shot` task: an N-way K-shot episode; prototypes are mean support embeddings.

use std::path::PathBuf;
use std::time::Instant;

use fam_core::error::{FamError, Result};
use fam_core::explain::{rank_key, Comparison, Contrast, Explanation, Side, Target, Transform};

use super::context::{ContrastGroup, Task, TaskContext, TaskOutput};
use super::labelled::{attach_maps, labelled_sets, write_json, Labelled, PerClass, Tally};
use crate::documents::EpisodeDocument;
use crate::maps::MapJob;
use crate::output::OutputDir;
use crate::pipeline::labelled_images;
use crate::report::{ms, Failure};

/// The `few_shot` task of a pipeline.
#[derive(Debug, Clone)]
pub struct FewShot {
    pub support: PathBuf,
    pub query: PathBuf,
    pub all_classes: bool,
    pub transform: Transform,
    pub contrast: Contrast,
}

impl Task for FewShot {
    fn name(&self) -> &'static str {
        "few_shot"
    }

    fn run(&self, ctx: &mut TaskContext, out: &mut OutputDir) -> Result<TaskOutput> {
        let (explanation, items) = run_few_shot(self, ctx, out)?;
        Ok(TaskOutput { explanation, items })
    }
}

fn run_few_shot(
    task: &FewShot,
    ctx: &mut TaskContext,
    out: &mut OutputDir,
) -> Result<(Explanation, usize)> {
    let FewShot {
        support,
        query,
        all_classes,
        transform: tf,
        contrast,
    } = task.clone();
    let support = labelled_images(&support)?;
    let queries = labelled_images(&query)?;
    let Labelled {
        emb,
        images,
        refs: s,
        queries: q,
        classes,
        by_class,
        means: protos,
        center,
    } = labelled_sets(ctx, &support, &queries, tf, ["support image", "query"])?;
    let t = Instant::now();
    if classes.len() < 2 {
        return Err(FamError::invalid(format!(
            "the episode has {} usable class(es); few-shot needs at least 2",
            classes.len()
        )));
    }

    let sim = ctx.session.similarity.as_ref();
    let weighting = ctx.p.pipeline.explain.weighting;
    // A transformed embedding is no longer the backbone's: its head cannot be used.
    let exact_head = tf == Transform::None;
    let target = |r: &[f32], others: &[&[f32]]| Target {
        reference: r.to_vec(),
        others: others.iter().map(|o| o.to_vec()).collect(),
        transform: tf,
        center: center.clone(),
    };
    let mut comparisons = Vec::new();
    let mut jobs = Vec::new();
    // Where the maps are plain and every class is mapped, each query-class map gets its
    // contrast map beside it.
    let contrast_maps = contrast == Contrast::None && all_classes && ctx.wants_contrast_maps();
    let mut contrast_groups = Vec::new();
    let mut tally = Tally::default();
    for (j, item) in q.ok.iter().enumerate() {
        let Some((qrec, e)) = item else { continue };
        let result = (|| -> Result<()> {
            let mut scores: Vec<(usize, f32)> = protos
                .iter()
                .enumerate()
                .map(|(c, p)| Ok((c, sim.score(e, p)?)))
                .collect::<Result<_>>()?;
            let keys: Vec<f32> = protos
                .iter()
                .zip(&scores)
                .map(|(p, (_, s))| Ok(rank_key(*s, sim.distance(e, p)?)))
                .collect::<Result<_>>()?;
            scores.sort_by(|a, b| keys[b.0].total_cmp(&keys[a.0]));
            let pred = &classes[scores[0].0];
            let qid = images[*qrec].id.clone();
            let keep = if all_classes { scores.len() } else { 1 };
            let mut members = Vec::new();
            for (rank, &(c, score)) in scores.iter().take(keep).enumerate() {
                let others: Vec<&[f32]> = match contrast {
                    Contrast::Others => (0..protos.len())
                        .filter(|&o| o != c)
                        .map(|o| protos[o].as_slice())
                        .collect(),
                    Contrast::None => vec![],
                };
                let job = MapJob::contrast(sim, weighting, *qrec, e, &protos[c], &others)?;
                let distance = sim.distance(e, &protos[c])?;
                // Without a contrast the job is the plain map's, which the contrast maps use.
                if contrast_maps {
                    members.push((comparisons.len(), job.clone()));
                }
                jobs.push(job);
                let target = target(&protos[c], &others);
                comparisons.push(Comparison {
                    id: format!("{qid}_class-{}", classes[c]),
                    query: Side::image(qid.clone(), *qrec).with_target(target),
                    reference: Side::reference(format!("class {}", classes[c])),
                    score,
                    distance,
                    group: Some(qid.clone()),
                    rank: Some(rank + 1),
                    correspondence: None,
                });
            }
            if members.len() >= 2 {
                contrast_groups.push(ContrastGroup {
                    members,
                    noun: ("class", "classes"),
                });
            }
            // Each support image w.r.t. the query; with `contrast = "others"`, relative to
            // the prototypes of the other classes, which cancels what every digit shares
            // (the background of a ReLU network's map is active everywhere).
            for (i, item) in s.ok.iter().enumerate() {
                let Some((srec, se)) = item else { continue };
                let own = s.labels[i].clone().unwrap_or_default();
                let others: Vec<&[f32]> = match contrast {
                    Contrast::Others => classes
                        .iter()
                        .zip(&protos)
                        .filter(|(c, _)| **c != own)
                        .map(|(_, p)| p.as_slice())
                        .collect(),
                    Contrast::None => vec![],
                };
                let job = MapJob::contrast(sim, weighting, *srec, se, e, &others)?;
                let score = sim.score(se, e)?;
                jobs.push(job);
                comparisons.push(Comparison {
                    id: format!("{qid}_support-{}", images[*srec].id),
                    query: Side {
                        label: format!(
                            "{} ({})",
                            images[*srec].id,
                            s.labels[i].clone().unwrap_or_default()
                        ),
                        image: Some(*srec),
                        map: None,
                        contrast: None,
                        target: Some(target(e, &others)),
                    },
                    reference: Side::image(qid.clone(), *qrec),
                    score,
                    distance: None,
                    group: Some(qid.clone()),
                    rank: None,
                    correspondence: None,
                });
            }
            let by_class = scores.iter().map(|(c, s)| (classes[*c].clone(), *s));
            tally.record(&q.paths[j], &q.labels[j], pred, PerClass::Scores, by_class);
            Ok(())
        })();
        if let Err(err) = result {
            ctx.failures.push(Failure {
                item: format!("query {}", q.paths[j].display()),
                error: err.to_string(),
            });
        }
    }
    attach_maps(ctx, &emb, &mut comparisons, &jobs, exact_head)?;
    if let Some(maps) = &emb.maps {
        ctx.attach_contrast_maps(maps, &mut comparisons, contrast_groups, exact_head)?;
    }
    ctx.timings.fam += ms(t);

    let accuracy = tally.accuracy();
    if let Some(a) = accuracy {
        tracing::info!(
            accuracy = a,
            correct = tally.correct,
            labelled = tally.labelled,
            "episode"
        );
    }
    write_json(
        out,
        "episode.json",
        &EpisodeDocument {
            classes: classes.clone(),
            shots: by_class.iter().map(|(c, v)| (c.clone(), v.len())).collect(),
            transform: tf,
            contrast,
            accuracy,
            predictions: tally.predictions,
        },
    )?;
    Ok((
        Explanation {
            info: ctx.info("few_shot"),
            images,
            comparisons,
        },
        ctx.shard_range(queries.len()).len(),
    ))
}
