//! Failure paths, driven through the failure-injecting memory datapath.
use lb_common::ServiceKey;

use super::{
    tests::{assert_readable, backends_of, be, desired, fe, master, svc},
    *,
};
use crate::datapath::{
    MemoryDatapath,
    memory::{Call, Op, OpKind},
};

/// What the reconciler believes matches the maps: every complete frontend
/// has its master (count and id) and every recorded slot, and the maps are
/// readable.
pub(super) fn assert_consistent(r: &Reconciler<MemoryDatapath>) {
    let state = &r.datapath().state;
    for (f, inst) in r.installed() {
        for (i, id) in inst.slots.iter().enumerate() {
            let v = state.services.get(&frontend_key(f, i as u16 + 1));
            assert_eq!(
                v.map(|v| (v.backend_id, v.svc_id)),
                Some((*id, inst.svc_id)),
                "{f} slot {}",
                i + 1
            );
        }
        if inst.complete {
            let m = master(state, f).unwrap_or_else(|| panic!("{f} complete without a master"));
            assert_eq!((m.count, m.svc_id), (inst.count, inst.svc_id), "{f}");
        }
    }
    assert_readable(state);
}

fn two_services() -> (Reconciler<MemoryDatapath>, DesiredState) {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let d = desired(&[
        (fe(1), "web", vec![be(1, 80), be(2, 80)]),
        (fe(2), "api", vec![be(3, 80)]),
    ]);
    assert!(r.apply(&d, Prune::Yes).errors.is_empty());
    (r, d)
}

/// A removal that fails at any of its steps is reported with the service's
/// name, never panics, leaves no complete frontend without a master, and is
/// finished by the next apply.
#[test]
fn a_failed_removal_is_reported_and_resumed() {
    let steps: [(&str, OpKind, usize); 4] = [
        ("master", OpKind::DeleteService, 1),
        ("first slot", OpKind::DeleteService, 2),
        ("last slot", OpKind::DeleteService, 3),
        ("meta", OpKind::DeleteMeta, 1),
    ];
    for (step, kind, nth) in steps {
        let (mut r, _) = two_services();
        let only_api = desired(&[(fe(2), "api", vec![be(3, 80)])]);
        r.datapath_mut().fail_nth(kind, nth);
        let report = r.apply(&only_api, Prune::Yes);
        assert_eq!(report.errors.len(), 1, "{step}: {:?}", report.errors);
        let e = &report.errors[0];
        assert_eq!(
            (e.namespace.as_str(), e.name.as_str(), e.frontend),
            ("default", "web", fe(1)),
            "{step}"
        );
        assert!(r.installed().contains_key(&fe(1)), "{step}: retried later");
        assert_consistent(&r);
        assert_eq!(backends_of(&r.datapath().state, &fe(2)), vec![be(3, 80)]);

        let report = r.apply(&only_api, Prune::Yes);
        assert!(report.errors.is_empty(), "{step}: {:?}", report.errors);
        assert!(!r.installed().contains_key(&fe(1)));
        let state = &r.datapath().state;
        assert!(master(state, &fe(1)).is_none());
        assert_eq!(state.services.len(), 2, "{step}: {:?}", state.services);
        assert_eq!(state.meta.len(), 1, "{step}");
        assert_eq!(state.backends.len(), 1, "{step}");
        assert_consistent(&r);
    }
}

/// The same through `apply_changes`, and the frontend coming back after a
/// half-done removal gets its master again.
#[test]
fn a_half_removed_frontend_that_comes_back_is_complete_again() {
    let (mut r, d) = two_services();
    let web_id = r.installed()[&fe(1)].svc_id;
    r.datapath_mut()
        .fail_when(move |c| matches!(c, Call::DeleteMeta(id) if *id == web_id));
    let gone = BTreeMap::from([(fe(1), None)]);
    let report = r.apply_changes(&gone, Prune::Yes);
    assert_eq!(report.errors.len(), 1);
    assert!(report.errors[0].to_string().contains("default/web"));
    assert!(!r.installed()[&fe(1)].complete);
    // Still failing: reported again, no panic.
    let report = r.apply_changes(&gone, Prune::Yes);
    assert_eq!(report.errors.len(), 1);
    r.datapath_mut().clear_faults();
    let back = BTreeMap::from([(fe(1), d.get(&fe(1)).cloned())]);
    let report = r.apply_changes(&back, Prune::Yes);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(r.installed()[&fe(1)].complete);
    assert_eq!(r.installed()[&fe(1)].svc_id, web_id);
    assert_eq!(
        backends_of(&r.datapath().state, &fe(1)),
        vec![be(1, 80), be(2, 80)]
    );
    assert!(r.datapath().state.meta.contains_key(&web_id));
    assert_consistent(&r);
}

