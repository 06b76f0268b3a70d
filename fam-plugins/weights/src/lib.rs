//! fam-weights: loading model weights: safetensors, PyTorch zip `.pth`/`.pt`, and PyTorch's legacy
//! (pre-1.6, non-zip) `.pth` format, whose reader `candle_core::pickle` lacks.

pub mod pickle;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use fam_core::candle::{DType, Device, Tensor};

use crate::pickle::{StorageType, TensorRef, Value};
use fam_core::error::{FamError, Result};

/// Named tensors on the CPU, as stored.
pub type StateDict = HashMap<String, Tensor>;

/// The legacy format starts with this pickled magic number.
const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;

/// Reads every tensor of a weights file, detecting its format from its first bytes.
pub fn load_state_dict(path: &Path) -> Result<StateDict> {
    let data = std::fs::read(path).map_err(|e| FamError::io(path, e))?;
    state_dict_from_bytes(&data, path)
}

/// Reads a state dict from a checkpoint's bytes; `path` names them in errors.
pub fn state_dict_from_bytes(data: &[u8], path: &Path) -> Result<StateDict> {
    let werr = |m: String| FamError::weights(path, m);
    let sd = if data.starts_with(b"PK\x03\x04") {
        load_zip(data).map_err(|e| werr(strip(e)))?
    } else if data.len() >= 2 && data[0] == 0x80 {
        load_legacy(data).map_err(|e| werr(strip(e)))?
    } else if data.len() >= 9 && data[8] == b'{' {
        fam_core::candle::safetensors::load_buffer(data, &Device::Cpu).map_err(|e| {
            // candle appends a backtrace when RUST_BACKTRACE is set: keep the message.
            let msg = e.to_string();
            werr(format!(
                "invalid safetensors file: {}",
                msg.lines().next().unwrap_or_default()
            ))
        })?
    } else {
        return Err(werr(
            "unrecognised format (expected safetensors, a PyTorch zip checkpoint or a legacy PyTorch pickle)"
                .into(),
        ));
    };
    check_finite(&sd).map_err(werr)?;
    Ok(sd)
}

/// Refuses float tensors holding NaN or infinity (a corrupt or diverged checkpoint), naming
/// the first such tensor.
fn check_finite(sd: &StateDict) -> std::result::Result<(), String> {
    let mut names: Vec<&String> = sd.keys().collect();
    names.sort();
    for name in names {
        let t = &sd[name];
        if !t.dtype().is_float() {
            continue;
        }
        let values: Vec<f32> = t
            .to_dtype(fam_core::candle::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(format!(
                "tensor `{name}` has {bad} non-finite value(s) (NaN or infinity); the checkpoint is corrupt or the training diverged"
            ));
        }
    }
    Ok(())
}

fn strip(e: FamError) -> String {
    match e {
        FamError::Invalid(m) => m,
        other => other.to_string(),
    }
}

