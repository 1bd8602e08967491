//! Masquerade of a network's pod subnets, in ferry's own nftables table.
//!
//! Layout (one table for every ferry network on the node):
//!
//! ```text
//! table inet ferry {
//!   chain net-<network>-<digest> { ip daddr <excluded> return; ip daddr 10.88.0.0/24 return; ip daddr 224.0.0.0/4 return; … masquerade }
//!   map masq-v4 { type ipv4_addr : verdict; flags interval; elements = { 10.88.0.0/24 : jump net-<network>-<digest> } }
//!   map masq-v6 { … }
//!   chain postrouting { type nat hook postrouting priority srcnat; ip saddr vmap @masq-v4; ip6 saddr vmap @masq-v6 }
//! }
//! ```
//!
//! Pods add nothing: the state is per network and configuration. The chain's
//! name carries a digest of what it implements (the network, the pod's
//! subnets, `ipMasqExclude`), so "is this pod's subnet masqueraded as this
//! configuration says?" is one netlink lookup of that chain on every ADD.
//! When it is missing (first pod, a re-leased subnet, a changed
//! `ipMasqExclude`) one transaction creates the chain and points the
//! subnets' map elements at it, retiring the chains they pointed at before.
//! DEL has no netfilter state to clean up, even when the namespace is gone.
//!
//! Invariant behind the one lookup: a chain with a configuration's name
//! exists only while every subnet it was made for jumps to it. The
//! transaction that moves a subnet away from a chain deletes that chain, or,
//! when other subnets still jump to it, renames it out of every
//! configuration's name (`net-retired-…`).

use ferry_netops::nft::{self, NftFamily};
use ipnetwork::IpNetwork;

pub const TABLE: &str = "ferry";
const RETIRED_PREFIX: &str = "net-retired-";

/// FNV-1a 64: stable across releases and platforms. Configurations are
/// written by the node's operator (or ferryd), not by pods.
fn fnv(parts: impl IntoIterator<Item = String>) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in parts {
        for b in part.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Subnets in a canonical order without repeats, so that the same
/// configuration always gets the same chain.
fn canonical(nets: &[IpNetwork]) -> Vec<IpNetwork> {
    let mut v: Vec<IpNetwork> = nets
        .iter()
        .map(|n| IpNetwork::new(n.network(), n.prefix()).expect("same prefix"))
        .collect();
    v.sort_by_key(|n| (n.is_ipv6(), n.ip(), n.prefix()));
    v.dedup();
    v
}

/// The chain masquerading `subnets` of `network` except towards `exclude`:
/// `net-<network>-<16 hex digits of a digest of all three>`. Network names
/// are `[a-zA-Z0-9][a-zA-Z0-9_.-]*` (checked by the skeleton), valid in an
/// unquoted nft identifier (nft 1.0.6 refuses quoted chain names); a name
/// too long for a chain (255 bytes) is cut, the digest keeps it unique.
pub fn chain_name(network: &str, subnets: &[IpNetwork], exclude: &[IpNetwork]) -> String {
    let digest = fnv(std::iter::once(network.to_string())
        .chain(canonical(subnets).iter().map(|n| format!("s{n}")))
        .chain(canonical(exclude).iter().map(|n| format!("x{n}"))));
    let shown = &network[..network.len().min(200)];
    format!("net-{shown}-{digest:016x}")
}

fn map_of(net: &IpNetwork) -> &'static str {
    if net.is_ipv4() { "masq-v4" } else { "masq-v6" }
}

