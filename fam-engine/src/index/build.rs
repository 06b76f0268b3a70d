//! `fam-cli index PIPELINE [--shard K/N]`: embeds one part of the gallery and writes it.

use std::collections::HashMap;
use std::io::{Seek, Write};
use std::path::PathBuf;
use std::time::Instant;

use super::format::{
    listing_sha256, part_files, Item, Listing, ModelFingerprint, PartHeader, FORMAT, VERSION,
};
use crate::cache::sha256_hex;
use crate::loader::PluginHost;
use crate::output::{safe_stem, write_atomic};
use crate::pipeline::{ImageSet, LoadedPipeline, TaskSection};
use crate::report::{ms, Counts, Failure, Progress, Timings};
use crate::session::{RunOptions, Session};
use fam_core::error::{FamError, Result};
use fam_core::records::document_bytes;

/// What building one part did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    /// The part's header file.
    pub header: PathBuf,
    pub part: usize,
    pub parts: usize,
    pub files: usize,
    pub rows: usize,
    pub failures: Vec<Failure>,
    pub counts: Counts,
    pub timings_ms: Timings,
}

/// Gallery images embedded per step: only one step's decoded images are held at a time.
const STEP: usize = 256;

/// Builds part `opts.shard` (or the only part) of the index of `p`'s retrieval gallery, in
/// `opts.output` or the task's `index` folder.
pub fn build_part(
    p: &LoadedPipeline,
    host: &mut PluginHost,
    opts: &RunOptions,
    progress: &dyn Progress,
) -> Result<BuildReport> {
    let start = Instant::now();
    let TaskSection::Retrieval { gallery, index, .. } = &p.pipeline.task else {
        return Err(FamError::invalid(format!(
            "{}: `fam-cli index` indexes the gallery of a retrieval task, and this pipeline's task is `{}`",
            p.path.display(),
            p.pipeline.task.name()
        )));
    };
    let Some(gallery) = gallery else {
        return Err(FamError::invalid(format!(
            "{}: the retrieval task names no `gallery` to index",
            p.path.display()
        )));
    };
    let dir = opts.output.clone().or_else(|| index.clone()).ok_or_else(|| {
        FamError::invalid(format!(
            "{}: where should the index go? Set `task.index = \"DIR\"` (where `run` will read it) or give --output DIR",
            p.path.display()
        ))
    })?;
    let files = gallery.files()?;
    let root = match gallery {
        ImageSet::Folder(d) => Some(d.as_path()),
        ImageSet::Files(_) => None,
    };
    let listing = Listing {
        files: files.len(),
        sha256: listing_sha256(&files, root),
    };
    let shard = opts
        .shard
        .unwrap_or(crate::pipeline::Shard { index: 0, count: 1 });
    let range = shard.range(files.len());
    let (k, n) = (shard.index + 1, shard.count);
    // Earlier files with the same name, over the whole listing: what ids a run gives hits.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let same_before: Vec<usize> = files
        .iter()
        .map(|f| {
            let c = seen.entry(safe_stem(f)).or_insert(0);
            *c += 1;
            *c - 1
        })
        .collect();
    drop(seen);

    let session = Session::open(
        p,
        host,
        &RunOptions {
            output: None,
            ..opts.clone()
        },
    )?;
    let model = ModelFingerprint::of(
        p.pipeline.backbone.weights.as_deref(),
        &session.backbone.describe(),
        &session.spec,
    )?;
    let mut timings = Timings {
        load_models: ms(start),
        ..Default::default()
    };
    tracing::info!(part = k, parts = n, files = range.len(), gallery = files.len(), dir = %dir.display(), "indexing");
    std::fs::create_dir_all(&dir).map_err(|e| FamError::io(&dir, e))?;

    let (header_name, emb_name, items_name) = part_files(k, n);
    let tmp = |name: &str| dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let (emb_tmp, items_tmp) = (tmp(&emb_name), tmp(&items_name));
    let result = (|| -> Result<BuildReport> {
        let mut emb = std::io::BufWriter::new(
            std::fs::File::create(&emb_tmp).map_err(|e| FamError::io(&emb_tmp, e))?,
        );
        let mut items = std::io::BufWriter::new(
            std::fs::File::create(&items_tmp).map_err(|e| FamError::io(&items_tmp, e))?,
        );
        // Room for the header; it is written again with the real shape at the end.
        let placeholder = fam_core::output::npy_f32_header(&[usize::MAX / 4, 1 << 20]);
        emb.write_all(&placeholder)
            .map_err(|e| FamError::io(&emb_tmp, e))?;
        let mut counts = Counts::default();
        let mut failures = Vec::new();
        let mut partial = Vec::new();
        let (mut rows, mut dims) = (0usize, None::<usize>);
        let mine: Vec<usize> = range.clone().collect();
        progress.stage("index", mine.len() as u64);
        for step in mine.chunks(STEP) {
            let paths: Vec<PathBuf> = step.iter().map(|&i| files[i].clone()).collect();
            // Size and content hash first, from the bytes the decoder will read.
            let facts: Vec<std::result::Result<(u64, String), String>> = paths
                .iter()
                .map(|p| {
                    std::fs::read(p)
                        .map(|b| (b.len() as u64, sha256_hex(&b)))
                        .map_err(|e| FamError::io(p, e).to_string())
                })
                .collect();
            let embedded = crate::embed::embed_images(
                session.backbone.as_ref(),
                &session.spec,
                &paths,
                p.pipeline.run.batch_size,
                false,
                &crate::report::NoProgress,
                &mut timings,
                &mut counts,
                None,
                p.pipeline.run.decoding,
                &mut partial,
                crate::embed::Overlap::for_device(&session.backbone.device()),
            )?;
            for (j, &i) in step.iter().enumerate() {
                let path = &files[i];
                let (size, sha256) = match (&facts[j], &embedded.slot[j]) {
                    (Ok(f), Ok(_)) => f.clone(),
                    (Err(e), _) | (_, Err(e)) => {
                        failures.push(Failure {
                            item: format!("gallery {}", path.display()),
                            error: e.clone(),
                        });
                        continue;
                    }
                };
                let Ok(slot) = embedded.slot[j] else { continue };
                let e = &embedded.embeddings[slot];
                match dims {
                    None => dims = Some(e.len()),
                    Some(d) if d != e.len() => {
                        return Err(FamError::invalid(format!(
                            "{}: the backbone gave {} values, earlier images {d}",
                            path.display(),
                            e.len()
                        )))
                    }
                    _ => {}
                }
                let bytes: Vec<u8> = e.iter().flat_map(|v| v.to_le_bytes()).collect();
                emb.write_all(&bytes)
                    .map_err(|e| FamError::io(&emb_tmp, e))?;
                let item = Item {
                    file: i,
                    path: path.clone(),
                    size,
                    sha256,
                    same_name_before: same_before[i],
                };
                let mut line = serde_json::to_vec(&item)
                    .map_err(|e| FamError::invalid(format!("index item: {e}")))?;
                line.push(b'\n');
                items
                    .write_all(&line)
                    .map_err(|e| FamError::io(&items_tmp, e))?;
                rows += 1;
            }
            progress.advance(step.len() as u64);
            fam_core::host::check_interrupt()?;
        }
        progress.finish_stage();
        let dims = dims.unwrap_or(0);
        let header = fam_core::output::npy_f32_header(&[rows, dims]);
        let mut emb = emb
            .into_inner()
            .map_err(|e| FamError::io(&emb_tmp, e.into_error()))?;
        if header.len() != placeholder.len() {
            return Err(FamError::invalid("npy header size changed; this is a bug"));
        }
        emb.seek(std::io::SeekFrom::Start(0))
            .and_then(|_| emb.write_all(&header))
            .and_then(|_| emb.sync_all())
            .map_err(|e| FamError::io(&emb_tmp, e))?;
        items.flush().map_err(|e| FamError::io(&items_tmp, e))?;
        drop(items);
        // The old header goes first: a part is complete only once its header is written.
        let path = dir.join(&header_name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| FamError::io(&path, e))?;
        }
        for (t, name) in [(&emb_tmp, &emb_name), (&items_tmp, &items_name)] {
            std::fs::rename(t, dir.join(name)).map_err(|e| FamError::io(dir.join(name), e))?;
        }
        timings.total = ms(start);
        let header = PartHeader {
            format: FORMAT.into(),
            version: VERSION,
            fam_version: env!("CARGO_PKG_VERSION").into(),
            model,
            listing,
            part: k,
            parts: n,
            first_file: range.start,
            files: range.len(),
            rows,
            dims,
            embeddings: emb_name.clone(),
            items: items_name.clone(),
            failures: failures.clone(),
            counts: counts.clone(),
            timings_ms: timings.clone(),
        };
        write_atomic(&path, &document_bytes(&header)?)?;
        Ok(BuildReport {
            header: path,
            part: k,
            parts: n,
            files: range.len(),
            rows,
            failures,
            counts,
            timings_ms: timings,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&emb_tmp);
        let _ = std::fs::remove_file(&items_tmp);
    }
    result
}
