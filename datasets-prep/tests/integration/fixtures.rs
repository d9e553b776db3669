//! Writers for fixtures in each source's exact on-disk layout: real JPEG/PNG files, MATLAB v5
//! files, Python pickles as numpy writes them, IDX and CIFAR binary batches.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn datasets_prep() -> Command {
    Command::new(env!("CARGO_BIN_EXE_datasets-prep"))
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run datasets-prep")
}

pub fn show(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the command, failing the test if it has not finished after `secs` seconds (it is then
/// killed): for inputs that used to block forever.
pub fn run_within(cmd: &mut Command, secs: u64) -> Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start datasets-prep");
    let start = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed().as_secs() >= secs {
            child.kill().expect("kill");
            let out = child.wait_with_output().expect("wait");
            panic!("still running after {secs}s, killed:\n{}", show(&out));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.wait_with_output().expect("wait")
}

pub fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Runs `pack` with the given arguments and returns its output.
pub fn pack(source: &str, root: &Path, out: &Path, extra: &[&str]) -> Output {
    run(datasets_prep()
        .args(["pack", "--source", source, "--root"])
        .arg(root)
        .arg("--out")
        .arg(out)
        .args(extra))
}

/// Packs and asserts success.
pub fn pack_ok(source: &str, root: &Path, out: &Path, extra: &[&str]) {
    let o = pack(source, root, out, extra);
    assert!(o.status.success(), "{}", show(&o));
}

/// A deterministic test image: each pixel a function of (seed, row, column, channel).
pub fn pattern(seed: u32, h: u32, w: u32, channels: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity((h * w) as usize * channels as usize);
    for y in 0..h {
        for x in 0..w {
            for c in 0..u32::from(channels) {
                v.push(((x * 7 + y * 13 + c * 50 + seed * 31) % 251) as u8);
            }
        }
    }
    v
}

pub fn write_jpeg(path: &Path, seed: u32, h: u32, w: u32, channels: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let color = if channels == 1 {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 92)
        .encode(&pattern(seed, h, w, channels), w, h, color)
        .unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Makes a baseline JPEG's frame header (SOF0) claim another size; the data stays as it is.
pub fn claim_size(jpeg: &mut [u8], height: u16, width: u16) {
    let at = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline JPEG");
    jpeg[at + 5..at + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[at + 7..at + 9].copy_from_slice(&width.to_be_bytes());
}

pub fn write_png(path: &Path, seed: u32, h: u32, w: u32, channels: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let color = if channels == 1 {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    image::save_buffer(path, &pattern(seed, h, w, channels), w, h, color).unwrap();
}

pub fn write_text(path: &Path, lines: &[String]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

// ---- MATLAB Level 5 ---------------------------------------------------------------------

/// A value to write into a MAT file.
pub enum Mat {
    Double(Vec<f64>),
    U8(Vec<u8>),
    Char(String),
    /// 1 x N struct array: field names, then per element one value per field.
    Struct(Vec<&'static str>, Vec<Vec<Mat>>),
    Cell(Vec<Mat>),
}

fn element(ty: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    while out.len() % 8 != 0 {
        out.push(0);
    }
    out
}

fn matrix(name: &str, value: &Mat) -> Vec<u8> {
    let (class, n) = match value {
        Mat::Double(v) => (6u8, v.len()),
        Mat::U8(v) => (9, v.len()),
        Mat::Char(s) => (4, s.len()),
        Mat::Struct(_, e) => (2, e.len()),
        Mat::Cell(e) => (1, e.len()),
    };
    let mut body = element(6, &[class, 0, 0, 0, 0, 0, 0, 0]);
    let dims: Vec<u8> = [1i32, n as i32]
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    body.extend(element(5, &dims));
    body.extend(element(1, name.as_bytes()));
    match value {
        Mat::Double(v) => body.extend(element(
            9,
            &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>(),
        )),
        // Stored in the smallest type, as MATLAB does for integral doubles.
        Mat::U8(v) => body.extend(element(2, v)),
        Mat::Char(s) => body.extend(element(
            4,
            &s.bytes()
                .flat_map(|c| u16::from(c).to_le_bytes())
                .collect::<Vec<_>>(),
        )),
        Mat::Struct(fields, elements) => {
            let len = 32usize;
            body.extend(element(5, &(len as i32).to_le_bytes()));
            let mut names = vec![0u8; len * fields.len()];
            for (i, f) in fields.iter().enumerate() {
                names[i * len..i * len + f.len()].copy_from_slice(f.as_bytes());
            }
            body.extend(element(1, &names));
            for e in elements {
                for v in e {
                    body.extend(element(14, &matrix("", v)));
                }
            }
        }
        Mat::Cell(elements) => {
            for v in elements {
                body.extend(element(14, &matrix("", v)));
            }
        }
    }
    body
}

/// Writes a MAT v5 file; `compress` stores each variable zlib-compressed as MATLAB's default does.
pub fn write_mat(path: &Path, vars: &[(&str, Mat)], compress: bool) {
    let mut out = vec![b' '; 116];
    out[..22].copy_from_slice(b"MATLAB 5.0 MAT-file, t");
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&0x0100u16.to_le_bytes());
    out.extend_from_slice(b"IM");
    for (name, value) in vars {
        let m = element(14, &matrix(name, value));
        if compress {
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            z.write_all(&m).unwrap();
            let data = z.finish().unwrap();
            out.extend_from_slice(&15u32.to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&data);
        } else {
            out.extend(m);
        }
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, out).unwrap();
}

// ---- Python pickles as numpy and Python 2's cPickle write them ----------------------------

/// Pickle opcodes emitted by hand in the shape `pickle.dump(protocol=2)` gives a CIFAR batch.
pub struct Pickler(pub Vec<u8>);

impl Pickler {
    pub fn new() -> Self {
        Pickler(vec![0x80, 2])
    }
    pub fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(b'\n');
    }
    /// A Python 2 str (read back as bytes with encoding='bytes').
    pub fn py2_str(&mut self, s: &[u8]) {
        if s.len() < 256 {
            self.0.push(b'U');
            self.0.push(s.len() as u8);
        } else {
            self.0.push(b'T');
            self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        }
        self.0.extend_from_slice(s);
    }
    pub fn int(&mut self, v: i32) {
        self.0.push(b'J');
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// numpy.core.multiarray._reconstruct(ndarray, (0,), 'b') + BUILD state, dtype u1.
    pub fn u8_array(&mut self, shape: &[usize], data: &[u8]) {
        self.global("numpy.core.multiarray", "_reconstruct");
        self.global("numpy", "ndarray");
        self.0.extend_from_slice(&[b'K', 0, 0x85]);
        self.py2_str(b"b");
        self.0.extend_from_slice(&[0x87, b'R']);
        self.0.push(b'(');
        self.0.extend_from_slice(&[b'K', 1]);
        self.0.push(b'(');
        for &d in shape {
            self.int(d as i32);
        }
        self.0.push(b't');
        self.global("numpy", "dtype");
        self.py2_str(b"u1");
        self.0.extend_from_slice(&[b'K', 0, b'K', 1, 0x87, b'R']);
        self.0.push(b'(');
        self.0.extend_from_slice(&[b'K', 3]);
        self.py2_str(b"|");
        self.0.extend_from_slice(b"NNNJ");
        self.0.extend_from_slice(&(-1i32).to_le_bytes());
        self.0.push(b'J');
        self.0.extend_from_slice(&(-1i32).to_le_bytes());
        self.0.extend_from_slice(&[b'K', 0, b't', b'b', 0x89]);
        self.py2_str(data);
        self.0.extend_from_slice(b"tb");
    }
}

/// A CIFAR python batch: {'data': N x 3072 u1 array, label_key: [ints], 'filenames': [...]}.
pub fn write_cifar_python_batch(path: &Path, label_key: &str, labels: &[u8], data: &[u8]) {
    let mut p = Pickler::new();
    p.0.push(b'}');
    p.0.push(b'(');
    p.py2_str(b"data");
    p.u8_array(&[labels.len(), 3072], data);
    p.py2_str(label_key.as_bytes());
    p.0.push(b']');
    p.0.push(b'(');
    for &l in labels {
        p.int(i32::from(l));
    }
    p.0.push(b'e');
    p.py2_str(b"filenames");
    p.0.push(b']');
    p.0.push(b'(');
    for i in 0..labels.len() {
        p.py2_str(format!("img_{i}.png").as_bytes());
    }
    p.0.push(b'e');
    p.0.extend_from_slice(b"u.");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, p.0).unwrap();
}

/// CHW-ordered CIFAR pixels for `n` images, image i channel c pixel j = (i*3 + c*7 + j) % 256.
pub fn cifar_pixels(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (0..3072).map(move |k| ((i * 3 + (k / 1024) * 7 + k % 1024) % 256) as u8))
        .collect()
}

// ---- IDX --------------------------------------------------------------------------------

pub fn write_idx(path: &Path, dims: &[u32], data: &[u8], gzip: bool) {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    if gzip {
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&out).unwrap();
        out = z.finish().unwrap();
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, out).unwrap();
}

pub fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// All files of a directory with their bytes, sorted by name.
pub fn dir_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (PathBuf::from(p.file_name().unwrap()), b)
        })
        .collect();
    files.sort();
    files
}
