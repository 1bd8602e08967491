//! The plugin skeleton: environment + stdin → verb → stdout JSON + exit code.
//!
//! [`run`] is a pure function of its inputs so every rule of the protocol is
//! unit-tested without touching the process environment; [`main`] is the only
//! part that reads the real environment and exits.

use crate::args::{CniArgs, validate_container_id, validate_ifname};
use crate::calllog;
use crate::config::NetConf;
use crate::error::{CniError, ErrorCode};
use crate::result::CniResult;
use crate::version::{SpecVersion, VersionInfo};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }
}

/// How much the spec requires of a variable for one verb.
#[derive(Clone, Copy, PartialEq)]
enum Need {
    Required,
    Optional,
}

/// The spec's table of required variables per verb (libcni `reqForCmdEntry`).
fn need(var: &str, cmd: Command) -> Need {
    use Command::*;
    let required: &[Command] = match var {
        "CNI_CONTAINERID" => &[Add, Check, Del],
        "CNI_NETNS" => &[Add, Check],
        "CNI_IFNAME" => &[Add, Check, Del],
        "CNI_PATH" => &[Add, Check, Del, Gc, Status],
        _ => &[],
    };
    if required.contains(&cmd) {
        Need::Required
    } else {
        Need::Optional
    }
}

/// Everything the runtime told the plugin, validated.
#[derive(Debug, Clone)]
pub struct CmdArgs {
    pub command: Command,
    /// Empty for GC and STATUS.
    pub container_id: String,
    /// `None` when the runtime sent none (DEL after the container is gone).
    pub netns: Option<PathBuf>,
    /// Empty for GC and STATUS.
    pub ifname: String,
    pub args: CniArgs,
    /// CNI_ARGS as received, passed on unchanged to delegated plugins.
    pub raw_args: String,
    /// CNI_PATH split on ':'.
    pub path: Vec<PathBuf>,
    /// The version negotiated from the config: results are printed in it.
    pub version: SpecVersion,
}

