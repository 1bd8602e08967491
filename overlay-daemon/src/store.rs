//! etcd: the cluster network config, fenced subnet leases, keep-alive and the
//! watch of every node's lease.
//!
//! Keys (`<prefix>` defaults to `/ferry`):
//! - `<prefix>/network/config`: the [`NetworkConfig`] JSON, written once by
//!   an operator (or [`Store::put_network_config`]).
//! - `<prefix>/network/subnets/<a.b.c.d-len>`: one [`SubnetLease`] JSON per
//!   node, attached to an etcd lease with a TTL that its daemon keeps alive.
//!   When the daemon dies the etcd lease expires and etcd deletes the key,
//!   which every other daemon sees as a `Delete` in its watch.
//!
//! Fencing (flannel's weak spot: a restarted node may reuse a subnet that
//! etcd has meanwhile given to someone else): every write of a lease key is
//! a transaction guarded by a compare. A new subnet is taken only with
//! `create_revision == 0` (the key does not exist); an existing key is taken
//! over only when its value names this node and its `mod_revision` is still
//! the one just read; renewal checks that the key is still attached to our
//! etcd lease; release deletes only while it is.
//!
//! Every unary call is bounded by [`StoreOptions::timeout`], so nothing here
//! hangs on an unreachable etcd. Long-lived watch streams are not bounded
//! (they are idle by nature); HTTP/2 keep-alive pings detect a dead peer.
//!
//! Members: one client per endpoint, not one balanced client over all of
//! them. A balanced client kept sending about a third of the requests to a
//! dead member of a 3-member cluster (its balancer counts an endpoint whose
//! connection failed as ready), and every such failure restarted the
//! caller's whole attempt. Here a request goes to the member that answered
//! last; when that member fails (no connection, no answer within the
//! attempt's share of the timeout, no leader) the same request goes to the
//! next member at once, and that member answers the following requests. A
//! member is tried again only when the ones after it fail too. Requests are
//! retried on another member only when they may not have been carried out
//! or are safe to repeat: every write here is a compare-guarded transaction
//! or idempotent, and a lease granted twice expires unused.
//!
//! Security modes: plain HTTP, server-only TLS (a CA to verify etcd, no
//! client certificate), mutual TLS (a CA plus a client certificate and
//! key), each optionally with etcd's username/password authentication (a
//! token per member, refreshed when it expires; the password never appears
//! in `Debug` output or logs).

use crate::lease::{SubnetLease, parse_subnet_key_segment, subnet_key_segment};
use crate::network::{NetworkConfig, NetworkConfigError};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchResponse, WatchStream,
};
use ipnetwork::Ipv4Network;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The key prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "/ferry";

/// HTTP/2 keep-alive ping interval on the etcd connection. etcd's default
/// `--grpc-keepalive-min-time` is 5 s; pinging more often gets a GOAWAY.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Watch reconnect backoff: doubles from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The least share of [`StoreOptions::timeout`] one member gets for a
/// request before the next member is asked.
const MIN_ATTEMPT: Duration = Duration::from_secs(1);

