//! `compare/<id>.html`: one comparison's own page, self-contained (images, maps and data
//! inline; no network, no external script). Both images with their FAM maps, the score, and
//! where the comparison has a correspondence, "which part matches which": click (or move
//! over) a location of one image and the other image shows how much each of its locations
//! shares of the score with it, both ways. A location can be linked: `<id>.html#query=3,4`
//! opens with row 3, column 4 of the query chosen (a click writes it into the address).

use std::fmt::Write as _;

use base64::Engine as _;
use fam_core::explain::{Comparison, Explanation, Side};
use fam_core::Result;

use crate::draw::{Canvas, Colormap};
use crate::page::esc;

fn data_uri(png: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

/// Little-endian u32 values, base64.
fn indices(v: &[u32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Little-endian f32 values, base64.
fn floats(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}\
.sides{display:flex;gap:2em;flex-wrap:wrap}.side{display:flex;flex-direction:column;gap:.5em}\
.stack{position:relative;width:320px;height:320px;cursor:crosshair}\
.stack img,.stack canvas{position:absolute;left:0;top:0;width:320px;height:320px;image-rendering:auto}\
.maprow{display:flex;gap:8px}.maps{width:156px}.maps img{width:156px;height:156px;border:1px solid #ddd}\
.note{color:#555;font-size:.9em;max-width:60em}";

/// The page of one comparison, or `None` when neither side is an image.
pub fn page(e: &Explanation, c: &Comparison, colormap: Colormap) -> Result<Option<String>> {
    let image = |s: &Side| s.image.map(|i| &e.images[i]);
    if image(&c.query).is_none() && image(&c.reference).is_none() {
        return Ok(None);
    }
    let mut h = String::new();
    let title = format!("{} vs {}", c.query.label, c.reference.label);
    let score = match c.distance {
        Some(d) => format!("{} {:.4} (distance {:.4})", e.info.similarity, c.score, d),
        None => format!("{} similarity {:.4}", e.info.similarity, c.score),
    };
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{t}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<p><a href=\"../index.html\">← the run</a></p>\n<h1>{t}</h1>\n<p>{s}; FAM ({w} weights) at {b}; input: {p}</p>\n",
        t = esc(&title),
        s = esc(&score),
        w = esc(&e.info.weighting),
        b = esc(&e.info.backbone),
        p = esc(&e.info.preprocessing),
    );
    h.push_str("<div class=\"sides\">\n");
    for (key, side, other) in [
        ("query", &c.query, &c.reference),
        ("reference", &c.reference, &c.query),
    ] {
        let _ = write!(h, "<div class=\"side\"><b>{}</b>", esc(&side.label));
        match image(side) {
            Some(img) => {
                let png = Canvas::from_rgb(&img.view).png()?;
                let _ = write!(
                    h,
                    "<div class=\"stack\" id=\"{key}\"><img src=\"{}\" alt=\"{}\"><canvas id=\"{key}-overlay\" width=\"{w}\" height=\"{hh}\"></canvas></div>",
                    data_uri(&png),
                    esc(&side.label),
                    w = img.view.width,
                    hh = img.view.height,
                );
                let mut maps = Vec::new();
                if let Some(m) = &side.map {
                    maps.push((m, format!("FAM map w.r.t. {}", other.label)));
                }
                if let Some(k) = &side.contrast {
                    maps.push((
                        &k.map,
                        format!("contrast map: {} vs {}", other.label, k.against),
                    ));
                }
                h.push_str("<div class=\"maprow\">");
                for (m, caption) in maps {
                    let over = Canvas::overlay(&img.view, &m.upsampled.normalized(), colormap, 0.5)
                        .png()?;
                    let _ = write!(
                        h,
                        "<div class=\"maps\"><img src=\"{}\" alt=\"{c}\"><br><small>{c}</small></div>",
                        data_uri(&over),
                        c = esc(&caption)
                    );
                }
                h.push_str("</div>");
            }
            None => h.push_str("<p class=\"note\">not an image (a prototype or a centroid)</p>"),
        }
        h.push_str("</div>\n");
    }
    h.push_str("</div>\n");
    match &c.correspondence {
        Some(k) => {
            let kept = match &k.top {
                Some(t) => format!(
                    "; a map this large keeps each location's {} largest shares, the rest drawn as 0",
                    t.k
                ),
                None => String::new(),
            };
            let _ = write!(
                h,
                "<h2>Which part matches which</h2>\n<p class=\"note\">Click or move over a location of either image: the other image shows each of its locations' share of the score with it (the exact split of the score over pairs of feature-map locations, {}x{} against {}x{}{kept}; red: the largest, nothing drawn at or below 0). The white square marks the chosen location.</p>\n<p><label>show <select id=\"mode\"><option value=\"relative\">relative: the pair's share over the other location's whole share</option><option value=\"raw\">raw: the pair's share of the score</option></select></label></p>\n<p id=\"readout\" class=\"note\">no location chosen</p>\n",
                k.query_size.0, k.query_size.1, k.reference_size.0, k.reference_size.1
            );
            let data = match &k.top {
                None => format!("\"pairs\":\"{}\"", floats(&k.pairs)),
                Some(t) => format!(
                    "\"top\":{{\"k\":{},\"qi\":\"{}\",\"qs\":\"{}\",\"qt\":\"{}\",\"ri\":\"{}\",\"rs\":\"{}\",\"rt\":\"{}\"}}",
                    t.k,
                    indices(&t.query.index),
                    floats(&t.query.share),
                    floats(&t.query.total),
                    indices(&t.reference.index),
                    floats(&t.reference.share),
                    floats(&t.reference.total)
                ),
            };
            let _ = write!(
                h,
                "<script type=\"application/json\" id=\"fam-correspondence\">{{\"query\":[{},{}],\"reference\":[{},{}],{data}}}</script>\n",
                k.query_size.0, k.query_size.1, k.reference_size.0, k.reference_size.1,
            );
            h.push_str(SCRIPT);
        }
        None => h.push_str(
            "<p class=\"note\">No correspondence for this comparison: it needs two images whose maps explain their plain similarity, and a metric that splits over pairs of locations (cosine, Euclidean).</p>\n",
        ),
    }
    h.push_str("</body>\n</html>\n");
    Ok(Some(h))
}

/// The page's viewer. `select(side, cell)` draws the other side's shares with `cell`; it
/// records the choice and the other side's peak on `<body>` (`data-selected`, `data-peak`:
/// `side:row,col`), which the browser test reads.
const SCRIPT: &str = r#"<script>
(() => {
  const d = JSON.parse(document.getElementById('fam-correspondence').textContent);
  const bytes = b64 => {
    const bin = atob(b64), buf = new ArrayBuffer(bin.length), u8 = new Uint8Array(buf);
    for (let i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
    return buf;
  };
  const f32 = b64 => new Float32Array(bytes(b64)), u32 = b64 => new Uint32Array(bytes(b64));
  const size = {query: d.query, reference: d.reference};
  const nq = d.query[0] * d.query[1], nr = d.reference[0] * d.reference[1];
  // Raw: the pair's share of the score. Relative (the default): that share over the other
  // location's whole share (its row or column sum), so that locations which share much
  // with every location do not win every choice; 0 where that whole share is <= 0.
  let rowSum, colSum, raw;
  if (d.top) {
    // Each location's k largest shares, the rest 0; the whole shares are exact.
    const t = d.top, k = t.k;
    const kept = {query: [u32(t.qi), f32(t.qs), nr], reference: [u32(t.ri), f32(t.rs), nq]};
    rowSum = Array.from(f32(t.qt));
    colSum = Array.from(f32(t.rt));
    raw = (side, cell) => {
      const [index, share, n] = kept[side], out = new Array(n).fill(0);
      for (let s = cell * k; s < (cell + 1) * k; s++) out[index[s]] = share[s];
      return out;
    };
  } else {
    const P = f32(d.pairs);
    rowSum = Array.from({length: nq}, (_, i) => P.slice(i * nr, (i + 1) * nr).reduce((a, b) => a + b, 0));
    colSum = Array.from({length: nr}, (_, j) => { let s = 0; for (let i = 0; i < nq; i++) s += P[i * nr + j]; return s; });
    raw = (side, cell) => side === 'query'
      ? Array.from({length: nr}, (_, j) => P[cell * nr + j])
      : Array.from({length: nq}, (_, i) => P[i * nr + cell]);
  }
  const relative = (side, cell) => raw(side, cell).map((v, k) => {
    const whole = side === 'query' ? colSum[k] : rowSum[k];
    return whole > 0 ? v / whole : 0;
  });
  const mode = () => (document.getElementById('mode') || {}).value || 'relative';
  const shares = (side, cell) => mode() === 'raw' ? raw(side, cell) : relative(side, cell);
  let last = null;
  const jet = v => [1.5 - Math.abs(4 * v - 3), 1.5 - Math.abs(4 * v - 2), 1.5 - Math.abs(4 * v - 1)]
    .map(x => Math.round(255 * Math.min(1, Math.max(0, x))));
  function draw(side, values, mark) {
    const [h, w] = size[side];
    const c = document.getElementById(side + '-overlay'), g = c.getContext('2d');
    g.clearRect(0, 0, c.width, c.height);
    if (values) {
      // Colours run from the smallest positive value to the largest.
      const pos = values.filter(v => v > 0), top = Math.max(0, ...pos), low = pos.length > 1 ? Math.min(...pos) : 0;
      const small = document.createElement('canvas');
      small.width = w; small.height = h;
      const s = small.getContext('2d'), img = s.createImageData(w, h);
      values.forEach((v, k) => {
        const t = v > 0 && top > low ? (v - low) / (top - low) : (v > 0 ? 1 : 0), [r, gg, b] = jet(t);
        img.data.set([r, gg, b, v > 0 ? Math.round(40 + 170 * t) : 0], 4 * k);
      });
      s.putImageData(img, 0, 0);
      g.imageSmoothingEnabled = true;
      g.drawImage(small, 0, 0, c.width, c.height);
    }
    if (mark !== undefined) {
      const cw = c.width / w, ch = c.height / h;
      g.strokeStyle = 'white'; g.lineWidth = Math.max(2, c.width / 112);
      g.strokeRect((mark % w) * cw, Math.floor(mark / w) * ch, cw, ch);
    }
  }
  function select(side, cell) {
    last = [side, cell];
    const other = side === 'query' ? 'reference' : 'query';
    const v = shares(side, cell);
    let peak = 0;
    v.forEach((x, k) => { if (x > v[peak]) peak = k; });
    draw(side, null, cell);
    draw(other, v);
    const rc = (s, k) => `${s}:${Math.floor(k / size[s][1])},${k % size[s][1]}`;
    document.body.dataset.selected = rc(side, cell);
    document.body.dataset.peak = rc(other, peak);
    const r = raw(side, cell), total = side === 'query' ? rowSum[cell] : colSum[cell];
    document.getElementById('readout').textContent =
      `${rc(side, cell)}: its share of the score ${total.toFixed(4)}; ${mode()} peak at ${rc(other, peak)} (pair share ${r[peak].toFixed(4)})`;
  }
  const m = document.getElementById('mode');
  if (m) m.addEventListener('change', () => { if (last) select(...last); });
  for (const side of ['query', 'reference']) {
    const el = document.getElementById(side);
    if (!el) continue;
    const pick = ev => {
      const r = el.getBoundingClientRect(), [h, w] = size[side];
      const col = Math.min(w - 1, Math.max(0, Math.floor((ev.clientX - r.left) / r.width * w)));
      const row = Math.min(h - 1, Math.max(0, Math.floor((ev.clientY - r.top) / r.height * h)));
      select(side, row * w + col);
      return [row, col];
    };
    // A click also names the location in the address (`#query=3,4`), to link or reload.
    el.addEventListener('click', ev => {
      const [row, col] = pick(ev);
      history.replaceState(null, '', `#${side}=${row},${col}`);
    });
    el.addEventListener('mousemove', pick);
  }
  const fromAddress = () => {
    const m = /^#(query|reference)=(\d+),(\d+)$/.exec(location.hash);
    if (!m) return;
    const [h, w] = size[m[1]], row = +m[2], col = +m[3];
    if (row < h && col < w) select(m[1], row * w + col);
  };
  window.addEventListener('hashchange', fromAddress);
  fromAddress();
  window.famSelect = select;
  document.body.dataset.ready = '1';
})();
</script>
"#;
