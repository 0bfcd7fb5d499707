use std::net::Ipv4Addr;

use lb_common::{ServiceKey, ServiceValue};

use super::*;
use crate::{
    datapath::{MemoryDatapath, Snapshot, encode_backend, memory::Op},
    model::{ServiceType, frontend},
};

pub(super) fn svc(name: &str) -> ServiceRef {
    ServiceRef {
        namespace: "default".into(),
        name: name.into(),
        port_name: String::new(),
        svc_type: ServiceType::ClusterIP,
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
                },
            )
        })
        .collect()
}

/// What a connect() could observe: every master's active slots and their
/// backends must exist, at every point of the write sequence.
pub(super) fn assert_readable(state: &Snapshot) {
    for (key, master) in state.services.iter().filter(|(k, _)| k.slot == 0) {
        for slot in 1..=master.count {
            let k = ServiceKey { slot, ..*key };
            let Some(v) = state.services.get(&k) else {
                panic!(
                    "master {key:?} count {} but slot {slot} missing",
                    master.count
                );
            };
            assert!(
                state.backends.contains_key(&v.backend_id),
                "slot {k:?} points at missing backend {}",
                v.backend_id
            );
        }
    }
}

/// Replays the write log from `start`, checking readability after every op.
pub(super) fn replay_checked(start: &Snapshot, log: &[Op], backends_of: &Snapshot) {
    let mut state = start.clone();
    for op in log {
        match op {
            Op::PutBackend(id) => {
                // Readability needs the key only; the value may be gone by the end.
                state.backends.insert(
                    *id,
                    backends_of.backends.get(id).copied().unwrap_or_default(),
                );
            }
            Op::DeleteBackend(id) => {
                state.backends.remove(id);
            }
            Op::PutService(k, v) => {
                state.services.insert(*k, *v);
            }
            Op::DeleteService(k) => {
                state.services.remove(k);
            }
            Op::PutMeta(_) | Op::DeleteMeta(_) => {}
        }
        assert_readable(&state);
    }
}

pub(super) fn master(state: &Snapshot, f: &Frontend) -> Option<ServiceValue> {
    state.services.get(&frontend_key(f, 0)).copied()
}

pub(super) fn backends_of(state: &Snapshot, f: &Frontend) -> Vec<SocketAddr> {
    let m = master(state, f).expect("master");
    let mut out: Vec<_> = (1..=m.count)
        .map(|s| {
            let v = state.services[&frontend_key(f, s)];
            backend_addr(&state.backends[&v.backend_id])
        })
        .collect();
    out.sort();
    out
}

#[test]
fn new_service_writes_backends_then_slots_then_master() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let d = desired(&[(fe(1), "web", vec![be(1, 80), be(2, 80)])]);
    let report = r.apply(&d, Prune::Yes);
    assert!(report.errors.is_empty());
    let log = &r.datapath().log;
    let kinds: Vec<&str> = log
        .iter()
        .map(|op| match op {
            Op::PutBackend(_) => "backend",
            Op::PutService(k, _) if k.slot == 0 => "master",
            Op::PutService(..) => "slot",
            Op::PutMeta(_) => "meta",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        ["backend", "backend", "slot", "slot", "meta", "master"]
    );
    let state = &r.datapath().state;
    assert_eq!(master(state, &fe(1)).unwrap().count, 2);
    assert_eq!(backends_of(state, &fe(1)), vec![be(1, 80), be(2, 80)]);
}

