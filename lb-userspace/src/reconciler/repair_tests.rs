//! `repair`: drift put back in make-before-break order.
use lb_common::ServiceValue;

use super::{
    error_tests::assert_consistent,
    tests::{backends_of, be, desired, fe, master, replay_checked},
    *,
};
use crate::{
    datapath::{
        MemoryDatapath, encode_backend, encode_meta,
        memory::{Call, OpKind},
    },
    model::Proto,
};

fn installed_pair() -> Reconciler<MemoryDatapath> {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let d = desired(&[
        (fe(1), "web", vec![be(1, 80), be(2, 80)]),
        (fe(2), "api", vec![be(3, 80), be(4, 80)]),
        (fe(3), "db", vec![be(5, 80)]),
    ]);
    assert!(r.apply(&d, Prune::Yes).errors.is_empty());
    r
}

/// One of each kind of drift: a master deleted, a master changed, a
/// backend slot changed, a meta entry deleted, a stray master and a stray
/// meta entry.
fn drift(r: &mut Reconciler<MemoryDatapath>) {
    let api = r.installed()[&fe(2)].svc_id;
    let web_base = r.installed()[&fe(1)].base;
    let state = &mut r.datapath_mut().state;
    state.services.remove(&frontend_key(&fe(1)));
    if let Some(m) = state.services.get_mut(&frontend_key(&fe(3))) {
        m.count = 0;
    }
    state
        .backends
        .insert(web_base + 1, encode_backend(be(99, 80), Proto::Tcp));
    state.meta.remove(&api);
    state
        .services
        .insert(frontend_key(&fe(7)), ServiceValue::new(0, 1, 700));
    state
        .meta
        .insert(700, encode_meta(&fe(7), &tests::svc("stray")));
}

#[test]
fn repair_puts_back_every_kind_of_drift() {
    let mut r = installed_pair();
    let old_web = r.installed()[&fe(1)].base;
    drift(&mut r);
    let before = r.datapath().state.clone();
    let start = r.datapath().log.len();
    let report = r.repair();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // web: a slot drifted, so a new range and its master; db: its master.
    assert_eq!(
        (
            report.backends,
            report.slots,
            report.masters,
            report.meta,
            report.deleted
        ),
        (1, 1, 2, 1, 2),
        "{report}"
    );
    let state = &r.datapath().state;
    assert_eq!(backends_of(state, &fe(1)), vec![be(1, 80), be(2, 80)]);
    assert_ne!(master(state, &fe(1)).unwrap().base, old_web, "a new range");
    assert_eq!(backends_of(state, &fe(3)), vec![be(5, 80)]);
    assert!(!state.services.contains_key(&frontend_key(&fe(7))));
    assert!(!state.meta.contains_key(&700));
    replay_checked(&before, &r.datapath().log[start..]);
    assert_consistent(&r);
    assert!(r.repair().is_clean());
}

#[test]
fn a_failed_repair_is_reported_and_retried() {
    let mut r = installed_pair();
    drift(&mut r);
    r.datapath_mut().fail_all(OpKind::PutService);
    let report = r.repair();
    assert!(!report.errors.is_empty());
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.entry.contains("default/web")),
        "{:?}",
        report.errors
    );
    r.datapath_mut().clear_faults();
    let report = r.repair();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_consistent(&r);
    assert!(r.repair().is_clean());
    r.datapath_mut().fail_nth(OpKind::Snapshot, 1);
    let report = r.repair();
    assert_eq!(report.errors.len(), 1);
    assert!(report.errors[0].entry.contains("snapshot"));
}

/// A half-removed frontend (master deleted, meta delete failed) keeps no
/// master: a master put back behind its back is drift, deleted.
#[test]
fn repair_keeps_a_half_removed_frontend_without_master() {
    let mut r = installed_pair();
    let web = r.installed()[&fe(1)].svc_id;
    r.datapath_mut()
        .fail_when(move |c| matches!(c, Call::DeleteMeta(id) if *id == web));
    let gone = std::collections::BTreeMap::from([(fe(1), None)]);
    assert_eq!(r.apply_changes(&gone, Prune::Yes).errors.len(), 1);
    r.datapath_mut().clear_faults();
    r.datapath_mut()
        .state
        .services
        .insert(frontend_key(&fe(1)), ServiceValue::new(0, 2, web));
    let report = r.repair();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(master(&r.datapath().state, &fe(1)).is_none());
    assert_consistent(&r);
}
