//! `fam-cli bench`: runs the pipeline's models on copies of the images and reports every
//! stage per image, for each batch size (the numbers themselves go to docs/performance.md).

use crate::util::*;

#[test]
fn bench_reports_each_stage_for_each_batch_size() {
    let r = run(fam()
        .args([
            "bench",
            "pipelines/bench-mobilenet.toml",
            "--images",
            "data/images/chelsea.png",
            "data/images/coffee.png",
            "data/images/rocket.jpg",
            "--count",
            "4",
            "--repeat",
            "1",
            "--batch-sizes",
            "1,3",
            "--json",
        ])
        .current_dir(root()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, bs) in rows.iter().zip([1, 3]) {
        assert_eq!(row["batch_size"], bs);
        assert_eq!(row["images"], 4);
        for k in ["decode_preprocess_ms", "forward_ms", "fam_ms", "render_ms"] {
            assert!(row[k].as_f64().unwrap() > 0.0, "{k} in {row}");
        }
        let parts: f64 = ["decode_preprocess_ms", "forward_ms", "fam_ms", "render_ms"]
            .iter()
            .map(|k| row[*k].as_f64().unwrap())
            .sum();
        assert!(row["end_to_end_ms"].as_f64().unwrap() >= parts * 0.99);
    }
}