#[test]
fn shrink_lowers_count_before_deleting_slots_and_orphans_last() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    r.apply(
        &desired(&[(fe(1), "web", vec![be(1, 80), be(2, 80), be(3, 80)])]),
        Prune::Yes,
    );
    let before = r.datapath().state.clone();
    let start = r.datapath().log.len();
    let report = r.apply(&desired(&[(fe(1), "web", vec![be(1, 80)])]), Prune::Yes);
    assert!(report.errors.is_empty());
    let log = r.datapath().log[start..].to_vec();
    let master_pos = log
        .iter()
        .position(|op| matches!(op, Op::PutService(k, _) if k.slot == 0))
        .expect("master rewritten");
    let first_slot_delete = log
        .iter()
        .position(|op| matches!(op, Op::DeleteService(_)))
        .expect("slots deleted");
    let first_backend_delete = log
        .iter()
        .position(|op| matches!(op, Op::DeleteBackend(_)))
        .expect("orphans deleted");
    assert!(master_pos < first_slot_delete);
    assert!(first_slot_delete < first_backend_delete);
    assert!(
        log[first_backend_delete..]
            .iter()
            .all(|op| matches!(op, Op::DeleteBackend(_)))
    );
    replay_checked(&before, &log, &before);
    let state = &r.datapath().state;
    assert_eq!(backends_of(state, &fe(1)), vec![be(1, 80)]);
    assert_eq!(state.backends.len(), 1);
}

#[test]
fn removing_one_backend_rewrites_only_its_slot() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let all: Vec<_> = (1..=10).map(|i| be(i, 80)).collect();
    r.apply(&desired(&[(fe(1), "web", all.clone())]), Prune::Yes);
    let start = r.datapath().log.len();
    let fewer: Vec<_> = all.iter().copied().filter(|b| *b != be(3, 80)).collect();
    r.apply(&desired(&[(fe(1), "web", fewer.clone())]), Prune::Yes);
    let log = &r.datapath().log[start..];
    // slot 3 takes the last backend, master shrinks, slot 10 and the backend go.
    assert_eq!(log.len(), 4, "{log:?}");
    assert_eq!(backends_of(&r.datapath().state, &fe(1)), fewer);
}

#[test]
fn every_intermediate_state_is_readable_under_churn() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _round in 0..200 {
        let mut entries = Vec::new();
        for s in 1..=5u8 {
            if next() % 5 == 0 {
                continue; // service absent this round
            }
            let n = (next() % 6) as u8;
            let backends = (0..n).map(|_| be((next() % 12) as u8 + 1, 80)).collect();
            entries.push((fe(s), "svc", backends));
        }
        let d = desired(&entries);
        let before = r.datapath().state.clone();
        let start = r.datapath().log.len();
        let report = r.apply(&d, Prune::Yes);
        assert!(report.errors.is_empty());
        let after = r.datapath().state.clone();
        // Backend values for replay: anything ever written stays addressable by id.
        let mut all = before.clone();
        all.backends.extend(after.backends.clone());
        replay_checked(&before, &r.datapath().log[start..], &all);
        for (f, want) in &d {
            assert_eq!(backends_of(&after, f), want.backends);
        }
        assert_eq!(
            after.services.keys().filter(|k| k.slot == 0).count(),
            d.len()
        );
        assert_eq!(after.meta.len(), d.len());

        // Drift behind the agent's back, then a repair: back to `after`,
        // and no repair write breaks a master the drift left intact.
        let mut drifted = after.clone();
        for _ in 0..(next() % 4) {
            random_drift(&mut drifted, &mut next);
        }
        r.datapath_mut().state = drifted.clone();
        let start = r.datapath().log.len();
        let report = r.repair();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(r.datapath().state, after, "{report}");
        super::repair_tests::replay_never_breaks(&drifted, &r.datapath().log[start..], &after);
    }
}

