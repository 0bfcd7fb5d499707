//! `repair`: drift put back in make-before-break order.
use std::collections::BTreeSet;

use lb_common::{ServiceKey, ServiceValue};

use super::{
    error_tests::assert_consistent,
    tests::{be, desired, fe},
    *,
};
use crate::datapath::{
    MemoryDatapath, Snapshot, encode_backend, encode_meta,
    memory::{Call, Op, OpKind},
};

/// Masters a connect() could find broken: a slot within the count, or
/// the backend it names, missing.
pub(super) fn broken(state: &Snapshot) -> BTreeSet<ServiceKey> {
    state
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .filter(|(k, m)| {
            (1..=m.count).any(|slot| {
                state
                    .services
                    .get(&ServiceKey { slot, ..**k })
                    .is_none_or(|v| !state.backends.contains_key(&v.backend_id))
            })
        })
        .map(|(k, _)| *k)
        .collect()
}

/// Replays `log` from `start`: no write may break a master that was not
/// broken before it (drift may have broken some already).
pub(super) fn replay_never_breaks(start: &Snapshot, log: &[Op], values: &Snapshot) {
    let mut state = start.clone();
    let mut was = broken(&state);
    for op in log {
        match op {
            Op::PutBackend(id) => {
                state
                    .backends
                    .insert(*id, values.backends.get(id).copied().unwrap_or_default());
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
        let now = broken(&state);
        assert!(
            now.is_subset(&was),
            "{op:?} broke {:?}",
            now.difference(&was)
        );
        was = now;
    }
}

fn installed_pair() -> Reconciler<MemoryDatapath> {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let d = desired(&[
        (fe(1), "web", vec![be(1, 80), be(2, 80)]),
        (fe(2), "api", vec![be(3, 80), be(4, 80)]),
    ]);
    assert!(r.apply(&d, Prune::Yes).errors.is_empty());
    r
}

fn key(f: u8, slot: u16) -> ServiceKey {
    frontend_key(&fe(f), slot)
}

/// One of each kind of drift, all put back, with a count of each.
fn drift(state: &mut Snapshot, r: &Reconciler<MemoryDatapath>) {
    let api = r.installed()[&fe(2)].svc_id;
    let b1 = state.services[&key(1, 1)].backend_id;
    state.services.remove(&key(1, 0)); // a master
    state.services.remove(&key(2, 1)); // a slot within the count
    state
        .backends
        .insert(b1, encode_backend(be(99, 80), Proto::Tcp)); // a backend changed
    state.meta.remove(&api); // a meta entry
    // Strays: a frontend the agent does not own, a slot past fe(1)'s,
    // a meta entry and a backend of nothing.
    state
        .services
        .insert(key(7, 0), ServiceValue::master(1, 700));
    state
        .services
        .insert(key(7, 1), ServiceValue::slot(555, 700));
    state.services.insert(key(1, 3), ServiceValue::slot(b1, 1));
    state
        .meta
        .insert(700, encode_meta(&fe(7), &tests::svc("stray")));
    state
        .backends
        .insert(555, encode_backend(be(55, 80), Proto::Tcp));
}

#[test]
fn repair_puts_back_every_kind_of_drift() {
    let mut r = installed_pair();
    let good = r.datapath().state.clone();
    let mut drifted = good.clone();
    drift(&mut drifted, &r);
    r.datapath_mut().state = drifted.clone();
    let start = r.datapath().log.len();

    let report = r.repair();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        (
            report.backends,
            report.slots,
            report.meta,
            report.masters,
            report.deleted
        ),
        (1, 1, 1, 1, 5),
        "{report}"
    );
    assert_eq!(report.repaired, 9);
    assert!(
        report.to_string().starts_with("repaired 9 entries"),
        "{report}"
    );
    assert_eq!(r.datapath().state, good);
    replay_never_breaks(&drifted, &r.datapath().log[start..], &good);
    assert_consistent(&r);

    // Nothing left to do: no write at all.
    let start = r.datapath().log.len();
    let report = r.repair();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.to_string(), "maps match");
    assert_eq!(r.datapath().log.len(), start);
    // And the next apply of the same state writes nothing either.
    let d = desired(&[
        (fe(1), "web", vec![be(1, 80), be(2, 80)]),
        (fe(2), "api", vec![be(3, 80), be(4, 80)]),
    ]);
    let report = r.apply(&d, Prune::Yes);
    assert_eq!((report.writes, report.deletes), (0, 0));
}

