#!/usr/bin/env bash
# A multi-node ferry cluster on one machine, out of network namespaces:
#
#   ferrylab-ul        the underlay: a bridge (192.168.77.1/24) and a real etcd
#   ferrylab-n1..nN    the nodes: eth0 on the underlay, one ferryd each
#   ferrylab-nI-pJ     two pods per node, ADDed through the conflist ferryd
#                      wrote, by cnirun (which chains plugins as libcni does)
#
#   sudo ./scripts/lab.sh up [--nodes 3] [--backend vxlan|host-gw|vxlan-direct]
#   sudo ./scripts/lab.sh status     # leases, readiness, matrix again
#   sudo ./scripts/lab.sh doctor [n1] [--json] [--probe]
#                                    # `ferryd doctor` inside a node
#   sudo ./scripts/lab.sh down       # removes everything `up` created
#
# `up` builds the binaries as shipped (scripts/build-dist.sh: static plugins,
# dynamic ferryd and cnirun, in target/dist), prints a pod-to-pod ping matrix and an
# iperf3 figure across nodes, and leaves the lab running for manual testing
# (e.g. `ip netns exec ferrylab-n1-p1 ping <pod ip>`, or the node's
# http://192.168.77.11:9946/metrics from inside ferrylab-n1).
set -euo pipefail
cd "$(dirname "$0")/.."

P=ferrylab
STATE=/run/ferry-lab
UL_NET=192.168.77
ETCD=http://$UL_NET.1:2379
BIN=$PWD/target/dist

die() { echo "lab: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (it creates network namespaces)"

install_packages() {
    local need=() p
    for p in iproute2 iputils-ping nftables etcd-server iperf3 protobuf-compiler; do
        dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "== installing ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
}

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
# For daemons: nsenter execs in place (ip netns exec forks), so $! is the
# daemon's own pid and `down` can stop it.
daemon_in_ns() { local ns=$1; shift; exec nsenter --net="/run/netns/$ns" "$@"; }

# GET a path of a node's ferryd with bash's /dev/tcp (no curl needed).
http_get() { # node path
    in_ns "$P-n$1" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9946 && printf "GET %s HTTP/1.0\r\n\r\n" "$0" >&3 && cat <&3' "$2" 2>/dev/null
}

nodes() { cat "$STATE/nodes" 2>/dev/null || echo 0; }

pod_ip() { # pod-netns
    in_ns "$1" ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1
}

start_etcd() {
    mkdir -p "$STATE/etcd"
    (daemon_in_ns "$P-ul" etcd --name lab --data-dir "$STATE/etcd/data" \
        --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
        --listen-peer-urls "http://$UL_NET.1:2380" --initial-advertise-peer-urls "http://$UL_NET.1:2380" \
        --initial-cluster "lab=http://$UL_NET.1:2380") >"$STATE/etcd/log" 2>&1 &
    echo $! >"$STATE/etcd/pid"
    for _ in $(seq 100); do
        in_ns "$P-ul" "$BIN/ferryd" --etcd-endpoints "$ETCD" show >/dev/null 2>&1 && return 0
        in_ns "$P-ul" bash -c "exec 3<>/dev/tcp/$UL_NET.1/2379" 2>/dev/null && return 0
        sleep 0.1
    done
    die "etcd did not start; see $STATE/etcd/log"
}

# A node's ferryd flags: the daemon and `ferryd doctor` take the same ones.
node_flags() { # i
    local i=$1 d=$STATE/n$1
    echo --etcd-endpoints "$ETCD" --node-name "n$i" \
        --cni-conf-dir "$d/net.d" --subnet-file "$d/subnet.env" --ipam-data-dir "$d/ipam" \
        --cni-log "$d/cni.log" --cni-bin-dir "$BIN" --listen 127.0.0.1:9946
}

start_ferryd() { # i
    local i=$1 d=$STATE/n$1
    mkdir -p "$d"
    # shellcheck disable=SC2046 # the flags are words without spaces
    (daemon_in_ns "$P-n$i" "$BIN/ferryd" $(node_flags "$i")) >>"$d/ferryd.log" 2>&1 &
    echo $! >"$d/ferryd.pid"
}

wait_ready() { # i
    local i=$1
    for _ in $(seq 200); do
        [[ "$(http_get "$i" /readyz)" == *$'\r\n\r\nready'* ]] && return 0
        sleep 0.05
    done
    die "ferryd on n$i is not ready; see $STATE/n$i/ferryd.log"
}

cnirun() { # node verb pod
    local i=$1 verb=$2 pod=$3 d=$STATE/n$1
    in_ns "$P-n$i" env CNI_PATH="$BIN" CNI_CACHE_DIR="$d/cache" "$BIN/cnirun" \
        "$verb" "$d/net.d/10-ferry.conflist" "/run/netns/$P-n$i-$pod" "n$i-$pod" eth0
}

matrix() {
    local n=$(nodes) pods=() p q ok=0 bad=0
    for i in $(seq "$n"); do for j in 1 2; do pods+=("n$i-p$j"); done; done
    printf '%-10s' "from\\to"
    for q in "${pods[@]}"; do printf '%-8s' "$q"; done
    echo
    for p in "${pods[@]}"; do
        printf '%-10s' "$p"
        for q in "${pods[@]}"; do
            if in_ns "$P-$p" ping -c1 -W1 -q "$(pod_ip "$P-$q")" >/dev/null 2>&1; then
                printf '%-8s' ok; ok=$((ok + 1))
            else
                printf '%-8s' FAIL; bad=$((bad + 1))
            fi
        done
        echo
    done
    echo "== $ok of $((ok + bad)) pod pairs reachable"
    [ "$bad" -eq 0 ]
}

iperf() {
    [ "$(nodes)" -ge 2 ] || return 0
    local server=$P-n2-p1 ip
    ip=$(pod_ip "$server")
    in_ns "$server" iperf3 -s -1 -D -I "$STATE/iperf.pid" >/dev/null
    sleep 0.3
    echo "== iperf3 n1-p1 -> n2-p1 ($ip), across nodes:"
    in_ns "$P-n1-p1" iperf3 -c "$ip" -t 3 -f m | grep -E 'receiver' || echo "iperf3 failed"
}

up() {
    local n=3 backend=vxlan
    while [ $# -gt 0 ]; do
        case $1 in
            --nodes) n=$2; shift 2 ;;
            --backend) backend=$2; shift 2 ;;
            *) die "unknown option $1 (try --nodes N, --backend vxlan|host-gw|vxlan-direct)" ;;
        esac
    done
    [ ! -e "$STATE" ] || die "a lab is already up ($STATE exists); run: $0 down"
    local net
    case $backend in
        vxlan) net='{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1}}' ;;
        vxlan-direct) net='{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1,"directRouting":true}}' ;;
        host-gw) net='{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"host-gw"}}' ;;
        *) die "unknown backend $backend" ;;
    esac
    install_packages
    # A failed `up` removes what it created.
    trap 'rc=$?; [ $rc -eq 0 ] || { echo "lab: up failed; tearing down" >&2; down; }' EXIT
    echo "== building ferryd, the plugins and cnirun (scripts/build-dist.sh)"
    ./scripts/build-dist.sh >/dev/null
    mkdir -p "$STATE"
    echo "$n" >"$STATE/nodes"

    echo "== underlay $P-ul ($UL_NET.0/24) and etcd at $ETCD"
    ip netns add "$P-ul"
    in_ns "$P-ul" ip link set lo up
    in_ns "$P-ul" ip link add ul0 type bridge
    in_ns "$P-ul" ip addr add "$UL_NET.1/24" dev ul0
    in_ns "$P-ul" ip link set ul0 up
    start_etcd
    in_ns "$P-ul" "$BIN/ferryd" --etcd-endpoints "$ETCD" set-network "$net" >/dev/null

    for i in $(seq "$n"); do
        echo "== node n$i ($UL_NET.$((10 + i)))"
        ip netns add "$P-n$i"
        in_ns "$P-n$i" ip link set lo up
        ip link add "$P-n$i" type veth peer name eth0 netns "$P-n$i"
        ip link set "$P-n$i" netns "$P-ul"
        in_ns "$P-ul" ip link set "$P-n$i" master ul0 up
        in_ns "$P-n$i" ip addr add "$UL_NET.$((10 + i))/24" dev eth0
        in_ns "$P-n$i" ip link set eth0 up
        in_ns "$P-n$i" ip route add default via "$UL_NET.1"
        start_ferryd "$i"
    done
    for i in $(seq "$n"); do wait_ready "$i"; done

    for i in $(seq "$n"); do
        for j in 1 2; do
            ip netns add "$P-n$i-p$j"
            in_ns "$P-n$i-p$j" ip link set lo up # the runtime's own step
            cnirun "$i" add "p$j" >/dev/null
            echo "   pod n$i-p$j: $(pod_ip "$P-n$i-p$j")"
        done
    done
    echo "== backend $backend; leases:"
    in_ns "$P-ul" "$BIN/ferryd" --etcd-endpoints "$ETCD" show | tail -n +3
    echo "== ping matrix (same node and across nodes)"
    matrix || true
    iperf || true
    echo "== the lab stays up. Try: ip netns exec $P-n1-p1 ping $(pod_ip "$P-n2-p2")"
    echo "   logs: $STATE/n*/ferryd.log; tear down: $0 down"
    trap - EXIT
}

