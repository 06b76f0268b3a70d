//! The HTML report page, `index.html`: the setup, every panel, every comparison's score
//! (grouped and ranked for retrieval and episodes), thumbnails of the overlays and links to
//! the raw maps and JSON files. The `html` renderer (plugin `render`) writes it after the
//! other renderers; `fam-cli merge` writes it again for the merged folder from the data each
//! shard's page embeds, so a merged run has the page a single run would have.

use std::fmt::Write as _;

#[cfg(test)]
use fam_core::error::{FamError, Result};
use fam_core::records::{ReportData, ReportRow};

/// The data embedded in a page [`page`] wrote (for tests: `fam-cli merge` builds the merged
/// page from the runs' manifests, never from their pages).
#[cfg(test)]
fn data_from_page(html: &str) -> Result<ReportData> {
    let json = html
        .split(DATA_OPEN)
        .nth(1)
        .and_then(|rest| rest.split("</script>").next())
        .ok_or_else(|| FamError::invalid("not a fam report page: no embedded data"))?;
    serde_json::from_str(json)
        .map_err(|e| FamError::invalid(format!("fam report page: bad embedded data: {e}")))
}

const DATA_OPEN: &str = "<script type=\"application/json\" id=\"fam-report-data\">";

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}\
h1{margin-bottom:.2em}table{border-collapse:collapse;margin:1em 0}\
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}\
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #ddd}\
figcaption{font-size:.9em;color:#555}.thumb{height:96px;margin-right:4px}\
nav a{margin-right:1em}";

/// The files of a comparison: those whose name starts with its id, under `folder/`.
fn files_of<'a>(files: &'a [String], folder: &str, id: &str) -> Vec<&'a str> {
    let prefix = format!("{folder}/{id}_");
    let exact = format!("{folder}/{id}.");
    files
        .iter()
        .filter(|f| f.starts_with(&prefix) || f.starts_with(&exact))
        .map(String::as_str)
        .collect()
}

fn stem(path: &str) -> &str {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.rsplit_once('.').map(|(s, _)| s).unwrap_or(name)
}

