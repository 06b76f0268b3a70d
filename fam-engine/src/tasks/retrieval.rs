//! The retrieval task (DESIGN.md section 2): query images against a gallery. The gallery is
//! embedded once (and cached on disk); feature maps are computed only for the hits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fam_core::candle::Tensor;

use super::context::{Task, TaskContext, TaskOutput, UniqueIds};
use crate::cache::{sha256_hex, FeatureCache};
use crate::documents::{Hit, QueryRanking, RetrievalDocument};
use crate::maps::MapJob;
use crate::output::{OutputDir, OutputSink};
use crate::pipeline::ImageSet;
use crate::preprocess::{self, Prepared};
use crate::report::{ms, Failure};
use fam_core::error::{CandleContext, FamError, Result};
use fam_core::explain::{rank_key, Comparison, Explanation, ImageRecord, Side, Target};
use fam_core::records::document_bytes;

/// A ranked hit: gallery index, score, distance.
type Ranked = (usize, f32, Option<f32>);

/// One gallery image: its content key and embedding (or why it has none).
struct GalleryItem {
    path: PathBuf,
    key: String,
    embedding: std::result::Result<Vec<f32>, String>,
}

/// The `retrieval` task of a pipeline.
#[derive(Debug, Clone)]
pub struct Retrieval {
    pub queries: ImageSet,
    pub gallery: ImageSet,
    pub top_k: usize,
    pub exclude_self: bool,
    pub cache: bool,
    pub cache_dir: Option<PathBuf>,
}

impl Task for Retrieval {
    fn name(&self) -> &'static str {
        "retrieval"
    }

    fn run(&self, ctx: &mut TaskContext, out: &mut OutputDir) -> Result<TaskOutput> {
        let (explanation, items) = run_retrieval(self, ctx, out)?;
        Ok(TaskOutput { explanation, items })
    }
}

