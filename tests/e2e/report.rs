//! The HTML report: `index.html` links every panel, overlay and raw map, and renders in a
//! real browser (headless Chromium) with every image loaded.

use std::path::{Path, PathBuf};

use crate::util::*;

/// Debian's Chromium (`.ci/run` installs it), or `FAM_CHROMIUM`.
fn chromium() -> PathBuf {
    let found = std::env::var_os("FAM_CHROMIUM")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/bin/chromium", "/usr/bin/chromium-browser"].map(PathBuf::from))
        .find(|p| p.is_file());
    found.expect("headless Chromium is needed for the report test: apt-get install chromium (or set FAM_CHROMIUM)")
}

fn browser(args: &[&str], page: &Path) -> std::process::Output {
    std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs")
}

#[test]
fn the_report_renders_in_chromium_with_every_panel() {
    let dir = scratch("report");
    let pairs = [
        (image("chelsea.png"), image("coffee.png")),
        (image("chelsea.png"), image("chelsea_mirror.png")),
        (image("astronaut.png"), image("rocket.jpg")),
    ];
    let pairs: Vec<(&Path, &Path)> = pairs
        .iter()
        .map(|(a, b)| (a.as_path(), b.as_path()))
        .collect();
    // `html` first: it still runs after the renderers whose files it links.
    let p = write_pipeline(
        &dir,
        "plugin = \"metrics\"\nkind = \"cosine\"",
        "contribution",
        &pairs,
        &["html", "panel", "overlay", "npy", "scores"],
    );
    let r = run(fam().args(["-q", "run"]).arg(&p));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = dir.join("out");
    let page = out.join("index.html");
    let html = std::fs::read_to_string(&page).unwrap();
    // Every panel, overlay and raw map is linked, and every link points at a file.
    let mut panels = 0;
    for sub in ["panels", "overlays", "maps"] {
        for e in std::fs::read_dir(out.join(sub)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let link = format!("href=\"{sub}/{name}\"");
            assert!(html.contains(&link), "{link} missing from index.html");
            panels += usize::from(sub == "panels");
        }
    }
    assert_eq!(panels, 3);
    for link in html.split("href=\"").skip(1) {
        let target = link.split('"').next().unwrap();
        if target.starts_with('#') || target == "manifest.json" {
            continue;
        }
        assert!(out.join(target).is_file(), "broken link {target}");
    }
    for score in ["0.4179", "0.9848"] {
        assert!(html.contains(score), "score {score} missing");
    }

    // The browser loads every image (the page counts them once loaded).
    let dom = browser(&["--virtual-time-budget=10000", "--dump-dom"], &page);
    let dom = String::from_utf8_lossy(&dom.stdout);
    let images = html.matches("<img ").count();
    assert_eq!(images, 3 + 6, "3 panels and 6 overlay thumbnails");
    assert!(
        dom.contains(&format!(
            "<body data-images=\"{images}\" data-broken=\"0\">"
        )),
        "{}",
        dom.lines()
            .find(|l| l.contains("<body"))
            .unwrap_or("no <body> in the DOM")
    );
    // And draws it: a screenshot that is not blank.
    let shot = dir.join("report.png");
    let o = browser(
        &[
            "--window-size=1280,2400",
            &format!("--screenshot={}", shot.display()),
        ],
        &page,
    );
    assert!(shot.is_file(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&shot).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1280, 2400));
    let colourful = img
        .pixels()
        .filter(|p| p.0.iter().max().unwrap() - p.0.iter().min().unwrap() > 60)
        .count();
    assert!(
        colourful > 100_000,
        "only {colourful} colourful pixels: the panels are not drawn"
    );
}
