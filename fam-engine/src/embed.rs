//! The forward pass of a set of images: decode, preprocess, batch, run the backbone once
//! per image, keep embeddings (and feature maps), with the `--resume` checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fam_core::candle::Tensor;
use fam_core::error::{CandleContext, FamError, Result};
use fam_core::host::check_interrupt;
use fam_core::traits::{Backbone, InputSpec};

use crate::cache::FeatureCache;
use crate::preprocess::{self, Decoding, Prepared};
use crate::report::{ms, Counts, PartialImage, Progress, Timings};

/// Embeddings and feature maps of a set of images, each computed once.
#[derive(Debug)]
pub struct Embedded {
    /// Per input image: its index into `maps`/`embeddings`, or the error that stopped it.
    pub slot: Vec<std::result::Result<usize, String>>,
    pub views: Vec<Prepared>,
    /// `[N, C, h, w]` on the backbone's device, for the N images that succeeded.
    pub maps: Option<Tensor>,
    pub embeddings: Vec<Vec<f32>>,
}

/// Decodes, preprocesses and embeds `paths` in batches of `batch_size`. A file that cannot
/// be read is reported in `slot` and the others go on.
/// With `keep_maps = false` only embeddings are kept (a gallery's maps are not needed).
#[allow(clippy::too_many_arguments)]
pub fn embed_images(
    backbone: &dyn Backbone,
    spec: &InputSpec,
    paths: &[PathBuf],
    batch_size: usize,
    keep_maps: bool,
    progress: &dyn Progress,
    timings: &mut Timings,
    counts: &mut Counts,
    checkpoint: Option<&FeatureCache>,
    decoding: Decoding,
    partial: &mut Vec<PartialImage>,
) -> Result<Embedded> {
    let t0 = Instant::now();
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let prepared = preprocess::prepare_files_with(&refs, spec, decoding);
    timings.decode_preprocess += ms(t0);

    let mut slot = Vec::with_capacity(paths.len());
    let mut views = Vec::new();
    let mut keys = Vec::new();
    for (path, r) in paths.iter().zip(prepared) {
        match r {
            Ok((p, cause)) => {
                if let Some(cause) = cause {
                    tracing::warn!(image = %path.display(), cause = %cause, "explaining an image that decoded only in part");
                    if !partial
                        .iter()
                        .any(|q| q.image == path.display().to_string())
                    {
                        partial.push(PartialImage {
                            image: path.display().to_string(),
                            cause,
                        });
                    }
                }
                slot.push(Ok(views.len()));
                views.push(p);
                keys.push(checkpoint.and_then(|_| checkpoint_key(path)));
            }
            Err(e) => {
                tracing::warn!(image = %path.display(), error = %e, "skipping image");
                slot.push(Err(e.to_string()));
            }
        }
    }

    let t1 = Instant::now();
    let device = backbone.device();
    // What an interrupted run already computed.
    let mut restored: Vec<Option<(Vec<f32>, Option<Tensor>)>> = vec![None; views.len()];
    if let Some(c) = checkpoint {
        for (r, key) in restored.iter_mut().zip(&keys) {
            let Some(key) = key else { continue };
            let Some(e) = c.embedding(key) else { continue };
            if !keep_maps {
                *r = Some((e, None));
                continue;
            }
            if let Some((shape, data)) = c.maps(key) {
                let t = Tensor::from_vec(data, (1, shape[0], shape[1], shape[2]), &device)?;
                *r = Some((e, Some(t)));
            }
        }
    }
    let todo: Vec<usize> = (0..views.len())
        .filter(|&i| restored[i].is_none())
        .collect();
    counts.resumed += views.len() - todo.len();
    if todo.len() < views.len() {
        tracing::info!(
            images = views.len(),
            restored = views.len() - todo.len(),
            "resuming from the checkpoint"
        );
    }

    progress.stage("forward", todo.len() as u64);
    let mut maps = Vec::new();
    let mut embeddings = Vec::with_capacity(views.len());
    let mut batch_shapes: Option<(Vec<usize>, usize)> = None;
    for chunk in todo.chunks(batch_size.max(1)) {
        check_interrupt()?;
        let items: Vec<&Prepared> = chunk.iter().map(|&i| &views[i]).collect();
        let batch = preprocess::batch_tensor(&items, &device)?;
        let f = backbone.forward(&batch)?;
        let (b, _, _, _) = f
            .maps
            .dims4()
            .ctx("backbone feature maps must be [B, C, h, w]")?;
        let (be, _) = f
            .embeddings
            .dims2()
            .ctx("backbone embeddings must be [B, C]")?;
        // The embedding may have another size than the channel count where the backbone
        // pulls weights back through its own head (flattened maps, an FC or GDConv head).
        if b != chunk.len() || be != b {
            return Err(FamError::contract(
                format!("backbone `{}`", backbone.describe()),
                format!(
                    "returned maps {:?} and embeddings {:?} for a batch of {}",
                    f.maps.dims(),
                    f.embeddings.dims(),
                    chunk.len()
                ),
            ));
        }
        // Every batch must have the same shapes, or maps and embeddings of different images
        // could not be combined.
        let shapes = (f.maps.dims()[1..].to_vec(), f.embeddings.dims()[1]);
        match &batch_shapes {
            None => batch_shapes = Some(shapes),
            Some(first) if *first != shapes => {
                return Err(FamError::contract(
                    format!("backbone `{}`", backbone.describe()),
                    format!(
                        "returned feature maps {:?} with {}-d embeddings for one batch but {:?} with {}-d embeddings for another; every image must get the same shapes",
                        first.0, first.1, shapes.0, shapes.1
                    ),
                ))
            }
            Some(_) => {}
        }
        let batch_emb = f
            .embeddings
            .to_dtype(fam_core::candle::DType::F32)?
            .to_vec2::<f32>()
            .ctx("copy embeddings to host")?;
        if let Some(c) = checkpoint {
            save_checkpoint(c, chunk, &keys, &batch_emb, keep_maps.then_some(&f.maps))?;
        }
        embeddings.extend(batch_emb);
        if keep_maps {
            maps.push(f.maps);
        }
        counts.images_forwarded += chunk.len();
        progress.advance(chunk.len() as u64);
    }
    progress.finish_stage();
    // Put restored images back in their places.
    if todo.len() < views.len() {
        let computed = if maps.is_empty() {
            None
        } else {
            Some(Tensor::cat(&maps, 0).ctx("concatenate feature maps")?)
        };
        let mut fresh = embeddings.into_iter();
        let mut next_fresh = 0;
        embeddings = Vec::with_capacity(views.len());
        maps = Vec::new();
        for r in restored {
            match r {
                Some((e, m)) => {
                    embeddings.push(e);
                    maps.extend(m);
                }
                None => {
                    embeddings.push(fresh.next().expect("one embedding per computed image"));
                    if let Some(c) = &computed {
                        maps.push(c.narrow(0, next_fresh, 1)?);
                    }
                    next_fresh += 1;
                }
            }
        }
    }
    let maps = if maps.is_empty() {
        None
    } else {
        Some(Tensor::cat(&maps, 0).ctx("concatenate feature maps")?)
    };
    timings.forward += ms(t1);
    Ok(Embedded {
        slot,
        views,
        maps,
        embeddings,
    })
}

