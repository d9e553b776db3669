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

/// Why a pickle, or a numpy array inside one, cannot be used.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PickleError {
    /// The bytes break a rule of the pickle format (or of the safe subset read here).
    #[error("pickle byte {offset}: {rule}")]
    Parse { offset: usize, rule: ParseRule },
    #[error("expected a numpy array, found {found}")]
    NotAnArray { found: String },
    #[error("ndarray state is not a tuple")]
    StateNotATuple,
    #[error("ndarray state has {fields} fields, expected 5")]
    StateFields { fields: usize },
    #[error("ndarray shape is not a tuple")]
    ShapeNotATuple,
    #[error("bad ndarray dimension")]
    BadDimension,
    #[error("ndarray shape overflows")]
    ShapeOverflows,
    #[error("ndarray dtype is not numpy.dtype(code, 0, 1) with a state")]
    BadDtype,
    #[error("dtype code {code:?} is not understood")]
    DtypeCode { code: String },
    #[error("big-endian dtype {dtype} is not supported")]
    BigEndian { dtype: String },
    #[error("dtype {dtype} has no item size")]
    NoItemSize { dtype: String },
    #[error("ndarray data is not bytes")]
    DataNotLatin1,
    #[error("ndarray data is {found}, expected bytes")]
    DataNotBytes { found: String },
    #[error("ndarray of shape {shape:?} and dtype {dtype} needs {expected} bytes, has {found}")]
    DataSize {
        shape: Vec<usize>,
        dtype: String,
        expected: usize,
        found: usize,
    },
    /// `NdArray::to_f64` does not convert this element type.
    #[error("dtype {dtype} is not supported")]
    UnsupportedDtype { dtype: String },
}

