//! A safe reader for Python pickles (protocols 0-5, no out-of-band buffers): it builds a tree
//! of values and never runs anything. Calls (`GLOBAL` + `REDUCE` or `NEWOBJ`, then `BUILD`) are
//! kept as data; [`ndarray`] then recognises numpy arrays by their exact structure and rejects anything
//! else. Used for the CIFAR python batches and the reference's embedding pickles.
//!
//! Hostile input is bounded: at most [`MAX_PICKLE_BYTES`] of input, [`MAX_VALUES`] values made,
//! and values nested at most [`MAX_DEPTH`] deep (dropping or describing a value recurses). To
//! keep the depth exact, a list, dict or call cannot grow once it is inside another value:
//! pickles only do that for recursive structures, which arrays and batches never are.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// A pickled value. Containers are shared (`Rc`): memo gets push the same value again, and
/// pickles fill lists and dicts after memoising them.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Bytes(Rc<Vec<u8>>),
    Str(Rc<str>),
    List(Rc<Container<Vec<Value>>>),
    Tuple(Rc<Container<Vec<Value>>>),
    Dict(Rc<Container<Vec<(Value, Value)>>>),
    /// A reference to `module.name`, never imported.
    Global(Rc<Global>),
    /// `callable(*args)`, never called, with the state BUILD gives it.
    Reduce(Rc<Call>),
}

/// The items of a list, tuple or dict, with their nesting depth.
#[derive(Debug)]
pub struct Container<T> {
    items: RefCell<T>,
    depth: Cell<usize>,
    /// Set once the container is inside another value; it can no longer change.
    nested: Cell<bool>,
}

impl<T: Clone> Container<T> {
    /// A copy of the items.
    pub fn items(&self) -> T {
        self.items.borrow().clone()
    }
}

#[derive(Debug)]
pub struct Global {
    pub module: String,
    pub name: String,
}

/// `callable(*args)` (REDUCE or NEWOBJ), and `obj.__setstate__(state)` if BUILD followed. BUILD
/// changes the object in place, and memo references to it see the state too.
#[derive(Debug)]
pub struct Call {
    pub callable: Value,
    pub args: Value,
    state: RefCell<Option<Value>>,
    depth: Cell<usize>,
    nested: Cell<bool>,
}

impl Call {
    /// The state BUILD gave the object, if any.
    pub fn state(&self) -> Option<Value> {
        self.state.borrow().clone()
    }
}

