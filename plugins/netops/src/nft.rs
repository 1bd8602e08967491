//! nftables: one table owned by ferry (`inet ferry`), per-network state
//! created once, atomically.
//!
//! Two halves, chosen by measurement (docs/nftables.md): the hot-path question
//! "is this network's chain there?" is one nf_tables netlink request (tens of
//! microseconds), asked on every ADD; creating the state is one `nft -f -`
//! transaction (about 15 ms, paid once per network per boot). Writing the rule
//! expressions as raw nf_tables netlink would save that one exec but not
//! change ADD latency, so ferry keeps the readable nft script.

use crate::{NetopsError, Result};
use rtnetlink::sys::{Socket, SocketAddr};
use std::io::{self, Write};
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
    let fail = |op: &str, e: io::Error| {
        NetopsError::io(format!("{op} nft chain {table}/{chain}"), "host", e)
    };
    let mut sock =
        Socket::new(NETLINK_NETFILTER).map_err(|e| fail("open netfilter socket for", e))?;
    sock.bind_auto()
        .map_err(|e| fail("bind netfilter socket for", e))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|e| fail("connect netfilter socket for", e))?;

    let mut attrs = Vec::new();
    push_str_attr(&mut attrs, NFTA_CHAIN_TABLE, table);
    push_str_attr(&mut attrs, NFTA_CHAIN_NAME, chain);
    let len = 16 + 4 + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    msg.push(family as u8); // nfgenmsg.nfgen_family
    msg.push(0); // NFNETLINK_V0
    msg.extend_from_slice(&0u16.to_be_bytes()); // res_id
    msg.extend_from_slice(&attrs);
    sock.send(&msg, 0).map_err(|e| fail("query", e))?;

    let mut found = false;
    let mut buf = vec![0u8; 16384];
    loop {
        let n = sock
            .recv(&mut &mut buf[..], 0)
            .map_err(|e| fail("read answer for", e))?;
        let mut off = 0;
        while off + 16 <= n {
            let mlen = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
            let mtype = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
            if mlen < 16 || off + mlen > n {
                return Err(fail(
                    "parse answer for",
                    io::Error::from(io::ErrorKind::InvalidData),
                ));
            }
            match mtype {
                NLMSG_ERROR => {
                    let errno =
                        i32::from_ne_bytes(buf[off + 16..off + 20].try_into().expect("4 bytes"));
                    return match -errno {
                        0 => Ok(found),
                        libc::ENOENT => Ok(false),
                        e => Err(fail("query", io::Error::from_raw_os_error(e))),
                    };
                }
                NLMSG_DONE => return Ok(found),
                _ => found = true,
            }
            off += (mlen + 3) & !3;
        }
    }
}

fn push_str_attr(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let len = 4 + s.len() + 1;
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
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
    let mut value = Vec::new();
    push_attr(&mut value, NFTA_DATA_VALUE, key);
    let mut k = Vec::new();
    push_attr(&mut k, NFTA_SET_ELEM_KEY | NLA_F_NESTED, &value);
    let mut elem = Vec::new();
    push_attr(&mut elem, NFTA_LIST_ELEM | NLA_F_NESTED, &k);
    let mut attrs = Vec::new();
    push_str_attr(&mut attrs, NFTA_SET_ELEM_LIST_TABLE, table);
    push_str_attr(&mut attrs, NFTA_SET_ELEM_LIST_SET, set);
    push_attr(
        &mut attrs,
        NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
        &elem,
    );
    let what = format!("element of nft set {table}/{set}");
    let answers = query(
        NFT_MSG_GETSETELEM,
        NLM_F_REQUEST | NLM_F_ACK,
        family,
        &attrs,
        &what,
    )?;
    Ok(answers.is_some_and(|a| !a.is_empty()))
}