/// The rule of the pickle format that the bytes at [`PickleError::Parse`]'s offset break.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseRule {
    #[error("truncated pickle")]
    Truncated,
    #[error("length {length} is implausible")]
    ImplausibleLength { length: u64 },
    #[error("unterminated text line")]
    UnterminatedLine,
    #[error("text line is not UTF-8")]
    LineNotUtf8,
    #[error("stack too deep")]
    StackTooDeep,
    #[error("pop across a mark")]
    PopAcrossMark,
    #[error("stack underflow")]
    StackUnderflow,
    #[error("stack underflow building a tuple")]
    TupleUnderflow,
    #[error("too many marks")]
    TooManyMarks,
    #[error("no mark on the stack")]
    NoMark,
    #[error("mark beyond the stack")]
    MarkBeyondStack,
    #[error("memo too large")]
    MemoTooLarge,
    #[error("memoising an empty stack")]
    MemoEmptyStack,
    #[error("bad memo key")]
    BadMemoKey,
    #[error("memo key {key} was never stored")]
    MemoKeyMissing { key: u64 },
    #[error("SETITEM on {target}")]
    SetItemOn { target: String },
    #[error("odd number of items for a dict")]
    OddDictItems,
    #[error("APPEND on {target}")]
    AppendOn { target: String },
    #[error("pickle protocol {protocol} is not supported")]
    Protocol { protocol: u8 },
    #[error("integer of {bytes} bytes is too large")]
    IntegerTooLarge { bytes: usize },
    #[error("bad integer {text:?}")]
    BadInteger { text: String },
    #[error("bad float {text:?}")]
    BadFloat { text: String },
    #[error("unicode string is not UTF-8")]
    StrNotUtf8,
    #[error("STACK_GLOBAL name is not a string")]
    GlobalName,
    #[error("STACK_GLOBAL module is not a string")]
    GlobalModule,
    #[error("opcode 0x{opcode:02x} is not supported")]
    Opcode { opcode: u8 },
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
pub fn parse(bytes: &[u8]) -> Result<Value, PickleError> {
    let mut m = Machine {
        b: bytes,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    m.run().map_err(|rule| PickleError::Parse {
        offset: m.pos,
        rule,
    })
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ParseRule> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(ParseRule::Truncated)?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ParseRule> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ParseRule> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, ParseRule> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, ParseRule> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes(s.try_into().expect("8 bytes")))
    }
    fn checked_len(n: u64) -> Result<usize, ParseRule> {
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= MAX_LEN)
            .ok_or(ParseRule::ImplausibleLength { length: n })
    }
    fn line(&mut self) -> Result<&'a str, ParseRule> {
        let rest = &self.b[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or(ParseRule::UnterminatedLine)?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| ParseRule::LineNotUtf8)?;
        self.pos += n + 1;
        Ok(s)
    }
    fn push(&mut self, v: Value) -> Result<(), ParseRule> {
        if self.stack.len() >= MAX_ITEMS {
            return Err(ParseRule::StackTooDeep);
        }
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> Result<Value, ParseRule> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(ParseRule::PopAcrossMark);
        }
        self.stack.pop().ok_or(ParseRule::StackUnderflow)
    }
    fn top(&mut self) -> Result<&mut Value, ParseRule> {
        self.stack.last_mut().ok_or(ParseRule::StackUnderflow)
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, ParseRule> {
        let m = self.marks.pop().ok_or(ParseRule::NoMark)?;
        if m > self.stack.len() {
            return Err(ParseRule::MarkBeyondStack);
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_put(&mut self, key: u64) -> Result<(), ParseRule> {
        if self.memo.len() >= MAX_ITEMS {
            return Err(ParseRule::MemoTooLarge);
        }
        let v = self.stack.last().ok_or(ParseRule::MemoEmptyStack)?.clone();
        self.memo.insert(key, v);
        Ok(())
    }
    fn memo_get(&mut self, key: u64) -> Result<(), ParseRule> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or(ParseRule::MemoKeyMissing { key })?;
        self.push(v)
    }
    fn set_items(&mut self, target: &Value, items: Vec<Value>) -> Result<(), ParseRule> {
        let Value::Dict(d) = target else {
            return Err(ParseRule::SetItemOn {
                target: target.describe(),
            });
        };
        if !items.len().is_multiple_of(2) {
            return Err(ParseRule::OddDictItems);
        }
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }
    fn append(&mut self, target: &Value, items: Vec<Value>) -> Result<(), ParseRule> {
        match target {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => Err(ParseRule::AppendOn {
                target: other.describe(),
            }),
        }
    }

    fn run(&mut self) -> Result<Value, ParseRule> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(ParseRule::Protocol { protocol: proto });
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => {
                    if self.marks.len() >= MAX_ITEMS {
                        return Err(ParseRule::TooManyMarks);
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
                        return Err(ParseRule::IntegerTooLarge { bytes: n });
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
                        t => Value::Int(t.parse().map_err(|_| ParseRule::BadInteger {
                            text: t.to_string(),
                        })?),
                    };
                    self.push(v)?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.push(Value::Float(v))?
                }
                b'F' => {
                    let t = self.line()?;
                    self.push(Value::Float(t.parse().map_err(|_| {
                        ParseRule::BadFloat {
                            text: t.to_string(),
                        }
                    })?))?
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
                    let s = std::str::from_utf8(raw).map_err(|_| ParseRule::StrNotUtf8)?;
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
                        return Err(ParseRule::TupleUnderflow);
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
                    let key = self.line()?.parse().map_err(|_| ParseRule::BadMemoKey)?;
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
                    let key = self.line()?.parse().map_err(|_| ParseRule::BadMemoKey)?;
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
                    let name = self.pop()?.as_text().ok_or(ParseRule::GlobalName)?;
                    let module = self.pop()?.as_text().ok_or(ParseRule::GlobalModule)?;
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
                other => return Err(ParseRule::Opcode { opcode: other }),
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
    pub fn to_f64(&self) -> Result<Vec<f64>, PickleError> {
        fn le<const N: usize, T>(data: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            data.chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunks of N bytes")))
                .collect()
        }
        let (itemsize, values): (usize, Vec<f64>) = match self.dtype.as_str() {
            "f8" => (8, le(&self.data, f64::from_le_bytes)),
            "f4" => (4, le(&self.data, |b| f32::from_le_bytes(b).into())),
            "u1" => (1, self.data.iter().map(|&v| v.into()).collect()),
            "i8" => (8, le(&self.data, |b| i64::from_le_bytes(b) as f64)),
            "i4" => (4, le(&self.data, |b| i32::from_le_bytes(b).into())),
            other => {
                return Err(PickleError::UnsupportedDtype {
                    dtype: other.to_string(),
                });
            }
        };
        if !self.fortran_order || self.shape.len() < 2 {
            return Ok(values);
        }
        // Column-major to row-major, for 2-D arrays. The fields are public: an array not made
        // by `ndarray` may disagree with its shape, an error here rather than a panic.
        let rows = self.shape[0];
        let cols = (self.shape[1..].iter()).try_fold(1usize, |a, &d| a.checked_mul(d));
        let Some(cols) = cols.filter(|&c| rows.checked_mul(c) == Some(values.len())) else {
            let count = (self.shape.iter()).try_fold(1usize, |a, &d| a.checked_mul(d));
            return Err(PickleError::DataSize {
                shape: self.shape.clone(),
                dtype: self.dtype.clone(),
                expected: count.map_or(usize::MAX, |n| n.saturating_mul(itemsize)),
                found: self.data.len(),
            });
        };
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
pub fn ndarray(v: &Value) -> Result<NdArray, PickleError> {
    let not_array = || PickleError::NotAnArray {
        found: v.describe(),
    };
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
    let state = state.items().ok_or(PickleError::StateNotATuple)?;
    let [_, shape, dtype, fortran, raw] = state.as_slice() else {
        return Err(PickleError::StateFields {
            fields: state.len(),
        });
    };
    let shape: Vec<usize> = shape
        .items()
        .ok_or(PickleError::ShapeNotATuple)?
        .iter()
        .map(|d| {
            d.as_int()
                .and_then(|d| usize::try_from(d).ok())
                .ok_or(PickleError::BadDimension)
        })
        .collect::<Result<_, _>>()?;
    let (code, endian) = dtype_code(dtype)?;
    if endian == '>' {
        return Err(PickleError::BigEndian { dtype: code });
    }
    let fortran_order = matches!(fortran, Value::Bool(true) | Value::Int(1));
    let data = match raw {
        Value::Bytes(b) => b.to_vec(),
        // Python 2 str pickled with latin-1 semantics and read back as str.
        Value::Str(s) => s
            .chars()
            .map(|c| u8::try_from(u32::from(c)).map_err(|_| PickleError::DataNotLatin1))
            .collect::<Result<_, _>>()?,
        other => {
            return Err(PickleError::DataNotBytes {
                found: other.describe(),
            });
        }
    };
    let Ok(itemsize) = code[1..].parse::<usize>() else {
        return Err(PickleError::NoItemSize { dtype: code });
    };
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or(PickleError::ShapeOverflows)?;
    if count.checked_mul(itemsize) != Some(data.len()) {
        return Err(PickleError::DataSize {
            expected: count.saturating_mul(itemsize),
            found: data.len(),
            shape,
            dtype: code,
        });
    }
    Ok(NdArray {
        shape,
        dtype: code,
        fortran_order,
        data,
    })
}

fn dtype_code(v: &Value) -> Result<(String, char), PickleError> {
    let Value::Build { obj, state } = v else {
        return Err(PickleError::BadDtype);
    };
    let Value::Reduce { callable, args } = obj.as_ref() else {
        return Err(PickleError::BadDtype);
    };
    if !is_global(callable, &["numpy"], "dtype") {
        return Err(PickleError::BadDtype);
    }
    let code = args
        .items()
        .and_then(|a| a.first().and_then(Value::as_text))
        .ok_or(PickleError::BadDtype)?;
    let endian = state
        .items()
        .and_then(|s| s.get(1).and_then(Value::as_text))
        .and_then(|e| e.chars().next())
        .unwrap_or('|');
    if code.len() < 2 || !code.is_ascii() {
        return Err(PickleError::DtypeCode { code });
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

    #[test]
    fn errors_name_the_rule_and_the_byte() {
        let e = parse(b"\x80\x09.").unwrap_err();
        assert_eq!(
            e,
            PickleError::Parse {
                offset: 2,
                rule: ParseRule::Protocol { protocol: 9 }
            }
        );
        assert_eq!(
            e.to_string(),
            "pickle byte 2: pickle protocol 9 is not supported"
        );
        let e = parse(b"\xff").unwrap_err();
        assert_eq!(e.to_string(), "pickle byte 1: opcode 0xff is not supported");
        let e = ndarray(&parse(b"K\x07.").unwrap()).unwrap_err();
        assert_eq!(e.to_string(), "expected a numpy array, found an int");
    }

    #[test]
    fn fortran_arrays_are_reordered_and_inconsistent_ones_refused() {
        let a = NdArray {
            shape: vec![2, 3],
            dtype: "u1".into(),
            fortran_order: true,
            data: vec![1, 4, 2, 5, 3, 6],
        };
        assert_eq!(a.to_f64().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let short = NdArray {
            data: vec![1, 4, 2],
            ..a.clone()
        };
        assert!(matches!(
            short.to_f64(),
            Err(PickleError::DataSize {
                expected: 6,
                found: 3,
                ..
            })
        ));
        let other = NdArray {
            dtype: "c16".into(),
            ..a
        };
        assert_eq!(
            other.to_f64().unwrap_err().to_string(),
            "dtype c16 is not supported"
        );
    }
}