/// Legacy layout: pickled magic number, protocol version, system info, the state dict
/// (storages as persistent ids), the list of storage keys, then each storage's raw bytes
/// preceded by its element count (u64 little-endian).
fn load_legacy(data: &[u8]) -> Result<StateDict> {
    let mut pos = 0;
    let magic = pickle::read_pickle(data, &mut pos)?;
    let is_magic = match &magic {
        Value::BigInt(b) if b.len() <= 16 => {
            let mut le = [0u8; 16];
            le[..b.len()].copy_from_slice(b);
            u128::from_le_bytes(le) == LEGACY_MAGIC
        }
        _ => false,
    };
    if !is_magic {
        return Err(FamError::invalid(
            "not a PyTorch checkpoint (legacy magic number missing)",
        ));
    }
    let _protocol = pickle::read_pickle(data, &mut pos)?;
    let _sys_info = pickle::read_pickle(data, &mut pos)?;
    let root = pickle::read_pickle(data, &mut pos)?;
    let keys = match pickle::read_pickle(data, &mut pos)? {
        Value::List(keys) => keys,
        _ => return Err(FamError::invalid("storage key list missing")),
    };
    let refs = pickle::tensors_of(&root);
    let mut kinds: HashMap<String, StorageType> = HashMap::new();
    for (_, t) in &refs {
        kinds.insert(t.storage.key.clone(), t.storage.dtype);
    }
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in keys {
        let Value::Str(key) = key else {
            return Err(FamError::invalid("storage key is not a string"));
        };
        let elem = kinds.get(&key).map(|k| k.size()).unwrap_or(1);
        let header = data
            .get(pos..pos + 8)
            .ok_or_else(|| FamError::invalid(format!("truncated before storage `{key}`")))?;
        let numel = u64::from_le_bytes(header.try_into().unwrap());
        pos += 8;
        let nbytes = numel
            .checked_mul(elem as u64)
            .filter(|n| *n <= (data.len() - pos) as u64)
            .ok_or_else(|| {
                FamError::invalid(format!(
                    "storage `{key}` claims {numel} elements, more than the {} bytes left in the file",
                    data.len() - pos
                ))
            })? as usize;
        storages.insert(key, &data[pos..pos + nbytes]);
        pos += nbytes;
    }
    build(refs, |key| storages.get(key).copied())
}

/// Zip layout: `<name>/data.pkl` and one `<name>/data/<key>` entry per storage.
fn load_zip(data: &[u8]) -> Result<StateDict> {
    let zerr = |e: zip::result::ZipError| FamError::invalid(format!("zip: {e}"));
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(data)).map_err(zerr)?;
    let names: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| FamError::invalid("zip checkpoint without data.pkl"))?
        .clone();
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let read = |archive: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>, name: &str, limit: u64| {
        let f = archive.by_name(name).map_err(zerr)?;
        if f.size() > limit {
            return Err(FamError::invalid(format!(
                "entry `{name}` is {} bytes, larger than the archive",
                f.size()
            )));
        }
        let mut buf = Vec::with_capacity(f.size() as usize);
        f.take(limit)
            .read_to_end(&mut buf)
            .map_err(|e| FamError::invalid(format!("zip: {e}")))?;
        Ok(buf)
    };
    // Stored entries are never larger than the archive; compressed ones are capped at 4x.
    let limit = (data.len() as u64).saturating_mul(4);
    let pkl_bytes = read(&mut archive, &pkl, limit)?;
    let root = pickle::read_pickle(&pkl_bytes, &mut 0)?;
    let refs = pickle::tensors_of(&root);
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for (_, t) in &refs {
        if !storages.contains_key(&t.storage.key) {
            let name = format!("{prefix}data/{}", t.storage.key);
            storages.insert(t.storage.key.clone(), read(&mut archive, &name, limit)?);
        }
    }
    build(refs, |key| storages.get(key).map(Vec::as_slice))
}

fn build<'a>(
    refs: Vec<(String, TensorRef)>,
    storage: impl Fn(&str) -> Option<&'a [u8]>,
) -> Result<StateDict> {
    if refs.is_empty() {
        return Err(FamError::invalid("no tensors found in the checkpoint"));
    }
    let mut out = HashMap::new();
    for (name, t) in refs {
        let bytes = storage(&t.storage.key).ok_or_else(|| {
            FamError::invalid(format!(
                "tensor `{name}`: storage `{}` missing",
                t.storage.key
            ))
        })?;
        out.insert(name.clone(), to_tensor(&name, &t, bytes)?);
    }
    Ok(out)
}

