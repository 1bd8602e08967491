//! Connection tracking entries through ctnetlink (NETLINK_NETFILTER,
//! subsystem `NFNL_SUBSYS_CTNETLINK`), no `conntrack` exec.
//!
//! What ferry needs is narrow: delete the entries of the flows one hostPort
//! mapping is responsible for, and nothing else. A UDP "connection" lives as
//! long as packets keep coming, so a client that sends to a hostPort
//! continuously keeps the entry (and the DNAT it recorded) of a pod that is
//! gone, or of the time before the mapping existed, forever. The kernel can
//! only flush by family, mark, status or zone, so [`delete_flows`] is a dump
//! of the family (filtered in the kernel by protocol and port where it can,
//! since Linux 5.8; always filtered again here) followed by one
//! `IPCTNL_MSG_CT_DELETE` per matching entry, naming it by its original
//! tuple, zone and id: an entry created meanwhile for the same tuple (the new
//! flow, already DNATed the new way) is not the one deleted.
//!
//! Every attribute is encoded with its length checked (a value that does not
//! fit a netlink attribute is an error, never a wrapped length), the same
//! rule as [`crate::nft`]. Acts in the caller's network namespace (a plugin
//! runs in the node's).

use crate::nft::{TooLong, attributes, messages, push_attr, push_message};
use crate::{NetopsError, Result};
use ipnetwork::IpNetwork;
use rtnetlink::sys::{Socket, SocketAddr};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;

// enum ctattr_type
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
// enum ctattr_tuple
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_TUPLE_ZONE: u16 = 3;
// enum ctattr_ip
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
// enum ctattr_l4proto
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
// enum ctattr_filter, and the flags of nf_internals.h
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_FILTER_F_CTA_PROTO_NUM: u32 = 1 << 3;
const CTA_FILTER_F_CTA_PROTO_DST_PORT: u32 = 1 << 5;

/// `IPS_DST_NAT` of the entry's status: its destination was translated.
pub const IPS_DST_NAT: u32 = 1 << 5;

/// `IPPROTO_UDP`.
pub const UDP: u8 = 17;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// One direction of a tracked flow: addresses, protocol and ports (zero
/// for protocols without ports), and the direction's own zone if the entry
/// has directional zones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub zone: Option<u16>,
}

/// One conntrack entry, as much of it as ferry reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The packets as the client sent them.
    pub orig: Tuple,
    /// The answers as they are expected: after a DNAT its source is the
    /// translated destination.
    pub reply: Tuple,
    pub status: u32,
    pub zone: Option<u16>,
    /// The kernel's id of the entry (`CTA_ID`, raw).
    pub id: Option<[u8; 4]>,
}

/// The entries of flows one mapping is responsible for; an entry must match
/// every field to be deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowFilter {
    /// The original protocol (e.g. [`UDP`]).
    pub proto: u8,
    /// The original destination port (the hostPort).
    pub dst_port: u16,
    /// The original destination address is in one of these (the hostIP as a
    /// host prefix, or the node's own addresses); their family is the
    /// filter's. Empty: the filter matches nothing.
    pub dst: Vec<IpNetwork>,
    /// ... and is none of these (addresses another mapping holds).
    pub dst_except: Vec<IpAddr>,
    /// Only entries translated to this address and port (the reply's
    /// source): those a DNAT to one pod made. `None`: whatever they were
    /// translated to, or not at all.
    pub translated_to: Option<std::net::SocketAddr>,
}

impl FlowFilter {
    /// Whether `e` is one of the flows this filter describes.
    pub fn matches(&self, e: &Entry) -> bool {
        e.orig.proto == self.proto
            && e.orig.dst_port == self.dst_port
            && self.dst.iter().any(|n| n.contains(e.orig.dst))
            && !self.dst_except.contains(&e.orig.dst)
            && self
                .translated_to
                .is_none_or(|t| e.reply.src == t.ip() && e.reply.src_port == t.port())
    }

