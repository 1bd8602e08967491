//! One reservation file: what it says and whether it is provably stale.
//!
//! The file content is host-local's, `<containerID>\r\n<ifname>`, so that
//! host-local (DEL, GC, its duplicate check) keeps understanding a store ferry
//! wrote. ferry's evidence for staleness (netns path, boot ID) rides along in
//! the extended attribute `user.ferry` as JSON, set on the temp file before it
//! is linked into place, so a record and its evidence appear atomically. On a
//! filesystem without user xattrs the whole record is written as JSON content
//! instead. Readers accept all three forms, plus host-local's oldest
//! (`<containerID>` alone, which matches any ifname).

use ferry_cni::args::is_valid_ifname;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Who holds a reservation. `ifname: None` is host-local's pre-ifname format.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub id: String,
    pub ifname: Option<String>,
}

impl Owner {
    pub fn new(id: &str, ifname: &str) -> Owner {
        Owner {
            id: id.to_string(),
            ifname: Some(ifname.to_string()),
        }
    }

    /// Whether this record's owner is the attachment (id, ifname).
    pub fn matches(&self, id: &str, ifname: &str) -> bool {
        self.id == id && self.ifname.as_deref().is_none_or(|i| i == ifname)
    }

    /// host-local's file content.
    pub fn content(&self) -> String {
        match &self.ifname {
            Some(i) => format!("{}\r\n{}", self.id, i),
            None => self.id.clone(),
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.ifname {
            Some(i) => write!(f, "container {} interface {}", self.id, i),
            None => write!(f, "container {}", self.id),
        }
    }
}

/// ferry's staleness evidence. Absent on host-local's records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub netns: String,
    #[serde(rename = "bootID", default, skip_serializing_if = "String::is_empty")]
    pub boot_id: String,
}

/// The JSON-content form (used when xattrs are unavailable).
#[derive(Debug, Serialize, Deserialize)]
pub struct JsonRecord {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    #[serde(flatten)]
    pub meta: Meta,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Held {
        owner: Owner,
        meta: Option<Meta>,
    },
    /// Shaped like host-local's record (`<containerID>\r\n<ifname>`, a valid
    /// container ID) but with an interface name that breaks ferry's one rule
    /// (`ferry_cni::args::ifname_problem`; e.g. a control character, which
    /// libcni lets through). ferry refuses such names before reserving, so
    /// this was written by someone else for an attachment ferry cannot name:
    /// held, never provably stale, released only by GC.
    Unnamed,
    /// Empty, torn, unreadable or not a record at all: provably stale.
    Garbage,
}

/// The spec's container-ID rule, the same the skeleton applies.
fn plausible_id(id: &str) -> bool {
    ferry_cni::args::is_valid_container_id(id)
}

impl Record {
    /// Parses content plus the `user.ferry` xattr (if any). Never fails.
    pub fn parse(content: &[u8], xattr: Option<&[u8]>) -> Record {
        let Ok(text) = std::str::from_utf8(content) else {
            return Record::Garbage;
        };
        let text = text.trim();
        if text.starts_with('{') {
            return match serde_json::from_str::<JsonRecord>(text) {
                Ok(r) if plausible_id(&r.container_id) && is_valid_ifname(&r.ifname) => {
                    Record::Held {
                        owner: Owner::new(&r.container_id, &r.ifname),
                        meta: Some(r.meta),
                    }
                }
                // Written by a ferry that did not yet refuse such names.
                Ok(r) if plausible_id(&r.container_id) && !r.ifname.is_empty() => Record::Unnamed,
                _ => Record::Garbage,
            };
        }
        let owner = match text.split_once("\r\n") {
            Some((id, ifname)) if plausible_id(id) && is_valid_ifname(ifname) => {
                Owner::new(id, ifname)
            }
            Some((id, _)) if plausible_id(id) => return Record::Unnamed,
            None if plausible_id(text) => Owner {
                id: text.to_string(),
                ifname: None,
            },
            _ => return Record::Garbage,
        };
        let meta = xattr.and_then(|x| serde_json::from_slice::<Meta>(x).ok());
        Record::Held { owner, meta }
    }

    /// Why this record is provably stale, if it is: garbage, written in
    /// another boot, or its netns is gone. host-local records (no evidence)
    /// are never provably stale; only GC releases them.
    pub fn stale_reason(&self, boot_id: Option<&str>) -> Option<String> {
        match self {
            Record::Garbage => Some("unreadable record".into()),
            Record::Held { meta: None, .. } | Record::Unnamed => None,
            Record::Held { meta: Some(m), .. } => {
                if let Some(b) = boot_id
                    && !m.boot_id.is_empty()
                    && m.boot_id != b
                {
                    return Some(format!("written in boot {}", m.boot_id));
                }
                if !m.netns.is_empty() && !Path::new(&m.netns).exists() {
                    return Some(format!("netns {} no longer exists", m.netns));
                }
                None
            }
        }
    }

