//! Checkpoints: `output_dir/checkpoint-N/` with the adapter (PEFT format) or the full model,
//! the optimizer's moments, and the trainer state (step, data cursor). Written to a temporary
//! directory and renamed, so a crash never leaves a directory that looks complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use temper_data::Cursor;

use crate::error::{Error, Result};
use crate::optim::LossScaler;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    pub total_steps: u64,
    /// The next batch.
    pub cursor: Cursor,
    /// Non-padding tokens seen so far.
    pub num_tokens: u64,
    /// Examples (SFT) or pairs (preference) seen so far.
    #[serde(default)]
    pub num_examples: u64,
    /// With several workers: each rank's next batch in its shard of the data (`cursor` is
    /// rank 0's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_cursors: Vec<Cursor>,
    /// `(step, loss)` of every step so far: the curve a resumed run continues.
    pub losses: Vec<(u64, f64)>,
    /// f16 training's loss scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
}

impl TrainerState {
    /// A run's state before its first step.
    pub fn new(total_steps: u64, loss_scaler: Option<LossScaler>) -> Self {
        Self {
            step: 0,
            total_steps,
            cursor: Cursor::default(),
            num_tokens: 0,
            num_examples: 0,
            rank_cursors: Vec::new(),
            losses: Vec::new(),
            loss_scaler,
        }
    }
}

fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// Writes a checkpoint: `write_model` fills the directory with the adapter or model files.
pub fn save(
    output_dir: &Path,
    state: &TrainerState,
    optimizer: &[(String, Vec<f32>)],
    config_yaml: &str,
    write_model: impl FnOnce(&Path) -> Result<()>,
    keep: Option<usize>,
) -> Result<PathBuf> {
    let final_dir = output_dir.join(checkpoint_name(state.step));
    let tmp = output_dir.join(format!(".{}.tmp", checkpoint_name(state.step)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    write_model(&tmp)?;
    let views: Vec<(String, TensorView)> = optimizer
        .iter()
        .map(|(name, values)| {
            let bytes: &[u8] = bytemuck_f32(values);
            (
                name.clone(),
                TensorView::new(Dtype::F32, vec![values.len()], bytes).expect("sizes agree"),
            )
        })
        .collect();
    let opt_path = tmp.join(OPTIMIZER_FILE);
    safetensors::serialize_to_file(views, None, &opt_path).map_err(|e| Error::Checkpoint {
        path: opt_path.clone(),
        message: e.to_string(),
    })?;
    let state_json = serde_json::to_string_pretty(state).expect("state serializes");
    write(&tmp.join(STATE_FILE), state_json.as_bytes())?;
    write(&tmp.join("config.yaml"), config_yaml.as_bytes())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    if let Some(keep) = keep {
        let mut all = list(output_dir)?;
        while all.len() > keep {
            let (_, old) = all.remove(0);
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
    }
    Ok(final_dir)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

fn bytemuck_f32(values: &[f32]) -> &[u8] {
    // f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// Complete checkpoints in `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(output_dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| Error::io(output_dir, e))?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step
            && path.join(STATE_FILE).exists()
        {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// A checkpoint read back: its state and optimizer moments.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub optimizer: HashMap<String, Vec<f32>>,
}

pub fn load(dir: &Path) -> Result<Loaded> {
    let err = |message: String| Error::Checkpoint {
        path: dir.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).map_err(|e| err(format!("{STATE_FILE}: {e}")))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| err(format!("{STATE_FILE}: {e}")))?;
    let bytes = std::fs::read(dir.join(OPTIMIZER_FILE)).map_err(|e| err(format!("{OPTIMIZER_FILE}: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(format!("{OPTIMIZER_FILE}: {e}")))?;
    let mut optimizer = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(err(format!("{OPTIMIZER_FILE}: {name} is not f32")));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        optimizer.insert(name, values);
    }
    Ok(Loaded {
        dir: dir.to_path_buf(),
        state,
        optimizer,
    })
}
