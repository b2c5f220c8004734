use super::*;

fn id(i: u32) -> NodeId {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&i.to_be_bytes());
    NodeId(b)
}

fn reg() -> Registration {
    Registration {
        addr: SocketAddr::from(([127, 0, 0, 1], 1)),
        cache_capacity: 1,
        upload_limit: None,
        version: "t".into(),
        reachable: true,
        joining: false,
    }
}

#[test]
fn a_joining_node_is_scheduled_once_its_overlay_is_connected() {
    let r = Registry::new(Duration::from_secs(60), 8, HashSet::new());
    let now = 10_000_000;
    r.register(id(1), Registration { joining: true, ..reg() }, now, now).expect("register");
    let state = || r.page(0, 10, SortBy::Id, false).nodes[0].state;
    assert_eq!(state(), "joining");
    assert!(r.snapshot().nodes.is_empty(), "a joining node must not be scheduled");
    assert_eq!((r.counts().joining, r.counts().healthy), (1, 0));
    let still = OverlayReport { joining: true, ..Default::default() };
    r.heartbeat(&id(1), NodeStats::default(), false, Some(still), now + 1, now).expect("heartbeat");
    assert!(r.snapshot().nodes.is_empty());
    r.heartbeat(&id(1), NodeStats::default(), false, Some(OverlayReport::default()), now + 2, now).expect("hb");
    assert_eq!((state(), r.snapshot().nodes.len()), ("active", 1));
    // Registering again (a fresh membership) with the overlay connected keeps it scheduled.
    r.register(id(1), reg(), now + 3, now).expect("register again");
    assert_eq!(r.snapshot().nodes.len(), 1);
}

#[test]
fn replay_clock_capacity_block_and_health() {
    let clock = Clock::manual(10_000_000);
    let r = Registry::new(Duration::from_secs(60), 2, HashSet::new()).with_clock(clock.clone());
    let now = 10_000_000;
    r.register(id(1), reg(), now, now).expect("register");
    assert_eq!(r.register(id(1), reg(), now, now), Err(RegistryError::Replay));
    assert_eq!(r.register(id(2), reg(), 1, now), Err(RegistryError::Clock));
    r.register(id(2), reg(), now, now).expect("second");
    assert_eq!(r.register(id(3), reg(), now, now), Err(RegistryError::Full(2)));
    assert_eq!(r.heartbeat(&id(9), NodeStats::default(), false, None, now, now), Ok(false));
    assert_eq!(r.heartbeat(&id(1), NodeStats::default(), false, None, now + 1, now), Ok(true));
    assert_eq!(r.counts().healthy, 2);
    assert!(r.block(id(2)));
    assert_eq!(r.heartbeat(&id(2), NodeStats::default(), false, None, now + 2, now), Err(RegistryError::Blocked));
    assert_eq!(r.register(id(2), reg(), now + 3, now), Err(RegistryError::Blocked));
    assert_eq!(r.counts().total, 1);
    clock.advance(Duration::from_secs(61));
    assert_eq!(r.counts().healthy, 0);
    assert!(r.snapshot().nodes.is_empty());
    // Full, with one entry silent: a newcomer takes its place.
    r.register(id(4), reg(), now + 4, now).expect("room left");
    r.register(id(5), reg(), now + 5, now).expect("the silent entry makes room");
    assert_eq!(r.counts().total, 2);
    assert_eq!(r.heartbeat(&id(1), NodeStats::default(), false, None, now + 6, now), Ok(false), "not forgotten");
}

#[test]
fn probes_and_draining_move_nodes_between_states_with_hysteresis() {
    let r = Registry::new(Duration::from_secs(60), 10, HashSet::new());
    let now = 10_000_000;
    r.register(id(1), reg(), now, now).expect("register");
    let state = || r.page(0, 10, SortBy::Id, false).nodes[0].state;
    let fail = ProbeOutcome::Failed("timeout".into());
    assert_eq!(r.record_probe(&id(1), &fail), None);
    assert_eq!(r.record_probe(&id(1), &ProbeOutcome::NoData), None);
    assert_eq!(r.record_probe(&id(1), &fail), None);
    assert_eq!(r.record_probe(&id(1), &fail), Some((NodeState::Active, NodeState::Unhealthy)));
    assert!(r.snapshot().nodes.is_empty());
    r.register(id(1), reg(), now + 1, now).expect("re-register");
    assert_eq!(state(), "unhealthy", "re-registering must not wash away failed probes");
    assert_eq!(r.record_probe(&id(1), &ProbeOutcome::Ok { rtt_ms: 3 }), None, "one success is not enough");
    assert_eq!(
        r.record_probe(&id(1), &ProbeOutcome::Ok { rtt_ms: 3 }),
        Some((NodeState::Unhealthy, NodeState::Active))
    );
    r.heartbeat(&id(1), NodeStats::default(), true, None, now + 2, now).expect("draining heartbeat");
    assert_eq!(state(), "draining");
    assert!(r.snapshot().nodes.is_empty(), "a draining node must not be scheduled");
    r.heartbeat(&id(1), NodeStats::default(), false, None, now + 3, now).expect("heartbeat");
    assert_eq!(r.record_probe(&id(1), &ProbeOutcome::WrongBytes), Some((NodeState::Active, NodeState::Quarantined)));
    r.register(id(1), reg(), now + 4, now).expect("re-register");
    assert_eq!(state(), "quarantined", "re-registering must not lift a quarantine");
    assert!(r.probe_targets().is_empty());
}

