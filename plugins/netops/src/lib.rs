//! Kernel operations for ferry, all through netlink, each in the right
//! network namespace.
//!
//! The one rule this crate exists to enforce (DESIGN.md, "The netns rule"): a
//! netlink socket acts in the namespace it was *created* in, and `setns`
//! changes only the calling thread. So a namespace is entered only by a
//! short-lived `std::thread` that dies afterwards ([`in_netns`]), either to do
//! blocking work there (sysctls) or to give birth to a netlink socket that is
//! then driven from the async runtime ([`NsHandle::new`]). No thread of the
//! runtime ever calls `setns`.
//!
//! Every `rtnetlink` type stays inside this crate: plugins and the daemon see
//! [`NsHandle`], [`Link`] and [`NetopsError`] only.

mod addr;
mod batch;
pub mod boot;
mod bridge_vlan;
pub mod conntrack;
mod error;
mod handle;
mod link;
pub mod monitor;
mod neigh;
mod netns;
pub mod nft;
mod pod_link;
mod route;
pub mod sysctl;
mod tc;
mod vxlan;

pub use batch::{Batch, BatchOp};
pub use bridge_vlan::PortVlan;
pub use error::{NetopsError, to_cni};
/// For issuing several requests at once: on one handle they go out back to
/// back and are answered in order (one wait instead of one per request); on
/// handles of different namespaces they proceed side by side.
pub use futures::future::{join, join_all, join3};
pub use handle::{NsHandle, Runtime, block_on};
pub use link::{Link, LinkOwner, OperState};
pub use monitor::{KernelEvent, Monitor};
pub use neigh::{FdbEntry, IpNeighbour, NeighState, Neighbour, Neighbour6};
pub use netns::{NetNs, in_netns};
pub use pod_link::{BridgeSpec, VethPair};
pub use route::RouteSpec;
pub use route::{
    FERRY_ROUTE_PROTO, IpRoute, Ipv4Route, Ipv6Route, RouteEntry, RouteFamily, RouteFilter,
    RouteKind,
};
pub use tc::{Qdisc, Tbf, TbfState};
pub use vxlan::{Vxlan, VxlanChange, VxlanSpec};

/// Shorthand used across the crate.
pub type Result<T, E = NetopsError> = std::result::Result<T, E>;
