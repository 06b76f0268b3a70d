//! The `classify` task: contrastive-model evaluation, kNN or nearest centroid over a
//! labelled reference bank.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use fam_core::error::Result;
use fam_core::explain::{rank_key, Comparison, Explanation, Side, Target, Transform};

use super::context::{Task, TaskContext, TaskOutput};
use super::labelled::{attach_maps, labelled_sets, write_json, Labelled, PerClass, Tally};
use crate::documents::PredictionsDocument;
use crate::maps::MapJob;
use crate::output::OutputDir;
use crate::pipeline::{labelled_images, ClassifyMethod};
use crate::report::{ms, Failure};

/// The `classify` task of a pipeline.
#[derive(Debug, Clone)]
pub struct Classify {
    pub bank: PathBuf,
    pub queries: PathBuf,
    pub method: ClassifyMethod,
    pub k: usize,
    pub transform: Transform,
}

impl Task for Classify {
    fn name(&self) -> &'static str {
        "classify"
    }

    fn run(&self, ctx: &mut TaskContext, out: &mut OutputDir) -> Result<TaskOutput> {
        let (explanation, items) = run_classify(self, ctx, out)?;
        Ok(TaskOutput { explanation, items })
    }
}

fn run_classify(
    task: &Classify,
    ctx: &mut TaskContext,
    out: &mut OutputDir,
) -> Result<(Explanation, usize)> {
    let Classify {
        bank,
        queries,
        method,
        k,
        transform: tf,
    } = task.clone();
    let bank = labelled_images(&bank)?;
    let queries = labelled_images(&queries)?;
    let Labelled {
        emb,
        images,
        refs: b,
        queries: q,
        classes,
        means: centroids,
        center,
        ..
    } = labelled_sets(ctx, &bank, &queries, tf, ["bank image", "query"])?;
    let t = Instant::now();

    let sim = ctx.session.similarity.as_ref();
    let weighting = ctx.p.pipeline.explain.weighting;
    let exact_head = tf == Transform::None;
    let target = |r: &[f32]| Target {
        reference: r.to_vec(),
        others: vec![],
        transform: tf,
        center: center.clone(),
    };
    let (mut comparisons, mut jobs) = (Vec::new(), Vec::new());
    let mut tally = Tally::default();
    for (j, item) in q.ok.iter().enumerate() {
        let Some((qrec, e)) = item else { continue };
        let result = (|| -> Result<()> {
            let qid = images[*qrec].id.clone();
            let (pred, votes): (String, Vec<(String, f32)>) = match method {
                ClassifyMethod::Knn => {
                    let mut scored: Vec<(usize, f32, Option<f32>)> =
                        b.ok.iter()
                            .enumerate()
                            .filter_map(|(i, x)| x.as_ref().map(|(_, r)| (i, r)))
                            .map(|(i, r)| Ok((i, sim.score(e, r)?, sim.distance(e, r)?)))
                            .collect::<Result<_>>()?;
                    scored.sort_by(|a, c| rank_key(c.1, c.2).total_cmp(&rank_key(a.1, a.2)));
                    scored.truncate(k);
                    let mut votes: BTreeMap<String, f32> = BTreeMap::new();
                    for (rank, &(i, score, dist)) in scored.iter().enumerate() {
                        let label = b.labels[i].clone().unwrap_or_default();
                        // Similarity-weighted vote (1 / (1 + distance) for distance metrics).
                        *votes.entry(label.clone()).or_default() +=
                            dist.map(|d| 1.0 / (1.0 + d)).unwrap_or(score);
                        let (brec, r) = b.ok[i].as_ref().unwrap();
                        let (jq, jb) = (
                            MapJob::new(sim, weighting, *qrec, e, r)?,
                            MapJob::new(sim, weighting, *brec, r, e)?,
                        );
                        let distance = sim.distance(e, r)?;
                        jobs.push(jq);
                        jobs.push(jb);
                        comparisons.push(Comparison {
                            id: format!("{qid}_nn-{:02}_{}", rank + 1, images[*brec].id),
                            query: Side::image(qid.clone(), *qrec).with_target(target(r)),
                            reference: Side::image(
                                format!("{} ({label})", images[*brec].id),
                                *brec,
                            )
                            .with_target(target(e)),
                            score,
                            distance,
                            group: Some(qid.clone()),
                            rank: Some(rank + 1),
                            correspondence: None,
                        });
                    }
                    let mut votes: Vec<(String, f32)> = votes.into_iter().collect();
                    votes.sort_by(|a, c| c.1.total_cmp(&a.1));
                    (votes[0].0.clone(), votes)
                }
                ClassifyMethod::Centroid => {
                    let mut scores: Vec<(usize, f32)> = centroids
                        .iter()
                        .enumerate()
                        .map(|(c, r)| Ok((c, sim.score(e, r)?)))
                        .collect::<Result<_>>()?;
                    let keys: Vec<f32> = centroids
                        .iter()
                        .zip(&scores)
                        .map(|(r, (_, s))| Ok(rank_key(*s, sim.distance(e, r)?)))
                        .collect::<Result<_>>()?;
                    scores.sort_by(|a, c| keys[c.0].total_cmp(&keys[a.0]));
                    let (c, score) = scores[0];
                    let (job, distance) = (
                        MapJob::new(sim, weighting, *qrec, e, &centroids[c])?,
                        sim.distance(e, &centroids[c])?,
                    );
                    jobs.push(job);
                    comparisons.push(Comparison {
                        id: format!("{qid}_centroid-{}", classes[c]),
                        query: Side::image(qid.clone(), *qrec).with_target(target(&centroids[c])),
                        reference: Side::reference(format!("centroid {}", classes[c])),
                        score,
                        distance,
                        group: Some(qid.clone()),
                        rank: Some(1),
                        correspondence: None,
                    });
                    (
                        classes[c].clone(),
                        scores
                            .iter()
                            .map(|(c, s)| (classes[*c].clone(), *s))
                            .collect(),
                    )
                }
            };
            tally.record(
                &q.paths[j],
                &q.labels[j],
                &pred,
                PerClass::Votes,
                votes.into_iter(),
            );
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
    ctx.timings.fam += ms(t);
    let accuracy = tally.accuracy();
    write_json(
        out,
        "predictions.json",
        &PredictionsDocument {
            method,
            k,
            classes: classes.clone(),
            transform: tf,
            accuracy,
            predictions: tally.predictions,
        },
    )?;
    Ok((
        Explanation {
            info: ctx.info("classify"),
            images,
            comparisons,
        },
        ctx.shard_range(queries.len()).len(),
    ))
}
