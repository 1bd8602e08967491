//! nftables: one table owned by ferry (`inet ferry`), per-network state
//! created once, atomically.
//!
//! Two halves, chosen by measurement (docs/nftables.md): the hot-path question
//! "is this network's chain there?" is one nf_tables netlink request (tens of
//! microseconds), asked on every ADD; creating the state is one `nft -f -`
//! transaction (about 15 ms, paid once per network per boot). Writing the rule
//! expressions as raw nf_tables netlink would save that one exec but not
//! change ADD latency, so ferry keeps the readable nft script.
//!
//! Per-pod state that is only set and map elements needs no exec at all:
//! [`Batch`] sends element additions and deletions as one nf_tables netlink
//! transaction (batch begin, NEWSETELEM/DELSETELEM, batch end, each message
//! acknowledged; all or nothing), and [`set_elements`] / [`set_names`] read
//! them back.

use crate::{NetopsError, Result};
use rtnetlink::sys::{Socket, SocketAddr};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

/// nftables address families (`NFPROTO_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NftFamily {
    Inet = 1,
    Ip = 2,
    Bridge = 7,
    Ip6 = 10,
}

/// Whether chain `chain` of table `table` exists in the caller's namespace.
pub fn chain_exists(family: NftFamily, table: &str, chain: &str) -> Result<bool> {
    let what = format!("nft chain {table}/{chain}");
    let mut attrs = Vec::new();
    push_str_attr(&mut attrs, NFTA_CHAIN_TABLE, table).map_err(|e| e.into_netops(&what))?;
    push_str_attr(&mut attrs, NFTA_CHAIN_NAME, chain).map_err(|e| e.into_netops(&what))?;
    exists(NFT_MSG_GETCHAIN, family, &attrs, &what)
}

/// A netlink attribute's length is a u16 (header included), a message's a
/// u32: whatever does not fit is refused here, before anything is sent,
/// instead of being written with a wrapped length the kernel would misread.
#[derive(Debug, thiserror::Error)]
#[error("{what} of {len} bytes does not fit in a netlink {field} (at most {max} bytes)")]
pub struct TooLong {
    /// What was being encoded (`attribute 3`, `message`, `comment`).
    pub what: String,
    /// `attribute` or `message`.
    pub field: &'static str,
    pub len: usize,
    pub max: usize,
}

impl TooLong {
    fn into_netops(self, context: &str) -> NetopsError {
        NetopsError::io(
            format!("encode {context}"),
            "host",
            io::Error::new(io::ErrorKind::InvalidInput, self),
        )
    }
}

/// The largest attribute payload: the length field is a u16 that counts
/// the 4-byte header too.
pub const MAX_ATTR_PAYLOAD: usize = u16::MAX as usize - 4;

fn push_str_attr(buf: &mut Vec<u8>, kind: u16, s: &str) -> std::result::Result<(), TooLong> {
    let mut value = Vec::with_capacity(s.len() + 1);
    value.extend_from_slice(s.as_bytes());
    value.push(0);
    push_attr(buf, kind, &value)
}

/// Applies an nft script as one atomic transaction (`nft -f -`): all of it
/// or nothing.
pub fn apply_script(script: &str) -> Result<()> {
    let nft = find_nft().ok_or_else(|| {
        NetopsError::io(
            "find the nft binary (install the nftables package)",
            "host",
            io::Error::from(io::ErrorKind::NotFound),
        )
    })?;
    let mut child = Command::new(&nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetopsError::io(format!("run {}", nft.display()), "host", e))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .map_err(|e| NetopsError::io("write nft script", "host", e))?;
    let out = child
        .wait_with_output()
        .map_err(|e| NetopsError::io("wait for nft", "host", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetopsError::io(
            format!(
                "nft transaction failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            "host",
            io::Error::other(out.status.to_string()),
        ))
    }
}

/// Plugins run with whatever PATH the runtime gives them, often without /usr/sbin.
fn find_nft() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join("nft"))
        .find(|p| p.is_file())
}

// --- Reads for CHECK: a set element by key, the rules of one chain. ---

const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLM_F_DUMP: u16 = 0x300;

/// Whether set or map `set` of `table` holds an element with key `key`
/// (raw key bytes, e.g. an `ifname` key zero-padded to 16 bytes). A missing
/// table or set is `false`.
pub fn set_has_key(family: NftFamily, table: &str, set: &str, key: &[u8]) -> Result<bool> {
    let what = format!("element of nft set {table}/{set}");
    let attrs = (|| {
        let elem = element_attr(
            &SetElement {
                key: key.to_vec(),
                ..Default::default()
            },
            false,
        )?;
        let mut attrs = Vec::new();
        push_str_attr(&mut attrs, NFTA_SET_ELEM_LIST_TABLE, table)?;
        push_str_attr(&mut attrs, NFTA_SET_ELEM_LIST_SET, set)?;
        push_attr(
            &mut attrs,
            NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
            &elem,
        )?;
        Ok::<_, TooLong>(attrs)
    })()
    .map_err(|e| e.into_netops(&what))?;
    exists(NFT_MSG_GETSETELEM, family, &attrs, &what)
}

