//! The `few_shot` task (N-way K-shot episodes, prototypes) and the `classify` task
//! (contrastive-model evaluation: kNN or nearest centroid over a labelled bank).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use fam_core::error::{FamError, Result};
use fam_core::explain::{rank_key, Comparison, Explanation, ImageRecord, Side, Target};
use crate::output::{OutputDir, OutputSink};
use crate::pipeline::{labelled_images, ClassifyMethod, Contrast, TaskSection, Transform};
use crate::run::{ms, Embedded, Failure, MapJob, TaskContext, UniqueIds};

fn mean(vs: &[&Vec<f32>]) -> Vec<f32> {
    let d = vs.first().map(|v| v.len()).unwrap_or(0);
    let mut m = vec![0f32; d];
    for v in vs {
        for (a, b) in m.iter_mut().zip(v.iter()) {
            *a += b / vs.len() as f32;
        }
    }
    m
}

/// Embedded, labelled images with their image records.
struct Set {
    labels: Vec<Option<String>>,
    paths: Vec<PathBuf>,
    /// Per input: index into the run's images and its (transformed) embedding.
    ok: Vec<Option<(usize, Vec<f32>)>>,
}

fn image_set(
    emb: &Embedded,
    offset: usize,
    items: &[(Option<String>, PathBuf)],
    ids: &[String],
    images: &mut Vec<ImageRecord>,
    failures: &mut Vec<Failure>,
    what: &str,
) -> Set {
    let mut ok = Vec::new();
    for (j, (_, path)) in items.iter().enumerate() {
        match &emb.slot[offset + j] {
            Ok(s) => {
                let rec = images.len();
                images.push(ImageRecord {
                    id: ids[j].clone(),
                    source: path.clone(),
                    view: emb.views[*s].view.clone(),
                });
                debug_assert_eq!(rec, *s);
                ok.push(Some((rec, emb.embeddings[*s].clone())));
            }
            Err(e) => {
                failures.push(Failure {
                    item: format!("{what} {}", path.display()),
                    error: e.clone(),
                });
                ok.push(None);
            }
        }
    }
    Set {
        labels: items.iter().map(|(l, _)| l.clone()).collect(),
        paths: items.iter().map(|(_, p)| p.clone()).collect(),
        ok,
    }
}

/// A reference set (support, bank) and queries, embedded in one pass and transformed, with
/// the reference set's class means (prototypes, centroids).
struct Labelled {
    emb: Embedded,
    images: Vec<ImageRecord>,
    refs: Set,
    queries: Set,
    classes: Vec<String>,
    by_class: BTreeMap<String, Vec<usize>>,
    means: Vec<Vec<f32>>,
    /// The CL2N centre (the reference set's mean raw embedding).
    center: Vec<f32>,
}

