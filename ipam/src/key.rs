//! Addresses as integers, and a set of them kept as sorted runs so that the
//! next free address after a cursor is found in O(log runs), however full the
//! range is.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address as a number: IPv6 as itself, IPv4 as its IPv4-mapped IPv6
/// form (IPv4-mapped IPv6 subnets are refused by the config, so the two never
/// collide).
pub type Key = u128;

const V4_MAPPED: u128 = 0xffff_0000_0000;

pub fn key(ip: IpAddr) -> Key {
    match ip {
        IpAddr::V4(a) => V4_MAPPED | u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

pub fn from_key(k: Key, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from((k & 0xffff_ffff) as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(k))
    }
}

/// A set of keys as disjoint, non-adjacent inclusive runs `start → end`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSet {
    runs: BTreeMap<Key, Key>,
}

impl RunSet {
    pub fn runs(&self) -> impl Iterator<Item = (Key, Key)> + '_ {
        self.runs.iter().map(|(a, b)| (*a, *b))
    }

    /// Builds from runs as stored; `None` when they overlap or are unordered.
    pub fn from_runs(runs: impl IntoIterator<Item = (Key, Key)>) -> Option<RunSet> {
        let mut set = RunSet::default();
        let mut prev: Option<Key> = None;
        for (a, b) in runs {
            if a > b || prev.is_some_and(|p| a <= p.saturating_add(1)) {
                return None;
            }
            set.runs.insert(a, b);
            prev = Some(b);
        }
        Some(set)
    }

    fn run_of(&self, k: Key) -> Option<(Key, Key)> {
        let (a, b) = self.runs.range(..=k).next_back()?;
        (*b >= k).then_some((*a, *b))
    }

    pub fn contains(&self, k: Key) -> bool {
        self.run_of(k).is_some()
    }

    pub fn insert(&mut self, k: Key) {
        if self.contains(k) {
            return;
        }
        let mut start = k;
        let mut end = k;
        if let Some(prev) = k.checked_sub(1).and_then(|p| self.run_of(p)) {
            self.runs.remove(&prev.0);
            start = prev.0;
        }
        if let Some(next_end) = k.checked_add(1).and_then(|n| self.runs.remove(&n)) {
            end = next_end;
        }
        self.runs.insert(start, end);
    }

    pub fn remove(&mut self, k: Key) {
        let Some((a, b)) = self.run_of(k) else { return };
        self.runs.remove(&a);
        if a < k {
            self.runs.insert(a, k - 1);
        }
        if k < b {
            self.runs.insert(k + 1, b);
        }
    }

    /// The smallest key in `lo..=hi` not in the set.
    pub fn next_free(&self, lo: Key, hi: Key) -> Option<Key> {
        if lo > hi {
            return None;
        }
        match self.run_of(lo) {
            None => Some(lo),
            Some((_, b)) => {
                // Runs are non-adjacent, so b + 1 is free.
                let k = b.checked_add(1)?;
                (k <= hi).then_some(k)
            }
        }
    }

    /// How many keys of `lo..=hi` are in the set.
    pub fn count_in(&self, lo: Key, hi: Key) -> u128 {
        let mut n = 0u128;
        let first = self.run_of(lo).map(|(a, _)| a).unwrap_or(lo);
        for (&a, &b) in self.runs.range(first..=hi) {
            let (a, b) = (a.max(lo), b.min(hi));
            if a <= b {
                n = n.saturating_add(b - a + 1);
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for s in [
            "10.0.0.1",
            "255.255.255.255",
            "0.0.0.0",
            "fd00::1",
            "::",
            "2001:db8::ff",
        ] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(from_key(key(ip), ip.is_ipv4()), ip);
        }
        assert_eq!(
            key("10.0.0.2".parse().unwrap()) - key("10.0.0.1".parse().unwrap()),
            1
        );
    }

    #[test]
    fn runs_merge_split_and_search() {
        let mut s = RunSet::default();
        for k in [5, 7, 6, 1, 2, 9] {
            s.insert(k);
        }
        assert_eq!(s.runs().collect::<Vec<_>>(), vec![(1, 2), (5, 7), (9, 9)]);
        assert_eq!(s.next_free(1, 100), Some(3));
        assert_eq!(s.next_free(5, 100), Some(8));
        assert_eq!(s.next_free(5, 7), None);
        assert_eq!(s.next_free(0, 0), Some(0));
        assert_eq!(s.count_in(0, 100), 6);
        assert_eq!(s.count_in(6, 9), 3);
        s.remove(6);
        assert_eq!(
            s.runs().collect::<Vec<_>>(),
            vec![(1, 2), (5, 5), (7, 7), (9, 9)]
        );
        s.remove(6);
        s.remove(1);
        assert_eq!(
            s.runs().collect::<Vec<_>>(),
            vec![(2, 2), (5, 5), (7, 7), (9, 9)]
        );
        assert_eq!(RunSet::from_runs(s.runs()), Some(s.clone()));
        assert_eq!(
            RunSet::from_runs([(1, 2), (3, 4)]),
            None,
            "adjacent runs are not canonical"
        );
        assert_eq!(RunSet::from_runs([(5, 6), (1, 2)]), None);
        let mut m = RunSet::default();
        m.insert(u128::MAX);
        m.insert(0);
        assert_eq!(m.next_free(u128::MAX, u128::MAX), None);
        assert_eq!(m.next_free(0, 3), Some(1));
    }
}
