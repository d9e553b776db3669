//! A safe reader for Python pickles (protocols 0-5, no out-of-band buffers): it builds a tree
//! of values and never runs anything. Calls (`GLOBAL` + `REDUCE`, `BUILD`, `NEWOBJ`) are kept as
//! data; [`ndarray`] then recognises numpy arrays by their exact structure and rejects anything
//! else. Used for the CIFAR python batches and the reference's embedding pickles.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A pickled value. Lists and dicts are shared (`Rc`) because pickles mutate them after
/// memoising them.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Bytes(Rc<Vec<u8>>),
    Str(Rc<str>),
    List(Rc<RefCell<Vec<Value>>>),
    Tuple(Rc<Vec<Value>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A reference to `module.name`, never imported.
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)`, never called.
    Reduce {
        callable: Box<Value>,
        args: Box<Value>,
    },
    /// `obj.__setstate__(state)`, never run.
    Build {
        obj: Box<Value>,
        state: Box<Value>,
    },
}

impl Value {
    /// The entry under a str or bytes key of a dict.
    pub fn get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d
                .borrow()
                .iter()
                .find(|(k, _)| k.as_text().as_deref() == Some(key))
                .map(|(_, v)| v.clone()),
            _ => None,
        }
    }

    /// A str, or bytes holding UTF-8 (Python 2 pickles read with encoding='bytes').
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.to_string()),
            Value::Bytes(b) => std::str::from_utf8(b).ok().map(str::to_string),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// Elements of a list or tuple.
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::List(l) => Some(l.borrow().clone()),
            Value::Tuple(t) => Some(t.to_vec()),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Value::Global { module, name } => format!("{module}.{name}"),
            Value::Reduce { callable, .. } => format!("a call of {}", callable.describe()),
            Value::Build { obj, .. } => format!("a built {}", obj.describe()),
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) => "an int".into(),
            Value::Float(_) => "a float".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Str(_) => "a str".into(),
            Value::List(_) => "a list".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::Dict(_) => "a dict".into(),
        }
    }
}

/// Largest container or string length accepted from a length prefix (damage guard).
const MAX_LEN: usize = 1 << 34;
/// Most stack entries, marks and memo entries accepted.
const MAX_ITEMS: usize = 1 << 26;

struct Machine<'a> {
    b: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
}

/// Parses a pickle into its value tree.
pub fn parse(bytes: &[u8]) -> Result<Value, String> {
    let mut m = Machine {
        b: bytes,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    m.run().map_err(|e| format!("pickle byte {}: {e}", m.pos))
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("truncated pickle")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes(s.try_into().expect("8 bytes")))
    }
    fn checked_len(n: u64) -> Result<usize, String> {
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= MAX_LEN)
            .ok_or_else(|| format!("length {n} is implausible"))
    }
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.b[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("unterminated text line")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "text line is not UTF-8")?;
        self.pos += n + 1;
        Ok(s)
    }
    fn push(&mut self, v: Value) -> Result<(), String> {
        if self.stack.len() >= MAX_ITEMS {
            return Err("stack too deep".into());
        }
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> Result<Value, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("pop across a mark".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "stack underflow".to_string())
    }
    fn top(&mut self) -> Result<&mut Value, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".to_string())
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self.marks.pop().ok_or("no mark on the stack")?;
        if m > self.stack.len() {
            return Err("mark beyond the stack".into());
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_put(&mut self, key: u64) -> Result<(), String> {
        if self.memo.len() >= MAX_ITEMS {
            return Err("memo too large".into());
        }
        let v = self.stack.last().ok_or("memoising an empty stack")?.clone();
        self.memo.insert(key, v);
        Ok(())
    }
    fn memo_get(&mut self, key: u64) -> Result<(), String> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| format!("memo key {key} was never stored"))?;
        self.push(v)
    }
    fn set_items(&mut self, target: &Value, items: Vec<Value>) -> Result<(), String> {
        let Value::Dict(d) = target else {
            return Err(format!("SETITEM on {}", target.describe()));
        };
        if !items.len().is_multiple_of(2) {
            return Err("odd number of items for a dict".into());
        }
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }
    fn append(&mut self, target: &Value, items: Vec<Value>) -> Result<(), String> {
        match target {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => Err(format!("APPEND on {}", other.describe())),
        }
    }

    fn run(&mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("pickle protocol {proto} is not supported"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => {
                    if self.marks.len() >= MAX_ITEMS {
                        return Err("too many marks".into());
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v.into()))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v.into()))?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        usize::from(self.u8()?)
                    } else {
                        {
                            let n = self.u32()?;
                            Self::checked_len(n.into())?
                        }
                    };
                    let raw = self.take(n)?;
                    if n > 8 {
                        return Err(format!("integer of {n} bytes is too large"));
                    }
                    let mut buf = if raw.last().is_some_and(|&b| b & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(raw);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?
                }
                b'I' | b'L' => {
                    let text = self.line()?.trim_end_matches('L');
                    let v = match text {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        t => Value::Int(t.parse().map_err(|_| format!("bad integer {t:?}"))?),
                    };
                    self.push(v)?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.push(Value::Float(v))?
                }
                b'F' => {
                    let t = self.line()?;
                    self.push(Value::Float(
                        t.parse().map_err(|_| format!("bad float {t:?}"))?,
                    ))?
                }
                // Byte strings: Python 2 str (read as bytes) and Python 3 bytes / bytearray.
                b'U' | b'C' | b'T' | b'B' | 0x8e | 0x96 => {
                    let n = match op {
                        b'U' | b'C' => usize::from(self.u8()?),
                        b'T' | b'B' => {
                            let n = self.u32()?;
                            Self::checked_len(n.into())?
                        }
                        _ => {
                            let n = self.u64()?;
                            Self::checked_len(n)?
                        }
                    };
                    let raw = self.take(n)?;
                    self.push(Value::Bytes(Rc::new(raw.to_vec())))?
                }
                0x8c | b'X' | 0x8d => {
                    let n = match op {
                        0x8c => usize::from(self.u8()?),
                        b'X' => {
                            let n = self.u32()?;
                            Self::checked_len(n.into())?
                        }
                        _ => {
                            let n = self.u64()?;
                            Self::checked_len(n)?
                        }
                    };
                    let raw = self.take(n)?;
                    let s = std::str::from_utf8(raw).map_err(|_| "unicode string is not UTF-8")?;
                    self.push(Value::Str(s.into()))?
                }
                b']' => self.push(Value::List(Rc::default()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))))?
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?.clone();
                    self.append(&target, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append(&target, items)?;
                }
                b')' => self.push(Value::Tuple(Rc::default()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(items)))?
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n
                        || self.marks.last().is_some_and(|&m| m > self.stack.len() - n)
                    {
                        return Err("stack underflow building a tuple".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(Rc::new(items)))?
                }
                b'}' => self.push(Value::Dict(Rc::default()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Rc::default());
                    self.set_items(&d, items)?;
                    self.push(d)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, items)?;
                }
                0x8f => self.push(Value::List(Rc::default()))?, // EMPTY_SET, kept as a list
                0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append(&target, items)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))))?
                }
                b'p' => {
                    let key = self.line()?.parse().map_err(|_| "bad memo key")?;
                    self.memo_put(key)?
                }
                b'q' => {
                    let key = self.u8()?.into();
                    self.memo_put(key)?
                }
                b'r' => {
                    let key = self.u32()?.into();
                    self.memo_put(key)?
                }
                0x94 => {
                    let key = self.memo.len() as u64;
                    self.memo_put(key)?
                }
                b'g' => {
                    let key = self.line()?.parse().map_err(|_| "bad memo key")?;
                    self.memo_get(key)?
                }
                b'h' => {
                    let key = self.u8()?.into();
                    self.memo_get(key)?
                }
                b'j' => {
                    let key = self.u32()?.into();
                    self.memo_get(key)?
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.push(Value::Global { module, name })?
                }
                0x93 => {
                    let name = self
                        .pop()?
                        .as_text()
                        .ok_or("STACK_GLOBAL name is not a string")?;
                    let module = self
                        .pop()?
                        .as_text()
                        .ok_or("STACK_GLOBAL module is not a string")?;
                    self.push(Value::Global { module, name })?
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push(Value::Reduce {
                        callable: Box::new(callable),
                        args: Box::new(args),
                    })?
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.pop()?;
                    self.push(Value::Build {
                        obj: Box::new(obj),
                        state: Box::new(state),
                    })?
                }
                other => return Err(format!("opcode 0x{other:02x} is not supported")),
            }
        }
    }
}

/// A numpy array taken out of a pickle: shape, dtype and the raw little-endian data.
#[derive(Clone, Debug, PartialEq)]
pub struct NdArray {
    pub shape: Vec<usize>,
    /// numpy type code, e.g. `u1`, `f8`, `i8`.
    pub dtype: String,
    pub fortran_order: bool,
    pub data: Vec<u8>,
}

impl NdArray {
    /// The elements as f64 in C (row-major) order.
    pub fn to_f64(&self) -> Result<Vec<f64>, String> {
        let values: Vec<f64> = match self.dtype.as_str() {
            "f8" => self
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8")))
                .collect(),
            "f4" => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4")).into())
                .collect(),
            "u1" => self.data.iter().map(|&v| v.into()).collect(),
            "i8" => self
                .data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8")) as f64)
                .collect(),
            "i4" => self
                .data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4")).into())
                .collect(),
            other => return Err(format!("dtype {other} is not supported")),
        };
        if !self.fortran_order || self.shape.len() < 2 {
            return Ok(values);
        }
        // Column-major to row-major, for 2-D arrays.
        let (rows, cols) = (self.shape[0], self.shape[1..].iter().product::<usize>());
        Ok((0..rows * cols)
            .map(|i| values[(i % cols) * rows + i / cols])
            .collect())
    }
}

fn is_global(v: &Value, modules: &[&str], want: &str) -> bool {
    matches!(v, Value::Global { module, name } if modules.contains(&module.as_str()) && name == want)
}

const NUMPY_MULTIARRAY: [&str; 2] = ["numpy.core.multiarray", "numpy._core.multiarray"];

/// Recognises the exact structure numpy pickles an ndarray as:
/// `BUILD(_reconstruct(ndarray, (0,), b'b'), (version, shape, dtype, fortran, rawdata))`,
/// with `dtype = BUILD(dtype(code, 0, 1), (3, endian, ...))`. Anything else is an error.
pub fn ndarray(v: &Value) -> Result<NdArray, String> {
    let not_array = || format!("expected a numpy array, found {}", v.describe());
    let Value::Build { obj, state } = v else {
        return Err(not_array());
    };
    let Value::Reduce { callable, args } = obj.as_ref() else {
        return Err(not_array());
    };
    if !is_global(callable, &NUMPY_MULTIARRAY, "_reconstruct") {
        return Err(not_array());
    }
    let args = args.items().ok_or_else(not_array)?;
    if !args
        .first()
        .is_some_and(|a| is_global(a, &["numpy"], "ndarray"))
    {
        return Err(not_array());
    }
    let state = state.items().ok_or("ndarray state is not a tuple")?;
    let [_, shape, dtype, fortran, raw] = state.as_slice() else {
        return Err(format!(
            "ndarray state has {} fields, expected 5",
            state.len()
        ));
    };
    let shape: Vec<usize> = shape
        .items()
        .ok_or("ndarray shape is not a tuple")?
        .iter()
        .map(|d| {
            d.as_int()
                .and_then(|d| usize::try_from(d).ok())
                .ok_or("bad ndarray dimension")
        })
        .collect::<Result<_, _>>()?;
    let (code, endian) = dtype_code(dtype)?;
    if endian == '>' {
        return Err(format!("big-endian dtype {code} is not supported"));
    }
    let fortran_order = matches!(fortran, Value::Bool(true) | Value::Int(1));
    let data = match raw {
        Value::Bytes(b) => b.to_vec(),
        // Python 2 str pickled with latin-1 semantics and read back as str.
        Value::Str(s) => s
            .chars()
            .map(|c| u8::try_from(u32::from(c)).map_err(|_| "ndarray data is not bytes"))
            .collect::<Result<_, _>>()?,
        other => {
            return Err(format!(
                "ndarray data is {}, expected bytes",
                other.describe()
            ));
        }
    };
    let itemsize: usize = code[1..]
        .parse()
        .map_err(|_| format!("dtype {code} has no item size"))?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("ndarray shape overflows")?;
    if count.checked_mul(itemsize) != Some(data.len()) {
        return Err(format!(
            "ndarray of shape {shape:?} and dtype {code} needs {} bytes, has {}",
            count.saturating_mul(itemsize),
            data.len()
        ));
    }
    Ok(NdArray {
        shape,
        dtype: code,
        fortran_order,
        data,
    })
}

fn dtype_code(v: &Value) -> Result<(String, char), String> {
    let bad = || "ndarray dtype is not numpy.dtype(code, 0, 1) with a state".to_string();
    let Value::Build { obj, state } = v else {
        return Err(bad());
    };
    let Value::Reduce { callable, args } = obj.as_ref() else {
        return Err(bad());
    };
    if !is_global(callable, &["numpy"], "dtype") {
        return Err(bad());
    }
    let code = args
        .items()
        .and_then(|a| a.first().and_then(Value::as_text))
        .ok_or_else(bad)?;
    let endian = state
        .items()
        .and_then(|s| s.get(1).and_then(Value::as_text))
        .and_then(|e| e.chars().next())
        .unwrap_or('|');
    if code.len() < 2 || !code.is_ascii() {
        return Err(format!("dtype code {code:?} is not understood"));
    }
    Ok((code, endian))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_protocol_2_dict_with_list_and_memo() {
        // pickle.dumps({'a': [1, 2], b'k': 'x'}, protocol=2), hand-assembled.
        let mut p = vec![
            0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a', b']', b'q', 1,
        ];
        p.extend([
            b'(', b'K', 1, b'K', 2, b'e', b'U', 1, b'k', b'X', 1, 0, 0, 0, b'x', b'u', b'.',
        ]);
        let v = parse(&p).unwrap();
        let a = v.get("a").unwrap().items().unwrap();
        assert_eq!(
            a.iter().map(|x| x.as_int().unwrap()).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(v.get("k").unwrap().as_text().as_deref(), Some("x"));
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        for bad in [
            &b""[..],
            b"\x80\x02",
            b"\x80\x09.",
            b"(((((t",
            b"K\x01a.",
            b"h\x05.",
            b"\xff",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
