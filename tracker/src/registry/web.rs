//! Nodes browsers may use (issue #14): a node's WebTransport endpoint, as its heartbeats advertise it, is
//! handed to browser pages only once the tracker's own probe opened a session to it with the advertised
//! hashes, and only for nodes a browser can dial (a verified direct address: browsers cannot hole-punch).
//! A node whose advertised hashes no longer include the certificate the probe met (it rotated, or
//! restarted with a new one) waits for the next probe.

use fog_proto::api::{CertHash, WebContact, WebTransportEndpoint};

use super::*;

/// A node's WebTransport endpoint and what the tracker's probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebState {
    pub advertised: WebTransportEndpoint,
    /// The hash of the certificate the node served the tracker's last successful probe, while its
    /// heartbeats still advertise it at the same port.
    pub served: Option<CertHash>,
}

impl WebState {
    /// What a heartbeat advertising `advertised` leaves of `old`.
    pub(super) fn updated(old: Option<&WebState>, advertised: WebTransportEndpoint) -> WebState {
        let served = old
            .filter(|o| o.advertised.port == advertised.port)
            .and_then(|o| o.served)
            .filter(|h| advertised.cert_hashes.contains(h));
        WebState { advertised, served }
    }
}

impl NodeEntry {
    /// The address browsers get for it: a verified direct one, IPv4 first (every browser has IPv4; one
    /// address, so that the URL and the address handed out agree), if it has a WebTransport endpoint.
    fn web_addr(&self) -> Option<SocketAddr> {
        self.web.as_ref()?;
        let direct = self.direct_addrs();
        direct.iter().copied().find(SocketAddr::is_ipv4).or(direct.first().copied())
    }
}

impl Registry {
    /// What `id`'s latest heartbeat advertised (verified by the caller).
    pub fn set_web(&self, id: &NodeId, advertised: Option<WebTransportEndpoint>) {
        let mut nodes = self.nodes.write().expect("registry lock");
        let Some(n) = nodes.get_mut(id) else { return };
        let web = advertised.map(|advertised| WebState::updated(n.web.as_ref(), advertised));
        if web != n.web {
            n.web = web;
            self.changed();
        }
    }

    /// Live nodes browsers could dial whose endpoint no probe has vouched for yet, with where to probe it.
    pub fn web_probe_targets(&self) -> Vec<(NodeId, WebContact)> {
        let nodes = self.nodes.read().expect("registry lock");
        nodes
            .iter()
            .filter(|(_, n)| n.health.quarantined.is_none() && self.since(n.last_seen) <= self.timeout)
            .filter(|(_, n)| n.web.as_ref().is_some_and(|w| w.served.is_none()))
            .filter_map(|(id, n)| {
                let web = n.web.as_ref()?;
                Some((*id, WebContact::at(n.web_addr()?, &web.advertised)))
            })
            .collect()
    }

    /// A probe of `id`'s WebTransport endpoint opened a session on the certificate hashed `served` (or
    /// failed: `None`).
    pub fn record_web_probe(&self, id: &NodeId, served: Option<CertHash>) {
        let mut nodes = self.nodes.write().expect("registry lock");
        let Some(web) = nodes.get_mut(id).and_then(|n| n.web.as_mut()) else { return };
        let served = served.filter(|h| web.advertised.cert_hashes.contains(h));
        if web.served != served {
            web.served = served;
            self.changed();
        }
    }

    /// [`Registry::snapshot`] for browser pages: only nodes with a probed WebTransport endpoint and a
    /// direct address, each contact at that one address with its [`WebContact`].
    pub fn web_snapshot(&self) -> Arc<Snapshot> {
        self.cached_snapshot(&self.web_snapshot, |_, id, n| {
            let web = n.web.as_ref().filter(|w| w.served.is_some())?;
            let addr = n.web_addr()?;
            let mut contact = NodeContact::direct(*id, addr);
            contact.web = Some(WebContact::at(addr, &web.advertised));
            Some(contact)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16, hashes: &[u8]) -> WebTransportEndpoint {
        WebTransportEndpoint { port, cert_hashes: hashes.iter().map(|h| CertHash([*h; 32])).collect() }
    }

    #[test]
    fn a_probed_certificate_counts_while_the_node_still_advertises_it() {
        let probed = WebState { advertised: endpoint(443, &[1]), served: Some(CertHash([1; 32])) };
        // The next certificate announced beside it: still vouched for.
        assert_eq!(WebState::updated(Some(&probed), endpoint(443, &[1, 2])).served, Some(CertHash([1; 32])));
        // Switched to the next one, restarted with a new one, or moved: the next probe decides.
        assert_eq!(WebState::updated(Some(&probed), endpoint(443, &[2])).served, None);
        assert_eq!(WebState::updated(Some(&probed), endpoint(444, &[1])).served, None);
        assert_eq!(WebState::updated(None, endpoint(443, &[1])).served, None);
    }
}
