//! Helpers shared by the integration tests (and `examples/device_check.rs`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, TensorData};
use safetensors::SafeTensors;
use temper_models::weights::SafetensorsSource;
use temper_models::{Error, LlamaForCausalLM, ModelConfig};
use temper_trainer::Job;

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
    // f32::max skips NaN, so a NaN in `a` would otherwise pass as a perfect match.
    if a.iter().any(|x| !x.is_finite()) {
        return f32::INFINITY;
    }
    diff / scale
}

pub fn load_hf_dir<B: Backend>(dir: &Path) -> Result<LlamaForCausalLM<B>, Error> {
    load_hf_dir_on(dir, &Default::default(), DType::F32)
}

pub fn load_hf_dir_on<B: Backend>(dir: &Path, device: &B::Device, dtype: DType) -> Result<LlamaForCausalLM<B>, Error> {
    let config = ModelConfig::from_file(dir.join("config.json"))?;
    let source = SafetensorsSource::open_dir(dir)?;
    LlamaForCausalLM::load(&config, &source, device, dtype)
}

/// The real SmolLM2 GGUF, where `scripts/fetch-model.sh` puts it.
pub fn smollm2_path() -> PathBuf {
    let path = std::env::var_os("TEMPER_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("TEMPER_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/temper"));
            cache.join("SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh (or set TEMPER_SMOLLM2_GGUF)",
        path.display()
    );
    path
}

/// The trainer's fixtures: a tiny Llama, its initial adapter, pre-tokenized rows.
pub fn train_dir() -> PathBuf {
    fixtures().join("train")
}

/// The job of the fixture run (`tests/fixtures/train/make_train_fixtures.py`), writing to `out`.
pub fn job_yaml(out: &Path) -> String {
    format!(
        r#"
model:
  path: {tiny}
adapter:
  type: lora
  path: {init}
  loraplus_lr_ratio: 2.0
data:
  path: {data}
  shuffle: false
  max_length: 64
training:
  max_steps: 10
  micro_batch_size: 2
  gradient_accumulation_steps: 2
  learning_rate: 1.0e-2
  lr_scheduler: linear
  warmup_steps: 2
  weight_decay: 0.01
  max_grad_norm: 1.0
  precision: f32
output_dir: {out}
"#,
        tiny = train_dir().join("tiny").display(),
        init = train_dir().join("init_adapter").display(),
        data = train_dir().join("data.jsonl").display(),
        out = out.display(),
    )
}

/// `yaml` written to `tmp/job.yaml` and loaded with `--set` overrides; the error as text.
pub fn load_job(tmp: &Path, yaml: &str, overrides: &[&str]) -> Result<Job, String> {
    let path = tmp.join("job.yaml");
    std::fs::write(&path, yaml).unwrap();
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Job::load(&path, &overrides).map_err(|e| e.to_string())
}
