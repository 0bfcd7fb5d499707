use std::net::Ipv4Addr;

use lb_common::ServiceValue;

use super::*;
use crate::{
    datapath::{MemoryDatapath, Snapshot, memory::Op},
    model::{FrontendKind, Proto, ServiceType, frontend},
};

pub(super) fn svc(name: &str) -> ServiceRef {
    ServiceRef {
        namespace: "default".into(),
        name: name.into(),
        port_name: Default::default(),
        svc_type: ServiceType::ClusterIP,
        frontend: Default::default(),
    }
}

pub(super) fn be(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 244, 0, last), port))
}

pub(super) fn fe(last: u8) -> Frontend {
    frontend(Ipv4Addr::new(10, 96, 0, last), 80, Proto::Tcp)
}

pub(super) fn desired(entries: &[(Frontend, &str, Vec<SocketAddr>)]) -> DesiredState {
    entries
        .iter()
        .map(|(f, name, backends)| {
            let mut backends = backends.clone();
            backends.sort();
            backends.dedup();
            (
                *f,
                DesiredService {
                    service: svc(name),
                    backends,
                    affinity: 0,
                    spared: vec![],
                },
            )
        })
        .collect()
}

/// What a connect() could observe: every master's range lies in slots that
/// were written.
pub(super) fn assert_readable(state: &Snapshot) {
    for (key, master) in &state.services {
        for i in 0..u32::from(master.count) {
            assert!(
                state.backends.contains_key(&(master.base + i)),
                "master {key:?} ({master:?}) reaches unwritten slot {}",
                master.base + i
            );
        }
    }
}

/// Replays the write log from `start`, checking readability after every
/// op. (Overwriting a slot a reader may hold is refused by the memory
/// datapath itself, see `MemoryDatapath::live_slot_writes`.)
pub(super) fn replay_checked(start: &Snapshot, log: &[Op]) {
    let mut state = start.clone();
    for op in log {
        match op {
            Op::PutBackends(base, n) => {
                for i in *base..base + n {
                    state.backends.entry(i).or_insert(lb_common::Backend {
                        proto: 6,
                        ..Default::default()
                    });
                }
            }
            Op::PutService(k, v) => {
                state.services.insert(*k, *v);
            }
            Op::DeleteService(k) => {
                state.services.remove(k);
            }
            Op::Grace | Op::PutMeta(_) | Op::DeleteMeta(_) => {}
        }
        assert_readable(&state);
    }
}

pub(super) fn master(state: &Snapshot, f: &Frontend) -> Option<ServiceValue> {
    state.services.get(&frontend_key(f)).copied()
}

/// The backends a connect() to `f` can reach, sorted.
pub(super) fn backends_of(state: &Snapshot, f: &Frontend) -> Vec<SocketAddr> {
    let m = master(state, f).expect("master");
    let mut out: Vec<_> = (0..u32::from(m.count))
        .map(|i| backend_addr(&state.backends[&(m.base + i)]))
        .collect();
    out.sort();
    out
}

fn kinds(log: &[Op]) -> Vec<&'static str> {
    log.iter()
        .map(|op| match op {
            Op::PutBackends(..) => "range",
            Op::Grace => "grace",
            Op::PutService(..) => "master",
            Op::DeleteService(_) => "delete master",
            Op::PutMeta(_) => "meta",
            Op::DeleteMeta(_) => "delete meta",
        })
        .collect()
}

#[test]
fn new_service_writes_its_range_then_meta_then_master() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let d = desired(&[(fe(1), "web", vec![be(1, 80), be(2, 80)])]);
    let report = r.apply(&d, Prune::Yes);
    assert!(report.errors.is_empty());
    // Adopted space may have been released by a previous agent an instant
    // ago: one grace period before the first range.
    assert_eq!(
        kinds(&r.datapath().log),
        ["grace", "range", "meta", "master"]
    );
    assert_eq!(r.datapath().log[1], Op::PutBackends(0, 2), "one batch");
    let state = &r.datapath().state;
    assert_eq!(backends_of(state, &fe(1)), vec![be(1, 80), be(2, 80)]);
    assert_eq!(state.services.len(), 1, "one entry per frontend");
}

