//! The built-in policies are registered and build by name.

use crate::common::kv_ctx;
use mor_core::registry::{find, names, Family};
use mor_kvcache::{build_kv_policy, Error};

#[test]
fn built_in_policies_are_registered() {
    let n = names(Family::KvPolicy);
    for name in ["hybrid", "recursion_wise", "recursive_sharing"] {
        assert!(n.iter().any(|x| x == name), "{name} missing from {n:?}");
        let p = build_kv_policy(name, &toml::Table::new(), &kv_ctx(3)).unwrap();
        assert_eq!(p.name(), name);
        assert_eq!(
            find(Family::KvPolicy, name).unwrap().crate_name,
            "mor-kvcache"
        );
    }
}

#[test]
fn unknown_names_and_fields_are_errors() {
    let err = build_kv_policy("recursive_share", &toml::Table::new(), &kv_ctx(3)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("recursive_sharing") && msg.contains("recursion_wise"),
        "{msg}"
    );
    let mut t = toml::Table::new();
    t.insert("update_cache".to_string(), toml::Value::Boolean(true));
    assert!(matches!(
        build_kv_policy("hybrid", &t, &kv_ctx(3)),
        Err(Error::Core(_))
    ));
    let info = find(Family::KvPolicy, "hybrid").unwrap();
    assert!((info.validate)(&t).is_err());
    assert_eq!(
        (info.validate)(&toml::Table::new()).unwrap(),
        toml::Table::new()
    );
    assert!(matches!(
        build_kv_policy("recursion_wise", &toml::Table::new(), &kv_ctx(0)),
        Err(Error::Invalid { .. })
    ));
}
