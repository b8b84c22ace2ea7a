//! Dataset formats, as TRL names them, and the conversion of a row into a [`Sample`].

use serde::{Deserialize, Serialize};
use serde_json::Value;
use temper_models::Message;

use crate::error::{Error, Location, Result};
use crate::source::Record;

/// The layout of a dataset's rows. `Auto` detects it from the column names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Auto,
    /// `text`: language modelling on plain text.
    Text,
    /// `messages` (or ShareGPT's `conversations`): a list of `{role, content}` turns.
    Messages,
    /// `prompt` / `completion`, each a string or a message list.
    PromptCompletion,
    /// `chosen` / `rejected`, with an explicit `prompt` or a prompt shared by both.
    Preference,
    /// `prompt` / `completion` / `label` (true: desirable): TRL's unpaired preference, KTO's.
    UnpairedPreference,
    /// `instruction` / `input` / `output` (Stanford Alpaca), read as prompt / completion.
    Alpaca,
    /// Already tokenized: `input_ids`, with optional `labels` or `completion_mask` (TRL skips
    /// its preparation for such datasets, and so does Temper).
    Tokenized,
    /// `prompt` alone (a string or a message list): what online objectives (GRPO) complete
    /// themselves. Every other column of the row goes with it (to the reward functions).
    Prompt,
}

impl Format {
    /// Canonical columns this format reads; the first group is required, the rest optional.
    fn columns(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Self::Auto => (&[], &[]),
            Self::Text => (&["text"], &[]),
            Self::Messages => (&["messages"], &[]),
            Self::PromptCompletion => (&["prompt", "completion"], &[]),
            Self::Preference => (&["chosen", "rejected"], &["prompt", "margin"]),
            Self::UnpairedPreference => (&["prompt", "completion", "label"], &[]),
            Self::Alpaca => (&["instruction", "output"], &["input"]),
            Self::Tokenized => (&["input_ids"], &["labels", "completion_mask"]),
            Self::Prompt => (&["prompt"], &[]),
        }
    }

    pub fn is_preference(self) -> bool {
        self == Self::Preference
    }

    pub fn is_unpaired(self) -> bool {
        self == Self::UnpairedPreference
    }

    /// Detects the format from (renamed) column names, in TRL's order of precedence.
    pub fn detect(columns: &[String]) -> Option<Self> {
        let has = |c: &str| columns.iter().any(|x| x == c);
        if has("input_ids") {
            Some(Self::Tokenized)
        } else if has("chosen") && has("rejected") {
            Some(Self::Preference)
        } else if has("prompt") && has("completion") && has("label") {
            Some(Self::UnpairedPreference)
        } else if has("prompt") && has("completion") {
            Some(Self::PromptCompletion)
        } else if has("messages") || has("conversations") {
            Some(Self::Messages)
        } else if has("instruction") && has("output") {
            Some(Self::Alpaca)
        } else if has("text") {
            Some(Self::Text)
        } else if has("prompt") {
            Some(Self::Prompt)
        } else {
            None
        }
    }
}

/// A prompt or completion: plain text, or chat turns rendered through the chat template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Text(String),
    Messages(Vec<Message>),
}

impl Content {
    pub fn is_conversational(&self) -> bool {
        matches!(self, Self::Messages(_))
    }
}

/// One row, interpreted.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    Text(String),
    Messages(Vec<Message>),
    PromptCompletion {
        prompt: Content,
        completion: Content,
    },
    Preference {
        prompt: Option<Content>,
        chosen: Content,
        rejected: Content,
        /// How far the chosen score should lead the rejected one (reward models; TRL's
        /// optional `margin` column).
        margin: Option<f64>,
    },
    /// One completion, desirable or not (KTO).
    Unpaired {
        prompt: Content,
        completion: Content,
        desirable: bool,
    },
    Tokenized {
        input_ids: Vec<u32>,
        labels: Option<Vec<i32>>,
        completion_mask: Option<Vec<bool>>,
    },
    /// A prompt to complete (GRPO), with the row's other columns (`columns`, the dataset's
    /// names) and the prompt as the dataset has it (`raw`: a string or a message list).
    Prompt {
        prompt: Content,
        raw: Value,
        columns: serde_json::Map<String, Value>,
    },
}

/// How rows of one source become samples: the format and the column renaming.
#[derive(Debug, Clone)]
pub struct RowFormat {
    pub format: Format,
    /// `(canonical name, column in the dataset)`.
    pub renames: Vec<(String, String)>,
}

