#!/usr/bin/env bash
# ferryd's etcd client with one member of a 3-member cluster down: time from a
# fresh start (connect, read the network config, acquire a lease, with
# ferryd's retry policy) to a held lease, over N starts. Prints a markdown
# table (min, median, p90, p99, max). Needs etcd-server; no root needed.
#   ./scripts/bench-etcd-failover.sh        # N = 100
#   ./scripts/bench-etcd-failover.sh 20
#   ./scripts/bench-etcd-failover.sh 100 --hung   # the member frozen, not stopped
set -euo pipefail
cd "$(dirname "$0")/.."
command -v etcd >/dev/null || { echo "bench-etcd-failover: install etcd-server" >&2; exit 1; }
cargo build --release -q -p ferryd --example etcd_failover_bench
./target/release/examples/etcd_failover_bench "${@:-100}"
