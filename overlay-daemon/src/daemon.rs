//! Ties store, dataplane, CNI config and HTTP together: the daemon's loop.
//!
//! One current-thread runtime. The loop owns the set of peers (other nodes'
//! leases as last seen in etcd) and makes the kernel equal to it whenever a
//! lease changes, the kernel reports a change to ferry's entries, or the
//! periodic pass comes due. Losing etcd changes nothing in the kernel: the
//! peers stay as they were until etcd answers again.

use crate::cniconf::{self, CniConfOptions, NodeNetwork};
use crate::dataplane::{self, Dataplane, KernelEvents, LocalNode, Peer};
use crate::http::HttpLimits;
use crate::lease::{Mac, SubnetLease};
use crate::metrics::Metrics;
use crate::network::{BackendType, NetworkConfig};
use crate::store::{
    Credentials, HeldLease, LeaseEvent, LeaseState, Password, Store, StoreOptions, TlsFiles,
};
use clap::{Parser, Subcommand};
use ferry_netops::NsHandle;
use ipnetwork::Ipv4Network;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{error, info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "ferryd",
    version,
    about = "ferry's node daemon: subnet lease in etcd, overlay routes to every other node, the node's CNI config."
)]
pub struct Cli {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct EtcdArgs {
    /// Log format on stderr (level with FERRY_LOG, e.g. debug).
    #[arg(
        long,
        env = "FERRY_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// etcd client URLs, comma-separated.
    #[arg(
        long,
        env = "FERRY_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379",
        global = true
    )]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of ferry's data in etcd.
    #[arg(
        long,
        env = "FERRY_ETCD_PREFIX",
        default_value = "/ferry",
        global = true
    )]
    pub etcd_prefix: String,
    /// CA bundle to verify etcd's certificate (enables TLS; alone, without
    /// a client certificate, it is server-only TLS).
    #[arg(long, env = "FERRY_ETCD_CAFILE", global = true)]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate for etcd (mutual TLS; needs --etcd-keyfile and --etcd-cafile).
    #[arg(long, env = "FERRY_ETCD_CERTFILE", global = true)]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key for etcd.
    #[arg(long, env = "FERRY_ETCD_KEYFILE", global = true)]
    pub etcd_keyfile: Option<PathBuf>,
    /// etcd user for etcd's username/password authentication (with or
    /// without TLS). The password comes from --etcd-password-file or from
    /// the environment variable FERRY_ETCD_PASSWORD, never from the command
    /// line (every user of the node can read a process's arguments).
    #[arg(long, env = "FERRY_ETCD_USERNAME", global = true)]
    pub etcd_username: Option<String>,
    /// File holding the etcd user's password (one trailing newline ignored).
    #[arg(long, env = "FERRY_ETCD_PASSWORD_FILE", global = true)]
    pub etcd_password_file: Option<PathBuf>,
}

