//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// Where cargo put the plugin libraries built as dev-dependencies of fam-cli.
pub fn plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_fam-cli"))
        .parent()
        .unwrap()
        .join("deps")
}

/// `fam-cli` with the test build's plugins and no environment surprises.
pub fn fam() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fam-cli"));
    c.arg("--plugin-dir").arg(plugin_dir());
    c.env_remove("FAM_PLUGIN_PATH")
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1");
    c
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("fam-cli runs");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// A fresh, empty scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fam-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A pipeline file in `dir` using the committed model, with `task` and `extra` sections.
pub fn write_pipeline(
    dir: &Path,
    similarity: &str,
    weighting: &str,
    pairs: &[(&Path, &Path)],
    render: &[&str],
) -> PathBuf {
    let root = root();
    let pairs: Vec<String> = pairs
        .iter()
        .map(|(a, b)| {
            format!(
                "  {{ a = {:?}, b = {:?} }},",
                a.display().to_string(),
                b.display().to_string()
            )
        })
        .collect();
    let render: String = render
        .iter()
        .map(|k| format!("[[render]]\nplugin = \"render\"\nkind = \"{k}\"\n\n"))
        .collect();
    let text = format!(
        r#"[run]
output = "out"
batch_size = 4

[backbone]
plugin = "retrieval"
kind = "mobilenet_v2"
weights = {weights:?}
layer = "features.18"

[similarity]
{similarity}

[explain]
weighting = "{weighting}"

[task]
kind = "pair"
pairs = [
{pairs}
]

{render}"#,
        weights = root
            .join("models/mobilenet_v2.safetensors")
            .display()
            .to_string(),
        pairs = pairs.join("\n"),
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn image(name: &str) -> PathBuf {
    root().join("data/images").join(name)
}

/// Reads a little-endian f32 `.npy` written by fam: (shape, values).
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    let shape_txt = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape_txt
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data: Vec<f32> = bytes[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>());
    (shape, data)
}

pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// Every file under `dir` (relative path → bytes), without `manifest.json` and the `cache`
/// folder: what a single run and merged shards must have the same of.
pub fn output_files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if p.file_name().unwrap() != "cache" {
                    stack.push(p);
                }
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                if rel != "manifest.json" {
                    out.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
    }
    out
}

/// `single` and `merged` hold the same files with the same bytes (manifests aside), and their
/// manifests count the same items.
pub fn assert_same_outputs(single: &Path, merged: &Path) {
    let (a, b) = (output_files(single), output_files(merged));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same files"
    );
    for (k, v) in &a {
        assert!(
            v == &b[k],
            "{k} differs between {} and {}",
            single.display(),
            merged.display()
        );
    }
    let (ms, mm) = (
        json(&single.join("manifest.json")),
        json(&merged.join("manifest.json")),
    );
    assert_eq!(ms["items"], mm["items"]);
}

/// The Pearson correlation of two maps.
pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (
        a.iter().map(|&x| x as f64).sum::<f64>() / n,
        b.iter().map(|&x| x as f64).sum::<f64>() / n,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

/// Each map as a share of its total (`m / Σ m`), as contrast maps compare them.
pub fn shares(maps: &[Vec<f32>]) -> Vec<Vec<f32>> {
    maps.iter()
        .map(|m| {
            let t: f32 = m.iter().sum();
            m.iter().map(|v| v / t).collect()
        })
        .collect()
}
