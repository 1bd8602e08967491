//! Object keys as the runtimes' own JSON decoder matches them.
//!
//! libcni and its Go callers decode with `encoding/json`, which matches an
//! object key to a struct field ignoring case (an exact match first). Runtimes
//! rely on it: containerd's go-cni marshals its capability structs without
//! JSON tags, so a hostPort arrives as
//! `{"HostPort":8080,"ContainerPort":80,"Protocol":"tcp","HostIP":""}` and a
//! bandwidth annotation as `{"IngressRate":…,"IngressBurst":…}`. ferry reads
//! such keys the same way, ASCII case only (Go's Unicode folding would also
//! let the Kelvin sign stand for a `k`; nobody sends that on purpose).
//!
//! What ferry reads is still strictly typed, and a key that is there but
//! names nothing the plugin knows is refused: a mapping or a rate that a
//! plugin skipped silently would leave a pod unreachable or unshaped.

use crate::error::CniError;
use serde_json::{Map, Value};

/// The value of `key` in `obj`: the exact key, else the first key equal to it
/// ignoring ASCII case.
pub fn get_folded<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// `obj` with every key renamed to the spelling in `known` it matches
/// ignoring ASCII case, for a strictly typed decoder.
///
/// Code 7 (invalid config), with `what` naming the object in the message,
/// for a key that matches none of `known` and for two keys that name the
/// same field (`"hostPort"` and `"HostPort"`: which one the runtime meant is
/// not ferry's guess to make).
pub fn fold_keys(
    obj: &Map<String, Value>,
    known: &[&str],
    what: &str,
) -> Result<Map<String, Value>, CniError> {
    let mut out = Map::with_capacity(obj.len());
    for (key, value) in obj {
        let Some(canonical) = known.iter().find(|k| k.eq_ignore_ascii_case(key)) else {
            return Err(CniError::invalid_config(format!(
                "{what}: unknown key {key:?} (known: {})",
                known.join(", ")
            )));
        };
        if out
            .insert((*canonical).to_string(), value.clone())
            .is_some()
        {
            return Err(CniError::invalid_config(format!(
                "{what}: {canonical:?} is given twice (keys are matched ignoring case)"
            )));
        }
    }
    Ok(out)
}

/// Keys of `obj` that match none of `known` ignoring ASCII case, in order.
pub fn unknown_keys<'a>(obj: &'a Map<String, Value>, known: &[&str]) -> Vec<&'a str> {
    obj.keys()
        .filter(|k| !known.iter().any(|n| n.eq_ignore_ascii_case(k)))
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().expect("object").clone()
    }

    #[test]
    fn exact_key_wins_over_folded() {
        let o = obj(json!({"HOSTPORT": 1, "hostPort": 2, "Other": 3}));
        assert_eq!(get_folded(&o, "hostPort"), Some(&json!(2)));
        assert_eq!(get_folded(&o, "other"), Some(&json!(3)));
        assert_eq!(get_folded(&o, "missing"), None);
        // Not a prefix or substring match.
        assert_eq!(get_folded(&o, "host"), None);
    }

    #[test]
    fn folds_go_cni_spellings() {
        let o =
            obj(json!({"HostPort": 38180, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""}));
        let known = ["hostPort", "containerPort", "protocol", "hostIP"];
        let folded = fold_keys(&o, &known, "portMappings[0]").unwrap();
        assert_eq!(
            Value::Object(folded),
            json!({"hostPort": 38180, "containerPort": 80, "protocol": "tcp", "hostIP": ""})
        );
    }

    #[test]
    fn refuses_unknown_and_duplicate_keys() {
        let known = ["hostPort", "containerPort"];
        let e = fold_keys(&obj(json!({"hostPort": 1, "Range": 2})), &known, "m").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert!(e.msg.contains("\"Range\""), "{}", e.msg);
        let e = fold_keys(&obj(json!({"hostPort": 1, "HostPort": 2})), &known, "m").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert!(e.msg.contains("twice"), "{}", e.msg);
        // Non-ASCII look-alikes are not folded (the Kelvin sign is not a k).
        let e = fold_keys(&obj(json!({"hostPort": 1, "\u{212a}": 2})), &["k"], "m").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
    }

    #[test]
    fn lists_unknown_keys() {
        let o = obj(json!({"PortMappings": [], "bandwidth": {}, "cgroupPath": "/x"}));
        assert_eq!(
            unknown_keys(&o, &["portMappings", "bandwidth"]),
            vec!["cgroupPath"]
        );
    }
}