/// The environment variable an etcd password may come from.
pub const PASSWORD_ENV: &str = "FERRY_ETCD_PASSWORD";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stores the cluster network config (JSON) in etcd, after validating it.
    SetNetwork {
        /// e.g. {"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan"}}
        json: String,
    },
    /// Prints the cluster network config and every node's lease.
    Show,
    /// Checks this node's pod network (read-only) and explains what is
    /// wrong: takes the daemon's flags before the subcommand. Exit 0 all
    /// OK, 1 a FAIL, 2 doctor could not run.
    Doctor {
        /// `{"checks":[{"name","status","detail","hint"}]}` on stdout.
        #[arg(long)]
        json: bool,
        /// Also send a few packets to each peer's pod gateway from a
        /// short-lived namespace and say where the path breaks.
        #[arg(long)]
        probe: bool,
    },
    /// Deletes a decommissioned node's lease: every other node removes its
    /// routes, neighbours and fdb entries at once.
    RemoveNode {
        /// The node's name as in its lease.
        node: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// This node's name in its lease (default: the hostname).
    #[arg(long, env = "FERRY_NODE_NAME")]
    pub node_name: Option<String>,
    /// Underlay interface (default: the one holding --public-ip, else the
    /// IPv4 default route's, else the IPv6 default route's).
    #[arg(long, env = "FERRY_IFACE")]
    pub iface: Option<String>,
    /// Underlay address other nodes reach this one at, IPv4 or IPv6 (default:
    /// the underlay interface's first global address, IPv4 first).
    #[arg(long, env = "FERRY_PUBLIC_IP")]
    pub public_ip: Option<IpAddr>,
    #[arg(long, env = "FERRY_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    #[arg(long, env = "FERRY_CNI_CONF_NAME", default_value = "10-ferry.conflist")]
    pub cni_conf_name: String,
    /// The CNI network name in the conflist.
    #[arg(long, env = "FERRY_NETWORK_NAME", default_value = "ferry")]
    pub network_name: String,
    #[arg(long, env = "FERRY_BRIDGE", default_value = "cni0")]
    pub bridge: String,
    /// ferry-ipam's dataDir in the conflist (default: ferry-ipam's own).
    #[arg(long, env = "FERRY_IPAM_DATA_DIR")]
    pub ipam_data_dir: Option<PathBuf>,
    /// Where subnet.env goes (and where a restart reads its previous subnet).
    #[arg(
        long,
        env = "FERRY_SUBNET_FILE",
        default_value = "/run/ferry/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// Where ferryd publishes whether the node is ready (lease held and
    /// renewed, peers programmed) for ferry-bridge's STATUS; the conflist
    /// names it (`readinessFile`). Default: `ready` beside --subnet-file
    /// (/run/ferry/ready).
    #[arg(long, env = "FERRY_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// The CNI call log every plugin appends to (written into the conflist;
    /// an empty value turns it off). ferryd counts it on /metrics and
    /// `ferryd doctor` shows its last failures.
    #[arg(long, env = "FERRY_CNI_LOG", default_value = "/run/ferry/cni.log")]
    pub cni_log: PathBuf,
    /// Masquerade pod traffic that leaves the cluster network.
    #[arg(long, env = "FERRY_IP_MASQ", default_value_t = true, action = clap::ArgAction::Set)]
    pub ip_masq: bool,
    /// Address of /healthz, /readyz and /metrics (no authentication: expose
    /// it to the kubelet and the metrics scraper only, e.g. 127.0.0.1:9946
    /// with hostNetwork probes, or a firewalled node address).
    #[arg(long, env = "FERRY_LISTEN", default_value = "0.0.0.0:9946")]
    pub listen: SocketAddr,
    /// Seconds an HTTP client has to send a request's head (on a kept-alive
    /// connection, counted from the previous answer).
    #[arg(long, env = "FERRY_HTTP_HEADER_TIMEOUT", default_value_t = 5)]
    pub http_header_timeout: u64,
    /// Seconds an HTTP connection may pass without a byte either way.
    #[arg(long, env = "FERRY_HTTP_IDLE_TIMEOUT", default_value_t = 10)]
    pub http_idle_timeout: u64,
    /// Open HTTP connections at most (a new one beyond closes the oldest);
    /// lowered to an eighth of the file limit if need be.
    #[arg(long, env = "FERRY_HTTP_MAX_CONNECTIONS", default_value_t = 64)]
    pub http_max_connections: usize,
    /// TTL of the subnet lease in etcd, in seconds; renewed every third of it.
    #[arg(long, env = "FERRY_LEASE_TTL", default_value_t = 300)]
    pub lease_ttl: u64,
    /// Seconds between full reconcile passes (netlink events trigger one sooner).
    #[arg(long, env = "FERRY_RESYNC", default_value_t = 10)]
    pub resync_interval: u64,
    /// Give the subnet back on SIGTERM. Off by default: a restart keeps it.
    #[arg(long, env = "FERRY_RELEASE_ON_EXIT")]
    pub release_on_exit: bool,
    /// Seconds between gc sweeps, which release what runtimes left behind
    /// without a DEL (see the README); 0 turns the sweep off.
    #[arg(long, env = "FERRY_GC_INTERVAL", default_value_t = 60)]
    pub gc_interval: u64,
    /// Seconds a leftover must be old (a reservation since ADD, an orphan
    /// since the sweep first saw it) before the sweep releases it.
    #[arg(long, env = "FERRY_GC_GRACE", default_value_t = 60)]
    pub gc_grace: u64,
    /// Log what the sweep would release, change nothing.
    #[arg(long, env = "FERRY_GC_DRY_RUN")]
    pub gc_dry_run: bool,
    /// Where the sweep finds the DEL chain's plugins (a runtime's CNI_PATH).
    #[arg(long, env = "FERRY_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Dataplane(#[from] dataplane::DataplaneError),
    #[error(transparent)]
    Netops(#[from] ferry_netops::NetopsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("invalid network config: {0}")]
    Config(#[from] crate::network::NetworkConfigError),
    #[error("{0}")]
    Usage(String),
}

/// The process entry point; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cli.etcd.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return 1;
        }
    };
    if let Some(Command::Doctor { json, probe }) = &cli.command {
        return rt.block_on(crate::doctor::main(&cli.etcd, &cli.run, *json, *probe));
    }
    let result = rt.block_on(async {
        match &cli.command {
            Some(Command::SetNetwork { json }) => set_network(&cli.etcd, json).await,
            Some(Command::Show) => show(&cli.etcd).await,
            Some(Command::RemoveNode { node }) => remove_node(&cli.etcd, node).await,
            Some(Command::Doctor { .. }) => unreachable!("handled above"),
            None => run(&cli.etcd, &cli.run).await,
        }
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            error!("{e}");
            1
        }
    }
}

