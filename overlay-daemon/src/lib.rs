//! ferryd: one per node. Leases this node's pod subnet from etcd, publishes
//! its VTEP, watches the other nodes' leases and keeps the kernel's overlay
//! entries (VXLAN device, neighbours, fdb, routes) equal to them; writes the
//! node's CNI conflist; serves health and metrics.
//!
//! Modules, one job each:
//! - [`network`]: the cluster network config (stored in etcd) and subnet math.
//! - [`lease`]: a node's subnet lease as stored in etcd.
//! - [`store`]: etcd: config, fenced lease acquisition, keep-alive, watch.
//! - [`dataplane`]: desired kernel state from the leases, and reconciling the
//!   kernel to it.
//! - [`cniconf`]: the node's conflist and subnet.env.
//! - [`http`]: /healthz, /readyz, /metrics.
//! - [`doctor`]: `ferryd doctor`, read-only checks of the node ([`doctor_probe`]: `--probe`).
//! - [`gc`]: the sweep that cleans up after runtimes that sent no DEL.
//! - [`daemon`]: ties them together.

pub mod cniconf;
pub mod daemon;
pub mod dataplane;
pub mod doctor;
pub mod doctor_probe;
pub mod gc;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod network;
pub mod store;
