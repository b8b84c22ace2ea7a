//! Tokenizer and chat template, from a Hugging Face directory (`tokenizer.json`,
//! `tokenizer_config.json`, `chat_template.jinja`) or from GGUF metadata (`tokenizer.ggml.*`).

use std::path::Path;

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;
use serde_json::{Value as Json, json};

use crate::error::{Error, Result};
use crate::gguf::{Gguf, Value};

/// One chat turn, as `messages` in transformers' `apply_chat_template`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A token's byte range in the encoded text.
pub type Offsets = (usize, usize);

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    origin: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// Whether encoding plain text should start with BOS (llama.cpp's `add_bos_token`). For
    /// Hugging Face directories the post-processor in `tokenizer.json` already does this.
    pub add_bos_token: bool,
    pub chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` and
    /// `chat_template.jinja` from a Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let origin = path.display().to_string();
        if !path.exists() {
            return Err(Error::Tokenizer {
                origin,
                message: "file not found".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        let mut tok = Self {
            inner,
            origin,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            add_bos_token: false,
            chat_template: None,
        };
        let config_path = dir.join("tokenizer_config.json");
        if config_path.exists() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            let config: Json = serde_json::from_str(&text).map_err(|source| Error::Json {
                path: config_path.clone(),
                error: source,
            })?;
            // Special tokens are either strings or `{"content": ...}` objects.
            let token = |key: &str| match config.get(key) {
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(str::to_string),
                _ => None,
            };
            tok.bos_token = token("bos_token");
            tok.eos_token = token("eos_token");
            tok.pad_token = token("pad_token");
            tok.chat_template = match config.get("chat_template") {
                Some(Json::String(s)) => Some(s.clone()),
                // A list of named templates: use "default", as transformers does.
                Some(Json::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Json::as_str)
                    .map(str::to_string),
                _ => None,
            };
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            tok.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        Ok(tok)
    }

    /// Builds the tokenizer that transformers builds from the same GGUF
    /// (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), so both give the same ids.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let origin = format!("{} (GGUF metadata)", gguf.path().display());
        let err = |message: String| Error::Tokenizer {
            origin: origin.clone(),
            message,
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            gguf.get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| err(format!("{key}: missing")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| err(format!("{key}: not a list of strings")))
                })
                .collect()
        };
        let model = gguf.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<u64> = gguf
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let spec = match model {
            "gpt2" => {
                let merges = strings("tokenizer.ggml.merges")?;
                let pre = gguf.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("");
                byte_level_bpe(&tokens, &merges, &types, pre)
            }
            "llama" if gguf.architecture().is_ok_and(|a| a.starts_with("gemma")) => gemma_bpe(&tokens, &types),
            "llama" => {
                let merges = match gguf.get("tokenizer.ggml.merges") {
                    Some(_) => strings("tokenizer.ggml.merges")?
                        .iter()
                        .map(|m| {
                            let (a, b) = m.split_once(' ').unwrap_or((m, ""));
                            (a.to_string(), b.to_string())
                        })
                        .collect(),
                    None => {
                        let scores: Vec<f64> = gguf
                            .get("tokenizer.ggml.scores")
                            .and_then(Value::as_array)
                            .ok_or_else(|| err("tokenizer.ggml.scores: missing (needed without merges)".into()))?
                            .iter()
                            .map(|v| v.as_f64().unwrap_or(0.0))
                            .collect();
                        merges_from_scores(&tokens, &scores)
                    }
                };
                sentencepiece_bpe(&tokens, &merges, &types)
            }
            other => {
                return Err(err(format!(
                    "tokenizer.ggml.model {other:?} is not supported (byte-level BPE \"gpt2\" and SentencePiece BPE \"llama\" are); \
                     use the model's Hugging Face directory with tokenizer.json instead"
                )));
            }
        };
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| err(e.to_string()))?;
        let name_of = |key: &str| {
            gguf.get(key)
                .and_then(Value::as_u64)
                .and_then(|id| tokens.get(id as usize).cloned())
        };
        Ok(Self {
            inner,
            origin,
            bos_token: name_of("tokenizer.ggml.bos_token_id"),
            eos_token: name_of("tokenizer.ggml.eos_token_id"),
            pad_token: name_of("tokenizer.ggml.padding_token_id"),
            // transformers (and llama.cpp) add BOS for SentencePiece vocabularies that do not say.
            add_bos_token: gguf
                .get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(model == "llama"),
            chat_template: gguf
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    pub(crate) fn inner_tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The token batches are padded with: the pad token, else EOS (TRL's choice).
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token
            .as_deref()
            .or(self.eos_token.as_deref())
            .and_then(|t| self.token_to_id(t))
    }

    /// Encodes text. `add_special_tokens` applies the tokenizer's post-processor and, for GGUF
    /// tokenizers that ask for it, a leading BOS (transformers' `add_special_tokens=True`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer {
                origin: self.origin.clone(),
                message: e.to_string(),
            })?;
        let mut ids = enc.get_ids().to_vec();
        // Like transformers' post-processor: BOS goes first even when the text starts with one.
        if add_special_tokens
            && self.add_bos_token
            && let Some(bos) = self.bos_token_id()
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Encodes text without special tokens and returns each token's byte range in `text`, which
    /// maps character spans (assistant turns, completions) onto tokens.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<Offsets>)> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer {
            origin: self.origin.clone(),
            message: e.to_string(),
        })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer {
                origin: self.origin.clone(),
                message: e.to_string(),
            })
    }

    /// Renders `messages` with the chat template, as transformers' `apply_chat_template(...,
    /// tokenize=False)`.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| Error::Template {
            origin: self.origin.clone(),
            message: "this tokenizer has no chat template".into(),
        })?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
        .map_err(|message| Error::Template {
            origin: self.origin.clone(),
            message,
        })
    }
}