pub fn store_options(a: &EtcdArgs) -> Result<StoreOptions, DaemonError> {
    let tls = match (&a.etcd_cafile, &a.etcd_certfile, &a.etcd_keyfile) {
        (None, None, None) => None,
        (Some(ca), cert, key) if cert.is_some() == key.is_some() => Some(TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, _, _) => {
            return Err(DaemonError::Usage(
                "--etcd-certfile and --etcd-keyfile need --etcd-cafile (the CA that signed etcd's certificate)".into(),
            ));
        }
        _ => {
            return Err(DaemonError::Usage(
                "--etcd-certfile and --etcd-keyfile go together".into(),
            ));
        }
    };
    let password = match (&a.etcd_password_file, std::env::var(PASSWORD_ENV)) {
        (Some(path), _) => Some(read_password(path)?),
        (None, Ok(p)) => Some(Password::new(p)),
        (None, Err(_)) => None,
    };
    let auth = match (&a.etcd_username, password) {
        (Some(user), Some(password)) => Some(Credentials {
            user: user.clone(),
            password,
        }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(DaemonError::Usage(format!(
                "--etcd-username needs a password: --etcd-password-file or {PASSWORD_ENV}"
            )));
        }
        (None, Some(_)) => {
            return Err(DaemonError::Usage(format!(
                "an etcd password (--etcd-password-file or {PASSWORD_ENV}) needs --etcd-username"
            )));
        }
    };
    Ok(StoreOptions {
        endpoints: a.etcd_endpoints.clone(),
        prefix: a.etcd_prefix.clone(),
        tls,
        auth,
        timeout: Duration::from_secs(5),
    })
}

/// The password in `path`, without its trailing newline. The error names the
/// file, never its content.
fn read_password(path: &std::path::Path) -> Result<Password, DaemonError> {
    let text = std::fs::read_to_string(path).map_err(|source| DaemonError::Io {
        what: format!("read the etcd password file {}", path.display()),
        source,
    })?;
    let secret = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if secret.is_empty() {
        return Err(DaemonError::Usage(format!(
            "the etcd password file {} is empty",
            path.display()
        )));
    }
    Ok(Password::new(secret))
}

async fn set_network(a: &EtcdArgs, json: &str) -> Result<(), DaemonError> {
    let cfg = NetworkConfig::from_json(json)?;
    let store = Store::connect(&store_options(a)?).await?;
    store.put_network_config(&cfg).await?;
    println!("{}", cfg.to_json());
    Ok(())
}

async fn show(a: &EtcdArgs) -> Result<(), DaemonError> {
    let store = Store::connect(&store_options(a)?).await?;
    let cfg = store.network_config().await?;
    println!("network {}", cfg.to_json());
    let (leases, revision) = store.list_leases().await?;
    println!("leases at revision {revision}: {}", leases.len());
    for l in leases {
        println!(
            "{}",
            serde_json::json!({"subnet": l.subnet().to_string(), "lease": serde_json::from_str::<serde_json::Value>(&l.to_json()).unwrap_or_default()})
        );
    }
    Ok(())
}

async fn remove_node(a: &EtcdArgs, node: &str) -> Result<(), DaemonError> {
    let store = Store::connect(&store_options(a)?).await?;
    let freed = store.remove_node(node).await?;
    if freed.is_empty() {
        return Err(DaemonError::Usage(format!("node {node:?} holds no lease")));
    }
    for subnet in freed {
        println!("removed lease {subnet} of node {node}");
    }
    Ok(())
}

/// The CNI call log's path, `None` when turned off (an empty value).
pub fn cni_log_path(r: &RunArgs) -> Option<PathBuf> {
    (!r.cni_log.as_os_str().is_empty()).then(|| r.cni_log.clone())
}

/// Retries `op` until it succeeds, with capped exponential backoff, counting
/// each failure. Used for the steps the daemon cannot go on without.
async fn retry<T, F, Fut>(what: &str, metrics: &Metrics, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DaemonError>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) => {
                metrics.etcd_error();
                warn!("{what}: {e}; retrying in {delay:?}");
                sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Why the loop wants a reconcile pass: only passes not caused by a lease
/// change count their changes as drift repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dirty {
    Leases,
    Kernel,
}

struct Node {
    cfg: NetworkConfig,
    held: HeldLease,
    dataplane: Dataplane,
}

