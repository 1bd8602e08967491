//! `macspoofchk`: frames a pod sends with a source MAC other than its own
//! are dropped before the bridge forwards them.
//!
//! Layout (one bridge-family table for every ferry network on the node):
//!
//! ```text
//! table bridge ferry {
//!   chain mac-<host veth> { ether saddr <pod MAC> return; drop }       # one per pod
//!   map spoofchk { type ifname : verdict; elements = { "<host veth>" : jump mac-<host veth> } }
//!   chain prerouting { type filter hook prerouting priority -300; policy accept; iifname vmap @spoofchk }
//! }
//! ```
//!
//! The key is the host veth's name, which is derived from (container ID,
//! ifname), so DEL finds the pod's state without its namespace and without
//! knowing its MAC. A pod's ADD is one `nft -f -` transaction (its chain,
//! its two rules, its map element; plus the table, map and base chain when
//! the base chain is missing); DEL is one transaction too, and only when the
//! pod's chain exists (a netlink lookup otherwise).

use ferry_netops::nft::{self, NftFamily};

pub const TABLE: &str = "ferry";
pub const MAP: &str = "spoofchk";
pub const BASE_CHAIN: &str = "prerouting";

/// The pod's chain. Host veth names are `veth` + hex digits: valid unquoted
/// nft identifiers (nft 1.0.6 refuses quoted chain names).
pub fn chain_name(host_veth: &str) -> String {
    format!("mac-{host_veth}")
}

/// Table, map and base chain. Idempotent: the base chain is flushed and its
/// one rule re-added in the same transaction.
fn base_script() -> String {
    format!(
        "add table bridge {TABLE}\n\
         add map bridge {TABLE} {MAP} {{ type ifname : verdict; }}\n\
         add chain bridge {TABLE} {BASE_CHAIN} {{ type filter hook prerouting priority -300; policy accept; }}\n\
         flush chain bridge {TABLE} {BASE_CHAIN}\n\
         add rule bridge {TABLE} {BASE_CHAIN} iifname vmap @{MAP}\n"
    )
}

/// The transaction of one pod's ADD. Idempotent: a retried ADD flushes and
/// refills the pod's chain, and re-adding an equal element is no error.
pub fn add_script(host_veth: &str, mac: &str, with_base: bool) -> String {
    let chain = chain_name(host_veth);
    let mut s = if with_base {
        base_script()
    } else {
        String::new()
    };
    s.push_str(&format!(
        "add chain bridge {TABLE} {chain}\n\
         flush chain bridge {TABLE} {chain}\n\
         add rule bridge {TABLE} {chain} ether saddr {mac} return\n\
         add rule bridge {TABLE} {chain} drop\n\
         add element bridge {TABLE} {MAP} {{ \"{host_veth}\" : jump {chain} }}\n"
    ));
    s
}

/// The transaction of one pod's DEL. nft 1.0.6 has no `destroy`, and a
/// `delete` of something missing fails the whole transaction, so everything
/// deleted is first added: the transaction succeeds whether or not the
/// pod's state (or all of it) is there, e.g. when two DELs race.
pub fn del_script(host_veth: &str) -> String {
    let chain = chain_name(host_veth);
    format!(
        "add table bridge {TABLE}\n\
         add map bridge {TABLE} {MAP} {{ type ifname : verdict; }}\n\
         add chain bridge {TABLE} {chain}\n\
         add element bridge {TABLE} {MAP} {{ \"{host_veth}\" : jump {chain} }}\n\
         delete element bridge {TABLE} {MAP} {{ \"{host_veth}\" }}\n\
         flush chain bridge {TABLE} {chain}\n\
         delete chain bridge {TABLE} {chain}\n"
    )
}

/// ADD: the pod behind `host_veth` may only send from `mac`.
pub fn add(host_veth: &str, mac: &str) -> ferry_netops::Result<()> {
    let with_base = !nft::chain_exists(NftFamily::Bridge, TABLE, BASE_CHAIN)?;
    nft::apply_script(&add_script(host_veth, mac, with_base))
}

