#!/usr/bin/env bash
# ferry-loopback end to end in a throwaway named netns: lo DOWN → ADD (the
# JSON result) → lo UP → CHECK → DEL → lo DOWN. Needs root. The netns is
# deleted on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/demo.sh: must run as root (it creates a network namespace)" >&2
    exit 1
fi
if ! command -v ip >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y iproute2
fi

echo "== building ferry-loopback (release)"
cargo build --release -p ferry-loopback
plugin=$PWD/target/release/ferry-loopback

ns=ferry-demo-$$
ip netns add "$ns"
trap 'ip netns del "$ns" 2>/dev/null || true' EXIT

export CNI_CONTAINERID=demo-$$ CNI_NETNS=/run/netns/$ns CNI_IFNAME=lo CNI_PATH=$PWD/target/release
conf='{"cniVersion":"1.1.0","name":"demo","type":"ferry-loopback"}'

show() { echo "-- $1:"; ip -n "$ns" link show lo; }
cni() {
    echo "== CNI_COMMAND=$1"
    local out rc=0
    out=$(CNI_COMMAND=$1 "$plugin" <<<"$conf") || rc=$?
    if [ -n "$out" ]; then
        if command -v jq >/dev/null 2>&1; then jq . <<<"$out"; else echo "$out"; fi
    fi
    echo "   exit $rc"
    return "$rc"
}

show "lo in the new netns $ns (DOWN)"
cni ADD
show "after ADD (UP)"
cni CHECK
cni DEL
show "after DEL (DOWN again)"
echo "== done; the netns $ns is deleted on exit"