/// A change never writes the live range: a new range, then the master.
#[test]
fn a_change_writes_a_new_range_and_switches_the_master() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let d = desired(&[(fe(1), "web", vec![be(1, 80), be(2, 80), be(3, 80)])]);
    r.apply(&d, Prune::Yes);
    let old = master(&r.datapath().state, &fe(1)).unwrap();
    let start = r.datapath().log.len();
    let d = desired(&[(fe(1), "web", vec![be(1, 80), be(3, 80)])]);
    assert!(r.apply(&d, Prune::Yes).errors.is_empty());
    let log = &r.datapath().log[start..];
    assert_eq!(kinds(log), ["range", "master"]);
    let new = master(&r.datapath().state, &fe(1)).unwrap();
    assert_eq!((new.count, new.svc_id), (2, old.svc_id));
    assert!(new.base >= old.base + 3, "{new:?} overlaps {old:?}");
    assert_eq!(
        backends_of(&r.datapath().state, &fe(1)),
        vec![be(1, 80), be(3, 80)]
    );
    assert_eq!(r.datapath().live_slot_writes, 0);
}

/// With the array nearly full, released ranges are reused, but only after
/// a grace period.
#[test]
fn released_ranges_are_reused_after_a_grace_period() {
    let mut r = Reconciler::adopt(MemoryDatapath::with_limits(16, 6)).unwrap();
    for round in 0..5u8 {
        let d = desired(&[
            (fe(1), "a", vec![be(round, 80), be(round + 1, 80)]),
            (fe(2), "b", vec![be(round + 10, 80)]),
        ]);
        let report = r.apply(&d, Prune::Yes);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            backends_of(&r.datapath().state, &fe(1)),
            vec![be(round, 80), be(round + 1, 80)]
        );
    }
    let dp = r.datapath();
    assert!(dp.log.contains(&Op::Grace), "{:?}", dp.log);
    assert_eq!(dp.live_slot_writes, 0);
    assert_readable(&dp.state);
}

/// A reader at any point of a long random sequence of changes finds every
/// slot its master reaches written, and no write hits a slot it may hold.
#[test]
fn every_intermediate_state_is_readable_under_churn() {
    let mut r = Reconciler::adopt(MemoryDatapath::with_limits(64, 48)).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..300 {
        let mut entries = Vec::new();
        for f in 1..=6u8 {
            if next() % 5 == 0 {
                continue;
            }
            let n = next() % 7;
            let backends = (0..n).map(|_| be((next() % 20) as u8, 80)).collect();
            entries.push((fe(f), "svc", backends));
        }
        let before = r.datapath().state.clone();
        let start = r.datapath().log.len();
        let report = r.apply(&desired(&entries), Prune::Yes);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        replay_checked(&before, &r.datapath().log[start..]);
    }
    assert_eq!(r.datapath().live_slot_writes, 0);
}

#[test]
fn adoption_keeps_ids_and_writes_nothing_for_the_same_state() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let d = desired(&[
        (fe(1), "web", vec![be(1, 80), be(2, 80)]),
        (fe(2), "api", vec![be(2, 80)]),
    ]);
    r.apply(&d, Prune::Yes);
    let ids: Vec<u32> = r.installed().values().map(|i| i.svc_id).collect();
    let mut dp = r.datapath().clone();
    dp.log.clear();
    let mut r = Reconciler::adopt(dp).unwrap();
    let again: Vec<u32> = r.installed().values().map(|i| i.svc_id).collect();
    assert_eq!(ids, again);
    let report = r.apply(&d, Prune::Yes);
    assert_eq!((report.writes, report.deletes), (0, 0));
    assert!(r.datapath().log.is_empty());
}

