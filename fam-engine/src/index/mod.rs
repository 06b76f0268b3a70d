//! The gallery index: a retrieval gallery embedded once, in parts, and searched in bounded
//! memory (docs/architecture.md, "The gallery index").
//!
//! `fam-cli index PIPELINE --shard K/N` embeds part K of the gallery's listing (the same
//! contiguous split as `run --shard`) and writes three files to the index folder:
//!
//! - `part-K-of-N.f32.npy`: the embeddings, `[rows, dims]` little-endian f32 in C order,
//!   data 64-byte aligned (memory-mapped by the search, readable by `numpy.load`);
//! - `part-K-of-N.items.jsonl`: one JSON line per row: the file's place in the listing, its
//!   path, size and sha256, and how many files before it in the listing share its name
//!   (so that a hit's id is the one a plain run gives it, without reading every line);
//! - `part-K-of-N.json`, written last (its presence means the part is complete): the
//!   [`PartHeader`]: the model fingerprint, the listing it split, its range, the files that
//!   failed, and the part's counts and timings (its manifest).
//!
//! Parts from many machines form one index by being placed in one folder.
//! [`open`] checks that they are one complete set built with one model over one listing;
//! [`check`] also reports files that changed since they were indexed.

mod build;
pub mod kernel;
pub mod search;

pub use build::{build_part, BuildReport};

use std::collections::{BTreeMap, HashMap};
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
    /// [`crate::tasks::UniqueIds`]).
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
        let h: PartHeader = serde_json::from_slice(&bytes).map_err(|e| {
            FamError::document(&p, format!("not an index part fam wrote: {e}"))
        })?;
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
            problems.push(format!("part {k} is there {} times: {}", names.len(), names.join(", ")));
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

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

/// An index opened for searching: its parts' embeddings memory-mapped, in listing order.
pub struct Index {
    pub dir: PathBuf,
    pub model: ModelFingerprint,
    pub listing: Listing,
    pub dims: usize,
    parts: Vec<OpenPart>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Index({}, {} parts)", self.dir.display(), self.parts.len())
    }
}

struct OpenPart {
    header: PartHeader,
    dir: PathBuf,
    /// The global row of this part's first row.
    first_row: u64,
    map: memmap2::Mmap,
    /// Where the f32 data starts in `map`.
    offset: usize,
}

