//! A real, single-member etcd for tests: Debian's `/usr/bin/etcd` on free
//! loopback ports with a data dir of its own, gone when the [`EtcdServer`] is
//! dropped (also on panic).
//!
//! Ports: two listeners are bound to port 0 to learn free ports, closed, and
//! handed to etcd. Another test may grab one in between, so a start whose etcd
//! exits before answering is retried with new ports (a few times) before the
//! test fails with etcd's own log.
//!
//! etcd gets `PR_SET_PDEATHSIG`: it is killed when the thread that started it
//! ends, so a test process killed with SIGKILL leaves no etcd behind. Start
//! the server on the thread that owns it (the test's own thread), not on a
//! helper thread that exits early.

use crate::skip;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// How long a fresh etcd may take to answer `/health`.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Starts tried with fresh ports before giving up.
const START_ATTEMPTS: u32 = 5;

/// `true` when /usr/bin/etcd is installed; otherwise a loud skip (fatal under CI).
pub fn require_etcd() -> bool {
    if Path::new(ETCD_BIN).exists() {
        return true;
    }
    skip("etcd not installed (Debian package etcd-server)")
}

/// One etcd process, its ports and its data dir.
pub struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    /// The member's name, and the cluster it founds (`name=peer-url,...`;
    /// empty: a cluster of itself).
    name: String,
    initial_cluster: String,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP listener for `/health` (the client port may speak TLS).
    metrics_port: u16,
    tls: Option<TlsCerts>,
    /// With `tls`: clients must present a certificate (`--client-cert-auth`).
    client_cert_auth: bool,
}

/// How clients talk to a test etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdSecurity {
    Plain,
    /// TLS; clients verify the server with the CA, no client certificate.
    ServerTls,
    /// TLS, and clients present a certificate signed by the CA.
    MutualTls,
}

