//! ONNX tensors to candle tensors: every data type fam computes with, the typed fields
//! (`float_data`, `int32_data`, ...) and `raw_data`, and *external data* (weights kept in a
//! file beside the model, as large and dynamo exports write them).
//!
//! Everything here reads untrusted input. The declared shape is checked against the data
//! before anything is allocated; an external file must be a relative path inside the
//! model's folder (no absolute path, no `..`, nothing that resolves outside it once links
//! are followed), and `offset`/`length` must lie inside the file and match the shape.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use candle_onnx::onnx::TensorProto;
use fam_core::candle::{DType, Device, Tensor};

/// `TensorProto.DataLocation.EXTERNAL`.
const EXTERNAL: i32 = 1;

/// Largest tensor read (bytes), inline or external: the largest model protobuf there is.
pub const MAX_TENSOR_BYTES: u64 = 2 << 30;

/// ONNX data types fam reads, with their names and sizes in bytes.
fn onnx_type(code: i32) -> Result<(&'static str, usize), String> {
    Ok(match code {
        1 => ("FLOAT", 4),
        2 => ("UINT8", 1),
        3 => ("INT8", 1),
        4 => ("UINT16", 2),
        5 => ("INT16", 2),
        6 => ("INT32", 4),
        7 => ("INT64", 8),
        9 => ("BOOL", 1),
        10 => ("FLOAT16", 2),
        11 => ("DOUBLE", 8),
        12 => ("UINT32", 4),
        13 => ("UINT64", 8),
        16 => ("BFLOAT16", 2),
        0 => return Err("has no data type (UNDEFINED)".into()),
        8 => return Err("is a STRING tensor, which fam cannot compute with".into()),
        other => return Err(format!("has data type {other}, which fam does not support")),
    })
}

/// The candle dtype an ONNX data type is held in: integers as I64 (shapes, indices), BOOL and
/// UINT8 as U8, floats as themselves.
pub fn candle_dtype(code: i32) -> Option<DType> {
    Some(match code {
        1 => DType::F32,
        2 | 9 => DType::U8,
        3..=7 | 12 | 13 => DType::I64,
        10 => DType::F16,
        11 => DType::F64,
        16 => DType::BF16,
        _ => return None,
    })
}

/// The shape a tensor declares, with its element count (checked: no negative dimension, no
/// overflow).
fn shape_of(t: &TensorProto) -> Result<(Vec<usize>, u64), String> {
    let mut n: u64 = 1;
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(format!(
                "has a negative dimension in its shape {:?}",
                t.dims
            ));
        }
        n = n
            .checked_mul(d as u64)
            .ok_or_else(|| format!("shape {:?} has too many elements", t.dims))?;
        shape.push(d as usize);
    }
    Ok((shape, n))
}

