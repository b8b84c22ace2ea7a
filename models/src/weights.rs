//! Where weights come from. A [`WeightSource`] hands out checkpoint tensors by their Hugging
//! Face name, in the checkpoint's own layout; [`WeightLoader`] checks shapes, converts to the
//! requested dtype and puts them on the device, one tensor at a time, so peak memory stays near
//! the model's own size.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};

/// A checkpoint, seen through Hugging Face tensor names (`model.layers.0.mlp.up_proj.weight`).
pub trait WeightSource {
    /// The file a tensor lives in, for error messages.
    fn path_of(&self, name: &str) -> PathBuf;
    /// Shape in Hugging Face order (`[out, in]` for a linear weight), or `None` if absent.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The tensor's values in its stored float dtype (quantized formats come back as F32).
    fn read(&self, name: &str) -> Result<TensorData>;
}

/// Pulls tensors from a source onto a device, checking each shape.
pub struct WeightLoader<'a, B: Backend> {
    source: &'a dyn WeightSource,
    device: &'a B::Device,
    dtype: DType,
}

impl<'a, B: Backend> WeightLoader<'a, B> {
    pub fn new(source: &'a dyn WeightSource, device: &'a B::Device, dtype: DType) -> Self {
        Self { source, device, dtype }
    }

    fn fetch(&mut self, name: &str, expected: &[usize]) -> Result<TensorData> {
        let shape = self.source.shape(name).ok_or_else(|| Error::MissingTensor {
            path: self.source.path_of(name),
            tensor: name.to_string(),
        })?;
        if shape != expected {
            return Err(Error::Shape {
                path: self.source.path_of(name),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        let data = self.source.read(name)?;
        if data.shape.as_slice() != expected {
            return Err(Error::tensor(
                self.source.path_of(name),
                name,
                format!("decoded to shape {:?}, expected {expected:?}", data.shape),
            ));
        }
        Ok(data)
    }

    fn upload<const D: usize>(&self, data: TensorData) -> Tensor<B, D> {
        Tensor::from_data(data.convert_dtype(self.dtype), (self.device, self.dtype))
    }

    /// A matrix kept in checkpoint layout (`[rows, cols]`), e.g. the embedding table.
    pub fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Tensor<B, 2>> {
        let data = self.fetch(name, &[rows, cols])?;
        Ok(self.upload(data))
    }

    /// A linear weight stored `[out, in]`, returned transposed as `[in, out]`.
    pub fn linear(&mut self, name: &str, in_features: usize, out_features: usize) -> Result<Tensor<B, 2>> {
        let data = self.fetch(name, &[out_features, in_features])?;
        Ok(self.upload(transpose_2d(data)))
    }

    pub fn vector(&mut self, name: &str, len: usize) -> Result<Tensor<B, 1>> {
        let data = self.fetch(name, &[len])?;
        Ok(self.upload(data))
    }
}

/// Host-side transpose of a 2-D tensor, whatever its element size.
pub fn transpose_2d(data: TensorData) -> TensorData {
    let [rows, cols] = [data.shape[0], data.shape[1]];
    let dtype = data.dtype;
    let size = dtype.size();
    let src = data.as_bytes();
    let mut out = vec![0u8; src.len()];
    // Blocked so both sides stay in cache for large matrices.
    const BLOCK: usize = 32;
    for r0 in (0..rows).step_by(BLOCK) {
        for c0 in (0..cols).step_by(BLOCK) {
            for r in r0..(r0 + BLOCK).min(rows) {
                for c in c0..(c0 + BLOCK).min(cols) {
                    let s = (r * cols + c) * size;
                    let d = (c * rows + r) * size;
                    out[d..d + size].copy_from_slice(&src[s..s + size]);
                }
            }
        }
    }
    TensorData::from_bytes_vec(out, [cols, rows], dtype)
}

// ---------------------------------------------------------------------------------------------
// Random weights from a config alone, for benchmarks (speed does not depend on the values).

/// Every tensor a config's architecture expects, with normal-ish random values
/// (uniform with std 0.02; norms at their identity), generated on the host from `seed`.
pub struct RandomSource {
    shapes: HashMap<String, Vec<usize>>,
    seed: u64,
    norm_value: f32,
}

impl RandomSource {
    /// Random tensors of these names and shapes (a config's are `llama::checkpoint_shapes`;
    /// `llama::random_weights` builds the whole source from a config), norms at 1.
    pub fn new(shapes: Vec<(String, Vec<usize>)>, seed: u64) -> Self {
        Self {
            shapes: shapes.into_iter().collect(),
            seed,
            norm_value: 1.0,
        }
    }

    /// Norm weights at `value` instead (0 where a norm scales by `1 + w`, as Gemma's).
    pub fn with_norm_value(mut self, value: f32) -> Self {
        self.norm_value = value;
        self
    }
}

impl WeightSource for RandomSource {
    fn path_of(&self, _name: &str) -> PathBuf {
        PathBuf::from("<random weights>")
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes.get(name).cloned()
    }

    fn read(&self, name: &str) -> Result<TensorData> {
        let shape = self.shapes.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path_of(name),
            tensor: name.to_string(),
        })?;
        let n: usize = shape.iter().product();
        if name.contains("norm") {
            return Ok(TensorData::new(vec![self.norm_value; n], shape.clone()));
        }
        // xorshift64*, seeded per tensor: fast enough for a billion parameters.
        let mut state = self.seed
            ^ name
                .bytes()
                .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
            | 1;
        let half_width = 0.02 * 3f32.sqrt();
        let values = (0..n)
            .map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let u = (state.wrapping_mul(0x2545F4914F6CDD1D) >> 40) as f32 / (1u64 << 24) as f32;
                (2.0 * u - 1.0) * half_width
            })
            .collect();
        Ok(TensorData::new(values, shape.clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face safetensors: one `model.safetensors`, or shards listed in
// `model.safetensors.index.json`. Files are memory-mapped; a tensor is copied out only when
// the loader asks for it.

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

struct Entry {
    shard: usize,
    shape: Vec<usize>,
    dtype: StDtype,
    /// Where the tensor's bytes sit in the shard's mmap, found once when the header is parsed.
    bytes: std::ops::Range<usize>,
}

pub struct SafetensorsSource {
    shards: Vec<Shard>,
    index: HashMap<String, Entry>,
}

impl SafetensorsSource {
    /// Opens the safetensors files of a Hugging Face model directory.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
                path: index.clone(),
                error: source,
            })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index, "no \"weight_map\" object"))?;
            let mut files = BTreeMap::new();
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| Error::format(&index, format!("weight_map.{tensor}: not a file name")))?;
                files
                    .entry(file.to_string())
                    .or_insert_with(Vec::new)
                    .push(tensor.clone());
            }
            let paths: Vec<PathBuf> = files.keys().map(|f| dir.join(f)).collect();
            let source = Self::open_files(&paths)?;
            // Every tensor the index promises must be in the shard it names.
            for (file, tensors) in files {
                for t in tensors {
                    match source.index.get(&t) {
                        Some(e) if source.shards[e.shard].path == dir.join(&file) => {}
                        _ => {
                            return Err(Error::MissingTensor {
                                path: dir.join(&file),
                                tensor: t,
                            });
                        }
                    }
                }
            }
            Ok(source)
        } else if single.exists() {
            Self::open_files(&[single])
        } else {
            Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ))
        }
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is opened read-only and Temper never writes checkpoints in
            // place; a concurrent writer would be a user error we cannot guard against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
                index.insert(
                    name,
                    Entry {
                        shard: i,
                        shape: view.shape().to_vec(),
                        dtype: view.dtype(),
                        bytes: start..start + view.data().len(),
                    },
                );
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
            });
        }
        Ok(Self { shards, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }
}

impl WeightSource for SafetensorsSource {
    fn path_of(&self, name: &str) -> PathBuf {
        match self.index.get(name) {
            Some(e) => self.shards[e.shard].path.clone(),
            None => self.shards.first().map(|s| s.path.clone()).unwrap_or_default(),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.index.get(name).map(|e| e.shape.clone())
    }

    fn read(&self, name: &str) -> Result<TensorData> {
        let entry = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path_of(name),
            tensor: name.to_string(),
        })?;
        let shard = &self.shards[entry.shard];
        let dtype = match entry.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            other => {
                return Err(Error::tensor(
                    &shard.path,
                    name,
                    format!("unsupported safetensors dtype {other:?} (expected F32, F16 or BF16)"),
                ));
            }
        };
        Ok(TensorData::from_bytes_vec(
            shard.mmap[entry.bytes.clone()].to_vec(),
            entry.shape.clone(),
            dtype,
        ))
    }
}
