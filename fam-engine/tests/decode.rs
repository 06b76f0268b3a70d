//! Truncated files: a strict decode refuses them and names the cause, a lenient one keeps
//! what decodes and says what is missing; whole files decode exactly as `image` does.
//!
//! Fixtures (`tests/fixtures/`): `progressive.jpg` and `restart.jpg` are a 128x96 crop of
//! `data/images/china.jpg` made by `jpegtran -crop 128x96+200+150 -progressive` and
//! `-restart 1`; `interlaced.png` (48x40 RGB, Adam7) and `rgb16.png` (48x40, 16-bit RGB) were
//! written by a few lines of Python (`zlib` + `struct`), with one IDAT chunk each.

use std::path::{Path, PathBuf};

use fam_engine::preprocess::{
    decode_rgb8, decode_rgb8_with, load_rgb8, load_rgb8_with, prepare_files, prepare_files_with,
    Decoding, LENIENT_HINT,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(root().join(rel)).unwrap()
}

const JPEGS: [&str; 5] = [
    "data/images/china.jpg",
    "data/images/rocket.jpg",
    "fuzz/corpus/image/small.jpg",
    "fam-engine/tests/fixtures/progressive.jpg",
    "fam-engine/tests/fixtures/restart.jpg",
];
const PNGS: [&str; 5] = [
    "fuzz/corpus/image/small.png",
    "fuzz/corpus/image/gray.png",
    "fuzz/corpus/image/rgba.png",
    "fam-engine/tests/fixtures/interlaced.png",
    "fam-engine/tests/fixtures/rgb16.png",
];

