//! `fam-cli merge`: combines the outputs of a sharded run (`fam-cli run --shard K/N`) into
//! the output a single run would have written.
//!
//! Shards are contiguous blocks of the items, so concatenating in shard order keeps the
//! single run's order. Per-item files (maps, panels, overlays) are copied. The documents
//! that list items (`scores.json`, `retrieval.json`, `episode.json`, `predictions.json`) are
//! read as their types ([`crate::documents`]) and merged: the per-item lists concatenate,
//! `accuracy` is recomputed from the predictions, and everything else must agree.
//! `manifest.json` sums the item counts, counts and timings, and lists every file, failure
//! and comparison. The top-level files of renderers that summarise the run (`html`'s
//! `index.html`, [`Renderer::runs_last`]) are rendered again by those renderers, from the
//! pipeline the shards ran, on every shard's comparisons; their per-item files (`html`'s
//! `compare/<id>.html`) are copied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fam_core::error::{FamError, Result};
use fam_core::explain::Explanation;
use fam_core::records::{document_bytes, ScoresDocument};
use fam_core::traits::Renderer;
use serde::de::DeserializeOwned;

use crate::documents::{
    accuracy, EpisodeDocument, Manifest, PredictionsDocument, RetrievalDocument,
};
use crate::loader::PluginHost;
use crate::output::{write_atomic, OutputDir, OutputSink};
use crate::pipeline::LoadedPipeline;

/// What `merge` produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeReport {
    pub output: PathBuf,
    pub shards: usize,
    pub items_total: u64,
    pub items_ok: u64,
    pub files: usize,
}

fn read_doc<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read(path).map_err(|e| FamError::io(path, e))?;
    serde_json::from_slice(&text)
        .map_err(|e| FamError::document(path, format!("not a document fam wrote: {e}")))
}

/// A document listing items, merged across shards.
trait ItemDocument: Sized + DeserializeOwned + serde::Serialize {
    /// Appends a later shard's items; `path` names the later shard's file in errors.
    fn append(&mut self, next: Self, path: &Path) -> Result<()>;
}

/// Values that must be the same in every shard.
fn agree<T: PartialEq + std::fmt::Debug>(
    name: &str,
    field: &str,
    a: &T,
    b: &T,
    path: &Path,
) -> Result<()> {
    if a == b {
        return Ok(());
    }
    Err(FamError::document(
        path,
        format!("`{field}` in {name} is {b:?}, but an earlier shard has {a:?}; were the shards run with the same pipeline?"),
    ))
}

impl ItemDocument for ScoresDocument {
    fn append(&mut self, next: Self, path: &Path) -> Result<()> {
        agree("scores.json", "info", &self.info, &next.info, path)?;
        self.comparisons.extend(next.comparisons);
        Ok(())
    }
}

impl ItemDocument for RetrievalDocument {
    fn append(&mut self, next: Self, path: &Path) -> Result<()> {
        let name = "retrieval.json";
        agree(name, "top_k", &self.top_k, &next.top_k, path)?;
        agree(
            name,
            "gallery_size",
            &self.gallery_size,
            &next.gallery_size,
            path,
        )?;
        agree(
            name,
            "gallery_embedded",
            &self.gallery_embedded,
            &next.gallery_embedded,
            path,
        )?;
        self.queries.extend(next.queries);
        Ok(())
    }
}

impl ItemDocument for EpisodeDocument {
    fn append(&mut self, next: Self, path: &Path) -> Result<()> {
        let name = "episode.json";
        agree(name, "classes", &self.classes, &next.classes, path)?;
        agree(name, "shots", &self.shots, &next.shots, path)?;
        agree(name, "transform", &self.transform, &next.transform, path)?;
        agree(name, "contrast", &self.contrast, &next.contrast, path)?;
        self.predictions.extend(next.predictions);
        self.accuracy = accuracy(&self.predictions);
        Ok(())
    }
}

impl ItemDocument for PredictionsDocument {
    fn append(&mut self, next: Self, path: &Path) -> Result<()> {
        let name = "predictions.json";
        agree(name, "method", &self.method, &next.method, path)?;
        agree(name, "k", &self.k, &next.k, path)?;
        agree(name, "classes", &self.classes, &next.classes, path)?;
        agree(name, "transform", &self.transform, &next.transform, path)?;
        self.predictions.extend(next.predictions);
        self.accuracy = accuracy(&self.predictions);
        Ok(())
    }
}

