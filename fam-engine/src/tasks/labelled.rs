//! What the `few_shot` and `classify` tasks share: labelled image sets (`<folder>/<class>/*`),
//! embedded once, class means, the tally of predictions, and how their maps are attached.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fam_core::error::Result;
use fam_core::explain::{Comparison, ImageRecord, Transform};

use super::context::{TaskContext, UniqueIds};
use fam_core::records::document_bytes;

use crate::documents::Prediction;
use crate::embed::Embedded;
use crate::maps::MapJob;
use crate::output::{OutputDir, OutputSink};
use crate::report::Failure;

pub(super) fn mean(vs: &[&Vec<f32>]) -> Vec<f32> {
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
pub(super) struct Set {
    pub(super) labels: Vec<Option<String>>,
    pub(super) paths: Vec<PathBuf>,
    /// Per input: index into the run's images and its (transformed) embedding.
    pub(super) ok: Vec<Option<(usize, Vec<f32>)>>,
}

pub(super) fn image_set(
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
pub(super) struct Labelled {
    pub(super) emb: Embedded,
    pub(super) images: Vec<ImageRecord>,
    pub(super) refs: Set,
    pub(super) queries: Set,
    pub(super) classes: Vec<String>,
    pub(super) by_class: BTreeMap<String, Vec<usize>>,
    pub(super) means: Vec<Vec<f32>>,
    /// The CL2N centre (the reference set's mean raw embedding).
    pub(super) center: Vec<f32>,
}

pub(super) fn labelled_sets(
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
pub(super) struct Tally {
    pub(super) correct: usize,
    pub(super) labelled: usize,
    pub(super) predictions: Vec<Prediction>,
}

impl Tally {
    /// Records one query's prediction with its per-class numbers under `key` (`scores` or
    /// `votes`).
    pub(super) fn record(
        &mut self,
        path: &std::path::Path,
        label: &Option<String>,
        pred: &str,
        key: PerClass,
        per_class: impl Iterator<Item = (String, f32)>,
    ) {
        if let Some(l) = label {
            self.labelled += 1;
            self.correct += usize::from(l == pred);
        }
        let per_class: BTreeMap<String, f32> = per_class.collect();
        let (scores, votes) = match key {
            PerClass::Scores => (Some(per_class), None),
            PerClass::Votes => (None, Some(per_class)),
        };
        self.predictions.push(Prediction {
            query: path.display().to_string(),
            label: label.clone(),
            predicted: pred.to_string(),
            scores,
            votes,
        });
    }

    pub(super) fn accuracy(&self) -> Option<f64> {
        (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64)
    }
}

/// What a prediction's per-class numbers are.
#[derive(Debug, Clone, Copy)]
pub(super) enum PerClass {
    Scores,
    Votes,
}

pub(super) fn write_json<T: serde::Serialize>(
    out: &mut OutputDir,
    name: &str,
    doc: &T,
) -> Result<()> {
    out.set_writer("fam");
    out.write(name, &document_bytes(doc)?)
}

/// Attaches the maps: the query side always; the reference side where it is an image that
/// was explained too (kNN neighbours; not prototypes, centroids, or the query behind a
/// support image's comparison).
pub(super) fn attach_maps(
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