impl RowFormat {
    /// Resolves `Auto` against a file's columns (after renaming) and checks that the columns the
    /// format needs exist.
    pub fn resolve(format: Format, renames: Vec<(String, String)>, columns: &[String], at: &Location) -> Result<Self> {
        let canonical: Vec<String> = columns
            .iter()
            .map(|c| {
                renames
                    .iter()
                    .find(|(_, from)| from == c)
                    .map_or_else(|| c.clone(), |(to, _)| to.clone())
            })
            .collect();
        let format = match format {
            Format::Auto => Format::detect(&canonical).ok_or_else(|| Error::File {
                at: at.clone(),
                message: format!(
                    "cannot tell the dataset format from the columns {columns:?}: expected `text`, `messages`, \
                     `prompt`+`completion` (+`label`), `chosen`+`rejected` or `instruction`+`output`; set `format` and \
                     `columns` in the data config"
                ),
            })?,
            f => f,
        };
        let this = Self { format, renames };
        let (required, _) = format.columns();
        for &c in required {
            let present = |name: &str| columns.iter().any(|x| x == this.column_name(name));
            if !(present(c) || (c == "messages" && present("conversations"))) {
                return Err(Error::MissingColumn {
                    at: at.clone(),
                    column: this.column_name(c).to_string(),
                    available: columns.join(", "),
                });
            }
        }
        Ok(this)
    }