#[test]
fn no_prune_neither_removes_nor_shrinks() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let d = desired(&[
        (fe(1), "web", vec![be(1, 80), be(2, 80)]),
        (fe(2), "api", vec![be(3, 80)]),
    ]);
    r.apply(&d, Prune::Yes);
    let d2 = desired(&[(fe(1), "web", vec![be(2, 80), be(4, 80)])]);
    let report = r.apply(&d2, Prune::No);
    assert!(report.errors.is_empty());
    let state = &r.datapath().state;
    assert_eq!(
        backends_of(state, &fe(1)),
        vec![be(1, 80), be(2, 80), be(4, 80)]
    );
    assert_eq!(backends_of(state, &fe(2)), vec![be(3, 80)]);
    r.apply(&d2, Prune::Yes);
    let state = &r.datapath().state;
    assert_eq!(backends_of(state, &fe(1)), vec![be(2, 80), be(4, 80)]);
    assert!(master(state, &fe(2)).is_none());
}

#[test]
fn zero_backends_is_a_master_with_count_zero() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    r.apply(&desired(&[(fe(1), "web", vec![])]), Prune::Yes);
    let m = master(&r.datapath().state, &fe(1)).unwrap();
    assert_eq!(m.count, 0);
    assert!(
        !r.datapath()
            .log
            .iter()
            .any(|op| matches!(op, Op::PutBackends(..)))
    );
}

#[test]
fn a_full_meta_map_names_max_frontends() {
    let mut dp = MemoryDatapath::default();
    dp.max_frontends = 1;
    let mut r = Reconciler::adopt(dp).unwrap();
    let d = desired(&[(fe(1), "a", vec![be(1, 80)]), (fe(2), "b", vec![be(2, 80)])]);
    let report = r.apply(&d, Prune::Yes);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].name, "b");
    assert!(
        report.errors[0].to_string().contains("--max-frontends"),
        "{}",
        report.errors[0]
    );
    assert!(master(&r.datapath().state, &fe(2)).is_none());
}

/// A full array or service map fails that service only, never half-visible,
/// naming the flag to raise; its range is not leaked.
#[test]
fn full_maps_fail_one_service_and_keep_the_others() {
    let mut r = Reconciler::adopt(MemoryDatapath::with_limits(2, 4)).unwrap();
    let d = desired(&[
        (fe(1), "a", vec![be(1, 80), be(2, 80), be(3, 80)]),
        (fe(2), "big", vec![be(4, 80), be(5, 80)]),
    ]);
    let report = r.apply(&d, Prune::Yes);
    assert_eq!(report.map_full(), 1);
    assert_eq!(report.errors[0].name, "big");
    assert!(report.errors[0].to_string().contains("--max-backends"));
    let state = &r.datapath().state;
    assert!(master(state, &fe(2)).is_none());
    assert_eq!(backends_of(state, &fe(1)).len(), 3);

    let d = desired(&[
        (fe(1), "a", vec![be(1, 80)]),
        (fe(2), "b", vec![be(4, 80)]),
        (fe(3), "c", vec![be(5, 80)]),
    ]);
    let report = r.apply(&d, Prune::Yes);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert_eq!(report.errors[0].name, "c");
    assert!(report.errors[0].to_string().contains("--max-services"));
    let state = &r.datapath().state;
    assert_eq!(backends_of(state, &fe(2)), vec![be(4, 80)]);
    assert_eq!(r.datapath().live_slot_writes, 0);
}

#[test]
fn a_backend_shared_by_two_services_survives_removal_of_one() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let d = desired(&[(fe(1), "a", vec![be(1, 80)]), (fe(2), "b", vec![be(1, 80)])]);
    r.apply(&d, Prune::Yes);
    r.apply(&desired(&[(fe(2), "b", vec![be(1, 80)])]), Prune::Yes);
    assert_eq!(backends_of(&r.datapath().state, &fe(2)), vec![be(1, 80)]);
}

fn with_affinity(mut d: DesiredState, fe: &Frontend, secs: u32) -> DesiredState {
    if let Some(w) = d.get_mut(fe) {
        w.affinity = secs;
    }
    d
}

/// An entry the programs would have written for a client of `svc_id`.
fn client_of(dp: &mut MemoryDatapath, netns: u64, svc_id: u32) {
    dp.affinity.insert(
        lb_common::AffinityKey::new(netns, svc_id),
        lb_common::AffinityValue::default(),
    );
}