/// Converts one tensor. `model_dir` is the folder external data is resolved in.
pub fn tensor_from_proto(t: &TensorProto, model_dir: &Path) -> Result<Tensor, String> {
    let (name, size) = onnx_type(t.data_type)?;
    let (shape, n) = shape_of(t)?;
    let bytes = n
        .checked_mul(size as u64)
        .filter(|&b| b <= MAX_TENSOR_BYTES)
        .ok_or_else(|| {
            format!(
                "shape {:?} of {name} would need more than {MAX_TENSOR_BYTES} bytes",
                t.dims
            )
        })?;
    let external;
    let raw: Option<&[u8]> = if t.data_location == EXTERNAL {
        external = read_external(t, model_dir, bytes)?;
        Some(&external)
    } else if !t.raw_data.is_empty() {
        Some(&t.raw_data)
    } else {
        None
    };
    let cpu = &Device::Cpu;
    let n = n as usize;
    let built = match raw {
        Some(raw) => {
            if raw.len() as u64 != bytes {
                return Err(format!(
                    "has {} bytes of data, but its shape {:?} of {name} needs {bytes}",
                    raw.len(),
                    t.dims
                ));
            }
            from_le_bytes(t.data_type, raw, &shape, cpu)
        }
        None => from_typed_fields(t, name, n, &shape, cpu)?,
    };
    built.map_err(|e| first_line(&e.to_string()))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

fn from_le_bytes(
    code: i32,
    raw: &[u8],
    shape: &[usize],
    cpu: &Device,
) -> fam_core::candle::Result<Tensor> {
    fn ints<const K: usize>(raw: &[u8], f: impl Fn([u8; K]) -> i64) -> Vec<i64> {
        raw.chunks_exact(K)
            .map(|c| f(c.try_into().unwrap_or([0; K])))
            .collect()
    }
    match code {
        1 => {
            let v: Vec<f32> = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(v, shape, cpu)
        }
        11 => {
            let v: Vec<f64> = raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            Tensor::from_vec(v, shape, cpu)
        }
        10 => Tensor::from_raw_buffer(raw, DType::F16, shape, cpu),
        16 => Tensor::from_raw_buffer(raw, DType::BF16, shape, cpu),
        2 => Tensor::from_vec(raw.to_vec(), shape, cpu),
        9 => Tensor::from_vec(raw.iter().map(|&b| (b != 0) as u8).collect(), shape, cpu),
        3 => Tensor::from_vec(ints::<1>(raw, |b| i8::from_le_bytes(b) as i64), shape, cpu),
        4 => Tensor::from_vec(ints::<2>(raw, |b| u16::from_le_bytes(b) as i64), shape, cpu),
        5 => Tensor::from_vec(ints::<2>(raw, |b| i16::from_le_bytes(b) as i64), shape, cpu),
        6 => Tensor::from_vec(ints::<4>(raw, |b| i32::from_le_bytes(b) as i64), shape, cpu),
        12 => Tensor::from_vec(ints::<4>(raw, |b| u32::from_le_bytes(b) as i64), shape, cpu),
        7 => Tensor::from_vec(ints::<8>(raw, i64::from_le_bytes), shape, cpu),
        // UINT64 above i64::MAX saturates (fam only reads shapes and indices from integers).
        13 => Tensor::from_vec(
            ints::<8>(raw, |b| u64::from_le_bytes(b).min(i64::MAX as u64) as i64),
            shape,
            cpu,
        ),
        _ => Err(fam_core::candle::Error::Msg(format!(
            "data type {code} is not supported"
        ))),
    }
}

/// Data in the typed repeated fields (small tensors, `Constant` values).
fn from_typed_fields(
    t: &TensorProto,
    name: &str,
    n: usize,
    shape: &[usize],
    cpu: &Device,
) -> Result<fam_core::candle::Result<Tensor>, String> {
    let check = |len: usize, field: &str| -> Result<(), String> {
        if len != n {
            let what = if len == 0 {
                "no data".to_string()
            } else {
                format!("{len} values in {field}")
            };
            return Err(format!(
                "has {what}, but its shape {:?} of {name} needs {n} values",
                t.dims
            ));
        }
        Ok(())
    };
    Ok(match t.data_type {
        1 => {
            check(t.float_data.len(), "float_data")?;
            Tensor::from_vec(t.float_data.clone(), shape, cpu)
        }
        11 => {
            check(t.double_data.len(), "double_data")?;
            Tensor::from_vec(t.double_data.clone(), shape, cpu)
        }
        7 => {
            check(t.int64_data.len(), "int64_data")?;
            Tensor::from_vec(t.int64_data.clone(), shape, cpu)
        }
        12 | 13 => {
            check(t.uint64_data.len(), "uint64_data")?;
            let v = t
                .uint64_data
                .iter()
                .map(|&x| x.min(i64::MAX as u64) as i64)
                .collect();
            Tensor::from_vec(v, shape, cpu)
        }
        2 | 9 => {
            check(t.int32_data.len(), "int32_data")?;
            let v = t
                .int32_data
                .iter()
                .map(|&x| {
                    if t.data_type == 9 {
                        (x != 0) as u8
                    } else {
                        x as u8
                    }
                })
                .collect();
            Tensor::from_vec(v, shape, cpu)
        }
        3..=6 => {
            check(t.int32_data.len(), "int32_data")?;
            let v = t.int32_data.iter().map(|&x| x as i64).collect();
            Tensor::from_vec(v, shape, cpu)
        }
        10 | 16 => {
            // The 16-bit patterns, one per int32.
            check(t.int32_data.len(), "int32_data")?;
            let raw: Vec<u8> = t
                .int32_data
                .iter()
                .flat_map(|&x| (x as u16).to_le_bytes())
                .collect();
            let dt = if t.data_type == 10 {
                DType::F16
            } else {
                DType::BF16
            };
            Tensor::from_raw_buffer(&raw, dt, shape, cpu)
        }
        other => Err(fam_core::candle::Error::Msg(format!(
            "data type {other} is not supported"
        ))),
    })
}

/// The keys of `external_data`.
struct ExternalRef {
    location: String,
    offset: u64,
    length: Option<u64>,
}

fn parse_ref(t: &TensorProto) -> Result<ExternalRef, String> {
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for kv in &t.external_data {
        let number = |v: &str| -> Result<u64, String> {
            v.trim().parse::<u64>().map_err(|_| {
                format!(
                    "external data {} `{v}` is not a non-negative integer",
                    kv.key
                )
            })
        };
        match kv.key.as_str() {
            "location" => location = Some(kv.value.clone()),
            "offset" => offset = number(&kv.value)?,
            "length" => length = Some(number(&kv.value)?),
            _ => {} // "checksum" and unknown keys: not needed to read the data
        }
    }
    let location = location
        .filter(|l| !l.is_empty())
        .ok_or("is stored as external data but names no `location`")?;
    Ok(ExternalRef {
        location,
        offset,
        length,
    })
}

/// Checks an external data `location` and returns the file it names: a relative path whose
/// real path (links followed) lies inside `model_dir`.
pub fn resolve_location(location: &str, model_dir: &Path) -> Result<PathBuf, String> {
    let rel = Path::new(location);
    if location.contains('\0') {
        return Err(format!(
            "external data location {location:?} contains a NUL byte"
        ));
    }
    if rel.is_absolute() || location.starts_with('/') || location.starts_with('\\') {
        return Err(format!(
            "external data location `{location}` is an absolute path; it must be relative to the model's folder"
        ));
    }
    for c in rel.components() {
        match c {
            Component::ParentDir => {
                return Err(format!(
                    "external data location `{location}` contains `..`; it must stay inside the model's folder"
                ))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "external data location `{location}` is an absolute path; it must be relative to the model's folder"
                ))
            }
            _ => {}
        }
    }
    let dir = if model_dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        model_dir
    };
    let base = dir.canonicalize().map_err(|e| {
        format!(
            "external data location `{location}`: the model's folder {} cannot be resolved ({e})",
            dir.display()
        )
    })?;
    let file = dir.join(rel).canonicalize().map_err(|e| {
        format!(
            "external data file `{location}` cannot be opened in {} ({e})",
            dir.display()
        )
    })?;
    if !file.starts_with(&base) {
        return Err(format!(
            "external data location `{location}` resolves to {}, outside the model's folder {}",
            file.display(),
            base.display()
        ));
    }
    if !file.is_file() {
        return Err(format!(
            "external data location `{location}` is not a regular file"
        ));
    }
    Ok(file)
}