    pub fn owner(&self) -> Option<&Owner> {
        match self {
            Record::Held { owner, .. } => Some(owner),
            Record::Unnamed | Record::Garbage => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: &str = "1acce91c-990f-4517-8d71-65470d90c585";

    #[test]
    fn parses_every_format() {
        let meta = Meta {
            netns: "/".into(),
            boot_id: BOOT.into(),
        };
        let x = serde_json::to_vec(&meta).unwrap();
        let json = br#"{"containerID":"c3","ifname":"net1","netns":"/","bootID":"b"}"#;
        type Case<'a> = (&'a [u8], Option<&'a [u8]>, Record);
        let cases: Vec<Case> = vec![
            (
                b"c1\r\neth0",
                None,
                Record::Held {
                    owner: Owner::new("c1", "eth0"),
                    meta: None,
                },
            ),
            (
                b"c1\r\neth0\n",
                None,
                Record::Held {
                    owner: Owner::new("c1", "eth0"),
                    meta: None,
                },
            ),
            (
                b"c1\r\neth0",
                Some(&x),
                Record::Held {
                    owner: Owner::new("c1", "eth0"),
                    meta: Some(meta.clone()),
                },
            ),
            // A broken xattr does not spoil a good record: it is host-local-like.
            (
                b"c1\r\neth0",
                Some(b"{nope"),
                Record::Held {
                    owner: Owner::new("c1", "eth0"),
                    meta: None,
                },
            ),
            (
                b"c2",
                None,
                Record::Held {
                    owner: Owner {
                        id: "c2".into(),
                        ifname: None,
                    },
                    meta: None,
                },
            ),
            (
                json,
                None,
                Record::Held {
                    owner: Owner::new("c3", "net1"),
                    meta: Some(Meta {
                        netns: "/".into(),
                        boot_id: "b".into(),
                    }),
                },
            ),
            (b"", None, Record::Garbage),
            (b"   \n", None, Record::Garbage),
            (b"\xff\xfe\x00", None, Record::Garbage),
            (b"{\"containerID\":", None, Record::Garbage),
            (
                br#"{"containerID":"","ifname":"eth0"}"#,
                None,
                Record::Garbage,
            ),
            // host-local trims content too: this is its id-only format.
            (
                b"c1\r\n",
                None,
                Record::Held {
                    owner: Owner {
                        id: "c1".into(),
                        ifname: None,
                    },
                    meta: None,
                },
            ),
            // A valid ID with a name ferry refuses (libcni takes control
            // characters): someone else's attachment, not garbage.
            (b"c1\r\neth0\r\nmore", None, Record::Unnamed),
            (b"c1\r\ne\x01", None, Record::Unnamed),
            (b"c1\r\n\x1b[31m", None, Record::Unnamed),
            (b"c1\r\nabcdefghijklmnop", None, Record::Unnamed),
            (b"c1\r\neth/0", None, Record::Unnamed),
            (
                br#"{"containerID":"c1","ifname":"e\u0001"}"#,
                None,
                Record::Unnamed,
            ),
            (b"../etc\r\neth0", None, Record::Garbage),
            (b"a b c", None, Record::Garbage),
        ];
        for (content, xattr, want) in cases {
            assert_eq!(
                Record::parse(content, xattr),
                want,
                "{:?}",
                String::from_utf8_lossy(content)
            );
        }
    }

    #[test]
    fn stale_proofs() {
        let held = |netns: &str, boot: &str| Record::Held {
            owner: Owner::new("c", "eth0"),
            meta: Some(Meta {
                netns: netns.into(),
                boot_id: boot.into(),
            }),
        };
        let cases = [
            (held("/", BOOT), None),
            (held("", BOOT), None),
            (held("/", ""), None),
            (held("/", "other-boot"), Some("boot other-boot")),
            (held("/nonexistent/netns/x", BOOT), Some("no longer exists")),
            (Record::Garbage, Some("unreadable")),
            (Record::Unnamed, None),
            (
                Record::Held {
                    owner: Owner::new("c", "eth0"),
                    meta: None,
                },
                None,
            ),
        ];
        for (r, want) in cases {
            let got = r.stale_reason(Some(BOOT));
            match want {
                None => assert_eq!(got, None, "{r:?}"),
                Some(n) => assert!(got.as_deref().unwrap_or("").contains(n), "{r:?}: {got:?}"),
            }
        }
        // Without a known boot ID, boot evidence proves nothing.
        assert_eq!(held("/", "other").stale_reason(None), None);
    }

    #[test]
    fn owner_matching_and_content() {
        assert!(Owner::new("c", "eth0").matches("c", "eth0"));
        assert!(!Owner::new("c", "eth0").matches("c", "eth1"));
        assert!(
            Owner {
                id: "c".into(),
                ifname: None
            }
            .matches("c", "eth1")
        );
        assert_eq!(Owner::new("c", "eth0").content(), "c\r\neth0");
    }
}