impl CmdArgs {
    /// CNI_PATH joined again, for delegated plugins.
    pub fn path_string(&self) -> String {
        self.path
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// What a plugin implements; the skeleton does all protocol checks first.
pub trait Plugin {
    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError>;
    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError>;
    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError>;
    /// GC (1.1.0): release what is not in `conf.valid_attachments`.
    fn gc(&self, _args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        Ok(())
    }
    /// STATUS (1.1.0): whether the plugin can service ADD now.
    fn status(&self, _args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        Ok(())
    }
}

/// Runs one invocation. Returns the process exit code; stdout receives only
/// the result or the error JSON.
pub fn run(
    plugin: &dyn Plugin,
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
) -> i32 {
    run_named(plugin, None, env, stdin, stdout)
}

/// [`run`], naming the plugin in the call log `name` (the executable's
/// name; `None`: the config's `type`).
pub fn run_named(
    plugin: &dyn Plugin,
    name: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
) -> i32 {
    let started = std::time::Instant::now();
    let mut version_for_errors = SpecVersion::LATEST.as_str().to_string();
    let mut log = None;
    let outcome = dispatch(plugin, env, stdin, &mut version_for_errors, &mut log);
    if let Some((target, plugin_type)) = log {
        log_call(
            &target,
            name.unwrap_or(&plugin_type),
            env,
            started.elapsed(),
            outcome.as_ref().map(|_| ()),
        );
    }
    let (json, code) = match outcome {
        Ok(Some(json)) => (Some(json), 0),
        Ok(None) => (None, 0),
        Err(e) => (Some(e.to_json(&version_for_errors)), 1),
    };
    if let Some(json) = json {
        let mut text = serde_json::to_string(&json).expect("JSON value serializes");
        text.push('\n');
        if stdout
            .write_all(text.as_bytes())
            .and_then(|_| stdout.flush())
            .is_err()
        {
            // Nothing more can be told to the runtime; the exit code says it.
            return 1;
        }
    }
    code
}

/// Appends the call's line to the log. STATUS is logged only when it
/// fails: runtimes poll it every few seconds and would rotate the ADDs away.
/// A failure to log is ignored: the log never fails a call.
fn log_call(
    target: &calllog::LogTarget,
    plugin: &str,
    env: &dyn Fn(&str) -> Option<String>,
    took: std::time::Duration,
    outcome: Result<(), &CniError>,
) {
    let verb = env("CNI_COMMAND").unwrap_or_default();
    if verb == "STATUS" && outcome.is_ok() {
        return;
    }
    let container = env("CNI_CONTAINERID").unwrap_or_default();
    let ifname = env("CNI_IFNAME").unwrap_or_default();
    let cni_args = env("CNI_ARGS").unwrap_or_default();
    let call = calllog::Call {
        plugin,
        verb: &verb,
        container: &container,
        ifname: &ifname,
        cni_args: &cni_args,
    };
    let line = calllog::line(
        &call,
        took,
        outcome.map_err(|e| (e.code.as_u32(), e.msg.as_str())),
    );
    let _ = calllog::append(target, &line);
}

/// The call log's target and the plugin's type, from the raw config: read
/// before the config is validated, so a call refused for a bad config is
/// logged too.
fn log_target_of(v: &serde_json::Value) -> Option<(calllog::LogTarget, String)> {
    let target = calllog::LogTarget::from_config(v)?;
    let plugin_type = v
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("unknown")
        .to_string();
    Some((target, plugin_type))
}

fn dispatch(
    plugin: &dyn Plugin,
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    version_for_errors: &mut String,
    log: &mut Option<(calllog::LogTarget, String)>,
) -> Result<Option<serde_json::Value>, CniError> {
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    let command = match get("CNI_COMMAND") {
        None => {
            return Err(CniError::invalid_env(
                "required env variables [CNI_COMMAND] missing",
            ));
        }
        Some(c) => Command::parse(&c)
            .ok_or_else(|| CniError::invalid_env(format!("unknown CNI_COMMAND: {c}")))?,
    };

    let mut input = Vec::new();
    stdin
        .read_to_end(&mut input)
        .map_err(|e| CniError::io("error reading from stdin").with_details(e))?;

    // Parsed once: the log's target, VERSION's echo and the config all
    // come from this value. Undecodable stdin is code 6 below, once the
    // environment has been checked.
    let parsed = serde_json::from_slice::<serde_json::Value>(&input);
    if command != Command::Version {
        *log = parsed.as_ref().ok().and_then(log_target_of);
    }

    if command == Command::Version {
        // The reply echoes the caller's version when it is one we speak.
        let asked = parsed
            .as_ref()
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().and_then(SpecVersion::parse));
        let v = asked.unwrap_or(SpecVersion::LATEST);
        return Ok(Some(serde_json::to_value(VersionInfo::new(v.as_str()))?));
    }

    let missing: Vec<&str> = ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]
        .into_iter()
        .filter(|v| need(v, command) == Need::Required && get(v).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(CniError::invalid_env(format!(
            "required env variables [{}] missing",
            missing.join(" ")
        )));
    }

    let conf = NetConf::from_parsed(parsed)?;
    let version = SpecVersion::negotiate(&conf.cni_version)?;
    *version_for_errors = version.as_str().to_string();
    conf.validate()?;
    match command {
        Command::Check if !version.has_check() => {
            return Err(
                CniError::incompatible_version("config version does not allow CHECK")
                    .with_details(format!("cniVersion {version} is older than 0.4.0")),
            );
        }
        Command::Gc | Command::Status if !version.has_gc_and_status() => {
            return Err(CniError::incompatible_version(format!(
                "config version does not allow {}",
                command.as_str()
            ))
            .with_details(format!("cniVersion {version} is older than 1.1.0")));
        }
        _ => {}
    }

