//! Few-shot and contrastive tasks on the real models trained on MNIST (committed weights,
//! committed sample digits) and SimpleShot on ImageNet MobileNetV2 features.

use crate::util::*;

/// The classes of an `episode.json`.
fn classes(ep: &serde_json::Value) -> Vec<&str> {
    ep["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect()
}

fn run_pipeline(name: &str, out: &std::path::Path) {
    let r = run(fam()
        .arg("run")
        .arg(root().join("pipelines").join(name))
        .arg("--output")
        .arg(out));
    assert_eq!(r.code, 0, "{name}: {}", r.stderr);
}

#[test]
fn protonet_classifies_novel_digits_with_class_specific_maps() {
    let out = scratch("fewshot-digits");
    run_pipeline("fewshot-digits.toml", &out);
    let ep = json(&out.join("episode.json"));
    let acc = ep["accuracy"].as_f64().unwrap();
    println!("ProtoNet episode accuracy {acc}");
    assert_eq!(ep["classes"].as_array().unwrap().len(), 5);
    assert!(acc >= 0.8, "5-way 5-shot accuracy on novel digits {acc}");
    // Maps w.r.t. the predicted class favour the digit's strokes on average (measured: 1.19x
    // the stroke area's share; Euclidean margins also weigh where strokes are absent), and
    // each class gets its own map.
    let (mut ratios, mut distinct) = (Vec::new(), 0);
    for p in ep["predictions"].as_array().unwrap() {
        let q = std::path::Path::new(p["query"].as_str().unwrap());
        let stem = q.file_stem().unwrap().to_string_lossy().into_owned();
        let pred = p["predicted"].as_str().unwrap();
        let (shape, map) = read_npy(&out.join(format!("maps/{stem}_class-{pred}_a_up.npy")));
        assert_eq!(shape, vec![28, 28]);
        let img = fam_engine::preprocess::load_rgb8(q).unwrap();
        let stroke: Vec<bool> = img.data.chunks(3).map(|px| px[0] > 80).collect();
        let total: f32 = map.iter().sum();
        if total > 0.0 {
            let on: f32 = map
                .iter()
                .zip(&stroke)
                .filter(|(_, s)| **s)
                .map(|(m, _)| m)
                .sum();
            let area = stroke.iter().filter(|s| **s).count() as f32 / stroke.len() as f32;
            ratios.push(on / total / area);
        }
        let other = ep["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .find(|c| *c != pred)
            .unwrap();
        let (_, map2) = read_npy(&out.join(format!("maps/{stem}_class-{other}_a_up.npy")));
        distinct += usize::from(map != map2);
    }
    let mean = ratios.iter().sum::<f32>() / ratios.len() as f32;
    println!("stroke enrichment {mean:.2} over {} maps", ratios.len());
    assert!(
        ratios.len() >= 45 && mean > 1.1,
        "stroke enrichment {mean} over {} maps",
        ratios.len()
    );
    assert_eq!(distinct, 50, "every query has class-specific maps");
    assert_eq!(out.join("panels").read_dir().unwrap().count(), 50);
}

/// Runs a kNN pipeline on 30 labelled queries (files named `<class>_<index>.png`, class
/// names may hold `_`) and counts the correct predictions.
fn knn_correct(pipeline: &str) -> usize {
    let out = scratch(pipeline.trim_end_matches(".toml"));
    run_pipeline(pipeline, &out);
    let doc = json(&out.join("predictions.json"));
    let preds = doc["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 30);
    assert_eq!(out.join("panels").read_dir().unwrap().count(), 30);
    preds
        .iter()
        .filter(|p| {
            let stem = std::path::Path::new(p["query"].as_str().unwrap())
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            stem.rsplit_once('_').map(|(c, _)| c) == p["predicted"].as_str()
        })
        .count()
}

#[test]
fn simclr_knn_classifies_digits() {
    let correct = knn_correct("contrastive-digits.toml");
    // Measured: 23/30 with k = 5 over a bank of 20 digits per class (chance: 3/30).
    println!("SimCLR kNN: {correct}/30");
    assert!(correct >= 21, "{correct}/30 correct");
}

#[test]
fn simclr_knn_classifies_fashion_images() {
    let correct = knn_correct("contrastive-fashion.toml");
    // Measured: 19/30 with k = 5 over a bank of 20 images per class (chance: 3/30).
    println!("SimCLR Fashion-MNIST kNN: {correct}/30");
    assert!(correct >= 17, "{correct}/30 correct");
}

#[test]
fn simpleshot_on_imagenet_features_gets_the_natural_episode_right() {
    let out = scratch("fewshot-imagenet");
    run_pipeline("fewshot-imagenet.toml", &out);
    let ep = json(&out.join("episode.json"));
    assert_eq!(ep["accuracy"].as_f64(), Some(1.0), "{ep}");
    assert_eq!(ep["transform"], "cl2n");
}

#[test]
fn a_support_class_without_images_is_a_validation_error() {
    let dir = scratch("empty-class");
    let support = dir.join("support");
    std::fs::create_dir_all(support.join("cat")).unwrap();
    std::fs::create_dir_all(support.join("dog")).unwrap();
    std::fs::copy(image("chelsea.png"), support.join("cat/chelsea.png")).unwrap();
    let text = std::fs::read_to_string(root().join("pipelines/fewshot-imagenet.toml"))
        .unwrap()
        .replace(
            "../data/episodes/imagenet/support",
            &support.display().to_string(),
        )
        .replace("../models/", &format!("{}/models/", root().display()))
        .replace(
            "../data/episodes/imagenet/query",
            &root()
                .join("data/episodes/imagenet/query")
                .display()
                .to_string(),
        );
    let p = dir.join("p.toml");
    std::fs::write(&p, text).unwrap();
    let r = run(fam().arg("validate").arg(&p));
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("task.support: class `dog` has no images"),
        "{}",
        r.stderr
    );
}

/// Fashion-MNIST: the ProtoNet trained on five classes (t-shirt, trouser, pullover, dress,
/// coat) classifies an episode of the five novel ones, with a map per class.
#[test]
fn protonet_classifies_novel_fashion_classes() {
    let out = scratch("fewshot-fashion");
    run_pipeline("fewshot-fashion.toml", &out);
    let ep = json(&out.join("episode.json"));
    let acc = ep["accuracy"].as_f64().unwrap();
    println!("ProtoNet Fashion-MNIST episode accuracy {acc}");
    let classes = classes(&ep);
    assert_eq!(classes, ["ankle_boot", "bag", "sandal", "shirt", "sneaker"]);
    // Measured: 37/50 (chance 10/50).
    assert!(
        acc >= 0.7,
        "5-way 5-shot accuracy on novel Fashion-MNIST classes {acc}"
    );
    let preds = ep["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 50);
    for p in preds {
        let q = std::path::Path::new(p["query"].as_str().unwrap());
        let stem = q.file_stem().unwrap().to_string_lossy().into_owned();
        let maps: Vec<Vec<f32>> = classes
            .iter()
            .map(|c| read_npy(&out.join(format!("maps/{stem}_class-{c}_a_up.npy"))).1)
            .collect();
        assert!(maps.iter().all(|m| m.len() == 28 * 28));
        assert!(
            maps.windows(2).any(|w| w[0] != w[1]),
            "{stem}: one map for all"
        );
    }
}

/// With `contrast = "none"`, each query's plain map against a class gets its contrast map
/// beside it (`[explain] contrast_maps`, on by default): the plain map as a share of its
/// total minus the query's mean share against the other classes, before the ReLU. Not beside the maps of a
/// `contrast = "others"` run (they are contrasts already), nor when switched off.
#[test]
fn contrast_maps_stand_beside_plain_maps() {
    let root = root();
    let text = std::fs::read_to_string(root.join("pipelines/fewshot-digits.toml"))
        .unwrap()
        .replace("\"../", &format!("\"{}/", root.display()));
    let dir = scratch("fewshot-contrast-maps");
    let plain_text = text.replace("contrast = \"others\"", "contrast = \"none\"");
    let off_text = plain_text.replace("[task]", "[explain]\ncontrast_maps = false\n\n[task]");
    for (name, text) in [
        ("others", &text),
        ("plain", &plain_text),
        ("off", &off_text),
    ] {
        let p = dir.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        let r = run(fam().arg("run").arg(&p).arg("--output").arg(dir.join(name)));
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
    }
    let ep = json(&dir.join("plain/episode.json"));
    let classes = classes(&ep);
    let (mut checked, mut differ) = (0, 0);
    for p in ep["predictions"].as_array().unwrap() {
        let q = std::path::Path::new(p["query"].as_str().unwrap());
        let stem = q.file_stem().unwrap().to_string_lossy().into_owned();
        let load = |run: &str, id: &str, tag: &str| {
            read_npy(&dir.join(format!("{run}/maps/{id}_{tag}_raw.npy"))).1
        };
        let ids: Vec<String> = classes
            .iter()
            .map(|c| format!("{stem}_class-{c}"))
            .collect();
        let plain: Vec<Vec<f32>> = ids.iter().map(|id| load("plain", id, "a")).collect();
        // Where no plain map of this query is clipped by its ReLU, the contrast maps follow
        // from them exactly: shares of their totals, minus the other classes' mean share.
        let unclipped = plain.iter().flatten().all(|v| *v > 0.0);
        let shares = shares(&plain);
        for (i, id) in ids.iter().enumerate() {
            let contrast = load("plain", id, "a_contrast");
            assert_eq!(contrast.len(), 49);
            let page = std::fs::read_to_string(dir.join(format!("plain/compare/{id}.html")));
            assert!(
                page.unwrap().contains("vs the other 4 classes"),
                "{id}: the comparison's page shows the contrast map"
            );
            differ += usize::from(contrast != plain[i]);
            if unclipped {
                for k in 0..49 {
                    let others: f32 = (0..5).filter(|&j| j != i).map(|j| shares[j][k]).sum();
                    let want = (shares[i][k] - others / 4.0).max(0.0);
                    assert!((contrast[k] - want).abs() < 1e-6, "{id} at {k}");
                }
                checked += 1;
            }
            assert!(dir.join(format!("off/maps/{id}_a_raw.npy")).is_file());
            assert!(!dir
                .join(format!("off/maps/{id}_a_contrast_raw.npy"))
                .exists());
            assert!(!dir
                .join(format!("others/maps/{id}_a_contrast_raw.npy"))
                .exists());
        }
    }
    println!("{checked} contrast maps checked exactly; {differ} of 250 differ from the plain maps");
    assert!(checked > 0, "no query whose plain maps are all unclipped");
    assert!(differ > 200, "{differ}");
}