/// The rules of chain `chain` of `table`, each as its raw nf_tables message
/// (attributes included), in chain order. A missing table or chain gives
/// no rules.
pub fn chain_rules(family: NftFamily, table: &str, chain: &str) -> Result<Vec<Vec<u8>>> {
    let what = format!("rules of nft chain {table}/{chain}");
    let mut attrs = Vec::new();
    push_str_attr(&mut attrs, NFTA_RULE_TABLE, table).map_err(|e| e.into_netops(&what))?;
    push_str_attr(&mut attrs, NFTA_RULE_CHAIN, chain).map_err(|e| e.into_netops(&what))?;
    dump(NFT_MSG_GETRULE, family, &attrs, &what)
}

/// Appends one attribute (header, payload, padding to 4 bytes); a payload
/// longer than [`MAX_ATTR_PAYLOAD`] is refused, with nothing appended.
pub(crate) fn push_attr(
    buf: &mut Vec<u8>,
    kind: u16,
    data: &[u8],
) -> std::result::Result<(), TooLong> {
    let len = u16::try_from(4 + data.len()).map_err(|_| TooLong {
        what: format!("attribute {}", kind & 0x3fff),
        field: "attribute",
        len: data.len(),
        max: MAX_ATTR_PAYLOAD,
    })?;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
    Ok(())
}

/// Whether a GET request finds anything (one answer or more; ENOENT is
/// `false`).
fn exists(msg_type: u16, family: NftFamily, attrs: &[u8], what: &str) -> Result<bool> {
    let answers = query(msg_type, NLM_F_REQUEST | NLM_F_ACK, family, attrs, what)?;
    Ok(answers.is_some_and(|a| !a.is_empty()))
}

/// The answers' bodies of a dump request (none on ENOENT).
fn dump(msg_type: u16, family: NftFamily, attrs: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
    Ok(query(msg_type, NLM_F_REQUEST | NLM_F_DUMP, family, attrs, what)?.unwrap_or_default())
}

/// One nf_tables request; the answers' bodies (after the netlink header), or
/// `None` when the kernel says ENOENT (no such table, chain, set, element).
fn query(
    msg_type: u16,
    flags: u16,
    family: NftFamily,
    attrs: &[u8],
    what: &str,
) -> Result<Option<Vec<Vec<u8>>>> {
    let fail = |op: &str, e: io::Error| NetopsError::io(format!("{op} {what}"), "host", e);
    let sock = open_socket().map_err(|e| fail("open netfilter socket for", e))?;

    let mut msg = Vec::with_capacity(16 + 4 + attrs.len());
    push_message(
        &mut msg,
        (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
        flags,
        1,
        family as u8,
        0,
        attrs,
    )
    .map_err(|e| e.into_netops(what))?;
    sock.send(&msg, 0).map_err(|e| fail("query", e))?;

    let mut out = Vec::new();
    // Dumps come in skbs of up to 32 KiB; a smaller buffer would truncate.
    let mut buf = vec![0u8; 65536];
    loop {
        let n = sock
            .recv(&mut &mut buf[..], 0)
            .map_err(|e| fail("read answer for", e))?;
        for m in messages(&buf[..n]) {
            let (mtype, m) = m.map_err(|e| fail("parse answer for", e))?;
            match mtype {
                NLMSG_ERROR => {
                    let Some(errno) = m.get(16..20) else {
                        return Err(fail(
                            "parse answer for",
                            io::Error::from(io::ErrorKind::InvalidData),
                        ));
                    };
                    let errno = i32::from_ne_bytes(errno.try_into().expect("4 bytes"));
                    return match -errno {
                        0 => Ok(Some(out)),
                        libc::ENOENT => Ok(None),
                        e => Err(fail("query", io::Error::from_raw_os_error(e))),
                    };
                }
                NLMSG_DONE => return Ok(Some(out)),
                _ => out.push(m[16..].to_vec()),
            }
        }
    }
}

/// The netlink messages in `buf` (one read from the socket) as (type, the
/// whole message, header included); an error for a malformed one, and
/// nothing after it.
pub(crate) fn messages(buf: &[u8]) -> impl Iterator<Item = io::Result<(u16, &[u8])>> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 16 > buf.len() {
            return None;
        }
        let mlen = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
        let mtype = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
        if mlen < 16 || off + mlen > buf.len() {
            off = buf.len();
            return Some(Err(io::Error::from(io::ErrorKind::InvalidData)));
        }
        let m = &buf[off..off + mlen];
        off += (mlen + 3) & !3;
        Some(Ok((mtype, m)))
    })
}

// --- Map elements, for removing a pod's elements without knowing their keys. ---

