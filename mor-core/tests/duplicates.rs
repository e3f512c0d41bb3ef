//! Two registrations of one name in one family are reported with both module paths, by
//! lookup and by `duplicates()`, while other names still resolve.

use mor_core::registry::{self, Family, Plugin, RegistryError};
use mor_core::PluginInfo;

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

struct First;
struct Second;

impl Plugin for First {
    const FAMILY: Family = Family::Backend;
    const NAME: &'static str = "twin";
    const DESCRIPTION: &'static str = "first registration";
    type Params = Empty;
}

impl Plugin for Second {
    const FAMILY: Family = Family::Backend;
    const NAME: &'static str = "twin";
    const DESCRIPTION: &'static str = "second registration";
    type Params = Empty;
}

mor_core::__private::inventory::submit! { PluginInfo::of::<First>("dup-tests", "dup_tests::first") }
mor_core::__private::inventory::submit! { PluginInfo::of::<Second>("dup-tests", "dup_tests::second") }

#[test]
fn duplicate_names_are_reported_with_both_modules() {
    let err = registry::find(Family::Backend, "twin").unwrap_err();
    assert!(matches!(err, RegistryError::Duplicate { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("dup_tests::first") && msg.contains("dup_tests::second"),
        "{msg}"
    );
    let all = registry::duplicates();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(registry::names(Family::Backend), vec!["twin".to_string()]);
    // The sharing family is unaffected.
    assert!(registry::find(Family::SharingStrategy, "middle_cycle").is_ok());
}
