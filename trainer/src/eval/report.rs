//! What an evaluation writes: `eval.json` (every measure with its count and interval, the
//! regression cases), `eval.md` (the same as tables), `eval_samples.jsonl` (each row's answer
//! from each model, with its scores), and the evaluation section of the model card.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{Case, EvalConfig, Measure};
use crate::error::{Error, Result};

/// One model's measures, in the order they were taken.
#[derive(Debug, Clone)]
pub struct VariantReport {
    pub name: String,
    pub adapter: Option<PathBuf>,
    pub metrics: Vec<(String, Measure)>,
}

/// A regression case's answer from one model.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub output: String,
    pub failures: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct CaseReport {
    pub id: String,
    pub prompt: Value,
    /// Model name to its result.
    pub results: BTreeMap<String, CaseResult>,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub model: PathBuf,
    pub data: Value,
    pub rows: usize,
    pub generation: Value,
    pub variants: Vec<VariantReport>,
    pub cases: Vec<CaseReport>,
}

impl Report {
    pub(super) fn new(config: &EvalConfig, rows: usize) -> Self {
        Self {
            model: config.model.clone(),
            data: serde_json::to_value(&config.data).expect("the data config serializes"),
            rows,
            generation: serde_json::to_value(&config.generation).expect("serializes"),
            variants: Vec::new(),
            cases: Vec::new(),
        }
    }

    pub(super) fn add_cases(&mut self, model: &str, cases: &[Case], answers: &[String]) {
        for (case, answer) in cases.iter().zip(answers) {
            let at = match self.cases.iter().position(|c| c.id == case.id) {
                Some(i) => i,
                None => {
                    self.cases.push(CaseReport {
                        id: case.id.clone(),
                        prompt: case.row.raw_prompt.clone(),
                        results: BTreeMap::new(),
                    });
                    self.cases.len() - 1
                }
            };
            self.cases[at].results.insert(
                model.to_string(),
                CaseResult {
                    output: answer.clone(),
                    failures: case.failures(answer),
                },
            );
        }
    }

    /// The models that fail a case the base passes.
    pub fn worse_than_base(&self, case: &CaseReport) -> Vec<&str> {
        let base_passes = case.results.get("base").is_some_and(|r| r.failures.is_empty());
        if !base_passes {
            return Vec::new();
        }
        self.variants
            .iter()
            .filter(|v| v.name != "base")
            .filter(|v| case.results.get(&v.name).is_some_and(|r| !r.failures.is_empty()))
            .map(|v| v.name.as_str())
            .collect()
    }

    /// Cases in reporting order: those where an adapter is worse than the base first, then
    /// those some model fails, then the rest (each group in file order).
    pub fn ordered_cases(&self) -> Vec<&CaseReport> {
        let rank = |c: &CaseReport| {
            if !self.worse_than_base(c).is_empty() {
                0
            } else if c.results.values().any(|r| !r.failures.is_empty()) {
                1
            } else {
                2
            }
        };
        let mut cases: Vec<&CaseReport> = self.cases.iter().collect();
        cases.sort_by_key(|c| rank(c));
        cases
    }

    pub fn to_json(&self) -> Value {
        let variants: Vec<Value> = self
            .variants
            .iter()
            .map(|v| {
                let metrics: serde_json::Map<String, Value> = v
                    .metrics
                    .iter()
                    .map(|(n, m)| (n.clone(), serde_json::to_value(m).expect("serializes")))
                    .collect();
                json!({"name": v.name, "adapter": v.adapter, "metrics": metrics})
            })
            .collect();
        let cases: Vec<Value> = self
            .ordered_cases()
            .into_iter()
            .map(|c| {
                let results: serde_json::Map<String, Value> = c
                    .results
                    .iter()
                    .map(|(m, r)| (m.clone(), json!({"pass": r.failures.is_empty(), "failures": r.failures, "output": r.output})))
                    .collect();
                json!({"id": c.id, "prompt": c.prompt, "worse_than_base": self.worse_than_base(c), "results": results})
            })
            .collect();
        json!({
            "model": self.model, "data": self.data, "rows": self.rows, "generation": self.generation,
            "variants": variants, "regression": cases,
        })
    }