    fn family(&self) -> Option<u8> {
        self.dst.first().map(|n| family_of(n.ip()))
    }
}

fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { AF_INET } else { AF_INET6 }
}

/// Deletes every entry of the caller's namespace that one of `filters`
/// matches, and returns how many were deleted. One dump per address family
/// the filters name (none when they name none), then the deletions in one
/// send per chunk. An entry that vanished meanwhile (ENOENT) is not an
/// error and not counted.
pub fn delete_flows(filters: &[FlowFilter]) -> Result<usize> {
    let mut deleted = 0;
    for family in [AF_INET, AF_INET6] {
        let mine: Vec<&FlowFilter> = filters
            .iter()
            .filter(|f| f.family() == Some(family))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let sock = open_socket().map_err(|e| fail("open netfilter socket for", e))?;
        // The kernel narrows the dump when every filter wants the same
        // protocol (and port); what it sends back is matched again here.
        let proto = mine[0].proto;
        let port = mine[0].dst_port;
        let kernel = if mine.iter().all(|f| f.proto == proto && f.dst_port == port) {
            Some((proto, Some(port)))
        } else if mine.iter().all(|f| f.proto == proto) {
            Some((proto, None))
        } else {
            None
        };
        let entries = dump(&sock, family, kernel)?;
        let doomed: Vec<&Entry> = entries
            .iter()
            .filter(|e| mine.iter().any(|f| f.matches(e)))
            .collect();
        for chunk in doomed.chunks(DELETE_CHUNK) {
            deleted += delete(&sock, family, chunk)?;
        }
    }
    Ok(deleted)
}

/// Every entry of `family` (`libc::AF_INET` / `AF_INET6`) in the caller's
/// namespace whose original protocol is `proto` (and destination port
/// `dst_port`), for tests and tools.
pub fn entries(family: i32, proto: u8, dst_port: Option<u16>) -> Result<Vec<Entry>> {
    let family = u8::try_from(family)
        .ok()
        .filter(|f| [AF_INET, AF_INET6].contains(f))
        .ok_or_else(|| fail("dump", io::Error::from(io::ErrorKind::InvalidInput)))?;
    let sock = open_socket().map_err(|e| fail("open netfilter socket for", e))?;
    Ok(dump(&sock, family, Some((proto, dst_port)))?
        .into_iter()
        .filter(|e| e.orig.proto == proto && dst_port.is_none_or(|p| e.orig.dst_port == p))
        .collect())
}

/// Deletions sent at once: each is about 100 bytes and its acknowledgement
/// about 1 KiB of receive buffer, well within the default buffers.
const DELETE_CHUNK: usize = 64;

fn fail(op: &str, e: io::Error) -> NetopsError {
    NetopsError::io(format!("{op} conntrack entries"), "host", e)
}

fn too_long(e: TooLong) -> NetopsError {
    NetopsError::io(
        "encode conntrack request",
        "host",
        io::Error::new(io::ErrorKind::InvalidInput, e),
    )
}

fn open_socket() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    Ok(sock)
}

/// The dump request: `IPCTNL_MSG_CT_GET` with NLM_F_DUMP for one family,
/// with a kernel-side filter on the original protocol (and destination
/// port) when given.
fn dump_request(
    family: u8,
    filter: Option<(u8, Option<u16>)>,
) -> std::result::Result<Vec<u8>, TooLong> {
    let mut attrs = Vec::new();
    if let Some((proto, port)) = filter {
        let mut l4 = Vec::new();
        push_attr(&mut l4, CTA_PROTO_NUM, &[proto])?;
        let mut flags = CTA_FILTER_F_CTA_PROTO_NUM;
        if let Some(p) = port {
            push_attr(&mut l4, CTA_PROTO_DST_PORT, &p.to_be_bytes())?;
            flags |= CTA_FILTER_F_CTA_PROTO_DST_PORT;
        }
        let mut tuple = Vec::new();
        push_attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &l4)?;
        push_attr(&mut attrs, CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple)?;
        let mut f = Vec::new();
        // NLA_U32: host byte order.
        push_attr(&mut f, CTA_FILTER_ORIG_FLAGS, &flags.to_ne_bytes())?;
        push_attr(&mut attrs, CTA_FILTER | NLA_F_NESTED, &f)?;
    }
    let mut msg = Vec::new();
    push_message(
        &mut msg,
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        family,
        0,
        &attrs,
    )?;
    Ok(msg)
}