/// One random change to the maps, as an operator or another tool might make.
fn random_drift(state: &mut Snapshot, next: &mut impl FnMut() -> u64) {
    let pick = |n: usize, r: u64| (n > 0).then(|| r as usize % n);
    match next() % 7 {
        0 | 1 => {
            if let Some(i) = pick(state.services.len(), next()) {
                let k = *state.services.keys().nth(i).unwrap();
                state.services.remove(&k);
            }
        }
        2 => {
            if let Some(i) = pick(state.backends.len(), next()) {
                let id = *state.backends.keys().nth(i).unwrap();
                if next().is_multiple_of(2) {
                    state.backends.remove(&id);
                } else {
                    state
                        .backends
                        .insert(id, encode_backend(be(200, 1), Proto::Tcp));
                }
            }
        }
        3 => {
            if let Some(i) = pick(state.meta.len(), next()) {
                let id = *state.meta.keys().nth(i).unwrap();
                state.meta.remove(&id);
            }
        }
        4 => {
            if let Some(i) = pick(state.services.len(), next()) {
                let k = *state.services.keys().nth(i).unwrap();
                if let Some(v) = state.services.get_mut(&k) {
                    v.count = v.count.wrapping_add(1);
                    v.backend_id ^= 1 << 20;
                }
            }
        }
        5 => {
            let stray = fe(200);
            state
                .services
                .insert(frontend_key(&stray, 0), ServiceValue::master(2, 900));
            state
                .services
                .insert(frontend_key(&stray, 1), ServiceValue::slot(9_000, 900));
            state.meta.insert(900, encode_meta(&stray, &svc("stray")));
        }
        _ => {
            state
                .backends
                .insert(9_000, encode_backend(be(201, 1), Proto::Tcp));
        }
    }
}

#[test]
fn adoption_keeps_ids_and_writes_nothing_for_the_same_state() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let d = desired(&[
        (fe(1), "web", vec![be(1, 80), be(2, 80)]),
        (fe(2), "api", vec![be(2, 80)]),
        (fe(3), "empty", vec![]),
    ]);
    r.apply(&d, Prune::Yes);
    let mut dp = r.datapath().clone();
    dp.log.clear();
    let mut r2 = Reconciler::adopt(dp).unwrap();
    assert_eq!(r2.installed(), r.installed());
    let report = r2.apply(&d, Prune::Yes);
    assert_eq!((report.writes, report.deletes), (0, 0));
    assert!(r2.datapath().log.is_empty());
    // A new service gets a fresh id, not a recycled one.
    let mut d2 = d.clone();
    d2.extend(desired(&[(fe(4), "new", vec![be(9, 80)])]));
    r2.apply(&d2, Prune::Yes);
    let ids: BTreeSet<u32> = r2.installed().values().map(|i| i.svc_id).collect();
    assert_eq!(ids.len(), 4);
}

#[test]
fn no_prune_neither_removes_nor_shrinks() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    r.apply(
        &desired(&[
            (fe(1), "web", vec![be(1, 80), be(2, 80)]),
            (fe(2), "api", vec![be(3, 80)]),
        ]),
        Prune::Yes,
    );
    let partial = desired(&[(fe(1), "web", vec![be(1, 80), be(4, 80)])]);
    let report = r.apply(&partial, Prune::No);
    assert_eq!(report.deletes, 0);
    let state = &r.datapath().state;
    assert_eq!(
        backends_of(state, &fe(1)),
        vec![be(1, 80), be(2, 80), be(4, 80)]
    );
    assert_eq!(backends_of(state, &fe(2)), vec![be(3, 80)]);
    // Once synced, the same input prunes.
    r.apply(&partial, Prune::Yes);
    let state = &r.datapath().state;
    assert_eq!(backends_of(state, &fe(1)), vec![be(1, 80), be(4, 80)]);
    assert!(master(state, &fe(2)).is_none());
    assert_eq!(state.backends.len(), 2);
}

#[test]
fn zero_backends_is_a_master_with_count_zero() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    r.apply(&desired(&[(fe(1), "web", vec![be(1, 80)])]), Prune::Yes);
    r.apply(&desired(&[(fe(1), "web", vec![])]), Prune::Yes);
    let state = &r.datapath().state;
    assert_eq!(master(state, &fe(1)).unwrap().count, 0);
    assert_eq!(state.services.len(), 1);
    assert!(state.backends.is_empty());
}

