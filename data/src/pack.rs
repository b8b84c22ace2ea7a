//! Packing SFT examples into rows of a fixed length, and batching rows with padding.

use serde::{Deserialize, Serialize};

use crate::tokenize::{IGNORE_INDEX, PreferenceExample, SftExample, Truncation, UnpairedExample};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PackingStrategy {
    /// Best-fit decreasing; an example longer than the row is truncated (TRL's `bfd`).
    #[default]
    Bfd,
    /// Best-fit decreasing; an example longer than the row is split into row-sized pieces
    /// (TRL's `bfd_split`).
    BfdSplit,
}

/// A packed row: examples one after another, each with its own positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRow {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    /// Lengths of the examples in the row, in order.
    pub seq_lengths: Vec<usize>,
}

/// Packs examples into rows of at most `seq_length` tokens with TRL's best-fit-decreasing
/// (`trl.data_utils._pack_bfd`): longest first, each into the open row with the least space
/// that fits it; rows come out in the order they were opened.
pub fn pack_bfd(examples: Vec<SftExample>, seq_length: usize, strategy: PackingStrategy) -> Vec<PackedRow> {
    assert!(seq_length > 0, "seq_length must be positive");
    let mut pieces: Vec<(Vec<u32>, Vec<i32>)> = Vec::new();
    for ex in examples.into_iter().filter(|e| !e.input_ids.is_empty()) {
        match strategy {
            PackingStrategy::Bfd => {
                let n = ex.input_ids.len().min(seq_length);
                pieces.push((ex.input_ids[..n].to_vec(), ex.labels[..n].to_vec()));
            }
            PackingStrategy::BfdSplit => {
                for (ids, labels) in ex.input_ids.chunks(seq_length).zip(ex.labels.chunks(seq_length)) {
                    pieces.push((ids.to_vec(), labels.to_vec()));
                }
            }
        }
    }
    // Stable: equal lengths keep their order, as pyarrow's sort does.
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(pieces[i].0.len()));

    // space_to_rows[s]: rows with exactly s free slots, oldest first; a BTreeMap finds the
    // smallest space >= length (TRL uses a segment tree for the same query).
    let mut space_to_rows: std::collections::BTreeMap<usize, std::collections::VecDeque<usize>> = Default::default();
    let mut rows: Vec<(Vec<usize>, usize)> = Vec::new();
    for i in order {
        let len = pieces[i].0.len();
        let found = space_to_rows.range(len..).next().map(|(&s, _)| s);
        let row = match found {
            Some(space) => {
                let queue = space_to_rows.get_mut(&space).expect("present");
                let row = queue.pop_front().expect("non-empty");
                if queue.is_empty() {
                    space_to_rows.remove(&space);
                }
                row
            }
            None => {
                rows.push((Vec::new(), 0));
                rows.len() - 1
            }
        };
        rows[row].0.push(i);
        rows[row].1 += len;
        let space = seq_length - rows[row].1;
        if space > 0 {
            space_to_rows.entry(space).or_default().push_back(row);
        }
    }
    rows.into_iter()
        .map(|(ids, total)| {
            let mut row = PackedRow {
                input_ids: Vec::with_capacity(total),
                labels: Vec::with_capacity(total),
                seq_lengths: Vec::with_capacity(ids.len()),
            };
            for i in ids {
                let (ids, labels) = &pieces[i];
                row.input_ids.extend_from_slice(ids);
                row.labels.extend_from_slice(labels);
                row.seq_lengths.push(ids.len());
            }
            row
        })
        .collect()
}

/// A batch for causal-LM training, row-major `[batch, seq_len]`, padded on the right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftBatch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids` (not shifted: position t predicts `labels[t + 1]`);
    /// `IGNORE_INDEX` for padding, masked tokens and each segment's first token.
    pub labels: Vec<i32>,
    /// Positions restart at 0 for each packed example.
    pub position_ids: Vec<u32>,
    /// Which example of its row each token belongs to (1, 2, …), 0 for padding. Attention is
    /// allowed only within one segment, so packed examples never see each other.
    pub segment_ids: Vec<u32>,
}

impl SftBatch {
    /// Examples in the batch: packed rows hold several (one segment each).
    pub fn num_examples(&self) -> usize {
        let s = self.seq_len;
        (0..self.segment_ids.len())
            .filter(|&i| self.segment_ids[i] != 0 && (i % s == 0 || self.segment_ids[i - 1] != self.segment_ids[i]))
            .count()
    }

