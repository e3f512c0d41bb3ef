//! `cargo xtask list`: every registered plugin by family, sorted by name, with the crate
//! that registered it and its one-line description; duplicate names and missing built-ins
//! are reported as warnings.

use mor_core::registry::{self, Family};
use serde::Serialize;

/// Flags of `list`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON (one object per plugin) instead of a table.
    #[arg(long)]
    json: bool,
}

/// One listed plugin.
#[derive(Debug, Serialize)]
struct Entry {
    family: Family,
    name: &'static str,
    #[serde(rename = "crate")]
    crate_name: &'static str,
    module: &'static str,
    description: &'static str,
}

/// Every registered plugin, in family order and then by name.
fn entries() -> Vec<Entry> {
    Family::ALL
        .iter()
        .flat_map(|&f| registry::plugins(f))
        .map(|p| Entry {
            family: p.family,
            name: p.name,
            crate_name: p.crate_name,
            module: p.module,
            description: p.description,
        })
        .collect()
}

/// Runs `list`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    for dup in registry::duplicates() {
        eprintln!("warning: {dup}");
    }
    for (family, name) in mor_models::builtin::missing() {
        eprintln!("warning: built-in {family} `{name}` is not registered (is its crate linked?)");
    }
    let entries = entries();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    let name_w = entries.iter().map(|e| e.name.len()).max().unwrap_or(4);
    let crate_w = entries
        .iter()
        .map(|e| e.crate_name.len())
        .max()
        .unwrap_or(5);
    for family in Family::ALL {
        println!("{family}");
        let of_family: Vec<&Entry> = entries.iter().filter(|e| e.family == family).collect();
        if of_family.is_empty() {
            println!("  (none registered)");
        }
        for e in of_family {
            println!(
                "  {:name_w$}  {:crate_w$}  {}",
                e.name, e.crate_name, e.description
            );
        }
    }
    Ok(())
}
