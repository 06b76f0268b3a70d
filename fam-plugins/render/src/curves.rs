//! The plot of `fam-cli eval`'s mean deletion and insertion curves (`eval-curves.png`).

use fam_core::records::EvalReport;
use fam_core::Result;

use crate::draw::Canvas;

/// Line colours, one per method in table order (FAM first, in red): matplotlib's tab10
/// and two more, so that the twelve methods a few-shot eval can have all differ.
const COLORS: [[u8; 3]; 12] = [
    [214, 39, 40],
    [255, 127, 14],
    [31, 119, 180],
    [44, 160, 44],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
    [0, 0, 0],
    [255, 215, 0],
];

const WHITE: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [20, 20, 20];
const GRID: [u8; 3] = [225, 225, 225];

/// Two plots side by side (deletion, insertion): the mean normalized score `s_k / s` over the
/// fraction of pixels removed or revealed (items with `s > 0`), one line per method, with the
/// AUCs in the legend.
pub fn plot(report: &EvalReport) -> Result<Vec<u8>> {
    let (pw, ph) = (420u32, 300u32);
    let (left, top, gap) = (56u32, 52u32, 70u32);
    let legend_h = 18 * report.summaries.len() as u32 + 16;
    let width = left + 2 * pw + gap + 24;
    let height = top + ph + 44 + legend_h;
    let mut c = Canvas::new(width, height, WHITE);
    let title = format!(
        "{} | {} | {}",
        report.backbone, report.similarity, report.target
    );
    c.text(left, 10, &title, 1, INK);
    // The y range covers every curve (scores can rise above the original or go negative).
    let (mut lo, mut hi) = (0f32, 1f32);
    for m in &report.summaries {
        for v in m.mean_deletion.iter().chain(&m.mean_insertion) {
            if v.is_finite() {
                lo = lo.min(*v);
                hi = hi.max(*v);
            }
        }
    }
    let (lo, hi) = ((lo * 10.0).floor() / 10.0, (hi * 10.0).ceil() / 10.0);
    for (k, name) in ["deletion (lower is better)", "insertion (higher is better)"]
        .iter()
        .enumerate()
    {
        let x0 = left + k as u32 * (pw + gap);
        let y0 = top;
        c.text(x0, y0 - 18, name, 1, INK);
        // Grid every 0.1 of the score and 0.25 of the fraction.
        let steps = ((hi - lo) / 0.1).round() as i32;
        for i in 0..=steps {
            let v = lo + i as f32 * 0.1;
            let y = y0 + ph - ((v - lo) / (hi - lo) * ph as f32).round() as u32;
            c.line((x0 as f32, y as f32), ((x0 + pw) as f32, y as f32), 1, GRID);
            if steps <= 12 || i % 2 == 0 {
                c.text(x0 - 40, y.saturating_sub(4), &format!("{v:>4.1}"), 1, INK);
            }
        }
        for i in 0..=4 {
            let x = x0 + i * pw / 4;
            c.line((x as f32, y0 as f32), (x as f32, (y0 + ph) as f32), 1, GRID);
            c.text(
                x.saturating_sub(12),
                y0 + ph + 8,
                &format!("{:.2}", i as f32 / 4.0),
                1,
                INK,
            );
        }
        c.text(
            x0 + pw / 2 - 72,
            y0 + ph + 22,
            if k == 0 {
                "fraction of pixels removed"
            } else {
                "fraction of pixels shown"
            },
            1,
            INK,
        );
        // Axes.
        let (xa, ya) = (x0 as f32, (y0 + ph) as f32);
        c.line((xa, y0 as f32), (xa, ya), 1, INK);
        c.line((xa, ya), ((x0 + pw) as f32, ya), 1, INK);
        // FAM last, so it is drawn on top.
        for (mi, m) in report.summaries.iter().enumerate().rev() {
            let curve = if k == 0 {
                &m.mean_deletion
            } else {
                &m.mean_insertion
            };
            if curve.len() < 2 || m.items == 0 {
                continue;
            }
            let pt = |i: usize, v: f32| {
                (
                    x0 as f32 + i as f32 / (curve.len() - 1) as f32 * pw as f32,
                    (y0 + ph) as f32 - (v.clamp(lo, hi) - lo) / (hi - lo) * ph as f32,
                )
            };
            let thick = if mi == 0 { 3 } else { 2 };
            for i in 1..curve.len() {
                c.line(
                    pt(i - 1, curve[i - 1]),
                    pt(i, curve[i]),
                    thick,
                    COLORS[mi % COLORS.len()],
                );
            }
        }
    }
    // Legend: method, AUCs.
    let ly = top + ph + 44;
    c.text(
        left,
        ly,
        &format!("{:<22} {:>9} {:>10}", "method", "deletion", "insertion"),
        1,
        INK,
    );
    for (mi, m) in report.summaries.iter().enumerate() {
        let y = ly + 16 + 18 * mi as u32;
        c.rect(left, y + 2, 18, 4, COLORS[mi % COLORS.len()]);
        c.text(
            left + 24,
            y,
            &format!(
                "{:<19} {:>9.3} {:>10.3}   ({} of {} items: s > 0)",
                m.method,
                m.deletion_auc.mean,
                m.insertion_auc.mean,
                m.items - m.skipped,
                m.items
            ),
            1,
            INK,
        );
    }
    c.png()
}
