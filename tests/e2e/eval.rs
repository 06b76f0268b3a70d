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
            "--rise-masks",
            "32",
            "--output",
        ])
        .arg(&out)
        .current_dir(root()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    for m in [
        "fam",
        "gradient",
        "activation",
        "decomposition",
        "point-specific",
        "sbsm",
        "corrrise",
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
    // The figure of the scored maps: both items, the image and ten methods each.
    let maps = image::open(out.join("eval-maps.png")).unwrap();
    assert!(
        maps.width() > 11 * 224 && maps.height() > 2 * 224,
        "{:?}",
        (maps.width(), maps.height())
    );
    let s = &report["summaries"][0];
    assert_eq!(s["method"], "fam");
    assert_eq!(s["items"], 2);
    // Curves start at the unmodified score (1 after normalization) and have steps + 1 points,
    // each inside its band; the rescaled curves start at 1 too.
    for key in ["deletion_curve", "deletion_curve_range"] {
        let curve = &s[key];
        let values = |k: &str| -> Vec<f64> {
            curve[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        let (mean, lo, hi) = (values("mean"), values("lo"), values("hi"));
        if curve["n"].as_u64().unwrap() == 0 {
            continue;
        }
        assert_eq!(mean.len(), 5, "{key}");
        assert!((mean[0] - 1.0).abs() < 1e-5, "{key}: {mean:?}");
        for k in 0..5 {
            assert!(
                lo[k] <= mean[k] + 1e-6 && mean[k] <= hi[k] + 1e-6,
                "{key}: {curve}"
            );
        }
    }
    let auc = &s["insertion_auc"];
    let (mean, lo, hi) = (
        auc["mean"].as_f64().unwrap(),
        auc["lo"].as_f64().unwrap(),
        auc["hi"].as_f64().unwrap(),
    );
    assert!(mean.is_finite() && mean > 0.0);
    assert!(lo <= mean && mean <= hi, "{auc}");
    assert_eq!(
        auc["n"].as_u64().unwrap() + auc["undefined"].as_u64().unwrap(),
        2
    );
    assert_eq!(report["removal"], "blur");

    // `--replot` draws the curves again from eval.json, runs nothing, prints the same table.
    let again = out.join("replot");
    let r2 = run(fam()
        .args(["eval", "pipelines/quickstart.toml", "--replot"])
        .arg(out.join("eval.json"))
        .arg("--output")
        .arg(&again)
        .current_dir(root()));
    assert_eq!(r2.code, 0, "{}", r2.stderr);
    assert_eq!(r2.stdout, r.stdout);
    assert_eq!(
        std::fs::read(again.join("eval-curves.png")).unwrap(),
        std::fs::read(out.join("eval-curves.png")).unwrap()
    );
    assert!(!again.join("eval-maps.png").exists());
    // Something that is no eval.json is an error naming the file.
    let r3 = run(fam()
        .args([
            "eval",
            "pipelines/quickstart.toml",
            "--replot",
            "pipelines/quickstart.toml",
        ])
        .arg("--output")
        .arg(&again)
        .current_dir(root()));
    assert_eq!(r3.code, 2, "{}", r3.stderr);
    assert!(
        r3.stderr.contains("quickstart.toml: not an eval.json"),
        "{}",
        r3.stderr
    );
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
    let auc = |s: &serde_json::Value, k: &str| s[k]["mean"].as_f64().unwrap();
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

/// The mean-colour removal and the intervals: every number of the table carries its 95%
/// bootstrap interval, FAM's wins and losses are printed, and undefined values are counted.
#[test]
fn eval_reports_intervals_and_takes_the_mean_colour_removal() {
    let out = scratch("eval-mean");
    let r = run(fam()
        .args([
            "eval",
            "pipelines/contrastive-digits.toml",
            "--steps",
            "4",
            "--max-items",
            "12",
            "--skip-occlusion",
            "--removal",
            "mean",
            "--resamples",
            "500",
            "--output",
        ])
        .arg(&out)
        .current_dir(root()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    println!("{}", r.stdout);
    assert!(r.stdout.contains("removal mean"), "{}", r.stdout);
    assert!(r.stdout.contains("fam vs gradient: "), "{}", r.stdout);
    let report = json(&out.join("eval.json"));
    assert_eq!(report["removal"], "mean");
    assert_eq!(report["resamples"], 500);
    for s in report["summaries"].as_array().unwrap() {
        for k in ["average_drop", "deletion_auc_range", "insertion_auc_range"] {
            let e = &s[k];
            let n = e["n"].as_u64().unwrap();
            assert_eq!(n + e["undefined"].as_u64().unwrap(), 12, "{k}: {e}");
            if n > 1 {
                let (lo, mean, hi) = (
                    e["lo"].as_f64().unwrap(),
                    e["mean"].as_f64().unwrap(),
                    e["hi"].as_f64().unwrap(),
                );
                assert!(lo <= mean && mean <= hi, "{k}: {e}");
            }
        }
    }
}

/// The literature's baselines on the face model (an affine head, cosine), chosen with
/// `--methods`: each has a map for every item and states its cost; through an affine head
/// the cosine's decomposition is FAM's map before its ReLU, so their deletion areas agree.
#[test]
fn eval_runs_the_literature_baselines_alone() {
    let out = scratch("eval-literature");
    let r = run(fam()
        .args([
            "eval",
            "pipelines/retrieval-faces.toml",
            "--steps",
            "8",
            "--max-items",
            "4",
            "--methods",
            "decomposition,point-specific,sbsm,corrrise",
            "--rise-masks",
            "40",
            "--resamples",
            "200",
            "--output",
        ])
        .arg(&out)
        .current_dir(root()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = json(&out.join("eval.json"));
    let rows = report["summaries"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|s| s["method"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["fam", "decomposition", "point-specific", "sbsm", "corrrise"]
    );
    let passes: Vec<u64> = rows
        .iter()
        .map(|s| s["passes_per_map"].as_u64().unwrap())
        .collect();
    // Beyond the task's own passes: the decompositions use the feature maps it computes;
    // at 112 px SBSM has windows of 25 every 10 px, 12 x 12 of them, and the unmodified image.
    assert_eq!(passes, [0, 0, 0, 145, 40]);
    for s in rows {
        assert_eq!(s["items"], 4, "{s}");
    }
    let del = |i: usize| rows[i]["deletion_auc"]["mean"].as_f64().unwrap();
    assert!((del(0) - del(1)).abs() < 0.05, "{} vs {}", del(0), del(1));

    let r = run(fam()
        .args([
            "eval",
            "pipelines/retrieval-faces.toml",
            "--methods",
            "gradcam",
        ])
        .current_dir(root()));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("unknown method `gradcam`") && r.stderr.contains("corrrise"),
        "{}",
        r.stderr
    );
}
