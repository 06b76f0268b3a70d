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

/// How decoding is scheduled against the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// Decode every image first, then run the forward passes: on the CPU both use every
    /// core, so running them side by side would only make them take turns.
    Off,
    /// Decode the next batch (on all host cores) while the device runs this one, so that a
    /// GPU does not wait for the decoder. Batches are the same as with `Off`.
    On,
}

impl Overlap {
    /// `On` for accelerators, `Off` on the CPU.
    pub fn for_device(device: &fam_core::candle::Device) -> Self {
        if device.is_cpu() {
            Overlap::Off
        } else {
            Overlap::On
        }
    }
}

/// One decoded image: the prepared view, or why it could not be read.
type Decoded = Result<(Prepared, Option<String>)>;

/// Decodes, preprocesses and embeds `paths` in batches of `batch_size`. A file that cannot
/// be read is reported in `slot` and the others go on.
/// With `keep_maps = false` only embeddings are kept (a gallery's maps are not needed).
/// With [`Overlap::On`] (accelerators, [`Overlap::for_device`]) the next batch is decoded
/// while this one runs.
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
    overlap: Overlap,
) -> Result<Embedded> {
    let batch_size = batch_size.max(1);
    let decode = |block: &[PathBuf]| -> (Vec<Decoded>, f64) {
        let t = Instant::now();
        let refs: Vec<&Path> = block.iter().map(PathBuf::as_path).collect();
        (preprocess::prepare_files_with(&refs, spec, decoding), ms(t))
    };
    let mut state = Stream::new(backbone, batch_size, keep_maps, checkpoint);
    match overlap {
        Overlap::Off => {
            // Decode a few hundred images on every core, then run their batches, and so on:
            // the batches are the same as decoding everything first, but memory holds one
            // step's decoded images, not every input of the run.
            const STEP: usize = 256;
            progress.stage("forward", paths.len() as u64);
            for block in paths.chunks(STEP.max(batch_size)) {
                let (decoded, took) = decode(block);
                timings.decode_preprocess += took;
                state.accept(block, decoded, partial);
                state.forward_ready(false, progress, counts, timings)?;
            }
            state.forward_ready(true, progress, counts, timings)?;
        }
        Overlap::On => {
            // A bounded channel: the decoder runs one batch ahead of the device, no further,
            // so decoded images do not pile up in memory when the device is the slower one.
            progress.stage("forward", paths.len() as u64);
            let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<Decoded>, f64)>(1);
            std::thread::scope(|s| -> Result<()> {
                let decoder = s.spawn(move || {
                    for (k, block) in paths.chunks(batch_size).enumerate() {
                        if fam_core::host::interrupted() {
                            break;
                        }
                        let (decoded, took) = decode(block);
                        if tx.send((k * batch_size, decoded, took)).is_err() {
                            break; // the forward side stopped on an error
                        }
                    }
                });
                let mut result = Ok(());
                for (start, decoded, took) in rx.iter() {
                    timings.decode_preprocess += took;
                    let block = &paths[start..start + decoded.len()];
                    state.accept(block, decoded, partial);
                    if let Err(e) = state.forward_ready(false, progress, counts, timings) {
                        result = Err(e);
                        break;
                    }
                }
                drop(rx);
                decoder
                    .join()
                    .map_err(|_| FamError::invalid("the image decoder thread panicked"))?;
                result?;
                state.forward_ready(true, progress, counts, timings)
            })?;
        }
    }
    progress.finish_stage();
    counts.resumed += state.views.len() - state.todo.len();
    let t = Instant::now();
    let out = state.finish();
    timings.forward += ms(t);
    out
}

