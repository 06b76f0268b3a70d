//! The retrieval task (DESIGN.md section 2): query images against a gallery. The gallery is
//! embedded once (and cached on disk), or read from an index built by `fam-cli index`; the
//! exact top-k search streams over it ([`crate::index::search`]); feature maps are computed
//! only for the hits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fam_core::candle::Tensor;

use super::context::{ContrastGroup, Task, TaskContext, TaskOutput, UniqueIds};
use crate::cache::{sha256_hex, FeatureCache};
use crate::documents::{Hit, QueryRanking, RetrievalDocument};
use crate::index::search::{self, Found, MemoryRows, Rows};
use crate::index::{Index, ModelFingerprint};
use crate::maps::MapJob;
use crate::output::{safe_stem, OutputDir, OutputSink};
use crate::pipeline::ImageSet;
use crate::preprocess::{self, Prepared};
use crate::report::{ms, Failure};
use fam_core::error::{CandleContext, FamError, Result};
use fam_core::explain::{Comparison, Explanation, ImageRecord, Side, Target};
use fam_core::records::document_bytes;

/// A ranked hit: gallery row, score, distance.
type Ranked = (u64, f32, Option<f32>);

/// One gallery image: its content key and embedding (or why it has none).
struct GalleryItem {
    path: PathBuf,
    key: String,
    embedding: std::result::Result<Vec<f32>, String>,
}

/// What the run knows of a gallery row: its file, content hash, and how many files before it
/// in the listing share its name (for its id).
#[derive(Debug, Clone)]
struct RowInfo {
    path: PathBuf,
    sha256: String,
    same_name_before: usize,
}

/// The gallery searched: embedded by this run, or an index.
enum Gallery {
    Memory {
        rows: MemoryRows,
        info: Vec<RowInfo>,
        size: usize,
    },
    Index(Index),
}

impl Gallery {
    fn rows(&self) -> &dyn Rows {
        match self {
            Gallery::Memory { rows, .. } => rows,
            Gallery::Index(i) => i,
        }
    }

    fn info(&self, rows: &[u64]) -> Result<HashMap<u64, RowInfo>> {
        match self {
            Gallery::Memory { info, .. } => Ok(rows
                .iter()
                .map(|&r| (r, info[r as usize].clone()))
                .collect()),
            Gallery::Index(i) => Ok(i
                .items(rows)?
                .into_iter()
                .map(|(r, it)| {
                    (
                        r,
                        RowInfo {
                            path: it.path,
                            sha256: it.sha256,
                            same_name_before: it.same_name_before,
                        },
                    )
                })
                .collect()),
        }
    }

    /// Files listed, and files embedded.
    fn sizes(&self) -> (usize, usize) {
        match self {
            Gallery::Memory { info, size, .. } => (*size, info.len()),
            Gallery::Index(i) => (i.listing.files, i.rows() as usize),
        }
    }
}

/// The `retrieval` task of a pipeline.
#[derive(Debug, Clone)]
pub struct Retrieval {
    pub queries: ImageSet,
    pub gallery: Option<ImageSet>,
    pub index: Option<PathBuf>,
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

/// Opens the index and checks it was built with this run's model.
fn open_index(dir: &Path, ctx: &TaskContext) -> Result<Index> {
    let index = Index::open(dir)?;
    let ours = ModelFingerprint::of(
        ctx.p.pipeline.backbone.weights.as_deref(),
        &ctx.session.backbone.describe(),
        &ctx.session.spec,
    )?;
    if index.model.fingerprint != ours.fingerprint {
        return Err(FamError::invalid(format!(
            "index {} was built with model {}, but this pipeline ({}) uses model {}: build the index again with this pipeline (`fam-cli index {}`), or point `task.index` at one built with this model",
            dir.display(),
            index.model,
            ctx.p.path.display(),
            ours,
            ctx.p.path.display()
        )));
    }
    tracing::info!(index = %dir.display(), rows = index.rows(), gallery = index.listing.files, "gallery index");
    Ok(index)
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
        index,
        top_k,
        exclude_self,
        cache,
        cache_dir,
    } = task;
    let queries = queries.files()?;
    // Ids come from the full lists (every query, then every gallery image), so they are the
    // same in every shard as in a single run, with or without an index.
    let mut unique = UniqueIds::default();
    let all_query_ids: Vec<String> = queries.iter().map(|p| unique.id(p)).collect();
    let mut query_stems: HashMap<String, usize> = HashMap::new();
    for q in &queries {
        *query_stems.entry(safe_stem(q)).or_insert(0) += 1;
    }
    let gallery_id = |info: &RowInfo| {
        let stem = safe_stem(&info.path);
        let n = query_stems.get(&stem).copied().unwrap_or(0) + info.same_name_before + 1;
        if n == 1 {
            stem
        } else {
            format!("{stem}-{n}")
        }
    };
    let range = ctx.shard_range(queries.len());
    let query_ids = all_query_ids[range.clone()].to_vec();
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

