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
///
/// Besides the netns path it records what the path held at ADD (the nsfs
/// device and inode), so a path that now holds another namespace (a reused
/// `/proc/<pid>/ns/net`, a re-created bind mount) is provably stale, and the
/// Kubernetes pod it was made for (`K8S_POD_*` in CNI_ARGS), for logs and
/// tools. Every field is optional: records written before these fields
/// existed, or by a ferry that did not know them, read as before, and older
/// readers ignore the new keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub netns: String,
    #[serde(rename = "bootID", default, skip_serializing_if = "String::is_empty")]
    pub boot_id: String,
    /// `st_dev` of the namespace `netns` named at ADD (0: unknown).
    #[serde(rename = "netnsDev", default, skip_serializing_if = "is_zero")]
    pub netns_dev: u64,
    /// `st_ino` of that namespace (0: unknown).
    #[serde(rename = "netnsIno", default, skip_serializing_if = "is_zero")]
    pub netns_ino: u64,
    /// CNI_ARGS `K8S_POD_NAMESPACE`, when the runtime sent a valid one.
    #[serde(
        rename = "podNamespace",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub pod_namespace: String,
    /// CNI_ARGS `K8S_POD_NAME`.
    #[serde(rename = "podName", default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
    /// CNI_ARGS `K8S_POD_INFRA_CONTAINER_ID`.
    #[serde(
        rename = "podInfraContainerID",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub pod_infra_container_id: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The longest `K8S_POD_*` value recorded (a Kubernetes name is at most 253
/// bytes; an infra container ID is 64 hex digits).
pub const MAX_POD_ARG: usize = 253;

/// A `K8S_POD_*` value fit to record: non-empty, at most [`MAX_POD_ARG`]
/// bytes, no control characters (it ends up in logs and in JSON read by
/// tools). Anything else is not recorded.
pub fn valid_pod_arg(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_POD_ARG && !v.chars().any(char::is_control)
}

/// The identity (`st_dev`, `st_ino`) of what `path` names now, following
/// the magic links of `/proc` (stat never opens, so nothing can block).
/// `None` when it does not exist or cannot be read.
pub fn netns_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

impl Meta {
    /// The pod as `namespace/name` (or whichever part is known), for logs.
    pub fn pod(&self) -> Option<String> {
        match (self.pod_namespace.as_str(), self.pod_name.as_str()) {
            ("", "") => None,
            ("", n) => Some(n.to_string()),
            (ns, "") => Some(format!("{ns}/?")),
            (ns, n) => Some(format!("{ns}/{n}")),
        }
    }

    /// Why the namespace this record was made for is provably gone: its
    /// path no longer exists, or it now holds another namespace. `None`
    /// without a recorded path, and while the same namespace is there.
    pub fn netns_gone(&self) -> Option<String> {
        if self.netns.is_empty() {
            return None;
        }
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&self.netns).map(|m| (m.dev(), m.ino())) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(format!("netns {} no longer exists", self.netns))
            }
            // There but unreadable (EACCES, …): no proof.
            Err(_) => None,
            Ok((dev, ino))
                if self.netns_ino != 0 && (dev, ino) != (self.netns_dev, self.netns_ino) =>
            {
                Some(format!(
                    "netns {} now holds another namespace (dev {dev} inode {ino}, was dev {} inode {})",
                    self.netns, self.netns_dev, self.netns_ino
                ))
            }
            Ok(_) => None,
        }
    }
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
                m.netns_gone()
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
            ..Default::default()
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
                        ..Default::default()
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
                ..Default::default()
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
    fn a_path_holding_another_namespace_is_stale() {
        let path = "/proc/self/ns/net";
        let (dev, ino) = netns_identity(Path::new(path)).expect("stat own netns");
        let held = |dev: u64, ino: u64| Record::Held {
            owner: Owner::new("c", "eth0"),
            meta: Some(Meta {
                netns: path.into(),
                boot_id: BOOT.into(),
                netns_dev: dev,
                netns_ino: ino,
                ..Default::default()
            }),
        };
        assert_eq!(held(dev, ino).stale_reason(Some(BOOT)), None);
        // Unknown identity (an older record): only the path's absence proves.
        assert_eq!(held(0, 0).stale_reason(Some(BOOT)), None);
        let why = held(dev, ino + 1)
            .stale_reason(Some(BOOT))
            .unwrap_or_default();
        assert!(why.contains("another namespace"), "{why}");
    }

    #[test]
    fn new_evidence_rides_in_both_forms_and_old_readers_keep_working() {
        let meta = Meta {
            netns: "/var/run/netns/x".into(),
            boot_id: BOOT.into(),
            netns_dev: 4,
            netns_ino: 4026532000,
            pod_namespace: "default".into(),
            pod_name: "web-0".into(),
            pod_infra_container_id: "abc".into(),
        };
        let x = serde_json::to_vec(&meta).unwrap();
        // xattr form: the content stays host-local's.
        assert_eq!(
            Record::parse(b"c1\r\neth0", Some(&x)),
            Record::Held {
                owner: Owner::new("c1", "eth0"),
                meta: Some(meta.clone()),
            }
        );
        // JSON-content form.
        let json = serde_json::to_vec(&JsonRecord {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            meta: meta.clone(),
        })
        .unwrap();
        assert_eq!(
            Record::parse(&json, None),
            Record::Held {
                owner: Owner::new("c1", "eth0"),
                meta: Some(meta.clone()),
            }
        );
        // What a ferry without these fields wrote still reads, and what this
        // one writes reads with a reader that knows only netns and bootID.
        #[derive(Deserialize)]
        struct OldMeta {
            netns: String,
            #[serde(rename = "bootID")]
            boot_id: String,
        }
        let old: OldMeta = serde_json::from_slice(&x).unwrap();
        assert_eq!(
            (old.netns.as_str(), old.boot_id.as_str()),
            ("/var/run/netns/x", BOOT)
        );
        let old_x = br#"{"netns":"/x","bootID":"b"}"#;
        assert_eq!(
            serde_json::from_slice::<Meta>(old_x).unwrap(),
            Meta {
                netns: "/x".into(),
                boot_id: "b".into(),
                ..Default::default()
            }
        );
        assert_eq!(meta.pod().as_deref(), Some("default/web-0"));
    }

    #[test]
    fn pod_args_are_bounded_and_printable() {
        assert!(valid_pod_arg("kube-system"));
        assert!(valid_pod_arg(&"a".repeat(MAX_POD_ARG)));
        assert!(!valid_pod_arg(&"a".repeat(MAX_POD_ARG + 1)));
        assert!(!valid_pod_arg(""));
        assert!(!valid_pod_arg("a\nb"));
        assert!(!valid_pod_arg("\u{1b}[31mred"));
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
