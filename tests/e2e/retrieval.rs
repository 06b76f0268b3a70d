//! The retrieval task on real models: ImageNet MobileNetV2 (committed), the deep-sort re-id
//! MobileNetV2 and MobileFaceNet (fetched by scripts/fetch-models.sh).

use crate::util::*;

/// (query file name, [(hit file name, score)]) from retrieval.json.
fn ranking(out: &std::path::Path) -> Vec<(String, Vec<(String, f64)>)> {
    let doc = json(&out.join("retrieval.json"));
    let name = |v: &serde_json::Value| {
        std::path::Path::new(v.as_str().unwrap())
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    doc["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            let hits = q["hits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| (name(&h["image"]), h["score"].as_f64().unwrap()))
                .collect();
            (name(&q["query"]), hits)
        })
        .collect()
}

fn run_pipeline(name: &str, out: &std::path::Path) -> serde_json::Value {
    let r = run(fam()
        .arg("run")
        .arg(root().join("pipelines").join(name))
        .arg("--output")
        .arg(out));
    assert_eq!(r.code, 0, "{name}: {}", r.stderr);
    json(&out.join("manifest.json"))
}

#[test]
fn imagenet_retrieval_ranks_and_caches_the_gallery() {
    let out = scratch("retrieval-imagenet");
    let first = run_pipeline("retrieval-imagenet.toml", &out);
    let gallery = std::fs::read_dir(root().join("data/images"))
        .unwrap()
        .filter(|e| {
            let p = e.as_ref().unwrap().path();
            p.extension().is_some_and(|x| x == "png" || x == "jpg")
        })
        .count();
    // First run: the whole gallery and the two queries go through the model.
    let hits_forwarded =
        first["counts"]["images_forwarded"].as_u64().unwrap() as usize - gallery - 2;
    assert!(hits_forwarded <= 6, "{first}");
    let ranked = ranking(&out);
    assert_eq!(ranked.len(), 2);
    let (q, hits) = &ranked[0];
    assert_eq!(q, "chelsea_mirror.png");
    assert_eq!(hits[0].0, "chelsea.png");
    assert!(hits[0].1 > 0.9 && hits[1].1 < 0.7, "{hits:?}");
    assert!(
        hits.iter().all(|(h, _)| h != "chelsea_mirror.png"),
        "the query itself is excluded: {hits:?}"
    );
    let (q, hits) = &ranked[1];
    assert_eq!(q, "motorcycle_right.png");
    assert_eq!(hits[0].0, "motorcycle_left.png");
    for p in [
        "panels/chelsea_mirror.png",
        "panels/motorcycle_right.png",
        "scores.json",
    ] {
        assert!(out.join(p).is_file(), "{p}");
    }
    assert!(out
        .join("maps/chelsea_mirror_hit-01_chelsea_a_raw.npy")
        .is_file());
    // Contrast maps (on by default): the query against each hit relative to its other hits.
    // The cat's plain maps w.r.t. its three hits are near-identical (DESIGN.md §1.2); its
    // contrast maps are not. Each is saved and drawn beside the plain one.
    let ids: Vec<String> = first["comparisons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["group"] == "chelsea_mirror")
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3, "{first}");
    let load = |id: &str, tag: &str| read_npy(&out.join(format!("maps/{id}_{tag}_raw.npy"))).1;
    let plain: Vec<Vec<f32>> = ids.iter().map(|id| load(id, "a")).collect();
    let contrast: Vec<Vec<f32>> = ids.iter().map(|id| load(id, "a_contrast")).collect();
    let pairs = [(0, 1), (0, 2), (1, 2)];
    let least_plain = pairs
        .iter()
        .map(|&(i, j)| pearson(&plain[i], &plain[j]))
        .fold(f64::INFINITY, f64::min);
    let most_contrast = pairs
        .iter()
        .map(|&(i, j)| pearson(&contrast[i], &contrast[j]))
        .filter(|r| r.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    println!("plain maps correlate at >= {least_plain:.3}, contrast maps at <= {most_contrast:.3}");
    assert!(least_plain > 0.9, "{least_plain}");
    assert!(most_contrast < 0.5, "{most_contrast}");
    // Each contrast map is its plain map as a share of its total, minus the mean share of
    // the other two, before the ReLU: exact here, where no plain map is clipped by its ReLU.
    assert!(plain.iter().flatten().all(|v| *v > 0.0));
    let shares = shares(&plain);
    for i in 0..3 {
        assert!(
            contrast[i].iter().any(|v| *v > 0.0),
            "contrast map {i} is empty"
        );
        for (k, c) in contrast[i].iter().enumerate() {
            let others: f32 = (0..3).filter(|&j| j != i).map(|j| shares[j][k]).sum();
            let want = (shares[i][k] - others / 2.0).max(0.0);
            assert!((c - want).abs() < 1e-6, "map {i} at {k}: {c} vs {want}");
        }
    }
    for id in &ids {
        assert!(out.join(format!("overlays/{id}_a_contrast.png")).is_file());
        assert!(!out.join(format!("maps/{id}_b_contrast_raw.npy")).exists());
    }

    // Second run over the same gallery: only the queries are embedded.
    let second = run_pipeline("retrieval-imagenet.toml", &out);
    assert_eq!(second["counts"]["images_forwarded"], 2, "{second}");
    assert_eq!(ranking(&out), ranked);
}

#[test]
fn reid_embedder_finds_the_same_scene() {
    let out = scratch("retrieval-reid");
    run_pipeline("retrieval-reid.toml", &out);
    let ranked = ranking(&out);
    assert_eq!(ranked[0].1[0].0, "chelsea.png");
    assert_eq!(ranked[1].1[0].0, "motorcycle_left.png");
    assert!(
        ranked.iter().all(|(_, h)| h[0].1 > 0.9 && h[1].1 < 0.7),
        "{ranked:?}"
    );
}

#[test]
fn faces_match_the_same_person_far_above_others() {
    let out = scratch("retrieval-faces");
    run_pipeline("retrieval-faces.toml", &out);
    let ranked = ranking(&out);
    assert_eq!(ranked.len(), 3);
    for (q, hits) in &ranked {
        println!("{q}: {hits:?}");
        assert_eq!(hits[0].0, "astronaut.png", "{q}");
        assert!(hits[0].1 > 0.75, "{q}: same person {}", hits[0].1);
        assert!(hits[0].1 - hits[1].1 > 0.5, "{q}: {hits:?}");
        // The map of the query w.r.t. its match peaks inside the face, not on the border.
        let (shape, raw) = read_npy(&out.join(format!(
            "maps/{}_hit-01_astronaut_a_raw.npy",
            q.trim_end_matches(".png")
        )));
        assert_eq!(shape, vec![7, 7]);
        let peak = raw
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        let (row, col) = (peak / 7, peak % 7);
        assert!(
            (1..=5).contains(&row) && (1..=5).contains(&col),
            "{q}: peak at ({row}, {col})"
        );
    }
}

#[test]
fn layers_lists_values_with_shapes() {
    let r = run(fam()
        .arg("layers")
        .arg(root().join("models/fetched/mobilefacenet.onnx")));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let line = r
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("507 "))
        .expect("507 listed");
    assert!(
        line.contains("PRelu") && line.contains("[1, 512, 7, 7]"),
        "{line}"
    );
    let r = run(fam()
        .arg("layers")
        .arg(root().join("models/mobilenet_v2.safetensors")));
    assert!(
        r.stdout.contains("features.18") && r.stdout.contains("[1, 1280, 7, 7]"),
        "{}",
        r.stdout
    );
}
