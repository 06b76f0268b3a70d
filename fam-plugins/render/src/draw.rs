//! A tiny RGB canvas: blitting, heatmap blending, antialiased text (DejaVu Sans through
//! ab_glyph, `fonts/`) and PNG encoding.

use fam_core::explain::Rgb8;

/// DejaVu Sans (`fonts/LICENSE.md`): the panels' text and the plots'.
const FONT_BYTES: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// The bundled font, parsed once.
fn font() -> &'static ab_glyph::FontRef<'static> {
    static FONT: std::sync::OnceLock<ab_glyph::FontRef<'static>> = std::sync::OnceLock::new();
    FONT.get_or_init(|| {
        ab_glyph::FontRef::try_from_slice(FONT_BYTES).expect("the bundled font parses")
    })
}
use fam_core::{FamError, Result};

/// Colormaps for saliency (0 = low, 1 = high). Viridis, inferno and turbo are the
/// published tables (the `colorous` crate: matplotlib's perceptually uniform maps and
/// Google's turbo); jet is matplotlib's piecewise-linear definition, for those who ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colormap {
    Jet,
    Inferno,
    Viridis,
    Turbo,
    Gray,
}

impl Colormap {
    pub const NAMES: [&'static str; 5] = ["jet", "inferno", "viridis", "turbo", "gray"];

    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "jet" => Ok(Self::Jet),
            "inferno" => Ok(Self::Inferno),
            "viridis" => Ok(Self::Viridis),
            "turbo" => Ok(Self::Turbo),
            "gray" | "grey" => Ok(Self::Gray),
            other => Err(format!(
                "unknown colormap `{other}` (available: {})",
                Self::NAMES.join(", ")
            )),
        }
    }

    /// The colour of value `v` in [0, 1].
    pub fn color(self, v: f32) -> [u8; 3] {
        let v = if v.is_finite() {
            v.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let to8 = |x: f32| (x.clamp(0.0, 1.0) * 255.0).round() as u8;
        let table = |g: colorous::Gradient| {
            let c = g.eval_continuous(v as f64);
            [c.r, c.g, c.b]
        };
        match self {
            Colormap::Jet => {
                // matplotlib jet: r = 1.5 - |4v - 3|, g = 1.5 - |4v - 2|, b = 1.5 - |4v - 1|
                let f = |c: f32| to8(1.5 - (4.0 * v - c).abs());
                [f(3.0), f(2.0), f(1.0)]
            }
            Colormap::Inferno => table(colorous::INFERNO),
            Colormap::Viridis => table(colorous::VIRIDIS),
            Colormap::Turbo => table(colorous::TURBO),
            Colormap::Gray => [to8(v); 3],
        }
    }
}

/// An RGB image being drawn.
#[derive(Debug, Clone)]
pub struct Canvas {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl Canvas {
    pub fn new(width: u32, height: u32, background: [u8; 3]) -> Self {
        let mut data = Vec::with_capacity((width * height * 3) as usize);
        for _ in 0..width * height {
            data.extend_from_slice(&background);
        }
        Self {
            width,
            height,
            data,
        }
    }

    pub fn from_rgb(img: &Rgb8) -> Self {
        Self {
            width: img.width,
            height: img.height,
            data: img.data.clone(),
        }
    }

    /// `(1 - alpha) * image + alpha * colormap(map)`, `map` in [0, 1] at the image's size.
    pub fn overlay(img: &Rgb8, map: &[f32], cmap: Colormap, alpha: f32) -> Self {
        let mut c = Self::from_rgb(img);
        for (i, px) in c.data.chunks_exact_mut(3).enumerate() {
            let heat = cmap.color(map.get(i).copied().unwrap_or(0.0));
            for k in 0..3 {
                px[k] = ((1.0 - alpha) * px[k] as f32 + alpha * heat[k] as f32).round() as u8;
            }
        }
        c
    }