#[test]
fn totals_survive_counter_resets() {
    let r = Registry::new(Duration::from_secs(60), 10, HashSet::new());
    let now = 10_000_000;
    r.register(id(1), reg(), now, now).expect("register");
    let stats = |b| NodeStats { bytes_served: b, ..Default::default() };
    r.heartbeat(&id(1), stats(100), false, None, now + 1000, now).expect("hb");
    r.heartbeat(&id(1), stats(300), false, None, now + 2000, now).expect("hb");
    r.heartbeat(&id(1), stats(50), false, None, now + 3000, now).expect("hb after restart");
    assert_eq!(r.totals.fog_bytes.load(Ordering::Relaxed), 350);
    assert_eq!(r.page(0, 10, SortBy::Id, false).nodes[0].upload_rate, 50);
}

#[test]
fn pages_are_bounded_and_complete_with_ten_thousand_nodes() {
    let r = Registry::new(Duration::from_secs(60), 20_000, HashSet::new());
    let now = 10_000_000;
    for i in 0..10_000 {
        r.register(id(i), reg(), now, now).expect("register");
    }
    let huge = r.page(0, 1_000_000, SortBy::Id, false);
    assert_eq!(huge.per_page, MAX_PAGE);
    assert_eq!(huge.nodes.len(), MAX_PAGE);
    assert!(huge.nodes.iter().all(|n| n.addr.is_none()));
    let mut seen = HashSet::new();
    for p in 0..(10_000 / 100) {
        let page = r.page(p, 100, SortBy::Id, true);
        assert_eq!(page.total, 10_000);
        assert!(page.nodes.iter().all(|n| n.addr.is_some()));
        seen.extend(page.nodes.into_iter().map(|n| n.id));
    }
    assert_eq!(seen.len(), 10_000);
    assert!(r.page(100, 100, SortBy::State, false).nodes.is_empty());
}

/// Most of a node's bootstrap peers are its nearest by coordinate: where its misses' homes are.
#[test]
fn bootstrap_peers_start_with_the_nearest_nodes() {
    let r = Registry::new(Duration::from_secs(60), 100, HashSet::new());
    let now = 10_000_000;
    // Two sites 100 ms apart (even and odd ids, so no window of the id-sorted directory is one site), ten
    // nodes each, every node measuring 5 ms to its site and 100 ms across.
    let site = |i: u32| i % 2;
    for i in 0..20 {
        r.register(id(i), reg(), now, now).expect("register");
    }
    for round in 0..30u64 {
        for i in 0..20 {
            let rtt = (0..20)
                .filter(|&j| j != i)
                .map(|j| fog_proto::api::RttSample {
                    peer: id(j),
                    rtt_ms: if site(i) == site(j) { 5.0 } else { 100.0 },
                })
                .collect();
            let overlay = OverlayReport {
                addrs: vec![format!("/ip4/127.0.0.1/udp/{}/quic-v1", 4000 + i)],
                rtt,
                ..Default::default()
            };
            let at = now + (round + 1) * 1000;
            r.heartbeat(&id(i), NodeStats::default(), false, Some(overlay), at, at).expect("heartbeat");
        }
    }
    for i in [0, 15] {
        let peers = r.peers_for(&id(i), 8);
        assert_eq!(peers.len(), 8);
        let near: Vec<u32> =
            peers[..4].iter().map(|p| u32::from_be_bytes(p.id.0[..4].try_into().expect("4"))).collect();
        assert!(near.iter().all(|&j| site(j) == site(i) && j != i), "node {i}'s first peers: {near:?}");
    }
}

