//! Ctrl-C: the run stops at the next safe point with exit code 130, and the output folder
//! holds only complete files (no temporary or half-written ones).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::*;

fn all_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn ctrl_c_leaves_only_complete_files() {
    let dir = scratch("interrupt");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    // 120 pairs of copies: long enough to be interrupted in the middle.
    let mut pairs = Vec::new();
    for i in 0..240 {
        let src = ["chelsea.png", "coffee.png", "rocket.jpg"][i % 3];
        let ext = src.rsplit('.').next().unwrap();
        let dst = images.join(format!("img-{i:03}.{ext}"));
        std::fs::copy(image(src), &dst).unwrap();
        pairs.push(dst);
    }
    let pairs: Vec<(&Path, &Path)> = pairs
        .chunks(2)
        .map(|c| (c[0].as_path(), c[1].as_path()))
        .collect();
    let p = write_pipeline(
        &dir,
        "plugin = \"metrics\"\nkind = \"cosine\"",
        "contribution",
        &pairs,
        &["overlay", "npy"],
    );
    let out = dir.join("out");
    let child = fam()
        .args(["-q", "run"])
        .arg(&p)
        .arg("--output")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt while it writes files: as soon as the first overlay appears.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60)
        && std::fs::read_dir(out.join("overlays")).map_or(true, |mut d| d.next().is_none())
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let mut files = Vec::new();
    if out.exists() {
        all_files(&out, &mut files);
    }
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(
            !name.ends_with(".tmp"),
            "temporary file left: {}",
            f.display()
        );
        if name.ends_with(".png") {
            image::open(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        }
        if name.ends_with(".npy") {
            read_npy(f);
        }
    }
    // The run really stopped early: some overlays, not all 240, and no manifest.
    let overlays = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "png"))
        .count();
    assert!((1..240).contains(&overlays), "{overlays} overlays");
    assert!(!out.join("manifest.json").exists());
    // The forward passes are all done by the time files are written: they are in the
    // checkpoint, and `--resume` finishes the run without running the backbone again
    // for them.
    let checkpoint = out.join(".fam-checkpoint");
    let mut saved = Vec::new();
    all_files(&checkpoint, &mut saved);
    saved.retain(|f| f.to_string_lossy().ends_with(".emb.npy"));
    saved.sort();
    // One entry per image file (keyed by path, size and modification time).
    assert_eq!(saved.len(), 240, "{} entries", saved.len());
    // Drop a third of them, so that the resumed run mixes restored and recomputed images.
    for f in &saved[..80] {
        std::fs::remove_file(f).unwrap();
    }
    // Rendered files the interrupted run completed are kept, not drawn again.
    let before = files
        .iter()
        .filter(|f| {
            let s = f.to_string_lossy();
            (s.contains("/overlays/") || s.contains("/maps/")) && !s.ends_with(".tmp")
        })
        .count();
    let r = run(fam()
        .args(["-q", "run", "--json", "--resume"])
        .arg(&p)
        .arg("--output")
        .arg(&out));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["items_ok"], 120, "{report}");
    assert_eq!(report["counts"]["resumed"], 160, "{report}");
    assert_eq!(report["counts"]["images_forwarded"], 80, "{report}");
    assert_eq!(report["counts"]["files_reused"], before, "{report}");
    assert!(
        !out.join(".fam-checkpoint").exists(),
        "checkpoint left after a complete run"
    );
    let manifest = json(&out.join("manifest.json"));
    assert_eq!(manifest["items"]["ok"], 120);
    // Maps from the checkpoint equal those of a run from scratch (checked on 4 pairs).
    let few = write_pipeline(
        &dir,
        "plugin = \"metrics\"\nkind = \"cosine\"",
        "contribution",
        &pairs[..4],
        &["npy"],
    );
    let fresh = dir.join("fresh");
    let r = run(fam()
        .args(["-q", "run"])
        .arg(&few)
        .arg("--output")
        .arg(&fresh));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut compared = 0;
    for e in std::fs::read_dir(fresh.join("maps")).unwrap() {
        let f = e.unwrap().path();
        let name = f.file_name().unwrap();
        assert_eq!(
            read_npy(&f),
            read_npy(&out.join("maps").join(name)),
            "{}",
            f.display()
        );
        compared += 1;
    }
    assert_eq!(compared, 16, "two raw and two upsampled maps per pair");
}