    /// Nearest-neighbour enlargement by an integer factor (small model inputs, e.g. 112 px
    /// faces, are hard to read at their own size).
    pub fn scaled(&self, k: u32) -> Canvas {
        if k <= 1 {
            return self.clone();
        }
        let (w, h) = (self.width * k, self.height * k);
        let mut data = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let i = (((y / k) * self.width + x / k) * 3) as usize;
                data.extend_from_slice(&self.data[i..i + 3]);
            }
        }
        Canvas {
            width: w,
            height: h,
            data,
        }
    }

    pub fn put(&mut self, x: u32, y: u32, rgb: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = ((y * self.width + x) * 3) as usize;
            self.data[i..i + 3].copy_from_slice(&rgb);
        }
    }

    pub fn blit(&mut self, src: &Canvas, x0: u32, y0: u32) {
        for y in 0..src.height {
            for x in 0..src.width {
                let i = ((y * src.width + x) * 3) as usize;
                self.put(
                    x0 + x,
                    y0 + y,
                    [src.data[i], src.data[i + 1], src.data[i + 2]],
                );
            }
        }
    }

    /// Draws text in DejaVu Sans, antialiased, at `11 · scale` px with its top at `y0`
    /// (a line takes about `7 · scale` px per character on average, less than the 8 the
    /// layouts allow).
    pub fn text(&mut self, x0: u32, y0: u32, text: &str, scale: u32, rgb: [u8; 3]) {
        self.text_px(x0, y0, text, 11.0 * scale.max(1) as f32, rgb)
    }

    /// Draws text at `px` pixels (the font's size) with its top at `y0`.
    pub fn text_px(&mut self, x0: u32, y0: u32, text: &str, px: f32, rgb: [u8; 3]) {
        use ab_glyph::{Font, ScaleFont};
        let font = font().as_scaled(px);
        let baseline = y0 as f32 + font.ascent();
        let mut caret = x0 as f32;
        let mut previous: Option<ab_glyph::GlyphId> = None;
        for ch in text.chars() {
            let id = font.glyph_id(ch);
            if let Some(p) = previous {
                caret += font.kern(p, id);
            }
            let glyph = id.with_scale_and_position(px, ab_glyph::point(caret, baseline));
            caret += font.h_advance(id);
            previous = Some(id);
            let Some(outline) = font.font().outline_glyph(glyph) else {
                continue;
            };
            let bounds = outline.px_bounds();
            outline.draw(|gx, gy, coverage| {
                let (x, y) = (
                    bounds.min.x as i64 + gx as i64,
                    bounds.min.y as i64 + gy as i64,
                );
                if x >= 0 && y >= 0 {
                    self.blend(x as u32, y as u32, rgb, coverage);
                }
            });
        }
    }

    /// The width in pixels of `text` drawn by [`Canvas::text`] at `scale`.
    pub fn text_width(text: &str, scale: u32) -> f32 {
        Self::text_width_px(text, 11.0 * scale.max(1) as f32)
    }

    /// The width in pixels of `text` drawn by [`Canvas::text_px`] at `px`.
    pub fn text_width_px(text: &str, px: f32) -> f32 {
        use ab_glyph::{Font, ScaleFont};
        let font = font().as_scaled(px);
        let mut width = 0.0;
        let mut previous: Option<ab_glyph::GlyphId> = None;
        for ch in text.chars() {
            let id = font.glyph_id(ch);
            if let Some(p) = previous {
                width += font.kern(p, id);
            }
            width += font.h_advance(id);
            previous = Some(id);
        }
        width
    }

    /// Mixes `rgb` into a pixel with weight `a` in [0, 1].
    pub fn blend(&mut self, x: u32, y: u32, rgb: [u8; 3], a: f32) {
        if x >= self.width || y >= self.height {
            return;
        }
        let a = a.clamp(0.0, 1.0);
        let i = ((y * self.width + x) * 3) as usize;
        for (c, v) in rgb.iter().enumerate() {
            let old = self.data[i + c] as f32;
            self.data[i + c] = (old + (*v as f32 - old) * a).round() as u8;
        }
    }

    /// A line `thickness` pixels wide (a square brush stepped along the segment).
    pub fn line(&mut self, a: (f32, f32), b: (f32, f32), thickness: u32, rgb: [u8; 3]) {
        let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
        let r = thickness as i64 / 2;
        for i in 0..=n {
            let t = i as f32 / n as f32;
            let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
            for dy in -r..=r {
                for dx in -r..=r {
                    let (px, py) = (x.round() as i64 + dx, y.round() as i64 + dy);
                    if px >= 0 && py >= 0 {
                        self.put(px as u32, py as u32, rgb);
                    }
                }
            }
        }
    }

    /// A filled rectangle.
    pub fn rect(&mut self, x0: u32, y0: u32, w: u32, h: u32, rgb: [u8; 3]) {
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                self.put(x, y, rgb);
            }
        }
    }

    pub fn png(&self) -> Result<Vec<u8>> {
        use image::ImageEncoder;
        let mut out = Vec::new();
        // Fast compression: a map overlay is a photo-like image that deflates poorly anyway,
        // and the default level costs more than the model's forward pass.
        image::codecs::png::PngEncoder::new_with_quality(
            &mut out,
            image::codecs::png::CompressionType::Fast,
            image::codecs::png::FilterType::Adaptive,
        )
        .write_image(
            &self.data,
            self.width,
            self.height,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| FamError::invalid(format!("PNG encoding failed: {e}")))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jet_endpoints() {
        assert_eq!(Colormap::Jet.color(0.0), [0, 0, 128]);
        assert_eq!(Colormap::Jet.color(1.0), [128, 0, 0]);
        assert_eq!(Colormap::Jet.color(0.5), [128, 255, 128]);
        assert_eq!(Colormap::Gray.color(f32::NAN), [0, 0, 0]);
    }

    #[test]
    fn published_colormaps_end_where_their_tables_do() {
        // matplotlib's viridis #440154 → #fde725, inferno #000004 → #fcffa4.
        assert_eq!(Colormap::Viridis.color(0.0), [0x44, 0x01, 0x54]);
        assert_eq!(Colormap::Viridis.color(1.0), [0xfd, 0xe7, 0x25]);
        assert_eq!(Colormap::Inferno.color(0.0), [0x00, 0x00, 0x04]);
        assert_eq!(Colormap::Inferno.color(1.0), [0xfc, 0xff, 0xa4]);
        // Turbo (colorous' polynomial fit): dark, then green in the middle, then dark red.
        let [r, g, b] = Colormap::Turbo.color(0.5);
        assert!(g > r && g > b, "{:?}", [r, g, b]);
        assert!(Colormap::Turbo.color(1.0)[0] > Colormap::Turbo.color(1.0)[2]);
        for name in Colormap::NAMES {
            assert!(Colormap::parse(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn overlay_blends() {
        let img = Rgb8 {
            width: 1,
            height: 1,
            data: vec![200, 200, 200],
        };
        let c = Canvas::overlay(&img, &[1.0], Colormap::Jet, 0.5);
        assert_eq!(c.data, vec![164, 100, 100]);
    }
}
