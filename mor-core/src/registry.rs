//! Plugin registry over `inventory`.
//!
//! A plugin is an implementation of one of the four plugin traits that a config selects by
//! name. Every plugin submits one [`PluginInfo`] (collected here, so configuration can be
//! resolved and listed without knowing the family traits) and one typed entry of its family
//! (collected by the family crate, used to build the plugin). Both are submitted by the
//! family's `register_*!` macro, e.g. `mor_router::register_router!(MyRouter)`.
//!
//! # Linking
//! `rustc` does not link an rlib that nothing references, and an unlinked crate contributes
//! no entries. Every binary and test that resolves plugins by name must name each plugin
//! crate once (`use my_plugins as _;`). A failed lookup says so.

use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt;

/// The four plugin families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// `mor_router::Router`: decides which tokens take each recursion step.
    Router,
    /// `mor_core::sharing::SharingStrategy`: maps layer slots to unique parameter blocks.
    SharingStrategy,
    /// `mor_kvcache::KvPolicy`: which keys and values each recursion step attends to.
    KvPolicy,
    /// `mor_kernels::Backend`: the compute backend of the hot path.
    Backend,
}

impl Family {
    /// Every family, in listing order.
    pub const ALL: [Family; 4] = [
        Family::SharingStrategy,
        Family::Router,
        Family::KvPolicy,
        Family::Backend,
    ];

    /// The snake_case name used in messages and in `cargo xtask list`.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Router => "router",
            Family::SharingStrategy => "sharing",
            Family::KvPolicy => "kv_policy",
            Family::Backend => "backend",
        }
    }

    /// The macro a plugin author uses to register into this family.
    pub fn register_macro(self) -> &'static str {
        match self {
            Family::Router => "mor_router::register_router!",
            Family::SharingStrategy => "mor_core::register_sharing!",
            Family::KvPolicy => "mor_kvcache::register_kv_policy!",
            Family::Backend => "mor_kernels::register_backend!",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Facts about the run that a plugin's cross-field check may consult.
#[derive(Debug, Clone, Default)]
pub struct CheckCtx {
    /// Number of recursion steps `N_r` (1 for vanilla).
    pub num_recursions: usize,
    /// Training sequence length `L`.
    pub seq_len: usize,
    /// Hidden size `d`.
    pub hidden_size: usize,
    /// Name of the router kind in use, if any (`None` for vanilla and recursive baselines).
    pub router: Option<String>,
    /// Name of the sharing strategy in use.
    pub sharing: String,
}

/// One problem found by a plugin's own parameter check: a field path relative to the plugin
/// slot (e.g. `capacity`), the offending value and what is allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamProblem {
    /// Field inside the plugin's parameters, e.g. `capacity`.
    pub field: String,
    /// The bad value, rendered as TOML/Debug text.
    pub value: String,
    /// What is allowed instead.
    pub allowed: String,
}

/// The family-independent part of a plugin: what a config needs to resolve and list it.
///
/// Implemented by every plugin type through its family trait (`RouterPlugin`, ...).
pub trait Plugin: 'static {
    /// The family the plugin belongs to.
    const FAMILY: Family;
    /// Stable snake_case name used as `kind = "..."` in configs.
    const NAME: &'static str;
    /// One line shown by `cargo xtask list`.
    const DESCRIPTION: &'static str;
    /// Typed parameters, deserialized from the plugin slot minus `kind`. Implementations
    /// should use `#[serde(deny_unknown_fields, default)]`.
    type Params: DeserializeOwned + serde::Serialize + Default + fmt::Debug;

    /// Cross-field checks of the parameters against the rest of the run (stage 3 of
    /// resolution). The default accepts everything.
    fn check(_params: &Self::Params, _ctx: &CheckCtx) -> Vec<ParamProblem> {
        Vec::new()
    }

    /// What FLOPs and KV accounting (spec §1.4, §4) needs to know of this plugin. The
    /// default says nothing (every token runs every step, no KV sharing).
    fn accounting(_params: &Self::Params, _ctx: &CheckCtx) -> AccountingHints {
        AccountingHints::default()
    }
}

/// Facts a plugin contributes to FLOPs and KV accounting.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccountingHints {
    /// Fraction of the sequence that runs each recursion step (`cap_r`, one per step), for
    /// routers. `None`: every token runs every step.
    pub capacities: Option<Vec<f64>>,
    /// For KV policies: steps >= 2 reuse the step-1 K/V (no K/V projection, queries attend
    /// over the full cached context; spec §1.4).
    pub kv_sharing: bool,
    /// For KV policies: the queries of steps >= 2 attend over the full causal context (`L`
    /// keys, `k·(L+1)/2` query-key pairs) although the step projects K/V of its own, as
    /// hybrid sharing does (spec §4). Implied by `kv_sharing`.
    pub kv_full_context: bool,
}

/// Deserializes `params` into `P`, returning the serde message on failure.
pub fn parse_params<P: DeserializeOwned>(params: &toml::Table) -> std::result::Result<P, String> {
    P::deserialize(toml::Value::Table(params.clone())).map_err(|e| e.message().trim().to_string())
}