    /// Tokens whose next token is a target: the count that normalises the loss.
    pub fn num_target_tokens(&self) -> usize {
        (0..self.batch_size)
            .map(|b| {
                let row = &self.labels[b * self.seq_len..(b + 1) * self.seq_len];
                row.iter().filter(|&&l| l != IGNORE_INDEX).count()
            })
            .sum()
    }

    /// Non-padding tokens.
    pub fn num_tokens(&self) -> usize {
        self.segment_ids.iter().filter(|&&s| s != 0).count()
    }

    /// Whether any row holds more than one example (so attention needs the segment mask).
    pub fn is_packed(&self) -> bool {
        self.segment_ids.iter().any(|&s| s > 1)
    }

    /// Pads rows (plain examples, or packed rows with their segment lengths) to the longest,
    /// rounded up to `pad_to_multiple_of`.
    pub fn collate(rows: &[(&[u32], &[i32], &[usize])], pad_id: u32, pad_to_multiple_of: Option<usize>) -> Self {
        let longest = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let seq_len = round_up(longest, pad_to_multiple_of);
        let n = rows.len() * seq_len;
        let mut batch = Self {
            batch_size: rows.len(),
            seq_len,
            input_ids: vec![pad_id; n],
            labels: vec![IGNORE_INDEX; n],
            position_ids: vec![0; n],
            segment_ids: vec![0; n],
        };
        for (b, (ids, labels, lengths)) in rows.iter().enumerate() {
            let base = b * seq_len;
            batch.input_ids[base..base + ids.len()].copy_from_slice(ids);
            batch.labels[base..base + labels.len()].copy_from_slice(labels);
            let mut t = base;
            for (s, &len) in lengths.iter().enumerate() {
                // A segment's first token is never a target: predicting it from the previous
                // example would train across the boundary that attention respects.
                batch.labels[t] = IGNORE_INDEX;
                for p in 0..len {
                    batch.position_ids[t] = p as u32;
                    batch.segment_ids[t] = s as u32 + 1;
                    t += 1;
                }
            }
        }
        batch
    }
}

fn round_up(n: usize, multiple: Option<usize>) -> usize {
    match multiple {
        Some(m) if m > 1 => n.div_ceil(m) * m,
        _ => n,
    }
}

/// A batch of preference pairs, as TRL's `DataCollatorForPreference` builds it: the first
/// `pairs` rows are prompt+chosen, the next `pairs` rows prompt+rejected, in the same order, so
/// each pair's two sequences share one forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceBatch {
    pub pairs: usize,
    pub seq_len: usize,
    /// `[2 * pairs, seq_len]`.
    pub input_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    /// 1 for completion tokens (the ones whose log-probabilities DPO scores).
    pub completion_mask: Vec<u8>,
    /// `[pairs]`: each pair's `margin` (0 where it has none), or `None` when no pair has one.
    pub margins: Option<Vec<f32>>,
    /// The padding token: a reward model reads each row at its last other token.
    pub pad_id: u32,
}

/// Each row's last real token that is not `pad_id`, where a sequence classifier reads its
/// score: transformers' pooling, which skips a final EOS when EOS is also the padding token
/// (TRL's default). A row with no such token reads position 0, as transformers' `argmax` does.
///
/// # Shapes
/// `input_ids, attention_mask: [rows, seq_len] -> [rows]`
pub fn last_tokens(input_ids: &[u32], attention_mask: &[u8], seq_len: usize, pad_id: u32) -> Vec<usize> {
    input_ids
        .chunks_exact(seq_len.max(1))
        .zip(attention_mask.chunks_exact(seq_len.max(1)))
        .map(|(ids, mask)| {
            (0..ids.len())
                .rev()
                .find(|&t| mask[t] == 1 && ids[t] != pad_id)
                .unwrap_or(0)
        })
        .collect()
}

/// Sequences (token ids, completion mask) padded on the right to one length.
struct Padded {
    seq_len: usize,
    input_ids: Vec<u32>,
    attention_mask: Vec<u8>,
    completion_mask: Vec<u8>,
}

impl Padded {
    fn new(seqs: &[(Vec<u32>, Vec<u8>)], pad_id: u32, pad_to_multiple_of: Option<usize>) -> Self {
        let seq_len = round_up(seqs.iter().map(|s| s.0.len()).max().unwrap_or(0), pad_to_multiple_of);
        let total = seqs.len() * seq_len;
        let mut p = Padded {
            seq_len,
            input_ids: vec![pad_id; total],
            attention_mask: vec![0; total],
            completion_mask: vec![0; total],
        };
        for (r, (ids, mask)) in seqs.iter().enumerate() {
            let base = r * seq_len;
            p.input_ids[base..base + ids.len()].copy_from_slice(ids);
            p.attention_mask[base..base + ids.len()].fill(1);
            p.completion_mask[base..base + mask.len()].copy_from_slice(mask);
        }
        p
    }
}