const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// One element of an nftables map: its raw key (concatenated fields, each
/// padded to 4 bytes, in network byte order where the type says so) and, for
/// a verdict map, the chain its `jump`/`goto` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapElement {
    pub key: Vec<u8>,
    pub chain: Option<String>,
}

/// Every element of map `map` of `table` (one netlink dump). A missing table
/// or map has no elements.
pub fn map_elements(family: NftFamily, table: &str, map: &str) -> Result<Vec<MapElement>> {
    Ok(element_attrs(family, table, "map", map)?
        .iter()
        .map(|e| parse_element(e))
        .collect())
}

fn parse_element(elem: &[u8]) -> MapElement {
    let mut e = MapElement {
        key: Vec::new(),
        chain: None,
    };
    for (kind, data) in attributes(elem) {
        match kind {
            NFTA_SET_ELEM_KEY => {
                if let Some(v) = data_value(data) {
                    e.key = v;
                }
            }
            NFTA_SET_ELEM_DATA => {
                let verdict = attributes(data).find(|(k, _)| *k == NFTA_DATA_VERDICT);
                if let Some((_, v)) = verdict
                    && let Some((_, name)) = attributes(v).find(|(k, _)| *k == NFTA_VERDICT_CHAIN)
                {
                    e.chain = Some(c_string(name));
                }
            }
            _ => {}
        }
    }
    e
}

/// The NFTA_DATA_VALUE in a nested data attribute (a key, a map's data).
fn data_value(data: &[u8]) -> Option<Vec<u8>> {
    attributes(data)
        .find(|(k, _)| *k == NFTA_DATA_VALUE)
        .map(|(_, v)| v.to_vec())
}

/// A NUL-terminated string attribute (up to the first NUL, if any).
fn c_string(b: &[u8]) -> String {
    let s = b.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(s).into_owned()
}

/// The netlink attributes in `buf` as (type without flag bits, payload);
/// stops at the first malformed one (shorter than its header, or longer
/// than what is left).
pub(crate) fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let hdr = buf.get(off..off + 4)?;
        let len = u16::from_ne_bytes([hdr[0], hdr[1]]) as usize;
        if len < 4 {
            return None;
        }
        let kind = u16::from_ne_bytes([hdr[2], hdr[3]]) & 0x3fff;
        let data = buf.get(off + 4..off + len)?;
        off += (len + 3) & !3;
        Some((kind, data))
    })
}

// --- Set and map elements: full reads, and writes as one netlink batch. ---

const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
/// libnftnl's userdata TLV type of an element's `comment`.
const NFTNL_UDATA_SET_ELEM_COMMENT: u8 = 0;
/// nft refuses longer comments (NFTNL_UDATA_COMMENT_MAXLEN, with the NUL).
pub const MAX_COMMENT: usize = 127;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

/// One element of a set or map as nf_tables carries it. Keys and data are
/// raw: concatenated fields, each padded to 4 bytes, addresses and ports in
/// network byte order (what `nft --debug=netlink` prints).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetElement {
    pub key: Vec<u8>,
    /// The last key of a range, for interval sets of concatenations
    /// (`NFTA_SET_ELEM_KEY_END`); `None` for a single key.
    pub key_end: Option<Vec<u8>>,
    /// The value of a data map (`NFTA_SET_ELEM_DATA`); `None` in a set (and
    /// for a verdict map, whose verdicts [`map_elements`] reads).
    pub data: Option<Vec<u8>>,
    /// nft's `comment "…"`: the element's userdata.
    pub comment: Option<String>,
}

/// Every element of set or map `set` of `table` (one netlink dump). A
/// missing table or set has no elements.
pub fn set_elements(family: NftFamily, table: &str, set: &str) -> Result<Vec<SetElement>> {
    Ok(element_attrs(family, table, "set", set)?
        .iter()
        .map(|e| parse_set_element(e))
        .collect())
}

/// The names of the sets and maps of `table` (one netlink dump). A missing
/// table has none.
pub fn set_names(family: NftFamily, table: &str) -> Result<Vec<String>> {
    let what = format!("sets of nft table {table}");
    let mut attrs = Vec::new();
    push_str_attr(&mut attrs, NFTA_SET_TABLE, table).map_err(|e| e.into_netops(&what))?;
    let answers = dump(NFT_MSG_GETSET, family, &attrs, &what)?;
    Ok(answers
        .iter()
        .filter_map(|body| {
            let (_, name) = attributes(body.get(4..)?).find(|(k, _)| *k == NFTA_SET_NAME)?;
            Some(c_string(name))
        })
        .collect())
}

