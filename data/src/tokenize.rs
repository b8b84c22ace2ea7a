//! Samples into token ids and labels, as TRL's `SFTTrainer` and `DPOTrainer` prepare them.
//!
//! The rules follow TRL's `_prepare_dataset` (trl 1.16): EOS is appended to plain-text
//! samples that do not end with it; plain text is encoded with the tokenizer's special tokens
//! (BOS where the tokenizer adds one), conversations through the chat template without them;
//! the completion starts where the tokenized prompt and prompt+completion diverge; labels are
//! −100 outside the completion (`completion_only_loss`) and the assistant turns
//! (`assistant_only_loss`); sequences are truncated to `max_length` unless packed, and samples
//! left with no target token are dropped.

use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use temper_models::{ChatTemplate, Message, Tokenizer};

use crate::error::{Error, Location, Result};
use crate::format::{Content, Sample};

/// The label of a token that takes no part in the loss, as in PyTorch and transformers.
pub const IGNORE_INDEX: i32 = -100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    #[default]
    KeepStart,
    KeepEnd,
}

impl Truncation {
    /// The token indices kept from a sequence of `len` tokens.
    pub fn range(self, len: usize, max: usize) -> Range<usize> {
        match self {
            Self::KeepStart => 0..len.min(max),
            Self::KeepEnd => len.saturating_sub(max)..len,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub max_length: Option<usize>,
    pub truncation: Truncation,
    /// `None`: on for prompt/completion data, as TRL decides.
    pub completion_only_loss: Option<bool>,
    pub assistant_only_loss: bool,
    /// Packing truncates (or splits) later, per packed row, so encoding does not.
    pub packing: bool,
    /// A chat template that replaces the tokenizer's.
    pub chat_template: Option<String>,
    /// KTO: preference pairs become two unpaired completions (TRL's `unpair_preference_dataset`).
    pub unpair: bool,
    /// Reward models: a pair with a sequence longer than `max_length` is dropped, not
    /// truncated (TRL's `RewardTrainer` filters them; a score read mid-sequence would be wrong).
    pub drop_long_pairs: bool,
}

/// A tokenized SFT sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    pub input_ids: Vec<u32>,
    /// `IGNORE_INDEX` where the token is not a target.
    pub labels: Vec<i32>,
    pub truncated: bool,
}

/// A tokenized preference pair: the shared prompt and each completion, untruncated (the
/// collator truncates prompt+completion, as TRL's does).
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceExample {
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    /// The row's `margin` (reward models).
    pub margin: Option<f32>,
}

/// A tokenized unpaired completion (KTO): the prompt and the completion, untruncated (the
/// collator truncates prompt+completion, as TRL's does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpairedExample {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    pub desirable: bool,
}

/// A tokenized prompt for an online objective (GRPO): its ids (the chat template's generation
/// prompt included), cut from the left to `max_length`, and what the reward functions read of
/// its row.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptExample {
    pub prompt_ids: Vec<u32>,
    /// The prompt as the dataset has it (a string or a message list).
    pub prompt: serde_json::Value,
    /// The row's other columns.
    pub columns: serde_json::Map<String, serde_json::Value>,
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Encoded {
    Sft(SftExample),
    Preference(PreferenceExample),
    Unpaired(UnpairedExample),
    /// A preference pair unpaired for KTO: the chosen completion, then the rejected one.
    UnpairedPair(UnpairedExample, UnpairedExample),
    Prompt(PromptExample),
    /// No target token is left after truncation (TRL drops these too).
    Dropped,
}

pub struct Encoder {
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    bos: String,
    eos: String,
    pub options: EncodeOptions,
}

impl Encoder {
    pub fn new(tokenizer: Arc<Tokenizer>, options: EncodeOptions) -> Result<Self> {
        let template = match options.chat_template.as_deref().or(tokenizer.chat_template.as_deref()) {
            Some(src) => Some(ChatTemplate::new(src).map_err(|m| Error::config("chat_template", m))?),
            None => None,
        };
        let eos = tokenizer.eos_token.clone().ok_or_else(|| {
            Error::config(
                "tokenizer",
                "the tokenizer names no EOS token, which SFT appends to every text sample",
            )
        })?;
        Ok(Self {
            bos: tokenizer.bos_token.clone().unwrap_or_default(),
            eos,
            tokenizer,
            template,
            options,
        })
    }

