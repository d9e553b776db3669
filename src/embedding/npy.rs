//! `.npy` matrices of class embeddings, read and written through the `npyz` crate (which parses
//! the header as the Python literal it is). Only what embeddings need: 2-D float matrices in C
//! order, little- or big-endian f4/f8.

use std::path::Path;

/// A row-major matrix of f64.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f64>,
}

/// Why bytes are not a usable `.npy` matrix.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("not a .npy file (no \\x93NUMPY magic)")]
    NotNpy,
    #[error("the header claims {claimed} bytes, but the file has {available} after the preamble")]
    HeaderLength { claimed: usize, available: usize },
    #[error("unreadable header: {0}")]
    Header(std::io::Error),
    #[error("Fortran-ordered arrays are not supported (save the matrix in C order)")]
    FortranOrder,
    #[error("a {dims}-D array of shape {shape:?}; expected a 2-D C x D matrix")]
    NotAMatrix { dims: usize, shape: Vec<u64> },
    #[error("dtype {0} is not supported (expected f4 or f8)")]
    Dtype(String),
    #[error("the shape {shape:?} needs {needed} bytes of data, the file has {found}")]
    DataSize {
        shape: Vec<u64>,
        needed: u128,
        found: usize,
    },
    #[error("unreadable values: {0}")]
    Values(std::io::Error),
}

/// The longest header read (numpy's own are under 200 bytes; a larger one is not an embedding).
const MAX_HEADER_BYTES: usize = 1 << 16;

/// Reads a 2-D float matrix from the bytes of a `.npy` file.
pub fn read_matrix(bytes: &[u8]) -> Result<Matrix, NpyError> {
    if !bytes.starts_with(b"\x93NUMPY") {
        return Err(NpyError::NotNpy);
    }
    // Check the header's claimed length against the file before npyz allocates for it.
    let (claimed, preamble) = match bytes.get(6) {
        Some(1) => (
            bytes
                .get(8..10)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize),
            10,
        ),
        _ => (
            bytes
                .get(8..12)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize),
            12,
        ),
    };
    let available = bytes.len().saturating_sub(preamble);
    let claimed = claimed.unwrap_or(usize::MAX);
    if claimed > available || claimed > MAX_HEADER_BYTES {
        return Err(NpyError::HeaderLength { claimed, available });
    }
    let file = npyz::NpyFile::new(bytes).map_err(NpyError::Header)?;
    if file.order() == npyz::Order::Fortran {
        return Err(NpyError::FortranOrder);
    }
    let shape = file.shape().to_vec();
    let [rows, cols] = shape[..] else {
        return Err(NpyError::NotAMatrix {
            dims: shape.len(),
            shape,
        });
    };
    let npyz::DType::Plain(ty) = file.dtype() else {
        return Err(NpyError::Dtype(file.dtype().descr()));
    };
    let width = match (ty.type_char(), ty.size_field()) {
        (npyz::TypeChar::Float, 4) => 4u128,
        (npyz::TypeChar::Float, 8) => 8,
        _ => return Err(NpyError::Dtype(ty.to_string())),
    };
    let data = bytes.len() - preamble - claimed;
    let needed = u128::from(rows) * u128::from(cols) * width;
    if needed != data as u128 {
        return Err(NpyError::DataSize {
            shape,
            needed,
            found: data,
        });
    }
    let values = if width == 4 {
        let v: Vec<f32> = file.into_vec().map_err(NpyError::Values)?;
        v.into_iter().map(f64::from).collect()
    } else {
        file.into_vec().map_err(NpyError::Values)?
    };
    Ok(Matrix {
        rows: rows as usize,
        cols: cols as usize,
        values,
    })
}

/// The bytes of a little-endian f8 `.npy` file holding `m`.
pub fn matrix_bytes(m: &Matrix) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    use npyz::WriterBuilder;
    let mut writer = npyz::WriteOptions::<f64>::new()
        .default_dtype()
        .shape(&[m.rows as u64, m.cols as u64])
        .writer(std::io::Cursor::new(&mut bytes))
        .begin_nd()?;
    writer.extend(m.values.iter().copied())?;
    writer.finish()?;
    Ok(bytes)
}

/// Writes `m` as a little-endian f8 `.npy` file, atomically.
pub fn write_matrix(path: &Path, m: &Matrix) -> anyhow::Result<()> {
    let bytes = matrix_bytes(m)?;
    datasets_prep::atomic::write_file(path, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn npy(header: &str, values: &[f64]) -> Vec<u8> {
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        let padded = format!("{header:<117}\n");
        bytes.extend((padded.len() as u16).to_le_bytes());
        bytes.extend(padded.as_bytes());
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        bytes
    }

    fn valid() -> Vec<u8> {
        let values: Vec<f64> = (0..6).map(f64::from).collect();
        npy(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }",
            &values,
        )
    }

    #[test]
    fn round_trip_and_header_variants() {
        let m = read_matrix(&valid()).unwrap();
        assert_eq!((m.rows, m.cols, m.values[5]), (2, 3, 5.0));
        let back = read_matrix(&matrix_bytes(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        // No space after the colon is still Fortran order: a Python literal, not a string.
        let fortran = npy(
            "{'descr':'<f8','fortran_order':True,'shape':(2, 3)}",
            &[0.0; 6],
        );
        assert!(matches!(read_matrix(&fortran), Err(NpyError::FortranOrder)));
        let short = npy(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 4), }",
            &[0.0; 6],
        );
        assert!(matches!(
            read_matrix(&short),
            Err(NpyError::DataSize { .. })
        ));
        let mut huge = valid();
        huge[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            read_matrix(&huge),
            Err(NpyError::HeaderLength { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Embedding files are user input: any bytes give a value or an error, never a panic.
        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = read_matrix(&bytes);
        }

        #[test]
        fn reader_survives_mutations(edits in proptest::collection::vec((0usize..200, any::<u8>()), 1..6), cut in 0usize..250) {
            let mut bytes = valid();
            for (i, b) in edits {
                let i = i % bytes.len();
                bytes[i] = b;
            }
            bytes.truncate(cut.max(1).min(bytes.len()));
            let _ = read_matrix(&bytes);
        }
    }
}
