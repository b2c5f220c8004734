//! Nodes browsers may use (issue #14): a node's WebTransport endpoint, as its heartbeats advertise it, is
//! handed to browser pages only once the tracker's own probe opened a session to it with the advertised
//! hashes, and only for nodes a browser can dial (a verified direct address: browsers cannot hole-punch).
//! A node that switched to the successor it announced beside the probed certificate (its rotation) stays
//! with pages, so the switch costs no offload, and is probed again at once; one whose hashes no longer
//! include either (it restarted with a new certificate, or moved) waits for the next probe.

use fog_proto::api::{CertHash, WebContact, WebTransportEndpoint};

use super::*;

/// A node's WebTransport endpoint and what the tracker's probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebState {
    pub advertised: WebTransportEndpoint,
    /// The hash of the certificate the node served the tracker's last successful probe, while its
    /// heartbeats still advertise it at the same port; or of the successor it announced beside that one
    /// and then switched to, until the next probe.
    pub served: Option<CertHash>,
    /// Whether a probe met `served` itself (not only its announced predecessor).
    pub confirmed: bool,
}

impl WebState {
    /// What a heartbeat advertising `advertised` leaves of `old`.
    pub(super) fn updated(old: Option<&WebState>, advertised: WebTransportEndpoint) -> WebState {
        let vouched = old.filter(|o| o.advertised.port == advertised.port).and_then(|o| Some((o, o.served?)));
        let (served, confirmed) = match vouched {
            Some((o, h)) if advertised.cert_hashes.contains(&h) => (Some(h), o.confirmed),
            // A node serves its first advertised hash; it was announced beside the probed one.
            Some((o, _)) => match advertised.cert_hashes.first().filter(|h| o.advertised.cert_hashes.contains(h)) {
                Some(successor) => (Some(*successor), false),
                None => (None, false),
            },
            None => (None, false),
        };
        WebState { advertised, served, confirmed }
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

    /// Live nodes browsers could dial whose served certificate no probe has met yet, with where to probe.
    pub fn web_probe_targets(&self) -> Vec<(NodeId, WebContact)> {
        let nodes = self.nodes.read().expect("registry lock");
        nodes
            .iter()
            .filter(|(_, n)| n.health.quarantined.is_none() && self.since(n.last_seen) <= self.timeout)
            .filter(|(_, n)| n.web.as_ref().is_some_and(|w| !w.confirmed))
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
        web.confirmed = served.is_some();
    }

    /// [`Registry::snapshot`] for browser pages: only nodes with a probed WebTransport endpoint and a
    /// direct address, each contact at that one address with its [`WebContact`].
    pub fn web_snapshot(&self) -> Arc<Snapshot> {
        self.web_snapshot_built(self.serve_aged())
    }

    pub(super) fn web_snapshot_built(&self, serve_aged: bool) -> Arc<Snapshot> {
        self.cached_snapshot(&self.web_snapshot, serve_aged, |_, id, n| {
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
    fn a_probed_certificate_counts_while_the_node_still_advertises_it_or_its_announced_successor() {
        let probed = WebState { advertised: endpoint(443, &[1]), served: Some(CertHash([1; 32])), confirmed: true };
        let updated = |old: &WebState, port, hashes| {
            let new = WebState::updated(Some(old), endpoint(port, hashes));
            (new.served.map(|h| h.0[0]), new.confirmed)
        };
        assert_eq!(updated(&probed, 443, &[1]), (Some(1), true));
        // The next certificate announced beside it: still vouched for.
        let announcing = WebState::updated(Some(&probed), endpoint(443, &[1, 2]));
        assert_eq!((announcing.served, announcing.confirmed), (Some(CertHash([1; 32])), true));
        // Switched to it: pages keep the node, the probe confirms it.
        assert_eq!(updated(&announcing, 443, &[2]), (Some(2), false));
        // A certificate nobody announced (a restart), or another port: the next probe decides.
        assert_eq!(updated(&probed, 443, &[2]), (None, false));
        assert_eq!(updated(&announcing, 443, &[3]), (None, false));
        assert_eq!(updated(&probed, 444, &[1]), (None, false));
        assert_eq!(WebState::updated(None, endpoint(443, &[1])).served, None);
    }
}