async fn run(a: &EtcdArgs, r: &RunArgs) -> Result<(), DaemonError> {
    let metrics = Metrics::new();
    // Many peers need many netlink and etcd descriptors, and the HTTP cap is
    // sized from the limit: take what the hard limit allows.
    let nofile = crate::http::raise_nofile_limit().map_err(|source| DaemonError::Io {
        what: "read RLIMIT_NOFILE".into(),
        source,
    })?;
    let limits = HttpLimits {
        header_timeout: Duration::from_secs(r.http_header_timeout.max(1)),
        idle_timeout: Duration::from_secs(r.http_idle_timeout.max(1)),
        max_connections: r.http_max_connections.max(1),
    }
    .fit_to_nofile(nofile);
    let (server, bound) = crate::http::bind(r.listen, metrics.clone(), limits)
        .await
        .map_err(|source| DaemonError::Io {
            what: format!("listen on {}", r.listen),
            source,
        })?;
    tokio::spawn(server);
    info!(%bound, nofile, max_connections = limits.max_connections, "serving /healthz /readyz /metrics");

    let opts = store_options(a)?;
    let node_name = r.node_name.clone().unwrap_or_else(hostname);
    let ttl = Duration::from_secs(r.lease_ttl.max(3));
    let mut ready_file = ReadyFile::new(r, ttl)?;
    let conf = CniConfOptions {
        conf_dir: r.cni_conf_dir.clone(),
        file_name: r.cni_conf_name.clone(),
        network_name: r.network_name.clone(),
        bridge: r.bridge.clone(),
        ipam_data_dir: r.ipam_data_dir.clone(),
        readiness_file: Some(ready_file.path.clone()),
        cni_log: cni_log_path(r),
    };
    // A file left by an earlier ferryd must not speak for this one.
    ready_file
        .publish(
            false,
            None,
            "ferryd is starting: no subnet lease yet".into(),
        )
        .await;

    if r.gc_interval > 0 {
        tokio::spawn(crate::gc::run(
            crate::gc::GcOptions {
                conflist: conf.path(),
                cni_bin_dir: r.cni_bin_dir.clone(),
                grace: Duration::from_secs(r.gc_grace),
                dry_run: r.gc_dry_run,
            },
            Duration::from_secs(r.gc_interval),
            metrics.clone(),
        ));
    }
    let mut cni_log = conf.cni_log.as_ref().map(|p| {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        crate::metrics::CniLogTail::new(p)
    });

    let store = retry("connect to etcd", &metrics, || async {
        Ok(Store::connect(&opts).await?)
    })
    .await;
    let cfg = retry("read the network config", &metrics, || async {
        Ok(store.network_config().await?)
    })
    .await;
    let handle = NsHandle::host()?;
    let underlay = dataplane::find_underlay(&handle, r.iface.as_deref(), r.public_ip).await?;
    dataplane::check_underlay(&cfg.backend, &underlay)?;
    dataplane::check_network(&handle, &cfg, &r.bridge).await?;
    let vtep_mac = Mac::derived(&node_name);
    let me = SubnetLease {
        subnet: None,
        node: node_name.clone(),
        public_ip: underlay.ip,
        backend: cfg.backend.kind,
        vtep_mac: (cfg.backend.kind == BackendType::Vxlan).then_some(vtep_mac),
        renewed_at: now_unix(),
        ipv6_subnet: None,
    };
    info!(node = %node_name, underlay = %underlay.name, ip = %underlay.ip, "starting");

    let preferred = cniconf::read_subnet_env(&r.subnet_file);
    let held = retry("acquire a subnet lease", &metrics, || async {
        Ok(store.acquire(&cfg, &me, preferred, ttl).await?)
    })
    .await;
    metrics.lease_acquired();
    metrics.set_lease_held(true);
    metrics.lease_renewed(held.lease.subnet(), ttl);
    info!(subnet = %held.lease.subnet(), ipv6_subnet = ?held.lease.ipv6_subnet, "lease held");

    let mut node = Node {
        dataplane: Dataplane::new(
            handle.clone(),
            &cfg.backend,
            LocalNode {
                subnet: held.lease.subnet(),
                subnet6: held.lease.ipv6_subnet,
                underlay: underlay.clone(),
                vtep_mac,
            },
        )
        .with_network(&cfg),
        cfg,
        held,
    };
    // A failed write is retried by every pass (the first runs at once); the
    // overlay does not wait for the files.
    if let Err(e) = write_node_files(&node, r, &conf).await {
        warn!("{e}; retrying");
    }

    let (leases, revision) = retry("list leases", &metrics, || async {
        Ok(store.list_leases().await?)
    })
    .await;
    let mut peers: BTreeMap<Ipv4Network, Peer> = BTreeMap::new();
    replace_peers(&mut peers, &leases, &node);

    // `None` after the monitor's socket broke: the periodic pass opens it again.
    let mut kernel = Some(KernelEvents::open()?);
    let mut watch = store.watch_leases(revision);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| DaemonError::Io {
            what: "install SIGTERM handler".into(),
            source,
        })?;
    let mut renew_at = Instant::now() + ttl / 3;
    let mut resync_at = Instant::now();
    // The first pass runs at once; later ones are debounced so a burst of
    // lease or kernel events becomes one pass.
    let mut pass_at: Option<PendingPass> = None;
    schedule(&mut pass_at, Dirty::Leases, Duration::ZERO);
    const DEBOUNCE: Duration = Duration::from_millis(20);
    // Why the node is not ready beyond what the metrics say (a lost lease).
    let mut lease_lost: Option<String> = None;

    loop {
        let due = pass_at.map(|p| p.due).unwrap_or(resync_at);
        tokio::select! {
            ev = watch.next() => match ev {
                Ok(ev) => {
                    apply_event(&mut peers, ev, &node);
                    metrics.set_known_peers(peers.len());
                    schedule(&mut pass_at, Dirty::Leases, DEBOUNCE);
                }
                Err(e) => {
                    metrics.etcd_error();
                    warn!("lease watch: {e}");
                }
            },
            ev = next_kernel_event(&mut kernel), if kernel.is_some() => {
                if ev.is_none() {
                    // Drift would now be repaired only by the periodic pass.
                    warn!("the kernel event monitor stopped; reopening it at the next pass");
                    kernel = None;
                }
                schedule(&mut pass_at, Dirty::Kernel, DEBOUNCE);
            }
            _ = sleep_until(renew_at) => {
                renew_at = Instant::now() + ttl / 3;
                match store.renew(&node.held).await {
                    Ok(LeaseState::Alive) => metrics.lease_renewed(node.held.lease.subnet(), ttl),
                    Ok(LeaseState::Lost) => {
                        warn!(subnet = %node.held.lease.subnet(), "lease lost; acquiring again");
                        metrics.set_lease_held(false);
                        metrics.set_ready(false);
                        let why = format!("the lease of {} was lost; acquiring one again", node.held.lease.subnet());
                        ready_file.publish(false, Some(node.held.lease.subnet()), why.clone()).await;
                        lease_lost = Some(why);
                        let me = SubnetLease { renewed_at: now_unix(), ..node.held.lease.clone() };
                        match store.acquire(&node.cfg, &me, Some(node.held.lease.subnet()), ttl).await {
                            Ok(held) => {
                                lease_lost = None;
                                metrics.lease_acquired();
                                metrics.set_lease_held(true);
                                metrics.lease_renewed(held.lease.subnet(), ttl);
                                if held.lease.subnet() != node.held.lease.subnet()
                                    || held.lease.ipv6_subnet != node.held.lease.ipv6_subnet
                                {
                                    warn!(old = %node.held.lease.subnet(), new = %held.lease.subnet(), "subnet changed");
                                    node.dataplane = Dataplane::new(handle.clone(), &node.cfg.backend, LocalNode {
                                        subnet: held.lease.subnet(),
                                        subnet6: held.lease.ipv6_subnet,
                                        underlay: underlay.clone(),
                                        vtep_mac,
                                    }).with_network(&node.cfg);
                                }
                                node.held = held;
                                // Never fatal: the pass scheduled here, and
                                // every pass after it, writes the files again.
                                if let Err(e) = write_node_files(&node, r, &conf).await {
                                    warn!("{e}; retrying");
                                }
                                schedule(&mut pass_at, Dirty::Leases, Duration::ZERO);
                            }
                            Err(e) => {
                                metrics.etcd_error();
                                metrics.lease_renewal_failed(&e);
                                renew_at = Instant::now() + Duration::from_secs(1);
                                warn!("acquire after loss: {e}");
                            }
                        }
                    }
                    Err(e) => {
                        metrics.etcd_error();
                        metrics.lease_renewal_failed(&e);
                        // Sooner than a third of the TTL: the lease must not
                        // lapse just because one renewal failed.
                        renew_at = Instant::now() + Duration::from_secs(1).min(ttl / 3);
                        warn!("renew lease: {e}");
                    }
                }
            },
            _ = sleep_until(due) => {
                let why = pass_at.take().map(|p| p.why).unwrap_or(Dirty::Kernel);
                resync_at = Instant::now() + Duration::from_secs(r.resync_interval.max(1));
                if kernel.is_none() {
                    match KernelEvents::open() {
                        Ok(k) => kernel = Some(k),
                        Err(e) => warn!("reopen the kernel event monitor: {e}"),
                    }
                }
                if let Some(tail) = cni_log.as_mut() {
                    tail.poll(&metrics);
                }
                // The files are part of the desired state too: a conflist
                // deleted or edited by hand comes back.
                match write_node_files(&node, r, &conf).await {
                    Ok(true) => metrics.repaired(1),
                    Ok(false) => {}
                    Err(e) => warn!("{e}"),
                }
                let list: Vec<Peer> = peers.values().cloned().collect();
                match node.dataplane.reconcile(&list).await {
                    Ok(report) => {
                        let changed = report.added + report.removed;
                        metrics.reconciled(changed, why == Dirty::Kernel);
                        metrics.set_peers(peers.len(), report.peers_programmed);
                        metrics.set_skipped(
                            report.conflicts,
                            report.invalid,
                            node.dataplane.skipped().iter().map(|s| s.to_string()).collect(),
                        );
                        metrics.set_ready(report.all_programmed(peers.len()));
                        if changed > 0 {
                            info!(added = report.added, removed = report.removed, peers = peers.len(), reason = ?why, "reconciled");
                        }
                    }
                    Err(e) => {
                        metrics.set_ready(false);
                        warn!("reconcile: {e}; retrying");
                        schedule(&mut pass_at, Dirty::Kernel, Duration::from_millis(500));
                    }
                }
            },
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        let (ready, why) = node_readiness(&metrics, lease_lost.as_deref());
        ready_file
            .publish(ready, Some(node.held.lease.subnet()), why)
            .await;
    }

    info!("stopping; the data path stays as it is");
    ready_file
        .publish(
            false,
            Some(node.held.lease.subnet()),
            "ferryd stopped".into(),
        )
        .await;
    if r.release_on_exit {
        match store.release(&node.held).await {
            Ok(()) => info!(subnet = %node.held.lease.subnet(), "lease released"),
            Err(e) => warn!("release lease: {e}"),
        }
    }
    Ok(())
}

