//! A reader for MATLAB Level 5 MAT files (little-endian), enough for the Stanford Cars and
//! Flowers-102 annotations: numeric arrays, char arrays, struct arrays and cell arrays, stored
//! plain or zlib-compressed. Every length is checked; damage gives an error, never a panic.

use std::io::Read;

/// Why a MAT file, or a variable in it, cannot be read as needed.
#[derive(Debug, thiserror::Error)]
pub enum MatError {
    #[error("{len} bytes is too short for a MAT file header (128)")]
    TooShort { len: usize },
    #[error("this is a MAT v7.3 (HDF5) file; save it with -v7 or -v6")]
    Hdf5,
    #[error("big-endian MAT files are not supported")]
    BigEndian,
    #[error("not a Level 5 MAT file (no endian indicator at byte 126)")]
    NotLevel5,
    #[error("compressed variable does not inflate: {source}")]
    Inflate { source: std::io::Error },
    #[error("compressed element holds type {found}, expected a matrix")]
    CompressedNotMatrix { found: u32 },
    #[error("truncated element tag")]
    TruncatedTag,
    #[error("small data element claims {bytes} bytes (at most 4)")]
    SmallElementTooLong { bytes: usize },
    #[error("truncated small data element")]
    TruncatedSmallElement,
    #[error("element size overflows")]
    SizeOverflows,
    #[error("element of {bytes} bytes at offset {offset} runs past the end ({len} bytes)")]
    PastTheEnd {
        bytes: usize,
        offset: usize,
        len: usize,
    },
    #[error("data type {found} is not numeric")]
    NotNumericType { found: u32 },
    #[error("cells/structs nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("missing array flags")]
    MissingFlags,
    #[error("bad dimension {value}")]
    BadDimension { value: f64 },
    #[error("dimensions overflow")]
    DimensionsOverflow,
    #[error("cell element has type {found}, expected a matrix")]
    CellNotMatrix { found: u32 },
    #[error("struct field name length is zero")]
    ZeroFieldNameLength,
    #[error("struct field has type {found}, expected a matrix")]
    FieldNotMatrix { found: u32 },
    #[error("array {name:?} has {values} values for dimensions {dims:?}")]
    ValueCount {
        name: String,
        values: usize,
        dims: Vec<usize>,
    },
    #[error("no variable {name:?} (variables: {variables:?})")]
    NoVariable {
        name: String,
        variables: Vec<String>,
    },
    #[error("struct has no field {name:?} (fields: {fields:?})")]
    NoField { name: String, fields: Vec<String> },
    /// A value of another kind than the one asked for (`as_numbers`, `struct_field`).
    #[error("expected {expected}, found {found}")]
    WrongKind {
        expected: &'static str,
        found: &'static str,
    },
}

/// A MATLAB value. Numeric data is converted to f64, in column-major order like MATLAB's.
#[derive(Clone, Debug, PartialEq)]
pub enum MatValue {
    Numeric {
        dims: Vec<usize>,
        data: Vec<f64>,
    },
    Char {
        dims: Vec<usize>,
        text: String,
    },
    Struct {
        dims: Vec<usize>,
        fields: Vec<String>,
        elements: Vec<Vec<MatValue>>,
    },
    Cell {
        dims: Vec<usize>,
        elements: Vec<MatValue>,
    },
    /// A class this reader does not interpret (sparse, objects, ...).
    Unsupported {
        class: u8,
    },
}

impl MatValue {
    /// Numeric data as f64 values, or an error naming what it is instead.
    pub fn as_numbers(&self) -> Result<&[f64], MatError> {
        match self {
            MatValue::Numeric { data, .. } => Ok(data),
            other => Err(MatError::WrongKind {
                expected: "a numeric array",
                found: other.kind(),
            }),
        }
    }

    /// The field `name` of every element of a struct array.
    pub fn struct_field(&self, name: &str) -> Result<Vec<&MatValue>, MatError> {
        match self {
            MatValue::Struct {
                fields, elements, ..
            } => {
                let k = fields
                    .iter()
                    .position(|f| f == name)
                    .ok_or_else(|| MatError::NoField {
                        name: name.to_string(),
                        fields: fields.clone(),
                    })?;
                Ok(elements.iter().map(|e| &e[k]).collect())
            }
            other => Err(MatError::WrongKind {
                expected: "a struct array",
                found: other.kind(),
            }),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            MatValue::Numeric { .. } => "a numeric array",
            MatValue::Char { .. } => "a char array",
            MatValue::Struct { .. } => "a struct array",
            MatValue::Cell { .. } => "a cell array",
            MatValue::Unsupported { .. } => "an unsupported MATLAB class",
        }
    }
}

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;

const MX_CELL: u8 = 1;
const MX_STRUCT: u8 = 2;
const MX_CHAR: u8 = 4;

