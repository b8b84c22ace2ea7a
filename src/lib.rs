//! The `temper` binary's support code: backend selection and the subcommands. The work itself
//! lives in the workspace crates (`temper-models`, ...).

pub mod backend;
pub mod data;
pub mod eval;
pub mod export;
pub mod generate;
pub mod launch;
pub mod merge;
pub mod push;
pub mod review;
pub mod score;
pub mod stop;
pub mod train;

/// `--set KEY=VALUE` for a flag's value: the value as JSON (which YAML reads back unchanged).
/// Paths are given as their display strings.
pub(crate) fn set(overrides: &mut Vec<String>, key: &str, value: impl Into<serde_json::Value>) {
    overrides.push(format!("{key}={}", value.into()));
}