/// Whether the node can take pods, and why not: the lease held and renewed
/// within its TTL (as /readyz says) and every peer that can be programmed
/// programmed.
fn node_readiness(metrics: &Metrics, lease_lost: Option<&str>) -> (bool, String) {
    if let Some(why) = lease_lost {
        return (false, why.to_string());
    }
    if let Some(why) = metrics.lease_overdue() {
        return (false, why);
    }
    if metrics.is_ready() {
        return (true, String::new());
    }
    (
        false,
        "the overlay is not programmed yet (first pass pending, or a pass failed: see /readyz and the log)".into(),
    )
}

/// ferryd's readiness file: what ferry-bridge's STATUS reads. Every
/// statement in it holds for [`ReadyFile::validity`] only and is renewed
/// when a third of that has passed (the loop wakes at least every resync
/// interval), so a ferryd killed without cleaning up stops being "ready" by
/// itself, at most that long after.
struct ReadyFile {
    path: PathBuf,
    boot_id: String,
    validity: Duration,
    /// What the file says now (`None`: unknown, e.g. the last write failed).
    published: Option<cniconf::Readiness>,
    /// The last write error, logged once until a write succeeds.
    failing: Option<String>,
}

impl ReadyFile {
    fn new(r: &RunArgs, ttl: Duration) -> Result<ReadyFile, DaemonError> {
        let path = r.ready_file.clone().unwrap_or_else(|| {
            r.subnet_file
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("ready")
        });
        // The conflist names it for plugins run from any directory.
        let path = std::path::absolute(&path).map_err(|source| DaemonError::Io {
            what: format!("resolve --ready-file {}", path.display()),
            source,
        })?;
        // Never longer than the lease: a daemon that stopped renewing it
        // cannot vouch for it.
        let validity = (Duration::from_secs(r.resync_interval.max(1)) * 3)
            .max(Duration::from_secs(15))
            .min(ttl);
        Ok(ReadyFile {
            path,
            boot_id: cniconf::boot_id(),
            validity,
            published: None,
            failing: None,
        })
    }

