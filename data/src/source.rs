//! Finding a dataset's files and reading them as a stream of rows.
//!
//! A source is a file, a directory or a glob. Directories written by `datasets`'
//! `save_to_disk` (one `Dataset`, or a `DatasetDict` with a folder per split) are read through
//! their `state.json` / `dataset_dict.json`; other directories (a Hub dataset's `data/` folder,
//! say) are searched for data files, and a split picks the files named after it, as `datasets`
//! does (`train-00000-of-00002.parquet`, `test/…`). Each file is read in record batches (Arrow,
//! Parquet row groups) or lines (JSON Lines), never whole.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, Schema};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
use serde_json::{Map, Value};

use crate::error::{Error, Location, Result};
use crate::guard::guarded;

/// One row: the columns that were asked for, as JSON values.
#[derive(Debug, Clone)]
pub struct Record {
    pub fields: Map<String, Value>,
    pub at: Location,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Arrow IPC, file (`ARROW1` magic) or stream format; `datasets` writes streams.
    Arrow,
    Parquet,
    /// JSON Lines, gzip-compressed when the name ends in `.gz`.
    JsonLines {
        gzip: bool,
    },
    /// One JSON array of objects (`alpaca_data.json`): the only format read whole.
    JsonArray,
}

#[derive(Debug, Clone)]
pub struct DataFile {
    pub path: Arc<Path>,
    pub kind: FileKind,
}

const SPLIT_NAMES: [&str; 6] = ["train", "test", "validation", "valid", "dev", "eval"];

/// Resolves `path` (file, directory or glob) to its data files for `split`.
pub fn resolve(path: &str, split: &str) -> Result<Vec<DataFile>> {
    let err = |message: String| Error::Source {
        path: path.to_string(),
        message,
    };
    let files: Vec<PathBuf> = if path.contains(['*', '?', '[']) {
        let mut found = Vec::new();
        for entry in glob::glob(path).map_err(|e| err(e.to_string()))? {
            let p = entry.map_err(|e| err(e.to_string()))?;
            if p.is_file() && kind_of(&p).is_some() {
                found.push(p);
            }
        }
        found.sort();
        if found.is_empty() {
            return Err(err(
                "the pattern matches no data files (.arrow, .parquet, .jsonl, .json, .jsonl.gz)".into(),
            ));
        }
        found
    } else {
        let p = Path::new(path);
        if p.is_file() {
            vec![p.to_path_buf()]
        } else if p.is_dir() {
            resolve_dir(p, split).map_err(err)?
        } else {
            return Err(err("no such file or directory".into()));
        }
    };
    files
        .into_iter()
        .map(|p| {
            let kind = kind_of(&p).ok_or_else(|| {
                err(format!(
                    "{}: unknown data file type (expected .arrow, .parquet, .jsonl, .json or .jsonl.gz)",
                    p.display()
                ))
            })?;
            let kind = match kind {
                FileKind::JsonLines { gzip: false } if is_json_array(&p).map_err(|e| err(e.to_string()))? => {
                    FileKind::JsonArray
                }
                k => k,
            };
            Ok(DataFile { path: p.into(), kind })
        })
        .collect()
}

fn kind_of(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    if name.ends_with(".arrow") {
        Some(FileKind::Arrow)
    } else if name.ends_with(".parquet") {
        Some(FileKind::Parquet)
    } else if name.ends_with(".jsonl.gz") || name.ends_with(".json.gz") {
        Some(FileKind::JsonLines { gzip: true })
    } else if name.ends_with(".jsonl") || name.ends_with(".json") {
        Some(FileKind::JsonLines { gzip: false })
    } else {
        None
    }
}

/// `datasets`' `to_json` writes JSON Lines even into `.json` files; a file whose first non-blank
/// byte is `[` is one array instead.
fn is_json_array(path: &Path) -> std::io::Result<bool> {
    let mut buf = [0u8; 256];
    let n = File::open(path)?.read(&mut buf)?;
    Ok(buf[..n].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'['))
}