fn validate_erased<T: Plugin>(params: &toml::Table) -> std::result::Result<toml::Table, String> {
    let p: T::Params = parse_params(params)?;
    // Normalise: round-trip through the typed params so defaults are filled in.
    match toml::Value::try_from(&p) {
        Ok(toml::Value::Table(t)) => Ok(t),
        Ok(other) => Err(format!(
            "parameters serialised to a non-table value {other}"
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn check_erased<T: Plugin>(params: &toml::Table, ctx: &CheckCtx) -> Vec<ParamProblem> {
    match parse_params::<T::Params>(params) {
        Ok(p) => T::check(&p, ctx),
        Err(_) => Vec::new(), // reported by `validate`
    }
}

fn accounting_erased<T: Plugin>(params: &toml::Table, ctx: &CheckCtx) -> AccountingHints {
    match parse_params::<T::Params>(params) {
        Ok(p) => T::accounting(&p, ctx),
        Err(_) => AccountingHints::default(),
    }
}

/// Registry entry common to all families, collected by `inventory`.
#[derive(Clone, Copy)]
pub struct PluginInfo {
    /// Family of the plugin.
    pub family: Family,
    /// snake_case name (`kind = "..."`).
    pub name: &'static str,
    /// One-line description.
    pub description: &'static str,
    /// Cargo package that registered the plugin.
    pub crate_name: &'static str,
    /// Module path of the registration.
    pub module: &'static str,
    /// Parses the parameters (unknown fields rejected) and returns them with defaults filled.
    pub validate: fn(&toml::Table) -> std::result::Result<toml::Table, String>,
    /// Cross-field checks (stage 3).
    pub check: fn(&toml::Table, &CheckCtx) -> Vec<ParamProblem>,
    /// Accounting hints for validated parameters.
    pub accounting: fn(&toml::Table, &CheckCtx) -> AccountingHints,
}

impl fmt::Debug for PluginInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginInfo")
            .field("family", &self.family)
            .field("name", &self.name)
            .field("crate_name", &self.crate_name)
            .field("module", &self.module)
            .finish()
    }
}

impl PluginInfo {
    /// The entry for plugin type `T`, registered from `crate_name`/`module`.
    pub const fn of<T: Plugin>(crate_name: &'static str, module: &'static str) -> Self {
        PluginInfo {
            family: T::FAMILY,
            name: T::NAME,
            description: T::DESCRIPTION,
            crate_name,
            module,
            validate: validate_erased::<T>,
            check: check_erased::<T>,
            accounting: accounting_erased::<T>,
        }
    }
}

inventory::collect!(PluginInfo);

/// A failed registry lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// No plugin of that family has this name.
    #[error(
        "unknown {family} `{name}`; registered {family} plugins: {}. A plugin from another crate is \
         only visible when that crate is linked: add `use <plugin_crate> as _;` to your binary \
         or test (see README, \"Writing your own strategy\")",
        if registered.is_empty() { "(none)".to_string() } else { registered.join(", ") }
    )]
    Unknown {
        /// The family searched.
        family: Family,
        /// The name asked for.
        name: String,
        /// Every registered name of that family, sorted.
        registered: Vec<String>,
    },
    /// Two plugins of one family share a name.
    #[error("duplicate {family} name `{name}`: registered by `{first}` and by `{second}`")]
    Duplicate {
        /// The family.
        family: Family,
        /// The shared name.
        name: String,
        /// Module path of one registration.
        first: String,
        /// Module path of the other.
        second: String,
    },
}

/// Every registered plugin of `family`, sorted by name.
pub fn plugins(family: Family) -> Vec<&'static PluginInfo> {
    let mut v: Vec<_> = inventory::iter::<PluginInfo>
        .into_iter()
        .filter(|p| p.family == family)
        .collect();
    v.sort_by(|a, b| a.name.cmp(b.name).then(a.module.cmp(b.module)));
    v
}

/// Sorted names registered in `family`.
pub fn names(family: Family) -> Vec<String> {
    let mut v: Vec<String> = plugins(family).iter().map(|p| p.name.to_string()).collect();
    v.dedup();
    v
}

/// Looks up a plugin by name. Fails with the list of registered names, or with both module
/// paths when the name is registered twice.
pub fn find(family: Family, name: &str) -> std::result::Result<&'static PluginInfo, RegistryError> {
    let hits: Vec<_> = plugins(family)
        .into_iter()
        .filter(|p| p.name == name)
        .collect();
    match hits.as_slice() {
        [one] => Ok(one),
        [] => Err(RegistryError::Unknown {
            family,
            name: name.to_string(),
            registered: names(family),
        }),
        [a, b, ..] => Err(RegistryError::Duplicate {
            family,
            name: name.to_string(),
            first: a.module.to_string(),
            second: b.module.to_string(),
        }),
    }
}

/// Every duplicate name across all families.
pub fn duplicates() -> Vec<RegistryError> {
    let mut seen: BTreeMap<(Family, &str), &PluginInfo> = BTreeMap::new();
    let mut out = Vec::new();
    for p in inventory::iter::<PluginInfo> {
        if let Some(first) = seen.get(&(p.family, p.name)) {
            out.push(RegistryError::Duplicate {
                family: p.family,
                name: p.name.to_string(),
                first: first.module.to_string(),
                second: p.module.to_string(),
            });
        } else {
            seen.insert((p.family, p.name), p);
        }
    }
    out
}

/// Finds a typed family entry by name among `entries` (the family's own `inventory`
/// collection), with the same error reporting as [`find`].
pub fn find_typed<'a, E>(
    family: Family,
    name: &str,
    entries: impl IntoIterator<Item = &'a E>,
    entry_name: impl Fn(&E) -> &'static str,
) -> std::result::Result<&'a E, RegistryError>
where
    E: 'a,
{
    find(family, name)?;
    entries
        .into_iter()
        .find(|e| entry_name(e) == name)
        .ok_or_else(|| RegistryError::Unknown {
            family,
            name: name.to_string(),
            registered: names(family),
        })
}