    /// A conversation as text through the chat template (the config's, else the tokenizer's),
    /// with the generation prompt when asked.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> std::result::Result<String, String> {
        let template = self.template.as_ref().ok_or(
            "conversational data needs a chat template, and this tokenizer has none \
             (set `chat_template` in the data config)",
        )?;
        Ok(template.render(messages, add_generation_prompt, &self.bos, &self.eos)?.text)
    }

    /// Encodes one sample; errors name the row.
    pub fn encode(&self, sample: &Sample, at: &Location) -> Result<Encoded> {
        let bad = |message: String| Error::BadRow {
            at: at.clone(),
            column: String::new(),
            message,
        };
        match sample {
            Sample::Preference {
                prompt,
                chosen,
                rejected,
                ..
            } if self.options.unpair => self.unpair(prompt.as_ref(), chosen, rejected).map_err(bad),
            Sample::Preference {
                prompt,
                chosen,
                rejected,
                margin,
            } => self
                .encode_preference(prompt.as_ref(), chosen, rejected, *margin)
                .map_err(bad),
            Sample::Unpaired {
                prompt,
                completion,
                desirable,
            } => self.encode_unpaired(prompt, completion, *desirable).map_err(bad),
            Sample::Prompt { prompt, raw, columns } => self.encode_prompt(prompt, raw, columns).map_err(bad),
            _ => self.encode_sft(sample).map_err(bad),
        }
    }

    fn encode_sft(&self, sample: &Sample) -> std::result::Result<Encoded, String> {
        let assistant_only = self.options.assistant_only_loss;
        let (input_ids, completion_mask, assistant_mask) = match sample {
            Sample::Text(text) => {
                if assistant_only {
                    return Err("`assistant_only_loss` needs conversational data (messages)".into());
                }
                (self.encode_text(&self.with_eos(text))?, None, None)
            }
            Sample::Messages(messages) => {
                let (ids, mask) = self.encode_chat(messages, false, assistant_only)?;
                (ids, None, mask)
            }
            Sample::PromptCompletion { prompt, completion } => {
                let (prompt_ids, full, mask) = match (prompt, completion) {
                    (Content::Messages(p), Content::Messages(c)) => {
                        let (prompt_ids, _) = self.encode_chat(p, true, false)?;
                        let all: Vec<Message> = p.iter().chain(c).cloned().collect();
                        let (full, mask) = self.encode_chat(&all, false, assistant_only)?;
                        (prompt_ids, full, mask)
                    }
                    (Content::Text(p), Content::Text(c)) => {
                        if assistant_only {
                            return Err("`assistant_only_loss` needs conversational data (messages)".into());
                        }
                        let full = format!("{p}{}", self.with_eos(c));
                        (self.encode_text(p)?, self.encode_text(&full)?, None)
                    }
                    _ => return Err("`prompt` and `completion` must both be strings or both message lists".into()),
                };
                let prompt_len = common_prefix_length(&prompt_ids, &full);
                let completion: Vec<bool> = (0..full.len()).map(|i| i >= prompt_len).collect();
                (full, Some(completion), mask)
            }
            Sample::Tokenized {
                input_ids,
                labels,
                completion_mask,
            } => {
                if let Some(labels) = labels {
                    // Labels given: used as they are (only truncated).
                    return Ok(self.truncate(SftExample {
                        input_ids: input_ids.clone(),
                        labels: labels.clone(),
                        truncated: false,
                    }));
                }
                (input_ids.clone(), completion_mask.clone(), None)
            }
            Sample::Preference { .. } | Sample::Unpaired { .. } | Sample::Prompt { .. } => {
                unreachable!("handled by encode")
            }
        };
        if let Some(mask) = &assistant_mask
            && !mask.iter().any(|&m| m)
        {
            return Err("`assistant_only_loss` is on but this conversation has no assistant turn".into());
        }
        let completion_only = self.options.completion_only_loss.unwrap_or(matches!(
            sample,
            Sample::PromptCompletion { .. } | Sample::Tokenized { .. }
        ));
        let labels: Vec<i32> = (0..input_ids.len())
            .map(|i| {
                let target = (!completion_only || completion_mask.as_ref().is_none_or(|m| m[i]))
                    && assistant_mask.as_ref().is_none_or(|m| m[i]);
                if target { input_ids[i] as i32 } else { IGNORE_INDEX }
            })
            .collect();
        Ok(self.truncate(SftExample {
            input_ids,
            labels,
            truncated: false,
        }))
    }

    /// Truncates to `max_length` (unless packing, which cuts per row) and drops an example left
    /// with no target.
    fn truncate(&self, mut example: SftExample) -> Encoded {
        if let Some(max) = self.options.max_length
            && !self.options.packing
            && example.input_ids.len() > max
        {
            let keep = self.options.truncation.range(example.input_ids.len(), max);
            example.input_ids = example.input_ids[keep.clone()].to_vec();
            example.labels = example.labels[keep].to_vec();
            example.truncated = true;
        }
        if example.labels.iter().all(|&l| l == IGNORE_INDEX) {
            return Encoded::Dropped;
        }
        Encoded::Sft(example)
    }

    fn encode_preference(
        &self,
        prompt: Option<&Content>,
        chosen: &Content,
        rejected: &Content,
        margin: Option<f64>,
    ) -> std::result::Result<Encoded, String> {
        let (prompt, chosen, rejected) = pair_prompt(prompt, chosen, rejected)?;
        let (prompt_ids, prompt_chosen, prompt_rejected) = match (&prompt, &chosen, &rejected) {
            (Content::Messages(p), Content::Messages(c), Content::Messages(r)) => {
                let join = |x: &[Message]| p.iter().chain(x).cloned().collect::<Vec<_>>();
                (
                    self.encode_chat(p, true, false)?.0,
                    self.encode_chat(&join(c), false, false)?.0,
                    self.encode_chat(&join(r), false, false)?.0,
                )
            }
            (Content::Text(p), Content::Text(c), Content::Text(r)) => (
                self.encode_text(p)?,
                self.encode_text(&format!("{p}{}", self.with_eos(c)))?,
                self.encode_text(&format!("{p}{}", self.with_eos(r)))?,
            ),
            _ => return Err("`prompt`, `chosen` and `rejected` must all be strings or all message lists".into()),
        };
        if is_empty(&chosen) || is_empty(&rejected) {
            return Err("`chosen` or `rejected` is empty".into());
        }
        if prompt_chosen == prompt_rejected {
            // Such a pair has no preference to learn; its DPO loss is a constant.
            return Err("`chosen` and `rejected` are identical".into());
        }
        if self.options.drop_long_pairs
            && let Some(max) = self.options.max_length
            && prompt_chosen.len().max(prompt_rejected.len()) > max
        {
            return Ok(Encoded::Dropped);
        }
        let prompt_len =
            common_prefix_length(&prompt_ids, &prompt_chosen).min(common_prefix_length(&prompt_ids, &prompt_rejected));
        // With keep_start truncation a prompt that fills max_length leaves no completion token.
        if let Some(max) = self.options.max_length
            && self.options.truncation == Truncation::KeepStart
            && prompt_len >= max
        {
            return Ok(Encoded::Dropped);
        }
        Ok(Encoded::Preference(PreferenceExample {
            prompt_ids: prompt_ids[..prompt_len].to_vec(),
            chosen_ids: prompt_chosen[prompt_len..].to_vec(),
            rejected_ids: prompt_rejected[prompt_len..].to_vec(),
            margin: margin.map(|m| m as f32),
        }))
    }

    /// A pair as two unpaired rows, the prompt found as for DPO.
    fn unpair(
        &self,
        prompt: Option<&Content>,
        chosen: &Content,
        rejected: &Content,
    ) -> std::result::Result<Encoded, String> {
        let (prompt, chosen, rejected) = pair_prompt(prompt, chosen, rejected)?;
        let half = |completion: &Content, desirable: bool, name: &str| {
            self.encode_unpaired(&prompt, completion, desirable)
                .map_err(|e| e.replace("`completion`", &format!("`{name}`")))
        };
        // Each half stands alone, as TRL filters the unpaired rows one by one.
        Ok(
            match (half(&chosen, true, "chosen")?, half(&rejected, false, "rejected")?) {
                (Encoded::Unpaired(c), Encoded::Unpaired(r)) => Encoded::UnpairedPair(c, r),
                (Encoded::Unpaired(one), _) | (_, Encoded::Unpaired(one)) => Encoded::Unpaired(one),
                _ => Encoded::Dropped, // the prompt alone fills max_length
            },
        )
    }

    /// One completion as TRL's `KTOTrainer` tokenizes it: the prompt (with the generation
    /// prompt for conversations), then prompt+completion (with EOS for plain text), the
    /// completion starting where the two diverge. A prompt that fills `max_length` leaves
    /// nothing to score (the collator keeps the start): the row is dropped, as TRL filters it.
    fn encode_unpaired(
        &self,
        prompt: &Content,
        completion: &Content,
        desirable: bool,
    ) -> std::result::Result<Encoded, String> {
        let (prompt_ids, full) = match (prompt, completion) {
            (Content::Messages(p), Content::Messages(c)) => {
                let all: Vec<Message> = p.iter().chain(c).cloned().collect();
                (
                    self.encode_chat(p, true, false)?.0,
                    self.encode_chat(&all, false, false)?.0,
                )
            }
            (Content::Text(p), Content::Text(c)) => (
                self.encode_text(p)?,
                self.encode_text(&format!("{p}{}", self.with_eos(c)))?,
            ),
            _ => return Err("`prompt` and `completion` must both be strings or both message lists".into()),
        };
        let prompt_len = common_prefix_length(&prompt_ids, &full);
        if is_empty(completion) || full.len() <= prompt_len {
            return Err("`completion` is empty".into());
        }
        if self.options.max_length.is_some_and(|max| prompt_len >= max) {
            return Ok(Encoded::Dropped);
        }
        Ok(Encoded::Unpaired(UnpairedExample {
            prompt_ids: prompt_ids[..prompt_len].to_vec(),
            completion_ids: full[prompt_len..].to_vec(),
            desirable,
        }))
    }

    /// A prompt as TRL's `GRPOTrainer` tokenizes it: a conversation through the chat template
    /// with the generation prompt, plain text as it is; longer than `max_length` (TRL's
    /// `max_prompt_length`), its start is cut (the end, next to the completion, is kept).
    fn encode_prompt(
        &self,
        prompt: &Content,
        raw: &serde_json::Value,
        columns: &serde_json::Map<String, serde_json::Value>,
    ) -> std::result::Result<Encoded, String> {
        if is_empty(prompt) {
            return Err("`prompt` is empty".into());
        }
        let mut ids = match prompt {
            Content::Messages(p) => self.encode_chat(p, true, false)?.0,
            Content::Text(p) => self.encode_text(p)?,
        };
        let truncated = self.options.max_length.is_some_and(|max| ids.len() > max);
        if let Some(max) = self.options.max_length.filter(|_| truncated) {
            ids.drain(..ids.len() - max);
        }
        Ok(Encoded::Prompt(PromptExample {
            prompt_ids: ids,
            prompt: raw.clone(),
            columns: columns.clone(),
            truncated,
        }))
    }

    fn with_eos(&self, text: &str) -> String {
        if text.ends_with(&self.eos) {
            text.to_string()
        } else {
            format!("{text}{}", self.eos)
        }
    }

    /// Plain text, with the tokenizer's special tokens (transformers' `tokenizer(text)`).
    fn encode_text(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        self.tokenizer.encode(text, true).map_err(|e| e.to_string())
    }

    /// A conversation through the chat template, encoded without special tokens (transformers'
    /// `apply_chat_template(tokenize=True)`), and, when asked, which tokens belong to assistant
    /// turns.
    fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        assistant_mask: bool,
    ) -> std::result::Result<(Vec<u32>, Option<Vec<bool>>), String> {
        let template = self.template.as_ref().ok_or(
            "conversational data needs a chat template, and this tokenizer has none \
             (set `chat_template` in the data config)",
        )?;
        let rendered = template.render(messages, add_generation_prompt, &self.bos, &self.eos)?;
        if !assistant_mask {
            let ids = self
                .tokenizer
                .encode(&rendered.text, false)
                .map_err(|e| e.to_string())?;
            return Ok((ids, None));
        }
        let spans = if template.has_generation_markers() {
            rendered.generation_spans
        } else {
            self.assistant_spans(template, messages, &rendered.text)?
        };
        let (ids, offsets) = self
            .tokenizer
            .encode_with_offsets(&rendered.text)
            .map_err(|e| e.to_string())?;
        // A token is an assistant token when it overlaps a span (transformers' rule).
        let mask = offsets
            .iter()
            .map(|&(s, e)| spans.iter().any(|span| s < span.end && e > span.start))
            .collect();
        Ok((ids, Some(mask)))
    }

    /// For templates without `{% generation %}` markers: each assistant turn is the text that
    /// rendering it adds after the conversation before it and the generation prompt, so the
    /// turn's closing tokens (`<|im_end|>`) are targets and the model learns to stop.
    fn assistant_spans(
        &self,
        template: &ChatTemplate,
        messages: &[Message],
        full: &str,
    ) -> std::result::Result<Vec<Range<usize>>, String> {
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = if i == 0 {
                String::new()
            } else {
                template.render(&messages[..i], true, &self.bos, &self.eos)?.text
            };
            let through = template.render(&messages[..=i], false, &self.bos, &self.eos)?.text;
            if !(through.starts_with(&before) && full.starts_with(&through)) {
                return Err(format!(
                    "the chat template does not render conversation {} as a prefix of the whole, so assistant \
                     turns cannot be located; add {{% generation %}} markers to the template",
                    if full.starts_with(&through) { "prompts" } else { "turns" }
                ));
            }
            spans.push(before.len()..through.len());
        }
        Ok(spans)
    }
}