fn resolve_dir(dir: &Path, split: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let dict = dir.join("dataset_dict.json");
    if dict.exists() {
        let text = std::fs::read_to_string(&dict).map_err(|e| format!("{}: {e}", dict.display()))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", dict.display()))?;
        let splits: Vec<String> = json
            .get("splits")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if !splits.iter().any(|s| s == split) {
            return Err(format!("split {split:?} not found; this DatasetDict has {splits:?}"));
        }
        return saved_dataset(&dir.join(split));
    }
    if dir.join("state.json").exists() {
        return saved_dataset(dir);
    }
    let mut all = Vec::new();
    collect_files(dir, &mut all).map_err(|e| format!("{e}"))?;
    all.sort();
    if all.is_empty() {
        return Err("the directory holds no data files (.arrow, .parquet, .jsonl, .json, .jsonl.gz)".into());
    }
    let rel = |p: &PathBuf| p.strip_prefix(dir).unwrap_or(p).to_string_lossy().to_ascii_lowercase();
    let of_split: Vec<PathBuf> = all.iter().filter(|p| names_split(&rel(p), split)).cloned().collect();
    if !of_split.is_empty() {
        return Ok(of_split);
    }
    let named: Vec<&str> = SPLIT_NAMES
        .iter()
        .copied()
        .filter(|s| all.iter().any(|p| names_split(&rel(p), s)))
        .collect();
    if named.is_empty() && split == "train" {
        // As in `datasets`: files that name no split are all the training split.
        Ok(all)
    } else {
        Err(format!(
            "no files for split {split:?}; the files name the splits {named:?}"
        ))
    }
}