/// The raw attributes of every element of `set` (the payloads of the
/// NFTA_LIST_ELEM attributes of a GETSETELEM dump); `noun` ("set" or "map")
/// names it in errors.
fn element_attrs(family: NftFamily, table: &str, noun: &str, set: &str) -> Result<Vec<Vec<u8>>> {
    let what = format!("elements of nft {noun} {table}/{set}");
    let mut attrs = Vec::new();
    push_str_attr(&mut attrs, NFTA_SET_ELEM_LIST_TABLE, table).map_err(|e| e.into_netops(&what))?;
    push_str_attr(&mut attrs, NFTA_SET_ELEM_LIST_SET, set).map_err(|e| e.into_netops(&what))?;
    let answers = dump(NFT_MSG_GETSETELEM, family, &attrs, &what)?;
    let mut out = Vec::new();
    for body in &answers {
        // nfgenmsg (4 bytes), then the list's attributes.
        let Some(attrs) = body.get(4..) else { continue };
        for (kind, list) in attributes(attrs) {
            if kind != NFTA_SET_ELEM_LIST_ELEMENTS {
                continue;
            }
            for (kind, elem) in attributes(list) {
                if kind == NFTA_LIST_ELEM {
                    out.push(elem.to_vec());
                }
            }
        }
    }
    Ok(out)
}

fn parse_set_element(elem: &[u8]) -> SetElement {
    let mut e = SetElement::default();
    for (kind, data) in attributes(elem) {
        match kind {
            NFTA_SET_ELEM_KEY => e.key = data_value(data).unwrap_or_default(),
            NFTA_SET_ELEM_KEY_END => e.key_end = data_value(data),
            NFTA_SET_ELEM_DATA => e.data = data_value(data),
            NFTA_SET_ELEM_USERDATA => e.comment = comment_from_userdata(data),
            _ => {}
        }
    }
    e
}

/// The comment in an element's userdata: TLVs of (type u8, length u8, value),
/// the comment's value NUL-terminated.
fn comment_from_userdata(mut ud: &[u8]) -> Option<String> {
    while let [kind, len, rest @ ..] = ud {
        let value = rest.get(..usize::from(*len))?;
        if *kind == NFTNL_UDATA_SET_ELEM_COMMENT {
            return Some(c_string(value));
        }
        ud = &rest[usize::from(*len)..];
    }
    None
}

/// The comment as userdata. Longer than [`MAX_COMMENT`] bytes (or with a
/// NUL) is an error, not a cut: a comment names an owner, and a cut one
/// could name two (callers bound what they store, see ferry-portmap's owner).
fn userdata_comment(comment: &str) -> std::result::Result<Vec<u8>, TooLong> {
    if comment.len() > MAX_COMMENT || comment.contains('\0') {
        return Err(TooLong {
            what: "element comment".into(),
            field: "comment (nft userdata, NUL-free)",
            len: comment.len(),
            max: MAX_COMMENT,
        });
    }
    let mut ud = vec![NFTNL_UDATA_SET_ELEM_COMMENT, (comment.len() + 1) as u8];
    ud.extend_from_slice(comment.as_bytes());
    ud.push(0);
    Ok(ud)
}

/// One message of a batch, for naming it in errors.
struct BatchOp {
    seq: u32,
    what: String,
}

/// Element additions and deletions committed as one nf_tables transaction:
/// every message applies or none does. Built like nft builds its own batches
/// (checked against `nft --debug=mnl`), plus an acknowledgement for every
/// message so that success is confirmed, not inferred from silence.
///
/// Any number of elements: a list longer than one netlink attribute can
/// carry (64 KiB) is split over several messages of the same transaction,
/// and the socket's buffers are grown to the batch. An element that cannot
/// be encoded (a comment longer than nft's limit, a key longer than an
/// attribute) makes [`commit`](Batch::commit) fail before anything is sent.
#[derive(Default)]
pub struct Batch {
    msgs: Vec<u8>,
    ops: Vec<BatchOp>,
    /// The first encoding error: the batch is not sent.
    error: Option<NetopsError>,
}

