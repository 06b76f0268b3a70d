//! An on-disk cache of embeddings and feature maps, keyed by the model (weights file hash,
//! backbone and layer, preprocessing) and by each image's content, so that a gallery is
//! embedded once across runs.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::output::{npy_f32, read_npy_f32, write_atomic};
use fam_core::error::{FamError, Result};
use fam_core::traits::InputSpec;

/// The cache folder of one model configuration.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    dir: PathBuf,
}

/// Hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Hex sha256 of a file's content, read in pieces.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| FamError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| FamError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl FeatureCache {
    /// Opens (creating) the cache for a model: `weights` is hashed by content, `backbone`
    /// names the architecture and layer, `spec` the preprocessing.
    pub fn open(
        root: &Path,
        weights: Option<&Path>,
        backbone: &str,
        spec: &InputSpec,
    ) -> Result<Self> {
        let mut h = Sha256::new();
        if let Some(w) = weights {
            let bytes = std::fs::read(w).map_err(|e| FamError::io(w, e))?;
            h.update(Sha256::digest(&bytes));
        }
        h.update(backbone.as_bytes());
        h.update(serde_json::to_vec(spec).unwrap_or_default());
        let key: String = h
            .finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect();
        let dir = root.join(key);
        std::fs::create_dir_all(&dir).map_err(|e| FamError::io(&dir, e))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str, what: &str) -> PathBuf {
        self.dir.join(format!("{key}.{what}.npy"))
    }

    fn get(&self, key: &str, what: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        let bytes = std::fs::read(self.path(key, what)).ok()?;
        match read_npy_f32(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(key, error = %e, "ignoring a corrupt cache entry");
                None
            }
        }
    }

    fn put(&self, key: &str, what: &str, shape: &[usize], data: &[f32]) -> Result<()> {
        write_atomic(&self.path(key, what), &npy_f32(shape, data))
    }

    pub fn embedding(&self, key: &str) -> Option<Vec<f32>> {
        self.get(key, "emb").map(|(_, v)| v)
    }

    pub fn put_embedding(&self, key: &str, e: &[f32]) -> Result<()> {
        self.put(key, "emb", &[e.len()], e)
    }

    /// Feature maps `[C, h, w]` of one image.
    pub fn maps(&self, key: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        self.get(key, "maps").filter(|(s, _)| s.len() == 3)
    }

    pub fn put_maps(&self, key: &str, shape: &[usize], data: &[f32]) -> Result<()> {
        self.put(key, "maps", shape, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_keys_depend_on_the_model() {
        let root = std::env::temp_dir().join(format!("fam-cache-{}", std::process::id()));
        let spec = InputSpec::imagenet();
        let a = FeatureCache::open(&root, None, "net@layer1", &spec).unwrap();
        let b = FeatureCache::open(&root, None, "net@layer2", &spec).unwrap();
        assert_ne!(a.dir(), b.dir());
        let key = sha256_hex(b"image bytes");
        assert_eq!(a.embedding(&key), None);
        a.put_embedding(&key, &[1.0, 2.5]).unwrap();
        assert_eq!(a.embedding(&key), Some(vec![1.0, 2.5]));
        assert_eq!(b.embedding(&key), None);
        a.put_maps(&key, &[1, 1, 2], &[3.0, 4.0]).unwrap();
        assert_eq!(a.maps(&key), Some((vec![1, 1, 2], vec![3.0, 4.0])));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