/// Whether a relative path names `split` the way the Hub's data-file patterns do: a folder, or a
/// file name that starts with the split followed by `-`, `_` or `.`.
fn names_split(rel: &str, split: &str) -> bool {
    let split = split.to_ascii_lowercase();
    let mut parts: Vec<&str> = rel.split(['/', '\\']).collect();
    let file = parts.pop().unwrap_or("");
    parts.iter().any(|d| *d == split)
        || file
            .strip_prefix(split.as_str())
            .is_some_and(|rest| rest.starts_with(['-', '_', '.']))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if kind_of(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// A directory written by `Dataset.save_to_disk`: `state.json` lists the Arrow files in order.
fn saved_dataset(dir: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let state = dir.join("state.json");
    let text = std::fs::read_to_string(&state).map_err(|e| format!("{}: {e}", state.display()))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", state.display()))?;
    let files = json
        .get("_data_files")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{}: no `_data_files` list", state.display()))?;
    files
        .iter()
        .map(|f| {
            f.get("filename")
                .and_then(Value::as_str)
                .map(|name| dir.join(name))
                .ok_or_else(|| format!("{}: a `_data_files` entry has no filename", state.display()))
        })
        .collect()
}

impl DataFile {
    fn at(&self) -> Location {
        Location::file(&self.path)
    }

    fn file_error(&self, message: impl std::fmt::Display) -> Error {
        Error::File {
            at: self.at(),
            message: message.to_string(),
        }
    }

    fn open(&self) -> Result<File> {
        File::open(&self.path).map_err(|e| Error::io(self.path.to_path_buf(), e))
    }

    /// The file's column names, read from its schema (Arrow, Parquet) or first row (JSON).
    pub fn columns(&self) -> Result<Vec<String>> {
        guarded(|| self.columns_unguarded()).unwrap_or_else(|panic| Err(self.corrupt(&panic)))
    }

    /// The rows of this file, with only `columns` (all when `None`).
    pub fn rows(&self, columns: Option<&[String]>) -> Result<Box<dyn Iterator<Item = Result<Record>> + Send>> {
        let rows = guarded(|| self.rows_unguarded(columns)).unwrap_or_else(|panic| Err(self.corrupt(&panic)))?;
        Ok(Box::new(GuardedRows {
            rows,
            file: self.clone(),
            failed: false,
        }))
    }

    /// A reader that panicked: the file is corrupt (a whole-file error, never a skippable row).
    fn corrupt(&self, panic: &str) -> Error {
        self.file_error(format!("corrupt or truncated file: the reader failed ({panic})"))
    }

    fn columns_unguarded(&self) -> Result<Vec<String>> {
        match self.kind {
            FileKind::Arrow => {
                let schema = self.arrow_reader(None)?.schema();
                Ok(schema.fields().iter().map(|f| f.name().clone()).collect())
            }
            FileKind::Parquet => {
                let meta =
                    ArrowReaderMetadata::load(&self.open()?, Default::default()).map_err(|e| self.file_error(e))?;
                Ok(meta.schema().fields().iter().map(|f| f.name().clone()).collect())
            }
            FileKind::JsonLines { .. } | FileKind::JsonArray => {
                let first = self.rows(None)?.next().transpose()?;
                Ok(first.map(|r| r.fields.keys().cloned().collect()).unwrap_or_default())
            }
        }
    }

    fn rows_unguarded(&self, columns: Option<&[String]>) -> Result<Box<dyn Iterator<Item = Result<Record>> + Send>> {
        match self.kind {
            FileKind::Arrow => {
                let reader = self.arrow_reader(None)?;
                let schema = reader.schema();
                let projection = project(&schema, columns);
                let names: Vec<String> = projection.iter().map(|&i| schema.field(i).name().clone()).collect();
                let reader = self.arrow_reader(Some(projection))?;
                Ok(Box::new(BatchRows::new(self.clone(), reader, names, None)))
            }
            FileKind::Parquet => self.parquet_rows(columns),
            FileKind::JsonLines { gzip } => {
                let file = self.open()?;
                let reader: Box<dyn BufRead + Send> = if gzip {
                    Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file)))
                } else {
                    Box::new(BufReader::with_capacity(1 << 20, file))
                };
                let keep = columns.map(|c| c.to_vec());
                let this = self.clone();
                let mut row = 0u64;
                Ok(Box::new(reader.lines().filter_map(move |line| {
                    let at = Location {
                        row: Some(row),
                        ..this.at()
                    };
                    let line = match line {
                        Ok(l) => l,
                        Err(e) => return Some(Err(this.file_error(format!("line {}: {e}", row + 1)))),
                    };
                    if line.trim().is_empty() {
                        return None;
                    }
                    row += 1;
                    Some(json_record(serde_json::from_str(&line), keep.as_deref(), at))
                })))
            }
            FileKind::JsonArray => {
                let text = std::fs::read_to_string(&self.path).map_err(|e| Error::io(self.path.to_path_buf(), e))?;
                let rows: Vec<Value> = serde_json::from_str(&text).map_err(|e| self.file_error(e))?;
                let keep = columns.map(|c| c.to_vec());
                let this = self.clone();
                Ok(Box::new(rows.into_iter().enumerate().map(move |(i, v)| {
                    let at = Location {
                        row: Some(i as u64),
                        ..this.at()
                    };
                    json_record(Ok(v), keep.as_deref(), at)
                })))
            }
        }
    }

    fn arrow_reader(&self, projection: Option<Vec<usize>>) -> Result<ArrowReader> {
        let mut file = self.open()?;
        let mut magic = [0u8; 6];
        let is_file_format = file.read_exact(&mut magic).is_ok() && &magic == b"ARROW1";
        let io = |e| Error::io(self.path.to_path_buf(), e);
        if let Some(why) = check_ipc_lengths(&mut file, is_file_format).map_err(io)? {
            return Err(self.file_error(format!("corrupt Arrow file: {why}")));
        }
        file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        if is_file_format {
            arrow_ipc::reader::FileReader::try_new(file, projection)
                .map(ArrowReader::File)
                .map_err(|e| self.file_error(format!("not a readable Arrow IPC file: {e}")))
        } else {
            arrow_ipc::reader::StreamReader::try_new(BufReader::with_capacity(1 << 20, file), projection)
                .map(ArrowReader::Stream)
                .map_err(|e| self.file_error(format!("not a readable Arrow IPC stream: {e}")))
        }
    }

    /// Parquet is read one row group at a time, so an error names the row group.
    fn parquet_rows(&self, columns: Option<&[String]>) -> Result<Box<dyn Iterator<Item = Result<Record>> + Send>> {
        let file = self.open()?;
        let meta = ArrowReaderMetadata::load(&file, Default::default()).map_err(|e| self.file_error(e))?;
        let schema = meta.schema().clone();
        let projection = project(&schema, columns);
        let names: Vec<String> = projection.iter().map(|&i| schema.field(i).name().clone()).collect();
        let groups = meta.metadata().num_row_groups();
        let this = self.clone();
        let mut first_row = 0u64;
        let iter = (0..groups).flat_map(move |g| -> Box<dyn Iterator<Item = Result<Record>> + Send> {
            let rows_in_group = meta.metadata().row_group(g).num_rows() as u64;
            let start = first_row;
            first_row += rows_in_group;
            let reader = file
                .try_clone()
                .map_err(|e| Error::io(this.path.to_path_buf(), e))
                .and_then(|f| {
                    let mask = ProjectionMask::roots(meta.parquet_schema(), projection.iter().copied());
                    ParquetRecordBatchReaderBuilder::new_with_metadata(f, meta.clone())
                        .with_row_groups(vec![g])
                        .with_projection(mask)
                        .with_batch_size(1024)
                        .build()
                        .map_err(|e| this.file_error(format!("row group {g}: {e}")))
                });
            match reader {
                Ok(r) => Box::new(BatchRows::new(
                    this.clone(),
                    ArrowReader::Parquet(r),
                    names.clone(),
                    Some((g, start)),
                )),
                Err(e) => Box::new(std::iter::once(Err(e))),
            }
        });
        Ok(Box::new(iter))
    }
}

