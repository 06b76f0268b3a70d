//! A restricted pickle reader for PyTorch state dicts.
//!
//! It runs no code: the only globals it accepts are the ones a state dict needs (tensor
//! rebuild functions, typed storages, `OrderedDict`); anything else is refused with an error
//! that names it. Every length read from the file is checked against the bytes left before
//! anything is allocated.

use fam_core::error::{FamError, Result};

/// A storage referenced by a persistent id: its key, element type and element count.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: StorageType,
    pub numel: u64,
}

/// Element types of typed storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageType {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }
}

/// A tensor as the pickle describes it: a view into a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: u64,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// Values on the pickle stack.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for `i64`, as little-endian two's complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage(StorageRef),
    Tensor(TensorRef),
    Mark,
}

/// Globals a state dict may reference.
const ALLOWED: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
];

fn allowed(module: &str, name: &str) -> bool {
    ALLOWED.contains(&(module, name))
        || (module == "torch" && StorageType::from_class(name).is_some())
}

/// Reads one pickle from `data` starting at `*pos`; leaves `*pos` after its STOP opcode.
pub fn read_pickle(data: &[u8], pos: &mut usize) -> Result<Value> {
    let mut vm = Vm {
        data,
        pos: *pos,
        stack: Vec::new(),
        memo: std::collections::HashMap::new(),
    };
    let v = vm.run()?;
    *pos = vm.pos;
    Ok(v)
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: std::collections::HashMap<u32, Value>,
}

fn bad(msg: impl Into<String>) -> FamError {
    FamError::invalid(format!("pickle: {}", msg.into()))
}

impl<'a> Vm<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.data.len() - self.pos {
            return Err(bad(format!(
                "truncated: needs {n} bytes at offset {}, {} left",
                self.pos,
                self.data.len() - self.pos
            )));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("unterminated text line"))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }
    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| bad("stack underflow"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| bad("MARK expected"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().ok_or_else(|| bad("stack underflow"))
    }
    fn string(&mut self, n: usize) -> Result<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| bad("invalid UTF-8 string"))
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.u64()?; // FRAME
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.stack.push(Value::Int(v))
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.stack.push(Value::Int(v))
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.stack.push(Value::Int(v))
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        // Kept as raw bytes (the legacy format's magic number is 10 bytes).
                        self.stack.push(Value::BigInt(b.to_vec()));
                        continue;
                    }
                    let mut v: i64 = 0;
                    for (i, byte) in b.iter().enumerate() {
                        v |= (*byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s))
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s))
                }
                0x8d => {
                    let n = self.u64()?;
                    let n = usize::try_from(n).map_err(|_| bad("string too large"))?;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s))
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let s = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(s))
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let s = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(s))
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let s = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(s))
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let s = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(s))
                }
                b')' => self.stack.push(Value::Tuple(vec![])),
                b']' => self.stack.push(Value::List(vec![])),
                b'}' => self.stack.push(Value::Dict(vec![])),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85 => {
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a]))
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b]))
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b, c]))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items))
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let dict = pairs(items)?;
                    self.stack.push(Value::Dict(dict))
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        other => return Err(bad(format!("APPEND to {}", kind(other)))),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        other => return Err(bad(format!("APPENDS to {}", kind(other)))),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.push((k, v)),
                        other => return Err(bad(format!("SETITEM on {}", kind(other)))),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let new = pairs(items)?;
                    match self.top()? {
                        Value::Dict(d) => d.extend(new),
                        other => return Err(bad(format!("SETITEMS on {}", kind(other)))),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memoize(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memoize(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memoize(i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.get(i)?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.get(i)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(m, n)?,
                        _ => return Err(bad("STACK_GLOBAL needs two strings")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent(pid)?;
                    self.stack.push(v)
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = reduce(func, args)?;
                    self.stack.push(v)
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args); only for allowed globals
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = reduce(cls, args)?;
                    self.stack.push(v)
                }
                b'b' => {
                    // BUILD: state of an OrderedDict (e.g. `_metadata`) or a tensor: ignored
                    self.pop()?;
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v)
                }
                0x8f => self.stack.push(Value::List(vec![])), // EMPTY_SET
                0x90 => {
                    let items = self.pop_mark()?;
                    if let Value::List(l) = self.top()? {
                        l.extend(items)
                    }
                }
                other => {
                    return Err(bad(format!(
                        "unsupported opcode 0x{other:02x} at offset {}",
                        self.pos - 1
                    )))
                }
            }
        }
    }

    fn memoize(&mut self, i: u32) -> Result<()> {
        if self.memo.len() > 10_000_000 {
            return Err(bad("memo too large"));
        }
        let v = self
            .stack
            .last()
            .ok_or_else(|| bad("PUT on empty stack"))?
            .clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn get(&mut self, i: u32) -> Result<()> {
        let v = self
            .memo
            .get(&i)
            .ok_or_else(|| bad(format!("memo key {i} not found")))?
            .clone();
        self.stack.push(v);
        Ok(())
    }

    fn global(&mut self, module: String, name: String) -> Result<()> {
        if !allowed(&module, &name) {
            return Err(bad(format!(
                "refusing global `{module}.{name}`: a state dict needs only tensors, storages and OrderedDict (was the whole model pickled? save `model.state_dict()` instead)"
            )));
        }
        self.stack.push(Value::Global(module, name));
        Ok(())
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "bool",
        Value::Int(_) | Value::BigInt(_) => "int",
        Value::Float(_) => "float",
        Value::Str(_) => "str",
        Value::Bytes(_) => "bytes",
        Value::Tuple(_) => "tuple",
        Value::List(_) => "list",
        Value::Dict(_) => "dict",
        Value::Global(..) => "global",
        Value::Storage(_) => "storage",
        Value::Tensor(_) => "tensor",
        Value::Mark => "mark",
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if items.len() % 2 != 0 {
        return Err(bad("odd number of dict items"));
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn int(v: &Value, what: &str) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::Bool(b) => Ok(*b as i64),
        other => Err(bad(format!("{what}: expected int, got {}", kind(other)))),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|i| {
                let x = int(i, what)?;
                usize::try_from(x).map_err(|_| bad(format!("{what}: negative value {x}")))
            })
            .collect(),
        other => Err(bad(format!("{what}: expected tuple, got {}", kind(other)))),
    }
}

