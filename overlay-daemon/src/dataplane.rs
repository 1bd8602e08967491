//! The overlay's kernel state: desired entries computed from the leases, and
//! reconciling the kernel to them. (Being written.)