fn json_record(parsed: serde_json::Result<Value>, keep: Option<&[String]>, at: Location) -> Result<Record> {
    let value = parsed.map_err(|e| Error::BadRow {
        at: at.clone(),
        column: String::new(),
        message: format!("not valid JSON: {e}"),
    })?;
    let Value::Object(mut fields) = value else {
        return Err(Error::BadRow {
            at,
            column: String::new(),
            message: "a row must be a JSON object".into(),
        });
    };
    if let Some(keep) = keep {
        fields.retain(|k, _| keep.contains(k));
    }
    Ok(Record { fields, at })
}

/// Column indices to read: the asked-for columns that exist (a missing one is reported later,
/// with the format that needs it), or all.
fn project(schema: &Schema, columns: Option<&[String]>) -> Vec<usize> {
    match columns {
        None => (0..schema.fields().len()).collect(),
        Some(cols) => (0..schema.fields().len())
            .filter(|&i| cols.contains(schema.field(i).name()))
            .collect(),
    }
}

enum ArrowReader {
    File(arrow_ipc::reader::FileReader<File>),
    Stream(arrow_ipc::reader::StreamReader<BufReader<File>>),
    Parquet(parquet::arrow::arrow_reader::ParquetRecordBatchReader),
}

impl ArrowReader {
    fn schema(&self) -> Arc<Schema> {
        match self {
            Self::File(r) => r.schema(),
            Self::Stream(r) => r.schema(),
            Self::Parquet(r) => arrow_array::RecordBatchReader::schema(r),
        }
    }

    fn next_batch(&mut self) -> Option<std::result::Result<RecordBatch, String>> {
        match self {
            Self::File(r) => r.next().map(|b| b.map_err(|e| e.to_string())),
            Self::Stream(r) => r.next().map(|b| b.map_err(|e| e.to_string())),
            Self::Parquet(r) => r.next().map(|b| b.map_err(|e| e.to_string())),
        }
    }
}

/// Rows of a stream of record batches, one batch converted at a time.
struct BatchRows {
    file: DataFile,
    reader: ArrowReader,
    names: Vec<String>,
    row_group: Option<usize>,
    next_row: u64,
    pending: std::vec::IntoIter<Result<Record>>,
    failed: bool,
}

