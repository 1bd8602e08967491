#!/usr/bin/env bash
# Fuzzes every parser of data from outside ferry (plugins/fuzz): the CNI
# config/conflist/result, CNI_ARGS and names, each plugin's configuration,
# ferry-ipam's configuration and store records, etcd leases and the network
# configuration. Each target runs for FUZZ_SECONDS (default 60) from its seeds
# (plugins/fuzz/seeds/<target>) and the corpus it grew before
# (plugins/fuzz/corpus/<target>, not committed); a crash stops the run and
# leaves its input in plugins/fuzz/artifacts/<target>.
#
#   ./scripts/fuzz.sh                   every target, 60 s each
#   FUZZ_SECONDS=600 ./scripts/fuzz.sh lease network_config
#
# Needs cargo-fuzz (installed here when missing) and a nightly toolchain, or
# the stable one with RUSTC_BOOTSTRAP=1 (what this script uses without nightly).
set -euo pipefail
cd "$(dirname "$0")/.."
fz=(--fuzz-dir plugins/fuzz)
seconds=${FUZZ_SECONDS:-60}

if ! command -v cargo-fuzz >/dev/null 2>&1 && ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz
fi
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi

targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo "${toolchain[@]}" fuzz list "${fz[@]}")
fi

summary=()
status=0
for t in "${targets[@]}"; do
    mkdir -p "plugins/fuzz/corpus/$t" "plugins/fuzz/seeds/$t"
    echo "== $t: ${seconds}s"
    log=$(mktemp)
    if cargo "${toolchain[@]}" fuzz run "${fz[@]}" "$t" "plugins/fuzz/corpus/$t" "plugins/fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 2>&1 | tee "$log" | grep -E '^(==|INFO: Seed|Done|SUMMARY|thread)' ; then
        :
    fi
    if grep -q '^Done ' "$log" && ! grep -qE 'ERROR: libFuzzer|SUMMARY: .*Sanitizer|panicked' "$log"; then
        summary+=("$t: $(grep '^Done ' "$log" | tail -1)")
    else
        summary+=("$t: FAILED (see plugins/fuzz/artifacts/$t)")
        status=1
    fi
    rm -f "$log"
done

echo
echo "== fuzz summary (${seconds}s per target)"
printf '   %s\n' "${summary[@]}"
exit "$status"