/// The report page.
pub fn page(data: &ReportData, files: &[String]) -> String {
    // Sorted, so the page does not depend on the order renderers (or shards) wrote files.
    let mut files: Vec<String> = files.to_vec();
    files.sort();
    let files = files.as_slice();
    let title = &data.title;
    let rows = &data.comparisons;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{t}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{t}</h1>\n",
        t = esc(title)
    );
    let panels: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("panels/") && f.ends_with(".png"))
        .collect();
    h.push_str("<nav><a href=\"#setup\">Setup</a>");
    if !panels.is_empty() {
        h.push_str("<a href=\"#panels\">Panels</a>");
    }
    h.push_str("<a href=\"#comparisons\">Comparisons</a></nav>\n");

    // The setup.
    let i = &data.info;
    let _ = write!(
        h,
        "<h2 id=\"setup\">Setup</h2>\n<table class=\"info\">\n<tr><th>task</th><td>{}</td></tr>\n<tr><th>backbone</th><td>{}</td></tr>\n<tr><th>similarity</th><td>{}</td></tr>\n<tr><th>weighting</th><td>{}</td></tr>\n<tr><th>preprocessing</th><td>{}</td></tr>\n<tr><th>comparisons</th><td class=\"num\">{}</td></tr>\n</table>\n",
        esc(&i.task),
        esc(&i.backbone),
        esc(&i.similarity),
        esc(&i.weighting),
        esc(&i.preprocessing),
        rows.len()
    );
    let documents: Vec<&String> = files
        .iter()
        .filter(|f| !f.contains('/') && f.ends_with(".json"))
        .collect();
    h.push_str("<p>Data: ");
    for f in &documents {
        let _ = write!(h, "<a href=\"{0}\">{0}</a>, ", esc(f));
    }
    h.push_str("<a href=\"manifest.json\">manifest.json</a> (every file, failures, timings)</p>\n");

    // Every panel.
    if !panels.is_empty() {
        h.push_str("<h2 id=\"panels\">Panels</h2>\n");
        for p in &panels {
            let s = stem(p);
            let scores: Vec<String> = rows
                .iter()
                .filter(|c| c.id == s || c.group.as_deref() == Some(s))
                .map(|c| format!("{} {:.3}", c.reference, c.score))
                .collect();
            let _ = writeln!(
                h,
                "<figure class=\"panel\" id=\"panel-{id}\"><a href=\"{src}\"><img src=\"{src}\" alt=\"panel {id}\" loading=\"eager\"></a><figcaption>{id}{sep}{scores}</figcaption></figure>",
                id = esc(s),
                src = esc(p),
                sep = if scores.is_empty() { "" } else { ": " },
                scores = esc(&scores.join(", ")),
            );
        }
    }

    // Every comparison, by group in rank order (retrieval queries, few-shot queries).
    h.push_str("<h2 id=\"comparisons\">Comparisons</h2>\n");
    h.push_str("<p id=\"controls\"><label>score at least <input id=\"min-score\" type=\"number\" step=\"any\"></label> <label>order <select id=\"order\"><option value=\"page\">as run (rank)</option><option value=\"desc\">score, highest first</option><option value=\"asc\">score, lowest first</option></select></label> <span id=\"shown\"></span></p>\n");
    let mut groups: Vec<(Option<&str>, Vec<&ReportRow>)> = Vec::new();
    for c in rows {
        match groups.iter_mut().find(|(g, _)| *g == c.group.as_deref()) {
            Some((_, v)) => v.push(c),
            None => groups.push((c.group.as_deref(), vec![c])),
        }
    }
    let has_distance = rows.iter().any(|c| c.distance.is_some());
    let has_rank = rows.iter().any(|c| c.rank.is_some());
    let opt_cell = |show: bool, v: String| {
        if show {
            format!("<td class=\"num\">{v}</td>")
        } else {
            String::new()
        }
    };
    for (group, mut items) in groups {
        items.sort_by_key(|c| c.rank.unwrap_or(usize::MAX));
        if let Some(g) = group {
            let _ = writeln!(h, "<h3>{}</h3>", esc(g));
        }
        let _ = write!(
            h,
            "<table class=\"comparisons\">\n<tr>{}<th>comparison</th><th>explained</th><th>reference</th><th>score</th>{}<th>overlays</th><th>maps</th></tr>\n",
            if has_rank { "<th>rank</th>" } else { "" },
            if has_distance { "<th>distance</th>" } else { "" }
        );
        for c in items {
            let overlays: String = files_of(files, "overlays", &c.id)
                .iter()
                .map(|f| {
                    format!(
                        "<a href=\"{0}\"><img class=\"thumb\" src=\"{0}\" alt=\"{1}\"></a>",
                        esc(f),
                        esc(stem(f))
                    )
                })
                .collect();
            let mut maps: Vec<String> = files_of(files, "maps", &c.id)
                .iter()
                .map(|f| {
                    let s = stem(f);
                    let label = s.strip_prefix(&format!("{}_", c.id)).unwrap_or(s);
                    format!("<a href=\"{}\">{}.npy</a>", esc(f), esc(label))
                })
                .collect();
            for f in files_of(files, "correspondence", &c.id) {
                // `<id>.npy`, or the top shares' `<id>_top_query_index.npy`, ...
                let s = stem(f);
                let part = s.strip_prefix(&format!("{}_", c.id)).unwrap_or("");
                let label = if part.is_empty() {
                    "correspondence".to_string()
                } else {
                    format!("correspondence_{part}")
                };
                maps.push(format!("<a href=\"{}\">{}.npy</a>", esc(f), esc(&label)));
            }
            // The comparison's own page, where the html renderer wrote one.
            let name = match files_of(files, "compare", &c.id).first() {
                Some(f) => format!("<a href=\"{}\">{}</a>", esc(f), esc(&c.id)),
                None => esc(&c.id),
            };
            let _ = writeln!(
                h,
                "<tr data-score=\"{}\">{}<td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{:.4}</td>{}<td>{}</td><td>{}</td></tr>",
                c.score,
                opt_cell(has_rank, c.rank.map(|r| r.to_string()).unwrap_or_default()),
                name,
                esc(&c.query),
                esc(&c.reference),
                c.score,
                opt_cell(
                    has_distance,
                    c.distance.map(|d| format!("{d:.4}")).unwrap_or_default()
                ),
                overlays,
                maps.join("<br>")
            );
        }
        h.push_str("</table>\n");
    }
    // The data, for `fam-cli merge` (`<` escaped so no string can end the script).
    let json = serde_json::to_string(data)
        .unwrap_or_default()
        .replace('<', "\\u003c");
    let _ = writeln!(h, "{DATA_OPEN}{json}</script>");
    // Marks the page once every image has loaded (or failed), for the browser test.
    h.push_str("<script>addEventListener('load',()=>{const i=[...document.images];document.body.dataset.images=i.length;document.body.dataset.broken=i.filter(x=>!x.naturalWidth).length;});</script>\n");
    h.push_str(CONTROLS);
    h.push_str("</body>\n</html>\n");
    h
}