/// Any single failing write or delete, at any point of a churn sequence,
/// leaves the reconciler's record equal to the maps; the next apply heals.
#[test]
fn any_single_failure_leaves_a_consistent_state() {
    let kinds = [
        OpKind::PutBackend,
        OpKind::DeleteBackend,
        OpKind::PutService,
        OpKind::DeleteService,
        OpKind::PutMeta,
        OpKind::DeleteMeta,
    ];
    let rounds = [
        desired(&[
            (fe(1), "a", vec![be(1, 80), be(2, 80), be(3, 80)]),
            (fe(2), "b", vec![be(3, 80)]),
        ]),
        desired(&[
            (fe(1), "a", vec![be(2, 80)]),
            (fe(3), "c", vec![be(4, 80), be(5, 80)]),
        ]),
        desired(&[(fe(3), "c2", vec![be(5, 80), be(6, 80), be(1, 80)])]),
        desired(&[]),
    ];
    for kind in kinds {
        for nth in 1..=6 {
            let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
            r.datapath_mut().fail_nth(kind, nth);
            for d in &rounds {
                r.apply(d, Prune::Yes);
                assert_consistent(&r);
                // The next apply heals whatever the failure left.
                let report = r.apply(d, Prune::Yes);
                assert!(report.errors.is_empty(), "{kind:?} #{nth}");
                assert!(report.other_errors.is_empty(), "{kind:?} #{nth}");
                let state = &r.datapath().state;
                for (f, want) in d {
                    assert_eq!(backends_of(state, f), want.backends, "{kind:?} #{nth}");
                }
                let masters: Vec<&ServiceKey> =
                    state.services.keys().filter(|k| k.slot == 0).collect();
                assert_eq!(masters.len(), d.len(), "{kind:?} #{nth}");
                assert_eq!(state.meta.len(), d.len(), "{kind:?} #{nth}");
                assert_consistent(&r);
            }
        }
    }
}

/// `n` distinct backend addresses.
fn many_backends(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 | i as u32);
            SocketAddr::from((ip, 8080))
        })
        .collect()
}

fn one(f: Frontend, name: &str, backends: Vec<SocketAddr>) -> DesiredState {
    let mut backends = backends;
    backends.sort();
    DesiredState::from([(
        f,
        DesiredService {
            service: svc(name),
            backends,
        },
    )])
}

/// One backend past `MAX_SLOTS` refuses the frontend with nothing written;
/// exactly `MAX_SLOTS` is installed whole.
#[test]
fn more_backends_than_slots_are_refused_whole() {
    let max = usize::from(lb_common::MAX_SLOTS);
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let report = r.apply(&one(fe(1), "huge", many_backends(max + 1)), Prune::Yes);
    assert_eq!(report.errors.len(), 1);
    let e = &report.errors[0];
    assert_eq!(e.name, "huge");
    assert!(
        matches!(e.source, DatapathError::TooManyBackends { backends, max: m }
            if backends == max + 1 && m == lb_common::MAX_SLOTS),
        "{e}"
    );
    assert!(e.to_string().contains("65536 backends"), "{e}");
    assert!(r.datapath().log.is_empty(), "nothing written");
    assert!(r.installed().is_empty());

    let exact = many_backends(max);
    let report = r.apply(&one(fe(1), "huge", exact.clone()), Prune::Yes);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let state = &r.datapath().state;
    assert_eq!(master(state, &fe(1)).unwrap().count, lb_common::MAX_SLOTS);
    assert_eq!(state.services.len(), max + 1);
    assert_eq!(state.backends.len(), max);
    assert_consistent(&r);

    // Growing an installed frontend past the limit keeps what it had.
    let writes = r.datapath().log.len();
    let report = r.apply(&one(fe(1), "huge", many_backends(max + 1)), Prune::Yes);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(r.datapath().log.len(), writes, "nothing written");
    assert_eq!(
        master(&r.datapath().state, &fe(1)).unwrap().count,
        lb_common::MAX_SLOTS
    );

    // Before the sources are complete, kept backends count too: one new
    // backend on top of a full frontend writes no slot.
    let mut other = many_backends(max + 1);
    let extra = other.pop().unwrap();
    let report = r.apply(&one(fe(1), "huge", vec![extra]), Prune::No);
    assert_eq!(report.errors.len(), 1);
    assert!(matches!(
        report.errors[0].source,
        DatapathError::TooManyBackends { .. }
    ));
    assert!(
        r.datapath().log[writes..]
            .iter()
            .all(|op| !matches!(op, Op::PutService(..))),
        "no slot or master written"
    );
    assert_consistent(&r);
    // Once complete, the same input shrinks to the one backend.
    let report = r.apply(&one(fe(1), "huge", vec![extra]), Prune::Yes);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(backends_of(&r.datapath().state, &fe(1)), vec![extra]);
    assert_eq!(r.datapath().state.backends.len(), 1);
}
