//! fam plugin `render`: turns explanations into files a person looks at or a program reads.
//!
//! - `overlay`: one PNG per map, the heatmap (jet by default) blended over the image crop the
//!   model saw (`alpha`, default 0.5);
//! - `panel`: one PNG per comparison: both images, both maps, the score and the setup; for
//!   `fam-cli eval`, `eval-curves.png` with the mean deletion and insertion curves;
//! - `npy`: raw maps (`h x w`, before upsampling) and upsampled maps (`H x W`) as `.npy`;
//! - `scores`: `scores.json` with every comparison's score and the files of its maps;
//! - `html`: `index.html`, a report page with every panel, the scores and the ranking, and
//!   links to the raw maps (runs after the others).

pub mod compare;
mod curves;
mod draw;
pub mod html;
pub mod page;

use fam_core::explain::{Comparison, Explanation, SaliencyMap, Side};
use fam_core::options::serde::de::Error as _;
use fam_core::options::serde::{Deserialize, Deserializer};
use fam_core::options::{self, NoOptions};
use fam_core::output::{npy_f32, OutputSink};
use fam_core::plugin::{Options, Registrar};
use fam_core::records::{document_bytes, ScoredComparison, ScoredSide, ScoresDocument};
use fam_core::{FamError, Problem, Renderer, Result};

use draw::Canvas;
pub use draw::Colormap;

fam_core::export_plugin!(name: "render", register: register);

/// Registers the renderers. Each checks its options with the struct it is built from
/// ([`OverlayOptions`], [`html::HtmlOptions`], or [`NoOptions`]).
pub fn register(r: &mut Registrar) {
    r.renderer(
        "overlay",
        "heatmap over the image, one PNG per map (options: colormap, alpha)",
        |o| options::check(o, "", check_overlay),
        |o| Ok(Box::new(Overlay::from_options(o)?)),
    );
    r.renderer(
        "panel",
        "one PNG per comparison: both images, both maps, the score (options: colormap, alpha)",
        |o| options::check(o, "", check_overlay),
        |o| Ok(Box::new(Panel(Overlay::from_options(o)?))),
    );
    r.renderer(
        "npy",
        "raw (h x w) and upsampled (H x W) maps, and the correspondence of two images (h x w x h x w), as .npy files",
        no_options,
        |o| {
            options::load::<NoOptions>(o, "", |_| vec![])?;
            Ok(Box::new(Npy))
        },
    );
    r.renderer(
        "html",
        "index.html: every panel and overlay, the scores and ranking, links to the raw maps (option: title)",
        |o| options::check::<html::HtmlOptions>(o, "", |_| vec![]),
        |o| Ok(Box::new(html::Html::from_options(o)?)),
    );
    r.renderer(
        "scores",
        "scores.json: every comparison's score, distance and map files",
        no_options,
        |o| {
            options::load::<NoOptions>(o, "", |_| vec![])?;
            Ok(Box::new(Scores))
        },
    );
}

fn no_options(o: &Options) -> Vec<Problem> {
    options::check::<NoOptions>(o, "", |_| vec![])
}

/// Options of `overlay` and `panel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "fam_core::options::serde", deny_unknown_fields)]
pub struct OverlayOptions {
    /// `"jet"` (the default), `"inferno"`, `"viridis"`, `"turbo"` or `"gray"`.
    #[serde(default = "default_colormap", deserialize_with = "colormap")]
    pub colormap: Colormap,
    /// Opacity of the heatmap over the image, from 0 to 1 (default 0.5).
    #[serde(default = "default_alpha")]
    pub alpha: f32,
}

fn default_colormap() -> Colormap {
    Colormap::Jet
}

fn default_alpha() -> f32 {
    0.5
}

fn colormap<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Colormap, D::Error> {
    Colormap::parse(&String::deserialize(d)?).map_err(D::Error::custom)
}

/// What serde cannot check: `alpha` is between 0 and 1.
fn check_overlay(o: &OverlayOptions) -> Vec<Problem> {
    if (0.0..=1.0).contains(&o.alpha) {
        vec![]
    } else {
        vec![Problem::new(
            "alpha",
            format!("{:?} is not a number between 0 and 1", o.alpha),
        )]
    }
}

/// Tags for the two sides of a comparison in file names.
const SIDES: [&str; 2] = ["a", "b"];