/// Filters the comparison rows by score and orders them, within each table; the number
/// shown is also `data-count` of `#shown`.
const CONTROLS: &str = r#"<script>
(() => {
  const tables = [...document.querySelectorAll('table.comparisons')];
  tables.forEach(t => [...t.querySelectorAll('tr[data-score]')].forEach((r, i) => r.dataset.order = i));
  function update() {
    const min = parseFloat(document.getElementById('min-score').value);
    const order = document.getElementById('order').value;
    let shown = 0;
    for (const t of tables) {
      const rows = [...t.querySelectorAll('tr[data-score]')];
      const key = r => order === 'page' ? +r.dataset.order : (order === 'desc' ? -1 : 1) * +r.dataset.score;
      rows.sort((a, b) => key(a) - key(b)).forEach(r => {
        const keep = isNaN(min) || +r.dataset.score >= min;
        r.style.display = keep ? '' : 'none';
        shown += keep ? 1 : 0;
        r.parentNode.appendChild(r);
      });
    }
    const label = document.getElementById('shown');
    label.dataset.count = shown;
    label.textContent = `${shown} shown`;
  }
  document.getElementById('min-score').addEventListener('input', update);
  document.getElementById('order').addEventListener('change', update);
  update();
})();
</script>
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use fam_core::explain::RunInfo;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn the_page_embeds_its_data() {
        let data = ReportData {
            title: "t <script>".into(),
            info: RunInfo {
                task: "pair".into(),
                backbone: "b".into(),
                similarity: "cosine".into(),
                weighting: "contribution".into(),
                preprocessing: "p".into(),
            },
            comparisons: vec![ReportRow {
                id: "pair-01_a_vs_b".into(),
                query: "a</script>".into(),
                reference: "b".into(),
                score: 0.123_456_79,
                distance: None,
                group: None,
                rank: None,
            }],
        };
        let html = page(&data, &["panels/pair-01_a_vs_b.png".into()]);
        assert_eq!(data_from_page(&html).unwrap(), data);
        assert!(html.contains("<td class=\"num\">0.1235</td>"));
        assert!(!html.contains("a</script>"));
    }

    #[test]
    fn files_of_a_comparison_match_its_id_only() {
        let files: Vec<String> = [
            "overlays/pair-01_a_vs_b_a.png",
            "overlays/pair-01_a_vs_b_b.png",
            "overlays/pair-01_a_vs_bc_a.png",
            "panels/pair-01_a_vs_b.png",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            files_of(&files, "overlays", "pair-01_a_vs_b"),
            vec![
                "overlays/pair-01_a_vs_b_a.png",
                "overlays/pair-01_a_vs_b_b.png"
            ]
        );
        assert_eq!(
            files_of(&files, "panels", "pair-01_a_vs_b"),
            vec!["panels/pair-01_a_vs_b.png"]
        );
    }
}