    /// The dataset column that holds canonical column `name`.
    pub fn column_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.renames
            .iter()
            .find(|(to, _)| to == name)
            .map_or(name, |(_, from)| from.as_str())
    }

    /// Dataset columns to read (so the readers skip the rest): all of `available` for prompts,
    /// whose other columns go to the reward functions.
    pub fn dataset_columns(&self, available: &[String]) -> Vec<String> {
        if self.format == Format::Prompt {
            return available.to_vec();
        }
        let (required, optional) = self.format.columns();
        let mut cols: Vec<String> = required
            .iter()
            .chain(optional)
            .map(|c| self.column_name(c).to_string())
            .collect();
        if self.format == Format::Messages {
            cols.push(self.column_name("conversations").to_string());
        }
        cols
    }

    /// Reads one record as a sample; errors name the row and column.
    pub fn sample(&self, record: &Record) -> Result<Sample> {
        let get = |name: &str| -> Option<&Value> { record.fields.get(self.column_name(name)).filter(|v| !v.is_null()) };
        let bad = |name: &str, message: String| Error::BadRow {
            at: record.at.clone(),
            column: self.column_name(name).to_string(),
            message,
        };
        let required = |name: &str| get(name).ok_or_else(|| bad(name, "missing or null".into()));
        let text = |name: &str| -> Result<String> {
            match required(name)? {
                Value::String(s) => Ok(s.clone()),
                other => Err(bad(name, format!("expected a string, got {}", kind(other)))),
            }
        };
        let content = |name: &str| -> Result<Content> {
            match required(name)? {
                Value::String(s) => Ok(Content::Text(s.clone())),
                Value::Array(turns) => messages(turns).map(Content::Messages).map_err(|m| bad(name, m)),
                other => Err(bad(
                    name,
                    format!("expected a string or a list of messages, got {}", kind(other)),
                )),
            }
        };
        Ok(match self.format {
            Format::Auto => unreachable!("resolved before reading"),
            Format::Text => Sample::Text(text("text")?),
            Format::Messages => {
                let (name, value) = match get("messages") {
                    Some(v) => ("messages", v),
                    None => (
                        "conversations",
                        required("conversations").map_err(|_| bad("messages", "missing or null".into()))?,
                    ),
                };
                match value {
                    Value::Array(turns) => Sample::Messages(messages(turns).map_err(|m| bad(name, m))?),
                    other => return Err(bad(name, format!("expected a list of messages, got {}", kind(other)))),
                }
            }
            Format::PromptCompletion => Sample::PromptCompletion {
                prompt: content("prompt")?,
                completion: content("completion")?,
            },
            Format::Preference => Sample::Preference {
                prompt: get("prompt").map(|_| content("prompt")).transpose()?,
                chosen: content("chosen")?,
                rejected: content("rejected")?,
                margin: match get("margin") {
                    None => None,
                    Some(Value::Number(n)) => n.as_f64().filter(|m| m.is_finite()),
                    Some(other) => return Err(bad("margin", format!("expected a number, got {}", kind(other)))),
                },
            },
            Format::UnpairedPreference => Sample::Unpaired {
                prompt: content("prompt")?,
                completion: content("completion")?,
                desirable: match required("label")? {
                    Value::Bool(b) => *b,
                    other => {
                        return Err(bad(
                            "label",
                            format!("expected true (desirable) or false (undesirable), got {}", kind(other)),
                        ));
                    }
                },
            },
            Format::Prompt => {
                let name = self.column_name("prompt");
                Sample::Prompt {
                    prompt: content("prompt")?,
                    raw: required("prompt")?.clone(),
                    columns: record
                        .fields
                        .iter()
                        .filter(|(k, _)| k.as_str() != name)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                }
            }
            Format::Tokenized => {
                let ints = |name: &str, v: &Value| -> Result<Vec<i64>> {
                    let Value::Array(items) = v else {
                        return Err(bad(name, format!("expected a list of integers, got {}", kind(v))));
                    };
                    items
                        .iter()
                        .map(|x| {
                            x.as_i64()
                                .ok_or_else(|| bad(name, "expected a list of integers".into()))
                        })
                        .collect()
                };
                let input_ids = ints("input_ids", required("input_ids")?)?
                    .into_iter()
                    .map(|x| u32::try_from(x).map_err(|_| bad("input_ids", format!("{x} is not a token id"))))
                    .collect::<Result<Vec<u32>>>()?;
                let aligned = |name: &str, n: usize| -> Result<()> {
                    if n == input_ids.len() {
                        Ok(())
                    } else {
                        Err(bad(name, format!("has {n} entries for {} input_ids", input_ids.len())))
                    }
                };
                let labels = match get("labels") {
                    Some(v) => {
                        let l: Vec<i32> = ints("labels", v)?
                            .into_iter()
                            .map(|x| match i32::try_from(x) {
                                Ok(l) if l >= 0 || l == crate::IGNORE_INDEX => Ok(l),
                                _ => Err(bad(
                                    "labels",
                                    format!("{x} is neither a token id nor {} (ignored)", crate::IGNORE_INDEX),
                                )),
                            })
                            .collect::<Result<_>>()?;
                        aligned("labels", l.len())?;
                        Some(l)
                    }
                    None => None,
                };
                let completion_mask = match get("completion_mask") {
                    Some(v) => {
                        let m: Vec<bool> = ints("completion_mask", v)?.into_iter().map(|x| x != 0).collect();
                        aligned("completion_mask", m.len())?;
                        Some(m)
                    }
                    None => None,
                };
                Sample::Tokenized {
                    input_ids,
                    labels,
                    completion_mask,
                }
            }
            Format::Alpaca => {
                let instruction = text("instruction")?;
                let input = match get("input") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => return Err(bad("input", format!("expected a string, got {}", kind(other)))),
                    None => String::new(),
                };
                let user = if input.trim().is_empty() {
                    instruction
                } else {
                    format!("{instruction}\n\n{input}")
                };
                Sample::PromptCompletion {
                    prompt: Content::Messages(vec![Message::new("user", &user)]),
                    completion: Content::Messages(vec![Message::new("assistant", &text("output")?)]),
                }
            }
        })
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A message list: `{role, content}` objects, or ShareGPT's `{from, value}` with its
/// `human`/`gpt` roles mapped to `user`/`assistant`.
fn messages(turns: &[Value]) -> std::result::Result<Vec<Message>, String> {
    if turns.is_empty() {
        return Err("the message list is empty".into());
    }
    turns
        .iter()
        .enumerate()
        .map(|(i, turn)| {
            let Value::Object(obj) = turn else {
                return Err(format!(
                    "message {i}: expected an object with `role` and `content`, got {}",
                    kind(turn)
                ));
            };
            let field = |a: &str, b: &str| obj.get(a).or_else(|| obj.get(b));
            let role = match field("role", "from") {
                Some(Value::String(r)) => match r.as_str() {
                    "human" => "user",
                    "gpt" => "assistant",
                    r => r,
                },
                Some(other) => return Err(format!("message {i}: `role` must be a string, got {}", kind(other))),
                None => return Err(format!("message {i}: no `role`")),
            };
            let content = match field("content", "value") {
                Some(Value::String(c)) => c.as_str(),
                Some(Value::Null) | None => "",
                Some(other) => {
                    return Err(format!(
                        "message {i}: `content` must be a string (multimodal content parts are not supported), got {}",
                        kind(other)
                    ));
                }
            };
            Ok(Message::new(role, content))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn detection_follows_trl_precedence() {
        assert_eq!(
            Format::detect(&cols(&["prompt", "chosen", "rejected"])),
            Some(Format::Preference)
        );
        assert_eq!(
            Format::detect(&cols(&["prompt", "completion", "text"])),
            Some(Format::PromptCompletion)
        );
        assert_eq!(
            Format::detect(&cols(&["prompt", "completion", "label"])),
            Some(Format::UnpairedPreference)
        );
        assert_eq!(Format::detect(&cols(&["conversations"])), Some(Format::Messages));
        assert_eq!(
            Format::detect(&cols(&["instruction", "input", "output"])),
            Some(Format::Alpaca)
        );
        assert_eq!(Format::detect(&cols(&["text", "id"])), Some(Format::Text));
        assert_eq!(Format::detect(&cols(&["question"])), None);
    }

    #[test]
    fn sharegpt_turns_are_mapped() {
        let turns: Vec<Value> =
            serde_json::from_str(r#"[{"from":"human","value":"hi"},{"from":"gpt","value":"yo"}]"#).unwrap();
        assert_eq!(
            messages(&turns).unwrap(),
            vec![Message::new("user", "hi"), Message::new("assistant", "yo")]
        );
        assert!(messages(&[]).unwrap_err().contains("empty"));
        let bad: Vec<Value> = serde_json::from_str(r#"[{"content":"x"}]"#).unwrap();
        assert!(messages(&bad).unwrap_err().contains("no `role`"));
    }
}
