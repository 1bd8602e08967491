//! CNI_ARGS and the validation of every runtime-supplied value that ends up
//! in an interface name or a file path.

use crate::error::CniError;

/// `CNI_ARGS`: `K=V;K2=V2`, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pairs: Vec<(String, String)>,
}

impl CniArgs {
    pub fn parse(s: &str) -> Result<CniArgs, CniError> {
        let mut pairs = Vec::new();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(CniError::invalid_env(format!(
                    "CNI_ARGS: invalid pair {pair:?}"
                )));
            };
            if k.is_empty() || v.contains('=') {
                return Err(CniError::invalid_env(format!(
                    "CNI_ARGS: invalid pair {pair:?}"
                )));
            }
            pairs.push((k.to_string(), v.to_string()));
        }
        Ok(CniArgs { pairs })
    }

    /// The last value given for `key`; a key spelled with other ASCII case
    /// counts only when no exact one is there, as libcni's Go callers match
    /// keys (see [`crate::keys`]).
    pub fn get(&self, key: &str) -> Option<&str> {
        let exact = self.pairs.iter().rev().find(|(k, _)| k == key);
        exact
            .or_else(|| {
                self.pairs
                    .iter()
                    .rev()
                    .find(|(k, _)| k.eq_ignore_ascii_case(key))
            })
            .map(|(_, v)| v.as_str())
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// `IgnoreUnknown=1` (or `true`) lets a plugin skip keys it does not know.
    pub fn ignore_unknown(&self) -> bool {
        matches!(
            self.get("IgnoreUnknown")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("1" | "true")
        )
    }

    /// Fails with code 2 (unsupported field) on a key outside `known`, unless
    /// `IgnoreUnknown` is set, as the reference plugins do.
    pub fn check_known(&self, known: &[&str]) -> Result<(), CniError> {
        if self.ignore_unknown() {
            return Ok(());
        }
        for (k, _) in &self.pairs {
            if !k.eq_ignore_ascii_case("IgnoreUnknown")
                && !known.iter().any(|n| n.eq_ignore_ascii_case(k))
            {
                return Err(CniError::new(
                    crate::error::ErrorCode::UnsupportedField,
                    format!("CNI_ARGS: unknown key {k:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// Linux IFNAMSIZ less the terminating NUL.
pub const MAX_IFNAME_LEN: usize = 15;

/// Why `name` is not an interface name ferry accepts, or `None` when it is.
///
/// The ONE interface-name rule of ferry, used wherever a name is read or
/// written (CNI_IFNAME, names in configs, the IPAM store's records): the
/// kernel's `dev_valid_name` (1 to 15 bytes, not `.` or `..`, no `/`, `:` or
/// whitespace, where the kernel's `isspace` also counts the byte 0xA0), and
/// no control characters, which the kernel would take but which break every
/// reader of the name afterwards (records, logs, `/proc/sys` paths).
pub fn ifname_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("reserved name")
    } else if name.contains(['/', ':']) {
        Some("contains '/' or ':'")
    } else if name.chars().any(char::is_whitespace) || name.bytes().any(|b| b == 0xa0) {
        Some("contains whitespace")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    }
}

/// Whether `name` passes [`ifname_problem`]'s rule.
pub fn is_valid_ifname(name: &str) -> bool {
    ifname_problem(name).is_none()
}

/// An interface name the kernel accepts and that is safe in /proc/sys paths
/// and store records (see [`ifname_problem`]); code 4 otherwise.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    match ifname_problem(name) {
        None => Ok(()),
        Some(why) => Err(CniError::invalid_env(format!(
            "invalid interface name {name:?}: {why}"
        ))),
    }
}

/// A container ID as the spec defines it: starts with an alphanumeric, then
/// alphanumerics, `_`, `.`, `-`. This also makes it safe in file contents and
/// names. The spec sets no length limit, and neither does ferry.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    if id.is_empty() {
        return Err(CniError::invalid_env("empty CNI_CONTAINERID"));
    }
    if !is_valid_container_id(id) {
        return Err(CniError::invalid_env(format!(
            "invalid CNI_CONTAINERID {id:?}: must match [a-zA-Z0-9][a-zA-Z0-9_.-]*"
        )));
    }
    Ok(())
}

/// Whether `id` is a container ID by the spec's rule (see [`validate_container_id`]).
pub fn is_valid_container_id(id: &str) -> bool {
    is_safe_name(id)
}

/// A network name: it becomes a directory name (IPAM data dir, nft chain).
pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    if !is_safe_name(name) {
        return Err(CniError::invalid_config(format!(
            "invalid network name {name:?}: must match [a-zA-Z0-9][a-zA-Z0-9_.-]*"
        )));
    }
    Ok(())
}

/// A plugin `type`: a file name looked up in CNI_PATH, never a path.
pub fn validate_plugin_type(t: &str) -> Result<(), CniError> {
    validate_path_component(t)
        .map_err(|why| CniError::invalid_config(format!("invalid plugin type {t:?}: {why}")))
}