    /// Writes the node's readiness when it changed or the file is a third
    /// of the way to its expiry; a failed write is logged (once) and retried
    /// at the next call.
    async fn publish(&mut self, ready: bool, subnet: Option<Ipv4Network>, reason: String) {
        let now = cniconf::boottime_ms();
        let validity = self.validity.as_millis() as u64;
        let fresh = self.published.as_ref().is_some_and(|p| {
            p.ready == ready
                && p.subnet == subnet
                && p.reason == reason
                && p.valid_until_boottime_ms > now + validity * 2 / 3
        });
        if fresh {
            return;
        }
        let want = cniconf::Readiness {
            ready,
            subnet,
            reason,
            boot_id: self.boot_id.clone(),
            valid_until_boottime_ms: now + validity,
        };
        let text = cniconf::readiness_json(&want, now_unix());
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || cniconf::write_atomic(&path, &text))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match written {
            Ok(_) => {
                if self.published.as_ref().map(|p| p.ready) != Some(want.ready) {
                    info!(ready = want.ready, reason = %want.reason, file = %self.path.display(), "readiness published");
                }
                if let Some(e) = self.failing.take() {
                    info!(file = %self.path.display(), "readiness file written again (was: {e})");
                }
                self.published = Some(want);
            }
            Err(e) => {
                self.published = None;
                let e = e.to_string();
                if self.failing.as_ref() != Some(&e) {
                    warn!(file = %self.path.display(), "write the readiness file: {e}; retrying");
                    self.failing = Some(e);
                }
            }
        }
    }
}