/// A micro-batch of unpaired completions (KTO), padded to one length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpairedBatch {
    pub rows: usize,
    pub seq_len: usize,
    /// `[rows, seq_len]`, or with `kl` `[2 * rows, seq_len]`: each row's prompt + completion,
    /// then each row's prompt with the previous row's completion (the first row takes the
    /// last's), the mismatched pairs of KTO's KL estimate (TRL's `KL_input_ids`).
    pub input_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    /// 1 for completion tokens.
    pub completion_mask: Vec<u8>,
    pub kl: bool,
    /// `[rows]`.
    pub desirable: Vec<bool>,
}

impl UnpairedBatch {
    /// Prompt + completion cut to `max_length` from the start, as TRL's KTO collator does.
    pub fn collate(
        examples: &[UnpairedExample],
        kl: bool,
        pad_id: u32,
        max_length: Option<usize>,
        pad_to_multiple_of: Option<usize>,
    ) -> Self {
        let n = examples.len();
        let sequence = |prompt: &[u32], completion: &[u32]| {
            let mut ids = prompt.to_vec();
            ids.extend_from_slice(completion);
            let mut mask = vec![0u8; prompt.len()];
            mask.resize(ids.len(), 1);
            if let Some(max) = max_length {
                ids.truncate(max);
                mask.truncate(max);
            }
            (ids, mask)
        };
        let mut seqs: Vec<(Vec<u32>, Vec<u8>)> = examples
            .iter()
            .map(|e| sequence(&e.prompt_ids, &e.completion_ids))
            .collect();
        if kl {
            for (i, e) in examples.iter().enumerate() {
                seqs.push(sequence(&e.prompt_ids, &examples[(i + n - 1) % n].completion_ids));
            }
        }
        let p = Padded::new(&seqs, pad_id, pad_to_multiple_of);
        Self {
            rows: n,
            seq_len: p.seq_len,
            input_ids: p.input_ids,
            attention_mask: p.attention_mask,
            completion_mask: p.completion_mask,
            kl,
            desirable: examples.iter().map(|e| e.desirable).collect(),
        }
    }

    /// Real tokens of the rows themselves (not the KL pairs), as TRL counts `num_tokens`.
    pub fn num_tokens(&self) -> usize {
        self.attention_mask[..self.rows * self.seq_len]
            .iter()
            .filter(|&&m| m == 1)
            .count()
    }
}

impl PreferenceBatch {
    pub fn collate(
        pairs: &[PreferenceExample],
        pad_id: u32,
        max_length: Option<usize>,
        truncation: Truncation,
        pad_to_multiple_of: Option<usize>,
    ) -> Self {
        let mut seqs: Vec<(Vec<u32>, Vec<u8>)> = Vec::with_capacity(2 * pairs.len());
        for pick_rejected in [false, true] {
            for p in pairs {
                let completion = if pick_rejected { &p.rejected_ids } else { &p.chosen_ids };
                let mut ids = p.prompt_ids.clone();
                ids.extend_from_slice(completion);
                let mut mask = vec![0u8; p.prompt_ids.len()];
                mask.resize(ids.len(), 1);
                if let Some(max) = max_length {
                    let keep = truncation.range(ids.len(), max);
                    ids = ids[keep.clone()].to_vec();
                    mask = mask[keep].to_vec();
                }
                seqs.push((ids, mask));
            }
        }
        let p = Padded::new(&seqs, pad_id, pad_to_multiple_of);
        Self {
            pairs: pairs.len(),
            seq_len: p.seq_len,
            input_ids: p.input_ids,
            attention_mask: p.attention_mask,
            completion_mask: p.completion_mask,
            margins: pairs
                .iter()
                .any(|p| p.margin.is_some())
                .then(|| pairs.iter().map(|p| p.margin.unwrap_or(0.0)).collect()),
            pad_id,
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m == 1).count()
    }