/// DEL (and ADD's undo): removes the pod's chain and element; nothing to do
/// (one netlink lookup) when its chain is not there.
pub fn remove(host_veth: &str) -> ferry_netops::Result<()> {
    if !nft::chain_exists(NftFamily::Bridge, TABLE, &chain_name(host_veth))? {
        return Ok(());
    }
    nft::apply_script(&del_script(host_veth))
}

/// What CHECK found wrong, if anything.
pub fn problem(host_veth: &str, mac: &[u8; 6]) -> ferry_netops::Result<Option<String>> {
    let chain = chain_name(host_veth);
    if !nft::chain_exists(NftFamily::Bridge, TABLE, BASE_CHAIN)? {
        return Ok(Some(format!(
            "chain {BASE_CHAIN} missing from table bridge {TABLE}"
        )));
    }
    let rules = nft::chain_rules(NftFamily::Bridge, TABLE, &chain)?;
    if rules.is_empty() {
        return Ok(Some(format!(
            "chain {chain} missing (or empty) in table bridge {TABLE}"
        )));
    }
    if !rules.iter().any(|r| carries_value(r, mac)) {
        return Ok(Some(format!(
            "chain {chain} in table bridge {TABLE} does not allow the pod's MAC {}",
            crate::config::format_mac(mac)
        )));
    }
    if !nft::set_has_key(NftFamily::Bridge, TABLE, MAP, &ifname_key(host_veth))? {
        return Ok(Some(format!(
            "{host_veth} missing from map {MAP} of table bridge {TABLE}"
        )));
    }
    Ok(None)
}

/// An `ifname` set key: the name zero-padded to IFNAMSIZ.
fn ifname_key(name: &str) -> [u8; 16] {
    let mut k = [0u8; 16];
    let n = name.len().min(15);
    k[..n].copy_from_slice(&name.as_bytes()[..n]);
    k
}

/// Whether a raw nf_tables rule message holds a constant (NFTA_DATA_VALUE
/// attribute, e.g. a `cmp` operand) equal to `value`.
fn carries_value(rule: &[u8], value: &[u8]) -> bool {
    let mut attr = Vec::with_capacity(4 + value.len());
    attr.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    attr.extend_from_slice(&1u16.to_ne_bytes()); // NFTA_DATA_VALUE
    attr.extend_from_slice(value);
    rule.windows(attr.len()).any(|w| w == attr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts() {
        let s = add_script("veth0123456789a", "0a:58:0a:00:00:05", true);
        assert!(s.starts_with("add table bridge ferry\n"));
        assert!(s.contains("iifname vmap @spoofchk"));
        assert!(s.contains(
            "add rule bridge ferry mac-veth0123456789a ether saddr 0a:58:0a:00:00:05 return"
        ));
        assert!(s.contains(
            "add element bridge ferry spoofchk { \"veth0123456789a\" : jump mac-veth0123456789a }"
        ));
        let s = add_script("veth0123456789a", "0a:58:0a:00:00:05", false);
        assert!(!s.contains("prerouting") && s.lines().count() == 5);
        let d = del_script("veth0123456789a");
        assert!(d.find("add element").unwrap() < d.find("delete element").unwrap());
        assert!(d.ends_with("delete chain bridge ferry mac-veth0123456789a\n"));
    }

    #[test]
    fn raw_helpers() {
        assert_eq!(&ifname_key("veth1")[..6], b"veth1\0");
        let mac = [0x0a, 0x58, 1, 2, 3, 4];
        let mut rule = vec![0u8; 8];
        rule.extend_from_slice(&10u16.to_ne_bytes());
        rule.extend_from_slice(&1u16.to_ne_bytes());
        rule.extend_from_slice(&mac);
        assert!(carries_value(&rule, &mac));
        assert!(!carries_value(&rule, &[0x0a, 0x58, 1, 2, 3, 5]));
    }
}