fn run_retrieval(
    task: &Retrieval,
    ctx: &mut TaskContext,
    out: &mut OutputDir,
) -> Result<(Explanation, usize)> {
    let output = ctx.output;
    let Retrieval {
        queries,
        gallery,
        top_k,
        exclude_self,
        cache,
        cache_dir,
    } = task;
    let (queries, gallery_files) = (queries.files()?, gallery.files()?);
    // Ids come from the full lists (every query, then every gallery image), so they are the
    // same in every shard as in a single run.
    let mut unique = UniqueIds::default();
    let all_ids: Vec<String> = queries
        .iter()
        .chain(&gallery_files)
        .map(|p| unique.id(p))
        .collect();
    let range = ctx.shard_range(queries.len());
    let (query_ids, gallery_ids) = all_ids.split_at(queries.len());
    let query_ids = query_ids[range.clone()].to_vec();
    let queries = queries[range].to_vec();
    let cache = if *cache {
        let root = cache_dir.clone().unwrap_or_else(|| output.join("cache"));
        Some(FeatureCache::open(
            &root,
            ctx.p.pipeline.backbone.weights.as_deref(),
            &ctx.session.backbone.describe(),
            &ctx.session.spec,
        )?)
    } else {
        None
    };

    let gallery = embed_gallery(ctx, &gallery_files, cache.as_ref())?;

    // Queries, with their feature maps.
    let q = ctx.embed(&queries, true)?;
    let mut images: Vec<ImageRecord> = Vec::new();
    let mut query_rec = vec![None; queries.len()];
    for (i, path) in queries.iter().enumerate() {
        match &q.slot[i] {
            Ok(s) => {
                debug_assert_eq!(*s, images.len());
                query_rec[i] = Some(images.len());
                images.push(ImageRecord {
                    id: query_ids[i].clone(),
                    source: path.clone(),
                    view: q.views[*s].view.clone(),
                });
            }
            Err(e) => ctx.failures.push(Failure {
                item: format!("query {}", path.display()),
                error: e.clone(),
            }),
        }
    }
    let query_keys: Vec<Option<String>> = queries
        .iter()
        .map(|p| std::fs::read(p).ok().map(|b| sha256_hex(&b)))
        .collect();

    // Rank every query against the gallery.
    let t = Instant::now();
    let sim = ctx.session.similarity.as_ref();
    let mut rankings: Vec<(usize, Vec<Ranked>)> = Vec::new();
    for (i, path) in queries.iter().enumerate() {
        let Ok(slot) = q.slot[i] else { continue };
        let e = &q.embeddings[slot];
        let mut scored = Vec::with_capacity(gallery.len());
        let mut error = None;
        for (g, item) in gallery.iter().enumerate() {
            let Ok(r) = &item.embedding else { continue };
            if *exclude_self && query_keys[i].as_deref() == Some(item.key.as_str()) {
                continue;
            }
            match sim.score(e, r) {
                Ok(s) => scored.push((g, s, sim.distance(e, r).ok().flatten())),
                Err(err) => {
                    error = Some(err);
                    break;
                }
            }
        }
        if let Some(err) = error {
            ctx.failures.push(Failure {
                item: format!("query {}", path.display()),
                error: err.to_string(),
            });
            continue;
        }
        scored.sort_by(|a, b| rank_key(b.1, b.2).total_cmp(&rank_key(a.1, a.2)));
        scored.truncate(*top_k);
        rankings.push((i, scored));
    }
    ctx.timings.fam += ms(t);

    // Feature maps for the hits only: from the cache, or one batched forward pass.
    let mut hit_ids: Vec<usize> = rankings
        .iter()
        .flat_map(|(_, h)| h.iter().map(|x| x.0))
        .collect();
    hit_ids.sort_unstable();
    hit_ids.dedup();
    let hit_paths: Vec<&Path> = hit_ids.iter().map(|&g| gallery[g].path.as_path()).collect();
    let t = Instant::now();
    let hit_views: Vec<Result<Prepared>> =
        preprocess::prepare_files_with(&hit_paths, &ctx.session.spec, ctx.p.pipeline.run.decoding)
            .into_iter()
            .map(|r| r.map(|(prepared, _)| prepared))
            .collect();
    ctx.timings.decode_preprocess += ms(t);
    let mut hit_maps: Vec<Option<Tensor>> = vec![None; hit_ids.len()];
    let mut to_forward: Vec<usize> = Vec::new();
    let device = ctx.session.backbone.device();
    for (h, &g) in hit_ids.iter().enumerate() {
        if let Some((shape, data)) = cache.as_ref().and_then(|c| c.maps(&gallery[g].key)) {
            hit_maps[h] = Some(Tensor::from_vec(
                data,
                (shape[0], shape[1], shape[2]),
                &device,
            )?);
            ctx.counts.cache_hits += 1;
        } else if hit_views[h].is_ok() {
            to_forward.push(h);
        }
    }
    let t = Instant::now();
    for chunk in to_forward.chunks(ctx.p.pipeline.run.batch_size.max(1)) {
        let items: Vec<&Prepared> = chunk
            .iter()
            .map(|&h| hit_views[h].as_ref().unwrap())
            .collect();
        let batch = preprocess::batch_tensor(&items, &device)?;
        let f = ctx.session.backbone.forward(&batch)?;
        ctx.counts.images_forwarded += chunk.len();
        for (j, &h) in chunk.iter().enumerate() {
            let m = f.maps.get(j)?;
            if let Some(c) = &cache {
                let shape = m.dims().to_vec();
                let data: Vec<f32> = m
                    .flatten_all()?
                    .to_dtype(fam_core::candle::DType::F32)?
                    .to_vec1()?;
                c.put_maps(&gallery[hit_ids[h]].key, &shape, &data)?;
            }
            hit_maps[h] = Some(m);
        }
    }
    ctx.timings.forward += ms(t);

    let t = Instant::now();
    let mut hit_rec: HashMap<usize, usize> = HashMap::new();
    let mut hit_tensors = Vec::new();
    for (h, &g) in hit_ids.iter().enumerate() {
        match (&hit_views[h], hit_maps[h].take()) {
            (Ok(view), Some(m)) => {
                hit_rec.insert(g, images.len());
                images.push(ImageRecord {
                    id: gallery_ids[g].clone(),
                    source: gallery[g].path.clone(),
                    view: view.view.clone(),
                });
                hit_tensors.push(m);
            }
            (Err(e), _) => ctx.failures.push(Failure {
                item: format!("gallery {}", gallery[g].path.display()),
                error: e.to_string(),
            }),
            (Ok(_), None) => {}
        }
    }

    // All maps in one batched pass: queries' maps first, then the hits'.
    let nq = q.maps.as_ref().map(|m| m.dims()[0]).unwrap_or(0);
    let mut comparisons = Vec::new();
    let mut jobs = Vec::new();
    for (i, hits) in &rankings {
        let (Some(qr), Ok(qs)) = (query_rec[*i], &q.slot[*i]) else {
            continue;
        };
        let e = &q.embeddings[*qs];
        for (rank, (g, score, distance)) in hits.iter().enumerate() {
            let Some(&hr) = hit_rec.get(g) else { continue };
            let r = gallery[*g].embedding.as_ref().map_err(|e| FamError::Item {
                item: gallery[*g].path.display().to_string(),
                message: e.clone(),
            })?;
            // Hit records follow the query records, in the same order as `hit_tensors`.
            let hit_index = nq + hr + hit_tensors.len() - images.len();
            let weighting = ctx.p.pipeline.explain.weighting;
            let jq = MapJob::new(sim, weighting, *qs, e, r);
            let jh = MapJob::new(sim, weighting, hit_index, r, e);
            let (jq, jh) = match (jq, jh) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(err), _) | (_, Err(err)) => {
                    ctx.failures.push(Failure {
                        item: format!(
                            "query {} hit {}",
                            queries[*i].display(),
                            gallery[*g].path.display()
                        ),
                        error: err.to_string(),
                    });
                    continue;
                }
            };
            jobs.push(jq);
            jobs.push(jh);
            let (qid, hid) = (images[qr].id.clone(), images[hr].id.clone());
            comparisons.push(Comparison {
                id: format!("{qid}_hit-{:02}_{hid}", rank + 1),
                query: Side::image(qid.clone(), qr).with_target(Target::new(r)),
                reference: Side::image(hid, hr).with_target(Target::new(e)),
                score: *score,
                distance: *distance,
                group: Some(qid),
                rank: Some(rank + 1),
            });
        }
    }
    if !jobs.is_empty() {
        let mut all = Vec::new();
        if let Some(m) = &q.maps {
            all.push(m.clone());
        }
        if !hit_tensors.is_empty() {
            all.push(Tensor::stack(&hit_tensors, 0).ctx("stack hit feature maps")?);
        }
        let maps = Tensor::cat(&all, 0).ctx("join query and hit feature maps")?;
        ctx.attach_maps(&maps, &mut comparisons, &jobs, true, |_| true)?;
    }
    ctx.timings.fam += ms(t);

    // The ranking, for programs.
    let doc = RetrievalDocument {
        top_k: *top_k,
        gallery_size: gallery.len(),
        gallery_embedded: gallery.iter().filter(|g| g.embedding.is_ok()).count(),
        queries: rankings
            .iter()
            .map(|(i, hits)| QueryRanking {
                query: queries[*i].display().to_string(),
                hits: hits
                    .iter()
                    .enumerate()
                    .map(|(r, (g, s, d))| Hit {
                        rank: r + 1,
                        image: gallery[*g].path.display().to_string(),
                        score: *s,
                        distance: *d,
                    })
                    .collect(),
            })
            .collect(),
    };
    out.set_writer("fam");
    out.write("retrieval.json", &document_bytes(&doc)?)?;

    let explanation = Explanation {
        info: ctx.info("retrieval"),
        images,
        comparisons,
    };
    Ok((explanation, queries.len()))
}

