//! Human review of two models' answers (`temper review`): the session behind the page. Items
//! come from `temper eval`'s `eval_samples.jsonl`; every judgment is appended (and synced) to
//! `feedback.jsonl` before it is acknowledged, and `preferences.jsonl` (TRL's `prompt`,
//! `chosen`, `rejected`) and `kto.jsonl` (`prompt`, `completion`, `label`) are rewritten from
//! the latest judgment of each item. A restart reads `feedback.jsonl` back: nothing recorded
//! is lost. The HTTP server is the binary's; this holds no socket.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use temper_trl::scores;

use crate::config::{expand_home, read_file_or_flags};
use crate::error::{Error, Result};

/// `temper review`'s YAML file (or its flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewConfig {
    /// `eval_samples.jsonl` from `temper eval`: each row's answer from each model.
    pub samples: PathBuf,
    /// Where feedback.jsonl, preferences.jsonl and kto.jsonl go (kept across restarts).
    pub output_dir: PathBuf,
    /// The two models compared, as the samples name them (`base`, an adapter's path).
    /// Default: the first two in the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sides: Option<[String; 2]>,
    /// Criteria each answer may be scored on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rubric: Vec<Criterion>,
    /// The address served; anything but loopback exposes the answers to the network.
    #[serde(default = "default_host")]
    pub host: String,
    /// 0: any free port (printed at start).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Seeds which side is shown on the left, per item.
    #[serde(default)]
    pub seed: u64,
    #[serde(skip)]
    pub file: PathBuf,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    8765
}

/// One rubric criterion, scored from `min` to `max`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criterion {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default = "default_min")]
    pub min: u32,
    #[serde(default = "default_max")]
    pub max: u32,
}

fn default_min() -> u32 {
    1
}
fn default_max() -> u32 {
    5
}

impl ReviewConfig {
    /// Reads `file` (or, without one, the overrides alone: `temper review` given as flags)
    /// with `key.path=value` overrides, then checks it; errors name the file and the key.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let (mut c, origin): (Self, PathBuf) = read_file_or_flags(file, overrides)?;
        let path = origin.as_path();
        c.file = origin.clone();
        c.samples = PathBuf::from(expand_home(&c.samples.display().to_string()));
        c.output_dir = PathBuf::from(expand_home(&c.output_dir.display().to_string()));
        let check = |ok: bool, key: &str, message: String| if ok { Ok(()) } else { Err(Error::config(key, message).in_file(path)) };
        check(c.samples.is_file(), "samples", format!("{} does not exist", c.samples.display()))?;
        let mut names = std::collections::BTreeSet::new();
        for (i, r) in c.rubric.iter().enumerate() {
            let key = format!("rubric[{i}]");
            let plain = !r.name.is_empty() && r.name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
            check(plain, &format!("{key}.name"), format!("`{}`: use letters, digits, `_` and `-`", r.name))?;
            check(names.insert(r.name.clone()), &format!("{key}.name"), format!("a second criterion `{}`", r.name))?;
            check(
                r.min < r.max && r.max - r.min <= 10,
                &key,
                format!("the scale {}-{} must rise, by at most 10 steps", r.min, r.max),
            )?;
        }
        if let Some([a, b]) = &c.sides {
            check(a != b, "sides", format!("compare two different models, not `{a}` with itself"))?;
        }
        Ok(c)
    }
}

/// One prompt and the two sides' answers.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    /// The prompt as the dataset has it (a string or messages).
    pub prompt: Value,
    /// Indexed by side.
    pub answers: [String; 2],
    /// Which side the page shows as "A" (the other is "B").
    pub side_of_a: usize,
}

/// What a person said about one item, by side (0, 1), not by slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgment {
    /// `Some(Some(side))`: that side is better; `Some(None)`: a tie; `None`: no pairwise choice.
    pub winner: Option<Option<usize>>,
    pub thumbs: [Option<bool>; 2],
    pub scores: [BTreeMap<String, u32>; 2],
    pub comment: String,
}

