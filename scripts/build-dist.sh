#!/usr/bin/env bash
# Builds what ferry ships and collects it in target/dist/:
#
#   ferry-bridge, ferry-ipam, ferry-loopback, ferry-portmap, ferry-bandwidth
#       the CNI plugins: statically linked (glibc, crt-static) with the
#       `plugin` profile (Cargo.toml). A runtime executes them once per pod and
#       command: no ld.so and no shared libc to map and relocate means faster
#       ADD/DEL and a lower RSS, and they run on any node of the same arch.
#   ferryd, cnirun (package ferry-tests)
#       normal dynamic release builds: ferryd resolves etcd host names, and
#       static glibc cannot load the NSS modules that needs.
#
#   ./scripts/build-dist.sh [--exclude PACKAGE]...   prints target/dist's path last
#
# --exclude skips a package (the image builds with --exclude ferry-tests).
set -euo pipefail
cd "$(dirname "$0")/.."

exclude=" "
while [ $# -gt 0 ]; do
    case $1 in
        --exclude) [ $# -ge 2 ] || { echo "build-dist: --exclude needs a package" >&2; exit 2; }
                   exclude+="$2 "; shift 2 ;;
        *) echo "usage: $0 [--exclude PACKAGE]..." >&2; exit 2 ;;
    esac
done
want() { [[ $exclude != *" $1 "* ]]; }

triple=$(rustc -vV | sed -n 's/^host: //p')
[ -n "$triple" ] || { echo "build-dist: no host triple in rustc -vV" >&2; exit 1; }
plugins=()
for p in ferry-bridge ferry-ipam ferry-loopback ferry-portmap ferry-bandwidth; do
    # ferry-bandwidth only where the workspace has it.
    want "$p" && cargo pkgid -q "$p" >/dev/null 2>&1 && plugins+=("$p")
done
bins=()
want ferryd && bins+=(ferryd)
want ferry-tests && bins+=(cnirun)

if [ ${#plugins[@]} -gt 0 ]; then
    args=()
    for p in "${plugins[@]}"; do args+=(-p "$p"); done
    # With --target, RUSTFLAGS reach only the target's artifacts: build
    # scripts and proc-macros stay ordinary host binaries.
    RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
        cargo build -q --locked --profile plugin --target "$triple" "${args[@]}"
fi
if [ ${#bins[@]} -gt 0 ]; then
    args=()
    want ferryd && args+=(-p ferryd --bin ferryd)
    want ferry-tests && args+=(-p ferry-tests --bin cnirun)
    cargo build -q --locked --release "${args[@]}"
fi

dist=$PWD/target/dist
mkdir -p "$dist"
put() { # a hard link (same file system) else a copy, replacing what is there
    local dst
    dst="$dist/$(basename "$1")"
    ln -f "$1" "$dst" 2>/dev/null || cp -f "$1" "$dst"
}
for p in "${plugins[@]}"; do
    bin=target/$triple/plugin/$p
    # A dynamic plugin would be a build-flag regression: refuse it (a
    # static-pie has a dynamic section, but no interpreter and no NEEDED).
    if readelf -l "$bin" | grep -q 'program interpreter' || readelf -d "$bin" | grep -q NEEDED; then
        echo "build-dist: $bin is not statically linked" >&2
        exit 1
    fi
    put "$bin"
done
for b in "${bins[@]}"; do put "target/release/$b"; done
echo "$dist"
