//! TensorBoard event files, scalars only: `events.out.tfevents.*` in the run directory, which
//! `tensorboard --logdir <out>` reads.
//!
//! An event file is a sequence of TFRecords, each holding one serialized `tensorflow.Event`
//! protobuf. Both are encoded here by hand (the few fields needed), so no protobuf crate.
//!
//! Resuming a run does not reopen the earlier file: [`EventWriter::create`] starts a new one in the
//! same directory, and TensorBoard merges all event files of a directory into one run. Steps that
//! the earlier file logged after the checkpoint being resumed from are shown too.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What TensorBoard checks the first event of a file for.
const FILE_VERSION: &str = "brain.Event:2";

/// Which file operation failed, and on what.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot {op}: {source}", path.display())]
pub struct TensorboardError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl TensorboardError {
    fn new(op: &'static str, path: &Path, source: io::Error) -> Self {
        TensorboardError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Appends events to one TensorBoard event file.
///
/// Writes are buffered: call [`flush`](Self::flush) (e.g. at each log interval) for TensorBoard
/// to see them; dropping the writer flushes too, but silently ignores errors.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
    /// The encoded event, reused between records.
    event: Vec<u8>,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<unix secs>.<hostname>` (and `dir` if missing) and writes
    /// the file_version event. The hostname is read from `/etc/hostname`, else `localhost`.
    ///
    /// Never overwrites: should that name exist (a second writer within the same second), a
    /// suffix `.1`, `.2`, ... is added; TensorBoard reads any file with `tfevents` in its name.
    pub fn create(dir: &Path) -> Result<Self, TensorboardError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| TensorboardError::new("create the directory", dir, e))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let base = format!("events.out.tfevents.{}.{}", now.as_secs(), hostname());
        let mut suffix = 0u32;
        let (path, file) = loop {
            let path = match suffix {
                0 => dir.join(&base),
                n => dir.join(format!("{base}.{n}")),
            };
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && suffix < 1000 => suffix += 1,
                Err(e) => return Err(TensorboardError::new("create the event file", &path, e)),
            }
        };
        let mut writer = EventWriter {
            path,
            file: BufWriter::new(file),
            event: Vec::with_capacity(128),
        };
        writer.event.clear();
        encode_event_header(&mut writer.event, wall_time(), 0);
        put_bytes_field(&mut writer.event, 3, FILE_VERSION.as_bytes());
        writer.write_record()?;
        writer.flush()?;
        Ok(writer)
    }

    /// Appends one scalar: `tag` (e.g. `train/loss`) at global step `step`, wall time now.
    pub fn scalar(&mut self, tag: &str, step: i64, value: f32) -> Result<(), TensorboardError> {
        // Summary.Value { tag = 1; simple_value = 2 (float) }
        let mut summary_value = Vec::with_capacity(tag.len() + 8);
        put_bytes_field(&mut summary_value, 1, tag.as_bytes());
        put_key(&mut summary_value, 2, WIRE_FIXED32);
        summary_value.extend_from_slice(&value.to_le_bytes());
        // Summary { repeated Value value = 1 }
        let mut summary = Vec::with_capacity(summary_value.len() + 4);
        put_bytes_field(&mut summary, 1, &summary_value);

        self.event.clear();
        encode_event_header(&mut self.event, wall_time(), step);
        put_bytes_field(&mut self.event, 5, &summary);
        self.write_record()
    }

    /// Marks a restart at `step`: TensorBoard then drops every event of an earlier file at this
    /// step or later (what a resumed run repeats after its checkpoint).
    pub fn session_start(&mut self, step: i64) -> Result<(), TensorboardError> {
        // SessionLog { SessionStatus status = 1 } with START = 1, as Event field 7.
        let mut session_log = Vec::with_capacity(2);
        put_key(&mut session_log, 1, WIRE_VARINT);
        put_varint(&mut session_log, 1);
        self.event.clear();
        encode_event_header(&mut self.event, wall_time(), step);
        put_bytes_field(&mut self.event, 7, &session_log);
        self.write_record()
    }

    /// Hands buffered events to the OS, where TensorBoard (and a crash) will find them.
    pub fn flush(&mut self) -> Result<(), TensorboardError> {
        self.file
            .flush()
            .map_err(|e| TensorboardError::new("write", &self.path, e))
    }

    /// Flushes, then waits until the file's data is on disk (`fsync`).
    pub fn sync(&mut self) -> Result<(), TensorboardError> {
        self.flush()?;
        self.file
            .get_ref()
            .sync_data()
            .map_err(|e| TensorboardError::new("sync", &self.path, e))
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Frames `self.event` as a TFRecord: length, CRC of the length, data, CRC of the data.
    fn write_record(&mut self) -> Result<(), TensorboardError> {
        let len = (self.event.len() as u64).to_le_bytes();
        let mut header = [0u8; 12];
        header[..8].copy_from_slice(&len);
        header[8..].copy_from_slice(&masked_crc32c(&len).to_le_bytes());
        let footer = masked_crc32c(&self.event).to_le_bytes();
        self.file
            .write_all(&header)
            .and_then(|()| self.file.write_all(&self.event))
            .and_then(|()| self.file.write_all(&footer))
            .map_err(|e| TensorboardError::new("write", &self.path, e))
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The machine's name, kept to characters that are safe in a file name.
fn hostname() -> String {
    let name: String = std::fs::read_to_string("/etc/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

// Protobuf wire format: each field is a varint key `(number << 3) | wire type`, then the value.
const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push(v as u8 | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(buf, (u64::from(field) << 3) | u64::from(wire));
}

fn put_bytes_field(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, WIRE_LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// Event { double wall_time = 1; int64 step = 2; } — the fields every event starts with.
fn encode_event_header(buf: &mut Vec<u8>, wall_time: f64, step: i64) {
    put_key(buf, 1, WIRE_FIXED64);
    buf.extend_from_slice(&wall_time.to_le_bytes());
    // Proto3 leaves zero out; doing the same keeps the bytes identical to TensorFlow's.
    if step != 0 {
        put_key(buf, 2, WIRE_VARINT);
        // int64 (not sint64): a negative step is its two's complement, ten bytes long.
        put_varint(buf, step as u64);
    }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one byte per table lookup.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| {
        CRC32C_TABLE[usize::from(crc as u8 ^ b)] ^ (crc >> 8)
    })
}

/// TFRecord's masking, so that a CRC of data that itself contains CRCs is not trivially weak.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Records a skipped test in `target/skipped-tests.txt` (which `make test` prints), when
    /// that directory exists, and says so now.
    fn skip(test: &str, why: &str) {
        eprintln!("skipped: {why}");
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        if !target.is_dir() {
            return;
        }
        let line = format!("{test}: {why}\n");
        let _ = OpenOptions::new()
            .create(true)
            .append(true)
            .open(target.join("skipped-tests.txt"))
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }

    /// A fresh, empty directory for one test.
    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tbwriter-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    }

    #[derive(Debug, Default, PartialEq)]
    struct Decoded {
        wall_time: f64,
        step: i64,
        file_version: Option<String>,
        /// (tag, simple_value) of each Summary.Value.
        values: Vec<(String, f32)>,
        /// A SessionLog with status START.
        session_start: bool,
    }

    fn get_varint(data: &[u8], pos: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = data[*pos];
            *pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }

    /// Splits a message into (field number, wire type, value bytes); varints come back as
    /// their 8 little-endian bytes.
    fn fields(data: &[u8]) -> Vec<(u64, u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            let key = get_varint(data, &mut pos);
            let wire = (key & 7) as u8;
            let value = match wire {
                WIRE_VARINT => get_varint(data, &mut pos).to_le_bytes().to_vec(),
                WIRE_FIXED64 => {
                    pos += 8;
                    data[pos - 8..pos].to_vec()
                }
                WIRE_LEN => {
                    let len = get_varint(data, &mut pos) as usize;
                    pos += len;
                    data[pos - len..pos].to_vec()
                }
                WIRE_FIXED32 => {
                    pos += 4;
                    data[pos - 4..pos].to_vec()
                }
                other => panic!("unexpected wire type {other}"),
            };
            out.push((key >> 3, wire, value));
        }
        out
    }

    fn decode_event(data: &[u8]) -> Decoded {
        let mut ev = Decoded::default();
        for (field, wire, v) in fields(data) {
            match (field, wire) {
                (1, WIRE_FIXED64) => ev.wall_time = f64::from_le_bytes(v.try_into().unwrap()),
                (2, WIRE_VARINT) => ev.step = u64::from_le_bytes(v.try_into().unwrap()) as i64,
                (3, WIRE_LEN) => ev.file_version = Some(String::from_utf8(v).unwrap()),
                (5, WIRE_LEN) => {
                    for (f, w, value) in fields(&v) {
                        assert_eq!((f, w), (1, WIRE_LEN), "Summary.value");
                        let mut tag = String::new();
                        let mut simple = None;
                        for (f, w, x) in fields(&value) {
                            match (f, w) {
                                (1, WIRE_LEN) => tag = String::from_utf8(x).unwrap(),
                                (2, WIRE_FIXED32) => {
                                    simple = Some(f32::from_le_bytes(x.try_into().unwrap()))
                                }
                                other => panic!("unexpected Summary.Value field {other:?}"),
                            }
                        }
                        ev.values.push((tag, simple.expect("simple_value")));
                    }
                }
                (7, WIRE_LEN) => {
                    ev.session_start = fields(&v) == [(1, WIRE_VARINT, 1u64.to_le_bytes().to_vec())]
                }
                other => panic!("unexpected Event field {other:?}"),
            }
        }
        ev
    }

    /// Reads every TFRecord of a file, checking both CRCs, and decodes its Event.
    fn read_events(path: &Path) -> Vec<Decoded> {
        let bytes = std::fs::read(path).expect("read event file");
        let mut events = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let len_bytes = &bytes[pos..pos + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc32c(len_bytes), "length CRC at {pos}");
            let data = &bytes[pos + 12..pos + 12 + len];
            let data_crc =
                u32::from_le_bytes(bytes[pos + 12 + len..pos + 16 + len].try_into().unwrap());
            assert_eq!(data_crc, masked_crc32c(data), "data CRC at {pos}");
            events.push(decode_event(data));
            pos += 16 + len;
        }
        events
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn masked_crc32c_known_value() {
        // By hand: rotr(0xE3069283, 15) = 0x2507C60D, + 0xA282EAD8 = 0xC78AB0E5. The same
        // values come from TensorBoard's Python `pywrap_tensorflow.masked_crc32c`.
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
        assert_eq!(masked_crc32c(&[]), 0xA282_EAD8);
        // The length field of a 24-byte record.
        assert_eq!(masked_crc32c(&24u64.to_le_bytes()), 0x224B_7FA3);
    }

    #[test]
    fn varint_encoding() {
        let enc = |v: u64| {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            b
        };
        assert_eq!(enc(0), [0x00]);
        assert_eq!(enc(1), [0x01]);
        assert_eq!(enc(300), [0xAC, 0x02]);
        assert_eq!(
            enc(-1i64 as u64),
            [0xFF; 9].iter().chain(&[0x01]).copied().collect::<Vec<_>>()
        );
    }

    #[test]
    fn written_scalars_read_back() {
        let dir = scratch_dir("read-back");
        let mut w = EventWriter::create(&dir).expect("create");
        let written = [
            ("train/loss", 0, 2.5f32),
            ("train/loss", 1, 1.25),
            ("train/lr", 1, 3e-4),
            ("train/loss", 1_000_000_000_000, -0.0),
            ("eval/acc", -3, f32::NAN),
        ];
        for (tag, step, value) in written {
            w.scalar(tag, step, value).expect("scalar");
        }
        w.sync().expect("sync");
        let name = w.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert_eq!(w.path().parent(), Some(dir.as_path()));

        let events = read_events(w.path());
        assert_eq!(events.len(), 1 + written.len());
        assert_eq!(events[0].file_version.as_deref(), Some(FILE_VERSION));
        assert!(events[0].values.is_empty());
        let now = wall_time();
        for (ev, (tag, step, value)) in events[1..].iter().zip(written) {
            assert_eq!(ev.step, step);
            assert_eq!(ev.values.len(), 1);
            assert_eq!(ev.values[0].0, tag);
            assert_eq!(ev.values[0].1.to_bits(), value.to_bits());
            assert!(ev.file_version.is_none());
            assert!(ev.wall_time > now - 60.0 && ev.wall_time <= now);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_session_start_is_a_session_log_at_its_step() {
        let dir = scratch_dir("session-start");
        let mut w = EventWriter::create(&dir).expect("create");
        w.session_start(7).expect("session_start");
        w.sync().expect("sync");
        let events = read_events(w.path());
        assert_eq!(events.len(), 2);
        assert!(events[1].session_start && events[1].values.is_empty());
        assert_eq!(events[1].step, 7);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn second_writer_does_not_overwrite_the_first() {
        let dir = scratch_dir("two-files");
        let mut a = EventWriter::create(&dir).expect("create a");
        a.scalar("x", 0, 1.0).expect("scalar");
        a.flush().expect("flush");
        let b = EventWriter::create(&dir).expect("create b");
        assert_ne!(a.path(), b.path());
        assert_eq!(read_events(a.path()).len(), 2);
        assert_eq!(read_events(b.path()).len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn error_names_path_and_operation() {
        let dir = scratch_dir("error");
        let blocker = dir.join("not-a-dir");
        std::fs::write(&blocker, b"").expect("write");
        let err = match EventWriter::create(&blocker.join("run")) {
            Ok(_) => panic!("created an event file under a regular file"),
            Err(e) => e,
        };
        assert_eq!(err.op, "create the directory");
        assert_eq!(err.path, blocker.join("run"));
        let msg = err.to_string();
        assert!(
            msg.contains("not-a-dir/run: cannot create the directory: "),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// TensorBoard's own reader, over two files in one directory (a run and its resumption,
    /// which drops what the first file holds from the restart step on).
    #[test]
    fn python_tensorboard_reads_file() {
        let have_tb = Command::new("python3")
            .args(["-c", "import tensorboard"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !have_tb {
            skip(
                "tensorboard::tests::python_tensorboard_reads_file",
                "python tensorboard not installed",
            );
            return;
        }
        let dir = scratch_dir("python");
        let losses = [(0i64, 2.5f32), (10, 1.75), (20, 0.123_456_79)];
        let resumed = [(30i64, 0.1f32), (40, 1e-7)];
        let mut first = EventWriter::create(&dir).expect("create");
        for (step, v) in losses {
            first.scalar("train/loss", step, v).expect("scalar");
        }
        first.scalar("train/lr", 0, 3e-4).expect("scalar");
        first.sync().expect("sync");
        drop(first);
        let mut second = EventWriter::create(&dir).expect("create");
        // Resumed from a checkpoint taken before step 20: the first file's step 20 is dropped.
        second.session_start(15).expect("session_start");
        for (step, v) in resumed {
            second.scalar("train/loss", step, v).expect("scalar");
        }
        second.flush().expect("flush");

        let script = r#"
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1])
ea.Reload()
print("tags", " ".join(sorted(ea.Tags()["scalars"])))
for s in ea.Scalars("train/loss"):
    print("loss", s.step, repr(s.value), s.wall_time)
for s in ea.Scalars("train/lr"):
    print("lr", s.step, repr(s.value), s.wall_time)
"#;
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&dir)
            .output()
            .expect("run python3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "python failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("tensorboard reader output:\n{stdout}");

        let mut lines = stdout.lines();
        assert_eq!(lines.next(), Some("tags train/loss train/lr"));
        let parse = |line: Option<&str>, kind: &str| -> (i64, f32) {
            let line = line.expect("a line per scalar");
            let parts: Vec<&str> = line.split(' ').collect();
            assert_eq!(parts.len(), 4, "{line}");
            assert_eq!(parts[0], kind, "{line}");
            let wall: f64 = parts[3].parse().expect("wall_time");
            assert!(wall > 1.6e9, "{line}");
            // Python prints the float32 widened to a double, which narrows back exactly.
            (
                parts[1].parse().expect("step"),
                parts[2].parse::<f64>().expect("value") as f32,
            )
        };
        for (step, v) in losses[..2].iter().chain(&resumed) {
            assert_eq!(parse(lines.next(), "loss"), (*step, *v));
        }
        assert_eq!(parse(lines.next(), "lr"), (0, 3e-4));
        assert_eq!(lines.next(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
