//! `fam-cli eval` on the real model: runs, writes eval.json, and prints the table.

use crate::util::*;

#[test]
fn eval_scores_fam_and_the_baselines() {
    let out = scratch("eval");
    let r = run(fam()
        .args([
            "eval",
            "pipelines/quickstart.toml",
            "--steps",
            "4",
            "--max-items",
            "2",
            "--output",
        ])
        .arg(&out)
        .current_dir(root()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    for m in [
        "fam",
        "gradient",
        "activation",
        "occlusion",
        "centre",
        "random",
    ] {
        assert!(
            r.stdout.lines().any(|l| l.starts_with(m)),
            "{m} missing from\n{}",
            r.stdout
        );
    }
    let report = json(&out.join("eval.json"));
    assert!(out.join("eval-curves.png").is_file());
    let s = &report["summaries"][0];
    assert_eq!(s["method"], "fam");
    assert_eq!(s["items"], 2);
    // Curves start at the unmodified score (1 after normalization) and have steps + 1 points.
    let del = s["mean_deletion"].as_array().unwrap();
    assert_eq!(del.len(), 5);
    assert!((del[0].as_f64().unwrap() - 1.0).abs() < 1e-5);
    let auc = s["insertion_auc"].as_f64().unwrap();
    assert!(auc.is_finite() && auc > 0.0);
}

/// ProtoNet compares queries with prototypes: eval re-scores the query against the margin of
/// its class prototype over the others (the pipeline's `contrast = "others"`), and FAM with
/// that contrast must explain that margin better than FAM against the prototype alone.
#[test]
fn eval_scores_few_shot_margins_against_prototypes() {
    let out = scratch("eval-fewshot");
    let r = run(fam()
        .args([
            "eval",
            "pipelines/fewshot-digits.toml",
            "--steps",
            "8",
            "--max-items",
            "10",
            "--output",
        ])
        .arg(&out)
        .current_dir(root()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = json(&out.join("eval.json"));
    assert_eq!(report["target"], "margin over the other classes");
    let row = |name: &str| {
        report["summaries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["method"] == name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .clone()
    };
    let (fam, plain, random) = (row("fam"), row("fam (contrast=none)"), row("random"));
    assert_eq!(fam["items"], 10);
    let auc = |s: &serde_json::Value, k: &str| s[k].as_f64().unwrap();
    // Margins can be small, so the areas rescaled between the blurred and the unmodified
    // image are the stable ones to compare.
    for other in [&plain, &random] {
        assert!(auc(&fam, "deletion_auc_range") < auc(other, "deletion_auc_range"));
        assert!(auc(&fam, "insertion_auc_range") > auc(other, "insertion_auc_range"));
    }
    // Items are the rank-1 comparisons: each query against its best prototype.
    for item in report["items"].as_array().unwrap() {
        assert!(item["comparison"].as_str().unwrap().contains("_class-"));
    }
    let png = std::fs::read(out.join("eval-curves.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
}