/// Names live in a map sized by frontends, not by service-map entries: a
/// full one refuses the next frontend, before its master, and says which
/// flag to raise.
#[test]
fn a_full_meta_map_names_max_frontends() {
    let mut dp = MemoryDatapath::default();
    dp.max_frontends = 1;
    let mut r = Reconciler::adopt(dp).unwrap();
    let d = desired(&[
        (fe(1), "a", vec![be(1, 80), be(2, 80)]),
        (fe(2), "b", vec![be(3, 80)]),
    ]);
    let report = r.apply(&d, Prune::Yes);
    assert_eq!(report.map_full(), 1);
    assert_eq!(report.errors[0].name, "b");
    let msg = report.errors[0].to_string();
    assert!(
        msg.contains("LB_SVC_META") && msg.contains("--max-frontends"),
        "{msg}"
    );
    let state = &r.datapath().state;
    assert!(master(state, &fe(2)).is_none());
    assert_readable(state);
}

#[test]
fn full_map_fails_one_service_and_keeps_the_others() {
    // Room for one master + two slots only.
    let mut r = Reconciler::adopt(MemoryDatapath::with_limits(3, 100)).unwrap();
    let d = desired(&[
        (fe(1), "a", vec![be(1, 80), be(2, 80)]),
        (fe(2), "b", vec![be(3, 80)]),
    ]);
    let report = r.apply(&d, Prune::Yes);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.map_full(), 1);
    assert_eq!(report.errors[0].name, "b");
    assert!(report.errors[0].to_string().contains("full"));
    let state = &r.datapath().state;
    assert_eq!(backends_of(state, &fe(1)), vec![be(1, 80), be(2, 80)]);
    assert!(master(state, &fe(2)).is_none());
    assert_readable(state);
    // The failed service's backend is an orphan and is cleaned up.
    assert_eq!(state.backends.len(), 2);
    // Once room appears (a gets smaller), b is installed on the next apply.
    let d2 = desired(&[(fe(1), "a", vec![]), (fe(2), "b", vec![be(3, 80)])]);
    let report = r.apply(&d2, Prune::Yes);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(backends_of(&r.datapath().state, &fe(2)), vec![be(3, 80)]);
}

#[test]
fn shared_backend_survives_removal_of_one_user() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    r.apply(
        &desired(&[(fe(1), "a", vec![be(1, 80)]), (fe(2), "b", vec![be(1, 80)])]),
        Prune::Yes,
    );
    assert_eq!(r.datapath().state.backends.len(), 1);
    r.apply(&desired(&[(fe(2), "b", vec![be(1, 80)])]), Prune::Yes);
    let state = &r.datapath().state;
    assert_eq!(state.backends.len(), 1);
    assert_eq!(backends_of(state, &fe(2)), vec![be(1, 80)]);
}

#[test]
fn slot_layout_keeps_positions() {
    assert_eq!(slot_layout(&[1, 2, 3], &[1, 2, 3]), vec![1, 2, 3]);
    assert_eq!(slot_layout(&[1, 2, 3], &[1, 3]), vec![1, 3]);
    assert_eq!(slot_layout(&[1, 2, 3], &[3, 4, 1]), vec![1, 4, 3]);
    assert_eq!(slot_layout(&[], &[5, 6]), vec![5, 6]);
    assert_eq!(slot_layout(&[1, 2], &[]), Vec::<u32>::new());
}

/// A slot naming a backend id that has no backend entry (left by another
/// writer) keeps that id out of reuse: a new backend must not be given it.
#[test]
fn adoption_never_reuses_an_id_a_slot_still_names() {
    let mut dp = MemoryDatapath::default();
    let key = crate::datapath::frontend_key(&fe(1), 1);
    dp.state.services.insert(
        crate::datapath::frontend_key(&fe(1), 0),
        ServiceValue::master(1, 1),
    );
    dp.state.services.insert(key, ServiceValue::slot(7, 1));
    let mut r = Reconciler::adopt(dp).unwrap();
    r.apply(&desired(&[(fe(2), "other", vec![be(9, 80)])]), Prune::No);
    let ids: Vec<u32> = r.datapath().state.backends.keys().copied().collect();
    assert_eq!(ids.len(), 1);
    assert!(ids[0] > 7, "new backend got id {}", ids[0]);
}