/// Largest MAT file read (the Cars and Flowers annotations are under 1 MB).
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// Largest decompressed variable accepted (protects against zip bombs in damaged files).
const MAX_INFLATED_BYTES: u64 = 256 << 20;
/// Deepest nesting of cells/structs accepted.
const MAX_DEPTH: usize = 32;

/// Reads every variable of a MAT file: (name, value) in file order.
pub fn read_mat(bytes: &[u8]) -> Result<Vec<(String, MatValue)>, MatError> {
    if bytes.len() < 128 {
        return Err(MatError::TooShort { len: bytes.len() });
    }
    if bytes.starts_with(b"MATLAB 7.3") || bytes.starts_with(b"\x89HDF") {
        return Err(MatError::Hdf5);
    }
    match &bytes[126..128] {
        b"IM" => {}
        b"MI" => return Err(MatError::BigEndian),
        _ => return Err(MatError::NotLevel5),
    }
    let mut vars = Vec::new();
    let mut pos = 128;
    while pos < bytes.len() {
        let (ty, data, next) = element(bytes, pos)?;
        pos = next;
        match ty {
            MI_MATRIX => vars.push(matrix(data, 0)?),
            MI_COMPRESSED => {
                let mut inflated = Vec::new();
                flate2::read::ZlibDecoder::new(data)
                    .take(MAX_INFLATED_BYTES)
                    .read_to_end(&mut inflated)
                    .map_err(|source| MatError::Inflate { source })?;
                let (ty, inner, _) = element(&inflated, 0)?;
                if ty != MI_MATRIX {
                    return Err(MatError::CompressedNotMatrix { found: ty });
                }
                vars.push(matrix(inner, 0)?);
            }
            _ => {} // other top-level elements carry nothing we need
        }
    }
    Ok(vars)
}

/// Reads the variable `name`, or says which variables the file has.
pub fn variable(vars: &[(String, MatValue)], name: &str) -> Result<MatValue, MatError> {
    vars.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .ok_or_else(|| MatError::NoVariable {
            name: name.to_string(),
            variables: vars.iter().map(|(n, _)| n.clone()).collect(),
        })
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, MatError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(MatError::TruncatedTag)
}

/// Parses the data element at `pos`: (type, data bytes, position of the next element).
fn element(b: &[u8], pos: usize) -> Result<(u32, &[u8], usize), MatError> {
    let first = u32_at(b, pos)?;
    if first >> 16 != 0 {
        // Small data element: 2-byte size, 2-byte type, up to 4 bytes of data in the tag.
        let (ty, n) = (first & 0xffff, (first >> 16) as usize);
        if n > 4 {
            return Err(MatError::SmallElementTooLong { bytes: n });
        }
        let data = b
            .get(pos + 4..pos + 4 + n)
            .ok_or(MatError::TruncatedSmallElement)?;
        return Ok((ty, data, pos + 8));
    }
    let n = u32_at(b, pos + 4)? as usize;
    let start = pos + 8;
    let end = start.checked_add(n).ok_or(MatError::SizeOverflows)?;
    let data = b.get(start..end).ok_or(MatError::PastTheEnd {
        bytes: n,
        offset: pos,
        len: b.len(),
    })?;
    // Elements are padded to 8 bytes, except compressed ones.
    let next = if first == MI_COMPRESSED {
        end
    } else {
        end.next_multiple_of(8)
    };
    Ok((first, data, next.min(b.len())))
}

fn numbers(ty: u32, data: &[u8]) -> Result<Vec<f64>, MatError> {
    macro_rules! conv {
        ($t:ty, $n:expr) => {
            data.chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk size")) as f64)
                .collect()
        };
    }
    Ok(match ty {
        MI_INT8 => data.iter().map(|&v| f64::from(v as i8)).collect(),
        MI_UINT8 | MI_UTF8 => data.iter().map(|&v| f64::from(v)).collect(),
        MI_INT16 => conv!(i16, 2),
        MI_UINT16 => conv!(u16, 2),
        MI_INT32 => conv!(i32, 4),
        MI_UINT32 => conv!(u32, 4),
        MI_SINGLE => conv!(f32, 4),
        MI_DOUBLE => conv!(f64, 8),
        MI_INT64 => conv!(i64, 8),
        MI_UINT64 => conv!(u64, 8),
        other => return Err(MatError::NotNumericType { found: other }),
    })
}