/// Whether `s` can be used as one path component without leaving its
/// directory: not empty, not `.`/`..`, no `/` and no NUL.
pub fn validate_path_component(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        Err("empty")
    } else if s == "." || s == ".." {
        Err("refers to a directory")
    } else if s.contains('/') {
        Err("contains '/'")
    } else if s.contains('\0') {
        Err("contains NUL")
    } else {
        Ok(())
    }
}

fn is_safe_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_table() {
        let ok: &[(&str, &[(&str, &str)])] = &[
            ("", &[]),
            ("IgnoreUnknown=1", &[("IgnoreUnknown", "1")]),
            (
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
                &[("K8S_POD_NAMESPACE", "default"), ("K8S_POD_NAME", "web-0")],
            ),
            ("IP=10.1.0.5;", &[("IP", "10.1.0.5")]),
            ("A=", &[("A", "")]),
        ];
        for (input, want) in ok {
            let got = CniArgs::parse(input).unwrap();
            let got: Vec<(&str, &str)> = got
                .pairs()
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(&got, want, "{input}");
        }
        for bad in ["A", "=x", "A=b=c", "A=1;B"] {
            assert_eq!(CniArgs::parse(bad).unwrap_err().code.as_u32(), 4, "{bad}");
        }
    }

    #[test]
    fn unknown_keys() {
        let a = CniArgs::parse("IP=10.0.0.2;K8S_POD_NAME=x").unwrap();
        assert_eq!(a.check_known(&["IP"]).unwrap_err().code.as_u32(), 2);
        a.check_known(&["IP", "K8S_POD_NAME"]).unwrap();
        let a = CniArgs::parse("IgnoreUnknown=true;Z=1").unwrap();
        assert!(a.ignore_unknown());
        a.check_known(&[]).unwrap();
        assert_eq!(a.get("Z"), Some("1"));
        assert_eq!(a.get("Y"), None);
    }

    #[test]
    fn keys_match_ignoring_case_exact_first() {
        let a =
            CniArgs::parse("k8s_pod_name=web-0;ip=10.0.0.9;IP=10.0.0.2;ignoreunknown=1").unwrap();
        assert_eq!(a.get("K8S_POD_NAME"), Some("web-0"));
        assert_eq!(a.get("IP"), Some("10.0.0.2"), "the exact key wins");
        assert!(a.ignore_unknown());
        let a = CniArgs::parse("k8s_pod_namespace=default;Mac=0a:58:0a:00:00:05").unwrap();
        a.check_known(&["K8S_POD_NAMESPACE", "MAC"]).unwrap();
        assert_eq!(a.get("MAC"), Some("0a:58:0a:00:00:05"));
    }

    #[test]
    fn ifname_table() {
        let cases = [
            ("eth0", true),
            ("lo", true),
            ("a", true),
            ("abcdefghijklmno", true),
            ("abcdefghijklmnop", false),
            ("", false),
            (".", false),
            ("..", false),
            ("eth/0", false),
            ("eth 0", false),
            ("eth\t0", false),
            ("eth:0", false),
            ("net.1", true),
            // Control characters: the kernel takes them, every reader chokes.
            ("e\x01", false),
            ("\x01", false),
            ("eth0\x7f", false),
            ("eth\u{85}", false),
            ("eth\n", false),
            ("eth\r", false),
            ("eth\0", false),
            // The kernel's isspace() includes the byte 0xA0 (U+00A0 and any
            // UTF-8 sequence containing it, e.g. 'à' = C3 A0).
            ("eth\u{a0}", false),
            ("eth\u{e0}", false),
            ("eth\u{2003}", false),
            ("ethé", true),
            // 15 bytes, not 15 characters.
            ("ééééééé1", true),
            ("éééééééé", false),
        ];
        for (name, ok) in cases {
            let r = validate_ifname(name);
            assert_eq!(r.is_ok(), ok, "{name:?}");
            if let Err(e) = r {
                assert_eq!(e.code.as_u32(), 4);
            }
        }
    }

    #[test]
    fn container_id_table() {
        let cases = [
            ("abc123", true),
            (
                "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                true,
            ),
            ("a_b.c-d", true),
            ("", false),
            ("-abc", false),
            ("../etc", false),
            ("a/b", false),
            ("a b", false),
            ("ä", false),
            ("a\x01", false),
        ];
        for (id, ok) in cases {
            assert_eq!(validate_container_id(id).is_ok(), ok, "{id:?}");
        }
        // The spec sets no length limit.
        for len in [300, 4000, 100_000] {
            validate_container_id(&"a".repeat(len)).unwrap();
        }
    }

    #[test]
    fn path_components() {
        for ok in ["host-local", "ferry-ipam", "a.b"] {
            validate_plugin_type(ok).unwrap();
        }
        for bad in ["", ".", "..", "../x", "/usr/bin/x", "a\0b"] {
            assert_eq!(
                validate_plugin_type(bad).unwrap_err().code.as_u32(),
                7,
                "{bad:?}"
            );
        }
        assert!(validate_network_name("k8s-pod-network").is_ok());
        assert!(validate_network_name("..").is_err());
    }
}
