//! Interface addresses.

use crate::link::is_errno;
use crate::{NsHandle, Result};
use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressMessage, AddressScope,
};

impl NsHandle {
    /// `ip addr replace <addr> dev <index>`: idempotent.
    pub async fn replace_address(&self, index: u32, addr: IpNetwork) -> Result<()> {
        self.handle
            .address()
            .add(index, addr.ip(), addr.prefix())
            .replace()
            .execute()
            .await
            .map_err(|e| self.err("add address", format!("#{index} {addr}"), e))
    }

    /// Like [`NsHandle::replace_address`], usable at once: IPv6 skips duplicate
    /// address detection (a gateway address stays "tentative" for ~2 s
    /// otherwise, and pods' first packets to it are lost).
    pub async fn replace_address_nodad(&self, index: u32, addr: IpNetwork) -> Result<()> {
        let mut req = self
            .handle
            .address()
            .add(index, addr.ip(), addr.prefix())
            .replace();
        if addr.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .map_err(|e| self.err("add address", format!("#{index} {addr}"), e))
    }

    async fn address_messages(&self, index: u32) -> Result<Vec<AddressMessage>> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err("list addresses", format!("#{index}"), e))
    }

    /// The global (non link-local) addresses of a link.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>> {
        let msgs = self.address_messages(index).await?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.index != index || m.header.scope != AddressScope::Universe {
                continue;
            }
            for a in &m.attributes {
                if let AddressAttribute::Address(ip) = a
                    && let Ok(net) = IpNetwork::new(*ip, m.header.prefix_len)
                {
                    out.push(net);
                }
            }
        }
        Ok(out)
    }

    /// Removes one address; `Ok(false)` when it was not there.
    pub async fn delete_address(&self, index: u32, addr: IpNetwork) -> Result<bool> {
        let msgs = self.address_messages(index).await?;
        for m in msgs {
            let hit = m.header.index == index
                && m.header.prefix_len == addr.prefix()
                && m.attributes
                    .iter()
                    .any(|a| matches!(a, AddressAttribute::Address(ip) if *ip == addr.ip()));
            if hit {
                return match self.handle.address().del(m).execute().await {
                    Ok(()) => Ok(true),
                    Err(e) if is_errno(&e, libc::EADDRNOTAVAIL) => Ok(false),
                    Err(e) => Err(self.err("delete address", format!("#{index} {addr}"), e)),
                };
            }
        }
        Ok(false)
    }
}
