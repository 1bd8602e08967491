//! Masquerade of a network's pod subnets, in ferry's own nftables table.
//!
//! Layout (one table for every ferry network on the node):
//!
//! ```text
//! table inet ferry {
//!   chain net-<network> { ip daddr 10.88.0.0/24 return; ip daddr 224.0.0.0/4 return; … masquerade }
//!   map masq-v4 { type ipv4_addr : verdict; flags interval; elements = { 10.88.0.0/24 : jump net-<network> } }
//!   map masq-v6 { … }
//!   chain postrouting { type nat hook postrouting priority srcnat; ip saddr vmap @masq-v4; ip6 saddr vmap @masq-v6 }
//! }
//! ```
//!
//! Pods add nothing: the state is per network, created by the first ADD in
//! one atomic transaction and only looked up by the others, so DEL has no
//! netfilter state to clean up even when the pod's namespace is gone.

use ferry_netops::nft::{self, NftFamily};
use ipnetwork::IpNetwork;

pub const TABLE: &str = "ferry";

/// The per-network chain. Network names are `[a-zA-Z0-9][a-zA-Z0-9_.-]*`
/// (checked by the skeleton), all valid in an unquoted nft identifier after the `net-` prefix
/// (nft 1.0.6 refuses quoted chain names in commands).
pub fn chain_name(network: &str) -> String {
    format!("net-{network}")
}

/// The transaction that makes masquerading for `subnets` of `network`
/// exist. Idempotent: running it again (two first ADDs racing) leaves the
/// same state, because each chain is flushed and refilled in the same
/// transaction and map elements are keyed by subnet. Traffic to `exclude`
/// (e.g. the cluster network) keeps its source too.
pub fn script(network: &str, subnets: &[IpNetwork], exclude: &[IpNetwork]) -> String {
    let chain = chain_name(network);
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
    for net in exclude {
        let proto = if net.is_ipv4() { "ip" } else { "ip6" };
        s.push_str(&format!(
            "add rule inet ferry {chain} {proto} daddr {net} return\n"
        ));
    }
    for net in subnets {
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
    for net in subnets {
        let map = if net.is_ipv4() { "masq-v4" } else { "masq-v6" };
        s.push_str(&format!(
            "add element inet ferry {map} {{ {net} : jump {chain} }}\n"
        ));
    }
    s
}

/// Makes sure `network` masquerades `subnets`: one netlink lookup when it
/// already does, one nft transaction the first time.
pub fn ensure(
    network: &str,
    subnets: &[IpNetwork],
    exclude: &[IpNetwork],
) -> ferry_netops::Result<()> {
    if nft::chain_exists(NftFamily::Inet, TABLE, &chain_name(network))? {
        return Ok(());
    }
    let script = script(network, subnets, exclude);
    if nft::apply_script(&script).is_ok() {
        return Ok(());
    }
    // The usual cause: a subnet still mapped to the chain of a network that
    // was renamed (same bridge and subnet, new conflist name). The new
    // network takes the subnet over; elements that are not there make their
    // delete fail, so each goes alone and failures are ignored.
    for net in subnets {
        let map = if net.is_ipv4() { "masq-v4" } else { "masq-v6" };
        let _ = nft::apply_script(&format!("delete element inet ferry {map} {{ {net} }}\n"));
    }
    nft::apply_script(&script)
}

/// CHECK: the network's chain is there.
pub fn present(network: &str) -> ferry_netops::Result<bool> {
    nft::chain_exists(NftFamily::Inet, TABLE, &chain_name(network))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_covers_both_families() {
        let s = script(
            "pods",
            &[
                "10.88.0.0/24".parse().unwrap(),
                "fd00:88::/64".parse().unwrap(),
            ],
            &["10.88.0.0/16".parse().unwrap()],
        );
        assert!(s.contains("add rule inet ferry net-pods ip daddr 10.88.0.0/16 return"));
        assert!(s.contains("add rule inet ferry net-pods ip daddr 10.88.0.0/24 return"));
        assert!(s.contains("ip6 daddr fd00:88::/64 return"));
        assert!(s.contains("add element inet ferry masq-v4 { 10.88.0.0/24 : jump net-pods }"));
        assert!(s.contains("add element inet ferry masq-v6 { fd00:88::/64 : jump net-pods }"));
        assert!(s.find("add chain inet ferry net-pods").unwrap() < s.find("add map").unwrap());
        assert_eq!(s.matches("masquerade").count(), 1);
    }
}
