//! deploy/: the Kubernetes manifest, the Dockerfile and install.sh, checked
//! against ferryd's source so that a renamed flag, env var, default port or
//! probe path breaks a test instead of a cluster.

use ferry_tests::etcd::{EtcdServer, require_etcd};
use ferry_tests::{TestDir, bin, workspace_root};
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn read(rel: &str) -> String {
    let p = workspace_root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Every document of deploy/kubernetes/ferry.yaml, as JSON values.
fn manifest() -> Vec<Value> {
    let text = read("deploy/kubernetes/ferry.yaml");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let v: serde_yaml_ng::Value =
                serde::Deserialize::deserialize(doc).expect("ferry.yaml parses");
            serde_json::to_value(v).expect("YAML maps to JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// ferryd's source: overlay-daemon/src/*.rs concatenated.
fn ferryd_source() -> String {
    let dir = workspace_root().join("overlay-daemon/src");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("overlay-daemon/src")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("read source"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The environment variables ferryd reads: its clap `env = "…"` names and
/// the log filter's `from_env("…")`.
fn ferryd_env_names() -> BTreeSet<String> {
    let src = ferryd_source();
    let mut out = BTreeSet::new();
    for marker in ["env = \"", "from_env(\""] {
        for (i, _) in src.match_indices(marker) {
            let rest = &src[i + marker.len()..];
            let name = &rest[..rest.find('"').expect("closing quote")];
            out.insert(name.to_string());
        }
    }
    assert!(out.len() > 10, "ferryd's env names not found: {out:?}");
    out
}

/// The `default_value` of the clap argument whose env var is `env`.
fn ferryd_default(env: &str) -> String {
    let src = ferryd_source();
    let at = src
        .find(&format!("env = \"{env}\""))
        .unwrap_or_else(|| panic!("{env} is not a ferryd env var"));
    let field = &src[at..at + src[at..].find("pub ").expect("the field follows")];
    let key = "default_value = \"";
    let start = field
        .find(key)
        .unwrap_or_else(|| panic!("{env} has no default"))
        + key.len();
    field[start..start + field[start..].find('"').unwrap()].to_string()
}

/// The routes ferryd's HTTP server serves.
fn ferryd_routes() -> BTreeSet<String> {
    let src = read("overlay-daemon/src/http.rs");
    src.match_indices(".route(\"")
        .map(|(i, m)| {
            let rest = &src[i + m.len()..];
            rest[..rest.find('"').unwrap()].to_string()
        })
        .collect()
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list}"))
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} {name}"))
}

fn env_of(c: &Value) -> Vec<&Value> {
    c["env"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn env_value<'a>(c: &'a Value, name: &str) -> &'a Value {
    env_of(c)
        .into_iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{} has no env {name}", c["name"]))
}

/// The volume a container mounts at `path`, and the mount.
fn mount_at<'a>(pod: &'a Value, c: &'a Value, path: &str) -> (&'a Value, &'a Value) {
    let m = c["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("{} mounts nothing at {path}", c["name"]));
    let v = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == m["name"])
        .unwrap_or_else(|| panic!("volume {} missing", m["name"]));
    (v, m)
}

/// Checks that a `FERRY_ETCD_*FILE` path lies in a mounted Secret volume.
fn in_secret_mount(pod: &Value, c: &Value, path: &str) {
    let ok = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .any(|m| {
            let dir = m["mountPath"].as_str().unwrap();
            path.starts_with(&format!("{dir}/"))
                && pod["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v["name"] == m["name"] && v["secret"].is_object())
        });
    assert!(
        ok,
        "{} reads {path}, which is in no mounted Secret",
        c["name"]
    );
}

#[test]
fn daemonset_matches_ferryd() {
    let docs = manifest();
    let envs = ferryd_env_names();
    let ds = of_kind(&docs, "DaemonSet");
    assert_eq!(ds.len(), 1, "one DaemonSet");
    let pod = &ds[0]["spec"]["template"]["spec"];
    assert_eq!(
        ds[0]["spec"]["selector"]["matchLabels"],
        ds[0]["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    let tolerates_all = pod["tolerations"]
        .as_array()
        .expect("tolerations")
        .iter()
        .any(|t| t["operator"] == "Exists" && t.get("key").is_none() && t.get("effect").is_none());
    assert!(
        tolerates_all,
        "must run on every node: {}",
        pod["tolerations"]
    );

    let d = container(pod, "containers", "ferryd");
    let caps: BTreeSet<&str> = d["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        caps.contains("NET_ADMIN") && caps.contains("NET_RAW"),
        "{caps:?}"
    );
    assert_ne!(d["securityContext"]["privileged"], true);

    // Probes: ferryd's routes on ferryd's default port.
    let listen = ferryd_default("FERRY_LISTEN");
    let port: u64 = listen.rsplit(':').next().unwrap().parse().expect("port");
    let routes = ferryd_routes();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &d[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(routes.contains(path), "ferryd serves no {path}: {routes:?}");
        assert_eq!(get["port"], port, "{probe} port vs ferryd's {listen}");
    }
    assert!(
        envs_set_in(d).iter().all(|n| n != "FERRY_LISTEN"),
        "the probes assume ferryd's default listen address"
    );

    // Env: only names ferryd reads; etcd + TLS + node name all set.
    for c in pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["initContainers"].as_array().unwrap())
    {
        for n in envs_set_in(c) {
            if n.starts_with("FERRY_") {
                assert!(
                    envs.contains(&n),
                    "{}: ferryd reads no {n} ({envs:?})",
                    c["name"]
                );
            }
        }
    }
    for n in [
        "FERRY_ETCD_ENDPOINTS",
        "FERRY_ETCD_CAFILE",
        "FERRY_ETCD_CERTFILE",
        "FERRY_ETCD_KEYFILE",
        "FERRY_NODE_NAME",
    ] {
        assert!(envs.contains(n), "ferryd no longer reads {n}");
        env_value(d, n);
    }
    assert_eq!(
        env_value(d, "FERRY_NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert!(env_value(d, "FERRY_ETCD_ENDPOINTS")["valueFrom"]["secretKeyRef"].is_object());
    for n in [
        "FERRY_ETCD_CAFILE",
        "FERRY_ETCD_CERTFILE",
        "FERRY_ETCD_KEYFILE",
    ] {
        let path = env_value(d, n)["value"].as_str().expect("a path");
        in_secret_mount(pod, d, path);
    }

    // Mounts: where ferryd writes by default, from the host.
    let conf_dir = ferryd_default("FERRY_CNI_CONF_DIR");
    let subnet_file = ferryd_default("FERRY_SUBNET_FILE");
    let run_dir = Path::new(&subnet_file)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    for dir in [&conf_dir, &run_dir] {
        let (v, m) = mount_at(pod, d, dir);
        assert_eq!(
            v["hostPath"]["path"],
            dir.as_str(),
            "{dir} comes from the host"
        );
        assert_ne!(m["readOnly"], true, "ferryd writes {dir}");
    }
    let (v, m) = mount_at(pod, d, "/lib/modules");
    assert_eq!(v["hostPath"]["path"], "/lib/modules");
    assert_eq!(m["readOnly"], true);

    // The init container installs the plugins into the host's /opt/cni/bin.
    let init = container(pod, "initContainers", "install-cni");
    let cmd: Vec<&str> = init["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(cmd, ["/opt/ferry/install.sh", "--cni-only"]);
    let root = env_value(init, "ROOT")["value"].as_str().expect("ROOT");
    let (v, _) = mount_at(pod, init, &format!("{root}/opt/cni/bin"));
    assert_eq!(v["hostPath"]["path"], "/opt/cni/bin");
    let image = d["image"].as_str().unwrap();
    assert_eq!(init["image"], image, "one image for both");

    // No API server access: no RBAC, no token.
    for kind in ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"] {
        assert!(of_kind(&docs, kind).is_empty(), "unexpected {kind}");
    }
    let sa = of_kind(&docs, "ServiceAccount");
    assert_eq!(sa.len(), 1);
    assert_eq!(sa[0]["automountServiceAccountToken"], false);
    assert_eq!(pod["serviceAccountName"], sa[0]["metadata"]["name"]);
}

fn envs_set_in(c: &Value) -> Vec<String> {
    env_of(c)
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

/// The network config in the ConfigMap, and the Job that stores it.
fn net_conf(docs: &[Value]) -> String {
    let cm = of_kind(docs, "ConfigMap");
    assert_eq!(cm.len(), 1);
    cm[0]["data"]["net-conf.json"]
        .as_str()
        .expect("net-conf.json")
        .trim()
        .to_string()
}

#[test]
fn set_network_job_and_config() {
    let docs = manifest();
    let conf: Value = serde_json::from_str(&net_conf(&docs)).expect("net-conf.json is JSON");
    assert_eq!(conf["network"], "10.244.0.0/16");
    assert_eq!(conf["subnetLen"], 24);
    assert_eq!(conf["backend"]["type"], "vxlan");
    let jobs = of_kind(&docs, "Job");
    assert_eq!(jobs.len(), 1);
    let pod = &jobs[0]["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let script = c["command"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_str()
        .unwrap();
    assert!(script.contains("ferryd set-network"), "{script}");
    let (v, m) = mount_at(pod, c, "/etc/ferry/config");
    assert_eq!(
        v["configMap"]["name"],
        of_kind(&docs, "ConfigMap")[0]["metadata"]["name"]
    );
    assert!(script.contains(&format!(
        "{}/net-conf.json",
        m["mountPath"].as_str().unwrap()
    )));
    let envs = ferryd_env_names();
    for n in envs_set_in(c) {
        assert!(
            envs.contains(&n),
            "the Job sets {n}, which ferryd does not read"
        );
    }
    for n in [
        "FERRY_ETCD_CAFILE",
        "FERRY_ETCD_CERTFILE",
        "FERRY_ETCD_KEYFILE",
    ] {
        in_secret_mount(pod, c, env_value(c, n)["value"].as_str().unwrap());
    }
}

/// The ConfigMap's config is what `ferryd set-network` accepts: stored in a
/// real etcd and read back by `ferryd show`.
#[test]
fn net_conf_accepted_by_ferryd() {
    if !require_etcd() {
        return;
    }
    let json = net_conf(&manifest());
    let etcd = EtcdServer::start();
    let ferryd = |args: &[&str]| {
        let out = Command::new(bin("ferryd"))
            .args(["--etcd-endpoints", &etcd.endpoint()])
            .args(args)
            .output()
            .expect("run ferryd");
        assert!(
            out.status.success(),
            "ferryd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ferryd(&["set-network", &json]);
    let shown = ferryd(&["show"]);
    assert!(shown.contains("10.244.0.0/16"), "{shown}");
}

#[test]
fn dockerfile_ships_what_the_manifest_runs() {
    let df = read("deploy/Dockerfile");
    let install = read("deploy/install.sh");
    assert!(
        df.contains("COPY deploy/install.sh /opt/ferry/install.sh"),
        "the init container's script"
    );
    assert!(df.contains("ENTRYPOINT [\"/usr/local/bin/ferryd\"]"));
    assert!(df.contains("--exclude ferry-tests"));
    let stages = df.lines().filter(|l| l.starts_with("FROM ")).count();
    assert_eq!(stages, 2, "multi-stage: build, runtime");
    // Every plugin install.sh installs is a workspace binary the image ships.
    let plugins = install
        .lines()
        .find_map(|l| l.strip_prefix("PLUGINS=("))
        .expect("PLUGINS in install.sh")
        .trim_end_matches(')')
        .split_whitespace()
        .map(str::to_string)
        .collect::<Vec<_>>();
    let root = workspace_root();
    let manifests = [
        "plugins/loopback",
        "plugins/bridge",
        "ipam",
        "plugins/portmap",
        "plugins/bandwidth",
    ];
    for p in &plugins {
        assert!(
            df.contains(p.as_str()),
            "the Dockerfile does not install {p}"
        );
        let declared = manifests.iter().any(|m| {
            std::fs::read_to_string(root.join(m).join("Cargo.toml"))
                .is_ok_and(|t| t.contains(&format!("name = \"{p}\"")))
        });
        assert!(declared, "{p} is no binary of the workspace");
    }
}

#[test]
fn install_sh_parses() {
    let out = Command::new("bash")
        .arg("-n")
        .arg(workspace_root().join("deploy/install.sh"))
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_exe(p: &Path, text: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn install(root: &Path, src: &Path, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(workspace_root().join("deploy/install.sh"))
        .args(args)
        .env("ROOT", root)
        .env("BIN_SRC", src)
        .output()
        .expect("run install.sh");
    assert!(
        out.status.success(),
        "install.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn content(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Files anywhere under `dir` whose name says they are install.sh's temps.
fn temps(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().contains("ferry-tmp") {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn install_sh_keeps_other_plugins() {
    let t = TestDir::new("install");
    let src = t.path().join("src");
    let names = [
        "ferry-loopback",
        "ferry-bridge",
        "ferry-ipam",
        "ferry-portmap",
        "ferry-bandwidth",
        "ferryd",
    ];
    for n in names {
        write_exe(&src.join(n), &format!("new {n}\n"));
    }
    // A node with other plugins, one of them a multi-call binary that a
    // ferry-bridge symlink points to (k3s style).
    let root = t.path().join("root");
    let cni = root.join("opt/cni/bin");
    write_exe(&cni.join("loopback"), "their loopback\n");
    write_exe(&cni.join("bridge"), "their bridge\n");
    write_exe(&cni.join("multicall"), "their multicall\n");
    std::os::unix::fs::symlink("multicall", cni.join("ferry-bridge")).unwrap();

    install(&root, &src, &[]);
    assert_eq!(content(&cni.join("loopback")), "their loopback\n");
    assert_eq!(content(&cni.join("bridge")), "their bridge\n");
    assert_eq!(
        content(&cni.join("multicall")),
        "their multicall\n",
        "written through a symlink"
    );
    assert!(!cni.join("ferry-bridge").is_symlink());
    for n in &names[..5] {
        let p = cni.join(n);
        assert_eq!(content(&p), format!("new {n}\n"));
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }
    assert_eq!(content(&root.join("usr/local/bin/ferryd")), "new ferryd\n");
    let unit = content(&root.join("etc/systemd/system/ferryd.service"));
    assert!(
        unit.contains("EnvironmentFile=/etc/ferry/ferryd.env"),
        "{unit}"
    );
    assert!(unit.contains("ExecStart=/usr/local/bin/ferryd"), "{unit}");
    let env_file = root.join("etc/ferry/ferryd.env");
    let env = content(&env_file);
    let known = ferryd_env_names();
    for line in env.lines() {
        let l = line.trim_start_matches(['#', ' ']);
        if let Some((name, _)) = l.split_once('=').filter(|(n, _)| n.starts_with("FERRY_")) {
            assert!(
                known.contains(name),
                "ferryd.env names {name}, which ferryd does not read"
            );
        }
    }
    assert!(env.contains("FERRY_ETCD_ENDPOINTS="));
    assert_eq!(
        std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Again, after the operator edited the env file: kept; binaries replaced.
    std::fs::write(&env_file, "FERRY_ETCD_ENDPOINTS=https://mine:2379\n").unwrap();
    write_exe(&src.join("ferry-ipam"), "newer ferry-ipam\n");
    install(&root, &src, &[]);
    assert_eq!(
        content(&env_file),
        "FERRY_ETCD_ENDPOINTS=https://mine:2379\n"
    );
    assert_eq!(content(&cni.join("ferry-ipam")), "newer ferry-ipam\n");
    assert_eq!(content(&cni.join("loopback")), "their loopback\n");
    assert_eq!(temps(&root), Vec::<PathBuf>::new());

    // --cni-only on a bare node: plugins + loopback (none there), nothing else.
    let bare = t.path().join("bare");
    install(&bare, &src, &["--cni-only"]);
    let cni = bare.join("opt/cni/bin");
    assert_eq!(content(&cni.join("loopback")), "new ferry-loopback\n");
    assert_eq!(content(&cni.join("ferry-bridge")), "new ferry-bridge\n");
    assert!(!bare.join("usr").exists() && !bare.join("etc").exists());
    assert_eq!(temps(&bare), Vec::<PathBuf>::new());
}