impl Value {
    /// The entry under a str or bytes key of a dict.
    pub fn get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d
                .items
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
            Value::List(l) | Value::Tuple(l) => Some(l.items()),
            _ => None,
        }
    }

    /// How deeply containers and calls nest in this value (0 for a scalar).
    pub fn depth(&self) -> usize {
        match self {
            Value::List(c) | Value::Tuple(c) => c.depth.get(),
            Value::Dict(c) => c.depth.get(),
            Value::Reduce(c) => c.depth.get(),
            _ => 0,
        }
    }

    /// What the value is, in a few words (never its contents), for messages.
    pub fn describe(&self) -> String {
        match self {
            Value::Global(g) => format!("{}.{}", g.module, g.name),
            Value::Reduce(c) if matches!(c.callable, Value::Global(_)) => {
                format!("a call of {}", c.callable.describe())
            }
            Value::Reduce(_) => "a call".into(),
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

    /// Marks a list or dict as inside another value (see [`Container::nested`]).
    fn mark_nested(&self) {
        match self {
            Value::List(c) | Value::Tuple(c) => c.nested.set(true),
            Value::Dict(c) => c.nested.set(true),
            Value::Reduce(c) => c.nested.set(true),
            _ => {}
        }
    }
}

fn container<T>(items: T, depth: usize) -> Rc<Container<T>> {
    Rc::new(Container {
        items: RefCell::new(items),
        depth: Cell::new(depth),
        nested: Cell::new(false),
    })
}

/// Why a pickle, or a numpy array inside one, cannot be used.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PickleError {
    /// The bytes break a rule of the pickle format (or of the safe subset read here).
    #[error("pickle byte {offset}: {rule}")]
    Parse { offset: usize, rule: ParseRule },
    #[error("pickle of {bytes} bytes is larger than the limit of {MAX_PICKLE_BYTES}")]
    TooLarge { bytes: usize },
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
    #[error("ndarray order {order:?} is not 'C' or 'F'")]
    Order { order: String },
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
    #[error("more values than the limit of {MAX_VALUES}")]
    TooManyValues,
    #[error("values nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("{target} changed after it was put inside another value (recursive structure)")]
    ChangedWhenNested { target: &'static str },
    #[error("pop across a mark")]
    PopAcrossMark,
    #[error("stack underflow")]
    StackUnderflow,
    #[error("stack underflow building a tuple")]
    TupleUnderflow,
    #[error("no mark on the stack")]
    NoMark,
    #[error("mark beyond the stack")]
    MarkBeyondStack,
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
    #[error("BUILD on {target}, expected the result of a call")]
    BuildOn { target: String },
    #[error("BUILD twice on one object")]
    BuiltTwice,
    #[error("READONLY_BUFFER on {target}")]
    ReadonlyBufferOn { target: String },
    #[error("out-of-band buffers (NEXT_BUFFER) are not supported; pickle without buffer_callback")]
    OutOfBandBuffer,
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
    #[error("bad raw-unicode-escape string")]
    BadUnicodeEscape,
    #[error("STACK_GLOBAL name is not a string")]
    GlobalName,
    #[error("STACK_GLOBAL module is not a string")]
    GlobalModule,
    #[error("opcode 0x{opcode:02x} is not supported")]
    Opcode { opcode: u8 },
}

/// Largest pickle parsed (CIFAR-100's train batch is 155 MB).
pub const MAX_PICKLE_BYTES: usize = 1 << 30;
/// Most values made while parsing (each push, memo gets included, and each mark): a CIFAR-100
/// batch makes about 200,000.
pub const MAX_VALUES: usize = 1 << 23;
/// Deepest nesting of containers and calls: numpy arrays and CIFAR batches nest under 10.
pub const MAX_DEPTH: usize = 1000;
/// Largest container or string length accepted from a length prefix (damage guard).
const MAX_LEN: usize = 1 << 34;

struct Machine<'a> {
    b: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    /// Values made so far, against `max_values`.
    made: usize,
    max_values: usize,
}

/// Parses a pickle into its value tree.
pub fn parse(bytes: &[u8]) -> Result<Value, PickleError> {
    parse_within(bytes, MAX_VALUES)
}

fn parse_within(bytes: &[u8], max_values: usize) -> Result<Value, PickleError> {
    if bytes.len() > MAX_PICKLE_BYTES {
        return Err(PickleError::TooLarge { bytes: bytes.len() });
    }
    let mut m = Machine {
        b: bytes,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        made: 0,
        max_values,
    };
    m.run().map_err(|rule| PickleError::Parse {
        offset: m.pos,
        rule,
    })
}

/// 1 + the deepest of `items`, within [`MAX_DEPTH`].
fn depth_over<'v>(items: impl IntoIterator<Item = &'v Value>) -> Result<usize, ParseRule> {
    let depth = 1 + items.into_iter().map(Value::depth).max().unwrap_or(0);
    if depth > MAX_DEPTH {
        return Err(ParseRule::TooDeep);
    }
    Ok(depth)
}

