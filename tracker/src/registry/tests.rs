use super::*;

fn id(i: u32) -> NodeId {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&i.to_be_bytes());
    NodeId(b)
}

/// A registration of a reachable node on loopback.
pub(super) fn reg() -> Registration {
    Registration {
        addr: SocketAddr::from(([127, 0, 0, 1], 1)),
        cache_capacity: 1,
        upload_limit: None,
        version: "t".into(),
        reachable: true,
        joining: false,
        region: None,
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

/// Thirty heartbeat rounds from nodes `0..n` of two sites (even and odd ids), each measuring `within` ms to
/// its own site and `across` ms to the other, so their coordinates fit.
fn fit_two_sites(r: &Registry, n: u32, within: f32, across: f32, now: u64) {
    for round in 0..30u64 {
        for i in 0..n {
            let rtt = (0..n)
                .filter(|&j| j != i)
                .map(|j| fog_proto::api::RttSample {
                    peer: id(j),
                    rtt_ms: if i % 2 == j % 2 { within } else { across },
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
    fit_two_sites(&r, 20, 5.0, 100.0, now);
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
    let r = Registry::new(Duration::from_secs(60), 10, HashSet::new()).with_cells(Some(100.0));
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
    // address since the tracker cannot dial it, but with the rendezvous its peers punch through (as clients
    // do), in its cell's list too.
    let peers = r.peers_for(&id(1), 8);
    assert_eq!(peers.len(), 1);
    let via = Some(Rendezvous { id: id(1), addr: reg().addr });
    assert_eq!((peers[0].id, peers[0].rendezvous, &peers[0].via), (id(2), None, &via));
    assert!(r.peers_for(&id(2), 8).is_empty());
    let cell = r.cell_list_for(&id(2), None).expect("a cell list");
    assert_eq!(
        cell.members.iter().map(|m| (m.id, m.rendezvous, m.via.clone())).collect::<Vec<_>>(),
        [(id(2), None, via)]
    );
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

/// Homes of the IPv6 lab (`testkit/tests/it/netns/dual_stack.rs`): an IPv6-only node behind a stateful firewall is
/// given its rendezvous candidates at their IPv6 addresses (it cannot attach over IPv4) and is punched over
/// IPv6 only; a node that registered over IPv6 from behind an IPv4 NAT is direct over IPv6 and punched over
/// IPv4. The node table says which, per family.
#[test]
fn rendezvous_and_paths_follow_the_family_a_node_attached_in() {
    let r = Registry::new(Duration::from_secs(60), 10, HashSet::new());
    let now = 10_000_000;
    let addr = |s: &str| -> SocketAddr { s.parse().expect("addr") };
    let (public_v4, public_v6) = (addr("198.51.100.1:7701"), addr("[2a0f::1]:7701"));
    r.register(id(1), Registration { addr: public_v4, ..reg() }, now, now).expect("public node");
    r.set_more_addrs(&id(1), vec![Advertised { addr: public_v6, verified: true }]);
    let overlay_addrs = vec!["/ip4/198.51.100.1/udp/4001/quic-v1".to_string()];
    let listed = OverlayReport { addrs: overlay_addrs, ..Default::default() };
    r.heartbeat(&id(1), NodeStats::default(), false, Some(listed.clone()), now + 1, now).expect("hb");
    let firewalled = addr("[2a0f:5::2]:7701");
    r.register(id(2), Registration { addr: firewalled, reachable: false, ..reg() }, now, now).expect("IPv6 home");
    let dual_v6 = addr("[2a0f:6::2]:7701");
    r.register(id(3), Registration { addr: dual_v6, ..reg() }, now, now).expect("dual-stack home");
    let natted = Registration { addr: addr("203.0.113.9:7701"), reachable: false, ..reg() };
    r.register(id(4), natted, now, now).expect("IPv4 home");

    let rendezvous_for = |node: u32| r.peers_for(&id(node), 8).iter().find(|p| p.id == id(1)).map(|p| p.rendezvous);
    assert_eq!(rendezvous_for(2), Some(Some(public_v6)), "IPv6 for the IPv6-only node");
    assert_eq!(rendezvous_for(4), Some(Some(public_v4)), "IPv4 where NAT is");
    assert_eq!(rendezvous_for(3), Some(Some(public_v4)), "the tracker does not know its IPv4: IPv4 as ever");

    let attached = |external: &str| OverlayReport {
        rendezvous: Some(id(1)),
        external_quic: Some(addr(external)),
        ..Default::default()
    };
    r.heartbeat(&id(2), NodeStats::default(), false, Some(attached("[2a0f:5::2]:7701")), now + 1, now).expect("hb");
    r.heartbeat(&id(3), NodeStats::default(), false, Some(attached("198.51.100.6:40000")), now + 1, now).expect("hb");
    let confirms = OverlayReport { attached: vec![id(2), id(3)], ..listed };
    r.heartbeat(&id(1), NodeStats::default(), false, Some(confirms), now + 2, now).expect("hb");

    let snap = r.snapshot();
    let contact = |node: u32| snap.nodes.iter().find(|n| n.contact.id == id(node)).map(|n| n.contact.clone());
    let (v4_only, v6_only) = (Families { ipv4: true, ipv6: false }, Families { ipv4: false, ipv6: true });
    let home6 = contact(2).expect("the IPv6 home is scheduled");
    assert_eq!(home6.for_families(v4_only), None, "never offered to an IPv4-only client");
    let punched = home6.for_families(Families::BOTH).expect("punched");
    assert_eq!((punched.addr, punched.via.map(|v| v.addr)), (firewalled, Some(public_v6)));
    let dual = contact(3).expect("the dual-stack home is scheduled");
    assert_eq!(dual.for_families(v6_only).map(|c| (c.addr, c.via)), Some((dual_v6, None)), "direct over IPv6");
    let punched = dual.for_families(v4_only).expect("punched over IPv4");
    assert_eq!((punched.addr, punched.via.map(|v| v.addr)), (addr("198.51.100.6:40000"), Some(public_v4)));

    let page = r.page(0, 10, SortBy::Id, false);
    let paths: Vec<(&str, &str)> = page.nodes.iter().map(|n| (n.client_path_ipv4, n.client_path_ipv6)).collect();
    let expected =
        [("direct", "direct"), ("unreachable", "hole_punch"), ("hole_punch", "direct"), ("unreachable", "unreachable")];
    assert_eq!(paths, expected);
}

/// Cells: nodes far apart never share one; nodes with one region label always do, get the same list
/// (sent again only when it changed) and agree on every chunk's home.
#[test]
fn cells_group_nodes_by_coordinate_or_label_and_list_them_once() {
    let now = 10_000_000;
    let site = |i: u32| i % 2;
    let by_grid = Registry::new(Duration::from_secs(60), 100, HashSet::new()).with_cells(Some(50.0));
    for i in 0..12 {
        by_grid.register(id(i), reg(), now, now).expect("register");
    }
    fit_two_sites(&by_grid, 12, 4.0, 300.0, now);
    for i in 0..12 {
        for j in (0..12).filter(|&j| site(j) != site(i)) {
            assert_ne!(
                by_grid.cell_of_node(&id(i)),
                by_grid.cell_of_node(&id(j)),
                "nodes {i} and {j} are 300 ms apart"
            );
        }
    }
    assert!(Registry::new(Duration::from_secs(60), 8, HashSet::new()).cell_of_node(&id(0)).is_none(), "cells off");

    let by_label = Registry::new(Duration::from_secs(60), 100, HashSet::new()).with_cells(Some(50.0));
    for i in 0..12 {
        let region = Some(if site(i) == 0 { "even" } else { "odd" }.to_string());
        by_label.register(id(i), Registration { region, ..reg() }, now, now).expect("register");
    }
    fit_two_sites(&by_label, 12, 4.0, 300.0, now);
    let list = by_label.cell_list_for(&id(0), None).expect("a cell list");
    let mut members: Vec<NodeId> = list.members.iter().map(|m| m.id).collect();
    members.sort();
    assert_eq!(members, (0..12).filter(|&i| site(i) == 0).map(id).collect::<Vec<_>>());
    assert!(by_label.cell_list_for(&id(0), Some(list.version)).is_none(), "unchanged: not sent again");
    assert_eq!(by_label.cell_list_for(&id(2), None).as_deref(), Some(&*list));
    let cell = by_label.cell_of_node(&id(0)).expect("a cell");
    assert_ne!(Some(cell), by_label.cell_of_node(&id(1)));
    for c in 0..20u32 {
        let home = by_label.cell_home(cell, &ChunkHash::of(&c.to_be_bytes())).expect("a home");
        assert!(members.contains(&home));
    }
}

#[test]
fn with_the_refresher_running_resolves_keep_an_aged_snapshot_but_not_a_changed_node_set() {
    let clock = Clock::manual(10_000_000);
    let r = Registry::new(Duration::from_secs(3), 8, HashSet::new()).with_clock(clock.clone());
    let now = 10_000_000;
    r.register(id(1), reg(), now, now).expect("register");
    r.refresh_snapshots();
    assert_eq!(r.snapshot().nodes.len(), 1);
    // Node 1 falls silent past its timeout: only the snapshot's age calls for a rebuild.
    clock.advance(Duration::from_secs(4));
    assert_eq!(r.snapshot().nodes.len(), 1, "an aged snapshot serves while the refresher runs");
    r.refresh_snapshots();
    assert!(r.snapshot().nodes.is_empty(), "the refresher rebuilt it");
    // A new node changes the node set: the next resolve builds at once.
    r.register(id(2), reg(), now + 4_000, now + 4_000).expect("register");
    assert_eq!(r.snapshot().nodes.len(), 1);
    // A refresher that stopped: past AGED_LIMIT a resolve builds the snapshot itself.
    clock.advance(AGED_LIMIT + Duration::from_secs(1));
    assert!(r.snapshot().nodes.is_empty(), "a snapshot older than AGED_LIMIT is not served");
}
