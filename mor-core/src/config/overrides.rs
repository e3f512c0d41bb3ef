//! Dotted-key overrides applied to the raw TOML before resolution (`router.kind =
//! "token_choice"`, `train.lr = 1e-3`), as an ablation grid or a command line sets them.

use crate::error::{ConfigProblem, Error, Result};

fn problem(key: &str, value: String, allowed: impl Into<String>) -> Error {
    Error::Config(vec![ConfigProblem {
        field: key.to_string(),
        value,
        allowed: allowed.into(),
    }])
}

/// Sets the dotted key `key` of `table` to `value`, creating intermediate tables.
///
/// A plugin slot written as a string shorthand (`sharing = "cycle"`) becomes
/// `{ kind = "cycle" }` when a key below it is set. Parameters of a slot are kept when its
/// `kind` changes, and are validated against the new kind.
///
/// # Errors
/// [`Error::Config`] when the key is empty, has an empty segment, or runs through a value
/// that is neither a table nor a plugin-name string.
///
/// # Examples
/// ```
/// let mut t: toml::Table = "[router]\nkind = \"expert_choice\"".parse().unwrap();
/// mor_core::config::apply_override(&mut t, "router.kind", "token_choice".into()).unwrap();
/// mor_core::config::apply_override(&mut t, "train.lr", 1e-3.into()).unwrap();
/// assert_eq!(t["router"]["kind"].as_str(), Some("token_choice"));
/// assert_eq!(t["train"]["lr"].as_float(), Some(1e-3));
/// ```
pub fn apply_override(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.trim().is_empty()) {
        return Err(problem(
            key,
            super::raw::render(&value),
            "a dotted key such as `router.kind` or `train.lr`",
        ));
    }
    let Some((last, parents)) = parts.split_last() else {
        return Err(problem(
            key,
            super::raw::render(&value),
            "a dotted key such as `router.kind`",
        ));
    };
    let mut cur = table;
    for (i, p) in parents.iter().enumerate() {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::String(kind) = entry {
            let mut t = toml::Table::new();
            t.insert(
                "kind".to_string(),
                toml::Value::String(std::mem::take(kind)),
            );
            *entry = toml::Value::Table(t);
        }
        cur = match entry {
            toml::Value::Table(t) => t,
            other => {
                let at = parts[..=i].join(".");
                return Err(problem(
                    &at,
                    super::raw::render(other),
                    format!("cannot set `{key}`: `{at}` is not a table"),
                ));
            }
        };
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

/// Parses `key=value` (as on a command line): the value is read as a TOML value
/// (`3`, `1e-3`, `true`, `[1, 0.5]`, `{ kind = "cycle" }`, `"text"`), and a bare word that is
/// not valid TOML is taken as a string (`router.kind=token_choice`).
///
/// # Errors
/// [`Error::Config`] when there is no `=` or the key is empty.
///
/// # Examples
/// ```
/// let (k, v) = mor_core::config::parse_override("train.lr=1e-3").unwrap();
/// assert_eq!((k.as_str(), v.as_float()), ("train.lr", Some(1e-3)));
/// let (_, v) = mor_core::config::parse_override("router.kind=token_choice").unwrap();
/// assert_eq!(v.as_str(), Some("token_choice"));
/// ```
pub fn parse_override(s: &str) -> Result<(String, toml::Value)> {
    let Some((key, raw)) = s.split_once('=') else {
        return Err(problem(
            s,
            "(no `=`)".to_string(),
            "an override `key=value`, e.g. `router.kind=token_choice`",
        ));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(problem(
            s,
            "(empty key)".to_string(),
            "an override `key=value`, e.g. `train.lr=1e-3`",
        ));
    }
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    Ok((key.to_string(), value))
}