    /// Each row's last token that is not padding (`[2 * pairs]`; see [`last_tokens`]).
    pub fn last_tokens(&self) -> Vec<usize> {
        last_tokens(&self.input_ids, &self.attention_mask, self.seq_len, self.pad_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpaired_rows_and_their_kl_pairs() {
        let ex = |p: &[u32], c: &[u32], desirable| UnpairedExample {
            prompt_ids: p.to_vec(),
            completion_ids: c.to_vec(),
            desirable,
        };
        let examples = [
            ex(&[1, 2], &[3], true),
            ex(&[4], &[5, 6, 7], false),
            ex(&[8, 9, 10], &[11], true),
        ];
        let b = UnpairedBatch::collate(&examples, true, 0, Some(4), None);
        assert_eq!(
            (b.rows, b.seq_len, b.desirable.clone()),
            (3, 4, vec![true, false, true])
        );
        let rows: Vec<&[u32]> = b.input_ids.chunks(4).collect();
        // The rows, then each prompt with the previous row's completion (the first, the last's),
        // cut to max_length from the start.
        assert_eq!(
            rows,
            [
                &[1, 2, 3, 0][..],
                &[4, 5, 6, 7],
                &[8, 9, 10, 11],
                &[1, 2, 11, 0],
                &[4, 3, 0, 0],
                &[8, 9, 10, 5]
            ]
        );
        let masks: Vec<&[u8]> = b.completion_mask.chunks(4).collect();
        assert_eq!(
            masks,
            [
                &[0, 0, 1, 0][..],
                &[0, 1, 1, 1],
                &[0, 0, 0, 1],
                &[0, 0, 1, 0],
                &[0, 1, 0, 0],
                &[0, 0, 0, 1]
            ]
        );
        assert_eq!(b.num_tokens(), 11, "the rows' tokens, not the KL pairs'");
        let plain = UnpairedBatch::collate(&examples, false, 0, None, Some(8));
        assert_eq!((plain.input_ids.len(), plain.seq_len), (3 * 8, 8));
    }

    fn ex(ids: &[u32]) -> SftExample {
        SftExample {
            input_ids: ids.to_vec(),
            labels: ids.iter().map(|&i| i as i32).collect(),
            truncated: false,
        }
    }

    #[test]
    fn bfd_matches_trl_docstring() {
        // trl.pack_dataset docstring: [[1,2,3,4,5],[6,7],[8,9,10],[11]], seq_length=4
        let examples = vec![ex(&[1, 2, 3, 4, 5]), ex(&[6, 7]), ex(&[8, 9, 10]), ex(&[11])];
        let rows = pack_bfd(examples.clone(), 4, PackingStrategy::Bfd);
        let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.input_ids.clone()).collect();
        assert_eq!(ids, vec![vec![1, 2, 3, 4], vec![8, 9, 10, 11], vec![6, 7]]);
        assert_eq!(rows[1].seq_lengths, vec![3, 1]);
        let rows = pack_bfd(examples, 4, PackingStrategy::BfdSplit);
        let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.input_ids.clone()).collect();
        assert_eq!(ids, vec![vec![1, 2, 3, 4], vec![8, 9, 10, 5], vec![6, 7, 11]]);
    }

    #[test]
    fn preference_collation_matches_trl_docstring() {
        let pairs = vec![
            PreferenceExample {
                prompt_ids: vec![1, 2, 3],
                chosen_ids: vec![4, 5],
                rejected_ids: vec![6],
                margin: None,
            },
            PreferenceExample {
                prompt_ids: vec![7, 8],
                chosen_ids: vec![9],
                rejected_ids: vec![10, 11],
                margin: Some(0.5),
            },
        ];
        let b = PreferenceBatch::collate(&pairs, 0, None, Truncation::KeepStart, None);
        assert_eq!(
            b.input_ids,
            vec![1, 2, 3, 4, 5, 7, 8, 9, 0, 0, 1, 2, 3, 6, 0, 7, 8, 10, 11, 0]
        );
        assert_eq!(
            b.completion_mask,
            vec![0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0]
        );
        assert_eq!(
            b.attention_mask,
            vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0]
        );
        assert_eq!(b.margins, Some(vec![0.0, 0.5]));
        assert_eq!(b.last_tokens(), [4, 2, 3, 3]);
        // With EOS as padding (id 5 here), a final EOS is skipped, as transformers pools.
        let b = PreferenceBatch::collate(&pairs[..1], 5, None, Truncation::KeepStart, None);
        assert_eq!((b.last_tokens(), b.margins), (vec![3, 3], None));
    }

    #[test]
    fn collate_restarts_positions_per_segment() {
        let b = SftBatch::collate(&[(&[5, 6, 7], &[5, 6, 7], &[2, 1]), (&[8], &[-100], &[1])], 0, Some(4));
        assert_eq!(b.seq_len, 4);
        assert_eq!(b.position_ids, vec![0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.segment_ids, vec![1, 1, 2, 0, 1, 0, 0, 0]);
        assert_eq!(b.labels, vec![-100, 6, -100, -100, -100, -100, -100, -100]);
        assert_eq!(b.num_target_tokens(), 1);
        assert!(b.is_packed());
    }
}