/// Decodes Python's raw-unicode-escape: latin-1 bytes, except `\uXXXX` and `\UXXXXXXXX`.
fn raw_unicode_escape(raw: &[u8]) -> Result<String, ParseRule> {
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let digits = match (raw[i], raw.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            (c, _) => {
                out.push(char::from(c));
                i += 1;
                continue;
            }
        };
        let hex = raw
            .get(i + 2..i + 2 + digits)
            .and_then(|h| std::str::from_utf8(h).ok())
            .ok_or(ParseRule::BadUnicodeEscape)?;
        let c = u32::from_str_radix(hex, 16)
            .ok()
            .and_then(char::from_u32)
            .ok_or(ParseRule::BadUnicodeEscape)?;
        out.push(c);
        i += 2 + digits;
    }
    Ok(out)
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
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn checked_len(n: u64) -> Result<usize, ParseRule> {
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= MAX_LEN)
            .ok_or(ParseRule::ImplausibleLength { length: n })
    }
    fn raw_line(&mut self) -> Result<&'a [u8], ParseRule> {
        let rest = &self.b[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or(ParseRule::UnterminatedLine)?;
        self.pos += n + 1;
        Ok(&rest[..n])
    }
    fn line(&mut self) -> Result<&'a str, ParseRule> {
        std::str::from_utf8(self.raw_line()?).map_err(|_| ParseRule::LineNotUtf8)
    }
    fn count(&mut self) -> Result<(), ParseRule> {
        self.made += 1;
        if self.made > self.max_values {
            return Err(ParseRule::TooManyValues);
        }
        Ok(())
    }
    fn push(&mut self, v: Value) -> Result<(), ParseRule> {
        self.count()?;
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> Result<Value, ParseRule> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(ParseRule::PopAcrossMark);
        }
        self.stack.pop().ok_or(ParseRule::StackUnderflow)
    }
    fn top(&mut self) -> Result<&Value, ParseRule> {
        self.stack.last().ok_or(ParseRule::StackUnderflow)
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, ParseRule> {
        let m = self.marks.pop().ok_or(ParseRule::NoMark)?;
        if m > self.stack.len() {
            return Err(ParseRule::MarkBeyondStack);
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_put(&mut self, key: u64) -> Result<(), ParseRule> {
        let v = self.stack.last().ok_or(ParseRule::MemoEmptyStack)?.clone();
        self.count()?;
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
    fn list(&mut self, items: Vec<Value>) -> Result<(), ParseRule> {
        let depth = depth_over(&items)?;
        items.iter().for_each(Value::mark_nested);
        self.push(Value::List(container(items, depth)))
    }
    fn tuple(&mut self, items: Vec<Value>) -> Result<(), ParseRule> {
        let depth = depth_over(&items)?;
        items.iter().for_each(Value::mark_nested);
        self.push(Value::Tuple(container(items, depth)))
    }
    fn call(&mut self) -> Result<(), ParseRule> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let depth = depth_over([&callable, &args])?;
        callable.mark_nested();
        args.mark_nested();
        self.push(Value::Reduce(Rc::new(Call {
            callable,
            args,
            state: RefCell::new(None),
            depth: Cell::new(depth),
            nested: Cell::new(false),
        })))
    }
    /// BUILD: gives the object under the state its state; the object stays on the stack.
    fn build(&mut self) -> Result<(), ParseRule> {
        let state = self.pop()?;
        let Value::Reduce(call) = self.top()? else {
            return Err(ParseRule::BuildOn {
                target: self.top()?.describe(),
            });
        };
        if call.state.borrow().is_some() {
            return Err(ParseRule::BuiltTwice);
        }
        let depth = depth_over([&state])?.max(call.depth.get());
        state.mark_nested();
        // After marking: an object in its own state is caught too.
        if call.nested.get() && depth > call.depth.get() {
            return Err(ParseRule::ChangedWhenNested {
                target: "an object",
            });
        }
        call.depth.set(depth);
        *call.state.borrow_mut() = Some(state);
        Ok(())
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
        let depth = depth_over(&items)?.max(d.depth.get());
        items.iter().for_each(Value::mark_nested);
        // After marking: a dict put into itself is caught too.
        if d.nested.get() {
            return Err(ParseRule::ChangedWhenNested { target: "a dict" });
        }
        d.depth.set(depth);
        let mut entries = d.items.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            entries.push((k, v));
        }
        Ok(())
    }
    fn append(&mut self, target: &Value, items: Vec<Value>) -> Result<(), ParseRule> {
        let Value::List(l) = target else {
            return Err(ParseRule::AppendOn {
                target: target.describe(),
            });
        };
        let depth = depth_over(&items)?.max(l.depth.get());
        items.iter().for_each(Value::mark_nested);
        // After marking: a list appended to itself is caught too.
        if l.nested.get() {
            return Err(ParseRule::ChangedWhenNested { target: "a list" });
        }
        l.depth.set(depth);
        l.items.borrow_mut().extend(items);
        Ok(())
    }
    fn bytes(&mut self, raw: &[u8]) -> Result<(), ParseRule> {
        self.push(Value::Bytes(Rc::new(raw.to_vec())))
    }
    fn str(&mut self, s: &str) -> Result<(), ParseRule> {
        self.push(Value::Str(s.into()))
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
                    self.count()?;
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
                        let n = self.u32()?;
                        Self::checked_len(n.into())?
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
                    let s = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(s);
                    self.push(Value::Float(f64::from_be_bytes(a)))?
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
                    self.bytes(raw)?
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
                    self.str(s)?
                }
                b'V' => {
                    let s = raw_unicode_escape(self.raw_line()?)?;
                    self.str(&s)?
                }
                // In-band buffers arrive as BYTEARRAY8 or bytes; READONLY_BUFFER changes nothing
                // that is read here.
                0x98 => {
                    let top = self.top()?;
                    if !matches!(top, Value::Bytes(_)) {
                        return Err(ParseRule::ReadonlyBufferOn {
                            target: top.describe(),
                        });
                    }
                }
                0x97 => return Err(ParseRule::OutOfBandBuffer),
                b']' => self.list(Vec::new())?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.list(items)?
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?.clone();
                    self.append(&target, vec![v])?;
                }
                b'e' | 0x90 => {
                    // APPENDS, and ADDITEMS on a set (read as a list).
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append(&target, items)?;
                }
                b')' => self.tuple(Vec::new())?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.tuple(items)?
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n
                        || self.marks.last().is_some_and(|&m| m > self.stack.len() - n)
                    {
                        return Err(ParseRule::TupleUnderflow);
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.tuple(items)?
                }
                b'}' => self.push(Value::Dict(container(Vec::new(), 1)))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(container(Vec::new(), 1));
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
                0x8f => self.list(Vec::new())?, // EMPTY_SET, kept as a list
                0x91 => {
                    let items = self.pop_mark()?;
                    self.list(items)? // FROZENSET, kept as a list
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
                    self.push(Value::Global(Rc::new(Global { module, name })))?
                }
                0x93 => {
                    let name = self.pop()?.as_text().ok_or(ParseRule::GlobalName)?;
                    let module = self.pop()?.as_text().ok_or(ParseRule::GlobalModule)?;
                    self.push(Value::Global(Rc::new(Global { module, name })))?
                }
                b'R' | 0x81 => self.call()?,
                b'b' => self.build()?,
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
    matches!(v, Value::Global(g) if modules.contains(&g.module.as_str()) && g.name == want)
}