/// A frontend whose rewrite fails is reported by name, keeps its extra
/// entries, and does not stop the others; the next repair finishes.
#[test]
fn a_failed_repair_is_reported_and_retried() {
    let mut r = installed_pair();
    let good = r.datapath().state.clone();
    let mut drifted = good.clone();
    drift(&mut drifted, &r);
    r.datapath_mut().state = drifted;
    let master1 = key(1, 0);
    r.datapath_mut()
        .fail_when(move |c| matches!(c, Call::PutService(k, _) if **k == master1));
    let report = r.repair();
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    let e = report.errors[0].to_string();
    assert!(e.contains("service default/web (10.96.0.1:80/TCP)"), "{e}");
    assert!(report.to_string().ends_with(", 1 errors"), "{report}");
    // fe(1)'s slot past its slots stays until its master is right.
    assert!(r.datapath().state.services.contains_key(&key(1, 3)));
    assert!(!r.datapath().state.services.contains_key(&key(7, 0)));
    assert_eq!(
        r.datapath().state.services.get(&key(2, 1)),
        good.services.get(&key(2, 1))
    );

    r.datapath_mut().clear_faults();
    let report = r.repair();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!((report.masters, report.deleted), (1, 1), "{report}");
    assert_eq!(r.datapath().state, good);

    // A snapshot that cannot be read: reported, nothing written.
    r.datapath_mut().fail_nth(OpKind::Snapshot, 1);
    let start = r.datapath().log.len();
    let report = r.repair();
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.repaired, 0);
    assert_eq!(r.datapath().log.len(), start);
}

/// A frontend half removed (its meta delete failed) has no master by the
/// reconciler's account: repair deletes one put back by hand and leaves
/// its meta for the removal to finish.
#[test]
fn repair_keeps_a_half_removed_frontend_without_master() {
    let mut r = installed_pair();
    let web = r.installed()[&fe(1)].svc_id;
    r.datapath_mut().fail_all(OpKind::DeleteMeta);
    let only_api = desired(&[(fe(2), "api", vec![be(3, 80), be(4, 80)])]);
    assert_eq!(r.apply(&only_api, Prune::Yes).errors.len(), 1);
    r.datapath_mut().clear_faults();
    let stale = ServiceValue::master(2, web);
    r.datapath_mut().state.services.insert(key(1, 0), stale);

    let report = r.repair();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.deleted, 1, "{report}");
    assert_eq!(report.repaired, 1, "{report}");
    let state = &r.datapath().state;
    assert!(!state.services.contains_key(&key(1, 0)));
    assert!(state.meta.contains_key(&web));
    assert!(broken(state).is_empty());
    // The removal then finishes.
    let report = r.apply(&only_api, Prune::Yes);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(!r.datapath().state.meta.contains_key(&web));
    assert!(r.repair().is_clean());
}

/// Entries adopted as strays and deleted by a repair are forgotten.
#[test]
fn repair_sweeps_adopted_strays() {
    let mut dp = MemoryDatapath::default();
    dp.state
        .services
        .insert(key(3, 1), ServiceValue::slot(31, 3));
    dp.state
        .backends
        .insert(31, encode_backend(be(31, 80), Proto::Tcp));
    dp.state
        .meta
        .insert(3, encode_meta(&fe(3), &tests::svc("gone")));
    let mut r = Reconciler::adopt(dp).unwrap();
    let report = r.repair();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.deleted, 2, "{report}");
    let state = &r.datapath().state;
    assert!(state.services.is_empty() && state.meta.is_empty());
    // The backend the stray named is an orphan of the reconciler's own
    // now: the next pruning apply deletes it, and nothing else.
    let start = r.datapath().log.len();
    let report = r.apply(&DesiredState::new(), Prune::Yes);
    assert!(report.other_errors.is_empty(), "{:?}", report.other_errors);
    assert!(
        r.datapath().log[start..]
            .iter()
            .all(|op| matches!(op, Op::DeleteBackend(31))),
        "{:?}",
        &r.datapath().log[start..]
    );
    assert_eq!(r.datapath().state, Snapshot::default());
}