/// The checkpoint key of an image file: its absolute path, size and modification time (the
/// model is in the checkpoint folder's name). A checkpoint lives only until its run
/// finishes, so a file's identity is enough, and it costs a `stat`, not a second read.
fn checkpoint_key(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let modified = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    let abs = std::fs::canonicalize(path).ok()?;
    let id = format!("{}\n{}\n{modified}", abs.display(), meta.len());
    Some(crate::cache::sha256_hex(id.as_bytes()))
}

/// Saves one batch's embeddings (and feature maps) to the checkpoint.
fn save_checkpoint(
    c: &FeatureCache,
    chunk: &[usize],
    keys: &[Option<String>],
    embeddings: &[Vec<f32>],
    maps: Option<&Tensor>,
) -> Result<()> {
    for (j, &i) in chunk.iter().enumerate() {
        let Some(key) = &keys[i] else { continue };
        if let Some(m) = maps {
            let m = m.get(j)?.to_dtype(fam_core::candle::DType::F32)?;
            let shape = m.dims().to_vec();
            let data = m.flatten_all()?.to_vec1::<f32>()?;
            c.put_maps(key, &shape, &data)?;
        }
        // The embedding last: an entry counts once its embedding is there.
        c.put_embedding(key, &embeddings[j])?;
    }
    Ok(())
}