/// The rules of chain `chain` of `table`, each as its raw nf_tables message
/// (attributes included), in chain order. A missing table or chain gives
/// no rules.
pub fn chain_rules(family: NftFamily, table: &str, chain: &str) -> Result<Vec<Vec<u8>>> {
    let mut attrs = Vec::new();
    push_str_attr(&mut attrs, NFTA_RULE_TABLE, table);
    push_str_attr(&mut attrs, NFTA_RULE_CHAIN, chain);
    let what = format!("rules of nft chain {table}/{chain}");
    Ok(query(
        NFT_MSG_GETRULE,
        NLM_F_REQUEST | NLM_F_DUMP,
        family,
        &attrs,
        &what,
    )?
    .unwrap_or_default())
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
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
    let mut sock =
        Socket::new(NETLINK_NETFILTER).map_err(|e| fail("open netfilter socket for", e))?;
    sock.bind_auto()
        .map_err(|e| fail("bind netfilter socket for", e))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|e| fail("connect netfilter socket for", e))?;

    let len = 16 + 4 + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg_type).to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    msg.push(family as u8); // nfgenmsg.nfgen_family
    msg.push(0); // NFNETLINK_V0
    msg.extend_from_slice(&0u16.to_be_bytes()); // res_id
    msg.extend_from_slice(attrs);
    sock.send(&msg, 0).map_err(|e| fail("query", e))?;

    let mut out = Vec::new();
    // Dumps come in skbs of up to 32 KiB; a smaller buffer would truncate.
    let mut buf = vec![0u8; 65536];
    loop {
        let n = sock
            .recv(&mut &mut buf[..], 0)
            .map_err(|e| fail("read answer for", e))?;
        let mut off = 0;
        while off + 16 <= n {
            let mlen = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
            let mtype = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
            if mlen < 16 || off + mlen > n {
                return Err(fail(
                    "parse answer for",
                    io::Error::from(io::ErrorKind::InvalidData),
                ));
            }
            match mtype {
                NLMSG_ERROR => {
                    if mlen < 20 {
                        return Err(fail(
                            "parse answer for",
                            io::Error::from(io::ErrorKind::InvalidData),
                        ));
                    }
                    let errno =
                        i32::from_ne_bytes(buf[off + 16..off + 20].try_into().expect("4 bytes"));
                    return match -errno {
                        0 => Ok(Some(out)),
                        libc::ENOENT => Ok(None),
                        e => Err(fail("query", io::Error::from_raw_os_error(e))),
                    };
                }
                NLMSG_DONE => return Ok(Some(out)),
                _ => out.push(buf[off + 16..off + mlen].to_vec()),
            }
            off += (mlen + 3) & !3;
        }
    }
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
    let mut attrs = Vec::new();
    push_str_attr(&mut attrs, NFTA_SET_ELEM_LIST_TABLE, table);
    push_str_attr(&mut attrs, NFTA_SET_ELEM_LIST_SET, map);
    let what = format!("elements of nft map {table}/{map}");
    let answers = query(
        NFT_MSG_GETSETELEM,
        NLM_F_REQUEST | NLM_F_DUMP,
        family,
        &attrs,
        &what,
    )?
    .unwrap_or_default();
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
                    out.push(parse_element(elem));
                }
            }
        }
    }
    Ok(out)
}

fn parse_element(elem: &[u8]) -> MapElement {
    let mut e = MapElement {
        key: Vec::new(),
        chain: None,
    };
    for (kind, data) in attributes(elem) {
        match kind {
            NFTA_SET_ELEM_KEY => {
                if let Some((_, v)) = attributes(data).find(|(k, _)| *k == NFTA_DATA_VALUE) {
                    e.key = v.to_vec();
                }
            }
            NFTA_SET_ELEM_DATA => {
                let verdict = attributes(data).find(|(k, _)| *k == NFTA_DATA_VERDICT);
                if let Some((_, v)) = verdict
                    && let Some((_, name)) = attributes(v).find(|(k, _)| *k == NFTA_VERDICT_CHAIN)
                {
                    let name = name.split(|b| *b == 0).next().unwrap_or_default();
                    e.chain = Some(String::from_utf8_lossy(name).into_owned());
                }
            }
            _ => {}
        }
    }
    e
}

/// The netlink attributes in `buf` as (type without flag bits, payload);
/// stops at the first malformed one.
fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let hdr = buf.get(off..off + 4)?;
        let len = u16::from_ne_bytes([hdr[0], hdr[1]]) as usize;
        let kind = u16::from_ne_bytes([hdr[2], hdr[3]]) & 0x3fff;
        let data = buf.get(off + 4..off + len.max(4))?;
        off += (len.max(4) + 3) & !3;
        Some((kind, data))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_verdict_map_element() {
        let mut value = Vec::new();
        push_attr(&mut value, NFTA_DATA_VALUE, &[6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        let mut chain = Vec::new();
        push_attr(&mut chain, 1, &(-3i32 as u32).to_be_bytes()); // NFTA_VERDICT_CODE: jump
        push_str_attr(&mut chain, NFTA_VERDICT_CHAIN, "hp-0123");
        let mut verdict = Vec::new();
        push_attr(&mut verdict, NFTA_DATA_VERDICT | NLA_F_NESTED, &chain);
        let mut elem = Vec::new();
        push_attr(&mut elem, NFTA_SET_ELEM_KEY | NLA_F_NESTED, &value);
        push_attr(&mut elem, NFTA_SET_ELEM_DATA | NLA_F_NESTED, &verdict);
        let e = parse_element(&elem);
        assert_eq!(e.key, [6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        assert_eq!(e.chain.as_deref(), Some("hp-0123"));
        // Truncated input: no panic, nothing made up.
        assert_eq!(parse_element(&elem[..elem.len() - 9]).chain, None);
        assert_eq!(attributes(&[0xff, 0xff, 1]).count(), 0);
    }
}