fn sides(c: &Comparison) -> [(&'static str, &Side); 2] {
    [(SIDES[0], &c.query), (SIDES[1], &c.reference)]
}

/// Heatmap overlays.
#[derive(Debug, Clone)]
pub struct Overlay {
    pub colormap: Colormap,
    pub alpha: f32,
}

impl Overlay {
    fn from_options(o: &Options) -> Result<Self> {
        let o = options::load::<OverlayOptions>(o, "", check_overlay)?;
        Ok(Self {
            colormap: o.colormap,
            alpha: o.alpha,
        })
    }

    /// The overlay of one side's map on its image.
    pub fn overlay(&self, e: &Explanation, side: &Side) -> Option<Canvas> {
        self.overlay_of(e, side, side.map.as_ref()?)
    }

    /// The overlay of one side's contrast map on its image.
    pub fn contrast_overlay(&self, e: &Explanation, side: &Side) -> Option<Canvas> {
        self.overlay_of(e, side, &side.contrast.as_ref()?.map)
    }

    fn overlay_of(&self, e: &Explanation, side: &Side, map: &SaliencyMap) -> Option<Canvas> {
        let img = &e.images[side.image?];
        Some(Canvas::overlay(
            &img.view,
            &map.upsampled.normalized(),
            self.colormap,
            self.alpha,
        ))
    }
}

/// Each side's maps with their file stems: `<id>_a`, `<id>_b`, and `<id>_a_contrast` where
/// the query side has a contrast map.
fn side_maps(c: &Comparison) -> Vec<(String, &Side, &SaliencyMap)> {
    let mut v = Vec::new();
    for (tag, side) in sides(c) {
        if let Some(m) = &side.map {
            v.push((format!("{}_{tag}", c.id), side, m));
        }
        if let Some(k) = &side.contrast {
            v.push((format!("{}_{tag}_contrast", c.id), side, &k.map));
        }
    }
    v
}

impl Renderer for Overlay {
    fn name(&self) -> String {
        "overlay".into()
    }
    fn render(&self, e: &Explanation, out: &mut dyn OutputSink) -> Result<()> {
        // Images are drawn and encoded in parallel, then written in order.
        use rayon::prelude::*;
        // Files a resumed run already has are kept, not drawn again.
        let jobs: Vec<(String, &Side, &SaliencyMap)> = e
            .comparisons
            .iter()
            .flat_map(side_maps)
            .map(|(stem, side, map)| (format!("overlays/{stem}.png"), side, map))
            .filter(|(name, _, _)| !out.reuse(name))
            .collect();
        let pngs: Vec<(String, Option<Result<Vec<u8>>>)> = jobs
            .into_par_iter()
            .map(|(name, side, map)| (name, self.overlay_of(e, side, map).map(|c| c.png())))
            .collect();
        for (name, png) in pngs {
            if let Some(png) = png {
                out.write(&name, &png?)?;
            }
        }
        Ok(())
    }
}

/// Side-by-side panels.
#[derive(Debug, Clone)]
pub struct Panel(pub Overlay);

impl Renderer for Panel {
    fn name(&self) -> String {
        "panel".into()
    }
    fn render_eval(
        &self,
        report: &fam_core::records::EvalReport,
        out: &mut dyn OutputSink,
    ) -> Result<()> {
        out.write("eval-curves.png", &curves::plot(report)?)?;
        if !report.examples.is_empty() {
            out.write("eval-maps.png", &self.eval_maps(report)?.png()?)?;
        }
        Ok(())
    }
    fn render(&self, e: &Explanation, out: &mut dyn OutputSink) -> Result<()> {
        // Grouped comparisons (a retrieval query and its hits) get one ranking panel.
        let mut groups: Vec<(&str, Vec<&Comparison>)> = Vec::new();
        for c in &e.comparisons {
            match &c.group {
                Some(g) => match groups.iter_mut().find(|(name, _)| name == g) {
                    Some((_, v)) => v.push(c),
                    None => groups.push((g.as_str(), vec![c])),
                },
                None => {
                    let name = format!("panels/{}.png", c.id);
                    if !out.reuse(&name) {
                        out.write(&name, &self.panel(e, c)?.png()?)?;
                    }
                }
            }
        }
        for (name, items) in groups {
            if out.reuse(&format!("panels/{name}.png")) {
                continue;
            }
            // Few-shot queries carry their support images' maps (comparisons without rank).
            let canvas = if items.iter().any(|c| c.rank.is_none()) {
                self.episode(e, name, &items)?
            } else {
                self.ranking(e, name, &items)?
            };
            out.write(&format!("panels/{name}.png"), &canvas.png()?)?;
        }
        Ok(())
    }
}

impl Panel {
    /// The first evaluated items, one row each: the image, then every method's map on it,
    /// in table order (what `fam-cli eval` scored).
    pub fn eval_maps(&self, report: &fam_core::records::EvalReport) -> Result<Canvas> {
        let methods: Vec<&str> = report.summaries.iter().map(|m| m.method.as_str()).collect();
        let first = &report.examples[0].view;
        let k = zoom(first.width);
        let tile = (first.width * k, first.height * k);
        let title = format!("maps scored by fam-cli eval: {}", report.backbone);
        let sub = format!(
            "{}, target: {}; one row per item, one column per method (min-max normalized)",
            report.similarity, report.target
        );
        let (grid, mut canvas) = Grid::new(
            &title,
            &sub,
            1 + methods.len() as u32,
            report.examples.len() as u32,
            tile,
            0,
        );
        for (row, ex) in report.examples.iter().enumerate() {
            let row = row as u32;
            let img = Canvas::from_rgb(&ex.view).scaled(k);
            grid.put(&mut canvas, 0, row, Some(&img), &ex.label);
            for (col, m) in methods.iter().enumerate() {
                let Some((_, map)) = ex.maps.iter().find(|(name, _)| name == m) else {
                    grid.put(&mut canvas, 1 + col as u32, row, None, &format!("{m}: n/a"));
                    continue;
                };
                if map.len() != (ex.view.width * ex.view.height) as usize {
                    return Err(FamError::invalid(format!(
                        "eval map `{m}` of {} values for a {}x{} image",
                        map.len(),
                        ex.view.width,
                        ex.view.height
                    )));
                }
                let t = Canvas::overlay(&ex.view, map, self.0.colormap, self.0.alpha).scaled(k);
                grid.put(&mut canvas, 1 + col as u32, row, Some(&t), m);
            }
        }
        Ok(canvas)
    }

    /// `[A | A's map w.r.t. B | B's map w.r.t. A | B]` with a header and captions.
    pub fn panel(&self, e: &Explanation, c: &Comparison) -> Result<Canvas> {
        let mut tiles: Vec<(Canvas, String)> = Vec::new();
        for (side, other) in [(&c.query, &c.reference), (&c.reference, &c.query)] {
            if let Some(i) = side.image {
                let img = Canvas::from_rgb(&e.images[i].view);
                let over = self.0.overlay(e, side);
                tiles.push((img, side.label.clone()));
                if let Some(o) = over {
                    // An all-zero map is an answer ("nothing here supports the match"): say so.
                    let empty = side.map.as_ref().is_some_and(|m| m.raw.max() <= 0.0);
                    let caption = if empty {
                        "empty map: no support".to_string()
                    } else {
                        format!("map w.r.t. {}", other.label)
                    };
                    tiles.push((o, caption));
                }
            }
        }
        // Order: A, map A, map B, B.
        if tiles.len() == 4 {
            tiles.swap(2, 3);
        }
        let k = zoom(tiles.iter().map(|t| t.0.width).max().unwrap_or(224));
        for t in &mut tiles {
            t.0 = t.0.scaled(k);
        }
        let tile_w = tiles.iter().map(|t| t.0.width).max().unwrap_or(224);
        let tile_h = tiles.iter().map(|t| t.0.height).max().unwrap_or(224);
        let subtitle = format!(
            "FAM ({} weights) at {}; input: {} (maps drawn on the crop the model saw)",
            e.info.weighting, e.info.backbone, e.info.preprocessing
        );
        let score = match c.distance {
            Some(d) => format!("{} {:.4} (distance {:.4})", e.info.similarity, c.score, d),
            None => format!("{} similarity {:.4}", e.info.similarity, c.score),
        };
        let title = format!("{} vs {}: {score}", c.query.label, c.reference.label);
        // One row of tiles, then a colour bar in the space of a second, short row.
        let (grid, mut canvas) = Grid::new(
            &title,
            &subtitle,
            tiles.len() as u32,
            1,
            (tile_w, tile_h),
            20,
        );
        for (i, (tile, label)) in tiles.iter().enumerate() {
            grid.put(&mut canvas, i as u32, 0, Some(tile), label);
        }
        // Colour bar: low to high saliency.
        let bar_y = grid.header + grid.row_h;
        let bar_x = grid.gap;
        let bar_w = 200u32;
        canvas.text(bar_x, bar_y + 2, "low", 1, [80, 80, 80]);
        for dx in 0..bar_w {
            let col = self.0.colormap.color(dx as f32 / (bar_w - 1) as f32);
            for dy in 0..8 {
                canvas.put(bar_x + 32 + dx, bar_y + 2 + dy, col);
            }
        }
        canvas.text(bar_x + 40 + bar_w, bar_y + 2, "high", 1, [80, 80, 80]);
        // Each map is scaled to its own range (upsampled, before normalization): its values.
        let ranges: Vec<String> = [&c.query, &c.reference]
            .iter()
            .filter_map(|s| {
                let m = &s.map.as_ref()?.upsampled;
                let lo = m.data.iter().copied().fold(f32::INFINITY, f32::min);
                Some(format!("{} {:.4} to {:.4}", s.label, lo, m.max()))
            })
            .collect();
        if !ranges.is_empty() {
            canvas.text(
                bar_x + 80 + bar_w,
                bar_y + 2,
                &format!("each map over its own range: {}", ranges.join("; ")),
                1,
                [80, 80, 80],
            );
        }
        Ok(canvas)
    }
}

impl Panel {
    /// One query and its ranked hits: row 1 the query and its map w.r.t. each hit, row 2 the
    /// hits, row 3 each hit's map w.r.t. the query.
    pub fn ranking(&self, e: &Explanation, name: &str, items: &[&Comparison]) -> Result<Canvas> {
        let first = items
            .first()
            .ok_or_else(|| FamError::invalid("empty group"))?;
        let k = zoom(
            first
                .query
                .image
                .map(|i| e.images[i].view.width)
                .unwrap_or(224),
        );
        let tile = |c: Canvas| c.scaled(k);
        let qimg = first
            .query
            .image
            .map(|i| tile(Canvas::from_rgb(&e.images[i].view)));
        let (tile_w, tile_h) = qimg
            .as_ref()
            .map(|c| (c.width, c.height))
            .unwrap_or((224, 224));
        let cols = 1 + items.len() as u32;
        let title = format!("query {name}: top {} by {}", items.len(), e.info.similarity);
        let mut sub = format!(
            "FAM ({} weights) at {}; input: {}",
            e.info.weighting, e.info.backbone, e.info.preprocessing
        );
        let contrast = items.iter().any(|c| c.query.contrast.is_some());
        // Maps of the query that barely depend on the hit explain the query, not each match.
        let query_maps: Vec<&[f32]> = items
            .iter()
            .filter_map(|c| c.query.map.as_ref().map(|m| m.raw.data.as_slice()))
            .collect();
        if let Some(r) = least_correlated(&query_maps) {
            if r > NEAR_IDENTICAL {
                sub.push_str(&format!(
                    ". The query's maps w.r.t. these hits are near-identical (every pair correlates at r >= {r:.2}): they show what the query's match rests on, not which part matched which hit; {}the comparisons' pages (compare/) show the correspondence",
                    if contrast {
                        "the contrast maps (second row: each hit against the others) show what differs; "
                    } else {
                        ""
                    }
                ));
            }
        }
        // Rows: the query's maps, [its contrast maps], the hits, the hits' maps.
        let rows = 3 + contrast as u32;
        let (grid, mut canvas) = Grid::new(&title, &sub, cols, rows, (tile_w, tile_h), 0);
        let put = |canvas: &mut Canvas, col, row, tile: Option<Canvas>, label: String| {
            grid.put(canvas, col, row, tile.as_ref(), &label)
        };
        put(
            &mut canvas,
            0,
            0,
            qimg,
            format!("query {}", first.query.label),
        );
        let (hits_row, hit_maps_row) = (1 + contrast as u32, 2 + contrast as u32);
        if contrast {
            put(
                &mut canvas,
                0,
                1,
                None,
                "contrast: vs the other hits ->".into(),
            );
        }
        put(&mut canvas, 0, hits_row, None, "hits ->".into());
        put(
            &mut canvas,
            0,
            hit_maps_row,
            None,
            "hit maps w.r.t. query".into(),
        );
        for (j, c) in items.iter().enumerate() {
            let col = 1 + j as u32;
            let rank = c.rank.unwrap_or(j + 1);
            put(
                &mut canvas,
                col,
                0,
                self.0.overlay(e, &c.query).map(tile),
                format!("map w.r.t. #{rank}"),
            );
            if contrast {
                put(
                    &mut canvas,
                    col,
                    1,
                    self.0.contrast_overlay(e, &c.query).map(tile),
                    contrast_caption(&c.query, &format!("#{rank}")),
                );
            }
            let himg = c
                .reference
                .image
                .map(|i| tile(Canvas::from_rgb(&e.images[i].view)));
            put(
                &mut canvas,
                col,
                hits_row,
                himg,
                format!("#{rank} {} {}", short_score(c), c.reference.label),
            );
            put(
                &mut canvas,
                col,
                hit_maps_row,
                self.0.overlay(e, &c.reference).map(tile),
                format!("#{rank} map"),
            );
        }
        Ok(canvas)
    }
}

impl Panel {
    /// A few-shot query: row 1 the query and its map w.r.t. each class (prediction first),
    /// then one row per class with its support images' maps w.r.t. the query.
    pub fn episode(&self, e: &Explanation, name: &str, items: &[&Comparison]) -> Result<Canvas> {
        let classes: Vec<&&Comparison> = items.iter().filter(|c| c.rank.is_some()).collect();
        let supports: Vec<&&Comparison> = items.iter().filter(|c| c.rank.is_none()).collect();
        let first = classes
            .first()
            .or(supports.first())
            .ok_or_else(|| FamError::invalid("empty group"))?;
        let w0 = first
            .query
            .image
            .map(|i| e.images[i].view.width)
            .unwrap_or(224);
        let k = zoom(w0);
        let tile = |c: Canvas| c.scaled(k);
        let (tile_w, tile_h) = (
            w0 * k,
            first
                .query
                .image
                .map(|i| e.images[i].view.height)
                .unwrap_or(224)
                * k,
        );
        // Support rows by class: the class is the label's last parenthesised word.
        let class_of = |c: &Comparison| -> String {
            c.query
                .label
                .rsplit('(')
                .next()
                .unwrap_or("")
                .trim_end_matches(')')
                .to_string()
        };
        let mut rows: Vec<(String, Vec<&Comparison>)> = Vec::new();
        for c in &supports {
            let cls = class_of(c);
            match rows.iter_mut().find(|(n, _)| *n == cls) {
                Some((_, v)) => v.push(c),
                None => rows.push((cls, vec![c])),
            }
        }
        let cols = 1 + classes
            .len()
            .max(rows.iter().map(|r| r.1.len()).max().unwrap_or(0)) as u32;
        let pred = classes
            .first()
            .map(|c| format!("predicted {} ({})", c.reference.label, short_score(c)))
            .unwrap_or_default();
        let title = format!("query {name}: {pred}");
        let contrast = classes.iter().any(|c| c.query.contrast.is_some());
        let sub = format!(
            "FAM ({} weights) at {} vs class prototypes{}; rows below: each support image's map w.r.t. the query",
            e.info.weighting,
            e.info.backbone,
            if contrast {
                "; second row: the contrast maps, each class against the others"
            } else {
                ""
            }
        );
        let first_support_row = 1 + contrast as u32;
        let (grid, mut canvas) = Grid::new(
            &title,
            &sub,
            cols,
            first_support_row + rows.len() as u32,
            (tile_w, tile_h),
            0,
        );
        let put = |canvas: &mut Canvas, col, row, t: Option<Canvas>, label: String| {
            grid.put(canvas, col, row, t.as_ref(), &label)
        };
        let qimg = first
            .query
            .image
            .map(|i| tile(Canvas::from_rgb(&e.images[i].view)));
        put(
            &mut canvas,
            0,
            0,
            if classes.is_empty() { None } else { qimg },
            format!("query {name}"),
        );
        for (j, c) in classes.iter().enumerate() {
            let label = format!(
                "#{} {} {}",
                c.rank.unwrap_or(j + 1),
                c.reference.label,
                short_score(c)
            );
            put(
                &mut canvas,
                1 + j as u32,
                0,
                self.0.overlay(e, &c.query).map(tile),
                label,
            );
            if contrast {
                put(
                    &mut canvas,
                    1 + j as u32,
                    1,
                    self.0.contrast_overlay(e, &c.query).map(tile),
                    contrast_caption(&c.query, &c.reference.label),
                );
            }
        }
        if contrast {
            put(
                &mut canvas,
                0,
                1,
                None,
                "contrast: vs the other classes ->".into(),
            );
        }
        for (r, (cls, items)) in rows.iter().enumerate() {
            let row = first_support_row + r as u32;
            put(&mut canvas, 0, row, None, format!("support {cls} ->"));
            for (j, c) in items.iter().enumerate() {
                let empty = c.query.map.as_ref().is_some_and(|m| m.raw.max() <= 0.0);
                let label = format!(
                    "{}{}",
                    short_score(c),
                    if empty { " (empty map)" } else { "" }
                );
                put(
                    &mut canvas,
                    1 + j as u32,
                    row,
                    self.0.overlay(e, &c.query).map(tile),
                    label,
                );
            }
        }
        Ok(canvas)
    }
}

/// A grid of captioned tiles under a title (large) and a subtitle (small), wrapped to fit.
struct Grid {
    gap: u32,
    header: u32,
    row_h: u32,
    tile: (u32, u32),
}

impl Grid {
    /// The layout and a white canvas with the header drawn; `extra` pixels below the rows.
    fn new(
        title: &str,
        sub: &str,
        cols: u32,
        rows: u32,
        tile: (u32, u32),
        extra: u32,
    ) -> (Self, Canvas) {
        let (gap, caption) = (8u32, 14u32);
        let width = (gap + cols * (tile.0 + gap)).max(480);
        let title_lines = wrap_px(title, width - 2 * gap, 2);
        let sub_lines = wrap_px(sub, width - 2 * gap, 1);
        let sub_top = 6 + 20 * title_lines.len() as u32 + 2;
        let header = sub_top + 10 * sub_lines.len() as u32 + 6;
        let row_h = tile.1 + caption + gap;
        let mut canvas = Canvas::new(width, header + rows * row_h + gap + extra, [255, 255, 255]);
        for (i, line) in title_lines.iter().enumerate() {
            canvas.text(gap, 6 + 20 * i as u32, line, 2, [0, 0, 0]);
        }
        for (i, line) in sub_lines.iter().enumerate() {
            canvas.text(gap, sub_top + 10 * i as u32, line, 1, [80, 80, 80]);
        }
        (
            Self {
                gap,
                header,
                row_h,
                tile,
            },
            canvas,
        )
    }

    /// Draws a tile (or leaves the cell empty) with its caption, cut to the tile's width.
    fn put(&self, canvas: &mut Canvas, col: u32, row: u32, tile: Option<&Canvas>, label: &str) {
        let (x, y) = (
            self.gap + col * (self.tile.0 + self.gap),
            self.header + row * self.row_h,
        );
        if let Some(t) = tile {
            canvas.blit(t, x, y);
        }
        // Cut to the tile's width.
        let mut label: String = label.to_string();
        while !label.is_empty() && Canvas::text_width(&label, 1) > self.tile.0 as f32 {
            label.pop();
        }
        canvas.text(x, y + self.tile.1 + 3, &label, 1, [0, 0, 0]);
    }
}

/// The caption of a contrast map: `#2 vs the other 4 hits`, or that it is empty (nothing in
/// the image favours this reference over the others, an answer in itself).
fn contrast_caption(side: &Side, what: &str) -> String {
    match &side.contrast {
        Some(k) if k.map.raw.max() <= 0.0 => format!("{what}: empty (nothing favours it)"),
        Some(k) => format!("{what} vs {}", k.against),
        None => String::new(),
    }
}

/// The number a ranking is made by: the distance where the metric has one (`d=`), else the
/// similarity (`s=`).
fn short_score(c: &Comparison) -> String {
    match c.distance {
        Some(d) => format!("d={d:.2}"),
        None => format!("s={:.3}", c.score),
    }
}

/// Enlargement factor for panel tiles: inputs under 160 px are enlarged to at least 160 px.
fn zoom(tile_width: u32) -> u32 {
    if tile_width < 160 {
        160u32.div_ceil(tile_width.max(1))
    } else {
        1
    }
}

/// Maps whose every pair correlates above this are called near-identical (the three maps
/// of the cat against a cat, a cameraman and a motorcycle in `retrieval-imagenet.toml`
/// correlate at 0.95 to 0.98).
const NEAR_IDENTICAL: f32 = 0.9;

/// The smallest Pearson correlation between any two of `maps` (same length), or `None` for
/// fewer than two (or constant) maps.
fn least_correlated(maps: &[&[f32]]) -> Option<f32> {
    let centred: Vec<Vec<f32>> = maps
        .iter()
        .map(|m| {
            let mean = m.iter().sum::<f32>() / m.len().max(1) as f32;
            m.iter().map(|v| v - mean).collect()
        })
        .collect();
    let mut least: Option<f32> = None;
    for i in 0..centred.len() {
        for j in i + 1..centred.len() {
            let (a, b) = (&centred[i], &centred[j]);
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
            let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
            if a.len() != b.len() || na == 0.0 || nb == 0.0 {
                return None;
            }
            let r = dot / (na * nb);
            least = Some(least.map_or(r, |l: f32| l.min(r)));
        }
    }
    least
}

/// Greedy word wrap to lines at most `width` pixels wide in the panels' font at `scale`.
fn wrap_px(text: &str, width: u32, scale: u32) -> Vec<String> {
    wrap_by(text, width as f32, |s| Canvas::text_width(s, scale))
}

/// Greedy word wrap: lines whose `measure` is at most `width` (a longer word stays whole).
fn wrap_by(text: &str, width: f32, measure: impl Fn(&str) -> f32) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split(' ') {
        let line = lines.last_mut().unwrap();
        if !line.is_empty() && measure(&format!("{line} {word}")) > width {
            lines.push(word.to_string());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

/// Raw and upsampled maps as `.npy`.
#[derive(Debug, Clone, Copy)]
pub struct Npy;

fn write_npy(out: &mut dyn OutputSink, stem: &str, m: &SaliencyMap) -> Result<()> {
    let raw = format!("maps/{stem}_raw.npy");
    if !out.reuse(&raw) {
        out.write(&raw, &npy_f32(&[m.raw.height, m.raw.width], &m.raw.data))?;
    }
    let up = format!("maps/{stem}_up.npy");
    if out.reuse(&up) {
        return Ok(());
    }
    out.write(
        &up,
        &npy_f32(&[m.upsampled.height, m.upsampled.width], &m.upsampled.data),
    )
}

/// A correspondence as `.npy`: `correspondence/<id>.npy`, `[h_q, w_q, h_r, w_r]`, the share
/// of the score of each pair of locations; or, kept as top shares, per side (`query`,
/// `reference`) `<id>_top_<side>_index.npy` (u32 `[h, w, k]`: the other image's locations,
/// row-major, largest share first), `_share.npy` (f32 `[h, w, k]`) and `_total.npy` (f32
/// `[h, w]`: each location's whole share).
fn write_correspondence(
    out: &mut dyn OutputSink,
    id: &str,
    k: &fam_core::records::Correspondence,
) -> Result<()> {
    let (q, r) = (k.query_size, k.reference_size);
    let Some(top) = &k.top else {
        let name = format!("correspondence/{id}.npy");
        if !out.reuse(&name) {
            out.write(&name, &npy_f32(&[q.0, q.1, r.0, r.1], &k.pairs))?;
        }
        return Ok(());
    };
    for (side, size, shares) in [("query", q, &top.query), ("reference", r, &top.reference)] {
        let stem = format!("correspondence/{id}_top_{side}");
        let files = [
            (
                format!("{stem}_index.npy"),
                fam_core::output::npy_u32(&[size.0, size.1, top.k], &shares.index),
            ),
            (
                format!("{stem}_share.npy"),
                npy_f32(&[size.0, size.1, top.k], &shares.share),
            ),
            (
                format!("{stem}_total.npy"),
                npy_f32(&[size.0, size.1], &shares.total),
            ),
        ];
        for (name, bytes) in files {
            if !out.reuse(&name) {
                out.write(&name, &bytes)?;
            }
        }
    }
    Ok(())
}

impl Renderer for Npy {
    fn name(&self) -> String {
        "npy".into()
    }
    fn render(&self, e: &Explanation, out: &mut dyn OutputSink) -> Result<()> {
        for c in &e.comparisons {
            for (stem, _, m) in side_maps(c) {
                write_npy(out, &stem, m)?;
            }
            if let Some(k) = &c.correspondence {
                write_correspondence(out, &c.id, k)?;
            }
        }
        Ok(())
    }
}

/// `scores.json`.
#[derive(Debug, Clone, Copy)]
pub struct Scores;

impl Renderer for Scores {
    fn name(&self) -> String {
        "scores".into()
    }
    fn render(&self, e: &Explanation, out: &mut dyn OutputSink) -> Result<()> {
        let side = |s: &Side| ScoredSide {
            label: s.label.clone(),
            image: s.image.map(|i| e.images[i].source.display().to_string()),
            map_peak: s.map.as_ref().map(|m| m.raw.max()),
        };
        let doc = ScoresDocument {
            info: e.info.clone(),
            comparisons: e
                .comparisons
                .iter()
                .map(|c| ScoredComparison {
                    id: c.id.clone(),
                    query: side(&c.query),
                    reference: side(&c.reference),
                    score: c.score,
                    distance: c.distance,
                })
                .collect(),
        };
        out.write("scores.json", &document_bytes(&doc)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_breaks_between_words() {
        let chars = |s: &str| s.chars().count() as f32;
        assert_eq!(wrap_by("aa bb cc", 5.0, chars), vec!["aa bb", "cc"]);
        assert_eq!(wrap_by("aaaaaaa b", 3.0, chars), vec!["aaaaaaa", "b"]);
        // In the panels' font a line fits the pixels it is given.
        for line in wrap_px(
            "query astronaut_recropped: top 3 by cosine similarity",
            200,
            2,
        ) {
            assert!(
                Canvas::text_width(&line, 2) <= 200.0 || !line.contains(' '),
                "{line}"
            );
        }
    }

    #[test]
    fn near_identical_maps_are_found() {
        let a = [0.0, 1.0, 2.0, 3.0];
        let b = [0.1, 1.1, 2.0, 3.2];
        let c = [3.0, 0.0, 1.0, 0.0];
        assert!(least_correlated(&[&a, &b]).unwrap() > NEAR_IDENTICAL);
        assert!(least_correlated(&[&a, &b, &c]).unwrap() < 0.0);
        assert_eq!(least_correlated(&[&a]), None);
        assert_eq!(least_correlated(&[&a, &[1.0; 4]]), None);
    }

    #[test]
    fn options_are_checked() {
        let mut o = Options::new();
        o.insert("alpha".into(), 1.5.into());
        o.insert("colormp".into(), "jet".into());
        o.insert("colormap".into(), "rainbow".into());
        let problems = options::check::<OverlayOptions>(&o, "", check_overlay);
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 3, "{text:?}");
        assert!(
            text.iter().any(|t| t.contains("did you mean `colormap`")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("1.5 is not a number between 0 and 1")),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.contains("rainbow")), "{text:?}");
        // `create` builds from the same struct: the same problems, as one error.
        let err = Overlay::from_options(&o).unwrap_err().to_string();
        assert!(
            err.contains("alpha: 1.5 is not a number between 0 and 1"),
            "{err}"
        );
    }

    #[test]
    fn renderers_are_built_from_their_options() {
        let mut o = Options::new();
        o.insert("colormap".into(), "grey".into());
        o.insert("alpha".into(), 1.into());
        let overlay = Overlay::from_options(&o).unwrap();
        assert_eq!((overlay.colormap, overlay.alpha), (Colormap::Gray, 1.0));
        let overlay = Overlay::from_options(&Options::new()).unwrap();
        assert_eq!((overlay.colormap, overlay.alpha), (Colormap::Jet, 0.5));
        let mut r = Registrar::new();
        register(&mut r);
        let r = r.finish().unwrap();
        let html = r.renderers.iter().find(|e| e.kind == "html").unwrap();
        let mut t = Options::new();
        t.insert("title".into(), 3.into());
        let problems = html.validate(&t);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "title");
        assert!(
            problems[0].message.contains("expected a string"),
            "{problems:?}"
        );
        let npy = r.renderers.iter().find(|e| e.kind == "npy").unwrap();
        let problems = npy.validate(&o);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(npy.create(&o).is_err());
        assert!(npy.create(&Options::new()).is_ok());
    }
}
