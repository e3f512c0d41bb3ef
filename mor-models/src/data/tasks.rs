//! Multiple-choice tasks in the lm-eval style: a context, candidate continuations and the index
//! of the right one. The evaluator scores each choice by its log-likelihood after the context;
//! this module only parses and validates them.

use super::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One multiple-choice item: `context` followed by one of `choices`; `choices[gold]` is right.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McTask {
    /// The text before the continuation (no trailing space by convention).
    pub context: String,
    /// Candidate continuations (each usually starting with a space).
    pub choices: Vec<String>,
    /// Index of the right continuation in `choices`.
    pub gold: usize,
}

/// A named list of [`McTask`] items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McTaskSet {
    /// The task name (e.g. `arithmetic`, or the file stem of a loaded file).
    pub name: String,
    /// The items.
    pub items: Vec<McTask>,
}

/// Parses one JSON line `{"context": str, "choices": [str], "gold": int}`; other fields are
/// ignored. The context and every choice must hold non-whitespace text. Returns the message
/// of what is wrong.
fn parse_line(line: &str) -> std::result::Result<McTask, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("expected a JSON object")?;
    let context = match obj.get("context") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => return Err("field `context` is not a string".into()),
        None => return Err("missing field `context`".into()),
    };
    // An empty context or choice has no token to score: every choice would get the same
    // (zero) log-likelihood and the item would count as right, so it is refused.
    if context.trim().is_empty() {
        return Err(format!(
            "field `context` is {:?}: it must hold text (not empty or only whitespace)",
            context
        ));
    }
    let choices = match obj.get("choices") {
        Some(serde_json::Value::Array(xs)) => xs
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or(format!("choices[{i}] is not a string"))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        Some(_) => return Err("field `choices` is not an array".into()),
        None => return Err("missing field `choices`".into()),
    };
    if let Some((i, c)) = choices
        .iter()
        .enumerate()
        .find(|(_, c)| c.trim().is_empty())
    {
        return Err(format!(
            "choices[{i}] is {c:?}: every choice must hold text (not empty or only whitespace)"
        ));
    }
    if choices.len() < 2 {
        return Err(format!(
            "`choices` needs at least 2 entries, got {}",
            choices.len()
        ));
    }
    let gold = match obj.get("gold") {
        Some(g) => g.as_u64().ok_or(format!(
            "field `gold` must be a non-negative integer, got {g}"
        ))?,
        None => return Err("missing field `gold`".into()),
    };
    if gold as usize >= choices.len() {
        return Err(format!(
            "`gold` = {gold} is out of range for {} choices",
            choices.len()
        ));
    }
    Ok(McTask {
        context,
        choices,
        gold: gold as usize,
    })
}

/// Reads a JSONL file of multiple-choice items, one `{"context", "choices", "gold"}` object
/// per line (blank lines are skipped). The set is named after the file stem.
///
/// # Errors
/// When the file cannot be read, a line is not valid (including an empty or whitespace-only
/// `context` or choice), or the file has no item; the message names the file, the 1-based
/// line and the field.
pub fn load_mc_tasks(path: &Path) -> Result<McTaskSet> {
    if !path.exists() {
        return Err(Error::MissingPath {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item = parse_line(line).map_err(|msg| Error::McTask {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        })?;
        items.push(item);
    }
    if items.is_empty() {
        return Err(Error::McTask {
            path: path.to_path_buf(),
            line: 0,
            msg: "the file has no item".into(),
        });
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(McTaskSet { name, items })
}
