//! etcd: the cluster network config, fenced subnet leases, keep-alive and the
//! watch of every node's lease. (Being written.)
