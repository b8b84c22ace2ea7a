//! Batches of online objectives (GRPO): the prompts the loader reads, and the completions the
//! trainer generates for them once they are scored.

use serde::{Deserialize, Serialize};

use crate::tokenize::PromptExample;

/// Prompts to complete, unpadded (the generator pads them as it batches).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptBatch {
    pub prompts: Vec<PromptExample>,
}

impl PromptBatch {
    pub fn num_tokens(&self) -> usize {
        self.prompts.iter().map(|p| p.prompt_ids.len()).sum()
    }
}

/// Generated completions of prompts, right-padded to one length, with what the loss reads of
/// each: its advantage, and its per-token log-probabilities when it was generated (`old`) and
/// under the reference. Per-token values are `[rows, completion_len]`, token `j` of a row being
/// its `j`-th completion token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutBatch {
    pub rows: usize,
    pub seq_len: usize,
    /// `[rows, seq_len]`: the prompt, then the completion, then padding.
    pub input_ids: Vec<u32>,
    pub prompt_lengths: Vec<usize>,
    /// Generated tokens of each row, its EOS included.
    pub completion_lengths: Vec<usize>,
    /// The longest completion.
    pub completion_len: usize,
    /// `[rows, completion_len]`: 1.0 where a completion token counts in the loss.
    pub mask: Vec<f32>,
    /// `[rows]`.
    pub advantages: Vec<f32>,
    /// The log-probabilities of the policy that generated the completions, when the round
    /// serves several updates (`None`: the policy's own, detached).
    pub old_logps: Option<Vec<f32>>,
    /// The reference's log-probabilities (`None` without a KL term).
    pub ref_logps: Option<Vec<f32>>,
    /// What the step's loss divides by, from this batch (`temper_trl::grpo::loss_weight`).
    pub loss_weight: usize,
}

impl RolloutBatch {
    /// Prompt + completion rows padded with `pad_id`; `counts[r]`: whether row `r`'s completion
    /// tokens count in the loss (TRL's `mask_truncated_completions` leaves truncated ones
    /// out). Advantages 0, no log-probabilities and a loss weight of 0 until the trainer sets
    /// them.
    pub fn collate(prompts: &[&[u32]], completions: &[&[u32]], counts: &[bool], pad_id: u32) -> Self {
        let rows = prompts.len();
        let seq_len = prompts
            .iter()
            .zip(completions)
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(0);
        let completion_len = completions.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut input_ids = Vec::with_capacity(rows * seq_len);
        let mut mask = vec![0.0f32; rows * completion_len];
        for (r, (p, c)) in prompts.iter().zip(completions).enumerate() {
            input_ids.extend_from_slice(p);
            input_ids.extend_from_slice(c);
            input_ids.resize((r + 1) * seq_len, pad_id);
            if counts[r] {
                mask[r * completion_len..r * completion_len + c.len()].fill(1.0);
            }
        }
        Self {
            rows,
            seq_len,
            input_ids,
            prompt_lengths: prompts.iter().map(|p| p.len()).collect(),
            completion_lengths: completions.iter().map(|c| c.len()).collect(),
            completion_len,
            mask,
            advantages: vec![0.0; rows],
            old_logps: None,
            ref_logps: None,
            loss_weight: 0,
        }
    }

    /// Real tokens: prompts and completions.
    pub fn num_tokens(&self) -> usize {
        self.prompt_lengths.iter().sum::<usize>() + self.completion_lengths.iter().sum::<usize>()
    }

    /// Completion tokens that count in the loss.
    pub fn counted_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m > 0.0).count()
    }

    /// The flat positions (`row * seq_len + t`) whose logits predict each completion token,
    /// and those tokens, `[rows, completion_len]` in order. Past the end of a row's completion
    /// the row's last position stands in (its value is masked out).
    pub fn positions(&self) -> (Vec<i64>, Vec<i64>) {
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for r in 0..self.rows {
            let (p, c) = (self.prompt_lengths[r], self.completion_lengths[r]);
            for j in 0..self.completion_len {
                let next = (p + j.min(c.saturating_sub(1))).max(1);
                positions.push((r * self.seq_len + next - 1) as i64);
                targets.push(self.input_ids[r * self.seq_len + next] as i64);
            }
        }
        (positions, targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_padded_and_positions_point_at_each_completion_token() {
        let b = RolloutBatch::collate(&[&[1, 2], &[3]], &[&[7], &[8, 9, 0]], &[true, false], 0);
        assert_eq!((b.rows, b.seq_len, b.completion_len), (2, 4, 3));
        assert_eq!(b.input_ids, [1, 2, 7, 0, 3, 8, 9, 0]);
        assert_eq!(b.mask, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(b.num_tokens(), 7);
        let (positions, targets) = b.positions();
        // Row 0: token 7 at position 2, predicted from 1; then its last position again.
        assert_eq!(positions, [1, 1, 1, 4, 5, 6]);
        assert_eq!(targets, [7, 7, 7, 8, 9, 0]);
    }
}