/// `('storage', torch.FloatStorage, key, location, numel[, view_metadata])`.
fn persistent(pid: Value) -> Result<Value> {
    let Value::Tuple(items) = pid else {
        return Err(bad("persistent id is not a tuple"));
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(_, cls), Value::Str(key), _location, numel, ..]
            if tag == "storage" =>
        {
            let dtype = StorageType::from_class(cls)
                .ok_or_else(|| bad(format!("unsupported storage type `{cls}`")))?;
            let numel = int(numel, "storage size")?;
            let numel = u64::try_from(numel).map_err(|_| bad("negative storage size"))?;
            Ok(Value::Storage(StorageRef {
                key: key.clone(),
                dtype,
                numel,
            }))
        }
        _ => Err(bad("unrecognised persistent id (expected a storage)")),
    }
}

fn reduce(func: Value, args: Value) -> Result<Value> {
    let Value::Global(module, name) = &func else {
        return Err(bad(format!("REDUCE on {}", kind(&func))));
    };
    let Value::Tuple(args) = args else {
        return Err(bad("REDUCE arguments are not a tuple"));
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => Ok(Value::Dict(vec![])),
        ("torch", "Size") => Ok(args.into_iter().next().unwrap_or(Value::Tuple(vec![]))),
        ("torch._utils", "_rebuild_parameter") => args
            .into_iter()
            .next()
            .ok_or_else(|| bad("_rebuild_parameter without arguments")),
        ("torch._utils", "_rebuild_tensor") | ("torch._utils", "_rebuild_tensor_v2") => {
            if args.len() < 4 {
                return Err(bad(format!("{name} with {} arguments", args.len())));
            }
            let Value::Storage(storage) = &args[0] else {
                return Err(bad(format!("{name}: first argument is not a storage")));
            };
            let offset = int(&args[1], "storage offset")?;
            let shape = ints(&args[2], "size")?;
            let stride = ints(&args[3], "stride")?;
            if shape.len() != stride.len() {
                return Err(bad("size and stride have different lengths"));
            }
            Ok(Value::Tensor(TensorRef {
                storage: storage.clone(),
                offset: u64::try_from(offset).map_err(|_| bad("negative storage offset"))?,
                shape,
                stride,
            }))
        }
        _ => Err(bad(format!("refusing to call `{module}.{name}`"))),
    }
}

/// Flattens a (possibly nested) state dict into `(dotted name, tensor)` pairs. A checkpoint
/// that wraps the weights (`{"state_dict": {...}}`, `{"model": {...}}`) is unwrapped.
pub fn tensors_of(value: &Value) -> Vec<(String, TensorRef)> {
    let mut out = Vec::new();
    collect(value, "", &mut out);
    out
}

fn collect(v: &Value, prefix: &str, out: &mut Vec<(String, TensorRef)>) {
    match v {
        Value::Tensor(t) => out.push((prefix.to_string(), t.clone())),
        Value::Dict(items) => {
            for (k, v) in items {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                let name = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                collect(v, &name, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pickle.dumps(collections.OrderedDict([("w", 7)]), protocol=2)` with the int replaced
    /// by a tensor rebuild, written out by hand.
    fn state_dict_pickle() -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01(");
        p.extend(b"X\x01\x00\x00\x00w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02(");
        // persistent id ('storage', torch.FloatStorage, '0', 'cpu', 6)
        p.extend(b"(X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend(b"K\x01K\x02K\x02\x86K\x02K\x01\x86\x89ccollections\nOrderedDict\n)Rtq\x05R");
        p.extend(b"u.");
        p
    }

    #[test]
    fn reads_a_state_dict() {
        let data = state_dict_pickle();
        let mut pos = 0;
        let v = read_pickle(&data, &mut pos).unwrap();
        assert_eq!(pos, data.len());
        let t = tensors_of(&v);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].0, "w");
        assert_eq!(t[0].1.shape, vec![2, 2]);
        assert_eq!(t[0].1.stride, vec![2, 1]);
        assert_eq!(t[0].1.offset, 1);
        assert_eq!(t[0].1.storage.numel, 6);
        assert_eq!(t[0].1.storage.dtype, StorageType::F32);
    }

    #[test]
    fn refuses_code_execution() {
        let data = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
        let err = read_pickle(data, &mut 0).unwrap_err().to_string();
        assert!(err.contains("refusing global `os.system`"), "{err}");
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let data = state_dict_pickle();
        for cut in 0..data.len() {
            assert!(read_pickle(&data[..cut], &mut 0).is_err());
        }
        let huge = b"\x80\x02X\xff\xff\xff\x7f";
        let err = read_pickle(huge, &mut 0).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