/// The forward side of [`embed_images_with`]: takes decoded images in path order, and runs a
/// batch whenever `batch_size` images need one (at the end, whatever is left).
struct Stream<'a> {
    backbone: &'a dyn Backbone,
    batch_size: usize,
    keep_maps: bool,
    checkpoint: Option<&'a FeatureCache>,
    device: fam_core::candle::Device,
    slot: Vec<std::result::Result<usize, String>>,
    views: Vec<Prepared>,
    keys: Vec<Option<String>>,
    /// What an interrupted run already computed, per view.
    restored: Vec<Option<(Vec<f32>, Option<Tensor>)>>,
    /// Views still to be forwarded, in order; `next` is the first not yet run.
    todo: Vec<usize>,
    next: usize,
    maps: Vec<Tensor>,
    embeddings: Vec<Vec<f32>>,
    batch_shapes: Option<(Vec<usize>, usize)>,
}

impl<'a> Stream<'a> {
    fn new(
        backbone: &'a dyn Backbone,
        batch_size: usize,
        keep_maps: bool,
        checkpoint: Option<&'a FeatureCache>,
    ) -> Self {
        Self {
            backbone,
            batch_size,
            keep_maps,
            checkpoint,
            device: backbone.device(),
            slot: Vec::new(),
            views: Vec::new(),
            keys: Vec::new(),
            restored: Vec::new(),
            todo: Vec::new(),
            next: 0,
            maps: Vec::new(),
            embeddings: Vec::new(),
            batch_shapes: None,
        }
    }

    fn todo_len(&self) -> usize {
        self.todo.len() - self.next
    }