    /// Writes `eval.json`, `eval.md` and `eval_samples.jsonl` into `dir`, and the evaluation
    /// into `dir`'s model card when it has one.
    pub(super) fn write(&self, dir: &Path, samples: &[Value]) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            temper_models::atomic::write_file_atomic(&path, bytes).map_err(|e| Error::io(&path, e))
        };
        write("eval.json", format!("{:#}\n", self.to_json()).as_bytes())?;
        let md = markdown(self);
        write("eval.md", md.as_bytes())?;
        let mut lines = String::new();
        for s in samples {
            lines.push_str(&s.to_string());
            lines.push('\n');
        }
        write("eval_samples.jsonl", lines.as_bytes())?;
        update_model_card(dir, &md)
    }
}

/// A measure as the tables show it: 3 decimals (BLEU/chrF and perplexity 2), the interval
/// in parentheses.
fn cell(name: &str, m: &Measure) -> String {
    let digits = if name.contains("bleu") || name.contains("chrf") || name == "perplexity" { 2 } else { 3 };
    match m.ci {
        Some([lo, hi]) => format!("{:.d$} ({:.d$}–{:.d$})", m.value, lo, hi, d = digits),
        None => format!("{:.d$}", m.value, d = digits),
    }
}

/// The report as Markdown: one table of measures (a column per model), then the regression
/// cases, the ones where an adapter is worse than the base first.
pub fn markdown(report: &Report) -> String {
    let mut md = String::new();
    let names: Vec<&str> = report.variants.iter().map(|v| v.name.as_str()).collect();
    let _ = writeln!(md, "| metric | n | {} |", names.join(" | "));
    let _ = writeln!(md, "|---|---:|{}", "---:|".repeat(names.len()));
    let mut metrics: Vec<&str> = Vec::new();
    for v in &report.variants {
        for (n, _) in &v.metrics {
            if !metrics.contains(&n.as_str()) {
                metrics.push(n);
            }
        }
    }
    for metric in metrics {
        let found: Vec<Option<&Measure>> = report
            .variants
            .iter()
            .map(|v| v.metrics.iter().find(|(n, _)| n == metric).map(|(_, m)| m))
            .collect();
        let count = found.iter().flatten().map(|m| m.count).max().unwrap_or(0);
        let label = if metric == "loss" || metric == "perplexity" { format!("{count} tokens") } else { count.to_string() };
        let cells: Vec<String> = found.iter().map(|m| m.map_or("–".into(), |m| cell(metric, m))).collect();
        let _ = writeln!(md, "| {metric} | {label} | {} |", cells.join(" | "));
    }
    if !report.cases.is_empty() {
        let _ = writeln!(md, "\nRegression cases (worse than the base first):\n");
        let _ = writeln!(md, "| case | {} |", names.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(names.len()));
        for case in report.ordered_cases() {
            let worse = report.worse_than_base(case);
            let cells: Vec<String> = names
                .iter()
                .map(|n| match case.results.get(*n) {
                    Some(r) if r.failures.is_empty() => "pass".to_string(),
                    Some(r) => format!("FAIL: {}", r.failures.join("; ").replace('|', "\\|")),
                    None => "–".into(),
                })
                .collect();
            let id = if worse.is_empty() { case.id.clone() } else { format!("{} (worse)", case.id) };
            let _ = writeln!(md, "| {} | {} |", id.replace('|', "\\|"), cells.join(" | "));
        }
    }
    md
}

const CARD_START: &str = "<!-- temper eval -->";
const CARD_END: &str = "<!-- /temper eval -->";

/// Puts the evaluation tables into `dir/README.md` (a training output's model card), in
/// place of the previous evaluation's; a directory without a card is left alone.
pub fn update_model_card(dir: &Path, tables: &str) -> Result<()> {
    let path = dir.join("README.md");
    // Only a training output's card (beside its adapter or model), never another README.
    let trained = dir.join("adapter_config.json").is_file() || dir.join("config.json").is_file();
    let Ok(card) = std::fs::read_to_string(&path).map_err(|_| ()).and_then(|c| if trained { Ok(c) } else { Err(()) }) else {
        return Ok(());
    };
    let section = format!(
        "{CARD_START}\n## Evaluation\n\nFrom `temper eval` (95% intervals in parentheses; `eval.json` has every \
         number):\n\n{tables}{CARD_END}\n"
    );
    let updated = match (card.find(CARD_START), card.find(CARD_END)) {
        (Some(a), Some(b)) if b > a => format!("{}{section}{}", &card[..a], card[b + CARD_END.len()..].trim_start_matches('\n')),
        // A section whose end marker was deleted runs to the end of the card.
        (Some(a), _) => format!("{}{section}", &card[..a]),
        _ => format!("{}\n\n{section}", card.trim_end()),
    };
    temper_models::atomic::write_file_atomic(&path, updated.as_bytes()).map_err(|e| Error::io(&path, e))
}
