//! Bad input, one case a row: each gets a clear error naming the file, and nothing else in
//! the run is lost. Broken images are reported and skipped; broken models, layers and output
//! folders stop the run with exit code 2 before any work.

use std::path::{Path, PathBuf};

use crate::util::*;

fn png(path: &Path, img: image::DynamicImage) {
    img.save(path).unwrap();
}

/// A PNG whose header declares a 100000 x 100000 image (a decompression bomb): the decoder
/// must refuse it from the header, before allocating anything.
fn bomb(path: &Path) {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let crc = crc32(&ihdr);
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend_from_slice(&13u32.to_be_bytes());
    bytes.extend_from_slice(&ihdr);
    bytes.extend_from_slice(&crc.to_be_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A retrieval pipeline over `gallery` with one query.
fn retrieval_pipeline(dir: &Path, gallery: &Path, weights: &Path, layer: &str) -> PathBuf {
    let text = format!(
        r#"[run]
output = "out"
[backbone]
plugin = "retrieval"
kind = "mobilenet_v2"
weights = {weights:?}
layer = "{layer}"
[similarity]
plugin = "metrics"
kind = "cosine"
[task]
kind = "retrieval"
queries = [{query:?}]
gallery = {gallery:?}
top_k = 20
cache = false
[[render]]
plugin = "render"
kind = "panel"
[[render]]
plugin = "render"
kind = "scores"
"#,
        weights = weights.display().to_string(),
        query = image("chelsea_mirror.png").display().to_string(),
        gallery = gallery.display().to_string(),
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A folder mixing good and broken images: every good one is ranked and rendered, every
/// broken one is listed with its error, and the run exits 1.
#[test]
fn a_folder_of_good_and_broken_images_renders_every_good_one() {
    let dir = scratch("bad-images");
    let g = dir.join("gallery");
    std::fs::create_dir_all(&g).unwrap();
    let cat = image::open(image("chelsea.png")).unwrap();
    // Good, if unusual: grayscale, RGBA, 16-bit, smaller than the crop.
    png(
        &g.join("gray.png"),
        image::DynamicImage::ImageLuma8(cat.to_luma8()),
    );
    png(
        &g.join("rgba.png"),
        image::DynamicImage::ImageRgba8(cat.to_rgba8()),
    );
    png(
        &g.join("sixteen.png"),
        image::DynamicImage::ImageRgb16(cat.to_rgb16()),
    );
    png(
        &g.join("tiny.png"),
        image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            10,
            8,
            image::Rgb([200, 30, 30]),
        )),
    );
    std::fs::copy(image("coffee.png"), g.join("coffee.png")).unwrap();
    // Broken: (file, the error text expected in manifest.json).
    let full = std::fs::read(image("astronaut.png")).unwrap();
    std::fs::write(g.join("truncated.png"), &full[..5000]).unwrap();
    // A JPEG cut short decodes into a partly grey image; it is refused, as PIL refuses it.
    let jpeg = std::fs::read(image("china.jpg")).unwrap();
    std::fs::write(g.join("truncated.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    std::fs::write(
        g.join("random.jpg"),
        (0..3000u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    std::fs::write(g.join("notes.png"), b"this is not an image\n").unwrap();
    std::fs::write(g.join("anim.png"), b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    std::fs::write(g.join("empty.jpg"), b"").unwrap();
    bomb(&g.join("bomb.png"));
    let broken: [(&str, &str); 7] = [
        (
            "truncated.png",
            "cannot decode image: truncated PNG: the data ends before the IEND chunk",
        ),
        (
            "truncated.jpg",
            "cannot decode image: truncated JPEG: the data ends before the end-of-image marker",
        ),
        (
            "random.jpg",
            "cannot decode image: unknown or unsupported format (fam reads PNG and JPEG)",
        ),
        (
            "notes.png",
            "cannot decode image: unknown or unsupported format (fam reads PNG and JPEG)",
        ),
        (
            "anim.png",
            "cannot decode image: Gif files are not supported (fam reads PNG and JPEG)",
        ),
        (
            "empty.jpg",
            "cannot decode image: unknown or unsupported format (fam reads PNG and JPEG)",
        ),
        ("bomb.png", "cannot decode image: Image size exceeds limit"),
    ];
    let p = retrieval_pipeline(
        &dir,
        &g,
        &root().join("models/mobilenet_v2.safetensors"),
        "features.18",
    );
    let r = run(fam().args(["-q", "run"]).arg(&p));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let manifest = json(&dir.join("out/manifest.json"));
    let failures = manifest["failures"].as_array().unwrap();
    for (file, expected) in broken {
        let f = failures
            .iter()
            .find(|f| f["item"].as_str().unwrap().ends_with(file))
            .unwrap_or_else(|| panic!("{file} not listed in {failures:?}"));
        let err = f["error"].as_str().unwrap();
        assert!(err.contains(expected), "{file}: `{err}` lacks `{expected}`");
        assert!(
            err.contains(file),
            "{file}: the error names the file: {err}"
        );
    }
    assert_eq!(failures.len(), broken.len(), "{failures:?}");
    // The one query was explained: broken gallery images are not failed items.
    assert_eq!(manifest["items"]["ok"], 1);
    let ranking = json(&dir.join("out/retrieval.json"));
    let hits: Vec<&str> = ranking["queries"][0]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["image"].as_str().unwrap())
        .collect();
    for good in [
        "gray.png",
        "rgba.png",
        "sixteen.png",
        "tiny.png",
        "coffee.png",
    ] {
        assert!(
            hits.iter().any(|h| h.ends_with(good)),
            "{good} not ranked: {hits:?}"
        );
    }
    assert_eq!(hits.len(), 5);
    assert!(dir.join("out/panels/chelsea_mirror.png").is_file());

    // Lenient decoding explains what the cut files hold, and the manifest says which.
    let text = std::fs::read_to_string(&p).unwrap();
    let lenient = dir.join("lenient.toml");
    std::fs::write(
        &lenient,
        text.replacen("[run]\n", "[run]\ndecoding = \"lenient\"\n", 1)
            .replace("out\"", "out-lenient\""),
    )
    .unwrap();
    let r = run(fam().args(["-q", "run"]).arg(&lenient));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let manifest = json(&dir.join("out-lenient/manifest.json"));
    let partial = manifest["partial_images"].as_array().unwrap();
    let named: Vec<&str> = partial
        .iter()
        .map(|p| p["image"].as_str().unwrap())
        .collect();
    assert_eq!(named.len(), 2, "{partial:?}");
    for (file, cause) in [
        ("truncated.jpg", "truncated JPEG"),
        ("truncated.png", "truncated PNG"),
    ] {
        let p = partial
            .iter()
            .find(|p| p["image"].as_str().unwrap().ends_with(file))
            .unwrap_or_else(|| panic!("{file} not in {partial:?}"));
        assert!(p["cause"].as_str().unwrap().contains(cause), "{p}");
    }
    assert_eq!(
        manifest["failures"].as_array().unwrap().len(),
        broken.len() - 2,
        "{manifest}"
    );
}

/// Broken models, layers and output folders: exit code 2 and the exact reason.
#[test]
fn broken_models_layers_and_outputs_stop_the_run_with_the_reason() {
    let dir = scratch("bad-models");
    let good = root().join("models/mobilenet_v2.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    // The same weights with one value set to NaN, in the middle of the data section (inside
    // a large convolution kernel; the first bytes may belong to an integer counter).
    let mut nan = bytes.clone();
    let header = u64::from_le_bytes(nan[..8].try_into().unwrap()) as usize;
    let at = 8 + header + ((bytes.len() - 8 - header) / 2) / 8 * 8;
    nan[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let files = [
        ("nan.safetensors", nan),
        ("truncated.safetensors", bytes[..100_000].to_vec()),
        ("garbage.safetensors", b"garbage\n".to_vec()),
        ("empty.pth", Vec::new()),
    ];
    let cases: Vec<(PathBuf, &str, &str)> = files
        .iter()
        .map(|(name, b)| {
            let p = dir.join(name);
            std::fs::write(&p, b).unwrap();
            (p, "features.18", "")
        })
        .zip([
            "non-finite value(s) (NaN or infinity); the checkpoint is corrupt",
            "weights: invalid safetensors file",
            "weights: unrecognised format (expected safetensors, a PyTorch zip checkpoint or a legacy PyTorch pickle)",
            "weights: unrecognised format",
        ])
        .map(|((p, l, _), e)| (p, l, e))
        .chain([
            (dir.join("missing.safetensors"), "features.18", "missing.safetensors"),
            (
                good.clone(),
                "features.81",
                "backbone.layer: no layer `features.81` in mobilenet_v2 (layers are features.0 to features.18); did you mean `features.1`?",
            ),
        ])
        .collect();
    for (n, (weights, layer, expected)) in cases.iter().enumerate() {
        let case = dir.join(format!("case-{n}"));
        std::fs::create_dir_all(&case).unwrap();
        let p = retrieval_pipeline(&case, &root().join("data/images"), weights, layer);
        let r = run(fam().args(["-q", "run"]).arg(&p));
        assert_eq!(r.code, 2, "{}: {}", weights.display(), r.stderr);
        assert!(
            r.stderr.contains(expected),
            "`{expected}` missing from: {}",
            r.stderr
        );
        if !weights.ends_with("missing.safetensors") && *layer == "features.18" {
            assert!(
                r.stderr.contains(&weights.display().to_string()),
                "{}",
                r.stderr
            );
        }
        assert!(!r.stderr.contains("stack backtrace"), "{}", r.stderr);
    }
    // An output folder that cannot be created (its parent is a file).
    let blocker = dir.join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let p = retrieval_pipeline(&dir, &root().join("data/images"), &good, "features.18");
    let r = run(fam()
        .args(["-q", "run"])
        .arg(&p)
        .arg("--output")
        .arg(blocker.join("out")));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("a-file/out"), "{}", r.stderr);
}

/// A truncated ONNX model: a clean error, no backtrace even with RUST_BACKTRACE set.
#[test]
fn a_truncated_onnx_model_is_reported_cleanly() {
    let dir = scratch("bad-onnx");
    let src = root().join("models/fetched/mobilefacenet.onnx");
    let bytes = std::fs::read(&src).unwrap();
    let model = dir.join("cut.onnx");
    std::fs::write(&model, &bytes[..50_000]).unwrap();
    let r = run(fam().env("RUST_BACKTRACE", "1").arg("layers").arg(&model));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "cut.onnx: weights: not a readable ONNX model: failed to decode Protobuf message"
        ),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("stack backtrace") && r.stderr.lines().count() <= 2,
        "{}",
        r.stderr
    );
}

/// A pair pipeline with a backbone of the `test_panicky` plugin.
fn toy_pipeline(dir: &Path, kind: &str, batch_size: usize, pairs: &[(&Path, &Path)]) -> PathBuf {
    let pairs: String = pairs
        .iter()
        .map(|(a, b)| {
            format!(
                "  {{ a = {:?}, b = {:?} }},\n",
                a.display().to_string(),
                b.display().to_string()
            )
        })
        .collect();
    let text = format!(
        r#"[run]
output = "out"
batch_size = {batch_size}
[backbone]
plugin = "test_panicky"
kind = "{kind}"
[similarity]
plugin = "metrics"
kind = "cosine"
[task]
kind = "pair"
pairs = [
{pairs}]
[[render]]
plugin = "render"
kind = "scores"
"#
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A black image has a zero-norm embedding under a ReLU backbone: cosine is undefined for
/// it, so its pair fails with the reason and the other pair is explained (exit 1).
#[test]
fn a_zero_norm_embedding_fails_its_pair_only() {
    let dir = scratch("zero-norm");
    let black = dir.join("black.png");
    png(&black, image::DynamicImage::new_rgb8(256, 256));
    let (chelsea, coffee) = (image("chelsea.png"), image("coffee.png"));
    let p = toy_pipeline(
        &dir,
        "pooled_pixels",
        4,
        &[(&black, &chelsea), (&chelsea, &coffee)],
    );
    let r = run(fam().args(["-q", "run"]).arg(&p));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let expected = "cosine similarity is undefined for a zero-norm embedding (norms 0 and";
    assert!(r.stderr.contains(expected), "{}", r.stderr);
    let manifest = json(&dir.join("out/manifest.json"));
    assert_eq!(manifest["items"]["ok"], 1, "{manifest}");
    let failure = &manifest["failures"][0];
    assert!(
        failure["item"].as_str().unwrap().starts_with("pair 1 ("),
        "{failure}"
    );
    assert!(
        failure["error"].as_str().unwrap().contains(expected),
        "{failure}"
    );
    let scores = json(&dir.join("out/scores.json"));
    assert_eq!(
        scores["comparisons"].as_array().unwrap().len(),
        1,
        "{scores}"
    );
}

/// A backbone whose embeddings change size between batches: the run stops (exit 2) naming
/// the backbone and both shapes, rather than comparing embeddings of different sizes.
#[test]
fn embeddings_of_different_sizes_stop_the_run() {
    let dir = scratch("ragged");
    let (chelsea, coffee) = (image("chelsea.png"), image("coffee.png"));
    let p = toy_pipeline(&dir, "ragged", 1, &[(&chelsea, &coffee)]);
    let r = run(fam().args(["-q", "run"]).arg(&p));
    assert_eq!(r.code, 2, "{}", r.stderr);
    let expected = "backbone `pooled_pixels(ragged=true)` returned feature maps [3, 7, 7] with 3-d embeddings for one batch but [6, 7, 7] with 6-d embeddings for another; every image must get the same shapes";
    assert!(r.stderr.contains(expected), "{}", r.stderr);
    assert!(!dir.join("out/manifest.json").exists());
}

/// A shared library named like a plugin but exporting no plugin declaration: listed with
/// the reason by `fam-cli plugins`, and a pipeline using it cannot run (exit 2).
#[test]
fn a_library_without_the_plugin_symbol_is_refused() {
    let dir = scratch("no-symbol");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    // Any real shared library that is not a fam plugin: the C maths library.
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
        "/usr/lib64/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.is_file())
    .expect("libm.so.6 on this system");
    let fake = plugins.join("libfam_plugin_nosymbol.so");
    std::fs::copy(libm, &fake).unwrap();
    let r = run(fam().arg("--plugin-dir").arg(&plugins).arg("plugins"));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let line = r
        .stdout
        .lines()
        .find(|l| l.contains("libfam_plugin_nosymbol.so"))
        .unwrap_or_else(|| panic!("not listed:\n{}", r.stdout));
    let expected = "not a fam plugin: it exports no FAM_PLUGIN_DECLARATION symbol (use fam_core::export_plugin!)";
    assert!(line.contains(expected), "{line}");

    let (chelsea, coffee) = (image("chelsea.png"), image("coffee.png"));
    let p = toy_pipeline(&dir, "pooled_pixels", 1, &[(&chelsea, &coffee)]);
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("plugin = \"metrics\"", "plugin = \"nosymbol\"");
    std::fs::write(&p, text).unwrap();
    let r = run(fam()
        .arg("--plugin-dir")
        .arg(&plugins)
        .args(["-q", "run"])
        .arg(&p));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("libfam_plugin_nosymbol.so"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains(expected), "{}", r.stderr);
}
