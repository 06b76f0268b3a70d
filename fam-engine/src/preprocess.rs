//! Image decoding and preprocessing, following torchvision's `Resize` + `CenterCrop` +
//! `Normalize` on PIL images (DESIGN.md section 1.4).

use std::path::Path;

use fam_core::candle::{Device, Tensor};

use fam_core::error::{FamError, Result};
use fam_core::explain::Rgb8;
use fam_core::traits::{InputSpec, ResizePolicy};
use image::RgbImage;

/// Largest image side accepted, and the most memory one decode may take: a decompression
/// bomb is refused before it is decoded.
pub const MAX_SIDE: u32 = 16_384;
pub const MAX_DECODE_BYTES: u64 = 512 << 20;

/// How a file whose data stops short (a truncated download or copy) is treated.
///
/// `Strict` (the default) refuses it, as PIL does ("image file is truncated"): a cut JPEG
/// otherwise decodes into an image whose missing part is flat grey, and would be explained
/// as if whole. `Lenient` explains what decodes and says what is missing
/// ([`Decoded::partial`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decoding {
    #[default]
    Strict,
    Lenient,
}

/// A decoded image, and why it is incomplete when it is (only ever in [`Decoding::Lenient`]).
#[derive(Debug, Clone)]
pub struct Decoded {
    pub image: Rgb8,
    pub partial: Option<String>,
}

/// The advice appended to a strict refusal of a truncated file.
pub const LENIENT_HINT: &str = "set `run.decoding = \"lenient\"` to explain what decodes";

/// Decodes an image file to 8-bit RGB: grayscale is replicated, alpha dropped, 16-bit scaled.
/// A truncated file is an error ([`Decoding::Strict`]).
pub fn load_rgb8(path: &Path) -> Result<Rgb8> {
    load_rgb8_with(path, Decoding::Strict).map(|d| d.image)
}

/// [`load_rgb8`], with the treatment of truncated files chosen by `decoding`.
pub fn load_rgb8_with(path: &Path, decoding: Decoding) -> Result<Decoded> {
    let bytes = std::fs::read(path).map_err(|e| FamError::io(path, e))?;
    decode_rgb8_with(&bytes, path, decoding)
}

/// Decodes image bytes (PNG or JPEG, within the decode limits); `path` names them in errors.
/// A truncated file is an error ([`Decoding::Strict`]).
pub fn decode_rgb8(bytes: &[u8], path: &Path) -> Result<Rgb8> {
    decode_rgb8_with(bytes, path, Decoding::Strict).map(|d| d.image)
}

/// [`decode_rgb8`], with the treatment of truncated files chosen by `decoding`.
///
/// Truncation is found from the file's structure, not from the pixels: a JPEG must reach its
/// end-of-image marker (segments are walked by their lengths and scans to their end, so an
/// embedded thumbnail's marker does not count; bytes after the marker are ignored, as PIL
/// does); a PNG is truncated when its decoder fails and the chunks stop before `IEND`.
pub fn decode_rgb8_with(bytes: &[u8], path: &Path, decoding: Decoding) -> Result<Decoded> {
    let image_err = |message: String| FamError::Image {
        path: path.to_path_buf(),
        message,
    };
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| FamError::io(path, e))?;
    let format = match reader.format() {
        Some(f @ (image::ImageFormat::Png | image::ImageFormat::Jpeg)) => f,
        Some(other) => {
            return Err(image_err(format!(
                "{other:?} files are not supported (fam reads PNG and JPEG)"
            )))
        }
        None => {
            return Err(image_err(
                "unknown or unsupported format (fam reads PNG and JPEG)".into(),
            ))
        }
    };
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits.clone());
    let (img, partial) = if format == image::ImageFormat::Jpeg {
        let cut = jpeg_truncation(bytes);
        match &cut {
            Some(cut) if !cut.has_scan_data => {
                return Err(image_err(format!(
                    "{}; no image data is present to decode",
                    cut.cause
                )))
            }
            Some(cut) if decoding == Decoding::Strict => {
                return Err(image_err(format!("{}; {LENIENT_HINT}", cut.cause)))
            }
            _ => {}
        }
        let img = reader.decode().map_err(|e| {
            image_err(match &cut {
                Some(cut) => format!("{}; the decoder stops with: {e}", cut.cause),
                None => e.to_string(),
            })
        })?;
        let partial = cut.map(|cut| {
            format!(
                "{}; what is missing decodes as flat grey{}",
                cut.cause,
                if cut.progressive {
                    " or coarse detail (progressive JPEG)"
                } else {
                    ""
                }
            )
        });
        (img.to_rgb8(), partial)
    } else {
        match reader.decode() {
            Ok(img) => (img.to_rgb8(), None),
            // A file over the decode limits is refused as such, whole or not.
            Err(e @ image::ImageError::Limits(_)) => return Err(image_err(e.to_string())),
            Err(e) => {
                let Some(cause) = png_truncation(bytes) else {
                    return Err(image_err(e.to_string()));
                };
                let cause = format!("{cause} (the decoder stops with: {e})");
                let (img, decoded, total) =
                    png_recover(bytes, limits).map_err(|e2| image_err(format!("{cause}; {e2}")))?;
                if decoded == total {
                    // Every pixel came from the file; only chunks after the image data are lost.
                    (img, None)
                } else if decoded == 0 {
                    return Err(image_err(format!("{cause}; no pixel of the image decodes")));
                } else if decoding == Decoding::Strict {
                    return Err(image_err(format!(
                        "{cause}; {} of the pixels decode; {LENIENT_HINT}",
                        percent(decoded, total)
                    )));
                } else {
                    let partial = format!(
                        "{cause}; {} of the pixels decode, the rest are filled with flat grey",
                        percent(decoded, total)
                    );
                    (img, Some(partial))
                }
            }
        }
    };
    let (width, height) = img.dimensions();
    if width == 0 || height == 0 {
        return Err(image_err("image has no pixels".into()));
    }
    Ok(Decoded {
        image: Rgb8 {
            width,
            height,
            data: img.into_raw(),
        },
        partial,
    })
}

