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