/// A reconcile pass waiting to run.
#[derive(Debug, Clone, Copy)]
struct PendingPass {
    /// When the first change it covers happened.
    first: Instant,
    due: Instant,
    why: Dirty,
}

/// The longest a burst of changes may hold a pass back: 5000 leases arrive
/// in many etcd transactions, and one pass after the burst beats a pass
/// (with its dumps) after every transaction.
const MAX_BATCH_WAIT: Duration = Duration::from_millis(100);

/// Asks for a pass `after` from now. While changes keep coming, the pass
/// slides later (each `after` restarts the quiet period) but never beyond
/// [`MAX_BATCH_WAIT`] after the first change; `Duration::ZERO` runs it now.
fn schedule(pass_at: &mut Option<PendingPass>, why: Dirty, after: Duration) {
    let now = Instant::now();
    *pass_at = Some(match *pass_at {
        Some(p) => PendingPass {
            first: p.first,
            due: if after.is_zero() {
                now
            } else {
                p.due.max(now + after).min(p.first + MAX_BATCH_WAIT)
            },
            // A pending pass caused by leases stays a lease pass: its changes are expected.
            why: if p.why == Dirty::Leases { p.why } else { why },
        },
        None => PendingPass {
            first: now,
            due: now + after,
            why,
        },
    });
}

/// Every other node's lease is a peer; whether it is valid (its subnet one
/// of the network's, its addresses usable) the dataplane decides, and
/// counts the invalid ones.
fn is_peer(l: &SubnetLease, node: &Node) -> bool {
    l.subnet() != node.held.lease.subnet()
}

/// The peer a lease describes. Its IPv6 subnet counts only when it is the one
/// the config maps its IPv4 subnet to (uniqueness comes from that mapping);
/// a lease without one (a node from before dual stack) gets IPv4 routes only.
fn peer_of(l: &SubnetLease, node: &Node) -> Peer {
    let mut p = Peer::from(l);
    let want = node.cfg.ipv6_subnet_for(l.subnet());
    // One outside the IPv6 network makes the lease invalid (the dataplane
    // skips it); one inside but not the mapped one is only ignored.
    let outside = node
        .cfg
        .ipv6()
        .zip(p.subnet6)
        .is_some_and(|(net6, s6)| !net6.contains(s6.network()) || s6.prefix() < net6.prefix());
    if p.subnet6.is_some() && p.subnet6 != want && !outside {
        warn!(subnet = %l.subnet(), ipv6_subnet = ?p.subnet6, expected = ?want, "ignoring a lease's IPv6 subnet that does not match the network config");
        p.subnet6 = None;
    }
    p
}

fn replace_peers(peers: &mut BTreeMap<Ipv4Network, Peer>, leases: &[SubnetLease], node: &Node) {
    peers.clear();
    for l in leases.iter().filter(|l| is_peer(l, node)) {
        peers.insert(l.subnet(), peer_of(l, node));
    }
}

fn apply_event(peers: &mut BTreeMap<Ipv4Network, Peer>, ev: LeaseEvent, node: &Node) {
    match ev {
        LeaseEvent::Put(l) if is_peer(&l, node) => {
            peers.insert(l.subnet(), peer_of(&l, node));
        }
        LeaseEvent::Put(_) => {}
        LeaseEvent::Delete(subnet) => {
            peers.remove(&subnet);
        }
        LeaseEvent::Resync { leases, .. } => replace_peers(peers, &leases, node),
    }
}

/// The next relevant kernel change (`None`: the monitor is gone).
async fn next_kernel_event(kernel: &mut Option<KernelEvents>) -> Option<()> {
    match kernel {
        Some(k) => k.next().await,
        None => std::future::pending().await,
    }
}

