//! The plot of `fam-cli eval`'s mean deletion and insertion curves (`eval-curves.png`),
//! drawn with `plotters`: four charts (deletion and insertion, as a share of the score and
//! rescaled between the removed and the unmodified image), each method's mean curve with its
//! pointwise 95% bootstrap band, and a legend with every area's mean and interval.

use fam_core::records::{CurveEstimate, Estimate, EvalReport, MethodSummary};
use fam_core::{FamError, Result};
use plotters::prelude::*;

use crate::draw::Canvas;

/// Line colours, one per method in table order (FAM first, in red): matplotlib's tab10
/// and two more, so that the twelve methods a few-shot eval can have all differ.
const COLORS: [RGBColor; 12] = [
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
    RGBColor(255, 215, 0),
];

const INK: [u8; 3] = [20, 20, 20];
const FAINT: [u8; 3] = [90, 90, 90];
const GRID: RGBColor = RGBColor(228, 228, 228);
const AXIS: RGBColor = RGBColor(40, 40, 40);

fn plot_error(e: impl std::fmt::Display) -> FamError {
    FamError::invalid(format!("drawing eval-curves.png: {e}"))
}

/// One chart: its title, axis names and the curve of each method it shows.
struct Chart {
    title: &'static str,
    x: &'static str,
    y: &'static str,
    curve: fn(&MethodSummary) -> &CurveEstimate,
}

const CHARTS: [Chart; 4] = [
    Chart {
        title: "deletion (lower is better)",
        x: "fraction of pixels removed",
        y: "score / original score",
        curve: |m| &m.deletion_curve,
    },
    Chart {
        title: "insertion (higher is better)",
        x: "fraction of pixels shown",
        y: "score / original score",
        curve: |m| &m.insertion_curve,
    },
    Chart {
        title: "deletion, rescaled (lower is better)",
        x: "fraction of pixels removed",
        y: "rescaled score: removed image 0, original 1",
        curve: |m| &m.deletion_curve_range,
    },
    Chart {
        title: "insertion, rescaled (higher is better)",
        x: "fraction of pixels shown",
        y: "rescaled score: removed image 0, original 1",
        curve: |m| &m.insertion_curve_range,
    },
];