/// Embeddings of every gallery image, from the cache where possible; the rest are decoded
/// and embedded in batches (their feature maps are dropped) and added to the cache.
fn embed_gallery(
    ctx: &mut TaskContext,
    files: &[PathBuf],
    cache: Option<&FeatureCache>,
) -> Result<Vec<GalleryItem>> {
    let mut items: Vec<GalleryItem> = files
        .iter()
        .map(|p| match std::fs::read(p) {
            Ok(bytes) => GalleryItem {
                path: p.clone(),
                key: sha256_hex(&bytes),
                embedding: Err("not embedded".into()),
            },
            Err(e) => GalleryItem {
                path: p.clone(),
                key: String::new(),
                embedding: Err(FamError::io(p, e).to_string()),
            },
        })
        .collect();
    let mut missing = Vec::new();
    for (i, item) in items.iter_mut().enumerate() {
        if item.key.is_empty() {
            continue;
        }
        match cache.and_then(|c| c.embedding(&item.key)) {
            Some(e) => {
                item.embedding = Ok(e);
                ctx.counts.cache_hits += 1;
            }
            None => missing.push(i),
        }
    }
    tracing::info!(
        gallery = files.len(),
        cached = files.len() - missing.len(),
        "gallery"
    );
    // Stream in chunks so that only one chunk of decoded images is held at a time.
    const CHUNK: usize = 256;
    for part in missing.chunks(CHUNK) {
        let paths: Vec<PathBuf> = part.iter().map(|&i| items[i].path.clone()).collect();
        let emb = ctx.embed(&paths, false)?;
        for (j, &i) in part.iter().enumerate() {
            items[i].embedding = match &emb.slot[j] {
                Ok(s) => {
                    let e = emb.embeddings[*s].clone();
                    if let Some(c) = cache {
                        c.put_embedding(&items[i].key, &e)?;
                    }
                    Ok(e)
                }
                Err(err) => Err(err.clone()),
            };
        }
    }
    for item in &items {
        if let Err(e) = &item.embedding {
            ctx.failures.push(Failure {
                item: format!("gallery {}", item.path.display()),
                error: e.clone(),
            });
        }
    }
    Ok(items)
}