/// Number of leading tokens two sequences share (TRL's `common_prefix_length`).
/// A pair's prompt and completions: an explicit prompt when it is of the completions' kind
/// (TRL's `maybe_extract_prompt`), otherwise the completions' common start.
fn pair_prompt(
    prompt: Option<&Content>,
    chosen: &Content,
    rejected: &Content,
) -> std::result::Result<(Content, Content, Content), String> {
    match prompt {
        Some(p) if p.is_conversational() == chosen.is_conversational() => {
            Ok((p.clone(), chosen.clone(), rejected.clone()))
        }
        _ => extract_prompt(chosen, rejected),
    }
}

/// Blank text, or turns that are all blank.
fn is_empty(c: &Content) -> bool {
    match c {
        Content::Text(t) => t.trim().is_empty(),
        Content::Messages(m) => m.iter().all(|m| m.content.trim().is_empty()),
    }
}

pub fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// TRL's `extract_prompt`: the longest common start of `chosen` and `rejected` (characters or
/// turns) is the prompt; a space just before the divergence stays with the completions.
fn extract_prompt(chosen: &Content, rejected: &Content) -> std::result::Result<(Content, Content, Content), String> {
    match (chosen, rejected) {
        (Content::Text(c), Content::Text(r)) => {
            let c: Vec<char> = c.chars().collect();
            let r: Vec<char> = r.chars().collect();
            let idx = split_index(&c, &r, |x| *x == ' ')?;
            let s = |v: &[char]| v.iter().collect::<String>();
            Ok((
                Content::Text(s(&c[..idx])),
                Content::Text(s(&c[idx..])),
                Content::Text(s(&r[idx..])),
            ))
        }
        (Content::Messages(c), Content::Messages(r)) => {
            let idx = split_index(c, r, |_| false)?;
            Ok((
                Content::Messages(c[..idx].to_vec()),
                Content::Messages(c[idx..].to_vec()),
                Content::Messages(r[idx..].to_vec()),
            ))
        }
        _ => Err("`chosen` and `rejected` must both be strings or both message lists".into()),
    }
}

