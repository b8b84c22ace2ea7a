//! Training objectives as pure functions over tensors: no model, no loop, no state.

pub mod dpo;
pub mod sft;

pub use dpo::{DpoLossType, DpoOutput, DpoParams, dpo_loss, sequence_logps};
pub use sft::{TokenLoss, log_softmax, token_cross_entropy};