const NUMPY_MULTIARRAY: [&str; 2] = ["numpy.core.multiarray", "numpy._core.multiarray"];
const NUMPY_NUMERIC: [&str; 2] = ["numpy.core.numeric", "numpy._core.numeric"];

/// Recognises the exact structures numpy pickles an ndarray as, and nothing else:
///
/// * protocols 0-4: `BUILD(_reconstruct(ndarray, (0,), b'b'), (version, shape, dtype, fortran,
///   rawdata))`, the raw data as bytes (protocol 3 and 4), as `_codecs.encode(str, 'latin1')`
///   (protocols 0-2 from Python 3; empty: `bytes()`), or as a Python 2 str;
/// * protocol 5: `_frombuffer(buffer, dtype, shape, order)` with the buffer in band;
///
/// with `dtype = BUILD(dtype(code, 0, 1), (3, endian, ...))`.
pub fn ndarray(v: &Value) -> Result<NdArray, PickleError> {
    let not_array = || PickleError::NotAnArray {
        found: v.describe(),
    };
    let Value::Reduce(call) = v else {
        return Err(not_array());
    };
    if is_global(&call.callable, &NUMPY_NUMERIC, "_frombuffer") && call.state().is_none() {
        return from_buffer(&call.args);
    }
    let is_ndarray = call.args.items().is_some_and(|args| {
        args.first()
            .is_some_and(|a| is_global(a, &["numpy"], "ndarray"))
    });
    if !is_global(&call.callable, &NUMPY_MULTIARRAY, "_reconstruct") || !is_ndarray {
        return Err(not_array());
    }
    let state = call.state().ok_or_else(not_array)?;
    reconstructed(&state)
}

