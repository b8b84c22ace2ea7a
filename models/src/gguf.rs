//! llama.cpp's GGUF files: metadata, tensor directory, and dequantization to f32.
//!
//! The layout follows `ggml/include/gguf.h` and `ggml-quants.c` (block formats). A GGUF lists
//! a tensor's dimensions fastest-varying first, so `[in, out]` in GGUF is the `[out, in]` of a
//! PyTorch linear weight; we report shapes in PyTorch order.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use half::f16;
use memmap2::Mmap;

use crate::config::{Family, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::weights::WeightSource;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types Temper can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }
}

/// Names of ggml types we cannot read, for the error message.
fn ggml_type_name(id: u32) -> String {
    let name = match id {
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        _ => return format!("type id {id}"),
    };
    format!("{name} (type id {id})")
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Dimensions in PyTorch order (slowest first).
    pub shape: Vec<usize>,
    pub type_id: u32,
    pub ty: Option<GgmlType>,
    /// Absolute byte offset in the file.
    pub offset: usize,
}

/// An open GGUF file (memory-mapped).
pub struct Gguf {
    path: PathBuf,
    mmap: Mmap,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.data.len() - self.pos < n {
            return Err(Error::format(
                self.path,
                format!("truncated GGUF header: needed {n} bytes at offset {}", self.pos),
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        // No single string or array can be larger than the file itself.
        if n as usize > self.data.len() {
            return Err(Error::format(
                self.path,
                format!("corrupt GGUF header: length {n} at offset {}", self.pos),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        let bytes = self.take(n)?;
        // Some converters write invalid UTF-8 in token lists; keep what we can rather than fail.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, ty: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.u8()? as u64),
            1 => Value::I64(self.u8()? as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as u64),
            3 => Value::I64(i16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            4 => Value::U64(self.u32()? as u64),
            5 => Value::I64(self.u32()? as i32 as i64),
            6 => Value::F64(f32::from_le_bytes(self.take(4)?.try_into().unwrap()) as f64),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::String(self.string()?),
            9 => {
                let elem = self.u32()?;
                if elem == 9 {
                    // Arrays of arrays: no converter writes them, and each level recursing on
                    // a crafted file would overflow the stack.
                    return Err(Error::format(
                        self.path,
                        format!("corrupt GGUF header: an array of arrays at offset {}", self.pos),
                    ));
                }
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(elem)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            other => {
                return Err(Error::format(
                    self.path,
                    format!("corrupt GGUF header: unknown value type {other} at offset {}", self.pos),
                ));
            }
        })
    }
}

impl Gguf {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: read-only map of a file we never write.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let mut c = Cursor {
            data: &mmap,
            pos: 0,
            path: &path,
        };
        if c.take(4).ok() != Some(b"GGUF".as_slice()) {
            return Err(Error::format(&path, "not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                &path,
                format!("unsupported GGUF version {version} (expected 2 or 3)"),
            ));
        }
        let n_tensors = c.len()?;
        let n_kv = c.len()?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let value = c.value(ty)?;
            metadata.insert(key, value);
        }
        // The count is bounded by the file's size, not by memory: reserve modestly.
        let mut infos = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            if n_dims > 4 {
                return Err(Error::tensor(
                    &path,
                    name,
                    format!("{n_dims} dimensions (GGUF allows at most 4)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64()? as usize);
            }
            dims.reverse();
            let type_id = c.u32()?;
            let offset = c.u64()? as usize;
            infos.push((name, dims, type_id, offset));
        }
        let alignment = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32) as usize;
        if alignment == 0 || alignment > 1 << 20 {
            return Err(Error::format(
                &path,
                format!("corrupt GGUF header: general.alignment {alignment}"),
            ));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = HashMap::new();
        for (name, shape, type_id, offset) in infos {
            let info = TensorInfo {
                shape,
                type_id,
                ty: GgmlType::from_id(type_id),
                offset: data_start.saturating_add(offset),
            };
            if let Some(ty) = info.ty {
                let (block, bytes) = ty.block();
                // Checked: dimensions and offsets are read from the file and may be anything.
                let n = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                let end = n.and_then(|n| (n / block).checked_mul(bytes)?.checked_add(info.offset));
                let (Some(n), Some(end)) = (n, end) else {
                    return Err(Error::tensor(
                        &path,
                        name,
                        format!("shape {:?} at offset {offset} is larger than any file", info.shape),
                    ));
                };
                if !n.is_multiple_of(block) {
                    return Err(Error::tensor(
                        &path,
                        name,
                        format!("{n} elements is not a whole number of {block}-element blocks"),
                    ));
                }
                if end > mmap.len() {
                    return Err(Error::tensor(
                        &path,
                        name,
                        format!(
                            "data ends at byte {end} but the file has {} bytes (truncated download?)",
                            mmap.len()
                        ),
                    ));
                }
            }
            tensors.insert(name, info);
        }
        Ok(Self {
            path,
            mmap,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn architecture(&self) -> Result<&str> {
        self.get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::format(&self.path, "general.architecture: missing"))
    }

    /// Dequantizes a tensor. Float tensors keep their dtype; quantized ones become F32.
    pub fn read(&self, name: &str) -> Result<TensorData> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        let ty = info.ty.ok_or_else(|| Error::UnsupportedQuant {
            path: self.path.clone(),
            tensor: name.to_string(),
            ggml_type: ggml_type_name(info.type_id),
        })?;
        let n: usize = info.shape.iter().product();
        let (block, bytes) = ty.block();
        let raw = &self.mmap[info.offset..info.offset + n / block * bytes];
        let shape = info.shape.clone();
        Ok(match ty {
            GgmlType::F32 => TensorData::from_bytes_vec(raw.to_vec(), shape, DType::F32),
            GgmlType::F16 => TensorData::from_bytes_vec(raw.to_vec(), shape, DType::F16),
            GgmlType::BF16 => TensorData::from_bytes_vec(raw.to_vec(), shape, DType::BF16),
            q => TensorData::new(dequantize(q, raw, n), shape),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Block formats (ggml-quants.c, `dequantize_row_*`).

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `n` elements of a quantized tensor.
pub fn dequantize(ty: GgmlType, raw: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let (block, bytes) = ty.block();
    for (y, x) in out.chunks_exact_mut(block).zip(raw.chunks_exact(bytes)) {
        match ty {
            GgmlType::Q8_0 => {
                let d = f16_at(x, 0);
                for (yi, &q) in y.iter_mut().zip(&x[2..34]) {
                    *yi = q as i8 as f32 * d;
                }
            }
            GgmlType::Q4_0 => {
                let d = f16_at(x, 0);
                let qs = &x[2..18];
                for j in 0..16 {
                    y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
                    y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16_at(x, 0), f16_at(x, 2));
                let qs = &x[4..20];
                for j in 0..16 {
                    y[j] = (qs[j] & 0xF) as f32 * d + m;
                    y[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
            GgmlType::Q5_0 => {
                let d = f16_at(x, 0);
                let qh = u32::from_le_bytes(x[2..6].try_into().unwrap());
                let qs = &x[6..22];
                for j in 0..16 {
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    y[j] = (((qs[j] & 0xF) as u32 | h0) as i32 - 16) as f32 * d;
                    y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
                }
            }
            GgmlType::Q5_1 => {
                let (d, m) = (f16_at(x, 0), f16_at(x, 2));
                let qh = u32::from_le_bytes(x[4..8].try_into().unwrap());
                let qs = &x[8..24];
                for j in 0..16 {
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    y[j] = ((qs[j] & 0xF) as u32 | h0) as f32 * d + m;
                    y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let (d, dmin) = (f16_at(x, 0), f16_at(x, 2));
                let scales = &x[4..16];
                let (qh, mut qs) = if ty == GgmlType::Q5K {
                    (Some(&x[16..48]), &x[48..176])
                } else {
                    (None, &x[16..144])
                };
                let mut out_i = 0;
                for (pair, shift) in (0..4).zip((0..8).step_by(2)) {
                    let (sc1, m1) = scale_min_k4(2 * pair, scales);
                    let (sc2, m2) = scale_min_k4(2 * pair + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    for l in 0..32 {
                        let high = qh.map_or(0, |h| if h[l] & (1 << shift) != 0 { 16 } else { 0 });
                        y[out_i + l] = d1 * ((qs[l] & 0xF) as u32 + high) as f32 - m1;
                    }
                    for l in 0..32 {
                        let high = qh.map_or(0, |h| if h[l] & (2 << shift) != 0 { 16 } else { 0 });
                        y[out_i + 32 + l] = d2 * ((qs[l] >> 4) as u32 + high) as f32 - m2;
                    }
                    out_i += 64;
                    qs = &qs[32..];
                }
            }
            GgmlType::Q6K => {
                let (ql_all, qh_all, sc_all) = (&x[0..128], &x[128..192], &x[192..208]);
                let d = f16_at(x, 208);
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql_all[64 * half..], &qh_all[32 * half..], &sc_all[8 * half..]);
                    let y = &mut y[128 * half..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("float types are not dequantized"),
        }
    }
    out
}

/// The 6-bit scale and min of sub-block `j` in a K-quant's packed 12-byte `scales`.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF as a model checkpoint.

/// Maps a Hugging Face tensor name to llama.cpp's. Gemma's `post_attention_layernorm`
/// normalises the attention output (llama.cpp's `post_attention_norm`); the others' is the norm
/// before the MLP (`ffn_norm`, which is Gemma's `pre_feedforward_layernorm`).
fn gguf_name(hf: &str, gemma: bool) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let short = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        // Phi-3's fused layers (llama.cpp keeps them fused; `ffn_up` holds gate then up).
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_up_proj" => "ffn_up",
        // A mixture of experts' router (Qwen3-MoE's `mlp.gate`, Mixtral's).
        "mlp.gate" | "block_sparse_moe.gate" => "ffn_gate_inp",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" if gemma => "ffn_norm",
        "post_feedforward_layernorm" if gemma => "post_ffw_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

/// llama.cpp's stacked tensor and the expert for one expert's Hugging Face weight
/// (`model.layers.3.mlp.experts.5.gate_proj.weight` -> `blk.3.ffn_gate_exps.weight`, 5).
fn gguf_expert(hf: &str) -> Option<(String, usize)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (_, rest) = rest.split_once(".experts.")?;
    let (expert, rest) = rest.split_once('.')?;
    let kind = match rest {
        "gate_proj.weight" | "w1.weight" => "gate",
        "up_proj.weight" | "w3.weight" => "up",
        "down_proj.weight" | "w2.weight" => "down",
        _ => return None,
    };
    Some((format!("blk.{layer}.ffn_{kind}_exps.weight"), expert.parse().ok()?))
}

/// A GGUF file seen as a Hugging Face checkpoint.
pub struct GgufSource<'a> {
    gguf: &'a Gguf,
    /// llama.cpp's converter permutes the rows of q/k for the `llama` architecture so that
    /// its RoPE can rotate adjacent pairs; transformers' layout rotates halves. We undo it.
    unpermute: Option<(usize, usize)>,
    /// Gemma: llama.cpp stores every RMSNorm weight as `1 + w` (its norm multiplies by the
    /// weight); transformers' `w` comes back by subtracting 1.
    gemma: bool,
    /// The stacked expert tensors of the layer being read (each is read once, then sliced
    /// expert by expert).
    experts: std::cell::RefCell<std::collections::HashMap<String, TensorData>>,
}

impl<'a> GgufSource<'a> {
    pub fn new(gguf: &'a Gguf, config: &ModelConfig) -> Result<Self> {
        let unpermute =
            (gguf.architecture()? == "llama").then_some((config.num_attention_heads, config.num_key_value_heads));
        Ok(Self {
            gguf,
            unpermute,
            gemma: config.family == Family::Gemma3,
            experts: Default::default(),
        })
    }
}

/// Inverse of llama.cpp's `permute(weights, n_head)`: GGUF row `(h, i, j)` holds
/// Hugging Face row `(h, j, i)` for `j` in 0..2 (the half) and `i` in 0..head_dim/2.
fn unpermute_rows(data: TensorData, heads: usize) -> TensorData {
    let rows = data.shape[0];
    let row_bytes = data.dtype.size() * data.shape[1..].iter().product::<usize>().max(1);
    let out = reorder_rows(data.as_bytes(), rows, row_bytes, heads, false);
    TensorData::from_bytes_vec(out, data.shape.clone(), data.dtype)
}

/// Moves whole rows between Hugging Face's order (`(h, j, i)`: head, half, index) and
/// llama.cpp's (`(h, i, j)`); `to_gguf` picks the direction.
fn reorder_rows<T: Copy + Default>(src: &[T], rows: usize, row_len: usize, heads: usize, to_gguf: bool) -> Vec<T> {
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![T::default(); src.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * head_dim + j * half + i;
                let gguf = h * head_dim + i * 2 + j;
                let (from, to) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[to * row_len..(to + 1) * row_len].copy_from_slice(&src[from * row_len..(from + 1) * row_len]);
            }
        }
    }
    out
}

impl GgufSource<'_> {
    /// GGUF tensor `gname`, read for Hugging Face tensor `name` (which a missing one's error names).
    fn read_for(&self, gname: &str, name: &str) -> Result<TensorData> {
        self.gguf.read(gname).map_err(|e| match e {
            Error::MissingTensor { path, .. } => Error::MissingTensor {
                path,
                tensor: format!("{gname} (for {name})"),
            },
            other => other,
        })
    }
}

impl WeightSource for GgufSource<'_> {
    fn path_of(&self, _name: &str) -> PathBuf {
        self.gguf.path.clone()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        if let Some((stacked, expert)) = gguf_expert(name) {
            let shape = &self.gguf.tensors.get(&stacked)?.shape;
            return (shape.len() == 3 && expert < shape[0]).then(|| shape[1..].to_vec());
        }
        let info = self.gguf.tensors.get(&gguf_name(name, self.gemma)?)?;
        Some(info.shape.clone())
    }

    fn read(&self, name: &str) -> Result<TensorData> {
        if let Some((stacked, expert)) = gguf_expert(name) {
            let mut cache = self.experts.borrow_mut();
            if !cache.contains_key(&stacked) {
                // One layer's stacked tensors at a time.
                let layer = stacked.split('.').nth(1).map(str::to_string);
                cache.retain(|k, _| k.split('.').nth(1).map(str::to_string) == layer);
                cache.insert(stacked.clone(), self.read_for(&stacked, name)?);
            }
            let data = &cache[&stacked];
            let shape = data.shape.to_vec();
            if shape.len() != 3 || expert >= shape[0] {
                return Err(Error::tensor(
                    &self.gguf.path,
                    &stacked,
                    format!("shape {shape:?} has no expert {expert} ([experts, out, in] expected)"),
                ));
            }
            let per = data.dtype.size() * shape[1] * shape[2];
            let bytes = data.as_bytes()[expert * per..(expert + 1) * per].to_vec();
            return Ok(TensorData::from_bytes_vec(bytes, vec![shape[1], shape[2]], data.dtype));
        }
        let gname = gguf_name(name, self.gemma).ok_or_else(|| Error::MissingTensor {
            path: self.gguf.path.clone(),
            tensor: name.to_string(),
        })?;
        let data = self.read_for(&gname, name)?;
        if self.gemma && name.ends_with("norm.weight") {
            let shape = data.shape.clone();
            let values: Vec<f32> = data
                .convert_dtype(DType::F32)
                .to_vec()
                .map_err(|e| Error::tensor(&self.gguf.path, &gname, format!("{e:?}")))?;
            return Ok(TensorData::new(values.into_iter().map(|w| w - 1.0).collect(), shape));
        }
        let Some((heads, kv_heads)) = self.unpermute else {
            return Ok(data);
        };
        Ok(if name.contains("self_attn.q_proj.") {
            unpermute_rows(data, heads)
        } else if name.contains("self_attn.k_proj.") {
            unpermute_rows(data, kv_heads)
        } else {
            data
        })
    }
}

/// Builds the model configuration from GGUF metadata (`{arch}.*` keys).
pub fn config_from_gguf(gguf: &Gguf) -> Result<ModelConfig> {
    let path = gguf.path();
    let arch = gguf.architecture()?;
    let family = match arch {
        "llama" => Family::Llama,
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        "gemma3" => Family::Gemma3,
        "phi3" => Family::Phi3,
        "qwen3moe" => Family::Qwen3Moe,
        other => {
            return Err(Error::UnsupportedModelType {
                path: path.to_path_buf(),
                model_type: other.to_string(),
            });
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    // llama.cpp converts Mixtral under its `llama` architecture, with experts.
    let family = match gguf.get(&key("expert_count")).and_then(Value::as_u64) {
        Some(n) if n > 0 && family == Family::Llama => Family::Mixtral,
        _ => family,
    };
    let missing = |k: &str| Error::Config {
        path: path.to_path_buf(),
        key: k.to_string(),
        message: "missing".into(),
    };
    // Sizes: at least 1, and within the bounds config.json's are held to.
    let uint = |k: &str| -> Result<usize> {
        let max = if k == "block_count" {
            crate::config::MAX_LAYERS
        } else {
            crate::config::MAX_SIZE
        };
        let k = key(k);
        match gguf.get(&k).and_then(Value::as_u64) {
            None => Err(missing(&k)),
            Some(v) if v == 0 || v > max as u64 => Err(Error::Config {
                path: path.to_path_buf(),
                key: k,
                message: format!("{v} is not a size any model has (1 to {max})"),
            }),
            Some(v) => Ok(v as usize),
        }
    };
    let float = |k: &str| gguf.get(&key(k)).and_then(Value::as_f64);
    let hidden = uint("embedding_length")?;
    let heads = uint("attention.head_count")?;
    let kv_heads = uint("attention.head_count_kv").unwrap_or(heads);
    if !heads.is_multiple_of(kv_heads) {
        return Err(Error::Config {
            path: path.to_path_buf(),
            key: key("attention.head_count_kv"),
            message: format!("{kv_heads} does not divide attention.head_count = {heads}"),
        });
    }
    let head_dim = uint("attention.key_length").unwrap_or(hidden / heads);
    let rotary_dim = match uint("rope.dimension_count") {
        Err(_) => head_dim,
        Ok(d) if d == head_dim => d,
        Ok(d) if family == Family::Phi3 && d < head_dim && d % 2 == 0 => d,
        Ok(d) => {
            return Err(Error::Config {
                path: path.to_path_buf(),
                key: key("rope.dimension_count"),
                message: format!(
                    "{d} rotated dimensions of heads of {head_dim}: partial rotary embeddings are implemented for Phi-3 only"
                ),
            });
        }
    };
    let vocab = match uint("vocab_size") {
        Ok(v) => v,
        Err(_) => gguf
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(|t| t.len())
            .ok_or_else(|| missing(&key("vocab_size")))?,
    };
    let layers = uint("block_count")?;
    let phi3 = family == Family::Phi3;
    let context = uint("context_length").unwrap_or(2048);
    let rope_scaling = if phi3 && gguf.tensors.contains_key("rope_factors_long.weight") {
        let factors = |name: &str| -> Result<Vec<f32>> {
            let data = gguf.read(name)?.convert_dtype(DType::F32);
            let values = data
                .to_vec::<f32>()
                .map_err(|e| Error::tensor(path, name, format!("{e:?}")))?;
            if values.len() != rotary_dim / 2 || values.iter().any(|f| !(*f > 0.0 && f.is_finite())) {
                return Err(Error::tensor(
                    path,
                    name,
                    format!("expected {} positive factors (rope.dimension_count / 2)", rotary_dim / 2),
                ));
            }
            Ok(values)
        };
        let original = uint("rope.scaling.original_context_length")?;
        // transformers' default attention factor, which the converter writes (as an f32): a
        // written value that differs from it is the checkpoint's own.
        let scale = context as f64 / original as f64;
        let default = match scale <= 1.0 {
            true => 1.0,
            false => (1.0 + scale.ln() / (original as f64).ln()).sqrt(),
        };
        let written = float("rope.scaling.attn_factor").filter(|f| (f - default).abs() > 1e-6 * default);
        RopeScaling::LongRope {
            short_factor: factors("rope_factors_short.weight")?,
            long_factor: factors("rope_factors_long.weight")?,
            original_max_position_embeddings: original,
            attention_factor: written.unwrap_or(default),
            explicit_attention_factor: written.is_some(),
        }
    } else if gguf.tensors.contains_key("rope_freqs.weight") {
        let data = gguf.read("rope_freqs.weight")?.convert_dtype(DType::F32);
        RopeScaling::FreqFactors(
            data.to_vec::<f32>()
                .map_err(|e| Error::tensor(path, "rope_freqs.weight", format!("{e:?}")))?,
        )
    } else {
        match gguf.get(&key("rope.scaling.type")).and_then(Value::as_str) {
            None | Some("none") => RopeScaling::Default,
            Some("linear") => RopeScaling::Linear {
                factor: float("rope.scaling.factor").ok_or_else(|| missing(&key("rope.scaling.factor")))?,
            },
            Some(other) => {
                return Err(Error::UnsupportedRope {
                    path: path.to_path_buf(),
                    rope_type: other.to_string(),
                });
            }
        }
    };
    let id = |k: &str| gguf.get(k).and_then(Value::as_u64).map(|v| v as u32);
    let intermediate_size = uint("feed_forward_length")?;
    let moe = match family {
        Family::Qwen3Moe | Family::Mixtral => {
            let experts = uint("expert_count")?;
            let top_k = uint("expert_used_count")?;
            if top_k > experts {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    key: key("expert_used_count"),
                    message: format!("{top_k} experts per token of {experts}"),
                });
            }
            Some(crate::config::MoeConfig {
                num_experts: experts,
                top_k,
                // llama.cpp renormalises the chosen experts' weights for both.
                norm_topk_prob: true,
                expert_intermediate_size: match family {
                    Family::Qwen3Moe => uint("expert_feed_forward_length")?,
                    _ => intermediate_size,
                },
                sparse_layers: vec![true; layers],
                router_aux_loss_coef: 0.001,
                output_router_logits: false,
            })
        }
        _ => None,
    };
    // Phi-4's converter writes a window of 0 for "none" (`uint` refuses 0).
    let sliding = uint("attention.sliding_window").ok();
    let gemma = family == Family::Gemma3;
    let sliding_window = match gemma {
        // llama.cpp's Gemma 3: every sixth layer global, the others windowed (its
        // `set_swa_pattern(6)`), as transformers' `sliding_window_pattern` default.
        true => (0..layers)
            .map(|i| ((i + 1) % 6 != 0).then_some(sliding.unwrap_or(4096)))
            .collect(),
        false => vec![sliding; layers],
    };
    Ok(ModelConfig {
        family,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rotary_dim,
        fused_projections: phi3,
        moe,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(if gemma { 1e-6 } else { 1e-5 }),
        rope_theta: float("rope.freq_base").unwrap_or(10000.0),
        rope_scaling,
        max_position_embeddings: context,
        tie_word_embeddings: !gguf.tensors.contains_key("output.weight"),
        qkv_bias: gguf.tensors.contains_key("blk.0.attn_q.bias"),
        o_bias: gguf.tensors.contains_key("blk.0.attn_output.bias"),
        mlp_bias: gguf.tensors.contains_key("blk.0.ffn_up.bias"),
        qk_norm: gguf.tensors.contains_key("blk.0.attn_q_norm.weight"),
        activation: match gemma {
            true => crate::config::Activation::GeluTanh,
            false => Default::default(),
        },
        norm_plus_one: gemma,
        sandwich_norms: gemma,
        embed_scale: gemma.then(|| (hidden as f64).sqrt()),
        // llama.cpp scales Gemma 3's queries by head_dim^-0.5, except the 27B (62 layers), whose
        // `query_pre_attn_scalar` is hidden / heads; the others' config.json says head_dim.
        query_pre_attn_scalar: gemma.then(|| match layers {
            62 => (hidden / heads) as f64,
            _ => head_dim as f64,
        }),
        // llama.cpp's `rope_freq_base_train_swa` for Gemma 3 (`rope_local_base_freq`).
        local_rope_theta: gemma.then_some(10_000.0),
        final_logit_softcapping: float("final_logit_softcapping"),
        sliding_window,
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        pad_token_id: id("tokenizer.ggml.padding_token_id"),
        score_head: false,
        dtype: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.bias", false).unwrap(),
            "blk.12.attn_q.bias"
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight", false).unwrap(),
            "blk.0.ffn_norm.weight"
        );
        assert_eq!(gguf_name("lm_head.weight", false).unwrap(), "output.weight");
        assert!(gguf_name("model.layers.0.unknown.weight", false).is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, dim/n_head/2, in).swapaxes(1, 2).reshape(w.shape)
        let (heads, head_dim, cols) = (2, 6, 3);
        let rows = heads * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let mut permuted = vec![0f32; hf.len()];
        let half = head_dim / 2;
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    let src = h * head_dim + j * half + i;
                    let dst = h * head_dim + i * 2 + j;
                    permuted[dst * cols..(dst + 1) * cols].copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        let back = unpermute_rows(TensorData::new(permuted, [rows, cols]), heads);
        assert_eq!(back.to_vec::<f32>().unwrap(), hf);
    }
}

// ---------------------------------------------------------------------------------------------
// Writing GGUF (for adapters; f32 tensors only).

/// A metadata value to write.
#[derive(Debug, Clone)]
pub enum WriteValue {
    String(String),
    F32(f32),
    U32(u32),
}

/// Builds a GGUF v3 file: metadata, then f32 tensors given in PyTorch order.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, WriteValue)>,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

const ALIGNMENT: usize = 32;

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, key: &str, value: WriteValue) {
        self.metadata.push((key.to_string(), value));
    }

    /// `shape` in PyTorch order (slowest first); written reversed, as ggml wants.
    pub fn add_tensor(&mut self, name: &str, shape: Vec<usize>, values: Vec<f32>) {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "{name}: shape and data disagree"
        );
        self.tensors.push((name.to_string(), shape, values));
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            string(&mut out, key);
            match value {
                WriteValue::String(s) => {
                    out.extend(8u32.to_le_bytes());
                    string(&mut out, s);
                }
                WriteValue::F32(v) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                WriteValue::U32(v) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
            }
        }
        let mut offset = 0usize;
        for (name, shape, values) in &self.tensors {
            string(&mut out, name);
            out.extend((shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                out.extend((*d as u64).to_le_bytes());
            }
            out.extend(0u32.to_le_bytes()); // F32
            out.extend((offset as u64).to_le_bytes());
            offset += (values.len() * 4).div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
        for (_, _, values) in &self.tensors {
            let start = out.len();
            for v in values {
                out.extend(v.to_le_bytes());
            }
            out.resize(start + (out.len() - start).div_ceil(ALIGNMENT) * ALIGNMENT, 0);
        }
        crate::atomic::write_file_atomic(path, &out).map_err(|e| Error::io(path, e))
    }
}

/// llama.cpp's `permute(weights, n_head)` on the rows of a `[rows, cols]` matrix: Hugging Face
/// row `(h, j, i)` goes to GGUF row `(h, i, j)`. The inverse of [`GgufSource`]'s unpermute.
pub fn permute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    reorder_rows(values, rows, cols, heads, true)
}

/// llama.cpp's name for a Hugging Face module (`model.layers.3.self_attn.q_proj` ->
/// `blk.3.attn_q`).
pub fn gguf_module_name(hf_module: &str) -> Option<String> {
    // Adapters sit on linear layers, whose names do not depend on the family.
    gguf_name(&format!("{hf_module}.weight"), false).map(|n| n.trim_end_matches(".weight").to_string())
}

#[cfg(test)]
mod write_tests {
    use super::*;

    #[test]
    fn permute_is_the_inverse_of_unpermute() {
        let (rows, cols, heads) = (12, 2, 3);
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let g = permute_rows(&hf, rows, cols, heads);
        let back = unpermute_rows(TensorData::new(g, [rows, cols]), heads);
        assert_eq!(back.to_vec::<f32>().unwrap(), hf);
    }
}