/// The y range of a chart: every mean curve, widened to the bands where they stay within
/// half the means' span (a band of a few items can be wide; it is then drawn clipped).
fn y_range(report: &EvalReport, curve: fn(&MethodSummary) -> &CurveEstimate) -> (f32, f32) {
    let finite = |v: &&f32| v.is_finite();
    let means = report
        .summaries
        .iter()
        .flat_map(|m| curve(m).mean.iter().filter(finite).copied());
    let (mut lo, mut hi) = means.fold((0f32, 1f32), |(a, b), v| (a.min(v), b.max(v)));
    let pad = 0.5 * (hi - lo);
    let bands = report.summaries.iter().flat_map(|m| {
        curve(m)
            .lo
            .iter()
            .chain(&curve(m).hi)
            .filter(finite)
            .copied()
    });
    for v in bands {
        if v > lo - pad && v < hi + pad {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    ((lo * 10.0).floor() / 10.0, (hi * 10.0).ceil() / 10.0)
}

/// Tick values over `[lo, hi]` at a round step (0.2, 0.5, 1, ...) giving at most 8 ticks.
fn ticks(lo: f32, hi: f32) -> Vec<f32> {
    let span = (hi - lo).max(1e-6);
    let step = [0.1f32, 0.2, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 20.0, 50.0]
        .into_iter()
        .find(|s| span / s <= 7.0)
        .unwrap_or(span / 5.0);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step + 1e-4).floor() as i64;
    (first..=last).map(|k| k as f32 * step).collect()
}

/// `0.420 [0.411, 0.428]`, or `—` where no item is defined.
fn interval(e: &Estimate) -> String {
    if e.n == 0 || !e.mean.is_finite() {
        "—".into()
    } else {
        format!("{:.3} [{:.3}, {:.3}]", e.mean, e.lo, e.hi)
    }
}

/// Where a chart landed, in pixels, for the text drawn around it.
struct Frame {
    left: i32,
    right: i32,
    top: i32,
    bottom: i32,
    /// (value, pixel) of each tick.
    x_ticks: Vec<(f32, i32)>,
    y_ticks: Vec<(f32, i32)>,
}

/// The four charts, two by two, and a legend: a line per method with its colour, its four
/// areas with their 95% intervals, and the items behind its curves. `plotters` draws the
/// charts (grid, axes, bands, curves); the text is the panels' own typesetting
/// ([`Canvas::text_px`], DejaVu Sans), kerned and on a common baseline.
pub fn plot(report: &EvalReport) -> Result<Vec<u8>> {
    let (cw, ch) = (570u32, 390u32);
    let (header, row_h) = (58u32, 21u32);
    let legend_h = row_h * (report.summaries.len() as u32 + 1) + 28;
    let (width, height) = (2 * cw, header + 2 * ch + legend_h);
    let mut buf = vec![255u8; (width * height * 3) as usize];
    let mut frames = Vec::new();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        let (_, rest) = root.split_vertically(header);
        let (grid, _) = rest.split_vertically(2 * ch);
        for (area, chart) in grid.split_evenly((2, 2)).iter().zip(&CHARTS) {
            let (lo, hi) = y_range(report, chart.curve);
            let mut c = ChartBuilder::on(area)
                .margin_top(44)
                .margin_bottom(46)
                .margin_left(58)
                .margin_right(20)
                .build_cartesian_2d(0f32..1f32, lo..hi)
                .map_err(plot_error)?;
            let (xt, yt) = ([0.0f32, 0.25, 0.5, 0.75, 1.0], ticks(lo, hi));
            let grid_lines = xt
                .iter()
                .map(|&x| vec![(x, lo), (x, hi)])
                .chain(yt.iter().map(|&y| vec![(0.0, y), (1.0, y)]));
            for line in grid_lines {
                c.draw_series(LineSeries::new(line, GRID))
                    .map_err(plot_error)?;
            }
            let clip = |v: f32| if v.is_finite() { v.clamp(lo, hi) } else { lo };
            // Bands first, then lines, FAM's last so that it is on top.
            for (mi, m) in report.summaries.iter().enumerate().rev() {
                let curve = (chart.curve)(m);
                let n = curve.mean.len();
                if n < 2 || curve.lo.len() != n || curve.hi.len() != n {
                    continue;
                }
                let x = |k: usize| k as f32 / (n - 1) as f32;
                let band: Vec<(f32, f32)> = (0..n)
                    .map(|k| (x(k), clip(curve.hi[k])))
                    .chain((0..n).rev().map(|k| (x(k), clip(curve.lo[k]))))
                    .collect();
                let color = COLORS[mi % COLORS.len()];
                c.draw_series(std::iter::once(Polygon::new(band, color.mix(0.14))))
                    .map_err(plot_error)?;
            }
            for (mi, m) in report.summaries.iter().enumerate().rev() {
                let curve = (chart.curve)(m);
                let n = curve.mean.len();
                if n < 2 {
                    continue;
                }
                let color = COLORS[mi % COLORS.len()];
                let width = if mi == 0 { 3 } else { 2 };
                c.draw_series(LineSeries::new(
                    (0..n).map(|k| (k as f32 / (n - 1) as f32, clip(curve.mean[k]))),
                    color.stroke_width(width),
                ))
                .map_err(plot_error)?;
            }
            // Axes, with a tick at each grid line.
            c.draw_series(LineSeries::new([(0.0, hi), (0.0, lo), (1.0, lo)], AXIS))
                .map_err(plot_error)?;
            let (tl, br) = (c.backend_coord(&(0.0, hi)), c.backend_coord(&(1.0, lo)));
            frames.push(Frame {
                left: tl.0,
                top: tl.1,
                right: br.0,
                bottom: br.1,
                x_ticks: xt
                    .iter()
                    .map(|&x| (x, c.backend_coord(&(x, lo)).0))
                    .collect(),
                y_ticks: yt
                    .iter()
                    .map(|&y| (y, c.backend_coord(&(0.0, y)).1))
                    .collect(),
            });
        }
        root.present().map_err(plot_error)?;
    }
    let mut canvas = Canvas {
        width,
        height,
        data: buf,
    };
    // The text, around the charts plotters drew.
    let put = |c: &mut Canvas, x: i32, y: i32, t: &str, px: f32, rgb: [u8; 3]| {
        c.text_px(x.max(0) as u32, y.max(0) as u32, t, px, rgb)
    };
    let title = format!(
        "{} | {} | {}",
        report.backbone, report.similarity, report.target
    );
    let sub = format!(
        "removal `{}`, {} steps; each method's mean curve with its pointwise 95% bootstrap band ({} resamples of the items)",
        report.removal, report.steps, report.resamples
    );
    put(&mut canvas, 14, 10, &title, 18.0, INK);
    put(&mut canvas, 14, 36, &sub, 12.5, FAINT);
    let dark = [AXIS.0, AXIS.1, AXIS.2];
    for (f, chart) in frames.iter().zip(&CHARTS) {
        put(&mut canvas, f.left, f.top - 38, chart.title, 14.5, INK);
        put(&mut canvas, f.left, f.top - 18, chart.y, 11.5, FAINT);
        for &(x, px) in &f.x_ticks {
            let t = format!("{x}");
            let w = Canvas::text_width_px(&t, 11.5) as i32;
            canvas.line(
                (px as f32, f.bottom as f32),
                (px as f32, f.bottom as f32 + 4.0),
                1,
                dark,
            );
            put(&mut canvas, px - w / 2, f.bottom + 7, &t, 11.5, INK);
        }
        for &(y, py) in &f.y_ticks {
            let t = format!("{y:.2}");
            let t = t.trim_end_matches('0').trim_end_matches('.');
            let t = if t == "-0" || t.is_empty() { "0" } else { t };
            let w = Canvas::text_width_px(t, 11.5) as i32;
            canvas.line(
                (f.left as f32 - 4.0, py as f32),
                (f.left as f32, py as f32),
                1,
                dark,
            );
            put(&mut canvas, f.left - 8 - w, py - 7, t, 11.5, INK);
        }
        let w = Canvas::text_width_px(chart.x, 12.0) as i32;
        put(
            &mut canvas,
            (f.left + f.right) / 2 - w / 2,
            f.bottom + 24,
            chart.x,
            12.0,
            FAINT,
        );
    }
    // The legend, as a table.
    let top = (header + 2 * ch + 10) as i32;
    let cols = [44i32, 230, 420, 610, 800, 990];
    let head = [
        "method",
        "deletion / s",
        "insertion / s",
        "deletion, rescaled",
        "insertion, rescaled",
        "items (s > 0 / rescaled)",
    ];
    for (x, h) in cols.iter().zip(head) {
        put(&mut canvas, *x, top, h, 12.5, FAINT);
    }
    for (mi, m) in report.summaries.iter().enumerate() {
        let y = top + row_h as i32 * (mi as i32 + 1);
        let color = COLORS[mi % COLORS.len()];
        canvas.rect(
            14,
            (y + 6) as u32,
            22,
            if mi == 0 { 4 } else { 3 },
            [color.0, color.1, color.2],
        );
        let cells = [
            m.method.clone(),
            interval(&m.deletion_auc),
            interval(&m.insertion_auc),
            interval(&m.deletion_auc_range),
            interval(&m.insertion_auc_range),
            format!(
                "{} ({} / {})",
                m.items, m.deletion_curve.n, m.deletion_curve_range.n
            ),
        ];
        for (x, text) in cols.iter().zip(&cells) {
            put(&mut canvas, *x, y, text, 12.5, INK);
        }
    }
    canvas.png()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fam_core::records::{CurveEstimate, Estimate, EvalReport, MethodSummary};

    fn summary(method: &str, shift: f32) -> MethodSummary {
        let e = Estimate {
            mean: 0.5,
            lo: 0.4,
            hi: 0.6,
            n: 10,
            undefined: 0,
        };
        let curve = |f: fn(f32) -> f32| CurveEstimate {
            mean: (0..=8).map(|k| f(k as f32 / 8.0) + shift).collect(),
            lo: (0..=8).map(|k| f(k as f32 / 8.0) + shift - 0.05).collect(),
            hi: (0..=8).map(|k| f(k as f32 / 8.0) + shift + 0.05).collect(),
            n: 10,
        };
        MethodSummary {
            method: method.into(),
            items: 10,
            skipped: 0,
            average_drop: e,
            increase_in_confidence: e,
            deletion_auc: e,
            insertion_auc: e,
            deletion_auc_range: e,
            insertion_auc_range: e,
            deletion_curve: curve(|x| 1.0 - x),
            insertion_curve: curve(|x| x),
            deletion_curve_range: curve(|x| 1.0 - x * x),
            insertion_curve_range: curve(|x| x.sqrt()),
            passes_per_map: 0,
        }
    }

    #[test]
    fn the_curves_plot_draws_each_method_in_its_colour() {
        let report = EvalReport {
            pipeline: "p.toml".into(),
            backbone: "toy".into(),
            similarity: "cosine".into(),
            target: "similarity".into(),
            steps: 8,
            removal: "blur".into(),
            resamples: 100,
            summaries: vec![summary("fam", 0.0), summary("random", -0.2)],
            items: vec![],
            examples: vec![],
        };
        let png = plot(&report).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        let count = |c: RGBColor| img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
        // Both methods' lines are drawn (FAM's in red, thicker), and text was rendered.
        assert!(count(COLORS[0]) > 1000, "{}", count(COLORS[0]));
        assert!(count(COLORS[1]) > 500, "{}", count(COLORS[1]));
        assert!(
            img.pixels()
                .filter(|p| p.0[0] < 60 && p.0 == [p.0[0]; 3])
                .count()
                > 2000
        );
        // The ticks are round values inside the range.
        let hundredths =
            |t: Vec<f32>| -> Vec<i32> { t.iter().map(|v| (v * 100.0).round() as i32).collect() };
        assert_eq!(hundredths(ticks(0.0, 1.0)), [0, 20, 40, 60, 80, 100]);
        assert_eq!(hundredths(ticks(-1.2, 2.5)), [-100, 0, 100, 200]);
        // A method without curves (no item) is skipped, not an error.
        let mut empty = summary("point-specific", 0.0);
        empty.deletion_curve = CurveEstimate::default();
        let mut r2 = report.clone();
        r2.summaries.push(empty);
        assert!(plot(&r2).is_ok());
    }
}