    let gallery = match (index, gallery) {
        (Some(dir), _) => {
            let index = open_index(dir, ctx)?;
            ctx.failures.extend(index.failures().cloned());
            Gallery::Index(index)
        }
        (None, Some(set)) => {
            let files = set.files()?;
            let items = embed_gallery(ctx, &files, cache.as_ref())?;
            let mut seen: HashMap<String, usize> = HashMap::new();
            let mut info = Vec::new();
            let mut values = Vec::new();
            let mut dims = 0;
            let size = items.len();
            for item in items {
                let c = seen.entry(safe_stem(&item.path)).or_insert(0);
                *c += 1;
                if let Ok(e) = &item.embedding {
                    if dims == 0 {
                        dims = e.len();
                    }
                    if e.len() != dims {
                        return Err(FamError::invalid(format!(
                            "{}: the backbone gave {} values, earlier gallery images {dims}",
                            item.path.display(),
                            e.len()
                        )));
                    }
                    values.extend_from_slice(e);
                    info.push(RowInfo {
                        path: item.path,
                        sha256: item.key,
                        same_name_before: *c - 1,
                    });
                }
            }
            Gallery::Memory {
                rows: MemoryRows { dims, values },
                info,
                size,
            }
        }
        (None, None) => {
            return Err(FamError::invalid(
                "the retrieval task has neither `gallery` nor `index`",
            ))
        }
    };

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

    // Rank every embedded query against the gallery: one streaming pass.
    let t = Instant::now();
    let sim = ctx.session.similarity.as_ref();
    let searched: Vec<usize> = (0..queries.len()).filter(|i| q.slot[*i].is_ok()).collect();
    let embs: Vec<Vec<f32>> = searched
        .iter()
        .map(|&i| q.embeddings[*q.slot[i].as_ref().unwrap()].clone())
        .collect();
    let mut exclude = |asked: &[(usize, &[u64])]| -> Result<Vec<Vec<bool>>> {
        if !*exclude_self {
            return search::exclude_none(asked);
        }
        let rows: Vec<u64> = asked.iter().flat_map(|(_, r)| r.iter().copied()).collect();
        let info = gallery.info(&rows)?;
        Ok(asked
            .iter()
            .map(|(s, rows)| {
                let key = query_keys[searched[*s]].as_deref();
                rows.iter()
                    .map(|r| key.is_some() && info.get(r).map(|i| i.sha256.as_str()) == key)
                    .collect()
            })
            .collect())
    };
    let (hits_total, dims) = (gallery.sizes().1, gallery.rows().dims());
    ctx.progress.stage("search", hits_total as u64);
    let progress = |n: usize| ctx.progress.advance(n as u64);
    let (found, stats) = if hits_total == 0 || dims == 0 {
        (
            vec![Found::Hits(Vec::new()); embs.len()],
            search::SearchStats::default(),
        )
    } else {
        search::search(&embs, gallery.rows(), sim, *top_k, &mut exclude, &progress)?
    };
    ctx.progress.finish_stage();
    let mut rankings: Vec<(usize, Vec<Ranked>)> = Vec::new();
    for (s, f) in found.into_iter().enumerate() {
        let i = searched[s];
        match f {
            Found::Hits(h) => rankings.push((
                i,
                h.into_iter()
                    .map(|h| (h.row, h.score, h.distance))
                    .collect(),
            )),
            Found::Failed(error) => ctx.failures.push(Failure {
                item: format!("query {}", queries[i].display()),
                error,
            }),
        }
    }
    ctx.timings.search += ms(t);
    tracing::info!(
        queries = embs.len(),
        rows = stats.rows_scanned,
        passes = stats.passes,
        inner_products = stats.inner_products,
        ms = ms(t),
        peak_rss_mib = crate::report::peak_rss_mib().unwrap_or(f64::NAN),
        "search"
    );

