//! The files of an index part, and what makes a set of parts one index.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::report::{Counts, Failure, Timings};
use fam_core::error::{FamError, Result};

/// The `format` of every part header.
pub const FORMAT: &str = "fam-index";
/// The layout of the parts; a reader refuses another.
pub const VERSION: u32 = 1;

/// The model an index was built with: embeddings are comparable only within one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFingerprint {
    /// sha256 of the fields below (the weights by content).
    pub fingerprint: String,
    /// The backbone and its layer, as the backbone describes itself.
    pub backbone: String,
    pub weights: Option<String>,
    pub weights_sha256: Option<String>,
    /// The preprocessing, as JSON.
    pub preprocessing: String,
}

impl ModelFingerprint {
    /// The fingerprint of a session's model: `weights` hashed by content.
    pub fn of(
        weights: Option<&Path>,
        backbone: &str,
        spec: &fam_core::traits::InputSpec,
    ) -> Result<Self> {
        let weights_sha256 = match weights {
            Some(w) => Some(crate::cache::sha256_file(w)?),
            None => None,
        };
        let preprocessing = serde_json::to_string(spec).unwrap_or_default();
        let fingerprint = crate::cache::sha256_hex(
            format!(
                "{}\n{backbone}\n{preprocessing}",
                weights_sha256.as_deref().unwrap_or("-")
            )
            .as_bytes(),
        );
        Ok(Self {
            fingerprint,
            backbone: backbone.to_string(),
            weights: weights.map(|w| w.display().to_string()),
            weights_sha256,
            preprocessing,
        })
    }
}

impl std::fmt::Display for ModelFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`", self.backbone)?;
        if let (Some(w), Some(h)) = (&self.weights, &self.weights_sha256) {
            write!(f, " (weights {w}, sha256 {})", &h[..h.len().min(12)])?;
        }
        write!(f, ", preprocessing {}", self.preprocessing)
    }
}

/// The gallery listing a part is a piece of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listing {
    /// Files in the whole listing.
    pub files: usize,
    /// sha256 of the listing (the file names, relative to the gallery folder).
    pub sha256: String,
}

/// `part-K-of-N.json`: one part of an index, and the manifest of the run that built it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartHeader {
    pub format: String,
    pub version: u32,
    pub fam_version: String,
    pub model: ModelFingerprint,
    pub listing: Listing,
    /// This part, from 1, of `parts`.
    pub part: usize,
    pub parts: usize,
    /// The listing's files `first_file..first_file + files` are this part's.
    pub first_file: usize,
    pub files: usize,
    /// Embedded files (the rows of the embeddings); the others are in `failures`.
    pub rows: usize,
    pub dims: usize,
    /// The embeddings file, `[rows, dims]` f32, beside this one.
    pub embeddings: String,
    /// The items file, one JSON line per row, beside this one.
    pub items: String,
    pub failures: Vec<Failure>,
    pub counts: Counts,
    pub timings_ms: Timings,
}

/// One row of a part: `part-K-of-N.items.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// The file's place in the whole listing.
    pub file: usize,
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    /// Files earlier in the listing with the same file-name stem (see
    /// the run's unique ids).
    pub same_name_before: usize,
}

/// The file names of part `k` of `n`: header, embeddings, items.
pub fn part_files(k: usize, n: usize) -> (String, String, String) {
    let stem = format!("part-{k:05}-of-{n:05}");
    (
        format!("{stem}.json"),
        format!("{stem}.f32.npy"),
        format!("{stem}.items.jsonl"),
    )
}

/// The sha256 of a gallery listing: each file's path relative to `root` (where it is under
/// it), one per line, so that machines that mount the gallery elsewhere agree.
pub fn listing_sha256(files: &[PathBuf], root: Option<&Path>) -> String {
    let mut text = String::new();
    for f in files {
        let rel = root.and_then(|r| f.strip_prefix(r).ok()).unwrap_or(f);
        text.push_str(&rel.to_string_lossy());
        text.push('\n');
    }
    crate::cache::sha256_hex(text.as_bytes())
}