impl Index {
    /// Opens the index in `dir`: a complete set of parts of one model and listing.
    pub fn open(dir: &Path) -> Result<Self> {
        let headers = read_headers(dir)?;
        let problems = set_problems(dir, &headers);
        if !problems.is_empty() {
            return Err(FamError::invalid(format!(
                "index {}: {}",
                dir.display(),
                problems.join("; ")
            )));
        }
        let mut headers: Vec<PartHeader> = headers.into_iter().map(|(_, h)| h).collect();
        headers.sort_by_key(|h| h.part);
        let (model, listing) = (headers[0].model.clone(), headers[0].listing.clone());
        let dims = headers.iter().map(|h| h.dims).max().unwrap_or(0);
        let mut parts = Vec::new();
        let mut first_row = 0u64;
        for h in headers {
            let path = dir.join(&h.embeddings);
            let file = std::fs::File::open(&path).map_err(|e| FamError::io(&path, e))?;
            // SAFETY: parts are written once, to a temporary name, and renamed into place;
            // a part rebuilt while this run reads it replaces the name, not this file.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| FamError::io(&path, e))?;
            let (shape, offset) = fam_core::output::read_npy_f32_header(&map)
                .map_err(|e| FamError::document(&path, e.to_string()))?;
            let want = [h.rows, h.dims];
            if shape != want || map.len() != offset + h.rows * h.dims * 4 || offset % 4 != 0 {
                return Err(FamError::document(
                    &path,
                    format!(
                        "holds {shape:?} f32 in {} bytes, but its header says [{}, {}]: the part is damaged; build it again",
                        map.len(),
                        h.rows,
                        h.dims
                    ),
                ));
            }
            if h.rows > 0 && h.dims != dims {
                return Err(FamError::document(
                    &path,
                    format!("has {} values per row, another part {dims}", h.dims),
                ));
            }
            let _ = map.advise(memmap2::Advice::Sequential);
            let rows = h.rows as u64;
            parts.push(OpenPart {
                header: h,
                dir: dir.to_path_buf(),
                first_row,
                map,
                offset,
            });
            first_row += rows;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            model,
            listing,
            dims,
            parts,
        })
    }

    /// Rows (embedded files) in the whole index.
    pub fn rows(&self) -> u64 {
        self.parts.iter().map(|p| p.header.rows as u64).sum()
    }

    /// The files that failed when the parts were built, as the run reports them.
    pub fn failures(&self) -> impl Iterator<Item = &Failure> {
        self.parts.iter().flat_map(|p| &p.header.failures)
    }

    /// The items of some rows, read from the parts' items files (only the lines asked for
    /// are parsed).
    pub fn items(&self, rows: &[u64]) -> Result<HashMap<u64, Item>> {
        let mut wanted: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for &r in rows {
            let p = self.part_of(r)?;
            wanted.entry(p).or_default().push(r - self.parts[p].first_row);
        }
        let mut out = HashMap::new();
        for (p, mut local) in wanted {
            local.sort_unstable();
            local.dedup();
            let part = &self.parts[p];
            let path = part.dir.join(&part.header.items);
            let bytes = std::fs::read(&path).map_err(|e| FamError::io(&path, e))?;
            let mut next = local.iter().peekable();
            for (line_no, line) in memchr::memchr_iter(b'\n', &bytes)
                .scan(0usize, |start, end| {
                    let s = *start;
                    *start = end + 1;
                    Some(&bytes[s..end])
                })
                .enumerate()
            {
                let Some(&&want) = next.peek() else { break };
                if line_no as u64 != want {
                    continue;
                }
                next.next();
                let item: Item = serde_json::from_slice(line).map_err(|e| {
                    FamError::document(&path, format!("line {}: {e}", line_no + 1))
                })?;
                out.insert(part.first_row + want, item);
            }
            if let Some(r) = next.next() {
                return Err(FamError::document(
                    &path,
                    format!(
                        "has no line {} though the part has {} rows: the part is damaged; build it again",
                        r + 1,
                        part.header.rows
                    ),
                ));
            }
        }
        Ok(out)
    }

    fn part_of(&self, row: u64) -> Result<usize> {
        let p = self
            .parts
            .partition_point(|p| p.first_row <= row)
            .saturating_sub(1);
        match self.parts.get(p) {
            Some(part) if row < part.first_row + part.header.rows as u64 => Ok(p),
            _ => Err(FamError::invalid(format!(
                "row {row} is outside the index ({} rows)",
                self.rows()
            ))),
        }
    }

    fn values(&self, p: usize, local: usize, count: usize) -> &[f32] {
        let part = &self.parts[p];
        let bytes = &part.map[part.offset + local * self.dims * 4..][..count * self.dims * 4];
        // The data starts at a multiple of 64 bytes (checked in `open`) of a page-aligned
        // map, and the index is little-endian f32 (checked at build time by the platform).
        bytemuck::cast_slice(bytes)
    }
}

impl search::Rows for Index {
    fn dims(&self) -> usize {
        self.dims
    }
    fn segments(&self) -> Vec<(u64, usize)> {
        self.parts
            .iter()
            .flat_map(|p| search::split(p.first_row, p.header.rows))
            .collect()
    }
    fn rows(&self, first: u64, count: usize) -> Result<search::RowsRef<'_>> {
        let p = self.part_of(first)?;
        let local = (first - self.parts[p].first_row) as usize;
        let values = self.values(p, local, count);
        let map = &self.parts[p].map;
        let (start, len) = (values.as_ptr() as usize - map.as_ptr() as usize, values.len() * 4);
        Ok(search::RowsRef {
            values,
            release: Some(Box::new(move || {
                // Drop the block's pages from this process (they stay in the page cache), so
                // that resident memory does not grow with the index. Only whole pages inside
                // the block: a page shared with the next block is dropped with that one.
                const PAGE: usize = 4096;
                let a = start.div_ceil(PAGE) * PAGE;
                let b = (start + len) / PAGE * PAGE;
                if b > a {
                    // SAFETY: a read-only file mapping: dropped pages are read again from the
                    // file if touched, and no reference into them outlives this block.
                    let _ = unsafe {
                        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
                    };
                }
            })),
        })
    }
    fn row(&self, index: u64) -> Result<Vec<f32>> {
        let p = self.part_of(index)?;
        let local = (index - self.parts[p].first_row) as usize;
        Ok(self.values(p, local, 1).to_vec())
    }
}