    let container_id = get("CNI_CONTAINERID").unwrap_or_default();
    let ifname = get("CNI_IFNAME").unwrap_or_default();
    if matches!(command, Command::Add | Command::Del | Command::Check) {
        validate_container_id(&container_id)?;
        validate_ifname(&ifname)?;
    }
    let netns = get("CNI_NETNS").map(PathBuf::from);
    if let Some(path) = &netns
        && matches!(command, Command::Add | Command::Del | Command::Check)
    {
        refuse_own_netns(path)?;
    }
    let raw_args = get("CNI_ARGS").unwrap_or_default();
    let args = CmdArgs {
        command,
        container_id,
        netns,
        ifname,
        args: CniArgs::parse(&raw_args)?,
        raw_args,
        path: get("CNI_PATH")
            .map(|p| {
                p.split(':')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default(),
        version,
    };

    match command {
        Command::Add => Ok(Some(plugin.add(&args, &conf)?.to_json(version))),
        Command::Del => plugin.del(&args, &conf).map(|_| None),
        Command::Check => plugin.check(&args, &conf).map(|_| None),
        Command::Gc => plugin.gc(&args, &conf).map(|_| None),
        Command::Status => plugin.status(&args, &conf).map(|_| None),
        Command::Version => unreachable!("handled above"),
    }
}

/// Refuses a CNI_NETNS that is the plugin's own network namespace (the node's,
/// when the runtime runs plugins there): loopback would take the node's `lo`
/// down on DEL, bridge would replace the node's default route. Checked here,
/// once, for every plugin and verb, whether the plugin enters the namespace
/// or not.
///
/// `stat(2)`, not `open(2)`: it never blocks (a FIFO) and never runs a
/// device's open. A path that cannot be stat'ed is left to the plugin (DEL of
/// a namespace that is gone succeeds; ADD reports it as code 8).
fn refuse_own_netns(path: &Path) -> Result<(), CniError> {
    use std::os::unix::fs::MetadataExt;
    const OWN: &str = "/proc/self/ns/net";
    let Ok(target) = std::fs::metadata(path) else {
        return Ok(());
    };
    let own =
        std::fs::metadata(OWN).map_err(|e| CniError::io(format!("stat {OWN}")).with_details(e))?;
    if (target.dev(), target.ino()) == (own.dev(), own.ino()) {
        return Err(CniError::invalid_env(format!(
            "CNI_NETNS {} is the plugin's own network namespace, not a container's",
            path.display()
        )));
    }
    Ok(())
}

/// The process entry point of a plugin binary: real environment, stdin and
/// stdout, then exit with the code [`run`] returned.
pub fn main(plugin: &dyn Plugin) -> ! {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let name = Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let code = run_named(
        plugin,
        name.as_deref(),
        &|k| std::env::var(k).ok(),
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
    );
    std::process::exit(code)
}

/// A plugin-specific error (code ≥ 100 is free for plugins).
pub fn plugin_error(code: u32, msg: impl Into<String>) -> CniError {
    debug_assert!(code >= 100);
    CniError::new(ErrorCode::Plugin(code), msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::{Interface, IpConfig};
    use serde_json::{Value, json};
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Records what the skeleton passed on.
    #[derive(Default)]
    struct Recorder {
        calls: RefCell<Vec<(Command, CmdArgs)>>,
        fail_with: Option<CniError>,
    }

    impl Recorder {
        fn outcome<T>(&self, args: &CmdArgs, ok: T) -> Result<T, CniError> {
            self.calls.borrow_mut().push((args.command, args.clone()));
            match &self.fail_with {
                Some(e) => Err(e.clone()),
                None => Ok(ok),
            }
        }
    }

    impl Plugin for Recorder {
        fn add(&self, args: &CmdArgs, _c: &NetConf) -> Result<CniResult, CniError> {
            let result = CniResult {
                interfaces: vec![Interface {
                    name: "lo".into(),
                    mac: "00:00:00:00:00:00".into(),
                    ..Default::default()
                }],
                ips: vec![IpConfig {
                    interface: Some(0),
                    address: "127.0.0.1/8".parse().unwrap(),
                    gateway: None,
                }],
                ..Default::default()
            };
            self.outcome(args, result)
        }
        fn del(&self, args: &CmdArgs, _c: &NetConf) -> Result<(), CniError> {
            self.outcome(args, ())
        }
        fn check(&self, args: &CmdArgs, _c: &NetConf) -> Result<(), CniError> {
            self.outcome(args, ())
        }
        fn gc(&self, args: &CmdArgs, _c: &NetConf) -> Result<(), CniError> {
            self.outcome(args, ())
        }
        fn status(&self, args: &CmdArgs, _c: &NetConf) -> Result<(), CniError> {
            self.outcome(args, ())
        }
    }

    fn env_of(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn full_env(cmd: &str) -> HashMap<String, String> {
        env_of(&[
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/run/netns/p1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
        ])
    }

    const CONF: &str = r#"{"cniVersion":"1.1.0","name":"n","type":"ferry-loopback"}"#;

    fn invoke(p: &Recorder, env: &HashMap<String, String>, stdin: &str) -> (i32, String) {
        let mut out = Vec::new();
        let code = run(p, &|k| env.get(k).cloned(), &mut stdin.as_bytes(), &mut out);
        (code, String::from_utf8(out).unwrap())
    }

    fn error_of(out: &str) -> Value {
        let v: Value = serde_json::from_str(out).expect("stdout is one JSON document");
        assert!(v["code"].is_u64() && v["msg"].is_string(), "{out}");
        v
    }

    #[test]
    fn version_lists_all_supported() {
        let p = Recorder::default();
        let (code, out) = invoke(&p, &env_of(&[("CNI_COMMAND", "VERSION")]), "");
        assert_eq!(code, 0);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(v["cniVersion"], "1.1.0");
        let (_, out) = invoke(
            &p,
            &env_of(&[("CNI_COMMAND", "VERSION")]),
            r#"{"cniVersion":"0.4.0"}"#,
        );
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap()["cniVersion"],
            "0.4.0"
        );
        assert!(p.calls.borrow().is_empty());
    }

    #[test]
    fn add_prints_result_in_requested_version() {
        for (v, has_version_field) in [
            ("0.3.1", true),
            ("0.4.0", true),
            ("1.0.0", false),
            ("1.1.0", false),
        ] {
            let p = Recorder::default();
            let conf = CONF.replace("1.1.0", v);
            let (code, out) = invoke(&p, &full_env("ADD"), &conf);
            assert_eq!(code, 0, "{out}");
            let r: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(r["cniVersion"], v);
            assert_eq!(r["ips"][0].get("version").is_some(), has_version_field);
            let calls = p.calls.borrow();
            let (cmd, args) = &calls[0];
            assert_eq!(*cmd, Command::Add);
            assert_eq!(args.container_id, "abc123");
            assert_eq!(args.ifname, "eth0");
            assert_eq!(
                args.netns.as_deref(),
                Some(std::path::Path::new("/run/netns/p1"))
            );
            assert_eq!(args.path.len(), 2);
            assert_eq!(args.args.get("K8S_POD_NAME"), Some("web"));
            assert_eq!(args.path_string(), "/opt/cni/bin:/usr/lib/cni");
        }
    }

    #[test]
    fn verbs_without_result_print_nothing() {
        for cmd in ["DEL", "CHECK", "GC", "STATUS"] {
            let p = Recorder::default();
            let (code, out) = invoke(&p, &full_env(cmd), CONF);
            assert_eq!((code, out.as_str()), (0, ""), "{cmd}");
            assert_eq!(p.calls.borrow()[0].0, Command::parse(cmd).unwrap());
        }
    }

    #[test]
    fn protocol_errors_table() {
        // (env edits, stdin, expected code, text the msg or details must contain)
        type Case = (
            &'static str,
            Vec<(&'static str, Option<&'static str>)>,
            &'static str,
            u64,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                "no command",
                vec![("CNI_COMMAND", None)],
                CONF,
                4,
                "CNI_COMMAND",
            ),
            (
                "bad command",
                vec![("CNI_COMMAND", Some("BOGUS"))],
                CONF,
                4,
                "BOGUS",
            ),
            (
                "no ifname on ADD",
                vec![("CNI_IFNAME", None)],
                CONF,
                4,
                "[CNI_IFNAME]",
            ),
            (
                "empty ifname on ADD",
                vec![("CNI_IFNAME", Some(""))],
                CONF,
                4,
                "[CNI_IFNAME]",
            ),
            (
                "no netns on ADD",
                vec![("CNI_NETNS", None)],
                CONF,
                4,
                "CNI_NETNS",
            ),
            (
                "several missing",
                vec![("CNI_CONTAINERID", None), ("CNI_PATH", None)],
                CONF,
                4,
                "[CNI_CONTAINERID CNI_PATH]",
            ),
            (
                "bad ifname",
                vec![("CNI_IFNAME", Some("a/b"))],
                CONF,
                4,
                "interface name",
            ),
            (
                "control character in ifname",
                vec![("CNI_IFNAME", Some("e\x01"))],
                CONF,
                4,
                "control character",
            ),
            (
                "long ifname",
                vec![("CNI_IFNAME", Some("abcdefghijklmnop"))],
                CONF,
                4,
                "15 bytes",
            ),
            (
                "bad container id",
                vec![("CNI_CONTAINERID", Some("../x"))],
                CONF,
                4,
                "CNI_CONTAINERID",
            ),
            (
                "bad CNI_ARGS",
                vec![("CNI_ARGS", Some("novalue"))],
                CONF,
                4,
                "CNI_ARGS",
            ),
            (
                "malformed JSON",
                vec![],
                "{\"cniVersion\":",
                6,
                "unmarshalling",
            ),
            ("empty stdin", vec![], "", 6, "unmarshalling"),
            (
                "unknown version",
                vec![],
                r#"{"cniVersion":"9.9.9","name":"n","type":"t"}"#,
                1,
                "9.9.9",
            ),
            (
                "missing version",
                vec![],
                r#"{"name":"n","type":"t"}"#,
                1,
                "<missing>",
            ),
            (
                "no name",
                vec![],
                r#"{"cniVersion":"1.0.0","type":"t"}"#,
                7,
                "name",
            ),
        ];
        for (name, edits, stdin, want, needle) in cases {
            let mut env = full_env("ADD");
            for (k, v) in edits {
                match v {
                    Some(v) => env.insert(k.to_string(), v.to_string()),
                    None => env.remove(k),
                };
            }
            let p = Recorder::default();
            let (code, out) = invoke(&p, &env, stdin);
            assert_eq!(code, 1, "{name}");
            assert_eq!(
                out.lines().count(),
                1,
                "{name}: stdout holds exactly the error: {out}"
            );
            let e = error_of(&out);
            assert_eq!(e["code"], want, "{name}: {out}");
            let text = format!("{} {}", e["msg"], e["details"]);
            assert!(text.contains(needle), "{name}: {text:?} lacks {needle:?}");
            assert!(p.calls.borrow().is_empty(), "{name}: plugin must not run");
        }
    }

    #[test]
    fn own_netns_is_refused() {
        for path in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
            for cmd in ["ADD", "CHECK", "DEL"] {
                let mut env = full_env(cmd);
                env.insert("CNI_NETNS".into(), path.into());
                let p = Recorder::default();
                let (code, out) = invoke(&p, &env, CONF);
                assert_eq!(code, 1, "{cmd} {path}");
                let e = error_of(&out);
                assert_eq!(e["code"], 4, "{cmd} {path}: {out}");
                assert!(e["msg"].as_str().unwrap().contains("own network namespace"));
                assert!(p.calls.borrow().is_empty(), "{cmd}: plugin must not run");
            }
        }
        // Another namespace, a path that is gone, or none at all: the plugin runs.
        let mut env = full_env("DEL");
        env.insert("CNI_NETNS".into(), "/proc/self/ns/uts".into());
        assert_eq!(invoke(&Recorder::default(), &env, CONF).0, 0);
        env.insert("CNI_NETNS".into(), "".into());
        assert_eq!(invoke(&Recorder::default(), &env, CONF).0, 0);
    }

    #[test]
    fn per_verb_requirements() {
        // DEL without a netns is allowed (the container may be gone).
        let mut env = full_env("DEL");
        env.remove("CNI_NETNS");
        let p = Recorder::default();
        assert_eq!(invoke(&p, &env, CONF).0, 0);
        assert_eq!(p.calls.borrow()[0].1.netns, None);
        // GC and STATUS need only CNI_PATH.
        for cmd in ["GC", "STATUS"] {
            let env = env_of(&[("CNI_COMMAND", cmd), ("CNI_PATH", "/opt/cni/bin")]);
            let p = Recorder::default();
            assert_eq!(invoke(&p, &env, CONF), (0, String::new()), "{cmd}");
            let env = env_of(&[("CNI_COMMAND", cmd)]);
            assert_eq!(error_of(&invoke(&p, &env, CONF).1)["code"], 4);
        }
    }

    #[test]
    fn verbs_gated_by_version() {
        let cases = [("CHECK", "0.3.1"), ("GC", "1.0.0"), ("STATUS", "0.4.0")];
        for (cmd, v) in cases {
            let p = Recorder::default();
            let (code, out) = invoke(&p, &full_env(cmd), &CONF.replace("1.1.0", v));
            assert_eq!(code, 1);
            let e = error_of(&out);
            assert_eq!(e["code"], 1, "{cmd} {v}");
            assert_eq!(e["cniVersion"], v);
        }
    }

    #[test]
    fn plugin_errors_pass_through() {
        let p = Recorder {
            fail_with: Some(CniError::try_again_later("busy").with_details("lock held")),
            ..Default::default()
        };
        let (code, out) = invoke(&p, &full_env("ADD"), &CONF.replace("1.1.0", "1.0.0"));
        assert_eq!(code, 1);
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            json!({"cniVersion": "1.0.0", "code": 11, "msg": "busy", "details": "lock held"})
        );
        let p = Recorder {
            fail_with: Some(plugin_error(101, "custom")),
            ..Default::default()
        };
        assert_eq!(error_of(&invoke(&p, &full_env("DEL"), CONF).1)["code"], 101);
    }

