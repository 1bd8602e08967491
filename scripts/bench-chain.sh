#!/usr/bin/env bash
# Benchmark the Kubernetes chain (loopback + bridge with ipMasq + portmap +
# bandwidth): ferry's plugins next to the reference ones in /usr/lib/cni, same
# run, alternating, per-plugin breakdown, leftover checks, inside a private
# network and mount namespace (the throwaway node).
# Writes docs/bench/chain.md (+ every sample in docs/bench/chain-raw.json). Usage: sudo ./scripts/bench-chain.sh [bench_chain.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || exec sudo -E "$0" "$@"

need=(iproute2 nftables iptables containernetworking-plugins python3 time file binutils)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

rev="$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
git diff --quiet HEAD 2>/dev/null || rev="$rev + uncommitted changes in the tree"
rustc_v="$(rustc -V)"
if [ -x scripts/build-dist.sh ]; then
  # What ferry ships: static plugins (profile `plugin`, crt-static), cnirun dynamic release.
  bin="$(./scripts/build-dist.sh | tail -n1)"
  note="\`scripts/build-dist.sh\` → $bin: plugins statically linked (glibc crt-static, cargo profile \`plugin\`), cnirun a dynamic release build; $rustc_v; tree at $rev."
else
  cargo build --release -q -p ferry-loopback -p ferry-bridge -p ferry-ipam -p ferry-portmap \
    -p ferry-bandwidth -p ferry-tests --bin cnirun
  bin="$PWD/target/release"
  note="\`cargo build --release\` (scripts/build-dist.sh not present) → $bin: dynamic release builds; $rustc_v; tree at $rev."
fi
for p in ferry-loopback ferry-bridge ferry-ipam ferry-portmap ferry-bandwidth cnirun; do
  [ -x "$bin/$p" ] || { echo "bench-chain: $bin/$p missing" >&2; exit 1; }
done

# Run a private copy: a build in the shared tree must not swap binaries mid-run.
run_bin="$(mktemp -d /tmp/ferry-bench-chain-bin.XXXXXX)"
trap 'rm -rf "$run_bin"' EXIT
for p in ferry-loopback ferry-bridge ferry-ipam ferry-portmap ferry-bandwidth cnirun; do
  cp "$bin/$p" "$run_bin/"
done
sums="$(cd "$run_bin" && sha256sum ferry-* cnirun | awk '{printf "%s%s %.12s", sep, $2, $1; sep=", "}')"
dirty="$(git status --porcelain -- Cargo.toml Cargo.lock plugins ipam tests 2>/dev/null | awk '{print $2}' | paste -sd' ' -)"
[ -z "$dirty" ] || note="$note Uncommitted changes in the built sources: $dirty."
note="$note sha256 (first 12): $sums."

mkdir -p docs/bench /run/netns
out="$PWD/docs/bench/chain.md"
raw="$PWD/docs/bench/chain-raw.json"
# Private netns = the node: bridges, pods, nft/iptables rules, ifbs vanish with it.
# Private mount ns: `ip netns add` mounts land on a tmpfs nobody else sees.
unshare -nm --propagation private bash -c '
  mount -t tmpfs ferry-bench-chain /run/netns
  python3 scripts/bench_chain.py --ferry-bin "$1" --cnirun "$1/cnirun" --build-note "$2" --out "$3" --raw "$4" "${@:5}"
' bench-chain "$run_bin" "$note" "$out" "$raw" "$@"
