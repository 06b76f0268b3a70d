//! The digest of fam-core's sources and the lock-file reader of the ABI fingerprint. Shared
//! by `build.rs` (which computes the fingerprint) and `tests/abi.rs` (which checks that a
//! change to the API changes it).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A digest of the API crate in `dir`: `Cargo.toml`, `build.rs`, this file and every `.rs`
/// file under `src/`, with their relative paths. `visit` sees each file read.
pub fn api_digest(dir: &Path, visit: &mut dyn FnMut(&Path)) -> String {
    let mut files = vec![
        dir.join("Cargo.toml"),
        dir.join("build.rs"),
        dir.join("abi_digest.rs"),
    ];
    collect(&dir.join("src"), &mut files);
    files.sort();
    let mut h = Sha256::new();
    for f in &files {
        let rel = f
            .strip_prefix(dir)
            .unwrap_or(f)
            .to_string_lossy()
            .replace('\\', "/");
        let bytes = std::fs::read(f).unwrap_or_default();
        h.update((rel.len() as u64).to_le_bytes());
        h.update(rel.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
        visit(f);
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `(name, version)` of every `[[package]]` of a lock file.
pub fn locked_versions(lock: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut name = None;
    for line in lock.lines() {
        let line = line.trim();
        if line == "[[package]]" {
            name = None;
        } else if let Some(v) = line.strip_prefix("name = ") {
            name = Some(v.trim_matches('"').to_string());
        } else if let Some(v) = line.strip_prefix("version = ") {
            if let Some(n) = name.take() {
                out.push((n, v.trim_matches('"').to_string()));
            }
        }
    }
    out
}