/// `tokenizer.json` for a byte-level BPE vocabulary, as transformers' GPT2Tokenizer builds it
/// from GGUF (`byte_level_tokenizer` + `set_split_regex`).
fn byte_level_bpe(tokens: &[String], merges: &[String], types: &[u64], pre: &str) -> Json {
    let byte_map = bytes_to_unicode();
    let in_alphabet = |t: &str| t.chars().all(|c| byte_map.contains(&c));
    let mut vocab = serde_json::Map::new();
    for (id, token) in tokens.iter().enumerate() {
        // A token written outside the byte alphabet is respelled byte by byte.
        let spelled = if in_alphabet(token) {
            token.clone()
        } else {
            token.bytes().map(|b| byte_map[b as usize]).collect()
        };
        vocab.insert(spelled, json!(id));
    }
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap_or((m, ""));
            json!([a, b])
        })
        .collect();
    // 3: CONTROL (special, unless a llama.cpp mislabel outside the byte alphabet), 4:
    // USER_DEFINED (matched whole, not special).
    let added = added_tokens(tokens, types, |ty, token| match ty {
        3 if in_alphabet(token) => Some(true),
        4 => Some(false),
        _ => None,
    });
    let pre_tokenizer = match split_regex(pre) {
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        None => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": pre_tokenizer, "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    })
}

/// `tokenizer.json` for a SentencePiece BPE vocabulary (Llama 2, TinyLlama, Mistral v0.1), as
/// transformers' LlamaTokenizer builds it from GGUF: Metaspace with a prefix on the first
/// word, byte fallback, unknown and control tokens special.
fn sentencepiece_bpe(tokens: &[String], merges: &[(String, String)], types: &[u64]) -> Json {
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), json!(id)))
        .collect();
    // 2: UNKNOWN and 3: CONTROL are special, 4: USER_DEFINED is matched whole.
    let added = added_tokens(tokens, types, |ty, _| match ty {
        2 | 3 => Some(true),
        4 => Some(false),
        _ => None,
    });
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()},
    })
}

/// `tokenizer.json` for Gemma's SentencePiece vocabulary as transformers builds it from GGUF
/// (`gemma_tokenizer`): tokens made only of spaces respelled with `\u{2581}` (the file stores
/// real spaces), merges recovered from the vocabulary ranked by position (Gemma's scores do not
/// follow its merge order), spaces normalised to `\u{2581}` with no prefix, byte fallback.
fn gemma_bpe(tokens: &[String], types: &[u64]) -> Json {
    let tokens: Vec<String> = tokens
        .iter()
        .map(|t| match t.contains(' ') && t.trim().is_empty() {
            true => "\u{2581}".repeat(t.chars().count()),
            false => t.clone(),
        })
        .collect();
    let positions: Vec<f64> = (0..tokens.len()).map(|i| -(i as f64)).collect();
    let merges = merges_from_scores(&tokens, &positions);
    let mut spec = sentencepiece_bpe(&tokens, &merges, types);
    spec["normalizer"] = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    spec["pre_tokenizer"] =
        json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false});
    spec["decoder"] = json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]});
    if let Some(unk) = tokens.iter().zip(types).find(|(_, ty)| **ty == 2).map(|(t, _)| t) {
        spec["model"]["unk_token"] = json!(unk);
    }
    spec
}

fn added_tokens(tokens: &[String], types: &[u64], special: impl Fn(u64, &str) -> Option<bool>) -> Vec<Json> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter_map(|(id, (token, &ty))| {
            special(ty, token).map(|special| {
                json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special})
            })
        })
        .collect()
}