/// The entries a dump request returns (malformed ones skipped).
fn dump(sock: &Socket, family: u8, filter: Option<(u8, Option<u16>)>) -> Result<Vec<Entry>> {
    let msg = dump_request(family, filter).map_err(too_long)?;
    sock.send(&msg, 0).map_err(|e| fail("dump", e))?;
    let mut out = Vec::new();
    // Dumps come in skbs of up to 32 KiB; a smaller buffer would truncate.
    let mut buf = vec![0u8; 65536];
    loop {
        let n = sock
            .recv(&mut &mut buf[..], 0)
            .map_err(|e| fail("read the dump of", e))?;
        for m in messages(&buf[..n]) {
            let (mtype, m) = m.map_err(|e| fail("parse the dump of", e))?;
            match mtype {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = errno_of(m)?;
                    if errno == 0 {
                        return Ok(out);
                    }
                    return Err(fail("dump", io::Error::from_raw_os_error(errno)));
                }
                _ => {
                    // netlink header (16) + nfgenmsg (4), then attributes.
                    if let Some(e) = m.get(20..).and_then(parse_entry) {
                        out.push(e);
                    }
                }
            }
        }
    }
}

/// The positive errno of an NLMSG_ERROR message (0 for an ack).
fn errno_of(m: &[u8]) -> Result<i32> {
    let raw = m.get(16..20).ok_or_else(|| {
        fail(
            "parse answer for",
            io::Error::from(io::ErrorKind::InvalidData),
        )
    })?;
    Ok(-i32::from_ne_bytes(raw.try_into().expect("4 bytes")))
}

/// The delete request of one entry: its original tuple, zone and id.
fn delete_request(family: u8, seq: u32, e: &Entry) -> std::result::Result<Vec<u8>, TooLong> {
    let mut attrs = Vec::new();
    push_attr(
        &mut attrs,
        CTA_TUPLE_ORIG | NLA_F_NESTED,
        &tuple_attrs(&e.orig)?,
    )?;
    if let Some(z) = e.zone {
        push_attr(&mut attrs, CTA_ZONE, &z.to_be_bytes())?;
    }
    if let Some(id) = e.id {
        push_attr(&mut attrs, CTA_ID, &id)?;
    }
    let mut msg = Vec::new();
    push_message(
        &mut msg,
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family,
        0,
        &attrs,
    )?;
    Ok(msg)
}

/// Deletes `entries` (one send, one acknowledgement each); how many the
/// kernel deleted (ENOENT: gone already, or replaced by a new entry).
fn delete(sock: &Socket, family: u8, entries: &[&Entry]) -> Result<usize> {
    let mut batch = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let seq = 2 + u32::try_from(i).expect("a chunk is small");
        batch.extend(delete_request(family, seq, e).map_err(too_long)?);
    }
    sock.send(&batch, 0).map_err(|e| fail("delete", e))?;
    let (mut answered, mut deleted) = (0, 0);
    let mut first_err = None;
    let mut buf = vec![0u8; 65536];
    while answered < entries.len() {
        let n = sock
            .recv(&mut &mut buf[..], 0)
            .map_err(|e| fail("read answers to the deletion of", e))?;
        for m in messages(&buf[..n]) {
            let (mtype, m) = m.map_err(|e| fail("parse answers to the deletion of", e))?;
            if mtype != NLMSG_ERROR {
                continue;
            }
            answered += 1;
            match errno_of(m)? {
                0 => deleted += 1,
                libc::ENOENT => {}
                errno => {
                    first_err.get_or_insert(errno);
                }
            }
        }
    }
    match first_err {
        None => Ok(deleted),
        Some(errno) => Err(fail("delete", io::Error::from_raw_os_error(errno))),
    }
}