/// The index TRL's loop ends on: the first difference (one earlier when `step_back` holds for the
/// element before it), or the last shared index when one is a prefix of the other.
fn split_index<T: PartialEq>(c: &[T], r: &[T], step_back: impl Fn(&T) -> bool) -> std::result::Result<usize, String> {
    let n = c.len().min(r.len());
    if n == 0 {
        return Err("`chosen` or `rejected` is empty".into());
    }
    for idx in 0..n {
        if c[idx] != r[idx] {
            return Ok(if idx > 0 && step_back(&c[idx - 1]) {
                idx - 1
            } else {
                idx
            });
        }
    }
    Ok(n - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implicit_prompt_as_trl_extracts_it() {
        let t = |s: &str| Content::Text(s.into());
        // trl.extract_prompt({"chosen": "The sky is blue.", "rejected": "The sky is green."})
        // -> {'prompt': 'The sky is', 'chosen': ' blue.', 'rejected': ' green.'}
        let (p, c, r) = extract_prompt(&t("The sky is blue."), &t("The sky is green.")).unwrap();
        assert_eq!((p, c, r), (t("The sky is"), t(" blue."), t(" green.")));
        // One a prefix of the other: Python's loop variable stops at the last index.
        let (p, c, r) = extract_prompt(&t("abc"), &t("abcd")).unwrap();
        assert_eq!((p, c, r), (t("ab"), t("c"), t("cd")));
    }

    #[test]
    fn truncation_keeps_the_asked_end() {
        assert_eq!(Truncation::KeepStart.range(10, 4), 0..4);
        assert_eq!(Truncation::KeepEnd.range(10, 4), 6..10);
    }
}