pub struct Session {
    pub config: ReviewConfig,
    pub sides: [String; 2],
    pub items: Vec<Item>,
    /// The latest judgment of each item (by index).
    judgments: BTreeMap<usize, Judgment>,
    feedback: std::fs::File,
}

const SLOTS: [&str; 2] = ["A", "B"];

impl Session {
    /// Reads the samples and any judgments already recorded in the output directory. A last
    /// line cut short (a kill mid-write) is skipped with a warning on `warn`.
    pub fn open(config: ReviewConfig, warn: &dyn Fn(&str)) -> Result<Self> {
        let (sides, items) = read_samples(&config)?;
        let dir = &config.output_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join("feedback.jsonl");
        // preferences.jsonl and kto.jsonl are rewritten from feedback.jsonl: without it, they
        // are someone else's files.
        for name in ["preferences.jsonl", "kto.jsonl"] {
            if !path.exists() && dir.join(name).exists() {
                return Err(Error::config(
                    "output_dir",
                    format!(
                        "{} holds {name} but no feedback.jsonl: review writes its own {name} there; choose another directory",
                        dir.display()
                    ),
                )
                .in_file(&config.file));
            }
        }
        let mut judgments = BTreeMap::new();
        let recorded = std::fs::read(&path).ok();
        if let Some(text) = recorded.as_deref().and_then(|b| std::str::from_utf8(b).ok()) {
            let lines: Vec<&str> = text.lines().collect();
            for (n, line) in lines.iter().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let parsed = serde_json::from_str::<Value>(line).ok().and_then(|v| from_feedback(&v, &sides, &items));
                match parsed {
                    Some((index, j)) => {
                        judgments.insert(index, j);
                    }
                    None if n + 1 == lines.len() && !text.ends_with('\n') => {
                        warn(&format!("{}: line {}: cut short (a kill while writing?); skipped", path.display(), n + 1));
                    }
                    None => warn(&format!(
                        "{}: line {}: not a judgment of these answers (another evaluation's samples, or other sides); \
                         skipped",
                        path.display(),
                        n + 1
                    )),
                }
            }
        }
        let mut feedback = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        // A torn last line gets its own line ending, so the next judgment starts clean.
        if recorded.is_some_and(|b| b.last().is_some_and(|&c| c != b'\n')) {
            feedback.write_all(b"\n").map_err(|e| Error::io(&path, e))?;
        }
        let session = Self {
            config,
            sides,
            items,
            judgments,
            feedback,
        };
        session.write_datasets()?;
        Ok(session)
    }

    pub fn judged(&self) -> usize {
        self.judgments.len()
    }

    /// The page's view: items with their answers by slot, judgments by slot, the summary.
    pub fn state(&self) -> Value {
        let items: Vec<Value> = self
            .items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let a = item.side_of_a;
                json!({
                    "id": item.id,
                    "prompt": prompt_messages(&item.prompt),
                    "answers": {"A": item.answers[a], "B": item.answers[1 - a]},
                    "judgment": self.judgments.get(&i).map(|j| to_slots(j, a)),
                })
            })
            .collect();
        let rubric: Vec<Value> = self
            .config
            .rubric
            .iter()
            .map(|c| json!({"name": c.name, "description": c.description.clone().unwrap_or_default(), "min": c.min, "max": c.max}))
            .collect();
        json!({
            "title": format!("Temper review: {} vs {}", self.sides[0], self.sides[1]),
            "rubric": rubric,
            "items": items,
            "summary": self.summary(),
        })
    }

    /// Records a judgment posted by the page (slots `A`/`B`): checked, appended to
    /// `feedback.jsonl` and synced, then the datasets rewritten. Errors are the person's
    /// (`Err(message)` for a 400) or the disk's.
    pub fn judge(&mut self, body: &Value) -> std::result::Result<Result<()>, String> {
        let id = body.get("id").and_then(Value::as_str).ok_or("`id` is missing")?;
        let index = self.items.iter().position(|i| i.id == id).ok_or(format!("no item `{id}`"))?;
        let a = self.items[index].side_of_a;
        let side_of = |slot: &str| -> std::result::Result<usize, String> {
            match slot {
                "A" => Ok(a),
                "B" => Ok(1 - a),
                other => Err(format!("unknown answer `{other}` (A or B)")),
            }
        };
        let winner = match body.get("choice") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "tie" => Some(None),
            Some(Value::String(s)) => Some(Some(side_of(s)?)),
            Some(other) => return Err(format!("`choice` must be A, B, tie or null, not {other}")),
        };
        let mut thumbs = [None, None];
        if let Some(t) = body.get("thumbs").filter(|t| !t.is_null()) {
            let map = t.as_object().ok_or("`thumbs` must be an object")?;
            for (slot, v) in map {
                thumbs[side_of(slot)?] = match v {
                    Value::Null => None,
                    Value::String(s) if s == "up" => Some(true),
                    Value::String(s) if s == "down" => Some(false),
                    other => return Err(format!("thumbs for {slot} must be up, down or null, not {other}")),
                };
            }
        }
        let mut scores: [BTreeMap<String, u32>; 2] = Default::default();
        if let Some(s) = body.get("scores").filter(|s| !s.is_null()) {
            let map = s.as_object().ok_or("`scores` must be an object")?;
            for (slot, per) in map {
                let side = side_of(slot)?;
                let per = per.as_object().ok_or(format!("scores for {slot} must be an object"))?;
                for (name, v) in per {
                    let c = self
                        .config
                        .rubric
                        .iter()
                        .find(|c| &c.name == name)
                        .ok_or(format!("no rubric criterion `{name}`"))?;
                    let n = v
                        .as_u64()
                        .filter(|&n| (c.min as u64..=c.max as u64).contains(&n))
                        .ok_or(format!("{name} must be a whole number from {} to {}, not {v}", c.min, c.max))?;
                    scores[side].insert(name.clone(), n as u32);
                }
            }
        }
        let comment = match body.get("comment") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) if s.len() <= 20_000 => s.clone(),
            Some(Value::String(_)) => return Err("the comment is longer than 20000 bytes".into()),
            Some(other) => return Err(format!("`comment` must be text, not {other}")),
        };
        if winner.is_none() && thumbs.iter().all(Option::is_none) && scores.iter().all(BTreeMap::is_empty) && comment.trim().is_empty()
        {
            return Err("nothing to record: pick the better answer or a tie, a thumb, a score, or write a comment".into());
        }
        let judgment = Judgment {
            winner,
            thumbs,
            scores,
            comment,
        };
        Ok(self.record(index, judgment))
    }

    fn record(&mut self, index: usize, j: Judgment) -> Result<()> {
        let item = &self.items[index];
        let by_side = |f: &dyn Fn(usize) -> Value| -> Value {
            Value::Object((0..2).map(|s| (self.sides[s].clone(), f(s))).collect())
        };
        let line = json!({
            "id": item.id,
            "time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "winner": match j.winner { None => Value::Null, Some(None) => json!("tie"), Some(Some(s)) => json!(self.sides[s]) },
            "shown_as_a": self.sides[item.side_of_a],
            "thumbs": by_side(&|s| thumb(j.thumbs[s])),
            "scores": by_side(&|s| json!(j.scores[s])),
            "comment": j.comment,
            "prompt": item.prompt,
            "answers": by_side(&|s| json!(item.answers[s])),
        });
        let path = self.config.output_dir.join("feedback.jsonl");
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        self.feedback.write_all(&bytes).map_err(|e| Error::io(&path, e))?;
        self.feedback.sync_data().map_err(|e| Error::io(&path, e))?;
        self.judgments.insert(index, j);
        self.write_datasets()
    }

    /// `preferences.jsonl` and `kto.jsonl` from the latest judgments, in item order.
    fn write_datasets(&self) -> Result<()> {
        let (mut prefs, mut kto) = (String::new(), String::new());
        for (&i, j) in &self.judgments {
            let item = &self.items[i];
            let conversational = item.prompt.is_array();
            let completion = |text: &str| {
                if conversational {
                    json!([{"role": "assistant", "content": text}])
                } else {
                    json!(text)
                }
            };
            if let Some(Some(w)) = j.winner {
                let row = json!({
                    "prompt": item.prompt,
                    "chosen": completion(&item.answers[w]),
                    "rejected": completion(&item.answers[1 - w]),
                });
                prefs.push_str(&format!("{row}\n"));
            }
            for s in 0..2 {
                if let Some(up) = j.thumbs[s] {
                    let row = json!({"prompt": item.prompt, "completion": completion(&item.answers[s]), "label": up});
                    kto.push_str(&format!("{row}\n"));
                }
            }
        }
        for (name, text) in [("preferences.jsonl", prefs), ("kto.jsonl", kto)] {
            let path = self.config.output_dir.join(name);
            temper_models::atomic::write_file_atomic(&path, text.as_bytes()).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Wins of each side (a tie is half a win to each) with Wilson intervals, thumbs and mean
    /// rubric scores.
    pub fn summary(&self) -> Value {
        let pairs = self.judgments.values().filter(|j| j.winner.is_some()).count();
        let ties = self.judgments.values().filter(|j| j.winner == Some(None)).count();
        let sides: Vec<Value> = (0..2)
            .map(|s| {
                let wins = self.judgments.values().filter(|j| j.winner == Some(Some(s))).count();
                let points = wins as f64 + ties as f64 / 2.0;
                let thumbs = |up: bool| self.judgments.values().filter(|j| j.thumbs[s] == Some(up)).count();
                let mut means = serde_json::Map::new();
                for c in &self.config.rubric {
                    let v: Vec<f64> = self.judgments.values().filter_map(|j| j.scores[s].get(&c.name)).map(|&x| x as f64).collect();
                    if !v.is_empty() {
                        means.insert(c.name.clone(), json!(v.iter().sum::<f64>() / v.len() as f64));
                    }
                }
                json!({
                    "name": self.sides[s],
                    "wins": wins,
                    "win_rate": (pairs > 0).then(|| points / pairs as f64),
                    "ci": scores::wilson(points, pairs).map(|(a, b)| [a, b]),
                    "thumbs_up": thumbs(true),
                    "thumbs_down": thumbs(false),
                    "scores": means,
                })
            })
            .collect();
        json!({"judged": self.judged(), "total": self.items.len(), "pairs": pairs, "ties": ties, "sides": sides})
    }

    /// The summary in one line per side, for the terminal.
    pub fn summary_text(&self) -> String {
        let s = self.summary();
        let mut out = format!("{} of {} judged, {} ties", s["judged"], s["total"], s["ties"]);
        for side in s["sides"].as_array().into_iter().flatten() {
            let rate = match (side["win_rate"].as_f64(), side["ci"].as_array()) {
                (Some(r), Some(ci)) => format!(
                    "{:.0}% ({:.0}-{:.0}%)",
                    100.0 * r,
                    100.0 * ci[0].as_f64().unwrap_or(0.0),
                    100.0 * ci[1].as_f64().unwrap_or(0.0)
                ),
                _ => "-".into(),
            };
            out.push_str(&format!(
                "; {}: {} wins, win rate {rate}, {} up / {} down",
                side["name"].as_str().unwrap_or(""),
                side["wins"],
                side["thumbs_up"],
                side["thumbs_down"]
            ));
        }
        out
    }
}

fn thumb(t: Option<bool>) -> Value {
    match t {
        None => Value::Null,
        Some(true) => json!("up"),
        Some(false) => json!("down"),
    }
}

/// A judgment by slot, as the page posts it.
fn to_slots(j: &Judgment, side_of_a: usize) -> Value {
    let slot = |s: usize| SLOTS[(s != side_of_a) as usize];
    let side = |slot_index: usize| if slot_index == 0 { side_of_a } else { 1 - side_of_a };
    json!({
        "choice": match j.winner { None => Value::Null, Some(None) => json!("tie"), Some(Some(s)) => json!(slot(s)) },
        "thumbs": {"A": thumb(j.thumbs[side(0)]), "B": thumb(j.thumbs[side(1)])},
        "scores": {"A": j.scores[side(0)], "B": j.scores[side(1)]},
        "comment": j.comment,
    })
}

/// A `feedback.jsonl` line back into (item index, judgment); `None` if it does not fit.
fn from_feedback(v: &Value, sides: &[String; 2], items: &[Item]) -> Option<(usize, Judgment)> {
    let id = v.get("id")?.as_str()?;
    let index = items.iter().position(|i| i.id == id)?;
    // A judgment of other answers (another evaluation's samples, other sides) is not this
    // item's, whatever its id.
    let answers = v.get("answers")?.as_object()?;
    let same = answers.len() == 2
        && (0..2).all(|s| answers.get(&sides[s]).and_then(Value::as_str) == Some(items[index].answers[s].as_str()));
    if !same {
        return None;
    }
    let side = |name: &str| sides.iter().position(|s| s == name);
    let winner = match v.get("winner")? {
        Value::Null => None,
        Value::String(s) if s == "tie" => Some(None),
        Value::String(s) => Some(Some(side(s)?)),
        _ => return None,
    };
    let mut thumbs = [None, None];
    let mut scores: [BTreeMap<String, u32>; 2] = Default::default();
    for s in 0..2 {
        thumbs[s] = match v.get("thumbs")?.get(&sides[s]) {
            Some(Value::String(t)) if t == "up" => Some(true),
            Some(Value::String(t)) if t == "down" => Some(false),
            _ => None,
        };
        if let Some(per) = v.get("scores")?.get(&sides[s]).and_then(Value::as_object) {
            for (k, n) in per {
                scores[s].insert(k.clone(), n.as_u64()? as u32);
            }
        }
    }
    let comment = v.get("comment").and_then(Value::as_str).unwrap_or_default().to_string();
    Some((
        index,
        Judgment {
            winner,
            thumbs,
            scores,
            comment,
        },
    ))
}

/// A prompt as messages of text for the page: a string is one message with role `prompt`;
/// content that is not text (a list of parts) is shown as its JSON.
fn prompt_messages(prompt: &Value) -> Value {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match prompt {
        Value::Array(turns) => Value::Array(
            turns
                .iter()
                .map(|t| json!({"role": t.get("role").map(text).unwrap_or_default(), "content": t.get("content").map(text).unwrap_or_default()}))
                .collect(),
        ),
        other => json!([{"role": "prompt", "content": text(other)}]),
    }
}

/// The items of `eval_samples.jsonl`: rows answered by both sides, in row order.
fn read_samples(config: &ReviewConfig) -> Result<([String; 2], Vec<Item>)> {
    let path = &config.samples;
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |n: usize, m: String| Error::config("samples", format!("{}: line {n}: {m}", path.display())).in_file(&config.file);
    let mut models: Vec<String> = Vec::new();
    // row -> (prompt, model -> output)
    let mut rows: BTreeMap<u64, (Value, BTreeMap<String, String>)> = BTreeMap::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).map_err(|e| bad(n + 1, format!("not JSON: {e}")))?;
        let Some(row) = v.get("row") else {
            continue; // a regression case, or another kind of line
        };
        let row = row.as_u64().ok_or_else(|| bad(n + 1, "`row` must be a row number".into()))?;
        let model = v.get("model").and_then(Value::as_str).ok_or_else(|| bad(n + 1, "no `model`".into()))?;
        let output = v.get("output").and_then(Value::as_str).ok_or_else(|| bad(n + 1, "no `output` text".into()))?;
        let prompt = v.get("prompt").cloned().ok_or_else(|| bad(n + 1, "no `prompt`".into()))?;
        if !models.iter().any(|m| m == model) {
            models.push(model.to_string());
        }
        let entry = rows.entry(row).or_insert_with(|| (prompt, BTreeMap::new()));
        entry.1.insert(model.to_string(), output.to_string());
    }
    let sides: [String; 2] = match &config.sides {
        Some(s) => {
            for name in s {
                if !models.contains(name) {
                    return Err(Error::config(
                        "sides",
                        format!("no answers from `{name}` in {}; it has {}", path.display(), models.join(", ")),
                    )
                    .in_file(&config.file));
                }
            }
            s.clone()
        }
        None if models.len() >= 2 => [models[0].clone(), models[1].clone()],
        None => {
            return Err(Error::config(
                "samples",
                format!(
                    "{}: answers from {} model(s) ({}); review compares two: run `temper eval` with an adapter",
                    path.display(),
                    models.len(),
                    models.join(", ")
                ),
            )
            .in_file(&config.file));
        }
    };
    let items: Vec<Item> = rows
        .into_iter()
        .filter_map(|(row, (prompt, outputs))| {
            let answers = [outputs.get(&sides[0])?.clone(), outputs.get(&sides[1])?.clone()];
            let id = row.to_string();
            Some(Item {
                side_of_a: (mix(config.seed ^ mix(row)) & 1) as usize,
                id,
                prompt,
                answers,
            })
        })
        .collect();
    if items.is_empty() {
        return Err(Error::config("samples", format!("{}: no row answered by both sides", path.display())).in_file(&config.file));
    }
    Ok((sides, items))
}