fn labelled_sets(
    ctx: &mut TaskContext,
    refs: &[(Option<String>, PathBuf)],
    all_queries: &[(Option<String>, PathBuf)],
    tf: Transform,
    what: [&str; 2],
) -> Result<Labelled> {
    // Only this shard's queries are run; ids come from the full lists, so they are the same
    // in every shard as in a single run.
    let range = ctx.shard_range(all_queries.len());
    let queries = &all_queries[range.clone()];
    let mut unique = UniqueIds::default();
    let ids: Vec<String> = refs
        .iter()
        .chain(all_queries)
        .map(|(_, p)| unique.id(p))
        .collect();
    let (ref_ids, query_ids) = ids.split_at(refs.len());
    let paths: Vec<PathBuf> = refs.iter().chain(queries).map(|(_, p)| p.clone()).collect();
    let emb = ctx.embed(&paths, true)?;
    let mut images = Vec::new();
    let mut r = image_set(&emb, 0, refs, ref_ids, &mut images, ctx.failures, what[0]);
    let mut q = image_set(
        &emb,
        refs.len(),
        queries,
        &query_ids[range],
        &mut images,
        ctx.failures,
        what[1],
    );
    // CL2N centres on the reference set's mean (an episode has no base set).
    let ok: Vec<&Vec<f32>> = r.ok.iter().flatten().map(|(_, e)| e).collect();
    let center = mean(&ok);
    for set in [&mut r, &mut q] {
        for (_, e) in set.ok.iter_mut().flatten() {
            *e = tf.apply(e, &center);
        }
    }
    let mut by_class: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, l) in r.labels.iter().enumerate() {
        if r.ok[i].is_some() {
            by_class
                .entry(l.clone().unwrap_or_default())
                .or_default()
                .push(i);
        }
    }
    let classes: Vec<String> = by_class.keys().cloned().collect();
    let means = by_class
        .values()
        .map(|idx| {
            mean(
                &idx.iter()
                    .filter_map(|&i| r.ok[i].as_ref().map(|x| &x.1))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    Ok(Labelled {
        emb,
        images,
        refs: r,
        queries: q,
        classes,
        by_class,
        means,
        center,
    })
}

/// Predictions of a task and, for labelled queries, how many were right.
#[derive(Default)]
struct Tally {
    correct: usize,
    labelled: usize,
    predictions: Vec<serde_json::Value>,
}

impl Tally {
    /// Records one query's prediction with its per-class numbers under `key`.
    fn record(
        &mut self,
        path: &std::path::Path,
        label: &Option<String>,
        pred: &str,
        key: &str,
        per_class: impl Iterator<Item = (String, f32)>,
    ) {
        if let Some(l) = label {
            self.labelled += 1;
            self.correct += usize::from(l == pred);
        }
        let per_class: serde_json::Map<_, _> =
            per_class.map(|(c, v)| (c, serde_json::json!(v))).collect();
        self.predictions.push(serde_json::json!({
            "query": path.display().to_string(),
            "label": label,
            "predicted": pred,
            key: per_class,
        }));
    }

    fn accuracy(&self) -> Option<f64> {
        (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64)
    }
}

fn write_json(out: &mut OutputDir, name: &str, doc: &serde_json::Value) -> Result<()> {
    out.set_writer("fam");
    out.write(
        name,
        &serde_json::to_vec_pretty(doc).map_err(|e| FamError::invalid(e.to_string()))?,
    )
}

pub(crate) fn run_few_shot(
    ctx: &mut TaskContext,
    out: &mut OutputDir,
) -> Result<(Explanation, usize)> {
    let TaskSection::FewShot {
        support,
        query,
        all_classes,
        transform: tf,
        contrast,
    } = ctx.p.pipeline.task.clone()
    else {
        return Err(FamError::invalid("not a few_shot task"));
    };
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
                        target: Some(target(e, &others)),
                    },
                    reference: Side::image(qid.clone(), *qrec),
                    score,
                    distance: None,
                    group: Some(qid.clone()),
                    rank: None,
                });
            }
            let by_class = scores.iter().map(|(c, s)| (classes[*c].clone(), *s));
            tally.record(&q.paths[j], &q.labels[j], pred, "scores", by_class);
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
        &serde_json::json!({
            "classes": classes,
            "shots": by_class.iter().map(|(c, v)| (c.clone(), serde_json::json!(v.len()))).collect::<serde_json::Map<_, _>>(),
            "transform": tf,
            "contrast": contrast,
            "accuracy": accuracy,
            "predictions": tally.predictions,
        }),
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

/// Attaches the maps: the query side always; the reference side where it is an image that
/// was explained too (kNN neighbours; not prototypes, centroids, or the query behind a
/// support image's comparison).
fn attach_maps(
    ctx: &mut TaskContext,
    emb: &Embedded,
    comparisons: &mut [Comparison],
    jobs: &[MapJob],
    exact_head: bool,
) -> Result<()> {
    match &emb.maps {
        Some(maps) => ctx.attach_maps(maps, comparisons, jobs, exact_head, |c| {
            c.reference.image.is_some() && c.rank.is_some()
        }),
        None => Ok(()),
    }
}

pub(crate) fn run_classify(
    ctx: &mut TaskContext,
    out: &mut OutputDir,
) -> Result<(Explanation, usize)> {
    let TaskSection::Classify {
        bank,
        queries,
        method,
        k,
        transform: tf,
    } = ctx.p.pipeline.task.clone()
    else {
        return Err(FamError::invalid("not a classify task"));
    };
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
            tally.record(&q.paths[j], &q.labels[j], &pred, "votes", votes.into_iter());
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
        &serde_json::json!({
            "method": method,
            "k": k,
            "classes": classes,
            "transform": tf,
            "accuracy": accuracy,
            "predictions": tally.predictions,
        }),
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
