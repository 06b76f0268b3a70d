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
    // The comparisons can be filtered by score: all three shown at first.
    assert!(dom.contains("id=\"shown\" data-count=\"3\""), "{dom}");
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

/// A photo (square, `side` px) and its copy moved right by 64 px, grey where nothing moved
/// in, run as a pair at exactly `side` px; returns the run's output folder.
fn shifted_pair(dir: &Path, side: u32) -> std::path::PathBuf {
    let cat = image::open(image("chelsea.png")).unwrap().to_rgb8();
    let crop = cat.width().min(cat.height());
    let square = image::imageops::crop_imm(
        &cat,
        (cat.width() - crop) / 2,
        (cat.height() - crop) / 2,
        crop,
        crop,
    )
    .to_image();
    let a = image::imageops::resize(&square, side, side, image::imageops::FilterType::Triangle);
    let mut b = image::RgbImage::from_pixel(side, side, image::Rgb([128, 128, 128]));
    image::imageops::replace(
        &mut b,
        &image::imageops::crop_imm(&a, 0, 0, side - 64, side).to_image(),
        64,
        0,
    );
    let (pa, pb) = (dir.join("a.png"), dir.join("b.png"));
    a.save(&pa).unwrap();
    b.save(&pb).unwrap();
    let p = write_pipeline(
        dir,
        "plugin = \"metrics\"\nkind = \"cosine\"",
        "contribution",
        &[(pa.as_path(), pb.as_path())],
        &["npy", "scores", "html"],
    );
    // Plain resizing to the side, so that 64 px are exactly two cells (32 px each).
    let mut text = std::fs::read_to_string(&p).unwrap();
    text.push_str(&format!(
        "\n[preprocess]\nwidth = {side}\nheight = {side}\n"
    ));
    std::fs::write(&p, text).unwrap();
    let r = run(fam().args(["-q", "run"]).arg(&p));
    assert_eq!(r.code, 0, "{}", r.stderr);
    dir.join("out")
}

/// Clicks on the comparison's page (`grid` cells a side), dispatched from a page that frames
/// it; each click gives `side:row,col>other:row,col` (the chosen cell and the other image's
/// peak), with ` unchanged` where the other image's overlay did not change. Also sets a
/// minimum score above every score on the run's page and returns the count shown before
/// and after (`1>0`).
fn click(
    out: &Path,
    id: &str,
    grid: usize,
    cells: &[(&str, usize, usize)],
) -> (Vec<String>, String) {
    let clicks: Vec<String> = cells
        .iter()
        .map(|(s, r, c)| format!("['{s}', {r}, {c}]"))
        .collect();
    let driver = out.join("click.html");
    std::fs::write(
        &driver,
        format!(
            r#"<!doctype html><html><body><iframe id="f" src="compare/{id}.html" width="1200" height="900"></iframe>
<script>
document.getElementById('f').addEventListener('load', () => {{
  const d = document.getElementById('f').contentDocument, res = [];
  for (const [side, row, col] of [{}]) {{
    const el = d.getElementById(side), r = el.getBoundingClientRect();
    const before = d.getElementById(side === 'query' ? 'reference-overlay' : 'query-overlay').toDataURL();
    el.dispatchEvent(new MouseEvent('click', {{bubbles: true, clientX: r.left + (col + 0.5) * r.width / {grid}, clientY: r.top + (row + 0.5) * r.height / {grid}}}));
    const after = d.getElementById(side === 'query' ? 'reference-overlay' : 'query-overlay').toDataURL();
    res.push(d.body.dataset.selected + '>' + d.body.dataset.peak + (after !== before ? '' : ' unchanged'));
  }}
  document.body.dataset.result = res.join(';');
  // The run's page filters its comparisons by score.
  const g = document.getElementById('g');
  g.addEventListener('load', () => {{
    const i = g.contentDocument, min = i.getElementById('min-score');
    const before = i.getElementById('shown').dataset.count;
    min.value = '2'; min.dispatchEvent(new Event('input'));
    document.body.dataset.filtered = before + '>' + i.getElementById('shown').dataset.count;
  }});
  g.src = 'index.html';
}});
</script><iframe id="g" width="800" height="600"></iframe></body></html>"#,
            clicks.join(", ")
        ),
    )
    .unwrap();
    let dom = browser(
        &[
            "--allow-file-access-from-files",
            "--virtual-time-budget=10000",
            "--dump-dom",
        ],
        &driver,
    );
    let dom = String::from_utf8_lossy(&dom.stdout);
    let attr = |name: &str| {
        dom.split(&format!("data-{name}=\""))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("the clicks left no {name}:\n{dom}"))
            .replace("&gt;", ">")
    };
    let results = attr("result").split(';').map(String::from).collect();
    (results, attr("filtered"))
}

/// Each click's peak in the other image is where the 2-cell shift to the right says.
fn assert_follows_the_shift(cells: &[(&str, usize, usize)], results: &[String]) {
    assert_eq!(results.len(), cells.len(), "{results:?}");
    for ((side, row, col), got) in cells.iter().zip(results) {
        let (other, want) = if *side == "query" {
            ("reference", (*row, col + 2))
        } else {
            ("query", (*row, col - 2))
        };
        let expected = format!("{side}:{row},{col}>{other}:{},{}", want.0, want.1);
        assert_eq!(*got, expected, "all clicks: {results:?}");
    }
}

