//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, TensorData};
use safetensors::SafeTensors;
use temper_models::weights::SafetensorsSource;
use temper_models::{Error, LlamaForCausalLM, ModelConfig};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Reads a tensor of a reference file as f32 or i64 values.
pub struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    pub fn open(path: &Path) -> Self {
        Self {
            bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }
    pub fn get(&self, name: &str) -> (Vec<usize>, TensorData) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        let dtype = match t.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::I64 => DType::I64,
            other => panic!("{name}: {other:?}"),
        };
        (
            t.shape().to_vec(),
            TensorData::from_bytes_vec(t.data().to_vec(), t.shape().to_vec(), dtype),
        )
    }
    pub fn names(&self) -> Vec<String> {
        SafeTensors::deserialize(&self.bytes)
            .unwrap()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect()
    }
    pub fn f32(&self, name: &str) -> Vec<f32> {
        self.get(name).1.to_vec().unwrap()
    }
}

/// max |a - b| / max |b| over the selected entries.
pub fn rel_err(a: &[f32], b: &[f32], keep: impl Fn(usize) -> bool) -> f32 {
    assert_eq!(a.len(), b.len());
    let (mut diff, mut scale) = (0f32, 0f32);
    for i in (0..a.len()).filter(|&i| keep(i)) {
        diff = diff.max((a[i] - b[i]).abs());
        scale = scale.max(b[i].abs());
    }
    assert!(scale > 0.0, "nothing compared");
    diff / scale
}

pub fn load_hf_dir<B: Backend>(dir: &Path) -> Result<LlamaForCausalLM<B>, Error> {
    let config = ModelConfig::from_file(dir.join("config.json"))?;
    let source = SafetensorsSource::open_dir(dir)?;
    LlamaForCausalLM::load(&config, &source, &Default::default(), DType::F32)
}