/// splitmix64's finalizer: which side shows first, a fair coin per item and seed.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s_config(dir: &Path) -> ReviewConfig {
        ReviewConfig {
            samples: dir.join("samples.jsonl"),
            output_dir: dir.join("out"),
            sides: None,
            rubric: vec![Criterion {
                name: "tone".into(),
                description: None,
                min: 1,
                max: 5,
            }],
            host: default_host(),
            port: 0,
            seed: 3,
            file: "review.yaml".into(),
        }
    }

    fn session(dir: &Path, samples: &str) -> Result<Session> {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("samples.jsonl"), samples).unwrap();
        Session::open(s_config(dir), &|_| {})
    }

    const SAMPLES: &str = concat!(
        r#"{"row": 0, "model": "base", "prompt": "Q0", "output": "b0"}"#,
        "\n",
        r#"{"row": 0, "model": "ad", "prompt": "Q0", "output": "a0"}"#,
        "\n",
        r#"{"row": 1, "model": "base", "prompt": [{"role": "user", "content": "Q1"}], "output": "b1"}"#,
        "\n",
        r#"{"row": 1, "model": "ad", "prompt": [{"role": "user", "content": "Q1"}], "output": "a1"}"#,
        "\n",
        r#"{"case": "c", "model": "ad", "output": "x"}"#,
        "\n",
    );

    #[test]
    fn judgments_map_slots_to_sides_and_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("temper-review-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = session(&dir, SAMPLES).unwrap();
        assert_eq!(s.sides, ["base".to_string(), "ad".to_string()]);
        assert_eq!(s.items.len(), 2);
        // Pick the adapter's answer, whichever slot shows it.
        let slot_of_ad = if s.items[1].side_of_a == 1 { "A" } else { "B" };
        s.judge(&json!({"id": "1", "choice": slot_of_ad, "thumbs": {slot_of_ad: "up"}, "scores": {slot_of_ad: {"tone": 4}}}))
            .unwrap()
            .unwrap();
        s.judge(&json!({"id": "0", "choice": "tie"})).unwrap().unwrap();
        let bad = [
            json!({"id": "9", "choice": "A"}),
            json!({"id": "0", "choice": "C"}),
            json!({"id": "0"}),
            json!({"id": "0", "comment": "  "}),
            json!({"id": "0", "scores": {"A": {"tone": 6}}}),
            json!({"id": "0", "scores": {"A": {"style": 3}}}),
            json!({"id": "0", "thumbs": {"A": "sideways"}}),
        ];
        for b in bad {
            assert!(s.judge(&b).is_err(), "{b}");
        }
        let prefs = std::fs::read_to_string(dir.join("out/preferences.jsonl")).unwrap();
        let row: Value = serde_json::from_str(prefs.lines().next().unwrap()).unwrap();
        assert_eq!(row["chosen"], json!([{"role": "assistant", "content": "a1"}]));
        assert_eq!(row["rejected"], json!([{"role": "assistant", "content": "b1"}]));
        assert_eq!(prefs.lines().count(), 1, "a tie makes no pair");
        let kto = std::fs::read_to_string(dir.join("out/kto.jsonl")).unwrap();
        assert!(kto.contains(r#""label":true"#) && kto.contains("a1"), "{kto}");
        let summary = s.summary();
        assert_eq!((summary["pairs"].as_u64(), summary["ties"].as_u64()), (Some(2), Some(1)));
        assert_eq!(summary["sides"][1]["win_rate"].as_f64(), Some(0.75));
        assert_eq!(summary["sides"][1]["scores"]["tone"].as_f64(), Some(4.0));
        drop(s);
        // A torn line at the end (killed mid-write) is skipped; the rest is kept.
        let fb = dir.join("out/feedback.jsonl");
        let mut text = std::fs::read_to_string(&fb).unwrap();
        text.push_str(r#"{"id": "0", "winn"#);
        std::fs::write(&fb, text).unwrap();
        let s = session(&dir, SAMPLES).unwrap();
        assert_eq!(s.judged(), 2);
        let state = s.state();
        assert_eq!(state["items"][1]["judgment"]["choice"], json!(slot_of_ad));
        assert_eq!(state["items"][0]["prompt"], json!([{"role": "prompt", "content": "Q0"}]));
        drop(s);
        // Other answers under the same ids (a new evaluation in the same directory) do not
        // inherit these judgments.
        let other = SAMPLES.replace("\"a1\"", "\"a1, again\"");
        std::fs::write(dir.join("samples.jsonl"), &other).unwrap();
        let s = Session::open(s_config(&dir), &|_| {}).unwrap();
        assert_eq!(s.judged(), 1, "row 1's answers changed: only row 0's tie is kept");
    }

    #[test]
    fn samples_that_cannot_be_reviewed_are_refused() {
        let dir = std::env::temp_dir().join(format!("temper-review-bad-{}", std::process::id()));
        let one = r#"{"row": 0, "model": "base", "prompt": "Q", "output": "b"}"#;
        let e = session(&dir, one).err().unwrap().to_string();
        assert!(e.contains("review compares two"), "{e}");
        let e = session(&dir, "{\"row\": 0, \"model\": \"base\"}\n").err().unwrap().to_string();
        assert!(e.contains("line 1: no `output`"), "{e}");
        let e = session(&dir, "not json\n").err().unwrap().to_string();
        assert!(e.contains("line 1: not JSON"), "{e}");
        // Someone's own preference file in the output directory is not overwritten.
        std::fs::create_dir_all(dir.join("out")).unwrap();
        std::fs::write(dir.join("out/preferences.jsonl"), "mine\n").unwrap();
        let e = session(&dir, SAMPLES).err().unwrap().to_string();
        assert!(e.contains("holds preferences.jsonl but no feedback.jsonl"), "{e}");
        assert_eq!(std::fs::read_to_string(dir.join("out/preferences.jsonl")).unwrap(), "mine\n");
    }
}