#[test]
fn nodes_behind_nat_are_scheduled_only_through_a_live_rendezvous() {
    let r = Registry::new(Duration::from_secs(60), 10, HashSet::new());
    let now = 10_000_000;
    r.register(id(1), reg(), now, now).expect("public node");
    let natted = Registration { reachable: false, addr: SocketAddr::from(([10, 0, 0, 2], 7701)), ..reg() };
    r.register(id(2), natted, now, now).expect("node behind NAT");
    assert_eq!(r.snapshot().nodes.len(), 1, "not reachable and not attached: not scheduled");
    assert_eq!(r.counts().by_client_path, [1, 0, 1]);
    let external = SocketAddr::from(([198, 51, 100, 9], 40000));
    let overlay = OverlayReport {
        reachability: Reachability::Relayed,
        addrs: vec!["/ip4/198.51.100.9/udp/4001/quic-v1".into()],
        rendezvous: Some(id(1)),
        external_quic: Some(external),
        ..Default::default()
    };
    r.heartbeat(&id(2), NodeStats::default(), false, Some(overlay), now + 1, now).expect("heartbeat");
    assert_eq!(r.snapshot().nodes.len(), 1, "its rendezvous has not confirmed the attachment: not scheduled");
    let confirms = OverlayReport { attached: vec![id(2)], ..Default::default() };
    r.heartbeat(&id(1), NodeStats::default(), false, Some(confirms), now + 1, now).expect("heartbeat");
    let snap = r.snapshot();
    let contact = &snap.nodes.iter().find(|c| c.contact.id == id(2)).expect("scheduled through the rendezvous").contact;
    assert_eq!(contact.addr, external);
    assert_eq!(contact.via, Some(Rendezvous { id: id(1), addr: reg().addr }));
    assert_eq!(r.counts().by_client_path, [1, 1, 0]);
    assert_eq!(
        r.counts().by_reachability[Reachability::ALL.iter().position(|x| *x == Reachability::Relayed).expect("listed")],
        1
    );
    // Node 1 has no overlay addresses yet; node 2 does and is offered to node 1, without a rendezvous
    // address since the tracker cannot dial it.
    let peers = r.peers_for(&id(1), 8);
    assert_eq!(peers.len(), 1);
    assert_eq!((peers[0].id, peers[0].rendezvous), (id(2), None));
    assert!(r.peers_for(&id(2), 8).is_empty());
    // The rendezvous leaves: node 2 is no longer reachable.
    r.block(id(1));
    assert!(r.snapshot().nodes.is_empty());
}

/// A node behind an IPv4 NAT with a global IPv6 address: its IPv6 address, once dialled back, is handed out
/// directly; its IPv4 clients go through its rendezvous; the counts say which family was verified.
#[test]
fn other_addresses_are_verified_per_family_and_kept_across_registrations() {
    let r = Registry::new(Duration::from_secs(60), 10, HashSet::new());
    let now = 10_000_000;
    r.register(id(1), reg(), now, now).expect("rendezvous");
    let natted = Registration { reachable: false, addr: SocketAddr::from(([198, 51, 100, 9], 7701)), ..reg() };
    r.register(id(2), natted.clone(), now, now).expect("node behind NAT");
    let v6: SocketAddr = "[2001:db8::9]:7701".parse().expect("addr");
    let overlay = |quic_addrs: Vec<SocketAddr>| OverlayReport {
        rendezvous: Some(id(1)),
        external_quic: Some(SocketAddr::from(([198, 51, 100, 9], 40000))),
        quic_addrs,
        ..Default::default()
    };
    r.heartbeat(&id(2), NodeStats::default(), false, Some(overlay(vec![v6, natted.addr])), now + 1, now).expect("hb");
    assert_eq!(r.more_addrs_to_verify(&id(2)), Some(vec![v6]), "the registered address is not dialled again");
    assert!(r.snapshot().nodes.iter().all(|n| n.contact.id != id(2)), "nothing verified yet");
    r.set_more_addrs(&id(2), vec![Advertised { addr: v6, verified: true }]);
    assert_eq!(r.more_addrs_to_verify(&id(2)), None);
    assert_eq!(r.verified(&id(2)), Some((false, vec![v6])), "reached over IPv6 only");
    assert!(!r.is_reachable(&id(2)), "it still needs a rendezvous for IPv4 clients");
    let contact = || r.snapshot().nodes.iter().find(|n| n.contact.id == id(2)).map(|n| n.contact.clone());
    let both = contact().expect("scheduled: directly over IPv6");
    assert_eq!(both.for_families(Families::BOTH).map(|c| (c.addr, c.via)), Some((v6, None)));
    assert_eq!(both.for_families(Families { ipv4: false, ipv6: true }).map(|c| c.addr), Some(v6));
    assert_eq!(both.for_families(Families { ipv4: true, ipv6: false }), None, "its rendezvous has not confirmed it");
    let confirms = OverlayReport { attached: vec![id(2)], ..Default::default() };
    r.heartbeat(&id(1), NodeStats::default(), false, Some(confirms), now + 1, now).expect("hb");
    let via = contact().expect("scheduled").for_families(Families { ipv4: true, ipv6: false }).expect("punched");
    assert_eq!(via.via, Some(Rendezvous { id: id(1), addr: reg().addr }));
    let c = r.counts();
    assert_eq!((c.by_family[0], c.by_family[1]), ((1, 1), (1, 0)), "IPv4: one verified, one not; IPv6: one verified");
    // A re-registration keeps what was verified; a changed set is dialled again.
    r.register(id(2), natted, now + 2, now).expect("register again");
    assert_eq!(r.verified(&id(2)), Some((false, vec![v6])));
    let moved: SocketAddr = "[2001:db8:1::9]:7701".parse().expect("addr");
    r.heartbeat(&id(2), NodeStats::default(), false, Some(overlay(vec![moved])), now + 3, now).expect("hb");
    assert_eq!(r.more_addrs_to_verify(&id(2)), Some(vec![moved]));
}