fn percent(part: u64, whole: u64) -> String {
    let p = 100.0 * part as f64 / whole.max(1) as f64;
    // Never round a partial image up to 100% or down to 0%.
    let p = if part < whole { p.min(99.9) } else { p };
    let p = if part > 0 { p.max(0.1) } else { p };
    format!("{p:.1}% ({part} of {whole})")
}

/// Where a JPEG stops short of its end-of-image marker.
#[derive(Debug)]
struct JpegCut {
    /// One line naming where the data ends.
    cause: String,
    /// Whether any entropy-coded data (the pixels) is present at all.
    has_scan_data: bool,
    progressive: bool,
}

/// Walks a JPEG's markers from SOI: segments by their declared lengths, entropy-coded data to
/// the next marker that is not a byte stuffing (`FF 00`), restart marker or fill byte. The file
/// is whole when an EOI marker (`FF D9`) is reached outside any segment; anything after it is
/// ignored. `None` also when the structure is not one this walk understands (a declared length
/// below 2): the decoder's verdict then stands.
fn jpeg_truncation(bytes: &[u8]) -> Option<JpegCut> {
    let n = bytes.len();
    let mut pos = 2; // after SOI, which format detection checked
    let mut scans = 0usize;
    let mut has_scan_data = false;
    let mut progressive = false;
    let cut = |cause: String, has_scan_data: bool, progressive: bool| {
        Some(JpegCut {
            cause: format!(
                "truncated JPEG: the data ends before the end-of-image marker, {cause} \
                 (the file has {n} bytes)"
            ),
            has_scan_data,
            progressive,
        })
    };
    loop {
        // Find the next marker, skipping stray bytes (libjpeg does, with a warning) and fill.
        while pos < n && bytes[pos] != 0xFF {
            pos += 1;
        }
        while pos < n && bytes[pos] == 0xFF {
            pos += 1;
        }
        if pos >= n {
            let cause = if scans == 0 {
                "in the headers, before any image data".to_string()
            } else {
                format!("after scan {scans}")
            };
            return cut(cause, has_scan_data, progressive);
        }
        let marker = bytes[pos];
        let at = pos - 1;
        pos += 1;
        match marker {
            0xD9 => return None,
            // Markers without a length; `FF 00` outside a scan is a stray pair.
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        if pos + 2 > n {
            return cut(
                format!("inside the {} marker at byte {at}", marker_name(marker)),
                has_scan_data,
                progressive,
            );
        }
        let len = u16::from_be_bytes([bytes[pos], bytes[pos + 1]]) as usize;
        if len < 2 {
            return None;
        }
        if pos + len > n {
            return cut(
                format!(
                    "inside the {} segment at byte {at} ({} of its {len} bytes present)",
                    marker_name(marker),
                    n - pos
                ),
                has_scan_data,
                progressive,
            );
        }
        if matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE) {
            progressive = true;
        }
        pos += len;
        if marker != 0xDA {
            continue;
        }
        // Entropy-coded data of a scan: runs to the first marker that is not FF 00 or RSTn.
        scans += 1;
        let start = pos;
        loop {
            match bytes[pos..].iter().position(|&b| b == 0xFF) {
                None => pos = n,
                Some(i) => pos += i,
            }
            if pos + 1 >= n {
                let present = n - start;
                has_scan_data |= present > 0;
                return cut(
                    format!(
                        "inside the entropy-coded data of scan {scans}, which starts at byte \
                         {start} ({present} bytes of it present)"
                    ),
                    has_scan_data,
                    progressive,
                );
            }
            match bytes[pos + 1] {
                0x00 | 0xD0..=0xD7 => pos += 2,
                0xFF => pos += 1,
                _ => break,
            }
        }
        has_scan_data |= pos > start;
    }
}