/// What `image` itself makes of the bytes.
fn reference(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let img = image::load_from_memory(bytes).unwrap().to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

/// End of the first scan header: where the entropy-coded data starts.
fn scan_data_start(jpg: &[u8]) -> usize {
    let sos = jpg.windows(2).position(|p| p == [0xFF, 0xDA]).unwrap();
    sos + 2 + u16::from_be_bytes([jpg[sos + 2], jpg[sos + 3]]) as usize
}

fn grey_fraction(data: &[u8]) -> f64 {
    let px = data.chunks_exact(3);
    let n = px.len();
    px.filter(|p| *p == [128, 128, 128]).count() as f64 / n as f64
}

#[test]
fn whole_files_decode_exactly_as_the_image_crate_does() {
    for rel in JPEGS.iter().chain(&PNGS) {
        let bytes = read(rel);
        let (w, h, data) = reference(&bytes);
        let path = Path::new(rel);
        let strict = decode_rgb8(&bytes, path).unwrap();
        assert_eq!((strict.width, strict.height), (w, h), "{rel}");
        assert!(strict.data == data, "{rel}: pixels differ");
        let lenient = decode_rgb8_with(&bytes, path, Decoding::Lenient).unwrap();
        assert!(lenient.partial.is_none(), "{rel}");
        assert!(lenient.image.data == data, "{rel}");
    }
}

#[test]
fn bytes_after_the_jpeg_end_marker_are_ignored() {
    for rel in JPEGS {
        let mut bytes = read(rel);
        let (_, _, data) = reference(&bytes);
        bytes.extend_from_slice(b"\0\0\0\0trailing garbage\xFF\xD8\xFF\xE0");
        let img = decode_rgb8(&bytes, Path::new(rel)).unwrap();
        assert!(img.data == data, "{rel}");
    }
}

#[test]
fn truncated_jpeg_is_refused_strict_and_partial_lenient() {
    for rel in JPEGS {
        let bytes = read(rel);
        let (w, h, _) = reference(&bytes);
        let start = scan_data_start(&bytes);
        let len = bytes.len();
        // In the scan data (early, middle, late), and one or two bytes short of EOI.
        let cuts = [
            start + (len - start) / 10,
            (start + len) / 2,
            start + (len - start) * 9 / 10,
            len - 2,
            len - 1,
        ];
        for n in cuts {
            let cut = &bytes[..n];
            let path = Path::new(rel);
            let err = decode_rgb8(cut, path).unwrap_err().to_string();
            assert!(
                err.contains("truncated JPEG: the data ends before the end-of-image marker"),
                "{rel}[..{n}]: {err}"
            );
            assert!(err.contains(&format!("the file has {n} bytes")), "{err}");
            assert!(err.contains(LENIENT_HINT), "{err}");
            match decode_rgb8_with(cut, path, Decoding::Lenient) {
                Ok(d) => {
                    assert_eq!((d.image.width, d.image.height), (w, h), "{rel}[..{n}]");
                    let why = d.partial.expect("lenient names the cut");
                    assert!(why.starts_with("truncated JPEG"), "{why}");
                    assert!(!why.contains(LENIENT_HINT), "{why}");
                }
                // A progressive file cut inside a later scan header, say, may not decode.
                Err(e) => assert!(e.to_string().contains("truncated JPEG"), "{e}"),
            }
        }
    }
}

#[test]
fn lenient_jpeg_keeps_the_decoded_rows_and_greys_the_rest() {
    // A baseline photo cut half way through its scan: the top is the photo, the bottom grey.
    let bytes = read("data/images/rocket.jpg");
    let (w, _, full) = reference(&bytes);
    let start = scan_data_start(&bytes);
    let cut = &bytes[..(start + bytes.len()) / 2];
    let d = decode_rgb8_with(cut, Path::new("rocket.jpg"), Decoding::Lenient).unwrap();
    let row = 3 * w as usize;
    assert_eq!(d.image.data[..8 * row], full[..8 * row]);
    let bottom = &d.image.data[d.image.data.len() - 8 * row..];
    assert_eq!(grey_fraction(bottom), 1.0);
    let g = grey_fraction(&d.image.data);
    assert!(g > 0.2 && g < 0.8, "grey fraction {g}");
}

#[test]
fn jpeg_cut_before_any_scan_data_is_an_error_even_lenient() {
    for rel in JPEGS {
        let bytes = read(rel);
        let start = scan_data_start(&bytes);
        let dqt = bytes.windows(2).position(|p| p == [0xFF, 0xDB]).unwrap();
        for n in [dqt + 8, start - 3, start] {
            for decoding in [Decoding::Strict, Decoding::Lenient] {
                let err = decode_rgb8_with(&bytes[..n], Path::new(rel), decoding)
                    .unwrap_err()
                    .to_string();
                assert!(
                    err.contains("truncated JPEG"),
                    "{rel}[..{n}] {decoding:?}: {err}"
                );
            }
        }
    }
}

#[test]
fn truncated_png_is_refused_strict_and_partial_lenient() {
    for rel in PNGS {
        let bytes = read(rel);
        let (w, h, full) = reference(&bytes);
        let idat = bytes.windows(4).position(|p| p == b"IDAT").unwrap() + 4;
        let data_len = bytes.len() - 12 - idat - 4;
        for n in [idat + data_len / 3, idat + data_len * 2 / 3] {
            let cut = &bytes[..n];
            let path = Path::new(rel);
            let err = decode_rgb8(cut, path).unwrap_err().to_string();
            assert!(
                err.contains(
                    "truncated PNG: the data ends before the IEND chunk, inside the IDAT chunk"
                ),
                "{rel}[..{n}]: {err}"
            );
            assert!(err.contains(LENIENT_HINT), "{err}");
            let d = decode_rgb8_with(cut, path, Decoding::Lenient).unwrap();
            let why = d.partial.expect("lenient names the cut");
            assert!(
                why.contains("of the pixels decode, the rest are filled with flat grey"),
                "{why}"
            );
            assert_eq!((d.image.width, d.image.height), (w, h));
            // Every pixel is either the file's or the grey fill.
            let mut decoded = 0;
            for (a, b) in d.image.data.chunks_exact(3).zip(full.chunks_exact(3)) {
                if a == b {
                    decoded += 1;
                } else {
                    assert_eq!(a, [128, 128, 128], "{rel}[..{n}]");
                }
            }
            assert!(decoded > 0 && decoded < w * h, "{rel}[..{n}]: {decoded}");
            if !rel.contains("interlaced") {
                // Rows decode in order: the first row is the file's.
                let row = 3 * w as usize;
                assert_eq!(d.image.data[..row], full[..row], "{rel}[..{n}]");
            }
        }
    }
}

#[test]
fn png_cut_after_its_image_data_is_whole() {
    for rel in PNGS {
        let bytes = read(rel);
        let (_, _, full) = reference(&bytes);
        // Without the zlib checksum (the last 4 data bytes) and the IDAT CRC; without IEND at
        // all, inside its header, and inside its CRC.
        let end = bytes.len() - 12 - 4;
        for n in [
            end - 4,
            end - 1,
            end,
            bytes.len() - 12,
            bytes.len() - 8,
            bytes.len() - 2,
        ] {
            let img = decode_rgb8(&bytes[..n], Path::new(rel)).unwrap();
            assert!(img.data == full, "{rel}[..{n}]");
            let d = decode_rgb8_with(&bytes[..n], Path::new(rel), Decoding::Lenient).unwrap();
            assert!(d.partial.is_none(), "{rel}[..{n}]");
        }
    }
}

#[test]
fn png_cut_in_its_header_is_an_error_even_lenient() {
    let bytes = read("fuzz/corpus/image/small.png");
    for n in [12, 20, 33] {
        for decoding in [Decoding::Strict, Decoding::Lenient] {
            let err = decode_rgb8_with(&bytes[..n], Path::new("small.png"), decoding).unwrap_err();
            assert!(
                err.to_string().contains("truncated PNG"),
                "[..{n}] {decoding:?}: {err}"
            );
        }
    }
}

#[test]
fn loading_and_preparing_files_follow_the_decoding_mode() {
    let dir = std::env::temp_dir().join(format!("fam-decode-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = read("data/images/rocket.jpg");
    let whole = dir.join("whole.jpg");
    let cut = dir.join("cut.jpg");
    std::fs::write(&whole, &bytes).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();

    assert!(load_rgb8(&whole).is_ok());
    assert!(load_rgb8(&cut)
        .unwrap_err()
        .to_string()
        .contains("truncated JPEG"));
    assert!(load_rgb8_with(&cut, Decoding::Lenient)
        .unwrap()
        .partial
        .is_some());

    let spec = fam_core::traits::InputSpec::imagenet();
    let paths = [whole.as_path(), cut.as_path()];
    let strict = prepare_files(&paths, &spec);
    assert!(strict[0].is_ok());
    assert!(strict[1]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains(LENIENT_HINT));
    let lenient = prepare_files_with(&paths, &spec, Decoding::Lenient);
    assert!(lenient[0].as_ref().unwrap().1.is_none());
    let (prepared, partial) = lenient[1].as_ref().unwrap();
    assert!(partial.as_deref().unwrap().starts_with("truncated JPEG"));
    assert_eq!(prepared.chw.len(), 3 * 224 * 224);
    std::fs::remove_dir_all(&dir).unwrap();
}
