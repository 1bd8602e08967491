#!/usr/bin/env bash
# Builds ferry and runs every check CI runs: unit and integration tests (as
# root: they create their own network namespaces), clippy and rustfmt.
# Works on a fresh Debian machine: installs what the tests need first.
#
#   sudo ./scripts/test.sh        (CI: .ci/run, which sets CI=true so that no
#                                  test may skip itself)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        echo "scripts/test.sh: re-running as root with sudo (tests create network namespaces)" >&2
        exec sudo --preserve-env=CI,FERRY_BIN_DIR,CARGO_HOME,RUSTUP_HOME env "PATH=$PATH" "$0" "$@"
    fi
    echo "scripts/test.sh: must run as root (tests create network namespaces), and sudo is not installed" >&2
    exit 1
fi

# --- system packages (skipped when all are installed, to keep reruns fast) ---
PKGS=(iproute2 nftables iputils-ping jq containernetworking-plugins etcd-server
      protobuf-compiler iperf3 openssl
      build-essential iptables    # a C linker; iptables for the reference plugins in the differential tests and bench
      containerd runc podman busybox-static curl    # tests/tests/runtimes.rs and cri.rs: real runtimes, the test image, hostPort checks
      conntrack)   # tests/tests/portmap_conntrack.rs: creates and inspects entries (ferry itself uses netlink)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y "${PKGS[@]}"
else
    echo "== system packages already installed"
fi

# --- Rust toolchain: cargo with clippy and rustfmt must already be installed ---
if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "scripts/test.sh: cargo not found (install a Rust toolchain with clippy and rustfmt)" >&2; exit 1; }

# --- the checks: every one runs, the summary says which failed ---
results=()
failed=0
step() {
    local name=$1
    shift
    echo
    echo "== $name: $*"
    local start=$SECONDS
    if "$@"; then
        results+=("PASS  $name ($((SECONDS - start))s)")
    else
        results+=("FAIL  $name ($((SECONDS - start))s)")
        failed=1
    fi
}

step build cargo build --workspace --all-targets
if [ "$failed" -eq 0 ]; then
    # Integration tests execute the binaries the build step just produced.
    step test cargo test --workspace --no-fail-fast
else
    results+=("SKIP  test (build failed)")
fi
step clippy cargo clippy --workspace --all-targets -- -D warnings
step fmt cargo fmt --all --check

echo
echo "== summary"
printf '   %s\n' "${results[@]}"
if [ "$failed" -ne 0 ]; then
    echo "== FAILED"
    exit 1
fi
echo "== all checks passed"