/// The protocol 0-4 form: the state BUILD gives `_reconstruct(ndarray, ...)`.
fn reconstructed(state: &Value) -> Result<NdArray, PickleError> {
    let state = state.items().ok_or(PickleError::StateNotATuple)?;
    let [_, shape, dtype, fortran, raw] = state.as_slice() else {
        return Err(PickleError::StateFields {
            fields: state.len(),
        });
    };
    let fortran_order = matches!(fortran, Value::Bool(true) | Value::Int(1));
    array(shape, dtype, fortran_order, raw_data(raw)?)
}

/// The protocol 5 form: the arguments of `_frombuffer`.
fn from_buffer(args: &Value) -> Result<NdArray, PickleError> {
    let args = args.items().ok_or(PickleError::StateNotATuple)?;
    let [buffer, dtype, shape, order] = args.as_slice() else {
        return Err(PickleError::StateFields { fields: args.len() });
    };
    let fortran_order = match order.as_text().as_deref() {
        Some("C") => false,
        Some("F") => true,
        _ => {
            return Err(PickleError::Order {
                order: order.describe(),
            });
        }
    };
    array(shape, dtype, fortran_order, raw_data(buffer)?)
}

/// The bytes of an array's data, in the forms numpy and Python write them.
fn raw_data(raw: &Value) -> Result<Vec<u8>, PickleError> {
    let latin1 = |s: &str| -> Result<Vec<u8>, PickleError> {
        s.chars()
            .map(|c| u8::try_from(u32::from(c)).map_err(|_| PickleError::DataNotLatin1))
            .collect()
    };
    match raw {
        Value::Bytes(b) => Ok(b.to_vec()),
        // Python 2 str pickled with latin-1 semantics and read back as str.
        Value::Str(s) => latin1(s),
        // Python 3 bytes at protocols 0-2: _codecs.encode(text, 'latin1'), or bytes() if empty.
        Value::Reduce(r) if is_global(&r.callable, &["_codecs"], "encode") => {
            let args = r.args.items().unwrap_or_default();
            match args.as_slice() {
                [Value::Str(s), encoding] if encoding.as_text().as_deref() == Some("latin1") => {
                    latin1(s)
                }
                _ => Err(PickleError::DataNotBytes {
                    found: raw.describe(),
                }),
            }
        }
        Value::Reduce(r)
            if is_global(&r.callable, &["__builtin__", "builtins"], "bytes")
                && r.args.items().is_some_and(|a| a.is_empty()) =>
        {
            Ok(Vec::new())
        }
        other => Err(PickleError::DataNotBytes {
            found: other.describe(),
        }),
    }
}

