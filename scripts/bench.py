#!/usr/bin/env python3
"""ferry-bridge + ferry-ipam next to the reference bridge + host-local.

Runs inside a private network and mount namespace (scripts/bench.sh sets it
up), so nothing on the host is touched. Every measurement alternates A/B in
the same run, reports medians and the ratio ferry/reference, and writes a
markdown results file.

Measured: ADD and DEL latency of one pod (ipMasq off and on), a storm of
pods ADDed then DELed with a fixed number in flight (ipMasq off and on), and
the peak RSS of each plugin process (wait4's ru_maxrss of the main plugin).
"""

import argparse
import shutil
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REF_DIR = "/usr/lib/cni"


def sh(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


class Impl:
    def __init__(self, name, bin_dir, plugin, ipam, bridge, subnet, data_dir):
        self.name, self.bin_dir, self.plugin, self.ipam = name, bin_dir, plugin, ipam
        self.bridge, self.subnet, self.data_dir = bridge, subnet, data_dir

    def conf(self, masq):
        return json.dumps({
            "cniVersion": "1.0.0",
            "name": f"bench-{self.name}",
            "type": self.plugin,
            "bridge": self.bridge,
            "isGateway": True,
            "ipMasq": masq,
            "ipam": {"type": self.ipam, "dataDir": self.data_dir,
                     "ranges": [[{"subnet": self.subnet}]],
                     "routes": [{"dst": "0.0.0.0/0"}]},
        }).encode()

    def run(self, cmd, cid, netns, masq, rss_file=None):
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": cmd, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0", "CNI_PATH": self.bin_dir,
        }
        t0 = time.perf_counter()
        argv = [os.path.join(self.bin_dir, self.plugin)]
        if rss_file:
            # A child of this Python inherits Python's high-water RSS at exec;
            # GNU time's own child starts small, so %M is the plugin's (and its
            # IPAM child's) true peak.
            argv = ["/usr/bin/time", "-f", "%M", "-o", rss_file] + argv
        p = subprocess.Popen(argv, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdin.write(self.conf(masq))
        p.stdin.close()
        out = p.stdout.read()
        err = p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
        elapsed = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise RuntimeError(f"{self.name} {cmd} {cid}: rc={p.returncode} {out!r} {err!r}")
        return elapsed, (int(open(rss_file).read().split()[-1]) if rss_file else None)


_seq = 0


def new_netns():
    global _seq
    _seq += 1
    name = f"b{os.getpid()}-{_seq}"
    sh("ip", "netns", "add", name)
    return name


def del_netns(name):
    sh("ip", "netns", "del", name)


def single(impls, masq, rounds):
    """Alternating A/B: one pod ADD then DEL per impl per round."""
    add = {i.name: [] for i in impls}
    dele = {i.name: [] for i in impls}
    rss = {i.name: [] for i in impls}
    for r in range(rounds):
        order = impls if r % 2 == 0 else list(reversed(impls))
        for impl in order:
            ns = new_netns()
            cid = f"single{r}{impl.name}"
            t, _ = impl.run("ADD", cid, f"/run/netns/{ns}", masq)
            add[impl.name].append(t)
            t, _ = impl.run("DEL", cid, f"/run/netns/{ns}", masq)
            dele[impl.name].append(t)
            del_netns(ns)
    # Peak RSS in separate runs: the measuring launcher must not skew latency.
    rss_file = tempfile.mktemp(prefix="ferry-bench-rss-")
    for r in range(5):
        for impl in impls:
            ns = new_netns()
            cid = f"rss{r}{impl.name}"
            for cmd in ("ADD", "DEL"):
                rss[impl.name].append(impl.run(cmd, cid, f"/run/netns/{ns}", masq, rss_file)[1])
            del_netns(ns)
    os.unlink(rss_file)
    return add, dele, rss


def storm(impl, masq, pods, inflight, tag):
    nss = [new_netns() for _ in range(pods)]
    ids = [f"storm{tag}{k}" for k in range(pods)]

    def go(cmd):
        with ThreadPoolExecutor(max_workers=inflight) as ex:
            t0 = time.perf_counter()
            list(ex.map(lambda k: impl.run(cmd, ids[k], f"/run/netns/{nss[k]}", masq), range(pods)))
            return time.perf_counter() - t0

    t_add = go("ADD")
    t_del = go("DEL")
    for ns in nss:
        del_netns(ns)
    return t_add, t_del


def ms(x):
    return f"{x * 1000:.2f} ms"


def build_note(a):
    """How the measured ferry binaries were built, and what they are (file(1), size)."""
    parts = []
    for n in ["ferry-bridge"] + (["ferry-ipam"] if a.ferry_ipam == "ferry-ipam" else []):
        path = os.path.realpath(os.path.join(a.ferry_bin, n))
        try:
            kind = subprocess.run(["file", "-b", path], capture_output=True, text=True).stdout
            link = next((w.strip() for w in kind.split(",") if "linked" in w), "?")
        except OSError:
            link = "?"
        parts.append(f"{n} {os.path.getsize(path) / 1e6:.2f} MB, {link}")
    how = a.ferry_build or f"binaries from {a.ferry_bin}"
    return f"{how}. " + "; ".join(parts) + "."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferry-bin", required=True)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--storm-pods", type=int, default=50)
    ap.add_argument("--storm-inflight", type=int, default=8)
    ap.add_argument("--storm-rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ferry-ipam", default="ferry-ipam", help="IPAM under ferry-bridge (host-local isolates the bridge)")
    ap.add_argument("--ferry-build", default="", help="how the ferry binaries were built, for the results file")
    a = ap.parse_args()

    sh("ip", "link", "set", "lo", "up")
    a.load_start = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="ferry-bench-")
    try:
        return run_all(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_all(a, work):
    bin_dir = os.path.join(work, "bin")
    os.makedirs(bin_dir)
    # One CNI_PATH holding both suites, as on a node that has both installed.
    for d, names in ((REF_DIR, ["bridge", "host-local"]), (a.ferry_bin, ["ferry-bridge"] + (["ferry-ipam"] if a.ferry_ipam == "ferry-ipam" else []))):
        for n in names:
            os.symlink(os.path.join(d, n), os.path.join(bin_dir, n))
    ref = Impl("reference", bin_dir, "bridge", "host-local", "brref0", "10.201.0.0/16", os.path.join(work, "ref"))
    fer = Impl("ferry", bin_dir, "ferry-bridge", a.ferry_ipam, "brferry0", "10.202.0.0/16", os.path.join(work, "ferry"))
    impls = [ref, fer]

    # Warm up: the first ADD creates the bridge (and, with masq, ferry's table).
    for masq in (False, True):
        for impl in impls:
            ns = new_netns()
            impl.run("ADD", "warm", f"/run/netns/{ns}", masq)
            impl.run("DEL", "warm", f"/run/netns/{ns}", masq)
            del_netns(ns)

    rows = []
    peak = {i.name: 0 for i in impls}
    for masq in (False, True):
        add, dele, rss = single(impls, masq, a.rounds)
        for i in impls:
            peak[i.name] = max(peak[i.name], max(rss[i.name]))
        label = "ipMasq on" if masq else "ipMasq off"
        for what, data in (("ADD", add), ("DEL", dele)):
            r, f = statistics.median(data["reference"]), statistics.median(data["ferry"])
            rows.append((f"{what}, one pod, {label}", r, f))

    for masq in (False, True):
        label = "ipMasq on" if masq else "ipMasq off"
        s = {i.name: ([], []) for i in impls}
        for r in range(a.storm_rounds):
            order = impls if r % 2 == 0 else list(reversed(impls))
            for impl in order:
                t_add, t_del = storm(impl, masq, a.storm_pods, a.storm_inflight, f"{r}{int(masq)}")
                s[impl.name][0].append(t_add)
                s[impl.name][1].append(t_del)
        for k, what in ((0, "ADD"), (1, "DEL")):
            r, f = statistics.median(s["reference"][k]), statistics.median(s["ferry"][k])
            rows.append((f"storm {what}: {a.storm_pods} pods, {a.storm_inflight} in flight, {label}", r, f))

    kernel = os.uname().release
    lines = [
        "# ferry-bridge + ferry-ipam vs reference bridge + host-local",
        "",
        f"Measured by `scripts/bench.sh` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, kernel {kernel}, "
        f"{os.cpu_count()} CPUs. Reference: Debian containernetworking-plugins in {REF_DIR}. "
        f"Single-pod rows: median of {a.rounds} alternating A/B rounds (a fresh netns per pod, not timed). "
        f"Storm rows: median of {a.storm_rounds} alternating rounds, wall time for all pods. "
        "cniVersion 1.0.0 (the newest the Debian reference speaks). "
        f"Load average (1 min) {a.load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end: other work on "
        "the machine slows both sides and moves the ratios, so compare runs made at a similar load.",
        "",
        f"ferry binaries: {build_note(a)}",
        "",
        "| measurement | reference | ferry | ferry / reference |",
        "|---|---|---|---|",
    ]
    for name, r, f in rows:
        lines.append(f"| {name} | {ms(r)} | {ms(f)} | **{f / r:.2f}x** |")
    lines.append(f"| peak RSS of one plugin invocation (plugin + its IPAM child, max of 20 runs, GNU time %M) | {peak['reference']} KiB | "
                 f"{peak['ferry']} KiB | **{peak['ferry'] / peak['reference']:.2f}x** |")
    text = "\n".join(lines) + "\n"
    with open(a.out, "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