/// Which part matches which: a photo and its copy moved right by 64 px (two cells of the
/// 7 x 7 feature map at 224 px). The correspondence is written as `.npy` and adds up to the
/// score; on the comparison's own page a click on one image moves the other image's overlay
/// to where the shift says the clicked location went, both ways.
#[test]
fn the_correspondence_follows_a_known_shift_in_chromium() {
    let dir = scratch("correspondence");
    let out = shifted_pair(&dir, 224);
    let id = "pair-01_a_vs_b";

    // The data: [7, 7, 7, 7], adding up to the score.
    let (shape, values) = read_npy(&out.join(format!("correspondence/{id}.npy")));
    assert_eq!(shape, vec![7, 7, 7, 7]);
    let scores = json(&out.join("scores.json"));
    let score = scores["comparisons"][0]["score"].as_f64().unwrap() as f32;
    let total: f32 = values.iter().sum();
    assert!((total - score).abs() < 1e-3, "{total} vs {score}");
    // The run's page links the comparison's page and the data.
    let index = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(index.contains(&format!("href=\"compare/{id}.html\"")));
    assert!(index.contains(&format!("href=\"correspondence/{id}.npy\"")));

    let cells = [
        ("query", 3, 1),
        ("query", 3, 2),
        ("query", 3, 3),
        ("reference", 3, 4),
        ("reference", 3, 5),
    ];
    let (results, filtered) = click(&out, id, 7, &cells);
    // A minimum score above every score hides the one comparison.
    assert_eq!(filtered, "1>0");
    assert_follows_the_shift(&cells, &results);
    // A location in the address is chosen when the page opens.
    let linked = out.join(format!("compare/{id}.html#query=3,2"));
    let dom = browser(&["--virtual-time-budget=5000", "--dump-dom"], &linked);
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("data-selected=\"query:3,2\"") && dom.contains("data-peak=\"reference:3,4\""),
        "{dom}"
    );
}

/// A correspondence too large to keep whole (33 x 33 locations a side at 1056 px: 1.19
/// million pairs) keeps each location's 16 largest shares, in `.npy` files and on the page,
/// and still follows the shift.
#[test]
fn a_large_correspondence_keeps_the_top_shares_and_follows_the_shift() {
    let dir = scratch("correspondence-large");
    let out = shifted_pair(&dir, 1056);
    let id = "pair-01_a_vs_b";
    assert!(!out.join(format!("correspondence/{id}.npy")).exists());
    let file =
        |side: &str, what: &str| out.join(format!("correspondence/{id}_top_{side}_{what}.npy"));
    let (shape, share) = read_npy(&file("query", "share"));
    assert_eq!(shape, vec![33, 33, 16]);
    let (shape, total) = read_npy(&file("query", "total"));
    assert_eq!(shape, vec![33, 33]);
    // The whole shares add up to the score; each location's kept shares come largest first.
    let scores = json(&out.join("scores.json"));
    let score = scores["comparisons"][0]["score"].as_f64().unwrap() as f32;
    let sum: f32 = total.iter().sum();
    assert!((sum - score).abs() < 1e-3, "{sum} vs {score}");
    assert!(share.chunks(16).all(|c| c.windows(2).all(|w| w[0] >= w[1])));
    let (_, rtotal) = read_npy(&file("reference", "total"));
    assert!((rtotal.iter().sum::<f32>() - score).abs() < 1e-3);
    // The indices: u32, within the other image's 33 x 33 locations.
    let bytes = std::fs::read(file("query", "index")).unwrap();
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert!(String::from_utf8_lossy(&bytes[10..10 + header_len]).contains("'descr': '<u4'"));
    let index: Vec<u32> = bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(index.len(), 33 * 33 * 16);
    assert!(index.iter().all(|&j| j < 33 * 33));
    let page = std::fs::read_to_string(out.join(format!("compare/{id}.html"))).unwrap();
    assert!(page.contains("keeps each location's 16 largest shares"));
    let cells = [
        ("query", 16, 12),
        ("query", 16, 14),
        ("reference", 16, 18),
        ("reference", 16, 20),
    ];
    let (results, _) = click(&out, id, 33, &cells);
    // At 33 x 33 a location's neighbours share most of its receptive field, and only its 16
    // largest shares are kept: each peak within a cell of the shifted location, most on it.
    let mut exact = 0;
    for ((side, row, col), got) in cells.iter().zip(&results) {
        let (other, want) = if *side == "query" {
            ("reference", col + 2)
        } else {
            ("query", col - 2)
        };
        let peak = got
            .strip_prefix(&format!("{side}:{row},{col}>{other}:"))
            .unwrap_or_else(|| panic!("{got}: all clicks {results:?}"));
        let (r, c) = peak.split_once(',').unwrap();
        let (r, c): (usize, usize) = (r.parse().unwrap(), c.parse().unwrap());
        assert!(
            r.abs_diff(*row) <= 1 && c.abs_diff(want) <= 1,
            "{got}: all clicks {results:?}"
        );
        exact += usize::from(r == *row && c == want);
    }
    assert!(
        exact >= 3,
        "{exact} of 4 on the shifted location: {results:?}"
    );
}