/// Parses the body of an miMATRIX element into (name, value).
fn matrix(b: &[u8], depth: usize) -> Result<(String, MatValue), MatError> {
    if depth > MAX_DEPTH {
        return Err(MatError::TooDeep);
    }
    if b.is_empty() {
        // An empty miMATRIX is MATLAB's empty array.
        return Ok((
            String::new(),
            MatValue::Numeric {
                dims: vec![0, 0],
                data: vec![],
            },
        ));
    }
    let (_, flags, pos) = element(b, 0)?;
    let class = *flags.first().ok_or(MatError::MissingFlags)?;
    let (dims_ty, dims_raw, pos) = element(b, pos)?;
    let dims: Vec<usize> = numbers(dims_ty, dims_raw)?
        .into_iter()
        .map(|d| {
            if d >= 0.0 && d <= u32::MAX as f64 {
                Ok(d as usize)
            } else {
                Err(MatError::BadDimension { value: d })
            }
        })
        .collect::<Result<_, _>>()?;
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or(MatError::DimensionsOverflow)?;
    let (_, name_raw, mut pos) = element(b, pos)?;
    let name = String::from_utf8_lossy(name_raw).into_owned();
    let value = match class {
        MX_CELL => {
            let mut elements = Vec::with_capacity(count.min(1 << 20));
            for _ in 0..count {
                let (ty, inner, next) = element(b, pos)?;
                if ty != MI_MATRIX {
                    return Err(MatError::CellNotMatrix { found: ty });
                }
                elements.push(matrix(inner, depth + 1)?.1);
                pos = next;
            }
            MatValue::Cell { dims, elements }
        }
        MX_STRUCT => {
            let (ty, len_raw, next) = element(b, pos)?;
            let name_len = numbers(ty, len_raw)?.first().copied().unwrap_or(0.0) as usize;
            if name_len == 0 {
                return Err(MatError::ZeroFieldNameLength);
            }
            let (_, names_raw, next) = element(b, next)?;
            pos = next;
            let fields: Vec<String> = names_raw
                .chunks(name_len)
                .map(|c| {
                    String::from_utf8_lossy(c.split(|&x| x == 0).next().unwrap_or(c)).into_owned()
                })
                .filter(|s| !s.is_empty())
                .collect();
            let mut elements = Vec::with_capacity(count.min(1 << 20));
            for _ in 0..count {
                let mut values = Vec::with_capacity(fields.len());
                for _ in &fields {
                    let (ty, inner, next) = element(b, pos)?;
                    if ty != MI_MATRIX {
                        return Err(MatError::FieldNotMatrix { found: ty });
                    }
                    values.push(matrix(inner, depth + 1)?.1);
                    pos = next;
                }
                elements.push(values);
            }
            MatValue::Struct {
                dims,
                fields,
                elements,
            }
        }
        MX_CHAR => {
            let (ty, raw, _) = element(b, pos)?;
            let text = match ty {
                MI_UTF8 | MI_UINT8 | MI_INT8 => String::from_utf8_lossy(raw).into_owned(),
                _ => numbers(ty, raw)?
                    .into_iter()
                    .map(|c| char::from_u32(c as u32).unwrap_or('\u{fffd}'))
                    .collect(),
            };
            // MATLAB stores char matrices column-major; a row vector reads as is.
            MatValue::Char { dims, text }
        }
        6..=15 => {
            let (ty, raw, _) = element(b, pos)?;
            let data = numbers(ty, raw)?;
            if data.len() != count {
                return Err(MatError::ValueCount {
                    name,
                    values: data.len(),
                    dims,
                });
            }
            MatValue::Numeric { dims, data }
        }
        other => MatValue::Unsupported { class: other },
    };
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_headers_have_their_own_errors() {
        assert_eq!(
            read_mat(&[0; 10]).unwrap_err().to_string(),
            "10 bytes is too short for a MAT file header (128)"
        );
        let mut header = vec![b' '; 128];
        assert!(matches!(read_mat(&header), Err(MatError::NotLevel5)));
        header[126..].copy_from_slice(b"MI");
        assert!(matches!(read_mat(&header), Err(MatError::BigEndian)));
        header[126..].copy_from_slice(b"IM");
        assert!(read_mat(&header).unwrap().is_empty());
        // A matrix element that claims more bytes than the file has.
        header.extend(MI_MATRIX.to_le_bytes());
        header.extend(1000u32.to_le_bytes());
        let err = read_mat(&header).unwrap_err();
        assert!(
            matches!(
                err,
                MatError::PastTheEnd {
                    bytes: 1000,
                    offset: 128,
                    len: 136
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn missing_variables_and_fields_are_named() {
        let vars = vec![(
            "a".to_string(),
            MatValue::Numeric {
                dims: vec![1, 1],
                data: vec![1.0],
            },
        )];
        assert_eq!(
            variable(&vars, "b").unwrap_err().to_string(),
            "no variable \"b\" (variables: [\"a\"])"
        );
        assert_eq!(
            vars[0].1.struct_field("x").unwrap_err().to_string(),
            "expected a struct array, found a numeric array"
        );
    }
}
