//! Training objectives as pure functions over tensors: no model, no loop, no state.

pub mod dpo;
pub mod grpo;
pub mod kto;
pub mod logps;
pub mod reward;
pub mod rewards;
pub mod scores;
pub mod sft;

pub use dpo::{
    DpoLossType, DpoParams, PairLogps, PreferenceOutput, SimpoParams, dpo_loss, orpo_loss, sequence_logps, simpo_loss,
};
pub use grpo::{
    Advantages, GrpoLossType, GrpoOutput, GrpoParams, ImportanceSampling, ScaleRewards, group_advantages, grpo_loss,
    weighted_rewards,
};
pub use kto::{KtoLossType, KtoOutput, KtoParams, kto_kl, kto_kl_mean, kto_loss};
pub use logps::{TokenLogps, head_token_logps, log_softmax, token_logps};
pub use reward::{RewardParams, reward_loss};
pub use sft::{TokenLoss, token_cross_entropy};
