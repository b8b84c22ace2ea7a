//! Where metrics go: `metrics.jsonl`, TensorBoard event files, and the terminal.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One logged row: named values at a step.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub step: u64,
    pub values: Vec<(&'static str, f64)>,
}

impl Row {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

pub struct MetricsLog {
    jsonl: File,
    events: EventWriter,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl` and starts a new TensorBoard event file under `dir/runs/`.
    /// A run resumed at step `n` (`resumed_at: Some(n)`) keeps the rows up to step `n` and
    /// drops later ones, which its interrupted predecessor logged after the checkpoint and
    /// which are about to be logged again; a new run starts the file afresh.
    pub fn open(dir: &Path, resumed_at: Option<u64>) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let kept = match (resumed_at, std::fs::read_to_string(&path)) {
            (Some(step), Ok(text)) => text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s <= step)
                })
                .map(|line| format!("{line}\n"))
                .collect::<String>(),
            (Some(_), Err(e)) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&path, e)),
            _ => String::new(),
        };
        temper_models::atomic::write_file_atomic(&path, kept.as_bytes()).map_err(|e| Error::io(&path, e))?;
        let jsonl = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let runs = dir.join("runs");
        std::fs::create_dir_all(&runs).map_err(|e| Error::io(&runs, e))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let events = EventWriter::create(&runs.join(format!("events.out.tfevents.{}.temper", now.as_secs())))?;
        Ok(Self { jsonl, events })
    }

    pub fn write(&mut self, row: &Row) -> Result<()> {
        let mut obj = Map::new();
        obj.insert("step".into(), Value::from(row.step));
        for (name, v) in &row.values {
            obj.insert(
                (*name).into(),
                serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number),
            );
        }
        writeln!(self.jsonl, "{}", Value::Object(obj)).map_err(|e| Error::io("metrics.jsonl", e))?;
        for (name, v) in &row.values {
            self.events.scalar(name, *v as f32, row.step)?;
        }
        self.events.flush()
    }

    /// A TensorBoard text summary (Markdown, shown in the Text tab) at `step`.
    pub fn text(&mut self, tag: &str, markdown: &str, step: u64) -> Result<()> {
        self.events.text(tag, markdown, step)?;
        self.events.flush()
    }
}

/// A progress line that redraws itself on a terminal and prints plain lines otherwise.
pub struct Progress {
    tty: bool,
    /// Only rank 0 of a multi-worker job prints.
    shown: bool,
    total: u64,
    start: std::time::Instant,
    start_step: u64,
}

impl Progress {
    pub fn new(total: u64, start_step: u64, shown: bool) -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            shown,
            total,
            start: std::time::Instant::now(),
            start_step,
        }
    }

    pub fn update(&self, row: &Row) {
        if !self.shown {
            return;
        }
        let done = row.step.saturating_sub(self.start_step);
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if done > 0 {
            elapsed / done as f64 * self.total.saturating_sub(row.step) as f64
        } else {
            0.0
        };
        let f = |n: &str| row.get(n).unwrap_or(f64::NAN);
        // SFT's token accuracy, DPO's reward accuracy, KTO's KL estimate, a reward model's
        // pairwise accuracy, or GRPO's mean reward (on the steps that generate).
        let (acc_name, acc) = match (
            row.get("rewards/accuracies"),
            row.get("kl"),
            row.get("accuracy"),
            row.get("entropy"),
        ) {
            (Some(a), _, _, _) => ("reward acc", a),
            (None, _, _, Some(_)) => ("reward", f("reward")),
            (None, Some(kl), _, None) => ("kl", kl),
            (None, None, Some(a), None) => ("pair acc", a),
            (None, None, None, None) => ("acc", f("mean_token_accuracy")),
        };
        let line = format!(
            "step {}/{} | loss {:.4} | {acc_name} {acc:.3} | lr {:.2e} | grad_norm {:.3} | {:.0} tok/s | ETA {}",
            row.step,
            self.total,
            f("loss"),
            f("learning_rate"),
            f("grad_norm"),
            f("tokens_per_second"),
            clock(eta)
        );
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }

    /// Prints a line that stays (eval results, checkpoints) without breaking the progress line.
    pub fn note(&self, text: &str) {
        if !self.shown {
            return;
        }
        if self.tty {
            eprint!("\r\x1b[2K");
        }
        eprintln!("{text}");
    }

    pub fn finish(&self) {
        if self.tty && self.shown {
            eprintln!();
        }
    }
}

fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// TensorBoard's event file: TFRecord framing (length, masked CRC-32C of the length, data,
/// masked CRC-32C of the data) around `Event` protobufs, encoded by hand: an `Event` with
/// `wall_time` (1, double), `step` (2, int64) and either `file_version` (3) or a `Summary` (5)
/// of one `Value` with `tag` (1) and `simple_value` (2, float).
struct EventWriter {
    file: File,
    path: std::path::PathBuf,
}

impl EventWriter {
    fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let mut w = Self {
            file,
            path: path.to_path_buf(),
        };
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        Ok(w)
    }

    fn scalar(&mut self, tag: &str, value: f32, step: u64) -> Result<()> {
        let mut v = Vec::new();
        put_bytes(&mut v, 1, tag.as_bytes());
        v.push((2 << 3) | 5); // field 2, fixed32
        v.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &v);
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        event.push(2 << 3); // field 2, varint
        put_varint(&mut event, step);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    /// A `Value` with `metadata` (9: the `text` plugin) and a scalar string `tensor` (8:
    /// `TensorProto` with dtype DT_STRING = 7, an empty shape, `string_val` (8)), as
    /// TensorBoard's `text` summary writes it.
    fn text(&mut self, tag: &str, text: &str, step: u64) -> Result<()> {
        let mut plugin = Vec::new();
        put_bytes(&mut plugin, 1, b"text");
        let mut metadata = Vec::new();
        put_bytes(&mut metadata, 1, &plugin);
        let mut tensor = Vec::new();
        tensor.push(1 << 3); // field 1 (dtype), varint
        put_varint(&mut tensor, 7);
        put_bytes(&mut tensor, 2, &[]);
        put_bytes(&mut tensor, 8, text.as_bytes());
        let mut v = Vec::new();
        put_bytes(&mut v, 1, tag.as_bytes());
        put_bytes(&mut v, 9, &metadata);
        put_bytes(&mut v, 8, &tensor);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &v);
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        event.push(2 << 3);
        put_varint(&mut event, step);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&buf).map_err(|e| Error::io(&self.path, e))
    }

    fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_bytes(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(buf, (field << 3) | 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

fn put_double(buf: &mut Vec<u8>, field: u64, v: f64) {
    put_varint(buf, (field << 3) | 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// CRC-32C (Castagnoli), masked as TFRecord does.
fn masked_crc(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    let crc = !crc;
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        // CRC-32C("123456789") = 0xE3069283 (RFC 3720's check value).
        let raw = (masked_crc(b"123456789").wrapping_sub(0xa282_ead8)).rotate_left(15);
        assert_eq!(raw, 0xE306_9283);
    }
}