/// What `fam-cli index --check` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub dir: PathBuf,
    pub parts: usize,
    pub rows: u64,
    /// Problems with the set of parts (missing, duplicated, other model or listing) and
    /// with each part's files.
    pub problems: Vec<String>,
    /// Indexed files whose size or content changed since, or that are gone.
    pub changed: Vec<String>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.changed.is_empty()
    }
}

/// Checks the index in `dir`: the set of parts, each part's files, and every indexed file
/// against its recorded size and sha256.
pub fn check(dir: &Path) -> Result<CheckReport> {
    let headers = read_headers(dir)?;
    let mut report = CheckReport {
        dir: dir.to_path_buf(),
        parts: headers.len(),
        problems: set_problems(dir, &headers),
        ..Default::default()
    };
    for (path, h) in &headers {
        report.rows += h.rows as u64;
        let emb = dir.join(&h.embeddings);
        match std::fs::File::open(&emb).and_then(|f| {
            use std::io::Read;
            let mut head = vec![0u8; 256];
            let n = f.take(256).read(&mut head)?;
            head.truncate(n);
            Ok((head, std::fs::metadata(&emb)?.len()))
        }) {
            Err(e) => report.problems.push(format!("{}: {e}", emb.display())),
            Ok((head, len)) => match fam_core::output::read_npy_f32_header(&head) {
                Ok((shape, off)) if shape == [h.rows, h.dims] && len == (off + h.rows * h.dims * 4) as u64 => {}
                Ok((shape, _)) => report.problems.push(format!(
                    "{}: holds {shape:?} in {len} bytes, but {} says [{}, {}]",
                    emb.display(),
                    path.display(),
                    h.rows,
                    h.dims
                )),
                Err(e) => report.problems.push(format!("{}: {e}", emb.display())),
            },
        }
        let items_path = dir.join(&h.items);
        let text = match std::fs::read(&items_path) {
            Ok(t) => t,
            Err(e) => {
                report.problems.push(format!("{}: {e}", items_path.display()));
                continue;
            }
        };
        let items: Vec<Item> = match text
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(serde_json::from_slice::<Item>)
            .collect::<std::result::Result<_, _>>()
        {
            Ok(v) => v,
            Err(e) => {
                report.problems.push(format!("{}: {e}", items_path.display()));
                continue;
            }
        };
        if items.len() != h.rows {
            report.problems.push(format!(
                "{}: {} lines, but the part has {} rows",
                items_path.display(),
                items.len(),
                h.rows
            ));
        }
        use rayon::prelude::*;
        let changed: Vec<String> = items
            .par_iter()
            .filter_map(|it| file_changed(it))
            .collect();
        report.changed.extend(changed);
    }
    Ok(report)
}

/// Why an indexed file no longer matches its item, if it does not.
fn file_changed(it: &Item) -> Option<String> {
    let p = &it.path;
    match std::fs::metadata(p) {
        Err(e) => Some(format!("{}: {e}", p.display())),
        Ok(m) if m.len() != it.size => Some(format!(
            "{}: {} bytes, indexed at {} bytes",
            p.display(),
            m.len(),
            it.size
        )),
        Ok(_) => match crate::cache::sha256_file(p) {
            Err(e) => Some(e.to_string()),
            Ok(h) if h != it.sha256 => Some(format!(
                "{}: content changed since it was indexed (sha256 {}, indexed {})",
                p.display(),
                short(&h),
                short(&it.sha256)
            )),
            Ok(_) => None,
        },
    }
}