/// A throwaway CA with a server certificate for 127.0.0.1 and a client
/// certificate, made with `openssl` (PEM files in one directory).
#[derive(Debug, Clone)]
pub struct TlsCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsCerts {
    /// Generates the CA and both certificates under `dir` (created).
    pub fn generate(dir: &Path) -> TlsCerts {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap_or_else(|e| panic!("run openssl (is it installed?): {e}"));
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=ferry-test-ca",
        ]);
        run(&ca);
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).expect("write ext file");
            let mut req = vec!["req"];
            req.extend(ec);
            let (key, csr, subj) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("/CN=ferry-test-{name}"),
            );
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            run(&req);
            let (pem, extfile) = (format!("{name}.pem"), format!("{name}.ext"));
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ]);
        }
        TlsCerts {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

impl EtcdServer {
    /// Starts etcd and waits until it is healthy. Panics (with etcd's log)
    /// when it cannot; callers check [`require_etcd`] first.
    pub fn start() -> EtcdServer {
        Self::start_secured(EtcdSecurity::Plain)
    }

    /// Like [`start`](Self::start), but clients must speak TLS and present
    /// a certificate signed by a CA made for this server
    /// ([`tls`](Self::tls) has the files for clients).
    pub fn start_tls() -> EtcdServer {
        Self::start_secured(EtcdSecurity::MutualTls)
    }

    /// Like [`start`](Self::start) with the given client security.
    pub fn start_secured(security: EtcdSecurity) -> EtcdServer {
        let mut server = EtcdServer::unstarted(security);
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let (c, p, m) = free_ports();
            server.set_ports(c, p, m);
            match server.spawn().and_then(|()| server.wait_healthy()) {
                Ok(()) => return server,
                Err(why) => {
                    last = why;
                    server.kill();
                    // A half-initialised member dir would make the next
                    // start join a cluster with the old peer URL.
                    let _ = std::fs::remove_dir_all(server.data_dir());
                }
            }
        }
        panic!("etcd did not start after {START_ATTEMPTS} attempts: {last}");
    }

    /// The certificates of a [`start_tls`](Self::start_tls) server.
    pub fn tls(&self) -> Option<&TlsCerts> {
        self.tls.as_ref()
    }

    /// A server with its directory (and certificates) made, not started.
    fn unstarted(security: EtcdSecurity) -> EtcdServer {
        let dir = std::env::temp_dir().join(format!(
            "ferry-etcd-{}-{}",
            std::process::id(),
            crate::unique_index()
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let tls = (security != EtcdSecurity::Plain).then(|| TlsCerts::generate(&dir.join("tls")));
        EtcdServer {
            child: None,
            dir,
            name: "ferry-test".into(),
            initial_cluster: String::new(),
            client_port: 0,
            peer_port: 0,
            metrics_port: 0,
            tls,
            client_cert_auth: security == EtcdSecurity::MutualTls,
        }
    }

    fn set_ports(&mut self, client: u16, peer: u16, metrics: u16) {
        self.client_port = client;
        self.peer_port = peer;
        self.metrics_port = metrics;
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// `http://127.0.0.1:PORT` (`https://` for a TLS server), for clients.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// SIGTERM, then waits for the process to exit (SIGKILL after 10 s).
    /// The data dir is kept for [`start_again`](Self::start_again).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }

    /// Starts etcd again on the same ports and data dir (so with the same
    /// keys and revisions) and waits until it is healthy.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "etcd is still running; stop() first");
        // The client port was ours a moment ago; another test may take it in
        // between, which is a test failure we report rather than hide.
        let mut last = String::new();
        for _ in 0..3 {
            match self.spawn().and_then(|()| self.wait_healthy()) {
                Ok(()) => return,
                Err(why) => {
                    last = why;
                    self.kill();
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!("etcd did not start again: {last}");
    }

    /// SIGSTOP: the member hangs (its port still accepts connections, which
    /// then get no answer), as a member on a frozen or overloaded host.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, s: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, s).unwrap_or_else(|e| panic!("signal etcd: {e}"));
        }
    }

    /// True while the process runs (stopped by [`stop`](Self::stop) or not started: false).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// True while the etcd process runs and answers `/health`.
    pub fn healthy(&self) -> bool {
        self.child.is_some() && health(self.metrics_port)
    }

    /// etcd's log so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// Starts the process (not waiting for it to be healthy).
    fn spawn(&mut self) -> Result<(), String> {
        let client = self.endpoint();
        let metrics = format!("http://127.0.0.1:{}", self.metrics_port);
        let peer = self.peer_url();
        let initial_cluster = if self.initial_cluster.is_empty() {
            format!("{}={peer}", self.name)
        } else {
            self.initial_cluster.clone()
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("open {}: {e}", self.log_path().display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(ETCD_BIN);
        cmd.arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg("--initial-cluster-state=new")
            .arg(format!("--listen-metrics-urls={metrics}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg("--log-level=warn")
            .env_remove("ETCDCTL_API")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cert-file={}", t.server_cert.display()))
                .arg(format!("--key-file={}", t.server_key.display()));
            if self.client_cert_auth {
                cmd.arg(format!("--trusted-ca-file={}", t.ca.display()))
                    .arg("--client-cert-auth");
            }
        }
        let child = cmd.spawn().map_err(|e| format!("spawn {ETCD_BIN}: {e}"))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the started process answers `/health` (which needs a
    /// leader, so in a cluster a quorum of members).
    fn wait_healthy(&mut self) -> Result<(), String> {
        let end = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("etcd exited with {status}; log:\n{}", self.log()));
            }
            if health(self.metrics_port) {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(format!(
                    "etcd not healthy after {START_TIMEOUT:?}; log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cluster of real etcd members on loopback, plain HTTP, each with its own
/// ports and data dir; all gone when dropped.
pub struct EtcdCluster {
    pub members: Vec<EtcdServer>,
}

impl EtcdCluster {
    /// Starts `size` members together and waits until each is healthy.
    pub fn start(size: usize) -> EtcdCluster {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let mut members: Vec<EtcdServer> = (0..size)
                .map(|i| {
                    let mut m = EtcdServer::unstarted(EtcdSecurity::Plain);
                    m.name = format!("ferry-test-{i}");
                    let (c, p, x) = free_ports();
                    m.set_ports(c, p, x);
                    m
                })
                .collect();
            let initial = members
                .iter()
                .map(|m| format!("{}={}", m.name, m.peer_url()))
                .collect::<Vec<_>>()
                .join(",");
            let started = members.iter_mut().try_for_each(|m| {
                m.initial_cluster = initial.clone();
                m.spawn()
            });
            match started.and_then(|()| members.iter_mut().try_for_each(EtcdServer::wait_healthy)) {
                Ok(()) => return EtcdCluster { members },
                // Dropping the members kills them and removes their dirs.
                Err(why) => last = why,
            }
        }
        panic!("etcd cluster of {size} did not start after {START_ATTEMPTS} attempts: {last}");
    }

    /// Every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }
}

/// Three distinct free loopback ports (free when this returns; see the module
/// doc for the race).
fn free_ports() -> (u16, u16, u16) {
    let bind = || {
        TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .unwrap_or_else(|e| panic!("bind 127.0.0.1:0: {e}"))
    };
    let (a, b, c) = (bind(), bind(), bind());
    let port = |l: &TcpListener| l.local_addr().map(|s| s.port()).unwrap_or_default();
    (port(&a), port(&b), port(&c))
}

/// `GET /health` answered with `"health":"true"`.
fn health(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}