    // Feature maps for the hits only: from the cache, or one batched forward pass.
    let mut hit_rows: Vec<u64> = rankings
        .iter()
        .flat_map(|(_, h)| h.iter().map(|x| x.0))
        .collect();
    hit_rows.sort_unstable();
    hit_rows.dedup();
    let info = gallery.info(&hit_rows)?;
    let hit_info: Vec<&RowInfo> = hit_rows.iter().map(|r| &info[r]).collect();
    let hit_paths: Vec<&Path> = hit_info.iter().map(|i| i.path.as_path()).collect();
    let t = Instant::now();
    let indexed = matches!(gallery, Gallery::Index(_));
    let hit_views: Vec<Result<Prepared>> =
        preprocess::prepare_files_with(&hit_paths, &ctx.session.spec, ctx.p.pipeline.run.decoding)
            .into_iter()
            .zip(&hit_info)
            .map(|(r, info)| {
                let (prepared, _) = r?;
                // An indexed file must still be the one whose embedding ranked it.
                if indexed {
                    let now = crate::cache::sha256_file(&info.path)?;
                    if now != info.sha256 {
                        return Err(FamError::Item {
                            item: info.path.display().to_string(),
                            message: format!(
                                "changed since it was indexed (sha256 {}, indexed {}): build its index part again",
                                &now[..12],
                                &info.sha256[..info.sha256.len().min(12)]
                            ),
                        });
                    }
                }
                Ok(prepared)
            })
            .collect();
    ctx.timings.decode_preprocess += ms(t);
    let mut hit_maps: Vec<Option<Tensor>> = vec![None; hit_rows.len()];
    let mut to_forward: Vec<usize> = Vec::new();
    let device = ctx.session.backbone.device();
    for (h, info) in hit_info.iter().enumerate() {
        if let Some((shape, data)) = cache.as_ref().and_then(|c| c.maps(&info.sha256)) {
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
                c.put_maps(&hit_info[h].sha256, &shape, &data)?;
            }
            hit_maps[h] = Some(m);
        }
    }
    ctx.timings.forward += ms(t);

    let t = Instant::now();
    let mut hit_rec: HashMap<u64, usize> = HashMap::new();
    let mut hit_tensors = Vec::new();
    let mut hit_embedding: HashMap<u64, Vec<f32>> = HashMap::new();
    for (h, &row) in hit_rows.iter().enumerate() {
        match (&hit_views[h], hit_maps[h].take()) {
            (Ok(view), Some(m)) => {
                hit_rec.insert(row, images.len());
                images.push(ImageRecord {
                    id: gallery_id(hit_info[h]),
                    source: hit_info[h].path.clone(),
                    view: view.view.clone(),
                });
                hit_tensors.push(m);
                hit_embedding.insert(row, gallery.rows().row(row)?);
            }
            (Err(e), _) => ctx.failures.push(Failure {
                item: format!("gallery {}", hit_info[h].path.display()),
                error: e.to_string(),
            }),
            (Ok(_), None) => {}
        }
    }

    // All maps in one batched pass: queries' maps first, then the hits'.
    let nq = q.maps.as_ref().map(|m| m.dims()[0]).unwrap_or(0);
    let mut comparisons = Vec::new();
    let mut jobs = Vec::new();
    let mut contrast_groups = Vec::new();
    let weighting = ctx.p.pipeline.explain.weighting;
    for (i, hits) in &rankings {
        let (Some(qr), Ok(qs)) = (query_rec[*i], &q.slot[*i]) else {
            continue;
        };
        let e = &q.embeddings[*qs];
        // This query's explained hits: (comparison index, the query's plain map job).
        let mut explained = Vec::new();
        for (rank, (row, score, distance)) in hits.iter().enumerate() {
            let (Some(&hr), Some(r)) = (hit_rec.get(row), hit_embedding.get(row)) else {
                continue;
            };
            // Hit records follow the query records, in the same order as `hit_tensors`.
            let hit_index = nq + hr + hit_tensors.len() - images.len();
            let jq = MapJob::new(sim, weighting, *qs, e, r);
            let jh = MapJob::new(sim, weighting, hit_index, r, e);
            let (jq, jh) = match (jq, jh) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(err), _) | (_, Err(err)) => {
                    ctx.failures.push(Failure {
                        item: format!(
                            "query {} hit {}",
                            queries[*i].display(),
                            info[row].path.display()
                        ),
                        error: err.to_string(),
                    });
                    continue;
                }
            };
            explained.push((comparisons.len(), jq.clone()));
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
                correspondence: None,
            });
        }
        // The query against each hit relative to its other hits: what singles this hit out.
        if explained.len() >= 2 && ctx.wants_contrast_maps() {
            contrast_groups.push(ContrastGroup {
                members: explained,
                noun: ("hit", "hits"),
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
        ctx.attach_contrast_maps(&maps, &mut comparisons, contrast_groups, true)?;
    }
    ctx.timings.fam += ms(t);

    // The ranking, for programs.
    let (gallery_size, gallery_embedded) = gallery.sizes();
    let doc = RetrievalDocument {
        top_k: *top_k,
        gallery_size,
        gallery_embedded,
        queries: rankings
            .iter()
            .map(|(i, hits)| QueryRanking {
                query: queries[*i].display().to_string(),
                hits: hits
                    .iter()
                    .enumerate()
                    .map(|(r, (row, s, d))| Hit {
                        rank: r + 1,
                        image: info[row].path.display().to_string(),
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
