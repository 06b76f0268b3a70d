//! Opening an index for the search, and `fam-cli index --check`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::format::{
    read_headers, set_problems, short, Item, Listing, ModelFingerprint, PartHeader,
};
use super::search;
use crate::report::Failure;
use fam_core::error::{FamError, Result};

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
        write!(
            f,
            "Index({}, {} parts)",
            self.dir.display(),
            self.parts.len()
        )
    }
}

struct OpenPart {
    header: PartHeader,
    dir: PathBuf,
    /// The global row of this part's first row.
    first_row: u64,
    file: std::fs::File,
    /// Where the f32 data starts in the file.
    offset: u64,
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
            let len = file.metadata().map_err(|e| FamError::io(&path, e))?.len();
            let mut head = vec![0u8; (len as usize).min(4096)];
            read_at(&file, &mut head, 0).map_err(|e| FamError::io(&path, e))?;
            let (shape, offset) = fam_core::output::read_npy_f32_header(&head)
                .map_err(|e| FamError::document(&path, e.to_string()))?;
            let want = [h.rows, h.dims];
            if shape != want || len != (offset + h.rows * h.dims * 4) as u64 {
                return Err(FamError::document(
                    &path,
                    format!(
                        "holds {shape:?} f32 in {len} bytes, but its header says [{}, {}]: the part is damaged; build it again",
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
            let rows = h.rows as u64;
            parts.push(OpenPart {
                header: h,
                dir: dir.to_path_buf(),
                first_row,
                file,
                offset: offset as u64,
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
            wanted
                .entry(p)
                .or_default()
                .push(r - self.parts[p].first_row);
        }
        let mut out = HashMap::new();
        for (p, mut local) in wanted {
            local.sort_unstable();
            local.dedup();
            let part = &self.parts[p];
            let path = part.dir.join(&part.header.items);
            // Streamed: memory holds one line, whatever the part's size.
            let file = std::fs::File::open(&path).map_err(|e| FamError::io(&path, e))?;
            let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
            let mut next = local.iter().peekable();
            let mut line = Vec::new();
            let mut line_no = 0u64;
            while let Some(&&want) = next.peek() {
                line.clear();
                let n = std::io::BufRead::read_until(&mut reader, b'\n', &mut line)
                    .map_err(|e| FamError::io(&path, e))?;
                if n == 0 {
                    break;
                }
                if line_no == want {
                    next.next();
                    let item: Item = serde_json::from_slice(&line).map_err(|e| {
                        FamError::document(&path, format!("line {}: {e}", line_no + 1))
                    })?;
                    out.insert(part.first_row + want, item);
                }
                line_no += 1;
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
}

/// Fills `buf` from `file` at `offset`.
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            let n = std::os::windows::fs::FileExt::seek_read(
                file,
                &mut buf[done..],
                offset + done as u64,
            )?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
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
    /// Read with one positioned read into the caller's buffer, which the search keeps per
    /// thread: resident memory stays one block per thread, and no page of the parts is
    /// mapped (a read from the page cache is faster here than faulting a mapping in).
    fn rows<'a>(&'a self, first: u64, count: usize, buf: &'a mut Vec<f32>) -> Result<&'a [f32]> {
        let p = self.part_of(first)?;
        let part = &self.parts[p];
        let local = first - part.first_row;
        if local + count as u64 > part.header.rows as u64 {
            return Err(FamError::invalid(format!(
                "rows {first}..{} cross the end of part {}",
                first + count as u64,
                part.header.part
            )));
        }
        buf.clear();
        buf.resize(count * self.dims, 0.0);
        let offset = part.offset + local * self.dims as u64 * 4;
        read_at(
            &part.file,
            bytemuck::cast_slice_mut(buf.as_mut_slice()),
            offset,
        )
        .map_err(|e| FamError::io(part.dir.join(&part.header.embeddings), e))?;
        if cfg!(target_endian = "big") {
            for v in buf.iter_mut() {
                *v = f32::from_bits(u32::from_le(v.to_bits()));
            }
        }
        Ok(buf)
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
                Ok((shape, off))
                    if shape == [h.rows, h.dims] && len == (off + h.rows * h.dims * 4) as u64 => {}
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
                report
                    .problems
                    .push(format!("{}: {e}", items_path.display()));
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
                report
                    .problems
                    .push(format!("{}: {e}", items_path.display()));
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
        let changed: Vec<String> = items.par_iter().filter_map(file_changed).collect();
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