/// PEM files for TLS with etcd (`--cacert`, `--cert`, `--key` of etcdctl):
/// the CA that signed etcd's certificate, and for mutual TLS a client
/// certificate with its key (both or neither).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A secret that never shows in `Debug` output (so never in a log line).
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(secret: impl Into<String>) -> Password {
        Password(secret.into())
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// etcd username/password authentication (`etcdctl --user`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: Password,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// `http://host:port` (or `https://` with [`Self::tls`]).
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/ferry` (a trailing `/` is ignored).
    pub prefix: String,
    pub tls: Option<TlsFiles>,
    /// etcd user authentication, with or without TLS.
    pub auth: Option<Credentials>,
    /// Bound of connecting and of every single etcd request (shared among
    /// the members tried, at least [`MIN_ATTEMPT`] each).
    pub timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            prefix: DEFAULT_PREFIX.to_string(),
            tls: None,
            auth: None,
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd options: {0}")]
    Options(String),
    #[error("read etcd TLS {what} file {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("etcd at {endpoints}: {op} {key}: {source}")]
    Etcd {
        op: &'static str,
        key: String,
        endpoints: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("etcd at {endpoints}: {op} {key}: no answer within {after:?}")]
    Timeout {
        op: &'static str,
        key: String,
        endpoints: String,
        after: Duration,
    },
    #[error(
        "etcd at {endpoints}: the cluster network config {key} is missing \
         (put a JSON like {{\"network\":\"10.244.0.0/16\",\"subnetLen\":24,\"backend\":{{\"type\":\"vxlan\"}}}} there)"
    )]
    MissingConfig { key: String, endpoints: String },
    #[error("the cluster network config {key} is invalid: {source}")]
    BadConfig {
        key: String,
        #[source]
        source: NetworkConfigError,
    },
    #[error("invalid lease for {key}: {msg}")]
    BadLease { key: String, msg: String },
    #[error(
        "network {network} has no free /{subnet_len} subnet left ({taken} keys under {prefix})"
    )]
    Exhausted {
        network: Ipv4Network,
        subnet_len: u8,
        taken: usize,
        prefix: String,
    },
    #[error(
        "acquiring a subnet of {network} under {prefix}: still losing races after {rounds} rounds"
    )]
    Contention {
        network: Ipv4Network,
        prefix: String,
        rounds: usize,
    },
    #[error("etcd at {endpoints}: watch of {prefix} from revision {revision}: {msg}")]
    Watch {
        prefix: String,
        revision: i64,
        endpoints: String,
        msg: String,
    },
}

/// A connection to etcd, cheap to clone (clones share the connections).
#[derive(Clone)]
pub struct Store {
    members: Arc<Members>,
    /// The client of the member that answered at connect (for tools and tests).
    first: Option<Client>,
    prefix: String,
    /// For error messages.
    endpoints: String,
    timeout: Duration,
}

/// The etcd members (one per endpoint) and which one answered last.
struct Members {
    list: Vec<Member>,
    options: ConnectOptions,
    /// Index into `list` of the member that answered last.
    current: AtomicUsize,
}

struct Member {
    url: String,
    /// Made at first use and dropped when the member fails, so a member that
    /// comes back is reached on a fresh connection (with a fresh token).
    client: Mutex<Option<Client>>,
}

impl Members {
    fn cached(&self, i: usize) -> Option<Client> {
        self.list[i]
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Member `i`'s client; connecting (and, with credentials,
    /// authenticating) when there is none.
    async fn client(&self, i: usize) -> Result<Client, etcd_client::Error> {
        if let Some(c) = self.cached(i) {
            return Ok(c);
        }
        let c = Client::connect([self.list[i].url.as_str()], Some(self.options.clone())).await?;
        *self.list[i]
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    fn forget(&self, i: usize) {
        *self.list[i]
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Whether `e` says the member failed (not the request): the request may go
/// to another member.
fn member_failed(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            // Unavailable: no connection, no leader ("hasleader" below), or
            // the member timed out; Unknown/Internal: a broken transport.
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Internal
        ),
        _ => false,
    }
}

/// A subnet lease this node holds: the key, its value and the etcd lease the
/// key is attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    /// Always has `subnet: Some`.
    pub lease: SubnetLease,
    pub lease_id: i64,
    pub key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    Alive,
    /// The etcd lease expired, or the key is gone or no longer ours: the
    /// subnet must be acquired again (and may come back different).
    Lost,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease was created or changed (subnet always `Some`).
    Put(SubnetLease),
    /// A lease was deleted (released, expired, or removed by an operator).
    Delete(Ipv4Network),
    /// The watch could not resume (its revision was compacted): here is the
    /// complete current set, read at `revision`; the watch goes on after it.
    Resync {
        leases: Vec<SubnetLease>,
        revision: i64,
    },
}

/// One key under the subnets prefix, as read.
struct Entry {
    key: String,
    /// `None`: the key does not name a subnet.
    subnet: Option<Ipv4Network>,
    /// `None`: the value is unreadable (warned about).
    lease: Option<SubnetLease>,
    mod_revision: i64,
}

impl Store {
    /// Connects and checks that etcd answers (a read of the config key),
    /// each member tried within its share of `opts.timeout`.
    pub async fn connect(opts: &StoreOptions) -> Result<Store, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Options("no etcd endpoints given".into()));
        }
        if opts.timeout.is_zero() {
            return Err(StoreError::Options("timeout must not be 0".into()));
        }
        let endpoints = opts.endpoints.join(",");
        let attempt = attempt_timeout(opts.timeout, opts.endpoints.len());
        let mut co = ConnectOptions::new()
            .with_connect_timeout(attempt)
            .with_keep_alive(KEEPALIVE_INTERVAL, opts.timeout)
            // A member cut off from the others refuses requests (and
            // watches) instead of serving stale data: the next member is tried.
            .with_require_leader(true);
        match &opts.tls {
            Some(tls) => {
                if let Some(e) = opts.endpoints.iter().find(|e| !e.starts_with("https://")) {
                    return Err(StoreError::Options(format!(
                        "TLS files are given but endpoint {e} is not https://"
                    )));
                }
                let read = |what: &'static str, path: &PathBuf| {
                    std::fs::read(path).map_err(|source| StoreError::TlsFile {
                        what,
                        path: path.clone(),
                        source,
                    })
                };
                let mut t =
                    TlsOptions::new().ca_certificate(Certificate::from_pem(read("CA", &tls.ca)?));
                match (&tls.cert, &tls.key) {
                    (Some(cert), Some(key)) => {
                        t = t.identity(Identity::from_pem(
                            read("certificate", cert)?,
                            read("key", key)?,
                        ));
                    }
                    (None, None) => {}
                    _ => {
                        return Err(StoreError::Options(
                            "a client certificate needs its key and a key its certificate".into(),
                        ));
                    }
                }
                co = co.with_tls(t);
            }
            None => {
                if let Some(e) = opts.endpoints.iter().find(|e| e.starts_with("https://")) {
                    return Err(StoreError::Options(format!(
                        "endpoint {e} is https:// but no CA file is given to verify it"
                    )));
                }
            }
        }
        if let Some(auth) = &opts.auth {
            if auth.user.is_empty() {
                return Err(StoreError::Options("the etcd user name is empty".into()));
            }
            if opts.tls.is_none() {
                tracing::warn!(
                    user = %auth.user,
                    "etcd authentication over plain http: the password crosses the network unencrypted"
                );
            }
            co = co
                .with_user(auth.user.clone(), auth.password.0.clone())
                // Tokens expire (etcd's --auth-token-ttl): get a new one then.
                .with_auto_token_refresh(true);
        }
        let prefix = opts.prefix.trim_end_matches('/').to_string();
        let list: Vec<Member> = opts
            .endpoints
            .iter()
            .map(|url| Member {
                url: url.clone(),
                client: Mutex::new(None),
            })
            .collect();
        // Nodes start at different members, so they spread their load.
        let start = start_index(list.len());
        let members = Arc::new(Members {
            list,
            options: co,
            current: AtomicUsize::new(start),
        });
        let mut store = Store {
            members,
            first: None,
            prefix,
            endpoints,
            timeout: opts.timeout,
        };
        // The client connects lazily: make sure someone answers.
        let key = store.config_key();
        let probe_key = key.clone();
        store
            .call("connect (read)", &key, move |c| {
                let key = probe_key.clone();
                async move {
                    c.kv_client()
                        .get(key, Some(GetOptions::new().with_count_only()))
                        .await
                }
            })
            .await?;
        let answered = store.members.current.load(Ordering::Relaxed);
        store.first = store.members.cached(answered);
        Ok(store)
    }

    /// The key prefix, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/network/config`.
    pub fn config_key(&self) -> String {
        format!("{}/network/config", self.prefix)
    }

    /// `<prefix>/network/subnets/` (with the trailing `/`).
    pub fn subnets_prefix(&self) -> String {
        format!("{}/network/subnets/", self.prefix)
    }

    /// `<prefix>/network/subnets/<a.b.c.d-len>`.
    pub fn lease_key(&self, subnet: Ipv4Network) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_key_segment(subnet))
    }

    /// A client of the member that answered last (else of the one that
    /// answered at connect), for tools and tests.
    pub fn client(&self) -> Client {
        let current = self.members.current.load(Ordering::Relaxed);
        self.members
            .cached(current)
            .or_else(|| self.first.clone())
            .expect("connect made a client of the member that answered")
    }

    pub async fn network_config(&self) -> Result<NetworkConfig, StoreError> {
        let key = self.config_key();
        let k = key.clone();
        let resp = self
            .call("get", &key, move |c| {
                let k = k.clone();
                async move { c.kv_client().get(k, None).await }
            })
            .await?;
        let Some(kv) = resp.kvs().first() else {
            return Err(StoreError::MissingConfig {
                key,
                endpoints: self.endpoints.clone(),
            });
        };
        NetworkConfig::from_json(&String::from_utf8_lossy(kv.value()))
            .map_err(|source| StoreError::BadConfig { key, source })
    }

    /// Validates and writes the cluster network config.
    pub async fn put_network_config(&self, cfg: &NetworkConfig) -> Result<(), StoreError> {
        let key = self.config_key();
        cfg.validate().map_err(|source| StoreError::BadConfig {
            key: key.clone(),
            source,
        })?;
        let (k, value) = (key.clone(), cfg.to_json());
        self.call("put", &key, move |c| {
            let (k, value) = (k.clone(), value.clone());
            async move { c.kv_client().put(k, value, None).await }
        })
        .await?;
        Ok(())
    }

    /// Fenced acquisition of this node's subnet, attached to a new etcd
    /// lease of `ttl` (rounded up to whole seconds, at least 1 s).
    ///
    /// `me` carries node, public_ip, backend and vtep_mac (its subnet is
    /// ignored). In order:
    /// 1. a key whose value names `me.node` and that is a subnet of `cfg` is
    ///    taken over (compare `mod_revision` unchanged → put with the new
    ///    etcd lease and `me`'s attributes); with several such keys the one
    ///    equal to `preferred` wins, else the lowest. A key of another node
    ///    is never taken.
    /// 2. else `preferred`, if it is a subnet of `cfg` and no key holds it:
    ///    compare-and-create (`create_revision == 0`).
    /// 3. else the first free candidate of `cfg`, compare-and-create.
    ///
    /// In a dual-stack network the lease also holds the IPv6 subnet of the
    /// IPv4 subnet's index ([`NetworkConfig::ipv6_subnet_for`]): the IPv4
    /// key's compare-and-create makes both unique.
    ///
    /// A lost race (compare failed) re-reads and starts over. When nothing
    /// is free: [`StoreError::Exhausted`]. On error the new etcd lease is
    /// revoked. (If this future is dropped half-way, that etcd lease lives
    /// until its TTL ends, with at most the one key that was written.)
    pub async fn acquire(
        &self,
        cfg: &NetworkConfig,
        me: &SubnetLease,
        preferred: Option<Ipv4Network>,
        ttl: Duration,
    ) -> Result<HeldLease, StoreError> {
        cfg.validate().map_err(|source| StoreError::BadConfig {
            key: self.config_key(),
            source,
        })?;
        if me.node.is_empty() {
            return Err(StoreError::BadLease {
                key: self.subnets_prefix(),
                msg: "node name is empty".into(),
            });
        }
        let ttl_secs = i64::try_from(ttl.as_millis().div_ceil(1000))
            .unwrap_or(i64::MAX)
            .max(1);
        let prefix = self.subnets_prefix();
        let grant = self
            .call("lease grant", &prefix, move |c| async move {
                c.lease_client().grant(ttl_secs, None).await
            })
            .await?;
        let lease_id = grant.id();
        match self.acquire_with(cfg, me, preferred, lease_id).await {
            Ok(held) => Ok(held),
            Err(e) => {
                let _ = self
                    .call("lease revoke", &prefix, move |c| async move {
                        c.lease_client().revoke(lease_id).await
                    })
                    .await;
                Err(e)
            }
        }
    }

    async fn acquire_with(
        &self,
        cfg: &NetworkConfig,
        me: &SubnetLease,
        preferred: Option<Ipv4Network>,
        lease_id: i64,
    ) -> Result<HeldLease, StoreError> {
        // Every lost race means another writer took or changed a key, so
        // the rounds are bounded by the subnets plus some churn.
        let rounds = usize::try_from(cfg.subnet_count())
            .unwrap_or(usize::MAX)
            .saturating_add(16);
        for _ in 0..rounds {
            let (entries, _) = self.read_subnets().await?;

            // 1. Our own key from before (a restart): take it over.
            let mut mine: Vec<&Entry> = entries
                .iter()
                .filter(|e| {
                    e.subnet.is_some_and(|s| cfg.holds(s))
                        && e.lease.as_ref().is_some_and(|l| l.node == me.node)
                })
                .collect();
            mine.sort_by_key(|e| (e.subnet != preferred, e.subnet));
            if let Some(e) = mine.first()
                && let Some(subnet) = e.subnet
            {
                let held = self.held(cfg, me, subnet, lease_id);
                let cmp = Compare::mod_revision(e.key.clone(), CompareOp::Equal, e.mod_revision);
                if self.put_if(&held, cmp, "take over").await? {
                    tracing::info!(subnet = %subnet, key = %held.key, "took over this node's lease");
                    return Ok(held);
                }
                continue;
            }

            // 2./3. A free subnet: the preferred one, else the first.
            let taken: HashSet<Ipv4Network> = entries.iter().filter_map(|e| e.subnet).collect();
            let free = |s: &Ipv4Network| cfg.holds(*s) && !taken.contains(s);
            let Some(subnet) = preferred
                .filter(free)
                .or_else(|| cfg.candidates().find(free))
            else {
                return Err(StoreError::Exhausted {
                    network: cfg.network,
                    subnet_len: cfg.subnet_len,
                    taken: taken.len(),
                    prefix: self.subnets_prefix(),
                });
            };
            let held = self.held(cfg, me, subnet, lease_id);
            let cmp = Compare::create_revision(held.key.clone(), CompareOp::Equal, 0);
            if self.put_if(&held, cmp, "create").await? {
                tracing::info!(subnet = %subnet, key = %held.key, "acquired a subnet");
                return Ok(held);
            }
        }
        Err(StoreError::Contention {
            network: cfg.network,
            prefix: self.subnets_prefix(),
            rounds,
        })
    }

    /// The lease `me` holding `subnet` and, in a dual-stack network, the
    /// IPv6 subnet of the same index: taking the IPv4 key (compare-and-create
    /// or take-over) takes the IPv6 subnet too, with no key of its own.
    fn held(
        &self,
        cfg: &NetworkConfig,
        me: &SubnetLease,
        subnet: Ipv4Network,
        lease_id: i64,
    ) -> HeldLease {
        let mut lease = me.clone();
        lease.subnet = Some(subnet);
        lease.ipv6_subnet = cfg.ipv6_subnet_for(subnet);
        lease.renewed_at = now_unix();
        HeldLease {
            key: self.lease_key(subnet),
            lease,
            lease_id,
        }
    }

    /// Puts `held` (attached to its etcd lease) when `cmp` holds; `false`
    /// when it did not.
    async fn put_if(
        &self,
        held: &HeldLease,
        cmp: Compare,
        op: &'static str,
    ) -> Result<bool, StoreError> {
        let put = TxnOp::put(
            held.key.clone(),
            held.lease.to_json(),
            Some(PutOptions::new().with_lease(held.lease_id)),
        );
        let txn = Txn::new().when([cmp]).and_then([put]);
        let resp = self.txn(op, &held.key, txn).await?;
        Ok(resp.succeeded())
    }

    /// One keep-alive of the etcd lease, then a check that the key still
    /// carries it. `Lost` when the etcd lease expired (etcd answers TTL 0)
    /// or the key was deleted or rewritten by someone else.
    pub async fn renew(&self, held: &HeldLease) -> Result<LeaseState, StoreError> {
        let key = &held.key;
        let lease_id = held.lease_id;
        // etcd-client sends the first keep-alive itself and reads its answer:
        // a TTL of 0 (the lease is gone) comes back as LeaseKeepAliveError.
        let expired = self
            .call("lease keep-alive", key, move |c| async move {
                match c.lease_client().keep_alive(lease_id).await {
                    Ok(_) => Ok(None),
                    Err(etcd_client::Error::LeaseKeepAliveError(msg)) => Ok(Some(msg)),
                    Err(e) => Err(e),
                }
            })
            .await?;
        if let Some(msg) = expired {
            tracing::warn!(key = %key, lease_id, %msg, "etcd lease expired");
            return Ok(LeaseState::Lost);
        }
        let k = key.clone();
        let got = self
            .call("get", key, move |c| {
                let k = k.clone();
                async move { c.kv_client().get(k, None).await }
            })
            .await?;
        match got.kvs().first() {
            Some(kv) if kv.lease() == held.lease_id => Ok(LeaseState::Alive),
            Some(kv) => {
                tracing::warn!(key = %key, lease_id = held.lease_id, now = kv.lease(), "lease key taken by another etcd lease");
                Ok(LeaseState::Lost)
            }
            None => {
                tracing::warn!(key = %key, "lease key deleted");
                Ok(LeaseState::Lost)
            }
        }
    }

    /// Deletes the key while it is still attached to our etcd lease, then
    /// revokes the etcd lease (an already expired one is fine).
    pub async fn release(&self, held: &HeldLease) -> Result<(), StoreError> {
        let key = &held.key;
        let txn = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, held.lease_id)])
            .and_then([TxnOp::delete(key.clone(), None)]);
        self.txn("delete", key, txn).await?;
        let lease_id = held.lease_id;
        self.call("lease revoke", key, move |c| async move {
            match c.lease_client().revoke(lease_id).await {
                Ok(_) => Ok(()),
                // Already expired (or revoked by an earlier attempt).
                Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::NotFound => {
                    Ok(())
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Deletes every lease of node `node` (an operator decommissioning a
    /// node: the other nodes drop its routes at once instead of at the
    /// lease's expiry). Each delete is conditional on the key being
    /// unchanged since it was read, so a lease the node re-acquires
    /// meanwhile is not touched. Returns the subnets freed.
    pub async fn remove_node(&self, node: &str) -> Result<Vec<Ipv4Network>, StoreError> {
        let (entries, _) = self.read_subnets().await?;
        let mut freed = Vec::new();
        for e in entries {
            let Some(lease) = e.lease.filter(|l| l.node == node) else {
                continue;
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    e.key.clone(),
                    CompareOp::Equal,
                    e.mod_revision,
                )])
                .and_then([TxnOp::delete(e.key.clone(), None)]);
            let resp = self.txn("delete", &e.key, txn).await?;
            if resp.succeeded() {
                freed.push(lease.subnet());
            }
        }
        Ok(freed)
    }

    /// Every readable lease and the revision of the read. Keys that do not
    /// name a subnet and unreadable values are skipped with a warning.
    pub async fn list_leases(&self) -> Result<(Vec<SubnetLease>, i64), StoreError> {
        let (entries, revision) = self.read_subnets().await?;
        Ok((
            entries.into_iter().filter_map(|e| e.lease).collect(),
            revision,
        ))
    }

    async fn read_subnets(&self) -> Result<(Vec<Entry>, i64), StoreError> {
        let prefix = self.subnets_prefix();
        let p = prefix.clone();
        let resp = self
            .call("get prefix", &prefix, move |c| {
                let p = p.clone();
                async move {
                    c.kv_client()
                        .get(p, Some(GetOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        let entries = resp.kvs().iter().filter_map(entry).collect();
        Ok((entries, revision))
    }

    /// Watches the subnets prefix for changes after `after_revision` (the
    /// revision of a [`list_leases`](Self::list_leases)). Lazy: it connects
    /// on the first [`LeaseWatch::next`].
    pub fn watch_leases(&self, after_revision: i64) -> LeaseWatch {
        LeaseWatch {
            store: self.clone(),
            revision: after_revision,
            stream: None,
            pending: VecDeque::new(),
            backoff: BACKOFF_MIN,
            retry_at: None,
        }
    }

    /// One transaction, on whichever member answers (see [`Self::call`]).
    async fn txn(
        &self,
        op: &'static str,
        key: &str,
        txn: Txn,
    ) -> Result<etcd_client::TxnResponse, StoreError> {
        self.call(op, key, move |c| {
            let txn = txn.clone();
            async move { c.kv_client().txn(txn).await }
        })
        .await
    }

    /// Runs one etcd request, made by `request` for a member's client: on the
    /// member that answered last, and when that member fails (see
    /// [`member_failed`]) or does not answer within its share of the
    /// timeout, on the next one, until every member was asked once. The
    /// member that answers is asked first next time.
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        mut request: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let members = &self.members;
        let n = members.list.len();
        let first = members.current.load(Ordering::Relaxed);
        let attempt = attempt_timeout(self.timeout, n);
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            let answer = tokio::time::timeout(attempt, async {
                let client = members.client(i).await?;
                request(client).await
            })
            .await;
            let failure = match answer {
                Ok(Ok(v)) => {
                    if k > 0 {
                        members.current.store(i, Ordering::Relaxed);
                        tracing::info!(member = %members.list[i].url, failed = %members.list[first].url, "etcd: switched to another member");
                    }
                    return Ok(v);
                }
                Ok(Err(e)) if !member_failed(&e) || n == 1 => {
                    return Err(self.etcd_error(op, key, e));
                }
                Ok(Err(e)) => self.etcd_error(op, key, e),
                Err(_) => StoreError::Timeout {
                    op,
                    key: key.to_string(),
                    endpoints: members.list[i].url.clone(),
                    after: attempt,
                },
            };
            tracing::debug!(member = %members.list[i].url, error = %failure, "etcd member failed; asking the next");
            members.forget(i);
            last = Some(failure);
        }
        Err(last.unwrap_or_else(|| self.timeout_error(op, key)))
    }

    fn etcd_error(&self, op: &'static str, key: &str, e: etcd_client::Error) -> StoreError {
        StoreError::Etcd {
            op,
            key: key.to_string(),
            endpoints: self.endpoints.clone(),
            source: Box::new(e),
        }
    }

    fn timeout_error(&self, op: &'static str, key: &str) -> StoreError {
        StoreError::Timeout {
            op,
            key: key.to_string(),
            endpoints: self.endpoints.clone(),
            after: self.timeout,
        }
    }
}

/// Reads one key under the subnets prefix; `None` (with a warning) when the
/// key is not UTF-8.
fn entry(kv: &KeyValue) -> Option<Entry> {
    let Ok(key) = kv.key_str() else {
        tracing::warn!(key = ?String::from_utf8_lossy(kv.key()), "skipping a lease key that is not UTF-8");
        return None;
    };
    let subnet = parse_subnet_key_segment(key.rsplit('/').next().unwrap_or_default());
    let lease = match SubnetLease::from_kv(key, kv.value()) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(key = %key, error = %e, "skipping an unreadable lease");
            None
        }
    };
    Some(Entry {
        key: key.to_string(),
        subnet,
        lease,
        mod_revision: kv.mod_revision(),
    })
}

/// Each member's share of a request's `timeout` among `members`.
fn attempt_timeout(timeout: Duration, members: usize) -> Duration {
    let n = u32::try_from(members.max(1)).unwrap_or(u32::MAX);
    (timeout / n).max(MIN_ATTEMPT).min(timeout)
}

/// A member index that differs between processes started together.
fn start_index(members: usize) -> usize {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    (nanos as usize ^ std::process::id() as usize) % members.max(1)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A resuming watch of every lease; see [`Store::watch_leases`].
///
/// It remembers the revision of the last event it handed out. When the
/// stream breaks (etcd restarted or unreachable), [`next`](Self::next)
/// returns one error per failed attempt and the next call tries again after
/// a backoff (100 ms doubling to 5 s), resuming at that revision + 1: no
/// event is missed and nothing is listed again. When etcd has compacted
/// that revision away, the watch lists every lease and returns
/// [`LeaseEvent::Resync`], then goes on from the list's revision.
///
/// Cancel safety: `next` may be dropped at any await (e.g. as a losing
/// `tokio::select!` branch) without losing an event. Events already
/// received wait in an internal queue, the stream's partial message stays
/// in the stream, and a reconnect or re-list that was interrupted is simply
/// done again by the next call.
pub struct LeaseWatch {
    store: Store,
    /// Every event up to this revision has been handed out (or queued).
    revision: i64,
    stream: Option<WatchStream>,
    pending: VecDeque<LeaseEvent>,
    backoff: Duration,
    /// When the next reconnect may start (after a failure).
    retry_at: Option<tokio::time::Instant>,
}

impl LeaseWatch {
    /// The revision of the last event handed out (or of the last resync).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The next change. An error means etcd could not be reached or broke
    /// the stream this time; call again to keep trying (with backoff).
    pub async fn next(&mut self) -> Result<LeaseEvent, StoreError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(ev);
            }
            let Some(stream) = self.stream.as_mut() else {
                if let Some(at) = self.retry_at {
                    tokio::time::sleep_until(at).await;
                }
                match self.open().await {
                    Ok(s) => {
                        self.stream = Some(s);
                        self.retry_at = None;
                    }
                    Err(e) => return Err(self.failed(e)),
                }
                continue;
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    self.backoff = BACKOFF_MIN;
                    if let Some(compact_revision) = self.handle(resp)? {
                        self.resync(compact_revision).await?;
                    }
                }
                Ok(None) => {
                    let e = self.watch_error("etcd closed the watch stream".into());
                    return Err(self.failed(e));
                }
                Err(e) => {
                    let e = self.watch_error(e.to_string());
                    return Err(self.failed(e));
                }
            }
        }
    }

    async fn open(&mut self) -> Result<WatchStream, StoreError> {
        let prefix = self.store.subnets_prefix();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.revision + 1)
            .with_progress_notify();
        let p = prefix.clone();
        self.store
            .call("watch", &prefix, move |c| {
                let (p, opts) = (p.clone(), opts.clone());
                async move { c.watch_client().watch(p, Some(opts)).await }
            })
            .await
    }

    /// Queues the events of one response. `Some(compact_revision)` when etcd
    /// canceled the watch because our revision was compacted.
    fn handle(&mut self, resp: WatchResponse) -> Result<Option<i64>, StoreError> {
        if resp.canceled() {
            self.stream = None;
            if resp.compact_revision() > 0 {
                return Ok(Some(resp.compact_revision()));
            }
            let e = self.watch_error(format!("canceled by etcd: {:?}", resp.cancel_reason()));
            return Err(self.failed(e));
        }
        if resp.events().is_empty() {
            // A progress notification (not the 'created' notice) says every
            // event up to the header's revision has been sent.
            if !resp.created()
                && let Some(h) = resp.header()
            {
                self.revision = self.revision.max(h.revision());
            }
            return Ok(None);
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            self.revision = self.revision.max(kv.mod_revision());
            let Ok(key) = kv.key_str() else {
                tracing::warn!(key = ?String::from_utf8_lossy(kv.key()), "watch: skipping a key that is not UTF-8");
                continue;
            };
            // etcd's event type is a closed protobuf enum of PUT and DELETE.
            match ev.event_type() {
                EventType::Put => match SubnetLease::from_kv(key, kv.value()) {
                    Ok(lease) => self.pending.push_back(LeaseEvent::Put(lease)),
                    Err(e) => {
                        tracing::warn!(key = %key, error = %e, "watch: skipping an unreadable lease")
                    }
                },
                EventType::Delete => {
                    match parse_subnet_key_segment(key.rsplit('/').next().unwrap_or_default()) {
                        Some(subnet) => self.pending.push_back(LeaseEvent::Delete(subnet)),
                        None => {
                            tracing::warn!(key = %key, "watch: skipping a deleted key that names no subnet")
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    /// Lists everything and queues a `Resync`; the stream is reopened after
    /// the list's revision by the next round of [`next`](Self::next).
    async fn resync(&mut self, compact_revision: i64) -> Result<(), StoreError> {
        tracing::warn!(
            revision = self.revision,
            compact_revision,
            "watch revision compacted away: listing every lease again"
        );
        match self.store.list_leases().await {
            Ok((leases, revision)) => {
                self.revision = revision;
                self.pending
                    .push_back(LeaseEvent::Resync { leases, revision });
                Ok(())
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Drops the stream and schedules the next attempt; returns `e`.
    fn failed(&mut self, e: StoreError) -> StoreError {
        self.stream = None;
        self.retry_at = Some(tokio::time::Instant::now() + self.backoff);
        tracing::debug!(error = %e, retry_in = ?self.backoff, "lease watch failed");
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        e
    }

    fn watch_error(&self, msg: String) -> StoreError {
        StoreError::Watch {
            prefix: self.store.subnets_prefix(),
            revision: self.revision,
            endpoints: self.store.endpoints.clone(),
            msg,
        }
    }
}