/// CTA_TUPLE_IP, CTA_TUPLE_PROTO (and CTA_TUPLE_ZONE) of a tuple, as the
/// `conntrack` tool writes them.
fn tuple_attrs(t: &Tuple) -> std::result::Result<Vec<u8>, TooLong> {
    let mut ip = Vec::new();
    match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            push_attr(&mut ip, CTA_IP_V4_SRC, &s.octets())?;
            push_attr(&mut ip, CTA_IP_V4_DST, &d.octets())?;
        }
        (s, d) => {
            push_attr(&mut ip, CTA_IP_V6_SRC, &v6_octets(s))?;
            push_attr(&mut ip, CTA_IP_V6_DST, &v6_octets(d))?;
        }
    }
    let mut l4 = Vec::new();
    push_attr(&mut l4, CTA_PROTO_NUM, &[t.proto])?;
    push_attr(&mut l4, CTA_PROTO_SRC_PORT, &t.src_port.to_be_bytes())?;
    push_attr(&mut l4, CTA_PROTO_DST_PORT, &t.dst_port.to_be_bytes())?;
    let mut out = Vec::new();
    push_attr(&mut out, CTA_TUPLE_IP | NLA_F_NESTED, &ip)?;
    push_attr(&mut out, CTA_TUPLE_PROTO | NLA_F_NESTED, &l4)?;
    if let Some(z) = t.zone {
        push_attr(&mut out, CTA_TUPLE_ZONE, &z.to_be_bytes())?;
    }
    Ok(out)
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

/// An entry from the attributes of an `IPCTNL_MSG_CT_NEW` dump message;
/// `None` when its tuples are missing or malformed.
fn parse_entry(attrs: &[u8]) -> Option<Entry> {
    let (mut orig, mut reply) = (None, None);
    let (mut status, mut zone, mut id) = (0, None, None);
    for (kind, data) in attributes(attrs) {
        match kind {
            CTA_TUPLE_ORIG => orig = parse_tuple(data),
            CTA_TUPLE_REPLY => reply = parse_tuple(data),
            CTA_STATUS => status = u32::from_be_bytes(data.get(..4)?.try_into().ok()?),
            CTA_ZONE => zone = Some(u16::from_be_bytes(data.get(..2)?.try_into().ok()?)),
            CTA_ID => id = Some(data.get(..4)?.try_into().ok()?),
            _ => {}
        }
    }
    Some(Entry {
        orig: orig?,
        reply: reply?,
        status,
        zone,
        id,
    })
}

