//! Measures the two ways ferry touches nftables (docs/nftables.md): the
//! netlink lookup asked on every ADD, and the `nft -f -` transaction run once
//! per network. Run as root inside a throwaway namespace:
//! `unshare -n cargo run --release -p ferry-netops --example nft_cost`
use ferry_netops::nft::{NftFamily, apply_script, chain_exists};
use std::time::Instant;

fn main() {
    let script = "add table inet ferrycost\nadd chain inet ferrycost net-x\nflush chain inet ferrycost net-x\n\
                  add rule inet ferrycost net-x ip daddr 10.1.0.0/24 return\nadd rule inet ferrycost net-x masquerade\n";
    let n = 20;
    let t = Instant::now();
    for _ in 0..n {
        apply_script(script).expect("nft transaction");
    }
    let per_apply = t.elapsed() / n;
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        assert!(chain_exists(NftFamily::Inet, "ferrycost", "net-x").expect("lookup"));
    }
    let per_lookup = t.elapsed() / n;
    assert!(!chain_exists(NftFamily::Inet, "ferrycost", "missing").expect("lookup"));
    apply_script("delete table inet ferrycost\n").expect("cleanup");
    println!("nft -f - transaction: {per_apply:?} each; netlink chain lookup: {per_lookup:?} each");
}
