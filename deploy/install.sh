#!/usr/bin/env bash
# Installs ferry on a node.
#
#   sudo deploy/install.sh              CNI plugins, ferryd, its systemd unit and env file
#   deploy/install.sh --cni-only        only the CNI plugins (what the DaemonSet's
#                                       init container runs, with ROOT=/host)
#
# Variables:
#   ROOT         prefix of every path written (default: none, i.e. /)
#   BIN_SRC      directory holding the built binaries (default: the repository's
#                target/dist from scripts/build-dist.sh, or /opt/ferry/bin in the image)
#   CNI_BIN_DIR  the runtime's plugin directory (default: /opt/cni/bin)
#
# Never clobbers what is not ferry's: ferry-* plugins are replaced (that is how
# an upgrade happens; written to a temp file and renamed, so a runtime never
# executes a half-written binary and a symlink in the way is replaced rather
# than written through), `loopback` is installed only when the node has none,
# and an existing /etc/ferry/ferryd.env is kept.
set -euo pipefail

cni_only=false
case "${1:-}" in
    --cni-only) cni_only=true ;;
    "") ;;
    *) echo "usage: $0 [--cni-only]" >&2; exit 2 ;;
esac

ROOT=${ROOT:-}
ROOT=${ROOT%/}
here=$(cd "$(dirname "$0")" && pwd)
if [ -z "${BIN_SRC:-}" ]; then
    if [ -x "$here/../target/dist/ferryd" ]; then
        BIN_SRC=$here/../target/dist
    else
        BIN_SRC=/opt/ferry/bin
    fi
fi
CNI_BIN_DIR=${CNI_BIN_DIR:-/opt/cni/bin}
PLUGINS=(ferry-loopback ferry-bridge ferry-ipam ferry-portmap ferry-bandwidth)

# install_file SRC DST MODE: temp file in DST's directory, then rename.
install_file() {
    local src=$1 dst=$2 mode=$3
    local tmp
    tmp="$(dirname "$dst")/.$(basename "$dst").ferry-tmp.$$"
    cp "$src" "$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dst"
}

find_bin() {
    local name=$1
    for d in "$BIN_SRC" "$BIN_SRC/../../usr/local/bin"; do
        if [ -f "$d/$name" ]; then echo "$d/$name"; return 0; fi
    done
    return 1
}

# --- CNI plugins ---
mkdir -p "$ROOT$CNI_BIN_DIR"
installed=()
for p in "${PLUGINS[@]}"; do
    if src=$(find_bin "$p"); then
        install_file "$src" "$ROOT$CNI_BIN_DIR/$p" 0755
        installed+=("$p")
    else
        echo "install.sh: $p not built, skipped" >&2
    fi
done
lo="$ROOT$CNI_BIN_DIR/loopback"
if [ -e "$lo" ] || [ -L "$lo" ]; then
    echo "install.sh: $CNI_BIN_DIR/loopback exists, kept (runtimes use it to bring lo up)"
elif src=$(find_bin ferry-loopback); then
    install_file "$src" "$lo" 0755
    installed+=(loopback)
fi
echo "install.sh: installed into $ROOT$CNI_BIN_DIR: ${installed[*]}"
if $cni_only; then
    exit 0
fi

# --- ferryd and its systemd unit ---
src=$(find_bin ferryd) || { echo "install.sh: ferryd not found in $BIN_SRC (scripts/build-dist.sh)" >&2; exit 1; }
mkdir -p "$ROOT/usr/local/bin" "$ROOT/etc/ferry" "$ROOT/etc/systemd/system"
install_file "$src" "$ROOT/usr/local/bin/ferryd" 0755

env_file="$ROOT/etc/ferry/ferryd.env"
if [ -e "$env_file" ]; then
    echo "install.sh: /etc/ferry/ferryd.env exists, kept"
else
    cat > "$env_file.ferry-tmp.$$" <<'ENV'
# ferryd's settings; every flag has one of these (ferryd --help).
FERRY_ETCD_ENDPOINTS=https://etcd.example:2379
FERRY_ETCD_CAFILE=/etc/ferry/etcd/ca.crt
FERRY_ETCD_CERTFILE=/etc/ferry/etcd/tls.crt
FERRY_ETCD_KEYFILE=/etc/ferry/etcd/tls.key
# FERRY_NODE_NAME=       (default: the hostname; must match kubelet's node name)
# FERRY_IFACE=           (default: the default route's interface)
# FERRY_PUBLIC_IP=
# FERRY_LISTEN=0.0.0.0:9946
# FERRY_LOG=info
ENV
    chmod 0600 "$env_file.ferry-tmp.$$"
    mv -f "$env_file.ferry-tmp.$$" "$env_file"
fi

unit="$ROOT/etc/systemd/system/ferryd.service"
cat > "$unit.ferry-tmp.$$" <<'UNIT'
[Unit]
Description=ferry node daemon: subnet lease in etcd, overlay routes, the node's CNI config
Wants=network-online.target
After=network-online.target
Before=kubelet.service

[Service]
EnvironmentFile=/etc/ferry/ferryd.env
ExecStart=/usr/local/bin/ferryd
Restart=always
RestartSec=2
# SIGTERM keeps the data path in place; a restart takes the same subnet back.
KillSignal=SIGTERM
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
UNIT
chmod 0644 "$unit.ferry-tmp.$$"
mv -f "$unit.ferry-tmp.$$" "$unit"

if [ -z "$ROOT" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
echo "install.sh: ferryd installed; edit /etc/ferry/ferryd.env, then: systemctl enable --now ferryd"
echo "install.sh: once per cluster: ferryd set-network '{\"network\":\"10.244.0.0/16\",\"subnetLen\":24,\"backend\":{\"type\":\"vxlan\",\"vni\":1}}'"