/// Merges the shards' copies of one document, in shard order.
fn merge_files<T: ItemDocument>(paths: &[PathBuf]) -> Result<Vec<u8>> {
    let mut merged: Option<T> = None;
    for p in paths {
        let doc: T = read_doc(p)?;
        match &mut merged {
            None => merged = Some(doc),
            Some(m) => m.append(doc, p)?,
        }
    }
    match merged {
        Some(m) => document_bytes(&m),
        None => Err(FamError::invalid("merge: a document without any shard")),
    }
}

/// The documents listing items, by file name.
fn merge_document(name: &str, paths: &[PathBuf]) -> Option<Result<Vec<u8>>> {
    Some(match name {
        "scores.json" => merge_files::<ScoresDocument>(paths),
        "retrieval.json" => merge_files::<RetrievalDocument>(paths),
        "episode.json" => merge_files::<EpisodeDocument>(paths),
        "predictions.json" => merge_files::<PredictionsDocument>(paths),
        _ => return None,
    })
}

/// `K` and `N` of a shard label `K/N`.
fn shard_of(dir: &Path, m: &Manifest) -> Result<(usize, usize)> {
    let label = m.shard.as_deref().ok_or_else(|| {
        FamError::document(
            dir.join("manifest.json"),
            "no `shard` (not written by `fam-cli run --shard K/N`)",
        )
    })?;
    label
        .split_once('/')
        .and_then(|(k, n)| Some((k.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
        .ok_or_else(|| {
            FamError::document(dir.join("manifest.json"), format!("bad shard `{label}`"))
        })
}

/// The renderers of the shards' pipeline that summarise a run ([`Renderer::runs_last`]),
/// with the names their files are listed under.
fn summary_renderers(
    pipeline: &Path,
    host: &mut PluginHost,
) -> Result<Vec<(String, Box<dyn Renderer>)>> {
    let p = LoadedPipeline::load(pipeline).map_err(|e| {
        FamError::invalid(format!(
            "the shards were run with {}, which `fam-cli merge` needs to render their report again: {e}",
            pipeline.display()
        ))
    })?;
    let mut out = Vec::new();
    for r in &p.pipeline.render {
        host.load(&r.plugin)?;
        let renderer = host.renderer(&r.plugin, &r.kind)?.create(&r.options)?;
        if renderer.runs_last() {
            out.push((renderer.name(), renderer));
        }
    }
    Ok(out)
}

/// Merges the shard folders (in shard order) into `output`; `host` loads the renderers that
/// summarise the run.
pub fn merge(output: &Path, shards: &[PathBuf], host: &mut PluginHost) -> Result<MergeReport> {
    if shards.is_empty() {
        return Err(FamError::invalid("merge: no shard folders given"));
    }
    let mut manifests: Vec<(PathBuf, Manifest)> = shards
        .iter()
        .map(|d| Ok((d.clone(), read_doc(&d.join("manifest.json"))?)))
        .collect::<Result<_>>()?;
    // Shards must be the parts 1..N of one run, each once.
    let mut seen = BTreeMap::new();
    for (d, m) in &manifests {
        let (k, n) = shard_of(d, m)?;
        if n != shards.len() {
            return Err(FamError::invalid(format!(
                "{}: shard {k}/{n} belongs to a run of {n} shards, but {} folders were given",
                d.display(),
                shards.len()
            )));
        }
        if let Some(prev) = seen.insert(k, d.clone()) {
            return Err(FamError::invalid(format!(
                "shard {k}/{n} given twice: {} and {}",
                prev.display(),
                d.display()
            )));
        }
    }
    // Shard order, whatever order the folders were given in.
    manifests.sort_by_key(|(d, m)| shard_of(d, m).map(|(k, _)| k).unwrap_or(0));

    // Files of the summarising renderers are rendered again below; which renderers those
    // are, the pipeline says.
    let summaries = summary_renderers(Path::new(&manifests[0].1.pipeline), host)?;
    let summary_writers: Vec<&str> = summaries.iter().map(|(n, _)| n.as_str()).collect();

    let mut out = OutputDir::create(output)?;
    let mut docs: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for (dir, m) in &manifests {
        for f in &m.files {
            // A summary's top-level files (the report page) are rendered again below; its
            // per-item files (each comparison's page) are copied like the others'.
            if summary_writers.contains(&f.by.as_str()) && !f.path.contains('/') {
                continue;
            }
            let src = dir.join(&f.path);
            if merge_document(&f.path, &[]).is_some() {
                docs.entry(f.path.clone()).or_default().push(src);
                continue;
            }
            let bytes = std::fs::read(&src).map_err(|e| FamError::io(&src, e))?;
            out.set_writer(&f.by);
            out.write(&f.path, &bytes)?;
        }
    }
    out.set_writer("fam merge");
    for (name, parts) in &docs {
        let bytes = merge_document(name, parts).expect("an item document")?;
        out.write(name, &bytes)?;
    }

    // The manifest: the first shard's facts, with summed numbers and all files, failures
    // and comparisons.
    let mut manifest = manifests[0].1.clone();
    for (_, m) in &manifests[1..] {
        manifest.items.total += m.items.total;
        manifest.items.ok += m.items.ok;
        manifest.items.failed += m.items.failed;
        let (c, n) = (&mut manifest.counts, &m.counts);
        c.images_forwarded += n.images_forwarded;
        c.cache_hits += n.cache_hits;
        c.resumed += n.resumed;
        c.files_reused += n.files_reused;
        let (t, n) = (&mut manifest.timings_ms, &m.timings_ms);
        t.load_models += n.load_models;
        t.decode_preprocess += n.decode_preprocess;
        t.search += n.search;
        t.forward += n.forward;
        t.fam += n.fam;
        t.render += n.render;
        t.total += n.total;
        manifest.failures.extend(m.failures.iter().cloned());
        manifest
            .partial_images
            .extend(m.partial_images.iter().cloned());
        manifest.comparisons.extend(m.comparisons.iter().cloned());
    }
    manifest.shard = None;
    manifest.merged_from = Some(
        manifests
            .iter()
            .map(|(d, _)| d.display().to_string())
            .collect(),
    );

    // The summaries (the report page), on every shard's comparisons, linking the merged
    // files as a single run's page links every file written before it.
    let skeleton = Explanation {
        info: manifest.info.clone(),
        images: vec![],
        comparisons: manifest
            .comparisons
            .iter()
            .map(|r| r.to_comparison())
            .collect(),
    };
    for (name, r) in &summaries {
        out.set_writer(name);
        r.render(&skeleton, &mut out)?;
    }

    manifest.files = out.written().to_vec();
    write_atomic(&output.join("manifest.json"), &document_bytes(&manifest)?)?;
    Ok(MergeReport {
        output: output.to_path_buf(),
        shards: manifests.len(),
        items_total: manifest.items.total as u64,
        items_ok: manifest.items.ok as u64,
        files: out.written().len() + 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_concatenate_and_accuracy_follows_the_predictions() {
        let dir = std::env::temp_dir().join(format!("fam-merge-docs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, v: serde_json::Value| {
            let p = dir.join(name);
            std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
            p
        };
        let episode = |accuracy: f64, predictions: serde_json::Value| {
            serde_json::json!({"classes": ["a", "b"], "shots": {"a": 1, "b": 1},
                "transform": "none", "contrast": "none", "accuracy": accuracy,
                "predictions": predictions})
        };
        let a = write(
            "1.json",
            episode(
                1.0,
                serde_json::json!([{"query": "q1", "label": "a", "predicted": "a", "scores": {"a": 0.5}}]),
            ),
        );
        let b = write(
            "2.json",
            episode(
                0.0,
                serde_json::json!([
            {"query": "q2", "label": "b", "predicted": "a", "scores": {"a": 0.5}},
            {"query": "q3", "label": null, "predicted": "b", "scores": {"b": 0.5}}]),
            ),
        );
        let m: serde_json::Value =
            serde_json::from_slice(&merge_document("episode.json", &[a, b]).unwrap().unwrap())
                .unwrap();
        assert_eq!(m["predictions"].as_array().unwrap().len(), 3);
        assert_eq!(m["classes"], serde_json::json!(["a", "b"]));
        assert_eq!(m["accuracy"], 0.5);
        let r = |top_k: usize| serde_json::json!({"top_k": top_k, "gallery_size": 2, "gallery_embedded": 2, "queries": []});
        let (x, y) = (write("3.json", r(3)), write("4.json", r(5)));
        let clash = merge_document("retrieval.json", &[x, y])
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(
            clash.contains("`top_k`") && clash.contains("same pipeline"),
            "{clash}"
        );
        // A document fam did not write is refused with its path, not merged loosely.
        let bad = write("5.json", serde_json::json!({"top_k": 3}));
        let err = merge_document("retrieval.json", &[bad])
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("5.json") && err.contains("not a document fam wrote"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shard_ranges_cover_every_item_once_in_order() {
        use crate::pipeline::Shard;
        for len in [0, 1, 5, 7, 100] {
            for n in 1..=6 {
                let mut all = Vec::new();
                for k in 1..=n {
                    all.extend(Shard::parse(&format!("{k}/{n}")).unwrap().range(len));
                }
                assert_eq!(all, (0..len).collect::<Vec<_>>(), "{len} items, {n} shards");
            }
        }
        assert!(Shard::parse("0/3").is_err() && Shard::parse("4/3").is_err());
        assert!(Shard::parse("2").unwrap_err().contains("K/N"));
    }
}
