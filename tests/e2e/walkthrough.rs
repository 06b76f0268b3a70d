//! `docs/writing-a-plugin.md`, word for word: every `sh` block is run, in order, in an
//! empty folder (with the `fam-cli` under test on `PATH`); every `rust` and `toml` block
//! must be in the files `fam-cli plugins new` wrote; then the plugin's outputs are checked.
//! The plugin is built from scratch (`cargo build --release`), which takes a few minutes.

use std::path::Path;

use crate::util::*;

fn blocks(page: &str, lang: &str) -> Vec<String> {
    page.split(&format!("```{lang}\n"))
        .skip(1)
        .map(|b| b.split("```").next().unwrap().to_string())
        .collect()
}

fn scores(path: &Path) -> Vec<(String, f64)> {
    json(path)["comparisons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn writing_a_plugin_word_for_word() {
    if cfg!(feature = "cuda") {
        // The page builds the template with a plain `cargo build --release`: a CPU candle,
        // which a cuda fam-cli refuses by its ABI fingerprint (tests/e2e/plugins.rs checks
        // that refusal). The CPU test run follows the page.
        eprintln!("skipped in the cuda build: the walkthrough's plugin is a CPU build");
        return;
    }
    let page = std::fs::read_to_string(root().join("docs/writing-a-plugin.md")).unwrap();
    let dir = scratch("walkthrough");
    let script = format!("set -euxo pipefail\n{}", blocks(&page, "sh").join("\n"));
    let fam_dir = Path::new(env!("CARGO_BIN_EXE_fam-cli")).parent().unwrap();
    let path = format!(
        "{}:{}",
        fam_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let r = run(std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&dir)
        .env("PATH", path)
        // The built-in plugins sit next to a release fam-cli; the test build keeps them here.
        .env("FAM_PLUGIN_PATH", plugin_dir())
        .env("RUST_LOG", "warn")
        .env_remove("CARGO_TARGET_DIR"));
    assert_eq!(
        r.code, 0,
        "the walkthrough failed:\n{}\n{}",
        r.stdout, r.stderr
    );

    let krate = dir.join("fam-plugin-diagonal");
    // The code and pipeline the page shows are the ones the template writes.
    let lib = std::fs::read_to_string(krate.join("src/lib.rs")).unwrap();
    for b in blocks(&page, "rust") {
        assert!(lib.contains(&b), "not in src/lib.rs:\n{b}");
    }
    let pipeline = std::fs::read_to_string(krate.join("pipeline.toml")).unwrap();
    for b in blocks(&page, "toml") {
        assert!(pipeline.contains(&b), "not in pipeline.toml:\n{b}");
    }
    // Step 6 listed the plugin and its kinds.
    for needle in [
        "diagonal 0.1.0",
        "similarity mahalanobis_diag",
        "renderer   contours",
    ] {
        assert!(
            r.stdout.contains(needle),
            "`{needle}` not listed:\n{}",
            r.stdout
        );
    }
    // Step 7: the run explained every pair, with contours for both sides of each.
    let out = krate.join("out");
    let manifest = json(&out.join("manifest.json"));
    assert_eq!(manifest["items"]["ok"], 3, "{manifest}");
    let mut contours = 0;
    for e in std::fs::read_dir(out.join("contours")).unwrap() {
        let p = e.unwrap().path();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (224, 224), "{}", p.display());
        contours += 1;
    }
    assert_eq!(contours, 6);
    assert!(out.join("index.html").is_file());
    // With every weight 1 the plugin's similarity is the built-in Euclidean one.
    let euclid = krate.join("euclidean.toml");
    std::fs::write(
        &euclid,
        pipeline
            .replace("plugin = \"diagonal\"               # this plugin (libfam_plugin_diagonal.so)\nkind = \"mahalanobis_diag\"", "plugin = \"metrics\"\nkind = \"euclidean\"")
            .replace("output = \"out\"", "output = \"out-euclidean\""),
    )
    .unwrap();
    let r = run(fam()
        .arg("--plugin-dir")
        .arg(krate.join("target/release"))
        .args(["-q", "run"])
        .arg(&euclid));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (a, b) = (
        scores(&out.join("scores.json")),
        scores(&krate.join("out-euclidean/scores.json")),
    );
    assert_eq!(a.len(), 3);
    for ((ia, sa), (ib, sb)) in a.iter().zip(&b) {
        assert_eq!(ia, ib);
        assert!(
            (sa - sb).abs() <= 1e-4 * sb.abs().max(1.0),
            "{ia}: {sa} vs {sb}"
        );
    }
    // The plugin's own build is most of the test's disk (about 450 MB): leave it only when
    // the test fails, to look at.
    let _ = std::fs::remove_dir_all(krate.join("target"));
}