status() {
    [ -e "$STATE" ] || die "no lab is up"
    in_ns "$P-ul" "$BIN/ferryd" --etcd-endpoints "$ETCD" show
    for i in $(seq "$(nodes)"); do
        echo "n$i: $(http_get "$i" /readyz | tail -1)"
    done
    matrix
}

doctor() { # [nI] [doctor flags]
    [ -e "$STATE" ] || die "no lab is up"
    local node=n1
    if [[ ${1:-} == n[0-9]* ]]; then node=$1; shift; fi
    local i=${node#n}
    [ -e "/run/netns/$P-$node" ] || die "no node $node"
    # shellcheck disable=SC2046
    in_ns "$P-$node" "$BIN/ferryd" $(node_flags "$i") doctor "$@"
}

down() {
    local i pid
    if [ -e "$STATE" ]; then
        for i in $(seq "$(nodes)"); do
            for j in 1 2; do
                [ -e "/run/netns/$P-n$i-p$j" ] && [ -e "$STATE/n$i/net.d/10-ferry.conflist" ] &&
                    { cnirun "$i" del "p$j" >/dev/null 2>&1 || echo "lab: DEL n$i-p$j failed" >&2; }
            done
        done
        for pid in "$STATE"/n*/ferryd.pid "$STATE/etcd/pid" "$STATE/iperf.pid"; do
            [ -e "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
        done
        sleep 0.2
    fi
    for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do
        ip netns del "$ns"
    done
    rm -rf "$STATE"
    echo "== lab down: no $P-* namespace, no process, $STATE removed"
}

case ${1:-} in
    up) shift; up "$@" ;;
    status) status ;;
    doctor) shift; doctor "$@" ;;
    down) down ;;
    *) echo "usage: $0 up [--nodes N] [--backend vxlan|host-gw|vxlan-direct] | status | doctor [nI] [--json] [--probe] | down" >&2; exit 2 ;;
esac