/// Merges implied by a vocabulary with scores, when the GGUF has none (transformers'
/// `generate_merges`): every split of a token into two tokens, ranked by the merged token's
/// score (higher first), then by the pieces' lengths; ties keep vocabulary order.
pub fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let ids: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(String, String, f64)> = Vec::new();
    for (token, &score) in tokens.iter().zip(scores) {
        let mut local = Vec::new();
        let bounds: Vec<usize> = token.char_indices().map(|(i, _)| i).skip(1).collect();
        for at in bounds {
            let (l, r) = token.split_at(at);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                local.push((li, ri, l.to_string(), r.to_string()));
            }
        }
        local.sort_by_key(|x| (x.0, x.1));
        merges.extend(local.into_iter().map(|(_, _, l, r)| (l, r, score)));
    }
    let len = |s: &str| s.chars().count();
    // Python's sorted(..., reverse=True) is stable: equal keys keep their order.
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then(len(&b.0).cmp(&len(&a.0)))
            .then(len(&b.1).cmp(&len(&a.1)))
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

/// Renders a chat template with the environment transformers sets up: `trim_blocks`,
/// `lstrip_blocks`, `raise_exception`, `strftime_now`, Python string methods.
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> std::result::Result<String, String> {
    let template = ChatTemplate::new(template)?;
    Ok(template
        .render(messages, add_generation_prompt, bos_token, eos_token)?
        .text)
}

/// Marks where a `{% generation %}` block starts and ends in rendered text; private-use code
/// points, removed before the text is tokenized.
const GENERATION_START: char = '\u{F8F0}';
const GENERATION_END: char = '\u{F8F1}';

/// A chat template compiled once, so rendering every row of a dataset does not parse it again.
///
/// transformers' `{% generation %}` ... `{% endgeneration %}` tags (which mark the assistant
/// tokens for `return_assistant_tokens_mask`) are not Jinja: each is rewritten to an `if` block
/// that keeps the tag's whitespace control and emits a marker, so the rendered text is the same
/// as transformers' and the marked spans are known.
pub struct ChatTemplate {
    env: Environment<'static>,
    has_generation_markers: bool,
}

/// Rendered chat text and the byte ranges of its `{% generation %}` blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    pub generation_spans: Vec<std::ops::Range<usize>>,
}

impl ChatTemplate {
    pub fn new(source: &str) -> std::result::Result<Self, String> {
        let tag = regex::Regex::new(r"\{%(-?)\s*(generation|endgeneration)\s*(-?)%\}").expect("valid regex");
        let has_generation_markers = tag.is_match(source);
        let rewritten = tag.replace_all(source, |c: &regex::Captures| {
            let marker = if &c[2] == "generation" {
                GENERATION_START
            } else {
                GENERATION_END
            };
            format!("{{%{} if true %}}{{{{ \"{marker}\" }}}}{{% endif {}%}}", &c[1], &c[3])
        });
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String {
            // Templates use this for "Today's date"; a fixed value keeps renders reproducible.
            String::new()
        });
        env.add_template_owned("chat", rewritten.into_owned())
            .map_err(|e| e.to_string())?;
        Ok(Self {
            env,
            has_generation_markers,
        })
    }

    /// Whether the template marks assistant tokens with `{% generation %}`.
    pub fn has_generation_markers(&self) -> bool {
        self.has_generation_markers
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> std::result::Result<RenderedChat, String> {
        let tmpl = self.env.get_template("chat").map_err(|e| e.to_string())?;
        let raw = tmpl
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
            .map_err(|e| {
                let mut msg = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    msg.push_str(&format!(": {s}"));
                    source = s.source();
                }
                msg
            })?;
        if !self.has_generation_markers {
            return Ok(RenderedChat {
                text: raw,
                generation_spans: Vec::new(),
            });
        }
        let mut text = String::with_capacity(raw.len());
        let mut generation_spans = Vec::new();
        let mut open = None;
        for ch in raw.chars() {
            match ch {
                GENERATION_START => open = Some(text.len()),
                GENERATION_END => {
                    if let Some(start) = open.take() {
                        generation_spans.push(start..text.len());
                    }
                }
                _ => text.push(ch),
            }
        }
        Ok(RenderedChat { text, generation_spans })
    }
}

/// GPT-2's reversible map from bytes to printable characters.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in printable.into_iter().zip(chars) {
        map[b as usize] = char::from_u32(c).expect("valid code point");
    }
    map
}

/// The pre-tokenizer split that transformers uses for a `tokenizer.ggml.pre` value.
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" | "pixtral" => Some(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_gpt2s() {
        let m = bytes_to_unicode();
        assert_eq!(m[b'A' as usize], 'A');
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn template_renders_like_transformers() {
        // transformers: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        let t = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'].strip() + '<|im_end|>' + '\n' }}{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let out = render_chat_template(t, &[Message::new("user", " hi ")], true, "", "").unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        let err = render_chat_template("{{ raise_exception('no system role') }}", &[], false, "", "").unwrap_err();
        assert!(err.contains("no system role"), "{err}");
    }
}
