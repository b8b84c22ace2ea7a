//! Training objectives as pure functions over tensors: no model, no loop, no state.

pub mod sft;

pub use sft::{TokenLoss, log_softmax, token_cross_entropy};