/// Writes the conflist and subnet.env when they differ from what they
/// should be (missing, edited, or a new lease); returns whether it wrote.
/// On a blocking thread: the conflist is fsynced, and a slow disk must not
/// stall the runtime (the HTTP server and etcd keep-alives share it).
async fn write_node_files(
    node: &Node,
    r: &RunArgs,
    conf: &CniConfOptions,
) -> Result<bool, DaemonError> {
    let n = NodeNetwork {
        network: node.cfg.network,
        subnet: node.held.lease.subnet(),
        ipv6: node.cfg.ipv6().zip(node.held.lease.ipv6_subnet),
        mtu: node.dataplane.pod_mtu(),
        ip_masq: r.ip_masq,
    };
    let path = conf.path();
    let conflist = cniconf::conflist(&n, conf);
    let env = cniconf::subnet_env(&n);
    let subnet_file = r.subnet_file.clone();
    let (subnet, mtu) = (n.subnet, n.mtu);
    let write = move || -> Result<bool, DaemonError> {
        let wrote_conf =
            cniconf::write_atomic(&path, &conflist).map_err(|source| DaemonError::Io {
                what: format!("write {}", path.display()),
                source,
            })?;
        let wrote_env =
            cniconf::write_atomic(&subnet_file, &env).map_err(|source| DaemonError::Io {
                what: format!("write {}", subnet_file.display()),
                source,
            })?;
        if wrote_conf || wrote_env {
            info!(conflist = %path.display(), subnet = %subnet, mtu, "node CNI config written");
        }
        Ok(wrote_conf || wrote_env)
    };
    tokio::task::spawn_blocking(write)
        .await
        .map_err(|e| DaemonError::Io {
            what: "write the node's CNI files".into(),
            source: std::io::Error::other(e),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(args: &[&str]) -> Result<StoreOptions, DaemonError> {
        let cli = Cli::try_parse_from(std::iter::once("ferryd").chain(args.iter().copied()))
            .expect("flags parse");
        store_options(&cli.etcd)
    }

    #[test]
    fn gc_flags_and_defaults() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("ferryd").chain(args.iter().copied()))
                .expect("flags parse")
                .run
        };
        if [
            "FERRY_GC_INTERVAL",
            "FERRY_GC_GRACE",
            "FERRY_GC_DRY_RUN",
            "FERRY_CNI_BIN_DIR",
        ]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
        {
            eprintln!("SKIPPED: a FERRY_GC_* variable is set in the environment");
            return;
        }
        let d = parse(&[]);
        assert_eq!((d.gc_interval, d.gc_grace, d.gc_dry_run), (60, 60, false));
        assert_eq!(d.cni_bin_dir, PathBuf::from("/opt/cni/bin"));
        let r = parse(&[
            "--gc-interval",
            "0",
            "--gc-grace",
            "5",
            "--gc-dry-run",
            "--cni-bin-dir",
            "/usr/lib/cni",
        ]);
        assert_eq!((r.gc_interval, r.gc_grace, r.gc_dry_run), (0, 5, true));
        assert_eq!(r.cni_bin_dir, PathBuf::from("/usr/lib/cni"));
    }

    #[test]
    fn etcd_security_flags() {
        if std::env::var_os(PASSWORD_ENV).is_some() {
            eprintln!("SKIPPED: {PASSWORD_ENV} is set in the environment");
            return;
        }
        let server_only = options(&["--etcd-cafile", "ca.pem"]).unwrap();
        let tls = server_only.tls.expect("TLS");
        assert_eq!((tls.cert, tls.key), (None, None));
        let mutual = options(&[
            "--etcd-cafile",
            "ca.pem",
            "--etcd-certfile",
            "c.pem",
            "--etcd-keyfile",
            "k.pem",
        ])
        .unwrap();
        assert!(mutual.tls.unwrap().cert.is_some());
        for bad in [
            &["--etcd-certfile", "c.pem", "--etcd-keyfile", "k.pem"][..],
            &["--etcd-cafile", "ca.pem", "--etcd-certfile", "c.pem"],
            &["--etcd-username", "root"],
            &["--etcd-password-file", "/nonexistent/ferry-password"],
        ] {
            assert!(options(bad).is_err(), "{bad:?} accepted");
        }

        let dir = std::env::temp_dir().join(format!("ferry-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "p4ss word\r\n").unwrap();
        let path = file.to_str().unwrap();
        let o = options(&["--etcd-username", "root", "--etcd-password-file", path]).unwrap();
        let auth = o.auth.expect("credentials");
        assert_eq!(auth.password, Password::new("p4ss word"));
        assert!(!format!("{auth:?}").contains("p4ss"), "{auth:?}");
        std::fs::write(&file, "\n").unwrap();
        assert!(options(&["--etcd-username", "root", "--etcd-password-file", path]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
