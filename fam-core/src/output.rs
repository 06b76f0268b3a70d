//! What renderers write through: the [`OutputSink`] the host hands them (atomic writes, the
//! manifest), and the NumPy `.npy` format of raw maps.

use crate::error::{FamError, Result};

/// Where renderers write. Every file goes through here so that it is written atomically
/// (temporary file, then rename) and listed in `manifest.json`.
pub trait OutputSink {
    /// Writes `bytes` to `rel_path` (relative, `/`-separated, made of safe names) inside the
    /// output folder.
    fn write(&mut self, rel_path: &str, bytes: &[u8]) -> Result<()>;
    /// The files written so far in this run (relative paths), for renderers that link or
    /// summarise the others' files (`html`).
    fn written_files(&self) -> Vec<String> {
        Vec::new()
    }
    /// In a resumed run (`fam-cli run --resume`) of an unchanged pipeline, a file the
    /// interrupted run left (complete, since writes are atomic) is kept: this records it as
    /// written and returns `true`, and the renderer skips producing it. `false` otherwise.
    fn reuse(&mut self, _rel_path: &str) -> bool {
        false
    }
}

/// Serializes a `f32` array as a NumPy `.npy` (version 1.0, little-endian `<f4`, C order).
pub fn npy_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let mut out = npy_f32_header(shape);
    out.reserve(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The header of a version 1.0 `.npy` file of little-endian f32 in C order with this shape:
/// the data that follows starts at a multiple of 64 bytes, so a memory map of the file can
/// be read as `f32` in place.
pub fn npy_f32_header(shape: &[usize]) -> Vec<u8> {
    npy_header("<f4", shape)
}

/// A `.npy` file of little-endian u32 in C order (indices).
pub fn npy_u32(shape: &[usize], data: &[u32]) -> Vec<u8> {
    let mut out = npy_header("<u4", shape);
    out.reserve(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The header of a version 1.0 `.npy` file of `descr` values in C order, padded so that
/// the data starts at a multiple of 64 bytes.
fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let shape_txt = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // magic (6) + version (2) + header len (2) + header, padded to 64 bytes, ending in \n.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

/// The shape of a version 1.0 `.npy` file of little-endian f32 in C order, and the offset
/// of its data, from the file's first bytes.
pub fn read_npy_f32_header(bytes: &[u8]) -> Result<(Vec<usize>, usize)> {
    let bad = |m: &str| FamError::invalid(format!("npy: {m}"));
    if bytes.len() < 10 || &bytes[..8] != b"\x93NUMPY\x01\x00" {
        return Err(bad("not a version 1.0 .npy file"));
    }
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = bytes
        .get(10..10 + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("only little-endian f32 in C order is supported"));
    }
    let shape_txt = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let shape = shape_txt
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<usize>().map_err(|_| bad("bad shape")))
        .collect::<Result<Vec<_>>>()?;
    Ok((shape, 10 + hlen))
}

/// Reads a `.npy` written by [`npy_f32`]: `(shape, values)`.
pub fn read_npy_f32(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>)> {
    let (shape, offset) = read_npy_f32_header(bytes)?;
    let n: usize = shape.iter().product();
    let data = &bytes[offset..];
    if data.len() != n * 4 {
        return Err(FamError::invalid("npy: data size does not match the shape"));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_parsable() {
        let bytes = npy_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert!(header.ends_with('\n'));
        assert_eq!(bytes.len(), 10 + hlen + 24);
        assert_eq!(&bytes[10 + hlen..10 + hlen + 4], &1.0f32.to_le_bytes());
        let (shape, values) = read_npy_f32(&bytes).unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(values, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert!(read_npy_f32(&bytes[..bytes.len() - 1]).is_err());
    }
}