fn affinity_ids(dp: &MemoryDatapath) -> Vec<u32> {
    dp.affinity.keys().map(|k| k.svc_id).collect()
}

/// Affinity is in the master; a change of affinity alone rewrites the
/// master over the same range, and turning it off sweeps the service's
/// entries, not those of another service.
#[test]
fn affinity_is_in_the_master_and_turning_it_off_sweeps_its_entries() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let d = desired(&[
        (fe(1), "web", vec![be(1, 80), be(2, 80)]),
        (fe(2), "api", vec![be(3, 80)]),
    ]);
    let d = with_affinity(with_affinity(d, &fe(1), 10800), &fe(2), 60);
    assert!(r.apply(&d, Prune::Yes).errors.is_empty());
    let m1 = master(&r.datapath().state, &fe(1)).unwrap();
    let m2 = master(&r.datapath().state, &fe(2)).unwrap();
    assert_eq!((m1.affinity, m2.affinity), (10800, 60));
    client_of(r.datapath_mut(), 7, m1.svc_id);
    client_of(r.datapath_mut(), 8, m1.svc_id);
    client_of(r.datapath_mut(), 7, m2.svc_id);

    // Same backends, shorter timeout: one master write, same range, entries kept.
    let start = r.datapath().log.len();
    let d2 = with_affinity(d.clone(), &fe(1), 5);
    assert!(r.apply(&d2, Prune::Yes).errors.is_empty());
    assert_eq!(kinds(&r.datapath().log[start..]), ["master"]);
    let m = master(&r.datapath().state, &fe(1)).unwrap();
    assert_eq!((m.base, m.count, m.affinity), (m1.base, m1.count, 5));
    assert_eq!(affinity_ids(r.datapath()).len(), 3);
    // Applying the same again writes nothing.
    let start = r.datapath().log.len();
    r.apply(&d2, Prune::Yes);
    assert_eq!(r.datapath().log.len(), start);

    // Off: its entries go, the other service's stay.
    let d3 = with_affinity(d2, &fe(1), 0);
    let report = r.apply(&d3, Prune::Yes);
    assert!(report.errors.is_empty());
    assert_eq!(master(&r.datapath().state, &fe(1)).unwrap().affinity, 0);
    assert_eq!(affinity_ids(r.datapath()), vec![m2.svc_id]);

    // Deleting the other service takes its entries with it.
    let d4: DesiredState = d3.into_iter().filter(|(f, _)| *f == fe(1)).collect();
    assert!(r.apply(&d4, Prune::Yes).errors.is_empty());
    assert!(r.datapath().affinity.is_empty());
}

/// A restarted agent reads affinity back from the masters, keeps the
/// entries of services that still have it and sweeps those of ids no
/// frontend has (a previous agent stopped before its sweep).
#[test]
fn adoption_keeps_affinity_and_sweeps_entries_of_unknown_ids() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let d = with_affinity(desired(&[(fe(1), "web", vec![be(1, 80)])]), &fe(1), 30);
    r.apply(&d, Prune::Yes);
    let id = master(&r.datapath().state, &fe(1)).unwrap().svc_id;
    let mut dp = r.datapath().clone();
    client_of(&mut dp, 1, id);
    client_of(&mut dp, 1, id + 100);

    let mut r = Reconciler::adopt(dp).unwrap();
    assert_eq!(r.installed()[&fe(1)].affinity, 30);
    // Still syncing: nothing is swept yet.
    r.apply(&d, Prune::No);
    assert_eq!(affinity_ids(r.datapath()).len(), 2);
    let start = r.datapath().log.len();
    r.apply(&d, Prune::Yes);
    assert_eq!(r.datapath().log.len(), start, "the master is up to date");
    assert_eq!(affinity_ids(r.datapath()), vec![id]);
}