/// The part headers in `dir` (every `part-*.json`), with their paths, in name order.
pub fn read_headers(dir: &Path) -> Result<Vec<(PathBuf, PartHeader)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| FamError::io(dir, e))?;
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| n.starts_with("part-") && n.ends_with(".json"))
        })
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let bytes = std::fs::read(&p).map_err(|e| FamError::io(&p, e))?;
        let h: PartHeader = serde_json::from_slice(&bytes)
            .map_err(|e| FamError::document(&p, format!("not an index part fam wrote: {e}")))?;
        if h.format != FORMAT || h.version != VERSION {
            return Err(FamError::document(
                &p,
                format!(
                    "index format `{}` version {}; this fam reads `{FORMAT}` version {VERSION}",
                    h.format, h.version
                ),
            ));
        }
        out.push((p, h));
    }
    Ok(out)
}

/// What is wrong with a set of parts: missing, duplicated, or from another model, listing
/// or split. Empty for a complete index. The parts that agree most (the largest group of
/// one model, listing and part count) are the index; the others are reported against it.
pub fn set_problems(dir: &Path, headers: &[(PathBuf, PartHeader)]) -> Vec<String> {
    let mut problems = Vec::new();
    if headers.is_empty() {
        return vec![format!(
            "{} holds no index parts (part-*.json); build them with `fam-cli index PIPELINE --shard K/N`",
            dir.display()
        )];
    }
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let key = |h: &PartHeader| -> (String, Listing, usize) {
        (h.model.fingerprint.clone(), h.listing.clone(), h.parts)
    };
    let mut groups: Vec<((String, Listing, usize), Vec<usize>)> = Vec::new();
    for (i, (_, h)) in headers.iter().enumerate() {
        let k = key(h);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, v)) => v.push(i),
            None => groups.push((k, vec![i])),
        }
    }
    let main = groups
        .iter()
        .enumerate()
        .max_by_key(|(i, (_, v))| (v.len(), std::cmp::Reverse(*i)))
        .map(|(i, _)| i)
        .unwrap_or(0);
    let reference = &headers[groups[main].1[0]].1;
    for (g, (_, members)) in groups.iter().enumerate() {
        if g == main {
            continue;
        }
        let h = &headers[members[0]].1;
        let names: Vec<String> = members.iter().map(|&i| name(&headers[i].0)).collect();
        let mut why = Vec::new();
        if h.model != reference.model {
            why.push(format!(
                "built with model {}, the other parts with {}",
                h.model, reference.model
            ));
        }
        if h.listing != reference.listing {
            why.push(format!(
                "a split of a gallery listing of {} files (sha256 {}), the other parts of one of {} files (sha256 {}): the gallery changed between the parts, or they come from different pipelines",
                h.listing.files,
                short(&h.listing.sha256),
                reference.listing.files,
                short(&reference.listing.sha256)
            ));
        }
        if h.parts != reference.parts {
            why.push(format!(
                "one of {} parts, the other parts of {}",
                h.parts, reference.parts
            ));
        }
        problems.push(format!(
            "{} belong{} to another index: {}",
            names.join(", "),
            if names.len() == 1 { "s" } else { "" },
            why.join("; ")
        ));
    }
    let mut by_part: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for &i in &groups[main].1 {
        by_part
            .entry(headers[i].1.part)
            .or_default()
            .push(name(&headers[i].0));
    }
    for (k, names) in &by_part {
        if names.len() > 1 {
            problems.push(format!(
                "part {k} is there {} times: {}",
                names.len(),
                names.join(", ")
            ));
        }
    }
    let missing: Vec<String> = (1..=reference.parts)
        .filter(|k| !by_part.contains_key(k))
        .map(|k| k.to_string())
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "parts missing of {}: {} (build each with `fam-cli index PIPELINE --shard K/{}`)",
            reference.parts,
            missing.join(", "),
            reference.parts
        ));
    }
    problems
}

pub(super) fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}