fn to_tensor(name: &str, t: &TensorRef, bytes: &[u8]) -> Result<Tensor> {
    let elem = t.storage.dtype.size();
    let err = |m: String| FamError::invalid(format!("tensor `{name}`: {m}"));
    let available = (bytes.len() / elem) as u64;
    let numel: u64 = t
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| err("shape overflows".into()))?;
    // Last element reached by the view, checked before anything is copied.
    let extent = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(0u64, |acc, (&d, &s)| {
            if d == 0 {
                Some(acc)
            } else {
                acc.checked_add((d as u64 - 1).checked_mul(s as u64)?)
            }
        })
        .ok_or_else(|| err("strides overflow".into()))?;
    if numel > 0 && t.offset.saturating_add(extent) >= available {
        return Err(err(format!(
            "view (offset {}, shape {:?}, stride {:?}) reaches past its storage of {available} elements",
            t.offset, t.shape, t.stride
        )));
    }
    let mut raw = Vec::with_capacity(numel as usize * elem);
    let contiguous = {
        let mut expect = 1usize;
        t.shape.iter().zip(&t.stride).rev().all(|(&d, &s)| {
            let ok = d == 1 || s == expect;
            expect *= d;
            ok
        })
    };
    // Every read is checked again (an empty view may have any offset; a fuzzer found one).
    let slice = |start: usize, len: usize| {
        start
            .checked_add(len)
            .and_then(|end| bytes.get(start..end))
            .ok_or_else(|| {
                err(format!(
                    "view (offset {}, shape {:?}, stride {:?}) reaches past its storage of {available} elements",
                    t.offset, t.shape, t.stride
                ))
            })
    };
    if numel == 0 {
    } else if contiguous {
        let start = t.offset as usize * elem;
        raw.extend_from_slice(slice(start, numel as usize * elem)?);
    } else {
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let off =
                t.offset as usize + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            raw.extend_from_slice(slice(off * elem, elem)?);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
    let (dtype, raw) = match t.storage.dtype {
        StorageType::F64 => (DType::F64, raw),
        StorageType::F32 => (DType::F32, raw),
        StorageType::F16 => (DType::F16, raw),
        StorageType::BF16 => (DType::BF16, raw),
        StorageType::I64 => (DType::I64, raw),
        StorageType::I32 => (DType::I32, raw),
        StorageType::I16 => (DType::I16, raw),
        StorageType::U8 | StorageType::Bool => (DType::U8, raw),
        StorageType::I8 => (
            DType::I16,
            raw.iter()
                .flat_map(|&b| (b as i8 as i16).to_le_bytes())
                .collect(),
        ),
    };
    Tensor::from_raw_buffer(&raw, dtype, &t.shape, &Device::Cpu).map_err(|e| err(e.to_string()))
}

/// Writes a state dict as safetensors (used to convert checkpoints).
pub fn save_safetensors(tensors: &StateDict, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    fam_core::candle::safetensors::save(tensors, &tmp)
        .map_err(|e| FamError::weights(path, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| FamError::io(path, e))
}

/// Looks up a tensor, naming the file and the missing key.
pub fn get<'a>(sd: &'a StateDict, path: &Path, name: &str) -> Result<&'a Tensor> {
    sd.get(name)
        .ok_or_else(|| FamError::weights(path, format!("missing tensor `{name}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_views_are_gathered() {
        // storage 0..6 as f32; view offset 1, shape [2, 2], stride [1, 2] (a transpose)
        let bytes: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let t = TensorRef {
            storage: pickle::StorageRef {
                key: "0".into(),
                dtype: StorageType::F32,
                numel: 6,
            },
            offset: 1,
            shape: vec![2, 2],
            stride: vec![1, 2],
        };
        let x = to_tensor("w", &t, &bytes).unwrap();
        assert_eq!(
            x.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 3.0], vec![2.0, 4.0]]
        );
        let out_of_bounds = TensorRef { offset: 3, ..t };
        let err = to_tensor("w", &out_of_bounds, &bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("reaches past its storage"), "{err}");
    }

    #[test]
    fn unknown_formats_are_named() {
        let dir = std::env::temp_dir().join(format!("fam-w-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("junk.bin");
        std::fs::write(&p, b"hello world, not weights").unwrap();
        let err = load_state_dict(&p).unwrap_err().to_string();
        assert!(
            err.contains("junk.bin") && err.contains("unrecognised format"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
