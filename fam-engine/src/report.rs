//! What a run reports: progress while it works, then its items, failures, counts and
//! timings (the numbers of `manifest.json`).

use std::path::PathBuf;
use std::time::Instant;

/// Progress reporting; the CLI draws bars, a library user may ignore it.
pub trait Progress: Sync {
    fn stage(&self, _name: &str, _total: u64) {}
    fn advance(&self, _n: u64) {}
    fn finish_stage(&self) {}
}

/// A progress sink that shows nothing.
#[derive(Debug, Default)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// An item that could not be completed, with the reason.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub item: String,
    pub error: String,
}

impl Failure {
    /// The task item this failure belongs to (`pair N`, or `query PATH`), if it is one; a
    /// gallery, support or bank image, or a renderer, is not an item of the run.
    pub fn item_key(&self) -> Option<&str> {
        if let Some(rest) = self.item.strip_prefix("pair ") {
            let n = rest.split(' ').next().unwrap_or(rest);
            return Some(&self.item[..5 + n.len()]);
        }
        if self.item.starts_with("query ") {
            return Some(self.item.split(" hit ").next().unwrap_or(&self.item));
        }
        None
    }
}

/// An image that decoded only in part, explained anyway (`run.decoding = "lenient"`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartialImage {
    pub image: String,
    /// Why it is incomplete.
    pub cause: String,
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub output: PathBuf,
    pub items_total: usize,
    pub items_ok: usize,
    pub failures: Vec<Failure>,
    /// Images explained although they decoded only in part (lenient decoding).
    pub partial_images: Vec<PartialImage>,
    pub files_written: usize,
    pub counts: Counts,
    pub timings_ms: Timings,
}

/// How much work the run did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    /// Images that went through the backbone.
    pub images_forwarded: usize,
    /// Gallery embeddings and feature maps read from the cache instead.
    pub cache_hits: usize,
    /// Images whose embedding and feature maps came from the checkpoint of an interrupted
    /// run (`--resume`) instead of the backbone.
    pub resumed: usize,
    /// Output files an interrupted run of the same pipeline left complete, kept instead of
    /// being rendered again (`--resume`).
    pub files_reused: usize,
}

/// Wall time of each stage, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    pub load_models: f64,
    pub decode_preprocess: f64,
    pub forward: f64,
    pub fam: f64,
    /// Retrieval: ranking the queries against the gallery (or its index).
    #[serde(default)]
    pub search: f64,
    pub render: f64,
    pub total: f64,
}

/// The process's peak resident memory so far, in MiB (Linux's `VmHWM`; `None` elsewhere).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Milliseconds since `t`.
pub fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::Failure;

    #[test]
    fn only_pairs_and_queries_are_items() {
        let f = |item: &str| Failure {
            item: item.into(),
            error: String::new(),
        };
        assert_eq!(f("pair 3 (a.png vs b.png)").item_key(), Some("pair 3"));
        assert_eq!(f("query q/cat.png").item_key(), Some("query q/cat.png"));
        assert_eq!(
            f("query q/cat.png hit g/dog.png").item_key(),
            Some("query q/cat.png")
        );
        assert_eq!(f("gallery g/broken.png").item_key(), None);
        assert_eq!(f("support image s/1/x.png").item_key(), None);
        assert_eq!(f("renderer panel").item_key(), None);
    }
}
