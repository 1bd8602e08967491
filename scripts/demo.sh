#!/usr/bin/env bash
# The single-node pod network, end to end: a throwaway "node" (a private
# network + mount namespace), two pods ADDed through the chain a runtime
# runs (ferry-loopback, then ferry-bridge with ferry-ipam), a ping matrix over
# IPv4 and IPv6, CHECK, DEL, and proof that nothing is left. Needs root.
# Everything lives in namespaces that vanish when the script exits.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/demo.sh: must run as root (it creates network namespaces)" >&2
    exit 1
fi
need=()
for p in iproute2 iputils-ping nftables jq; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ "${1:-}" != "--inside" ]; then
    echo "== building the plugins as shipped (scripts/build-dist.sh)"
    ./scripts/build-dist.sh >/dev/null
    mkdir -p /run/netns
    # The node: its own network namespace (bridge, veths, nft table) and mount
    # namespace (`ip netns add` mounts on a private tmpfs). Gone on exit.
    exec unshare -nm --propagation private "$0" --inside
fi

mount -t tmpfs ferry-demo /run/netns
ip link set lo up
data=$(mktemp -d /tmp/ferry-demo.XXXXXX)
trap 'rm -rf "$data"' EXIT
bin=$PWD/target/dist

conf=$(jq -nc --arg d "$data" '{cniVersion: "1.1.0", name: "demo", plugins: [
  {type: "ferry-loopback"},
  {type: "ferry-bridge", bridge: "cni0", isGateway: true, ipMasq: true, mtu: 1450,
   ipam: {type: "ferry-ipam", dataDir: $d,
          ranges: [[{subnet: "10.244.1.0/24"}], [{subnet: "fd00:244:1::/64"}]],
          routes: [{dst: "0.0.0.0/0"}, {dst: "::/0"}]}}]}')

# One plugin of the chain, as a runtime runs it: the list's name and version
# injected, the previous result passed on.
plugin() { # cmd pod index prev
    local cmd=$1 pod=$2 i=$3 prev=${4:-null} ifname
    ifname=$([ "$i" = 0 ] && echo lo || echo eth0)
    jq -c --argjson i "$i" --argjson prev "$prev" \
        '.plugins[$i] + {cniVersion: .cniVersion, name: .name} + (if $prev == null then {} else {prevResult: $prev} end)' <<<"$conf" |
        CNI_COMMAND=$cmd CNI_CONTAINERID=$pod CNI_NETNS=/run/netns/$pod CNI_IFNAME=$ifname CNI_PATH=$bin \
            "$bin/$(jq -r --argjson i "$i" '.plugins[$i].type' <<<"$conf")"
}

declare -A result
for pod in pod-a pod-b; do
    ip netns add "$pod"
    lo=$(plugin ADD "$pod" 0)
    result[$pod]=$(plugin ADD "$pod" 1 "$lo")
    echo "== ADD $pod:"
    jq -c '{interfaces: [.interfaces[] | .name], ips: [.ips[] | .address]}' <<<"${result[$pod]}"
done

addr() { jq -r --arg f "$2" '.ips[] | select((.address | contains(":")) == ($f == "6")) | .address | split("/")[0]' <<<"${result[$1]}"; }
echo "== ping matrix (from row to column)"
printf '%-8s %-22s %-22s %-14s %-14s\n' "" "pod-a v4/v6" "pod-b v4/v6" "gw v4" "gw v6"
for from in pod-a pod-b; do
    row=$(printf '%-8s' "$from")
    for to in pod-a pod-b; do
        r4=FAIL r6=FAIL
        ip netns exec "$from" ping -c1 -W2 "$(addr $to 4)" >/dev/null && r4=ok
        ip netns exec "$from" ping -6 -c1 -W2 "$(addr $to 6)" >/dev/null && r6=ok
        row+=$(printf ' %-22s' "$r4/$r6")
    done
    g4=FAIL g6=FAIL
    ip netns exec "$from" ping -c1 -W2 10.244.1.1 >/dev/null && g4=ok
    ip netns exec "$from" ping -6 -c1 -W2 fd00:244:1::1 >/dev/null && g6=ok
    echo "$row $(printf '%-14s %-14s' $g4 $g6)"
done

echo "== CHECK pod-a: loopback $(plugin CHECK pod-a 0 && echo ok), bridge $(plugin CHECK pod-a 1 "${result[pod-a]}" && echo ok)"
echo "== the node's masquerade state (one table, per network, not per pod):"
nft list table inet ferry | sed 's/^/   /'

for pod in pod-a pod-b; do
    plugin DEL "$pod" 1 "${result[$pod]}"
    plugin DEL "$pod" 0
    ip netns del "$pod"
done
echo "== after DEL: veths on the node: $(ip -o link show type veth | wc -l), reservations: $(find "$data/demo" -maxdepth 1 -name '10.*' -o -maxdepth 1 -name 'fd00*' | wc -l)"