fn parse_tuple(data: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst) = (None, None);
    let (mut proto, mut src_port, mut dst_port, mut zone) = (None, 0, 0, None);
    let v4 = |d: &[u8]| -> Option<IpAddr> {
        Some(Ipv4Addr::from(<[u8; 4]>::try_from(d.get(..4)?).ok()?).into())
    };
    let v6 = |d: &[u8]| -> Option<IpAddr> {
        Some(Ipv6Addr::from(<[u8; 16]>::try_from(d.get(..16)?).ok()?).into())
    };
    let port = |d: &[u8]| -> Option<u16> { Some(u16::from_be_bytes(d.get(..2)?.try_into().ok()?)) };
    for (kind, d) in attributes(data) {
        match kind {
            CTA_TUPLE_IP => {
                for (k, a) in attributes(d) {
                    match k {
                        CTA_IP_V4_SRC => src = v4(a),
                        CTA_IP_V4_DST => dst = v4(a),
                        CTA_IP_V6_SRC => src = v6(a),
                        CTA_IP_V6_DST => dst = v6(a),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, a) in attributes(d) {
                    match k {
                        CTA_PROTO_NUM => proto = a.first().copied(),
                        CTA_PROTO_SRC_PORT => src_port = port(a)?,
                        CTA_PROTO_DST_PORT => dst_port = port(a)?,
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_ZONE => zone = Some(port(d)?),
            _ => {}
        }
    }
    Some(Tuple {
        src: src?,
        dst: dst?,
        proto: proto?,
        src_port,
        dst_port,
        zone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::MAX_ATTR_PAYLOAD;

    fn ne(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }

    /// The CTA_TUPLE_ORIG `conntrack -D -p udp --orig-port-dst 5000`
    /// (conntrack-tools 1.4.7) sends for the entry
    /// `udp src=10.1.1.1 dst=10.2.2.2 sport=1000 dport=5000`, as strace
    /// prints it (x86_64, little endian).
    const TOOL_ORIG_TUPLE: &[u8] = b"\x34\x00\x01\x80\
        \x14\x00\x01\x80\x08\x00\x01\x00\x0a\x01\x01\x01\x08\x00\x02\x00\x0a\x02\x02\x02\
        \x1c\x00\x02\x80\x05\x00\x01\x00\x11\x00\x00\x00\x06\x00\x02\x00\x03\xe8\x00\x00\
        \x06\x00\x03\x00\x13\x88\x00\x00";

    /// The reply tuple and zone, id and status of the same entry as the
    /// kernel dumped it to the tool (zone 7).
    const DUMPED_REST: &[u8] = b"\x34\x00\x02\x80\
        \x14\x00\x01\x80\x08\x00\x01\x00\x0a\x02\x02\x02\x08\x00\x02\x00\x0a\x01\x01\x01\
        \x1c\x00\x02\x80\x05\x00\x01\x00\x11\x00\x00\x00\x06\x00\x02\x00\x13\x88\x00\x00\
        \x06\x00\x03\x00\x03\xe8\x00\x00\
        \x06\x00\x12\x00\x00\x07\x00\x00\
        \x08\x00\x03\x00\x00\x00\x00\x08\
        \x08\x00\x0c\x00\x0d\xc3\x67\xe2";

    fn entry() -> Entry {
        Entry {
            orig: Tuple {
                src: "10.1.1.1".parse().unwrap(),
                dst: "10.2.2.2".parse().unwrap(),
                proto: UDP,
                src_port: 1000,
                dst_port: 5000,
                zone: None,
            },
            reply: Tuple {
                src: "10.2.2.2".parse().unwrap(),
                dst: "10.1.1.1".parse().unwrap(),
                proto: UDP,
                src_port: 5000,
                dst_port: 1000,
                zone: None,
            },
            status: 8,
            zone: Some(7),
            id: Some([0x0d, 0xc3, 0x67, 0xe2]),
        }
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_what_the_kernel_dumps() {
        let mut attrs = TOOL_ORIG_TUPLE.to_vec();
        attrs.extend_from_slice(DUMPED_REST);
        assert_eq!(parse_entry(&attrs), Some(entry()));
        // Truncated anywhere: no panic, and no entry made of half a tuple.
        for cut in 0..attrs.len() {
            let e = parse_entry(&attrs[..cut]);
            assert!(e.is_none() || cut >= TOOL_ORIG_TUPLE.len() + 52, "{cut}");
        }
    }

    /// The deletion names the entry by the same original tuple the tool
    /// sends, plus its zone and id (the tool sends the whole entry; the
    /// kernel reads only these).
    #[cfg(target_endian = "little")]
    #[test]
    fn delete_bytes_match_the_conntrack_tool() {
        let msg = delete_request(AF_INET, 9, &entry()).unwrap();
        let len = u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize;
        assert_eq!(len, msg.len());
        assert_eq!(&msg[4..6], &ne(0x0102)); // CTNETLINK << 8 | DELETE
        assert_eq!(&msg[6..8], &ne(NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(&msg[8..12], &9u32.to_ne_bytes());
        assert_eq!(&msg[16..20], &[2, 0, 0, 0]); // AF_INET, V0, res_id 0
        let attrs = &msg[20..];
        assert_eq!(&attrs[..TOOL_ORIG_TUPLE.len()], TOOL_ORIG_TUPLE);
        assert_eq!(
            &attrs[TOOL_ORIG_TUPLE.len()..],
            b"\x06\x00\x12\x00\x00\x07\x00\x00\x08\x00\x0c\x00\x0d\xc3\x67\xe2"
        );
        // Without zone and id: the tuple alone.
        let plain = Entry {
            zone: None,
            id: None,
            ..entry()
        };
        assert_eq!(
            &delete_request(AF_INET, 9, &plain).unwrap()[20..],
            TOOL_ORIG_TUPLE
        );
    }

    /// The tool's dump request is the bare header; ferry's adds the kernel
    /// filter (Linux 5.8+): CTA_TUPLE_ORIG with protocol and port, and
    /// CTA_FILTER saying which of its fields count.
    #[cfg(target_endian = "little")]
    #[test]
    fn dump_request_layout() {
        let bare = dump_request(AF_INET, None).unwrap();
        assert_eq!(
            bare,
            [20, 0, 0, 0, 1, 1, 1, 3, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]
        );
        let f = dump_request(AF_INET6, Some((UDP, Some(5000)))).unwrap();
        assert_eq!(&f[16..20], &[10, 0, 0, 0]);
        let want: &[u8] = b"\x18\x00\x01\x80\x14\x00\x02\x80\
            \x05\x00\x01\x00\x11\x00\x00\x00\x06\x00\x03\x00\x13\x88\x00\x00\
            \x0c\x00\x19\x80\x08\x00\x01\x00\x28\x00\x00\x00";
        assert_eq!(&f[20..], want);
        let p = dump_request(AF_INET, Some((UDP, None))).unwrap();
        assert_eq!(&p[p.len() - 4..], &[8, 0, 0, 0]);
    }

    #[test]
    fn filters_match_only_the_mapping() {
        let e = entry();
        let f = FlowFilter {
            proto: UDP,
            dst_port: 5000,
            dst: vec!["10.2.2.0/24".parse().unwrap()],
            dst_except: vec![],
            translated_to: None,
        };
        assert!(f.matches(&e));
        let other_port = FlowFilter {
            dst_port: 5001,
            ..f.clone()
        };
        let tcp = FlowFilter {
            proto: 6,
            ..f.clone()
        };
        let other_dst = FlowFilter {
            dst: vec!["10.2.2.3/32".parse().unwrap()],
            ..f.clone()
        };
        let excepted = FlowFilter {
            dst_except: vec!["10.2.2.2".parse().unwrap()],
            ..f.clone()
        };
        let nowhere = FlowFilter {
            dst: vec![],
            ..f.clone()
        };
        let other_pod = FlowFilter {
            translated_to: Some("10.2.2.2:5001".parse().unwrap()),
            ..f.clone()
        };
        for g in [
            &other_port,
            &tcp,
            &other_dst,
            &excepted,
            &nowhere,
            &other_pod,
        ] {
            assert!(!g.matches(&e), "{g:?}");
        }
        let this_pod = FlowFilter {
            translated_to: Some("10.2.2.2:5000".parse().unwrap()),
            ..f.clone()
        };
        assert!(this_pod.matches(&e));
        assert_eq!(nowhere.family(), None);
        assert_eq!(f.family(), Some(AF_INET));
    }

    #[test]
    fn oversized_attributes_are_refused() {
        let mut buf = Vec::new();
        assert!(push_attr(&mut buf, 1, &vec![0; MAX_ATTR_PAYLOAD]).is_ok());
        let before = buf.len();
        assert!(push_attr(&mut buf, 1, &vec![0; MAX_ATTR_PAYLOAD + 1]).is_err());
        assert_eq!(buf.len(), before, "nothing appended");
        // An attribute whose length says less than its header: no loop, no panic.
        assert_eq!(attributes(&[2, 0, 1, 0, 0, 0]).count(), 0);
        assert_eq!(attributes(&[0xff, 0xff, 1, 0]).count(), 0);
    }
}