    /// Files the decoded images of `paths` in order: failures in `slot`, successes as views,
    /// restored from the checkpoint where it has them, else queued for the forward pass.
    fn accept(
        &mut self,
        paths: &[PathBuf],
        decoded: Vec<Decoded>,
        partial: &mut Vec<PartialImage>,
    ) {
        for (path, r) in paths.iter().zip(decoded) {
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
                    let key = self.checkpoint.and_then(|_| checkpoint_key(path));
                    let restored = self.restore(key.as_deref());
                    if restored.is_none() {
                        self.todo.push(self.views.len());
                    }
                    self.slot.push(Ok(self.views.len()));
                    self.views.push(p);
                    self.keys.push(key);
                    self.restored.push(restored);
                }
                Err(e) => {
                    tracing::warn!(image = %path.display(), error = %e, "skipping image");
                    self.slot.push(Err(e.to_string()));
                }
            }
        }
    }

    fn restore(&self, key: Option<&str>) -> Option<(Vec<f32>, Option<Tensor>)> {
        let (c, key) = (self.checkpoint?, key?);
        let e = c.embedding(key)?;
        if !self.keep_maps {
            return Some((e, None));
        }
        let (shape, data) = c.maps(key)?;
        let t = Tensor::from_vec(data, (1, shape[0], shape[1], shape[2]), &self.device).ok()?;
        Some((e, Some(t)))
    }

    /// Runs every full batch that is queued, and with `last` the partial one too.
    fn forward_ready(
        &mut self,
        last: bool,
        progress: &dyn Progress,
        counts: &mut Counts,
        timings: &mut Timings,
    ) -> Result<()> {
        while self.todo_len() >= self.batch_size || (last && self.todo_len() > 0) {
            check_interrupt()?;
            let t = Instant::now();
            let n = self.todo_len().min(self.batch_size);
            let chunk: Vec<usize> = self.todo[self.next..self.next + n].to_vec();
            self.next += n;
            self.forward(&chunk)?;
            counts.images_forwarded += chunk.len();
            progress.advance(chunk.len() as u64);
            timings.forward += ms(t);
        }
        Ok(())
    }

    fn forward(&mut self, chunk: &[usize]) -> Result<()> {
        let backbone = self.backbone;
        let items: Vec<&Prepared> = chunk.iter().map(|&i| &self.views[i]).collect();
        let batch = preprocess::batch_tensor(&items, &self.device)?;
        // The normalized input is in the batch now; only the view (for drawing) is kept, so
        // a run over many images does not hold every input tensor until it ends.
        for &i in chunk {
            self.views[i].chw = Vec::new();
        }
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
        match &self.batch_shapes {
            None => self.batch_shapes = Some(shapes),
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
        // Only the embeddings come back to the host; the feature maps stay on the device
        // until the FAM maps are computed from them.
        let batch_emb = f
            .embeddings
            .to_dtype(fam_core::candle::DType::F32)?
            .to_vec2::<f32>()
            .ctx("copy embeddings to host")?;
        if let Some(c) = self.checkpoint {
            save_checkpoint(
                c,
                chunk,
                &self.keys,
                &batch_emb,
                self.keep_maps.then_some(&f.maps),
            )?;
        }
        self.embeddings.extend(batch_emb);
        if self.keep_maps {
            self.maps.push(f.maps);
        }
        Ok(())
    }

    /// Puts restored images back in their places and joins the feature maps.
    fn finish(self) -> Result<Embedded> {
        let Stream {
            slot,
            views,
            restored,
            todo,
            mut maps,
            mut embeddings,
            ..
        } = self;
        if todo.len() < views.len() {
            tracing::info!(
                images = views.len(),
                restored = views.len() - todo.len(),
                "resumed from the checkpoint"
            );
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
        Ok(Embedded {
            slot,
            views,
            maps,
            embeddings,
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::NoProgress;
    use fam_core::candle::Device;
    use fam_core::traits::{Features, ResizePolicy};

    /// Embeds each image as its per-channel means, with 2x2 maps of quadrant means, and
    /// records the size of every batch it is given.
    struct Means(std::sync::Mutex<Vec<usize>>);
    impl Backbone for Means {
        fn describe(&self) -> String {
            "means".into()
        }
        fn input_spec(&self) -> InputSpec {
            InputSpec {
                resize: ResizePolicy::Exact {
                    width: 16,
                    height: 16,
                },
                mean: [0.0; 3],
                std: [1.0; 3],
            }
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn forward(&self, batch: &Tensor) -> Result<Features> {
            self.0.lock().unwrap().push(batch.dims()[0]);
            let (b, c) = (batch.dims()[0], batch.dims()[1]);
            let maps = batch.reshape((b, c, 2, 8, 2, 8))?.mean(5)?.mean(3)?;
            Ok(Features {
                embeddings: maps.mean((2, 3))?,
                maps,
            })
        }
    }

    fn embed(paths: &[PathBuf], batch: usize, overlap: Overlap) -> (Embedded, Vec<usize>, Counts) {
        let backbone = Means(Default::default());
        let mut counts = Counts::default();
        let e = embed_images(
            &backbone,
            &backbone.input_spec(),
            paths,
            batch,
            true,
            &NoProgress,
            &mut Timings::default(),
            &mut counts,
            None,
            Decoding::Strict,
            &mut Vec::new(),
            overlap,
        )
        .unwrap();
        (e, backbone.0.into_inner().unwrap(), counts)
    }

    #[test]
    fn decoding_beside_the_forward_pass_gives_the_same_batches_and_results() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut paths: Vec<PathBuf> = ["chelsea.png", "coffee.png", "astronaut.png", "camera.png"]
            .iter()
            .map(|f| root.join("data/images").join(f))
            .collect();
        // An unreadable file in the middle shifts the later images into earlier batches.
        paths.insert(1, root.join("data/images/no-such-image.png"));
        paths.extend(paths.clone());
        for batch in [1, 3, 16] {
            let (a, batches_a, counts_a) = embed(&paths, batch, Overlap::Off);
            let (b, batches_b, counts_b) = embed(&paths, batch, Overlap::On);
            assert_eq!(batches_a, batches_b, "batch {batch}");
            assert_eq!(batches_a.iter().sum::<usize>(), 8);
            assert!(batches_a.iter().all(|&n| n <= batch));
            assert_eq!(a.slot, b.slot);
            assert_eq!(a.embeddings, b.embeddings);
            assert_eq!(counts_a.images_forwarded, 8);
            assert_eq!(counts_b.images_forwarded, 8);
            let (ma, mb) = (a.maps.unwrap(), b.maps.unwrap());
            assert_eq!(ma.dims(), &[8, 3, 2, 2]);
            let diff = (ma - mb).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
            assert!(a.slot[1].as_ref().unwrap_err().contains("no-such-image"));
        }
    }
}