/// Reads the `bytes` bytes of an external tensor, after checking them against the file.
fn read_external(t: &TensorProto, model_dir: &Path, bytes: u64) -> Result<Vec<u8>, String> {
    let r = parse_ref(t)?;
    let loc = &r.location;
    if let Some(len) = r.length {
        if len != bytes {
            return Err(format!(
                "external data `{loc}`: length {len} does not match its shape {:?} ({bytes} bytes)",
                t.dims
            ));
        }
    }
    let path = resolve_location(loc, model_dir)?;
    let mut f = std::fs::File::open(&path)
        .map_err(|e| format!("external data file `{loc}` cannot be opened ({e})"))?;
    let file_len = f
        .metadata()
        .map_err(|e| format!("external data file `{loc}` cannot be read ({e})"))?
        .len();
    if r.offset > file_len {
        return Err(format!(
            "external data `{loc}`: offset {} is past the end of the file ({file_len} bytes)",
            r.offset
        ));
    }
    match r.offset.checked_add(bytes) {
        Some(end) if end <= file_len => {}
        _ => {
            return Err(format!(
                "external data `{loc}`: {bytes} bytes at offset {} run past the end of the file ({file_len} bytes)",
                r.offset
            ))
        }
    }
    let mut buf = vec![0u8; bytes as usize];
    f.seek(SeekFrom::Start(r.offset))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| format!("external data file `{loc}` cannot be read ({e})"))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_onnx::onnx::StringStringEntryProto;

    fn kv(k: &str, v: &str) -> StringStringEntryProto {
        StringStringEntryProto {
            key: k.into(),
            value: v.into(),
        }
    }

    fn ext(dims: &[i64], entries: &[(&str, &str)]) -> TensorProto {
        TensorProto {
            name: "w".into(),
            dims: dims.to_vec(),
            data_type: 1,
            data_location: EXTERNAL,
            external_data: entries.iter().map(|(k, v)| kv(k, v)).collect(),
            ..Default::default()
        }
    }

    fn folder(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fam-onnx-ext-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let data: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
        std::fs::write(d.join("w.bin"), data).unwrap();
        d
    }

    #[test]
    fn external_data_is_read_at_its_offset() {
        let d = folder("ok");
        let t = ext(
            &[2, 2],
            &[("location", "w.bin"), ("offset", "8"), ("length", "16")],
        );
        let v = tensor_from_proto(&t, &d).unwrap();
        assert_eq!(
            v.to_vec2::<f32>().unwrap(),
            vec![vec![2., 3.], vec![4., 5.]]
        );
        // Without a length, the shape says how much.
        let t = ext(&[3], &[("location", "./w.bin"), ("offset", "20")]);
        let v = tensor_from_proto(&t, &d).unwrap();
        assert_eq!(v.to_vec1::<f32>().unwrap(), vec![5., 6., 7.]);
    }

    #[test]
    fn bad_external_references_are_refused_with_the_value() {
        let d = folder("bad");
        let cases: Vec<(TensorProto, &str)> = vec![
            (
                ext(&[2], &[("location", "/etc/passwd")]),
                "`/etc/passwd` is an absolute path",
            ),
            (
                ext(&[2], &[("location", "../w.bin")]),
                "`../w.bin` contains `..`",
            ),
            (ext(&[2], &[("location", "a/../../w.bin")]), "contains `..`"),
            (
                ext(&[2], &[("location", "missing.bin")]),
                "`missing.bin` cannot be opened",
            ),
            (ext(&[2], &[("offset", "0")]), "names no `location`"),
            (
                ext(&[2], &[("location", "w.bin"), ("offset", "-4")]),
                "offset `-4` is not a non-negative integer",
            ),
            (
                ext(&[2], &[("location", "w.bin"), ("offset", "64")]),
                "offset 64 is past the end of the file (32 bytes)",
            ),
            (
                ext(&[2], &[("location", "w.bin"), ("offset", "28")]),
                "8 bytes at offset 28 run past the end of the file (32 bytes)",
            ),
            (
                ext(
                    &[2],
                    &[("location", "w.bin"), ("offset", "18446744073709551615")],
                ),
                "past the end",
            ),
            (
                ext(&[2], &[("location", "w.bin"), ("length", "12")]),
                "length 12 does not match its shape [2] (8 bytes)",
            ),
            (
                ext(&[1 << 20, 1 << 20], &[("location", "w.bin")]),
                "would need more than",
            ),
            (
                ext(&[1 << 40, 1 << 40], &[("location", "w.bin")]),
                "has too many elements",
            ),
            (ext(&[-1], &[("location", "w.bin")]), "negative dimension"),
        ];
        for (t, want) in cases {
            let e = tensor_from_proto(&t, &d).unwrap_err();
            assert!(e.contains(want), "`{want}` not in `{e}`");
        }
        // A link that leaves the folder is refused even though its name is innocent.
        #[cfg(unix)]
        {
            let outside = d
                .join("..")
                .join(format!("fam-onnx-outside-{}", std::process::id()));
            std::fs::write(&outside, [0u8; 8]).unwrap();
            let link = d.join("link.bin");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&outside, &link).unwrap();
            let e = tensor_from_proto(&ext(&[2], &[("location", "link.bin")]), &d).unwrap_err();
            assert!(e.contains("outside the model's folder"), "{e}");
            let _ = std::fs::remove_file(&outside);
        }
    }

    #[test]
    fn typed_fields_and_raw_data_keep_their_shape() {
        let d = Path::new(".");
        let t = TensorProto {
            dims: vec![2, 1],
            data_type: 6,
            int32_data: vec![-3, 7],
            ..Default::default()
        };
        let v = tensor_from_proto(&t, d).unwrap();
        assert_eq!(v.dims(), &[2, 1]);
        assert_eq!(v.to_vec2::<i64>().unwrap(), vec![vec![-3], vec![7]]);
        let t = TensorProto {
            dims: vec![2],
            data_type: 6,
            raw_data: [5i32, -1].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        };
        assert_eq!(
            tensor_from_proto(&t, d).unwrap().to_vec1::<i64>().unwrap(),
            vec![5, -1]
        );
        let t = TensorProto {
            dims: vec![],
            data_type: 1,
            float_data: vec![1.5],
            ..Default::default()
        };
        assert_eq!(
            tensor_from_proto(&t, d)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            1.5
        );
        // The dynamo failure: an initializer with neither data nor an external reference.
        let t = TensorProto {
            dims: vec![4, 3],
            data_type: 1,
            ..Default::default()
        };
        let e = tensor_from_proto(&t, d).unwrap_err();
        assert!(
            e.contains("has no data, but its shape [4, 3] of FLOAT needs 12 values"),
            "{e}"
        );
        let t = TensorProto {
            dims: vec![3],
            data_type: 1,
            raw_data: vec![0; 5],
            ..Default::default()
        };
        let e = tensor_from_proto(&t, d).unwrap_err();
        assert!(
            e.contains("has 5 bytes of data, but its shape [3] of FLOAT needs 12"),
            "{e}"
        );
        let t = TensorProto {
            dims: vec![1],
            data_type: 8,
            ..Default::default()
        };
        assert!(tensor_from_proto(&t, d).unwrap_err().contains("STRING"));
    }
}