/// Checks shape, dtype and data size against each other.
fn array(
    shape: &Value,
    dtype: &Value,
    fortran_order: bool,
    data: Vec<u8>,
) -> Result<NdArray, PickleError> {
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
    let Value::Reduce(r) = v else {
        return Err(PickleError::BadDtype);
    };
    // Without its state, the byte order would be a guess.
    let Some(state) = r.state() else {
        return Err(PickleError::BadDtype);
    };
    if !is_global(&r.callable, &["numpy"], "dtype") {
        return Err(PickleError::BadDtype);
    }
    let code = r
        .args
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

    fn nested(depth: usize, open: &[u8], per_level: &[u8]) -> Vec<u8> {
        let mut p = b"\x80\x05".to_vec();
        p.extend(open);
        for _ in 0..depth {
            p.extend(per_level);
        }
        p.push(b'.');
        p
    }

    /// A pickle nested 200,000 deep overflowed the stack (dropping the value recursed).
    #[test]
    fn nesting_is_limited() {
        let tuples = |depth| nested(depth, b")", b"\x85"); // TUPLE1 of the previous
        let calls = |depth| nested(depth, b"N", b"NR"); // REDUCE(previous, None)
        // new = []; new.append(previous), through the memo
        let lists = |depth| nested(depth, b"]", b"q\x000]h\x00a");
        for deep in [tuples(200_000), calls(200_000), lists(100_000)] {
            let err = parse(&deep).unwrap_err();
            assert!(
                matches!(
                    err,
                    PickleError::Parse {
                        rule: ParseRule::TooDeep,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("nested deeper than 1000"), "{err}");
        }
        assert_eq!(parse(&tuples(MAX_DEPTH - 1)).unwrap().depth(), MAX_DEPTH);
        assert!(parse(&tuples(MAX_DEPTH)).is_err());
        assert_eq!(parse(&calls(MAX_DEPTH)).unwrap().depth(), MAX_DEPTH);
    }

    /// Growing a list after it was nested would make its parents deeper than they know.
    #[test]
    fn containers_do_not_change_once_nested() {
        // l = []; l.append(l)
        let err = parse(b"\x80\x02]q\x00h\x00a.").unwrap_err();
        assert!(
            err.to_string()
                .contains("a list changed after it was put inside"),
            "{err}"
        );
        // a = []; b = (a,); a.append(1)
        let err = parse(b"\x80\x02]q\x00\x85h\x00K\x01a.").unwrap_err();
        assert!(matches!(
            err,
            PickleError::Parse {
                rule: ParseRule::ChangedWhenNested { target: "a list" },
                ..
            }
        ));
        // d = {}; d['k'] = d
        let err = parse(b"\x80\x02}q\x00X\x01\x00\x00\x00kh\x00s.").unwrap_err();
        assert!(err.to_string().contains("a dict changed"), "{err}");
        // o = f(); o.__setstate__((o,))
        let err = parse(b"\x80\x02N)Rq\x00h\x00\x85b.").unwrap_err();
        assert!(err.to_string().contains("an object changed"), "{err}");
    }

    /// Memo gets make values from few bytes; their number is limited.
    #[test]
    fn the_number_of_values_is_limited() {
        let mut p = b"\x80\x02Nq\x00".to_vec();
        p.extend(b"h\x00".repeat(1000));
        p.push(b'.');
        let err = parse_within(&p, 500).unwrap_err();
        assert!(
            matches!(
                err,
                PickleError::Parse {
                    rule: ParseRule::TooManyValues,
                    ..
                }
            ),
            "{err}"
        );
        assert!(parse_within(&p, 2000).is_ok());
    }

    /// `pickle.dumps(np.arange(3, dtype='>i4'), protocol=5)`: read, but refused as big-endian.
    #[test]
    fn big_endian_arrays_are_refused() {
        let p = b"\x80\x05\x95\x80\x00\x00\x00\x00\x00\x00\x00\x8c\x13numpy._core.numeric\x94\x8c\x0b_frombuffer\x94\x93\x94(\x96\x0c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x02\x94\x8c\x05numpy\x94\x8c\x05dtype\x94\x93\x94\x8c\x02i4\x94\x89\x88\x87\x94R\x94(K\x03\x8c\x01>\x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94bK\x03\x85\x94\x8c\x01C\x94t\x94R\x94.";
        let err = ndarray(&parse(p).unwrap()).unwrap_err();
        assert_eq!(err, PickleError::BigEndian { dtype: "i4".into() });
    }

    #[test]
    fn out_of_band_buffers_are_refused_by_name() {
        let err = parse(b"\x80\x05\x97.").unwrap_err();
        assert!(err.to_string().contains("out-of-band buffers"), "{err}");
        assert!(parse(b"\x80\x05C\x01x\x98.").is_ok());
        assert!(parse(b"\x80\x05K\x01\x98.").is_err());
    }

    #[test]
    fn raw_unicode_escape_is_latin1_with_escapes() {
        assert_eq!(
            raw_unicode_escape(b"a\xe9\\u20ac\\U0001F600").unwrap(),
            "a\u{e9}\u{20ac}\u{1F600}"
        );
        assert!(raw_unicode_escape(b"\\u12").is_err());
        assert!(raw_unicode_escape(b"\\UFFFFFFFF").is_err());
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
