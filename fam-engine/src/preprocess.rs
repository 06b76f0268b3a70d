//! Image decoding and preprocessing, following torchvision's `Resize` + `CenterCrop` +
//! `Normalize` on PIL images (DESIGN.md section 1.4).

use std::path::Path;

use fam_core::candle::{Device, Tensor};

use fam_core::error::{FamError, Result};
use fam_core::explain::Rgb8;
use fam_core::traits::{InputSpec, ResizePolicy};

/// Largest image side accepted, and the most memory one decode may take: a decompression
/// bomb is refused before it is decoded.
pub const MAX_SIDE: u32 = 16_384;
pub const MAX_DECODE_BYTES: u64 = 512 << 20;

/// Decodes an image file to 8-bit RGB: grayscale is replicated, alpha dropped, 16-bit scaled.
pub fn load_rgb8(path: &Path) -> Result<Rgb8> {
    let bytes = std::fs::read(path).map_err(|e| FamError::io(path, e))?;
    decode_rgb8(&bytes, path)
}

/// Decodes image bytes (PNG or JPEG, within the decode limits); `path` names them in errors.
pub fn decode_rgb8(bytes: &[u8], path: &Path) -> Result<Rgb8> {
    let image_err = |message: String| FamError::Image {
        path: path.to_path_buf(),
        message,
    };
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| FamError::io(path, e))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => {}
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
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| image_err(e.to_string()))?;
    let rgb = img.to_rgb8();
    let (width, height) = rgb.dimensions();
    if width == 0 || height == 0 {
        return Err(image_err("image has no pixels".into()));
    }
    Ok(Rgb8 {
        width,
        height,
        data: rgb.into_raw(),
    })
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
/// fails yields its own error and does not stop the others.
pub fn prepare_files(paths: &[&Path], spec: &InputSpec) -> Vec<Result<Prepared>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(paths.len().max(1));
    let mut results: Vec<Option<Result<Prepared>>> = (0..paths.len()).map(|_| None).collect();
    let chunk = paths.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (slots, ps) in results.chunks_mut(chunk).zip(paths.chunks(chunk)) {
            s.spawn(move || {
                for (slot, p) in slots.iter_mut().zip(ps) {
                    let r = std::panic::catch_unwind(|| {
                        load_rgb8(p).and_then(|img| prepare(&img, spec))
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

/// Antialiased bilinear resize as PIL's `Image.resize(..., BILINEAR)`: a triangle filter whose
/// support grows with the downscale factor, separable (horizontal then vertical), rounded
/// to 8 bits after each pass.
pub fn resize_bilinear_aa(img: &Rgb8, out_w: u32, out_h: u32) -> Rgb8 {
    if (img.width, img.height) == (out_w, out_h) {
        return img.clone();
    }
    let horiz = resample_axis(
        &img.data,
        img.width as usize,
        img.height as usize,
        out_w as usize,
        true,
    );
    let data = resample_axis(
        &horiz,
        out_w as usize,
        img.height as usize,
        out_h as usize,
        false,
    );
    Rgb8 {
        width: out_w,
        height: out_h,
        data,
    }
}

/// Filter taps for one axis: for each output index, the first input index and its weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale; // bilinear support 1.0, widened when downscaling
    (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5).floor().max(0.0)) as usize;
            let xmax = ((center + support + 0.5).floor() as usize).min(in_size);
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) / filter_scale).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let sum: f64 = w.iter().sum();
            if sum > 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            (xmin, w.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

fn resample_axis(src: &[u8], w: usize, h: usize, out: usize, horizontal: bool) -> Vec<u8> {
    let (in_size, other) = if horizontal { (w, h) } else { (h, w) };
    let coeffs = coefficients(in_size, out);
    let (ow, oh) = if horizontal { (out, h) } else { (w, out) };
    let mut dst = vec![0u8; ow * oh * 3];
    for o in 0..other {
        for (i, (start, weights)) in coeffs.iter().enumerate() {
            let mut acc = [0f32; 3];
            for (k, wt) in weights.iter().enumerate() {
                let s = start + k;
                let idx = if horizontal { o * w + s } else { s * w + o } * 3;
                acc[0] += wt * src[idx] as f32;
                acc[1] += wt * src[idx + 1] as f32;
                acc[2] += wt * src[idx + 2] as f32;
            }
            let didx = if horizontal { o * ow + i } else { i * ow + o } * 3;
            for c in 0..3 {
                dst[didx + c] = acc[c].round().clamp(0.0, 255.0) as u8;
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

    #[test]
    fn crop_larger_than_image_pads_black() {
        let img = gray(2, 2, |_, _| 9);
        let c = center_crop(&img, 4, 4);
        assert_eq!(c.data.iter().filter(|&&v| v == 9).count(), 12);
    }
}
