#!/usr/bin/env python3
"""The Kubernetes chain, ferry next to the reference plugins, in one run.

Chain: loopback, bridge (ipMasq, hairpin, IPAM), portmap (capability
portMappings), bandwidth (capability bandwidth), cniVersion 1.0.0 for both:

  ferry:     ferry-loopback, ferry-bridge + ferry-ipam, ferry-portmap, ferry-bandwidth
  reference: loopback, bridge + host-local, portmap, bandwidth from /usr/lib/cni

Runs inside a private network and mount namespace (scripts/bench-chain.sh sets
it up: the throwaway "node"), so nothing on the host is touched and every
bridge, pod namespace and rule vanishes with it, also on failure.

Two runners, the same for both sides, A/B alternating every round:

* this file's libcni-like runner: each plugin exec'd in order with the previous
  result as prevResult, runtimeConfig only for the capabilities a plugin
  declares, the final result cached and given to every plugin on DEL, which
  runs in reverse order (libcni's AddNetworkList / DelNetworkList). Every exec
  is timed, so the chain splits into per-plugin rows.
* `cnirun` (tests/src/bin/cnirun.rs, the same libcni logic in Rust): the whole
  chain as one process, timed from outside, as a cross-check of the totals.

Two pod kinds: (a) typical, runtimeConfig empty; (b) one hostPort (tcp) and
bandwidth 10 Mbit/s both ways with containerd's bursts, passed as
runtimeConfig. Every pod's node state (links, nftables, iptables, tc, routes,
IPAM reservations, the result cache) is compared before its ADD and after
its DEL; any difference is a leftover and fails the run.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REF_DIR = "/usr/lib/cni"
IFNAME = "eth0"
NODE_IP = "192.168.77.10"
RATE = 10_000_000          # bits/s, 10 Mbit/s
BURST = 4294967295         # bits: what containerd's CRI passes (math.MaxUint32)
KINDS = {
    "a": "typical pod (runtimeConfig empty)",
    "b": "pod with 1 hostPort (tcp → 80) + bandwidth 10 Mbit/s both ways",
}


def sh(*args, check=True):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: rc={p.returncode} {p.stderr.strip()}")
    return p.stdout


class Chain:
    def __init__(self, name, bin_dir, types, bridge, subnet, work):
        self.name, self.bin_dir, self.types = name, bin_dir, types
        self.ipam_dir = os.path.join(work, f"ipam-{name}")
        self.cache_dir = os.path.join(work, f"cache-{name}")
        self.net = f"chain-{name}"
        self.bridge, self.subnet = bridge, subnet
        lo, br, ipam, pm, bw = types
        self.conflist = {
            "cniVersion": "1.0.0",
            "name": self.net,
            "plugins": [
                {"type": lo},
                {"type": br, "bridge": bridge, "isGateway": True, "isDefaultGateway": True,
                 "hairpinMode": True, "ipMasq": True, "mtu": 1450,
                 "ipam": {"type": ipam, "dataDir": self.ipam_dir,
                          "ranges": [[{"subnet": subnet}]]}},
                {"type": pm, "capabilities": {"portMappings": True}},
                {"type": bw, "capabilities": {"bandwidth": True}},
            ],
        }
        self.labels = [lo, f"{br} + {ipam}", pm, bw]
        self.conf_path = os.path.join(work, f"{self.net}.conflist")
        with open(self.conf_path, "w") as fh:
            json.dump(self.conflist, fh, indent=1)

    # -- libcni's plugin config: list's name + cniVersion, prevResult, filtered runtimeConfig
    def plugin_conf(self, i, rc, prev):
        conf = dict(self.conflist["plugins"][i])
        conf["cniVersion"] = self.conflist["cniVersion"]
        conf["name"] = self.net
        caps = [k for k, on in conf.get("capabilities", {}).items() if on is True]
        rt = {k: v for k, v in rc.items() if k in caps}
        if rt:
            conf["runtimeConfig"] = rt
        if prev is not None:
            conf["prevResult"] = prev
        return json.dumps(conf).encode()

    def env(self, cmd, cid, netns):
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": cmd, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
            "CNI_IFNAME": IFNAME, "CNI_PATH": self.bin_dir,
            # what containerd's CRI passes for a pod
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={cid};"
                        f"K8S_POD_INFRA_CONTAINER_ID={cid};K8S_POD_UID={cid}",
        }

    def exec_plugin(self, i, cmd, cid, netns, rc, prev, rss_file=None):
        argv = [os.path.join(self.bin_dir, self.types[i])]
        if rss_file:
            argv = ["/usr/bin/time", "-f", "%M", "-o", rss_file] + argv
        t0 = time.perf_counter()
        p = subprocess.run(argv, input=self.plugin_conf(i, rc, prev), env=self.env(cmd, cid, netns),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{self.name} {self.types[i]} {cmd} {cid}: rc={p.returncode} "
                               f"{p.stdout!r} {p.stderr!r}")
        rss = int(open(rss_file).read().split()[-1]) if rss_file else None
        return dt, (json.loads(p.stdout) if cmd == "ADD" else None), rss

    def cache_file(self, cid):
        return os.path.join(self.cache_dir, f"{self.net}-{cid}-{IFNAME}")

    def add(self, cid, netns, rc, rss_file=None):
        """Returns (total, [per plugin], result, [rss per plugin])."""
        t0 = time.perf_counter()
        prev, per, rss = None, [], []
        for i in range(4):
            dt, prev, r = self.exec_plugin(i, "ADD", cid, netns, rc, prev, rss_file)
            per.append(dt)
            rss.append(r)
        os.makedirs(self.cache_dir, exist_ok=True)
        with open(self.cache_file(cid), "w") as fh:
            json.dump(prev, fh)
        return time.perf_counter() - t0, per, prev, rss

    def delete(self, cid, netns, rc, rss_file=None):
        t0 = time.perf_counter()
        try:
            with open(self.cache_file(cid)) as fh:
                prev = json.load(fh)
        except FileNotFoundError:
            prev = None
        per, rss = [0.0] * 4, [None] * 4
        for i in reversed(range(4)):
            per[i], _, rss[i] = self.exec_plugin(i, "DEL", cid, netns, rc, prev, rss_file)
        os.unlink(self.cache_file(cid))
        return time.perf_counter() - t0, per, rss

    def cnirun(self, cnirun, verb, cid, netns, rc):
        env = dict(os.environ, CNI_PATH=self.bin_dir, CNI_CACHE_DIR=self.cache_dir)
        t0 = time.perf_counter()
        p = subprocess.run([cnirun, verb, self.conf_path, netns, cid, IFNAME,
                            "--runtime-config", json.dumps(rc)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"cnirun {self.name} {verb} {cid}: rc={p.returncode} {p.stdout!r} {p.stderr!r}")
        return dt


# -- node state, for leftovers -------------------------------------------------

def snapshot(chains):
    links = sorted(re.sub(r"^\d+: ", "", line).split()[0].split("@")[0]
                   for line in sh("ip", "-o", "link", "show").splitlines())
    nft = re.sub(r"(packets|bytes) \d+", "", sh("nft", "list", "ruleset"))
    ipt = []
    for tool in ("iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save"):
        if shutil.which(tool):
            out = sh(tool, check=False)
            ipt += [re.sub(r"\[\d+:\d+\]", "", line) for line in out.splitlines() if not line.startswith("#")]
    tc = sh("tc", "qdisc", "show")
    # the bridge's carrier flag ("linkdown") and IPv6 link-local routes follow
    # asynchronously (carrier, DAD); a pod's veth itself is caught by `links`
    routes = "\n".join(re.sub(r" linkdown\b", "", line) for line in
                       sh("ip", "route", "show", "table", "all").splitlines() if "fe80::" not in line)
    files = []
    for c in chains:
        for d in (c.ipam_dir, c.cache_dir):
            for root, _, names in os.walk(d):
                files += [os.path.join(root, n) for n in names
                          if not n.startswith("last_reserved_ip") and n != "lock"]
    return {"links": links, "nft": nft.splitlines(), "iptables": sorted(ipt),
            "tc": tc.splitlines(), "routes": sorted(routes.splitlines()), "files": sorted(files)}


def diff(before, after):
    out = []
    for k in before:
        b, a = before[k], after[k]
        if b == a:
            continue
        added = [x for x in a if x not in b]
        removed = [x for x in b if x not in a]
        out.append(f"{k}: +{added[:6]} -{removed[:6]}")
    return out


# -- the run ------------------------------------------------------------------

_seq = 0


def new_netns():
    global _seq
    _seq += 1
    name = f"chainpod-{os.getpid()}-{_seq}"
    sh("ip", "netns", "add", name)
    return name


_port = 30000


def runtime_config(kind):
    global _port
    if kind == "a":
        return {}
    _port += 1
    return {"portMappings": [{"hostPort": _port, "containerPort": 80, "protocol": "tcp"}],
            "bandwidth": {"ingressRate": RATE, "ingressBurst": BURST,
                          "egressRate": RATE, "egressBurst": BURST}}


def pod(chain, kind, tag, leftovers, cnirun=None, rss_file=None):
    """One pod ADD then DEL (netns still there on DEL, as kubelet does)."""
    ns = new_netns()
    cid = f"{chain.name}-{tag}"
    rc = runtime_config(kind)
    before = snapshot_all()
    try:
        if cnirun:
            a = chain.cnirun(cnirun, "add", cid, f"/run/netns/{ns}", rc)
            d = chain.cnirun(cnirun, "del", cid, f"/run/netns/{ns}", rc)
            res = (a, d)
        else:
            a, a_per, result, a_rss = chain.add(cid, f"/run/netns/{ns}", rc, rss_file)
            if kind == "b":
                check_kind_b(chain, result)
            d, d_per, d_rss = chain.delete(cid, f"/run/netns/{ns}", rc, rss_file)
            res = (a, d, a_per, d_per, a_rss, d_rss)
    finally:
        sh("ip", "netns", "del", ns)
    left = diff(before, snapshot_all())
    if left:
        leftovers.append((chain.name, cid, left))
    return res


def check_kind_b(chain, result):
    """The pod of kind (b) really got its DNAT and its shaping."""
    pod_ip = result["ips"][0]["address"].split("/")[0]
    host_veth = [i["name"] for i in result["interfaces"] if not i.get("sandbox")
                 and i["name"] != chain.bridge]
    rules = (sh("nft", "list", "ruleset") + sh("iptables-save")).splitlines()
    # a DNAT rule or map element naming both the hostPort and the pod
    assert any(pod_ip in r and str(_port) in r for r in rules), \
        f"{chain.name}: no DNAT of hostPort {_port} to {pod_ip}"
    assert host_veth and "tbf" in sh("tc", "qdisc", "show", "dev", host_veth[-1]), \
        f"{chain.name}: no tbf on {host_veth}"


_chains = []


def snapshot_all():
    return snapshot(_chains)


def med(xs):
    return statistics.median(xs)


def ms(x):
    return f"{x * 1000:.1f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferry-bin", required=True)
    ap.add_argument("--cnirun", required=True)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--rss-rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--build-note", default="")
    ap.add_argument("--raw", help="also write every sample (seconds) as JSON here")
    a = ap.parse_args()

    sh("ip", "link", "set", "lo", "up")
    # The node's own address (portmap DNATs the host's addresses).
    # (a veth pair: this kernel has no dummy driver)
    sh("ip", "link", "add", "node0", "type", "veth", "peer", "name", "node0-peer")
    sh("ip", "link", "set", "node0-peer", "up")
    sh("ip", "addr", "add", f"{NODE_IP}/24", "dev", "node0")
    sh("ip", "link", "set", "node0", "up")
    sh("ip", "route", "add", "default", "via", "192.168.77.1", "dev", "node0")
    work = tempfile.mkdtemp(prefix="ferry-bench-chain-")
    try:
        return run_all(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_all(a, work):
    load0 = os.getloadavg()
    ref = Chain("reference", REF_DIR, ["loopback", "bridge", "host-local", "portmap", "bandwidth"],
                "cniref0", "10.211.0.0/16", work)
    fer = Chain("ferry", a.ferry_bin, ["ferry-loopback", "ferry-bridge", "ferry-ipam", "ferry-portmap",
                                       "ferry-bandwidth"], "cniferry0", "10.212.0.0/16", work)
    # exec order in the chain: drop the IPAM type (bridge execs it itself)
    for c in (ref, fer):
        c.types = [c.types[0], c.types[1], c.types[3], c.types[4]]
    chains = [ref, fer]
    _chains.extend(chains)

    # Warm up: the first pods create the bridges, base chains and tables.
    warm_left = []
    for c in chains:
        for kind in ("a", "b", "b"):
            pod(c, kind, f"warm{kind}{_port}", warm_left)
            pod(c, kind, f"warmc{kind}{_port}", warm_left, cnirun=a.cnirun)
    start_state = snapshot_all()
    leftovers = []

    res = {}
    loads = {}
    for kind in KINDS:
        l0 = os.getloadavg()[0]
        per = {c.name: {"add": [], "del": [], "add_p": [], "del_p": []} for c in chains}
        run = {c.name: {"add": [], "del": []} for c in chains}
        for r in range(a.rounds):
            order = chains if r % 2 == 0 else chains[::-1]
            for c in order:
                t_add, t_del, a_per, d_per, _, _ = pod(c, kind, f"{kind}{r}", leftovers)
                per[c.name]["add"].append(t_add)
                per[c.name]["del"].append(t_del)
                per[c.name]["add_p"].append(a_per)
                per[c.name]["del_p"].append(d_per)
            for c in order[::-1]:
                t_add, t_del = pod(c, kind, f"{kind}{r}c", leftovers, cnirun=a.cnirun)
                run[c.name]["add"].append(t_add)
                run[c.name]["del"].append(t_del)
        res[kind] = (per, run)
        loads[kind] = (l0, os.getloadavg()[0])
        print(f"kind {kind} done, load {loads[kind]}", file=sys.stderr)

    # Peak RSS (GNU time %M) in separate pods: the wrapper must not skew latency.
    rss_file = os.path.join(work, "rss")
    rss = {c.name: [[] for _ in range(4)] for c in chains}
    for r in range(a.rss_rounds):
        for c in chains:
            _, _, _, _, a_rss, d_rss = pod(c, "b", f"rss{r}", leftovers, rss_file=rss_file)
            for i in range(4):
                rss[c.name][i] += [a_rss[i], d_rss[i]]

    # The runner's own cost of one exec (fork, exec, pipes, wait): /bin/true.
    base = []
    for _ in range(31):
        t0 = time.perf_counter()
        subprocess.run(["/bin/true"], input=b"{}", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        base.append(time.perf_counter() - t0)
    a.exec_floor = med(base)

    end_state = snapshot_all()
    final = diff(start_state, end_state)
    veths = [line for line in sh("ip", "-o", "link", "show", "type", "veth").splitlines()
             if not re.search(r"\bnode0(-peer)?@", line)]
    cached = [f for c in chains for f in (os.listdir(c.cache_dir) if os.path.isdir(c.cache_dir) else [])]
    load1 = os.getloadavg()
    ok = not (leftovers or final or veths or cached)
    text = report(a, chains, res, loads, rss, load0, load1, leftovers, final, veths, cached, ok)
    with open(a.out, "w") as fh:
        fh.write(text)
    if a.raw:
        with open(a.raw, "w") as fh:
            json.dump({"labels": {c.name: c.labels for c in chains}, "exec_floor": a.exec_floor,
                       "loads": loads, "rss_kib": rss,
                       "kinds": {k: {"per_plugin_runner": per, "cnirun": run}
                                 for k, (per, run) in res.items()}}, fh)
    print(text)
    return 0 if ok else 1


TARGETS = {"ADD": 0.20, "DEL": 0.6}


def report(a, chains, res, loads, rss, load0, load1, leftovers, final, veths, cached, ok):
    ref, fer = chains
    L = []
    L.append("# The Kubernetes chain: ferry vs the reference plugins")
    L.append("")
    L.append(
        f"Measured by `scripts/bench-chain.sh` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"kernel {os.uname().release}, {os.cpu_count()} CPUs (shared with other work). "
        f"Load average (1/5/15 min) {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} at the start, "
        f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} at the end; other work slows both sides and moves "
        "the ratios, so compare runs made at a similar load.")
    L.append("")
    L.append(f"Built: {a.build_note}")
    L.append("")
    L.append(
        "Chain, cniVersion 1.0.0 on both sides, the same keys: loopback; bridge (`isGateway`, "
        "`isDefaultGateway`, `hairpinMode`, `ipMasq: true`, `mtu` 1450, IPAM one /16 range); portmap "
        "(`capabilities.portMappings`); bandwidth (`capabilities.bandwidth`). "
        f"ferry: {', '.join(fer.labels)} (the build below). "
        f"Reference: {', '.join(ref.labels)} from {REF_DIR} (Debian containernetworking-plugins "
        f"{dpkg_version('containernetworking-plugins')}, iptables {dpkg_version('iptables')} via "
        f"{os.path.basename(os.path.realpath(shutil.which('iptables') or 'iptables'))}).")
    L.append("")
    L.append(
        "Setup: a private network + mount namespace is the node (an uplink (veth) with "
        f"{NODE_IP}/24 and a default route; gone with the run, also on failure). Per pod a fresh "
        "`ip netns` (not timed), ADD, then DEL with the netns still present (kubelet tears the network "
        "down before the sandbox), CNI_ARGS as containerd passes them. One pod at a time. "
        "Pod kinds: (a) runtimeConfig `{}`; (b) runtimeConfig "
        f"`portMappings: [{{hostPort: 30xxx, containerPort: 80, protocol: tcp}}]` and `bandwidth: "
        f"{{ingressRate: {RATE}, ingressBurst: {BURST}, egressRate: {RATE}, egressBurst: {BURST}}}` "
        "(bits/s and bits; the bursts are what containerd's CRI passes), given only to the plugins "
        "declaring the capability, on ADD and on DEL, as libcni does. "
        "Every kind-(b) ADD is checked for the DNAT to the pod's :80 and a tbf on its host veth.")
    L.append("")
    L.append(
        f"Runners, the same for both sides, {a.rounds} rounds per pod kind, ferry and reference "
        "alternating (A/B, B/A) within each round, medians: "
        "**per-plugin runner** (scripts/bench_chain.py does what libcni's AddNetworkList/DelNetworkList "
        "do: plugins in order with prevResult, runtimeConfig filtered by capabilities, result cached; "
        "DEL in reverse order with the cached result; each plugin exec timed from fork to exit) and "
        "**cnirun** (`cnirun add|del`, the same logic in one Rust process, timed from outside: the "
        "chain as a runtime's single call, a cross-check of the totals).")
    if a.raw:
        L.append("")
        L.append(f"Every sample (seconds), per pod and plugin: [{os.path.basename(a.raw)}]({os.path.basename(a.raw)}).")
    L.append("")
    L.append("## Chain totals")
    L.append("")
    L.append("| pod kind | measurement | reference | ferry | ferry / reference | target |")
    L.append("|---|---|---|---|---|---|")
    for kind, desc in KINDS.items():
        per, run = res[kind]
        for verb, key in (("ADD", "add"), ("DEL", "del")):
            tgt = TARGETS[verb]
            for runner, data in (("per-plugin runner", per), ("cnirun", run)):
                r, f = med(data["reference"][key]), med(data["ferry"][key])
                ratio = f / r
                mark = "met" if ratio <= tgt else "**missed**"
                L.append(f"| ({kind}) {desc} | chain {verb}, {runner} | {ms(r)} | {ms(f)} | "
                         f"**{ratio:.2f}x** | ≤ {tgt:.2f}x: {mark} |")
    L.append("")
    L.append("Load average (1 min) at the start / end of each kind: " + "; ".join(
        f"({k}) {l0:.2f} / {l1:.2f}" for k, (l0, l1) in loads.items()) + ".")
    L.append("")
    L.append("## Per plugin (per-plugin runner, median of each exec)")
    L.append("")
    L.append("| pod kind | plugin (reference / ferry) | verb | reference | ferry | ferry / reference | share of ferry's chain |")
    L.append("|---|---|---|---|---|---|---|")
    for kind in KINDS:
        per, _ = res[kind]
        for verb, key in (("ADD", "add_p"), ("DEL", "del_p")):
            fsum = sum(med([p[i] for p in per["ferry"][key]]) for i in range(4))
            for i in range(4):
                r = med([p[i] for p in per["reference"][key]])
                f = med([p[i] for p in per["ferry"][key]])
                L.append(f"| ({kind}) | {ref.labels[i]} / {fer.labels[i]} | {verb} | {ms(r)} | {ms(f)} | "
                         f"{f / r:.2f}x | {100 * f / fsum:.0f} % |")
    L.append("")
    L.append(f"For scale: the runner's exec of `/bin/true` (fork, exec, pipes, wait) takes {ms(a.exec_floor)} "
             "(median of 31) and is in every row above, on both sides.")
    L.append("")
    L.append("The chain total is a little more than the sum of the plugin medians: the runner's own "
             "JSON and cache work between execs, and medians do not add up exactly.")
    L.append("")
    L.append(f"## Peak RSS per plugin process (GNU time %M, max over {a.rss_rounds} kind-(b) pods, ADD and DEL)")
    L.append("")
    L.append("| plugin (reference / ferry) | reference | ferry | ferry / reference |")
    L.append("|---|---|---|---|")
    for i in range(4):
        r, f = max(rss["reference"][i]), max(rss["ferry"][i])
        L.append(f"| {ref.labels[i]} / {fer.labels[i]} | {r} KiB | {f} KiB | {f / r:.2f}x |")
    L.append("")
    L.append("The bridge row includes its IPAM child (time measures the process tree's largest member).")
    L.append("")
    L.append("## Leftovers")
    L.append("")
    L.append("Before each pod's ADD and after its DEL the node's links, `nft list ruleset`, "
             "iptables-save (nft and legacy, IPv4 and IPv6, counters stripped), tc qdiscs, routes (all "
             "tables), IPAM reservation files and the result cache are compared; after the last pod the "
             "whole node is compared with its state after the warm-up pods (which create the bridges, "
             "base chains and tables), and no veth may remain.")
    L.append("")
    if ok:
        n = 2 * len(KINDS) * 2 * a.rounds + 2 * a.rss_rounds
        L.append(f"**None**: all {n} measured pods (and the warm-up pods) left nothing behind.")
    else:
        L.append("**FAILED**: leftovers found.")
        L.append("")
        for name, cid, left in leftovers:
            L.append(f"- {name} pod {cid}: {'; '.join(left)}")
        if final:
            L.append(f"- node vs after warm-up: {'; '.join(final)}")
        if veths:
            L.append(f"- veths remaining: {veths}")
        if cached:
            L.append(f"- cached results remaining: {cached}")
    return "\n".join(L) + "\n"


def dpkg_version(pkg):
    return sh("dpkg-query", "-W", "-f", "${Version}", pkg, check=False) or "?"


if __name__ == "__main__":
    sys.exit(main())