fn marker_name(marker: u8) -> String {
    match marker {
        0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => "SOF (frame header)".into(),
        0xC4 => "DHT (Huffman table)".into(),
        0xDA => "SOS (scan header)".into(),
        0xDB => "DQT (quantization table)".into(),
        0xDD => "DRI (restart interval)".into(),
        0xE0..=0xEF => format!("APP{}", marker - 0xE0),
        0xFE => "COM (comment)".into(),
        m => format!("FF{m:02X}"),
    }
}

/// Walks a PNG's chunks by their declared lengths: `Some(cause)` when the data ends before
/// the `IEND` chunk (its type read), `None` when it reaches it.
fn png_truncation(bytes: &[u8]) -> Option<String> {
    let n = bytes.len();
    let mut pos = 8; // after the signature, which format detection checked
    let mut last: Option<String> = None;
    let prefix = "truncated PNG: the data ends before the IEND chunk,";
    loop {
        if pos + 8 > n {
            return Some(match &last {
                _ if pos < n => {
                    format!("{prefix} inside a chunk header at byte {pos} (the file has {n} bytes)")
                }
                Some(last) => format!("{prefix} after the {last} chunk (the file has {n} bytes)"),
                None => format!("{prefix} before any chunk (the file has {n} bytes)"),
            });
        }
        let len = u32::from_be_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]])
            as usize;
        let kind = String::from_utf8_lossy(&bytes[pos + 4..pos + 8]).into_owned();
        if kind == "IEND" {
            return None;
        }
        let end = pos.saturating_add(12).saturating_add(len);
        if end > n {
            let present = (n - pos - 8).min(len);
            return Some(format!(
                "{prefix} inside the {kind} chunk at byte {pos} ({present} of its {len} data \
                 bytes present; the file has {n} bytes)"
            ));
        }
        last = Some(kind);
        pos = end;
    }
}

/// Decodes what a truncated PNG holds: the rows (or, interlaced, the pass pixels) the decoder
/// wrote before the data ran out. It decodes twice, into buffers filled with 0x00 and 0xFF:
/// a byte the decoder wrote is equal in both, one it did not write differs, so the decoded
/// region is known exactly. Missing bytes become mid-grey (0x80, as a cut JPEG's are).
/// Returns the image and the decoded and total pixel counts.
fn png_recover(
    bytes: &[u8],
    limits: image::Limits,
) -> std::result::Result<(RgbImage, u64, u64), String> {
    use image::ImageDecoder;
    let decoder = || {
        image::codecs::png::PngDecoder::with_limits(std::io::Cursor::new(bytes), limits.clone())
            .map_err(|e| e.to_string())
    };
    let first = decoder()?;
    let (w, h) = first.dimensions();
    let color = first.color_type();
    let size = first.total_bytes();
    if size.saturating_mul(2) > MAX_DECODE_BYTES {
        return Err("too large to recover what decodes".into());
    }
    let mut zeros = vec![0u8; size as usize];
    let _ = first.read_image(&mut zeros);
    let mut ones = vec![0xFFu8; size as usize];
    let _ = decoder()?.read_image(&mut ones);
    let bpp = color.bytes_per_pixel() as usize;
    let mut decoded = 0u64;
    for (z, o) in zeros.chunks_exact_mut(bpp).zip(ones.chunks_exact(bpp)) {
        if z == o {
            decoded += 1;
        } else {
            z.fill(0x80);
        }
    }
    // The decoder leaves 16-bit samples big-endian when it fails.
    let wide = |b: &[u8]| -> Vec<u16> {
        b.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect()
    };
    use image::{DynamicImage as D, ImageBuffer as B};
    let img = match color {
        image::ColorType::L8 => B::from_raw(w, h, zeros).map(D::ImageLuma8),
        image::ColorType::La8 => B::from_raw(w, h, zeros).map(D::ImageLumaA8),
        image::ColorType::Rgb8 => B::from_raw(w, h, zeros).map(D::ImageRgb8),
        image::ColorType::Rgba8 => B::from_raw(w, h, zeros).map(D::ImageRgba8),
        image::ColorType::L16 => B::from_raw(w, h, wide(&zeros)).map(D::ImageLuma16),
        image::ColorType::La16 => B::from_raw(w, h, wide(&zeros)).map(D::ImageLumaA16),
        image::ColorType::Rgb16 => B::from_raw(w, h, wide(&zeros)).map(D::ImageRgb16),
        image::ColorType::Rgba16 => B::from_raw(w, h, wide(&zeros)).map(D::ImageRgba16),
        other => return Err(format!("cannot recover a {other:?} PNG")),
    }
    .ok_or("decoded buffer does not match the image size")?;
    Ok((img.to_rgb8(), decoded, w as u64 * h as u64))
}