impl BatchRows {
    fn new(file: DataFile, reader: ArrowReader, names: Vec<String>, group: Option<(usize, u64)>) -> Self {
        Self {
            file,
            reader,
            names,
            row_group: group.map(|g| g.0),
            next_row: group.map_or(0, |g| g.1),
            pending: Vec::new().into_iter(),
            failed: false,
        }
    }
}

impl Iterator for BatchRows {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        loop {
            if let Some(r) = self.pending.next() {
                return Some(r);
            }
            if self.failed {
                return None;
            }
            let batch = match self.reader.next_batch()? {
                Ok(b) => b,
                Err(e) => {
                    // A corrupt batch ends the file: later batches cannot be located reliably.
                    self.failed = true;
                    let at = Location {
                        row_group: self.row_group,
                        ..self.file.at()
                    };
                    return Some(Err(Error::File {
                        at,
                        message: format!("corrupt record batch after row {}: {e}", self.next_row),
                    }));
                }
            };
            let mut rows = Vec::with_capacity(batch.num_rows());
            for i in 0..batch.num_rows() {
                let at = Location {
                    path: self.file.path.clone(),
                    row: Some(self.next_row + i as u64),
                    row_group: self.row_group,
                };
                let mut fields = Map::new();
                let mut bad = None;
                for (name, column) in self.names.iter().zip(batch.columns()) {
                    match arrow_value(column.as_ref(), i) {
                        Ok(v) => {
                            fields.insert(name.clone(), v);
                        }
                        Err(message) => {
                            bad = Some(Error::BadRow {
                                at: at.clone(),
                                column: name.clone(),
                                message,
                            });
                            break;
                        }
                    }
                }
                rows.push(match bad {
                    Some(e) => Err(e),
                    None => Ok(Record { fields, at }),
                });
            }
            self.next_row += batch.num_rows() as u64;
            self.pending = rows.into_iter();
        }
    }
}

/// One Arrow value as JSON: the types datasets hold text and conversations in (strings, lists,
/// structs, numbers, booleans, nulls).
fn arrow_value(array: &dyn Array, i: usize) -> std::result::Result<Value, String> {
    if array.is_null(i) {
        return Ok(Value::Null);
    }
    macro_rules! num {
        ($t:ty) => {
            Value::from(array.as_primitive::<$t>().value(i))
        };
    }
    Ok(match array.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(array.as_boolean().value(i)),
        DataType::Int8 => num!(Int8Type),
        DataType::Int16 => num!(Int16Type),
        DataType::Int32 => num!(Int32Type),
        DataType::Int64 => num!(Int64Type),
        DataType::UInt8 => num!(UInt8Type),
        DataType::UInt16 => num!(UInt16Type),
        DataType::UInt32 => num!(UInt32Type),
        DataType::UInt64 => num!(UInt64Type),
        DataType::Float16 => Value::from(array.as_primitive::<Float16Type>().value(i).to_f64()),
        DataType::Float32 => num!(Float32Type),
        DataType::Float64 => num!(Float64Type),
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(array.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(array.as_string_view().value(i).to_string()),
        DataType::List(_) => list(array.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(array.as_list::<i64>().value(i).as_ref())?,
        DataType::ListView(_) => list(array.as_list_view::<i32>().value(i).as_ref())?,
        DataType::FixedSizeList(_, _) => list(array.as_fixed_size_list().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let mut map = Map::new();
            for (f, column) in fields.iter().zip(s.columns()) {
                map.insert(f.name().clone(), arrow_value(column.as_ref(), i)?);
            }
            Value::Object(map)
        }
        DataType::Dictionary(_, _) => {
            let dict = array.as_any_dictionary();
            let key = dict.normalized_keys()[i];
            arrow_value(dict.values().as_ref(), key)?
        }
        other => return Err(format!("values of Arrow type {other} are not supported")),
    })
}

fn list(values: &dyn Array) -> std::result::Result<Value, String> {
    (0..values.len())
        .map(|j| arrow_value(values, j))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Value::Array)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_follow_the_hub_patterns() {
        assert!(names_split("data/train-00000-of-00002.parquet", "train"));
        assert!(names_split("train.jsonl", "train"));
        assert!(names_split("test/part0.parquet", "test"));
        assert!(!names_split("data/training_notes.jsonl", "train"));
        assert!(!names_split("data/train-00000.parquet", "test"));
    }
}

