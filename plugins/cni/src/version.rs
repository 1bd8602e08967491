//! Spec versions ferry speaks and the negotiation rules between them.

use crate::error::CniError;
use serde::Serialize;
use std::fmt;

/// A CNI spec version this library can read and print results for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SpecVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

/// Every version ferry's plugins support, oldest first.
pub const SUPPORTED: &[SpecVersion] = &[
    SpecVersion::V0_3_0,
    SpecVersion::V0_3_1,
    SpecVersion::V0_4_0,
    SpecVersion::V1_0_0,
    SpecVersion::V1_1_0,
];

impl SpecVersion {
    pub const LATEST: SpecVersion = SpecVersion::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            SpecVersion::V0_3_0 => "0.3.0",
            SpecVersion::V0_3_1 => "0.3.1",
            SpecVersion::V0_4_0 => "0.4.0",
            SpecVersion::V1_0_0 => "1.0.0",
            SpecVersion::V1_1_0 => "1.1.0",
        }
    }

    pub fn parse(s: &str) -> Option<SpecVersion> {
        SUPPORTED.iter().copied().find(|v| v.as_str() == s)
    }

    /// Parses a config's `cniVersion`; anything ferry does not speak is code 1.
    pub fn negotiate(s: &str) -> Result<SpecVersion, CniError> {
        SpecVersion::parse(s).ok_or_else(|| {
            let shown = if s.is_empty() { "<missing>" } else { s };
            CniError::incompatible_version("incompatible CNI versions").with_details(format!(
                "config is \"{shown}\", plugin supports [{}]",
                SUPPORTED
                    .iter()
                    .map(|v| format!("\"{}\"", v.as_str()))
                    .collect::<Vec<_>>()
                    .join(" ")
            ))
        })
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= SpecVersion::V0_4_0
    }

    /// GC and STATUS exist from 1.1.0 on.
    pub fn has_gc_and_status(self) -> bool {
        self >= SpecVersion::V1_1_0
    }

    /// Results from 1.0.0 on drop the per-IP `version` field.
    pub fn ip_has_version_field(self) -> bool {
        self < SpecVersion::V1_0_0
    }
}

impl fmt::Display for SpecVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for SpecVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Orders dotted version strings numerically ("0.10.0" > "0.4.0"); `None` when
/// either is not of the form `a.b.c`.
pub fn compare_versions(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    fn parts(s: &str) -> Option<[u64; 3]> {
        let mut it = s.split('.');
        let out = [
            it.next()?.parse().ok()?,
            it.next()?.parse().ok()?,
            it.next()?.parse().ok()?,
        ];
        it.next().is_none().then_some(out)
    }
    Some(parts(a)?.cmp(&parts(b)?))
}

/// The answer to VERSION.
#[derive(Debug, Serialize)]
pub struct VersionInfo {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<SpecVersion>,
}

impl VersionInfo {
    pub fn new(cni_version: &str) -> Self {
        VersionInfo {
            cni_version: cni_version.to_string(),
            supported_versions: SUPPORTED.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    #[test]
    fn negotiation_table() {
        let cases: &[(&str, Option<SpecVersion>)] = &[
            ("0.3.0", Some(SpecVersion::V0_3_0)),
            ("0.3.1", Some(SpecVersion::V0_3_1)),
            ("0.4.0", Some(SpecVersion::V0_4_0)),
            ("1.0.0", Some(SpecVersion::V1_0_0)),
            ("1.1.0", Some(SpecVersion::V1_1_0)),
            ("0.2.0", None),
            ("0.1.0", None),
            ("9.9.9", None),
            ("", None),
            ("1.0", None),
            (" 1.0.0", None),
        ];
        for (input, want) in cases {
            match (SpecVersion::negotiate(input), want) {
                (Ok(v), Some(w)) => assert_eq!(v, *w, "{input}"),
                (Err(e), None) => {
                    assert_eq!(e.code.as_u32(), 1, "{input}");
                    assert!(e.details.contains("plugin supports"), "{}", e.details);
                }
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn feature_gates() {
        assert!(!SpecVersion::V0_3_1.has_check());
        assert!(SpecVersion::V0_4_0.has_check());
        assert!(!SpecVersion::V1_0_0.has_gc_and_status());
        assert!(SpecVersion::V1_1_0.has_gc_and_status());
        assert!(SpecVersion::V0_4_0.ip_has_version_field());
        assert!(!SpecVersion::V1_0_0.ip_has_version_field());
    }

    #[test]
    fn numeric_compare() {
        assert_eq!(compare_versions("0.10.0", "0.4.0"), Some(Ordering::Greater));
        assert_eq!(compare_versions("1.1.0", "1.1.0"), Some(Ordering::Equal));
        assert_eq!(compare_versions("1.1", "1.1.0"), None);
    }

    #[test]
    fn version_reply() {
        let s = serde_json::to_string(&VersionInfo::new("1.1.0")).unwrap();
        assert_eq!(
            s,
            r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#
        );
    }
}