/// The largest element list one message carries: what fits in the
/// NFTA_SET_ELEM_LIST_ELEMENTS attribute.
const MAX_LIST: usize = MAX_ATTR_PAYLOAD;

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.error.is_none()
    }

    /// How many messages (without batch begin and end) the batch holds.
    pub fn messages(&self) -> usize {
        self.ops.len()
    }

    /// Adds `elems` to `set`. `exclusive`: an element whose key is already
    /// in the set fails the transaction with EEXIST (NLM_F_EXCL), also when
    /// it is equal; without it an equal element is no error and a different
    /// one fails with EBUSY. A key overlapping another's range fails with
    /// ENOTEMPTY either way.
    pub fn add_elements(
        &mut self,
        family: NftFamily,
        table: &str,
        set: &str,
        elems: &[SetElement],
        exclusive: bool,
    ) {
        let flags = NLM_F_CREATE | if exclusive { NLM_F_EXCL } else { 0 };
        let what = format!("add elements to nft set {table}/{set}");
        self.push(
            NFT_MSG_NEWSETELEM,
            flags,
            family,
            (table, set),
            elems,
            true,
            what,
        );
    }

    /// Deletes `elems` (by key, and key end for ranges) from `set`; a missing
    /// element fails the transaction with ENOENT.
    pub fn del_elements(
        &mut self,
        family: NftFamily,
        table: &str,
        set: &str,
        elems: &[SetElement],
    ) {
        let what = format!("delete elements from nft set {table}/{set}");
        self.push(
            NFT_MSG_DELSETELEM,
            0,
            family,
            (table, set),
            elems,
            false,
            what,
        );
    }

    /// One message per element list of at most [`MAX_LIST`] bytes.
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        msg_type: u16,
        flags: u16,
        family: NftFamily,
        (table, set): (&str, &str),
        elems: &[SetElement],
        with_values: bool,
        what: String,
    ) {
        if elems.is_empty() || self.error.is_some() {
            return;
        }
        if let Err(e) = self.try_push(
            msg_type,
            flags,
            family,
            (table, set),
            elems,
            with_values,
            &what,
        ) {
            self.error = Some(e.into_netops(&what));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn try_push(
        &mut self,
        msg_type: u16,
        flags: u16,
        family: NftFamily,
        (table, set): (&str, &str),
        elems: &[SetElement],
        with_values: bool,
        what: &str,
    ) -> std::result::Result<(), TooLong> {
        let mut head = Vec::new();
        push_str_attr(&mut head, NFTA_SET_ELEM_LIST_TABLE, table)?;
        push_str_attr(&mut head, NFTA_SET_ELEM_LIST_SET, set)?;
        let mut lists: Vec<Vec<u8>> = vec![Vec::new()];
        for e in elems {
            let attr = element_attr(e, with_values)?;
            let list = lists.last_mut().expect("one list at least");
            if !list.is_empty() && list.len() + attr.len() > MAX_LIST {
                lists.push(attr);
            } else {
                list.extend(attr);
            }
        }
        let (msgs_before, ops_before) = (self.msgs.len(), self.ops.len());
        let parts = lists.len();
        for (i, list) in lists.iter().enumerate() {
            let mut attrs = head.clone();
            let pushed = push_attr(&mut attrs, NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, list)
                .and_then(|()| {
                    // Sequence numbers: 1 for the batch begin, then one per message.
                    let seq = u32::try_from(self.ops.len() + 2).map_err(|_| TooLong {
                        what: "batch".into(),
                        field: "sequence of messages",
                        len: self.ops.len() + 2,
                        max: u32::MAX as usize,
                    })?;
                    push_message(
                        &mut self.msgs,
                        (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
                        NLM_F_REQUEST | NLM_F_ACK | flags,
                        seq,
                        family as u8,
                        0,
                        &attrs,
                    )?;
                    let what = if parts > 1 {
                        format!("{what} (part {} of {parts})", i + 1)
                    } else {
                        what.to_string()
                    };
                    self.ops.push(BatchOp { seq, what });
                    Ok(())
                });
            if let Err(e) = pushed {
                self.msgs.truncate(msgs_before);
                self.ops.truncate(ops_before);
                return Err(e);
            }
        }
        Ok(())
    }

    /// The whole transaction as sent: batch begin, the messages, batch end.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.msgs.len() + 40);
        // The batch messages name the subsystem in res_id (big-endian).
        // Both are 20 bytes: they always fit.
        let _ = push_message(
            &mut out,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            1,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        out.extend_from_slice(&self.msgs);
        let _ = push_message(
            &mut out,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            (self.ops.len() as u32).wrapping_add(2),
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        out
    }

    /// Sends the transaction and waits for every acknowledgement. The error
    /// of a refused transaction (nothing applied) names the first message the
    /// kernel refused and keeps its errno ([`NetopsError::errno`]); an
    /// element that could not be encoded fails it before anything is sent.
    pub fn commit(self) -> Result<()> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.ops.is_empty() {
            return Ok(());
        }
        let fail = |op: &str, e: io::Error| NetopsError::io(format!("{op} nft batch"), "host", e);
        let sock = open_socket().map_err(|e| fail("open netfilter socket for", e))?;
        let bytes = self.to_bytes();
        // A netlink message goes in one skb of at most the socket's send
        // buffer, and the whole batch must be one message train; every
        // message gets an acknowledgement (without the request echoed).
        size_socket(&sock, bytes.len(), self.ops.len())
            .map_err(|e| fail("size the socket for", e))?;
        let sent = sock.send(&bytes, 0).map_err(|e| fail("send", e))?;
        if sent != bytes.len() {
            return Err(fail("send", io::Error::from(io::ErrorKind::WriteZero)));
        }
        let mut acked = 0;
        let mut first_err: Option<(u32, i32)> = None;
        let mut buf = vec![0u8; 65536];
        // The kernel handles the batch inside send(): every answer is queued
        // by now, so once none is left, none is coming.
        loop {
            let n = match sock.recv(&mut &mut buf[..], libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(fail("read answers to", e)),
            };
            for m in messages(&buf[..n]) {
                let (mtype, m) = m.map_err(|e| fail("parse answers to", e))?;
                if mtype == NLMSG_ERROR && m.len() >= 36 {
                    let errno = i32::from_ne_bytes(m[16..20].try_into().expect("4 bytes"));
                    // The header of the message answered follows the errno.
                    let seq = u32::from_ne_bytes(m[28..32].try_into().expect("4 bytes"));
                    if errno == 0 {
                        acked += 1;
                    } else if first_err.is_none_or(|(s, _)| seq < s) {
                        first_err = Some((seq, -errno));
                    }
                }
            }
            if first_err.is_none() && acked == self.ops.len() {
                return Ok(());
            }
        }
        match first_err {
            Some((seq, errno)) => {
                let what = self
                    .ops
                    .iter()
                    .find(|o| o.seq == seq)
                    .map_or("nft batch", |o| o.what.as_str());
                Err(NetopsError::io(
                    format!("{what} (transaction refused, nothing applied)"),
                    "host",
                    io::Error::from_raw_os_error(errno),
                ))
            }
            None => Err(fail(
                &format!("{} of {} acknowledgements for", acked, self.ops.len()),
                io::Error::from(io::ErrorKind::UnexpectedEof),
            )),
        }
    }
}

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;

/// Lets one send of `batch` bytes through and `acks` acknowledgements in
/// (as nft does for large batches: SO_SNDBUFFORCE / SO_RCVBUFFORCE, root
/// only, else the plain options up to the sysctl maximum), and keeps error
/// answers short (NETLINK_CAP_ACK: the refused message is not echoed back).
fn size_socket(sock: &Socket, batch: usize, acks: usize) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let set = |level: libc::c_int, opt: libc::c_int, v: libc::c_int| -> io::Result<()> {
        // SAFETY: setsockopt reads one c_int from a valid pointer.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(SOL_NETLINK, NETLINK_CAP_ACK, 1)?;
    // The defaults (rmem/wmem_default, usually 208 KiB, but a node may have
    // lowered them) hold the common case of a few elements without a call.
    const DEFAULT: usize = 16 * 1024;
    let grow = |forced: libc::c_int, plain: libc::c_int, want: usize| -> io::Result<()> {
        if want <= DEFAULT {
            return Ok(());
        }
        let v = libc::c_int::try_from(want)
            .map_err(|_| io::Error::from_raw_os_error(libc::EMSGSIZE))?;
        set(libc::SOL_SOCKET, forced, v).or_else(|_| set(libc::SOL_SOCKET, plain, v))
    };
    // The kernel wants room for the skb overhead next to the message.
    grow(
        libc::SO_SNDBUFFORCE,
        libc::SO_SNDBUF,
        batch.saturating_add(64 * 1024),
    )?;
    // An acknowledgement costs about 1 KiB of receive buffer (skb truesize).
    grow(
        libc::SO_RCVBUFFORCE,
        libc::SO_RCVBUF,
        acks.saturating_mul(1024).saturating_add(64 * 1024),
    )
}

/// One NFTA_LIST_ELEM: key, key end, and for an addition the data and
/// comment.
fn element_attr(e: &SetElement, with_values: bool) -> std::result::Result<Vec<u8>, TooLong> {
    let nested_value = |kind: u16, v: &[u8], out: &mut Vec<u8>| {
        let mut value = Vec::new();
        push_attr(&mut value, NFTA_DATA_VALUE, v)?;
        push_attr(out, kind | NLA_F_NESTED, &value)
    };
    let mut inner = Vec::new();
    nested_value(NFTA_SET_ELEM_KEY, &e.key, &mut inner)?;
    if let Some(end) = &e.key_end {
        nested_value(NFTA_SET_ELEM_KEY_END, end, &mut inner)?;
    }
    if with_values {
        if let Some(data) = &e.data {
            nested_value(NFTA_SET_ELEM_DATA, data, &mut inner)?;
        }
        if let Some(c) = &e.comment {
            push_attr(&mut inner, NFTA_SET_ELEM_USERDATA, &userdata_comment(c)?)?;
        }
    }
    let mut out = Vec::new();
    push_attr(&mut out, NFTA_LIST_ELEM | NLA_F_NESTED, &inner)?;
    Ok(out)
}

/// A netlink message with an nfgenmsg header (`msg_type` with its subsystem
/// in the high byte); one whose length does not fit the header's u32 is
/// refused, with nothing appended.
pub(crate) fn push_message(
    out: &mut Vec<u8>,
    msg_type: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) -> std::result::Result<(), TooLong> {
    let len = u32::try_from(16 + 4 + attrs.len()).map_err(|_| TooLong {
        what: "message".into(),
        field: "message",
        len: attrs.len(),
        max: u32::MAX as usize - 20,
    })?;
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&msg_type.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    out.push(family); // nfgenmsg.nfgen_family
    out.push(0); // NFNETLINK_V0
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(attrs);
    Ok(())
}

fn open_socket() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_verdict_map_element() {
        let mut value = Vec::new();
        push_attr(&mut value, NFTA_DATA_VALUE, &[6, 0, 0, 0, 0x1f, 0x90, 0, 0]).unwrap();
        let mut chain = Vec::new();
        push_attr(&mut chain, 1, &(-3i32 as u32).to_be_bytes()).unwrap(); // NFTA_VERDICT_CODE: jump
        push_str_attr(&mut chain, NFTA_VERDICT_CHAIN, "hp-0123").unwrap();
        let mut verdict = Vec::new();
        push_attr(&mut verdict, NFTA_DATA_VERDICT | NLA_F_NESTED, &chain).unwrap();
        let mut elem = Vec::new();
        push_attr(&mut elem, NFTA_SET_ELEM_KEY | NLA_F_NESTED, &value).unwrap();
        push_attr(&mut elem, NFTA_SET_ELEM_DATA | NLA_F_NESTED, &verdict).unwrap();
        let e = parse_element(&elem);
        assert_eq!(e.key, [6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        assert_eq!(e.chain.as_deref(), Some("hp-0123"));
        // Truncated input: no panic, nothing made up.
        assert_eq!(parse_element(&elem[..elem.len() - 9]).chain, None);
        assert_eq!(attributes(&[0xff, 0xff, 1]).count(), 0);
    }

    /// The element attribute nft 1.0.6 sends for
    /// `add element inet ferry s { 10.88.0.0/24 . tcp . 8080 comment "hp-0011" }`
    /// (type `ipv4_addr . inet_proto . inet_service`, flags interval), as
    /// `nft --debug=mnl` prints it.
    #[test]
    fn element_bytes_match_nft() {
        let ne = |v: u16| v.to_ne_bytes();
        let mut want = Vec::new();
        for (len, kind) in [(60u16, 0x8001u16), (20, 0x8001), (16, 1)] {
            want.extend(ne(len));
            want.extend(ne(kind));
        }
        want.extend([0x0a, 0x58, 0, 0, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        for (len, kind) in [(20u16, 0x800au16), (16, 1)] {
            want.extend(ne(len));
            want.extend(ne(kind));
        }
        want.extend([0x0a, 0x58, 0, 0xff, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        want.extend(ne(14));
        want.extend(ne(6));
        want.extend(b"\x00\x08hp-0011\x00\x00\x00");
        let e = SetElement {
            key: vec![0x0a, 0x58, 0, 0, 6, 0, 0, 0, 0x1f, 0x90, 0, 0],
            key_end: Some(vec![0x0a, 0x58, 0, 0xff, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]),
            data: None,
            comment: Some("hp-0011".into()),
        };
        assert_eq!(element_attr(&e, true).unwrap(), want);
        // A deletion carries the key and key end only.
        assert_eq!(element_attr(&e, false).unwrap().len(), 4 + 20 + 20);
        // Read back as a dump would give it.
        assert_eq!(parse_set_element(&want[4..]), e);
    }

    #[test]
    fn batch_layout() {
        let mut b = Batch::new();
        assert!(b.is_empty());
        let e = SetElement {
            key: vec![6, 0, 0, 0, 0x1f, 0x90, 0, 0],
            data: Some(vec![10, 88, 0, 5, 0, 80, 0, 0]),
            comment: Some("x".into()),
            ..Default::default()
        };
        b.add_elements(
            NftFamily::Inet,
            "ferry",
            "m",
            std::slice::from_ref(&e),
            true,
        );
        b.del_elements(NftFamily::Inet, "ferry", "m", &[e]);
        b.add_elements(NftFamily::Inet, "ferry", "m", &[], true);
        let bytes = b.to_bytes();
        let mut msgs = Vec::new();
        let mut off = 0;
        while off < bytes.len() {
            let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(bytes[off + 4..off + 6].try_into().unwrap());
            let flags = u16::from_ne_bytes(bytes[off + 6..off + 8].try_into().unwrap());
            msgs.push((kind, flags, bytes[off + 16..off + 20].to_vec()));
            off += len;
        }
        assert_eq!(off, bytes.len());
        assert_eq!(
            msgs,
            vec![
                (16, 1, vec![0, 0, 0, 10]),
                (0x0a0c, 0x605, vec![1, 0, 0, 0]),
                (0x0a0e, 0x5, vec![1, 0, 0, 0]),
                (17, 1, vec![0, 0, 0, 10]),
            ]
        );
        // A comment is never cut: too long is an error.
        let ud = userdata_comment(&"é".repeat(63)).unwrap();
        assert!(ud.len() == 126 + 3 && ud[1] as usize == ud.len() - 2);
        assert_eq!(comment_from_userdata(&ud).unwrap(), "é".repeat(63));
        assert!(userdata_comment(&"x".repeat(MAX_COMMENT + 1)).is_err());
        assert!(userdata_comment("a\0b").is_err());
        assert_eq!(comment_from_userdata(&[0, 5, b'a']), None);
    }

    /// The messages of a batch: (type, flags, nfgenmsg, attributes).
    fn split(bytes: &[u8]) -> Vec<(u16, u16, Vec<u8>, Vec<u8>)> {
        let mut msgs = Vec::new();
        let mut off = 0;
        while off < bytes.len() {
            let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(bytes[off + 4..off + 6].try_into().unwrap());
            let flags = u16::from_ne_bytes(bytes[off + 6..off + 8].try_into().unwrap());
            msgs.push((
                kind,
                flags,
                bytes[off + 16..off + 20].to_vec(),
                bytes[off + 20..off + len].to_vec(),
            ));
            off += len;
        }
        assert_eq!(off, bytes.len());
        msgs
    }

    /// A list longer than one attribute can describe is split over several
    /// messages of the same transaction, each one's list within a u16 length,
    /// every element kept exactly once, in order.
    #[test]
    fn large_element_lists_are_split_not_truncated() {
        let elems: Vec<SetElement> = (0..5000u32)
            .map(|i| SetElement {
                key: [
                    vec![6, 0, 0, 0],
                    (i as u16).to_be_bytes().to_vec(),
                    vec![0, 0],
                ]
                .concat(),
                data: Some(vec![10, 88, 0, 5, 0, 80, 0, 0]),
                comment: Some(format!("hp-0123456789abcdef {}", "c".repeat(100))),
                ..Default::default()
            })
            .collect();
        let mut b = Batch::new();
        b.add_elements(NftFamily::Inet, "ferry", "m", &elems, true);
        b.del_elements(NftFamily::Inet, "ferry", "m", &elems);
        assert!(b.error.is_none());
        let msgs = split(&b.to_bytes());
        let (begin, end) = (&msgs[0], &msgs[msgs.len() - 1]);
        assert_eq!((begin.0, end.0), (NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END));
        let body = &msgs[1..msgs.len() - 1];
        assert!(body.len() > 2, "{} messages", body.len());
        assert_eq!(body.len(), b.messages());
        let mut added = Vec::new();
        let mut deleted = Vec::new();
        for (kind, _, _, attrs) in body {
            let lists: Vec<_> = attributes(attrs)
                .filter(|(k, _)| *k == NFTA_SET_ELEM_LIST_ELEMENTS)
                .collect();
            assert_eq!(lists.len(), 1);
            // The attribute's own length field is the payload + 4 and fits.
            assert!(lists[0].1.len() <= MAX_ATTR_PAYLOAD);
            for (k, e) in attributes(lists[0].1) {
                assert_eq!(k, NFTA_LIST_ELEM);
                let e = parse_set_element(e);
                if *kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM {
                    added.push(e);
                } else {
                    deleted.push(e.key);
                }
            }
        }
        assert_eq!(added, elems);
        assert_eq!(
            deleted,
            elems.iter().map(|e| e.key.clone()).collect::<Vec<_>>()
        );
    }

    /// What cannot be encoded is an error of the batch (nothing is sent),
    /// and of every request helper, never a wrapped length.
    #[test]
    fn oversized_values_are_refused() {
        let mut buf = Vec::new();
        assert!(push_attr(&mut buf, 1, &vec![0; MAX_ATTR_PAYLOAD]).is_ok());
        let before = buf.len();
        let e = push_attr(&mut buf, 1, &vec![0; MAX_ATTR_PAYLOAD + 1]).unwrap_err();
        assert_eq!(buf.len(), before, "nothing appended");
        assert!(e.to_string().contains("65531"), "{e}");
        assert!(push_str_attr(&mut buf, 1, &"n".repeat(70_000)).is_err());

        let huge = SetElement {
            key: vec![0; 70_000],
            ..Default::default()
        };
        let mut b = Batch::new();
        b.add_elements(NftFamily::Inet, "ferry", "m", &[huge], true);
        assert!(!b.is_empty());
        let e = b.commit().unwrap_err();
        assert!(e.to_string().contains("attribute"), "{e}");
        let mut b = Batch::new();
        let long = SetElement {
            key: vec![1; 8],
            comment: Some("c".repeat(200)),
            ..Default::default()
        };
        b.add_elements(NftFamily::Inet, "ferry", "m", &[long], true);
        assert!(b.commit().unwrap_err().to_string().contains("comment"));
        // Requests too: a name no attribute can hold.
        let e = chain_exists(NftFamily::Inet, "ferry", &"c".repeat(70_000)).unwrap_err();
        let source = std::error::Error::source(&e).expect("an io error");
        let io = source.downcast_ref::<io::Error>().expect("an io error");
        assert_eq!(io.kind(), io::ErrorKind::InvalidInput);
        assert!(io.get_ref().is_some_and(|t| t.is::<TooLong>()), "{e}");
    }
}