    #[test]
    fn every_call_is_logged_with_its_result_and_pod() {
        let dir = std::env::temp_dir().join(format!("ferry-skel-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("cni.log");
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","type":"ferry-loopback","cniLog":"{}"}}"#,
            log.display()
        );
        let mut env = full_env("ADD");
        env.insert(
            "CNI_ARGS".into(),
            "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-x".into(),
        );
        assert_eq!(invoke(&Recorder::default(), &env, &conf).0, 0);
        let p = Recorder {
            fail_with: Some(plugin_error(107, "no bridge")),
            ..Default::default()
        };
        assert_eq!(invoke(&p, &env, &conf).0, 1);
        // STATUS succeeding is not logged (runtimes poll it); VERSION never.
        assert_eq!(
            invoke(&Recorder::default(), &full_env("STATUS"), &conf).0,
            0
        );
        assert_eq!(
            invoke(&Recorder::default(), &full_env("VERSION"), &conf).0,
            0
        );
        // A config refused before the plugin runs is logged with its code.
        let bad = conf.replace(r#""name":"n""#, r#""name":"""#);
        assert_eq!(invoke(&Recorder::default(), &full_env("DEL"), &bad).0, 1);
        let entries = crate::calllog::read_all(&log);
        let got: Vec<_> = entries
            .iter()
            .map(|e| (e.verb.as_str(), e.result.as_str(), e.code))
            .collect();
        assert_eq!(
            got,
            [
                ("ADD", "ok", None),
                ("ADD", "error", Some(107)),
                ("DEL", "error", Some(7))
            ]
        );
        assert_eq!(entries[1].who(), "kube-system/coredns-x");
        assert_eq!(entries[1].msg, "no bridge");
        assert_eq!(entries[0].plugin, "ferry-loopback");
        assert_eq!(entries[0].container, "abc123");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