/// A file's rows read through [`guarded`]: a reader that panics ends them with an error.
struct GuardedRows {
    rows: Box<dyn Iterator<Item = Result<Record>> + Send>,
    file: DataFile,
    failed: bool,
}

impl Iterator for GuardedRows {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        if self.failed {
            return None;
        }
        guarded(|| self.rows.next()).unwrap_or_else(|panic| {
            self.failed = true;
            Some(Err(self.file.corrupt(&panic)))
        })
    }
}

/// arrow-ipc 57 allocates each record batch (file format) or message body (stream format) at
/// the size the file declares, before reading it: a corrupt length aborts the process in the
/// allocator (tests/inputs.rs found 100 GB ones), which no `catch_unwind` can stop. So the
/// declared lengths are checked against the file's size first, reading only the metadata.
/// `Ok(Some(why))` for a length past the end; a file arrow cannot parse is left to arrow's
/// own error.
fn check_ipc_lengths(file: &mut File, is_file_format: bool) -> std::io::Result<Option<String>> {
    use std::io::SeekFrom;
    let len = file.seek(SeekFrom::End(0))?;
    let mut read_at = |at: u64, n: usize| -> std::io::Result<Option<Vec<u8>>> {
        if at.checked_add(n as u64).is_none_or(|end| end > len) {
            return Ok(None);
        }
        let mut buf = vec![0u8; n];
        file.seek(SeekFrom::Start(at))?;
        file.read_exact(&mut buf)?;
        Ok(Some(buf))
    };
    let past_end = |what: &str, end: i128| {
        (end > len as i128).then(|| format!("{what} ends at byte {end}, past the file's {len}"))
    };
    if is_file_format {
        // ... footer, footer length (i32), "ARROW1".
        let Some(tail) = len.checked_sub(10).map(|at| read_at(at, 10)).transpose()?.flatten() else {
            return Ok(None);
        };
        let footer_len = i32::from_le_bytes(tail[..4].try_into().expect("4 bytes")).max(0) as u64;
        let Some(footer) = (len - 10)
            .checked_sub(footer_len)
            .map(|at| read_at(at, footer_len as usize))
            .transpose()?
            .flatten()
        else {
            return Ok(Some(format!("a footer of {footer_len} bytes does not fit in {len}")));
        };
        let Ok(footer) = arrow_ipc::root_as_footer(&footer) else {
            return Ok(None);
        };
        let blocks = footer
            .recordBatches()
            .into_iter()
            .chain(footer.dictionaries())
            .flatten();
        for b in blocks {
            let end = b.offset() as i128 + b.metaDataLength() as i128 + b.bodyLength() as i128;
            if let Some(why) = past_end("a record batch", end) {
                return Ok(Some(why));
            }
        }
        return Ok(None);
    }
    let mut at = 0u64;
    while let Some(prefix) = read_at(at, 4)? {
        // A continuation marker (0xFFFFFFFF) then the length, or the length alone (old files).
        let (meta_len, header) = match u32::from_le_bytes(prefix.try_into().expect("4 bytes")) {
            0xFFFF_FFFF => match read_at(at + 4, 4)? {
                Some(l) => (u32::from_le_bytes(l.try_into().expect("4 bytes")), 8),
                None => return Ok(None),
            },
            l => (l, 4),
        };
        if meta_len == 0 {
            return Ok(None); // end of stream
        }
        let meta_at = at + header;
        let Some(meta) = read_at(meta_at, meta_len as usize)? else {
            return Ok(past_end("a message's metadata", meta_at as i128 + meta_len as i128));
        };
        let Ok(message) = arrow_ipc::root_as_message(&meta) else {
            return Ok(None);
        };
        let end = meta_at as i128 + meta_len as i128 + message.bodyLength() as i128;
        if let Some(why) = past_end("a message", end) {
            return Ok(Some(why));
        }
        at = end as u64;
    }
    Ok(None)
}