/// An image prepared for a model: the RGB view it saw and the normalized CHW values.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub view: Rgb8,
    /// `3 * H * W` values, channel-major, normalized.
    pub chw: Vec<f32>,
}

/// Resizes, crops and normalizes one decoded image.
pub fn prepare(img: &Rgb8, spec: &InputSpec) -> Result<Prepared> {
    let view = match spec.resize {
        ResizePolicy::ResizeCrop { resize, crop } => {
            let (w, h) = (img.width as u64, img.height as u64);
            let (nw, nh) = if w <= h {
                (resize as u64, (resize as u64 * h) / w)
            } else {
                ((resize as u64 * w) / h, resize as u64)
            };
            let resized = resize_bilinear_aa(img, nw.max(1) as u32, nh.max(1) as u32);
            center_crop(&resized, crop, crop)
        }
        ResizePolicy::Exact { width, height } => resize_bilinear_aa(img, width, height),
    };
    Ok(Prepared {
        chw: normalize(&view, spec),
        view,
    })
}

/// Loads and prepares many images on all cores. Results keep the input order; a file that
/// fails yields its own error and does not stop the others. A truncated file is an error
/// ([`Decoding::Strict`]).
pub fn prepare_files(paths: &[&Path], spec: &InputSpec) -> Vec<Result<Prepared>> {
    prepare_files_with(paths, spec, Decoding::Strict)
        .into_iter()
        .map(|r| r.map(|(prepared, _)| prepared))
        .collect()
}