#[test]
fn packing_keeps_every_record_in_order() {
    for n in [0usize, 1, 2, 3, 11, 12, 1000] {
        let mut map: BTreeMap<u32, u32> = (0..n as u32).map(|k| (k * 3, k)).collect();
        let before: Vec<(u32, u32)> = map.iter().map(|(k, v)| (*k, *v)).collect();
        pack(&mut map);
        let after: Vec<(u32, u32)> = map.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(after, before, "n = {n}");
        assert_eq!(map.len(), n);
    }
}

/// A full pass of many parts (each a separate apply, in key order) leaves
/// the records and the maps exactly as one apply would.
#[test]
fn records_packed_between_parts_match_the_maps() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let all: Vec<(Frontend, String, Vec<SocketAddr>)> = (0..3000u32)
        .map(|i| {
            let fe = frontend(Ipv4Addr::from(0x0a60_0000 + i), 80, Proto::Tcp);
            (fe, format!("s{i}"), vec![be((i % 250) as u8 + 1, 80)])
        })
        .collect();
    for part in all.chunks(100) {
        let entries: Vec<(Frontend, &str, Vec<SocketAddr>)> = part
            .iter()
            .map(|(f, n, b)| (*f, n.as_str(), b.clone()))
            .collect();
        let report = r.apply(&desired(&entries), Prune::No);
        assert!(report.errors.is_empty());
    }
    assert_eq!(r.installed().len(), all.len());
    for (fe, name, backends) in &all {
        let inst = &r.installed()[fe];
        assert_eq!(inst.service.name, name.as_str());
        assert_eq!(inst.backends.to_vec(), *backends);
    }
    let again = Reconciler::adopt(r.dp.clone()).unwrap();
    assert_eq!(again.installed(), r.installed());
}

/// A node-address frontend's master is flagged for bind protection, and
/// only its; a frontend that becomes one (or stops being one) gets its
/// master rewritten on the same range, and so does an adopted master that
/// lacks the flag (written by an agent before bind protection).
#[test]
fn node_port_masters_are_flagged_for_bind_protection() {
    use lb_common::SVC_FLAG_NODE_PORT;
    let node = frontend(Ipv4Addr::new(10, 250, 0, 1), 30080, Proto::Tcp);
    let with_kind = |mut d: DesiredState, fe: &Frontend, kind: FrontendKind| {
        d.get_mut(fe).unwrap().service.frontend = kind;
        d
    };
    let both = || {
        desired(&[
            (fe(1), "web", vec![be(1, 80)]),
            (node, "web", vec![be(1, 80)]),
        ])
    };
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let d = with_kind(both(), &node, FrontendKind::NodePort);
    assert!(r.apply(&d, Prune::Yes).errors.is_empty());
    let flags = |r: &Reconciler<MemoryDatapath>, f: &Frontend| {
        master(&r.datapath().state, f).unwrap().flags
    };
    assert_eq!(flags(&r, &node), SVC_FLAG_NODE_PORT);
    assert_eq!(flags(&r, &fe(1)), 0);

    // The same address as an external IP: rewritten, same range.
    let before = master(&r.datapath().state, &node).unwrap();
    let start = r.datapath().log.len();
    let d = with_kind(both(), &node, FrontendKind::ExternalIP);
    assert!(r.apply(&d, Prune::Yes).errors.is_empty());
    assert_eq!(kinds(&r.datapath().log[start..]), ["meta", "master"]);
    let after = master(&r.datapath().state, &node).unwrap();
    assert_eq!((after.base, after.flags), (before.base, 0));

    // Adopted without the flag (an older agent's master): put back.
    let d = with_kind(both(), &node, FrontendKind::NodePort);
    assert!(r.apply(&d, Prune::Yes).errors.is_empty());
    let mut dp = r.datapath().clone();
    let key = crate::datapath::frontend_key(&node);
    let unflagged = dp.state.services[&key].with_flags(0);
    dp.state.services.insert(key, unflagged);
    dp.log.clear();
    let mut r = Reconciler::adopt(dp).unwrap();
    assert!(r.apply(&d, Prune::Yes).errors.is_empty());
    assert_eq!(kinds(&r.datapath().log), ["master"]);
    assert_eq!(flags(&r, &node), SVC_FLAG_NODE_PORT);
}
