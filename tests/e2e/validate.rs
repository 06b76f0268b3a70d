//! `fam-cli validate`: every problem at once, before any model is loaded.

use crate::util::*;

#[test]
fn shipped_pipelines_validate() {
    for entry in std::fs::read_dir(root().join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let r = run(fam().arg("validate").arg(&path));
            assert_eq!(r.code, 0, "{}: {}", path.display(), r.stderr);
            assert!(r.stdout.ends_with(": ok\n"), "{}", r.stdout);
        }
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let dir = scratch("problems");
    let text = format!(
        r#"[run]
output = "out"
batch_size = 0

[backbone]
plugin = "retrieval"
kind = "mobilenet_v2"
weights = "missing.safetensors"
layer = "features.81"

[similarity]
plugin = "metrics"
kind = "cosine_similarity"

[task]
kind = "pair"
pairs = [{{ a = "nope.png", b = {b:?} }}]

[[render]]
plugin = "render"
kind = "overlay"
alpha = 2.0
colormap = "rainbow"
"#,
        b = image("coffee.png").display().to_string()
    );
    let p = dir.join("bad.toml");
    std::fs::write(&p, text).unwrap();
    let r = run(fam().arg("validate").arg(&p));
    assert_eq!(r.code, 2);
    for needle in [
        "7 problem(s)",
        "run.batch_size: 0 is out of range",
        "backbone.weights:",
        "missing.safetensors does not exist",
        "backbone.layer: no layer `features.81` in mobilenet_v2 (layers are features.0 to features.18); did you mean `features.1`?",
        "similarity.kind: no similarity named `metrics::cosine_similarity` (available: metrics::cosine, metrics::euclidean)",
        "render[0].alpha: 2.0 is not a number between 0 and 1",
        "render[0].colormap: unknown colormap `rainbow` (available: jet, inferno, viridis, turbo, gray)",
        "task.pairs[0].a:",
    ] {
        assert!(r.stderr.contains(needle), "`{needle}` missing from:\n{}", r.stderr);
    }
}

#[test]
fn a_misspelled_key_points_at_the_line_and_suggests_the_key() {
    let dir = scratch("typo");
    let p = write_pipeline(
        &dir,
        "plugin = \"metrics\"\nkind = \"cosine\"",
        "contribution",
        &[(&image("chelsea.png"), &image("coffee.png"))],
        &["scores"],
    );
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("layer = ", "layr = ");
    std::fs::write(&p, text).unwrap();
    let r = run(fam().arg("validate").arg(&p));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("unknown field `layr`"), "{}", r.stderr);
    assert!(r.stderr.contains("did you mean `layer`?"), "{}", r.stderr);
    assert!(r.stderr.contains("line 9"), "{}", r.stderr);
}

#[test]
fn an_unknown_weighting_is_rejected() {
    let dir = scratch("weighting");
    let p = write_pipeline(
        &dir,
        "plugin = \"metrics\"\nkind = \"cosine\"",
        "gradcam",
        &[(&image("chelsea.png"), &image("coffee.png"))],
        &["scores"],
    );
    let r = run(fam().arg("validate").arg(&p));
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains(
            "unknown variant `gradcam`, expected one of `contribution`, `gradient`, `activation`"
        ),
        "{}",
        r.stderr
    );
}