/// The raw nftables key of a subnet's map element: its first address.
fn key_of(net: &IpNetwork) -> Vec<u8> {
    match net.network() {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The map elements of both families, as (map, element).
fn current_elements() -> ferry_netops::Result<Vec<(&'static str, nft::MapElement)>> {
    let mut out = Vec::new();
    for map in ["masq-v4", "masq-v6"] {
        for e in nft::map_elements(NftFamily::Inet, TABLE, map)? {
            out.push((map, e));
        }
    }
    Ok(out)
}

/// The transaction that makes `chain` masquerade `subnets` except towards
/// `exclude`, given the map elements there are now (`current`). Idempotent
/// and safe when two ADDs race: chains are flushed and refilled, and a
/// subnet's element is replaced only when it points elsewhere.
pub fn script(
    chain: &str,
    subnets: &[IpNetwork],
    exclude: &[IpNetwork],
    current: &[(&str, nft::MapElement)],
    retired_suffix: &str,
) -> String {
    let subnets = canonical(subnets);
    let mut s = String::new();
    s.push_str("add table inet ferry\n");
    // Chains before maps: nft 1.0.6 cannot resolve a jump to a chain declared
    // after the map in the same batch (ENOENT).
    s.push_str(&format!(
        "add chain inet ferry {chain}\nflush chain inet ferry {chain}\n"
    ));
    s.push_str(
        "add chain inet ferry postrouting { type nat hook postrouting priority srcnat; policy accept; }\n\
         flush chain inet ferry postrouting\n\
         add map inet ferry masq-v4 { type ipv4_addr : verdict; flags interval; }\n\
         add map inet ferry masq-v6 { type ipv6_addr : verdict; flags interval; }\n\
         add rule inet ferry postrouting ip saddr vmap @masq-v4\n\
         add rule inet ferry postrouting ip6 saddr vmap @masq-v6\n",
    );
    for net in canonical(exclude) {
        let proto = if net.is_ipv4() { "ip" } else { "ip6" };
        s.push_str(&format!(
            "add rule inet ferry {chain} {proto} daddr {net} return\n"
        ));
    }
    for net in &subnets {
        let (proto, multicast) = if net.is_ipv4() {
            ("ip", "224.0.0.0/4")
        } else {
            ("ip6", "ff00::/8")
        };
        s.push_str(&format!(
            "add rule inet ferry {chain} {proto} daddr {net} return\n"
        ));
        s.push_str(&format!(
            "add rule inet ferry {chain} {proto} daddr {multicast} return\n"
        ));
    }
    s.push_str(&format!("add rule inet ferry {chain} masquerade\n"));

    // Subnets whose element points at another chain (an older configuration,
    // a renamed network): that element goes, and so does the other chain
    // once nothing jumps to it.
    let (deletions, moved_from) = release(&subnets, current, Some(chain));
    s.push_str(&deletions);
    for net in &subnets {
        s.push_str(&format!(
            "add element inet ferry {} {{ {net} : jump {chain} }}\n",
            map_of(net)
        ));
    }
    s.push_str(&retire(&moved_from, &subnets, current, retired_suffix));
    s
}

/// The deletions of the elements of `subnets` that jump anywhere but to
/// `keep`, and the chains they jumped to.
fn release<'a>(
    subnets: &[IpNetwork],
    current: &'a [(&str, nft::MapElement)],
    keep: Option<&str>,
) -> (String, Vec<&'a str>) {
    let mut s = String::new();
    let mut moved_from: Vec<&str> = Vec::new();
    for net in subnets {
        let map = map_of(net);
        let key = key_of(net);
        let old = current
            .iter()
            .find_map(|(m, e)| (*m == map && e.key == key).then_some(e.chain.as_deref()?));
        if let Some(old_chain) = old {
            if Some(old_chain) == keep {
                continue;
            }
            s.push_str(&format!("delete element inet ferry {map} {{ {net} }}\n"));
            if !moved_from.contains(&old_chain) {
                moved_from.push(old_chain);
            }
        }
    }
    (s, moved_from)
}

/// After the elements of `subnets` left the chains `moved_from`: each is
/// deleted when nothing else jumps to it, else renamed out of every
/// configuration's name (it keeps serving the other subnets).
fn retire(
    moved_from: &[&str],
    subnets: &[IpNetwork],
    current: &[(&str, nft::MapElement)],
    retired_suffix: &str,
) -> String {
    let mut s = String::new();
    for old in moved_from {
        let still_used = current.iter().any(|(m, e)| {
            e.chain.as_deref() == Some(*old)
                && !subnets
                    .iter()
                    .any(|n| map_of(n) == *m && key_of(n) == e.key)
        });
        if !still_used {
            s.push_str(&format!(
                "flush chain inet ferry {old}\ndelete chain inet ferry {old}\n"
            ));
        } else if !old.starts_with(RETIRED_PREFIX) {
            s.push_str(&format!(
                "rename chain inet ferry {old} {RETIRED_PREFIX}{:016x}{retired_suffix}\n",
                fnv([old.to_string()])
            ));
        }
    }
    s
}

/// A suffix that makes a retired chain's name unique to this process.
fn retired_suffix() -> String {
    format!(
        "-{:x}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    )
}

/// Applies the transaction `make` builds from the current map elements;
/// another ADD may change them between the read and the transaction (which
/// then fails as a whole): read again, up to three times.
fn apply_with_retries(
    make: impl Fn(&[(&'static str, nft::MapElement)]) -> Option<String>,
) -> ferry_netops::Result<()> {
    let mut attempt = 0;
    loop {
        let current = current_elements()?;
        let Some(script) = make(&current) else {
            return Ok(());
        };
        match nft::apply_script(&script) {
            Ok(()) => return Ok(()),
            Err(_) if attempt < 2 => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

/// ADD without `ipMasq`: the pod's subnets must not be masqueraded, also
/// when an earlier configuration of this node did (`ipMasq` turned off, a
/// network renamed). One lookup when ferry masquerades nothing on the node.
pub fn ensure_absent(subnets: &[IpNetwork]) -> ferry_netops::Result<()> {
    if !nft::chain_exists(NftFamily::Inet, TABLE, "postrouting")? {
        return Ok(());
    }
    let subnets = canonical(subnets);
    let suffix = retired_suffix();
    apply_with_retries(|current| {
        let (deletions, moved_from) = release(&subnets, current, None);
        if deletions.is_empty() {
            return None;
        }
        Some(deletions + &retire(&moved_from, &subnets, current, &suffix))
    })
}

/// Makes sure `network` masquerades `subnets` except towards `exclude`:
/// one netlink lookup when it already does, else one nft transaction.
pub fn ensure(
    network: &str,
    subnets: &[IpNetwork],
    exclude: &[IpNetwork],
) -> ferry_netops::Result<()> {
    let chain = chain_name(network, subnets, exclude);
    if nft::chain_exists(NftFamily::Inet, TABLE, &chain)? {
        return Ok(());
    }
    let suffix = retired_suffix();
    apply_with_retries(|current| Some(script(&chain, subnets, exclude, current, &suffix)))
}

/// CHECK: what is wrong with the masquerade of `subnets` (each subnet's
/// element jumps to this configuration's chain), if anything.
pub fn problem(
    network: &str,
    subnets: &[IpNetwork],
    exclude: &[IpNetwork],
) -> ferry_netops::Result<Option<String>> {
    let chain = chain_name(network, subnets, exclude);
    let current = current_elements()?;
    for net in canonical(subnets) {
        let map = map_of(&net);
        let key = key_of(&net);
        let found = current
            .iter()
            .find(|(m, e)| *m == map && e.key == key && e.chain.is_some());
        match found.and_then(|(_, e)| e.chain.as_deref()) {
            None => {
                return Ok(Some(format!(
                    "pod subnet {net} is not masqueraded: no element in map {map} of table inet ferry (want jump {chain})"
                )));
            }
            Some(c) if c != chain => {
                return Ok(Some(format!(
                    "pod subnet {net} is masqueraded by chain {c}, not {chain} (made for this network's subnets and ipMasqExclude)"
                )));
            }
            Some(_) => {}
        }
    }
    // The chain ends in a masquerade (not flushed by hand), and the base
    // chain looks the pod's family up in its map.
    let rules = nft::chain_rules(NftFamily::Inet, TABLE, &chain)?;
    if rules.is_empty() {
        return Ok(Some(format!(
            "masquerade chain {chain} missing (or empty) in table inet ferry"
        )));
    }
    if !rules.iter().any(|r| contains(r, b"masq\0")) {
        return Ok(Some(format!(
            "chain {chain} of table inet ferry has no masquerade rule"
        )));
    }
    let base = nft::chain_rules(NftFamily::Inet, TABLE, "postrouting")?;
    for net in canonical(subnets) {
        let map = map_of(&net);
        let name = format!("{map}\0");
        if !base.iter().any(|r| contains(r, name.as_bytes())) {
            return Ok(Some(format!(
                "chain postrouting of table inet ferry does not look up map {map}"
            )));
        }
    }
    Ok(None)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNetwork> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn chain_names_follow_the_configuration() {
        let a = chain_name("pods", &nets(&["10.88.0.0/24"]), &nets(&["10.88.0.0/16"]));
        assert!(
            a.starts_with("net-pods-") && a.len() == "net-pods-".len() + 16,
            "{a}"
        );
        // Order and host bits do not matter.
        assert_eq!(
            chain_name(
                "pods",
                &nets(&["fd00::/64", "10.88.0.0/24"]),
                &nets(&["10.88.0.0/16"])
            ),
            chain_name(
                "pods",
                &nets(&["10.88.0.5/24", "fd00::/64"]),
                &nets(&["10.88.1.0/16", "10.88.0.0/16"])
            )
        );
        assert_ne!(
            a,
            chain_name("pods", &nets(&["10.88.1.0/24"]), &nets(&["10.88.0.0/16"]))
        );
        assert_ne!(
            a,
            chain_name("pods", &nets(&["10.88.0.0/24"]), &nets(&["10.0.0.0/8"]))
        );
        assert_ne!(
            a,
            chain_name("pod", &nets(&["10.88.0.0/24"]), &nets(&["10.88.0.0/16"]))
        );
        assert!(chain_name(&"n".repeat(300), &[], &[]).len() < 256);
    }

    #[test]
    fn script_covers_both_families() {
        let subnets = nets(&["10.88.0.0/24", "fd00:88::/64"]);
        let s = script("net-pods-x", &subnets, &nets(&["10.88.0.0/16"]), &[], "");
        assert!(s.contains("add rule inet ferry net-pods-x ip daddr 10.88.0.0/16 return"));
        assert!(s.contains("add rule inet ferry net-pods-x ip daddr 10.88.0.0/24 return"));
        assert!(s.contains("ip6 daddr fd00:88::/64 return"));
        assert!(s.contains("add element inet ferry masq-v4 { 10.88.0.0/24 : jump net-pods-x }"));
        assert!(s.contains("add element inet ferry masq-v6 { fd00:88::/64 : jump net-pods-x }"));
        assert!(s.find("add chain inet ferry net-pods-x").unwrap() < s.find("add map").unwrap());
        assert_eq!(s.matches("masquerade").count(), 1);
        assert!(!s.contains("delete"));
    }

    #[test]
    fn script_moves_subnets_and_retires_old_chains() {
        let el = |map: &'static str, key: &[u8], chain: &str| {
            (
                map,
                nft::MapElement {
                    key: key.to_vec(),
                    chain: Some(chain.to_string()),
                },
            )
        };
        let subnets = nets(&["10.88.0.0/24", "fd00:88::/64"]);
        let mut v6key = vec![0xfd, 0, 0, 0x88];
        v6key.resize(16, 0);
        // Both subnets were on one old chain: it goes.
        let current = [
            el("masq-v4", &[10, 88, 0, 0], "net-pods-old"),
            el("masq-v6", &v6key, "net-pods-old"),
        ];
        let s = script("net-pods-new", &subnets, &[], &current, "-1");
        assert!(s.contains("delete element inet ferry masq-v4 { 10.88.0.0/24 }"));
        assert!(s.contains("delete element inet ferry masq-v6 { fd00:88::/64 }"));
        assert!(s.ends_with("delete chain inet ferry net-pods-old\n"), "{s}");
        // Another subnet still uses the old chain: renamed, not deleted.
        let current = [
            el("masq-v4", &[10, 88, 0, 0], "net-pods-old"),
            el("masq-v4", &[10, 89, 0, 0], "net-pods-old"),
        ];
        let s = script(
            "net-pods-new",
            &nets(&["10.88.0.0/24"]),
            &[],
            &current,
            "-1",
        );
        assert!(
            s.contains("rename chain inet ferry net-pods-old net-retired-"),
            "{s}"
        );
        assert!(!s.contains("delete chain"));
        // Already pointing at the chain: nothing deleted.
        let current = [el("masq-v4", &[10, 88, 0, 0], "net-pods-new")];
        let s = script(
            "net-pods-new",
            &nets(&["10.88.0.0/24"]),
            &[],
            &current,
            "-1",
        );
        assert!(!s.contains("delete"));
    }
}
