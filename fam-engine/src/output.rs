//! The output folder: atomic writes, safe file names, and the files listed in the manifest.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use fam_core::error::{FamError, Result};
pub use fam_core::output::{npy_f32, read_npy_f32, OutputSink};

/// A file written during the run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WrittenFile {
    pub path: String,
    pub bytes: u64,
    /// Which renderer (or `fam` itself) wrote it.
    pub by: String,
}

/// The output folder of one run.
#[derive(Debug)]
pub struct OutputDir {
    root: PathBuf,
    current: String,
    written: Vec<WrittenFile>,
    /// Keep files an interrupted run of the same pipeline left ([`OutputSink::reuse`]).
    reuse_existing: bool,
    reused: usize,
}

impl OutputDir {
    /// Creates the folder (and its parents) if needed.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| FamError::io(&root, e))?;
        Ok(Self {
            root,
            current: "fam".into(),
            written: Vec::new(),
            reuse_existing: false,
            reused: 0,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Names the writer that the following files are attributed to in the manifest.
    pub fn set_writer(&mut self, name: &str) {
        self.current = name.to_string();
    }

    pub fn written(&self) -> &[WrittenFile] {
        &self.written
    }

    /// Lets renderers keep complete files already in the folder (a resumed run).
    pub fn set_reuse_existing(&mut self, on: bool) {
        self.reuse_existing = on;
    }

    /// How many files were kept from an interrupted run.
    pub fn reused(&self) -> usize {
        self.reused
    }
}

impl OutputSink for OutputDir {
    fn written_files(&self) -> Vec<String> {
        self.written.iter().map(|f| f.path.clone()).collect()
    }

    fn reuse(&mut self, rel_path: &str) -> bool {
        if !self.reuse_existing {
            return false;
        }
        let Ok(rel) = checked_relative(rel_path) else {
            return false;
        };
        let Ok(meta) = std::fs::metadata(self.root.join(rel)) else {
            return false;
        };
        if !meta.is_file() {
            return false;
        }
        self.written.retain(|f| f.path != rel_path);
        self.written.push(WrittenFile {
            path: rel_path.to_string(),
            bytes: meta.len(),
            by: self.current.clone(),
        });
        self.reused += 1;
        true
    }

    fn write(&mut self, rel_path: &str, bytes: &[u8]) -> Result<()> {
        // Stop before a new file, never in the middle of one.
        fam_core::host::check_interrupt()?;
        let rel = checked_relative(rel_path)?;
        let path = self.root.join(rel);
        write_atomic(&path, bytes)?;
        self.written.retain(|f| f.path != rel_path);
        self.written.push(WrittenFile {
            path: rel_path.to_string(),
            bytes: bytes.len() as u64,
            by: self.current.clone(),
        });
        Ok(())
    }
}

/// Rejects absolute paths, `..`, empty components and names with characters outside
/// `[A-Za-z0-9._-]`, so no output can land outside the output folder.
fn checked_relative(rel_path: &str) -> Result<&Path> {
    let bad =
        |why: &str| FamError::invalid(format!("refusing to write output `{rel_path}`: {why}"));
    if rel_path.is_empty() {
        return Err(bad("empty path"));
    }
    for part in rel_path.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(bad("empty, `.` or `..` component"));
        }
        if !part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(bad(
                "only letters, digits, `.`, `_` and `-` are allowed in names",
            ));
        }
    }
    let path = Path::new(rel_path);
    if !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad("not a plain relative path"));
    }
    Ok(path)
}

/// Writes a file atomically: a temporary file in the same folder, then a rename. A reader
/// never sees a half-written file, and an interrupted run leaves none behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| FamError::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.flush()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(FamError::io(path, e));
    }
    Ok(())
}

/// A file-name-safe id from an image path: the file stem with anything outside
/// `[A-Za-z0-9_-]` replaced by `_`, at most 60 characters.
pub fn safe_stem(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect();
    if out.is_empty() {
        out.push_str("image");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_escape() {
        for bad in [
            "../x.png",
            "/etc/passwd",
            "a//b",
            "a/./b",
            "a b.png",
            "",
            "x/..",
            "é.png",
        ] {
            assert!(checked_relative(bad).is_err(), "{bad}");
        }
        assert!(checked_relative("panels/pair-01_a_vs_b.png").is_ok());
    }

    #[test]
    fn safe_stem_replaces_odd_characters() {
        assert_eq!(safe_stem(Path::new("/x/../my cat (1).png")), "my_cat__1_");
        assert_eq!(safe_stem(Path::new("..")), "image");
    }

    #[test]
    fn atomic_write_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("fam-out-{}", std::process::id()));
        let mut out = OutputDir::create(&dir).unwrap();
        out.write("a/b.txt", b"hello").unwrap();
        out.write("a/b.txt", b"hello again").unwrap();
        assert_eq!(std::fs::read(dir.join("a/b.txt")).unwrap(), b"hello again");
        let names: Vec<_> = std::fs::read_dir(dir.join("a")).unwrap().collect();
        assert_eq!(names.len(), 1);
        assert_eq!(out.written().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