/// [`prepare_files`], with the treatment of truncated files chosen by `decoding`; each
/// prepared image comes with [`Decoded::partial`].
pub fn prepare_files_with(
    paths: &[&Path],
    spec: &InputSpec,
    decoding: Decoding,
) -> Vec<Result<(Prepared, Option<String>)>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(paths.len().max(1));
    type Slot = Option<Result<(Prepared, Option<String>)>>;
    let mut results: Vec<Slot> = (0..paths.len()).map(|_| None).collect();
    let chunk = paths.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (slots, ps) in results.chunks_mut(chunk).zip(paths.chunks(chunk)) {
            s.spawn(move || {
                for (slot, p) in slots.iter_mut().zip(ps) {
                    let r = std::panic::catch_unwind(|| {
                        load_rgb8_with(p, decoding).and_then(|d| {
                            prepare(&d.image, spec).map(|prepared| (prepared, d.partial))
                        })
                    })
                    .unwrap_or_else(|_| {
                        Err(FamError::Image {
                            path: p.to_path_buf(),
                            message: "decoder panicked".into(),
                        })
                    });
                    *slot = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every slot filled"))
        .collect()
}

/// Stacks prepared images into a `[B, 3, H, W]` tensor on `device`.
pub fn batch_tensor(items: &[&Prepared], device: &Device) -> Result<Tensor> {
    let first = items
        .first()
        .ok_or_else(|| FamError::invalid("empty batch"))?;
    let (h, w) = (first.view.height as usize, first.view.width as usize);
    let mut data = Vec::with_capacity(items.len() * 3 * h * w);
    for p in items {
        if (p.view.height as usize, p.view.width as usize) != (h, w) {
            return Err(FamError::invalid(format!(
                "batch mixes input sizes {}x{} and {w}x{h}",
                p.view.width, p.view.height
            )));
        }
        data.extend_from_slice(&p.chw);
    }
    Ok(Tensor::from_vec(data, (items.len(), 3, h, w), device)?)
}

fn normalize(img: &Rgb8, spec: &InputSpec) -> Vec<f32> {
    let n = (img.width * img.height) as usize;
    let mut out = vec![0f32; 3 * n];
    for c in 0..3 {
        let (mean, inv_std) = (spec.mean[c], 1.0 / spec.std[c]);
        let plane = &mut out[c * n..(c + 1) * n];
        for (i, v) in plane.iter_mut().enumerate() {
            *v = (img.data[3 * i + c] as f32 / 255.0 - mean) * inv_std;
        }
    }
    out
}

/// torchvision's `CenterCrop`: `top = round((H - h) / 2)` with Python's round-half-even;
/// an image smaller than the crop is padded with black, as torchvision does.
pub fn center_crop(img: &Rgb8, crop_w: u32, crop_h: u32) -> Rgb8 {
    let top = ((img.height as f64 - crop_h as f64) / 2.0).round_ties_even() as i64;
    let left = ((img.width as f64 - crop_w as f64) / 2.0).round_ties_even() as i64;
    let mut data = vec![0u8; (crop_w * crop_h * 3) as usize];
    for y in 0..crop_h as i64 {
        let sy = y + top;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for x in 0..crop_w as i64 {
            let sx = x + left;
            if sx < 0 || sx >= img.width as i64 {
                continue;
            }
            let src = ((sy as usize) * img.width as usize + sx as usize) * 3;
            let dst = ((y as usize) * crop_w as usize + x as usize) * 3;
            data[dst..dst + 3].copy_from_slice(&img.data[src..src + 3]);
        }
    }
    Rgb8 {
        width: crop_w,
        height: crop_h,
        data,
    }
}

/// Antialiased bilinear resize, byte for byte as PIL's `Image.resize(..., BILINEAR)`
/// (Pillow 13's `Resample.c`), which torchvision's `Resize` calls on PIL images: a triangle
/// filter whose support grows with the downscale factor, separable, with the taps in PIL's
/// 22-bit fixed point and each pass rounded to 8 bits as PIL rounds it.
///
/// The passes run in Pillow 13's order: horizontal first, unless the height shrinks by more
/// than twice as many pixels as the width does. (Pillow 12 and older always ran the
/// horizontal pass first; on such resizes their bytes differ by one here and there.)
pub fn resize_bilinear_aa(img: &Rgb8, out_w: u32, out_h: u32) -> Rgb8 {
    if (img.width, img.height) == (out_w, out_h) {
        return img.clone();
    }
    let (w, h) = (img.width as usize, img.height as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    let (shrink_w, shrink_h) = (w as i64 - ow as i64, h as i64 - oh as i64);
    let horizontal_first = !(shrink_h > 0 && shrink_h > shrink_w * 2);
    // A pass whose size does not change is skipped, as PIL skips it.
    let horizontal = |data: &[u8], rows: usize| {
        if ow != w {
            resample_axis(data, w, rows, ow, true)
        } else {
            data.to_vec()
        }
    };
    let vertical = |data: &[u8], cols: usize| {
        if oh != h {
            resample_axis(data, cols, h, oh, false)
        } else {
            data.to_vec()
        }
    };
    let data = if horizontal_first {
        vertical(&horizontal(&img.data, h), ow)
    } else {
        horizontal(&vertical(&img.data, w), oh)
    };
    Rgb8 {
        width: out_w,
        height: out_h,
        data,
    }
}

/// Bits of the fixed-point taps: PIL's `PRECISION_BITS` (32 - 8 - 2).
const PRECISION_BITS: u32 = 22;

/// Filter taps for one axis, as PIL's `precompute_coeffs` and `normalize_coeffs_8bpc`
/// compute them: for each output index, the first input index and its fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    // PIL's box is a pair of floats; `(in1 - in0) / outSize` in double.
    let scale = (in_size as f32) as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale; // the bilinear filter's support is 1, widened to downscale
    let ss = 1.0 / filter_scale;
    let one = (1u32 << PRECISION_BITS) as f64;
    (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero; both bounds are clamped into the input.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) * ss).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let sum: f64 = w.iter().sum();
            let fixed = w
                .into_iter()
                .map(|v| {
                    let v = if sum != 0.0 { v / sum } else { v };
                    // `(int)(±0.5 + v * (1 << PRECISION_BITS))`, truncating toward zero.
                    (if v < 0.0 {
                        -0.5 + v * one
                    } else {
                        0.5 + v * one
                    }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// One pass over one axis of an RGB image: PIL's `ImagingResampleHorizontal_8bpc` and
/// `ImagingResampleVertical_8bpc` (accumulate from one half, shift, clip to 0..=255).
fn resample_axis(src: &[u8], w: usize, h: usize, out: usize, horizontal: bool) -> Vec<u8> {
    let (in_size, other) = if horizontal { (w, h) } else { (h, w) };
    let coeffs = coefficients(in_size, out);
    let (ow, oh) = if horizontal { (out, h) } else { (w, out) };
    let mut dst = vec![0u8; ow * oh * 3];
    let half = 1i64 << (PRECISION_BITS - 1);
    for o in 0..other {
        for (i, (start, weights)) in coeffs.iter().enumerate() {
            let mut acc = [half; 3];
            for (k, &wt) in weights.iter().enumerate() {
                let s = start + k;
                let idx = if horizontal { o * w + s } else { s * w + o } * 3;
                for c in 0..3 {
                    acc[c] += src[idx + c] as i64 * wt as i64;
                }
            }
            let didx = if horizontal { o * ow + i } else { i * ow + o } * 3;
            for c in 0..3 {
                dst[didx + c] = (acc[c] >> PRECISION_BITS).clamp(0, 255) as u8;
            }
        }
    }
    dst
}

/// A one-line description of the preprocessing, for panels and manifests.
pub fn describe(spec: &InputSpec) -> String {
    match spec.resize {
        ResizePolicy::ResizeCrop { resize, crop } => {
            format!("resize {resize}, center crop {crop}x{crop}")
        }
        ResizePolicy::Exact { width, height } => format!("resize to {width}x{height}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::ImageEncoder;

    fn gray(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> Rgb8 {
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let v = f(x, y);
                data.extend_from_slice(&[v, v, v]);
            }
        }
        Rgb8 {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn downscale_by_two_averages_with_a_widened_triangle() {
        // 4 -> 2 wide: scale 2, support 2. Output 0: centre 1.0, taps x = 0..3 (floor(1-2+.5)=0
        // clipped, floor(1+2+.5)=3), weights 1-|x-1+.5|/2 = [.75, .75, .25] / 1.75.
        let img = gray(4, 1, |x, _| [0, 100, 200, 40][x as usize]);
        let out = resize_bilinear_aa(&img, 2, 1);
        let expect0 = (0.75 * 0.0 + 0.75 * 100.0 + 0.25 * 200.0) / 1.75;
        // Output 1: centre 3.0, taps x = 1..4, weights [.25, .75, .75] / 1.75.
        let expect1 = (0.25 * 100.0 + 0.75 * 200.0 + 0.75 * 40.0) / 1.75;
        assert_eq!(out.data[0], (expect0 as f32).round() as u8);
        assert_eq!(out.data[3], (expect1 as f32).round() as u8);
    }

    /// The synthetic test image of `scripts/make-resize-fixtures.py`, byte for byte.
    fn synthetic(w: u32, h: u32) -> Rgb8 {
        let mut data = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h as u64 {
            for x in 0..w as u64 {
                data.push(((x * 255 / (w as u64 - 1).max(1)) & 255) as u8);
                data.push(if (x / 3 + y / 3) % 2 == 1 { 255 } else { 0 });
                data.push(((x * 2654435761 + y * 40503) >> 7 & 255) as u8);
            }
        }
        Rgb8 {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn resize_is_byte_identical_to_pil() {
        // Digests of Pillow's Image.resize(BILINEAR), and of torchvision's Resize +
        // CenterCrop on the PNG photos, written by scripts/make-resize-fixtures.py.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(dir.join("tests/fixtures/pil-resize.json")).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let pair =
            |v: &serde_json::Value| (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32);
        let mut wrong = Vec::new();
        let cases = doc["synthetic"].as_array().unwrap();
        assert!(cases.len() >= 400);
        for case in cases {
            let ((w, h), (ow, oh)) = (pair(&case["in"]), pair(&case["out"]));
            let got = crate::cache::sha256_hex(&resize_bilinear_aa(&synthetic(w, h), ow, oh).data);
            if got != case["sha256"].as_str().unwrap() {
                wrong.push(format!("{w}x{h} -> {ow}x{oh}"));
            }
        }
        let photos = doc["photos"].as_array().unwrap();
        assert!(photos.len() >= 40);
        for case in photos {
            let name = case["image"].as_str().unwrap();
            let img = load_rgb8(&dir.join("../data/images").join(name)).unwrap();
            let view = if let Some(out) = case.get("out") {
                let (ow, oh) = pair(out);
                resize_bilinear_aa(&img, ow, oh)
            } else {
                let spec = InputSpec {
                    resize: ResizePolicy::ResizeCrop {
                        resize: case["resize"].as_u64().unwrap() as u32,
                        crop: case["crop"].as_u64().unwrap() as u32,
                    },
                    mean: [0.0; 3],
                    std: [1.0; 3],
                };
                prepare(&img, &spec).unwrap().view
            };
            if crate::cache::sha256_hex(&view.data) != case["sha256"].as_str().unwrap() {
                wrong.push(format!("{name} {case}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} cases differ from PIL: {wrong:?}",
            wrong.len()
        );
    }

    #[test]
    fn shorter_side_resize_and_center_crop_match_torchvision_geometry() {
        // 300x200 -> Resize(100): 150x100 (floor(100*300/200)), CenterCrop(64):
        // left = round(43) = 43, top = round(18) = 18.
        let img = gray(300, 200, |x, y| ((x + y) % 256) as u8);
        let spec = InputSpec {
            resize: ResizePolicy::ResizeCrop {
                resize: 100,
                crop: 64,
            },
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let p = prepare(&img, &spec).unwrap();
        assert_eq!((p.view.width, p.view.height), (64, 64));
        assert_eq!(p.chw.len(), 3 * 64 * 64);
        // Python rounds half to even: (5 - 2) / 2 = 1.5 -> 2, (7 - 2) / 2 = 2.5 -> 2.
        let small = gray(5, 7, |x, y| (10 * y + x) as u8);
        let c = center_crop(&small, 2, 2);
        assert_eq!(c.data[0], 22); // top 2, left 2
    }

    #[test]
    fn normalization_uses_mean_and_std_per_channel() {
        let img = Rgb8 {
            width: 1,
            height: 1,
            data: vec![255, 0, 51],
        };
        let spec = InputSpec {
            resize: ResizePolicy::Exact {
                width: 1,
                height: 1,
            },
            mean: [0.5, 0.5, 0.0],
            std: [0.5, 0.25, 0.2],
        };
        let p = prepare(&img, &spec).unwrap();
        assert!((p.chw[0] - 1.0).abs() < 1e-6);
        assert!((p.chw[1] + 2.0).abs() < 1e-6);
        assert!((p.chw[2] - 1.0).abs() < 1e-6);
    }

    fn encoded_jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = gray(w, h, |x, y| ((x * 7 + y * 3) % 256) as u8);
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode(&img.data, w, h, image::ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    /// Offset of the first `FF marker` pair.
    fn marker_at(bytes: &[u8], marker: u8) -> usize {
        bytes.windows(2).position(|p| p == [0xFF, marker]).unwrap()
    }

    #[test]
    fn jpeg_walk_accepts_a_whole_file_and_bytes_after_its_end_marker() {
        let jpg = encoded_jpeg(40, 24);
        assert!(jpeg_truncation(&jpg).is_none());
        for tail in [
            &b"\0\0\0\0"[..],
            b"garbage",
            &[0xFF, 0xD8, 0xFF, 0xE0],
            &[0xFF; 9],
        ] {
            let mut longer = jpg.clone();
            longer.extend_from_slice(tail);
            assert!(jpeg_truncation(&longer).is_none(), "tail {tail:?}");
        }
    }

    #[test]
    fn jpeg_walk_names_where_the_data_ends() {
        let jpg = encoded_jpeg(40, 24);
        let sos = marker_at(&jpg, 0xDA);
        let sos_end = sos + 2 + u16::from_be_bytes([jpg[sos + 2], jpg[sos + 3]]) as usize;
        // In the scan data, and one byte short of the EOI marker.
        for n in [
            sos_end + 5,
            (sos_end + jpg.len()) / 2,
            jpg.len() - 2,
            jpg.len() - 1,
        ] {
            let cut = jpeg_truncation(&jpg[..n]).expect("cut in the scan");
            assert!(cut.has_scan_data && !cut.progressive, "{n}");
            assert!(
                cut.cause.contains("entropy-coded data of scan 1")
                    && cut.cause.contains(&format!("the file has {n} bytes")),
                "{}",
                cut.cause
            );
        }
        // Just after the scan header: no pixel data at all.
        let cut = jpeg_truncation(&jpg[..sos_end]).unwrap();
        assert!(!cut.has_scan_data, "{}", cut.cause);
        // Inside a table, and inside a marker.
        let dqt = marker_at(&jpg, 0xDB);
        let cut = jpeg_truncation(&jpg[..dqt + 10]).unwrap();
        assert!(!cut.has_scan_data);
        assert!(cut.cause.contains("inside the DQT"), "{}", cut.cause);
        let cut = jpeg_truncation(&jpg[..dqt + 1]).unwrap();
        assert!(cut.cause.contains("in the headers"), "{}", cut.cause);
    }

    #[test]
    fn jpeg_walk_does_not_take_an_embedded_thumbnail_end_for_the_file_end() {
        // An APP1 segment holding a whole JPEG (as EXIF thumbnails do): its FF D9 lies inside
        // the segment, so a cut file is still cut.
        let thumb = encoded_jpeg(8, 8);
        let main = encoded_jpeg(40, 24);
        let mut jpg = main[..2].to_vec();
        jpg.extend_from_slice(&[0xFF, 0xE1]);
        jpg.extend_from_slice(&((thumb.len() + 2) as u16).to_be_bytes());
        jpg.extend_from_slice(&thumb);
        jpg.extend_from_slice(&main[2..]);
        assert!(jpeg_truncation(&jpg).is_none());
        let cut = jpeg_truncation(&jpg[..jpg.len() - 30]).unwrap();
        assert!(cut.cause.contains("scan 1"), "{}", cut.cause);
    }

    #[test]
    fn jpeg_walk_steps_over_stuffed_bytes_restart_markers_and_fill() {
        let mut jpg = vec![0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x03, 0x01];
        jpg.extend_from_slice(&[0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56, 0xFF, 0xD7, 0x78]);
        let cut = jpeg_truncation(&jpg).unwrap();
        assert!(
            cut.cause
                .contains("scan 1, which starts at byte 7 (10 bytes"),
            "{}",
            cut.cause
        );
        // A second scan after a table, ended by fill bytes then EOI.
        jpg.extend_from_slice(&[0xFF, 0xC4, 0x00, 0x02, 0xFF, 0xDA, 0x00, 0x02, 0x9A]);
        assert!(jpeg_truncation(&jpg).unwrap().cause.contains("scan 2"));
        jpg.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xD9, 0x00]);
        assert!(jpeg_truncation(&jpg).is_none());
    }

    #[test]
    fn png_walk_finds_a_cut_before_iend() {
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&[7u8; 3 * 16 * 8], 16, 8, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert!(png_truncation(&png).is_none());
        let idat = png.windows(4).position(|w| w == b"IDAT").unwrap() - 4;
        let cause = png_truncation(&png[..idat + 10]).unwrap();
        assert!(cause.contains("inside the IDAT chunk"), "{cause}");
        let cause = png_truncation(&png[..png.len() - 12]).unwrap();
        assert!(cause.contains("after the IDAT chunk"), "{cause}");
        let cause = png_truncation(&png[..png.len() - 10]).unwrap();
        assert!(cause.contains("inside a chunk header"), "{cause}");
        // The IEND chunk's type is there; its CRC is not needed.
        assert!(png_truncation(&png[..png.len() - 2]).is_none());
    }

    #[test]
    fn decoding_is_strict_by_default_and_spelled_in_snake_case() {
        assert_eq!(Decoding::default(), Decoding::Strict);
        assert_eq!(
            serde_json::to_string(&Decoding::Lenient).unwrap(),
            "\"lenient\""
        );
        let d: Decoding = serde_json::from_str("\"strict\"").unwrap();
        assert_eq!(d, Decoding::Strict);
    }

    #[test]
    fn crop_larger_than_image_pads_black() {
        let img = gray(2, 2, |_, _| 9);
        let c = center_crop(&img, 4, 4);
        assert_eq!(c.data.iter().filter(|&&v| v == 9).count(), 12);
    }
}
