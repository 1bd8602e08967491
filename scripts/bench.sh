#!/usr/bin/env bash
# Benchmark ferry-bridge + ferry-ipam against the reference bridge + host-local,
# side by side in one run, inside a private network and mount namespace.
# Writes docs/bench/bridge-ipam.md. Usage: sudo ./scripts/bench.sh [bench.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || exec sudo -E "$0" "$@"

need=(iproute2 nftables iptables containernetworking-plugins python3 time)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The plugins as shipped: static, `plugin` profile (scripts/build-dist.sh).
dist=$(./scripts/build-dist.sh | tail -n 1)
opt=$(sed -n '/^\[profile\.plugin\]/,/^\[/s/^opt-level *= *//p' Cargo.toml)
build="built by \`scripts/build-dist.sh\`: \`cargo build --profile plugin --target $(rustc -vV | sed -n 's/^host: //p')\`"
build+=" with RUSTFLAGS=\"-C target-feature=+crt-static\" (static glibc), rustc $(rustc -V | cut -d' ' -f2);"
build+=" profile \`plugin\` = release (fat LTO, codegen-units 1, panic=abort, stripped) with opt-level ${opt:-3}"
mkdir -p docs/bench /run/netns
out="$PWD/docs/bench/bridge-ipam.md"
# Private netns: the bridges, pods and nft/iptables rules vanish with it.
# Private mount ns: `ip netns add` mounts land on a tmpfs nobody else sees.
unshare -nm --propagation private bash -c '
  mount -t tmpfs ferry-bench /run/netns
  python3 scripts/bench.py --ferry-bin "$0" --ferry-build "$1" --out "'"$out"'" "${@:2}"
' "$dist" "$build" "$@"
