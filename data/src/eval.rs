//! Rows as evaluation reads them: what to ask the model (the prompt) and, when the dataset has
//! one, the answer to compare with, plus every other column (for references, options, labels
//! named in the evaluation's config).

use serde_json::{Map, Value};

use crate::config::DataConfig;
use crate::error::{Error, Location, Result};
use crate::format::{Content, Format, RowFormat, Sample};
use crate::source::resolve;

/// One evaluation row.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    pub at: Location,
    /// What the model completes: a conversation (rendered with the chat template and the
    /// generation prompt) or plain text.
    pub prompt: Content,
    /// The prompt as the dataset has it: a string or a list of `{role, content}`.
    pub raw_prompt: Value,
    /// The dataset's own answer, as text: the completion, the last assistant turn of a
    /// conversation, or the chosen answer of a preference pair.
    pub answer: Option<String>,
    /// All of the row's columns, as the dataset names them.
    pub columns: Map<String, Value>,
}

/// Reads up to `max_rows` rows of `config`'s sources, in order (no shuffling). A
/// conversation ending in an assistant turn is asked everything before that turn, which
/// becomes its answer; any other conversation is asked whole. Rows of plain text or token ids
/// have no prompt: an error names the file.
pub fn read_rows(config: &DataConfig, max_rows: usize) -> Result<Vec<EvalRow>> {
    config.validate("data")?;
    let mut out = Vec::new();
    for s in config.resolved_sources() {
        for file in resolve(&s.path, s.split.as_deref().unwrap_or("train"))? {
            if out.len() >= max_rows {
                return Ok(out);
            }
            let columns = file.columns()?;
            let renames = s.columns.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let at = Location::file(&file.path);
            let format = RowFormat::resolve(s.format.unwrap_or_default(), renames, &columns, &at)?;
            if matches!(format.format, Format::Text | Format::Tokenized) {
                return Err(Error::File {
                    at,
                    message: format!(
                        "rows of {} have no prompt to complete: evaluation needs `prompt` (+ `completion`), \
                         `messages`, `chosen`/`rejected` with a `prompt`, or `instruction`/`output` rows",
                        if format.format == Format::Text { "plain `text`" } else { "token ids" }
                    ),
                });
            }
            for record in file.rows(None)? {
                if out.len() >= max_rows {
                    return Ok(out);
                }
                let record = record?;
                let (prompt, answer) = split(format.sample(&record)?).map_err(|message| Error::File {
                    at: record.at.clone(),
                    message,
                })?;
                out.push(EvalRow {
                    raw_prompt: raw(&prompt),
                    prompt,
                    answer,
                    columns: record.fields,
                    at: record.at,
                });
            }
        }
    }
    Ok(out)
}

/// A sample's prompt and its answer (as text), if it has one.
fn split(sample: Sample) -> std::result::Result<(Content, Option<String>), String> {
    Ok(match sample {
        Sample::Messages(mut turns) => match turns.last() {
            Some(last) if last.role == "assistant" && turns.len() > 1 => {
                let answer = turns.pop().map(|m| m.content);
                (Content::Messages(turns), answer)
            }
            _ => (Content::Messages(turns), None),
        },
        Sample::PromptCompletion { prompt, completion } => (prompt, Some(text(&completion))),
        // An undesirable completion (KTO's `label: false`) is no answer to compare with.
        Sample::Unpaired {
            prompt,
            completion,
            desirable,
        } => (prompt, desirable.then(|| text(&completion))),
        Sample::Preference {
            prompt: Some(prompt),
            chosen,
            ..
        } => (prompt, Some(text(&chosen))),
        Sample::Preference { prompt: None, .. } => {
            return Err("a preference pair without a `prompt` column has no prompt to ask".into());
        }
        Sample::Prompt { prompt, .. } => (prompt, None),
        Sample::Text(_) | Sample::Tokenized { .. } => unreachable!("refused per file"),
    })
}

/// A completion as text: its string, or the contents of its turns.
fn text(content: &Content) -> String {
    match content {
        Content::Text(t) => t.clone(),
        Content::Messages(m) => m.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
    }
}

fn raw(prompt: &Content) -> Value {
    match prompt {
        Content::Text(t) => Value::String(t.clone()),
        Content::Messages(m) => serde_json::to_value(m).expect("messages serialize"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(lines: &str, max: usize) -> Result<Vec<EvalRow>> {
        let dir = std::env::temp_dir().join(format!("temper-eval-rows-{}-{max}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("rows{}.jsonl", lines.len()));
        std::fs::write(&path, lines).unwrap();
        let config: DataConfig = serde_json::from_value(serde_json::json!({"path": path})).unwrap();
        read_rows(&config, max)
    }

    #[test]
    fn prompts_and_answers_of_each_format() {
        let r = rows(
            concat!(
                r#"{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}"#,
                "\n",
                r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
                "\n"
            ),
            10,
        )
        .unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].answer.as_deref(), Some("4"));
        assert_eq!(r[0].raw_prompt, serde_json::json!([{"role": "user", "content": "2+2?"}]));
        assert_eq!(r[1].answer, None);
        let r = rows(
            "{\"prompt\": \"Q\", \"completion\": \"A\", \"id\": 7}\n{\"prompt\": \"Q2\", \"completion\": \"B\", \"id\": 8}\n",
            1,
        )
        .unwrap();
        assert_eq!(r.len(), 1, "max_rows");
        assert_eq!((r[0].raw_prompt.as_str(), r[0].answer.as_deref()), (Some("Q"), Some("A")));
        assert_eq!(r[0].columns["id"], 7);
        let r = rows("{\"prompt\": \"Q\", \"answer\": \"42\"}\n", 5).unwrap();
        assert_eq!((r[0].answer.as_deref(), &r[0].columns["answer"]), (None, &serde_json::json!("42")));
        let r = rows(
            "{\"prompt\": \"Q\", \"completion\": \"A\", \"label\": true}\n{\"prompt\": \"Q\", \"completion\": \"B\", \"label\": false}\n",
            5,
        )
        .unwrap();
        assert_eq!((r[0].answer.as_deref(), r[1].answer.as_deref()), (Some("A"), None), "KTO's undesirable rows");
        let r = rows("{\"prompt\": \"Q\", \"chosen\": \"good\", \"rejected\": \"bad\"}\n", 5).unwrap();
        assert_eq!(r[0].answer.as_deref(), Some("good"));
    }

    #[test]
    fn rows_without_a_prompt_are_refused_by_file_and_row() {
        let e = rows("{\"text\": \"just text\"}\n", 5).unwrap_err().to_string();
        assert!(e.contains("no prompt to complete") && e.contains(".jsonl"), "{e}");
        let e = rows(
            "{\"prompt\": \"Q\", \"completion\": \"A\"}\n{\"prompt\": 3, \"completion\": \"A\"}\n",
            5,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("prompt") && e.contains("row"), "{e}");
        let e = rows("{\"chosen\": \"a\", \"rejected\": \"b\"}\n", 5).unwrap_err().to_string();
        assert!(e.contains("without a `prompt`"), "{e}");
    }
}
