//! Failure paths, driven through the failure-injecting memory datapath.
use lb_common::{ServiceKey, ServiceValue};

use super::{
    tests::{assert_readable, backends_of, be, desired, fe, master, svc},
    *,
};
use crate::{
    datapath::{
        MemoryDatapath, encode_backend,
        memory::{Call, Op, OpKind},
    },
    model::Proto,
};

/// What the reconciler believes matches the maps: every complete frontend
/// has its master (range, count and id) and its range holds its backends;
/// an incomplete one has no master; the maps are readable; no write ever
/// hit a slot a reader may hold.
pub(super) fn assert_consistent(r: &Reconciler<MemoryDatapath>) {
    let state = &r.datapath().state;
    for (f, inst) in r.installed() {
        let m = master(state, f);
        if !inst.complete {
            assert!(m.is_none(), "{f} incomplete with a master");
            continue;
        }
        assert_eq!(m, Some(inst.master()), "{f}");
        assert_eq!(inst.slots().len(), inst.backends.len(), "{f}");
        for (slot, addr) in inst.slots().zip(inst.backends.iter()) {
            assert_eq!(
                state.backends.get(&slot),
                Some(&encode_backend(addr, f.proto)),
                "{f} slot {slot}"
            );
        }
    }
    let complete = r.installed().values().filter(|i| i.complete).count();
    assert_eq!(
        r.programmed(),
        complete,
        "the kept count of complete frontends"
    );
    assert_readable(state);
    assert_eq!(r.datapath().live_slot_writes, 0, "a live slot was written");
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
    let steps: [(&str, OpKind, usize); 2] = [
        ("master", OpKind::DeleteService, 1),
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
        assert_eq!(state.services.len(), 1, "{step}: {:?}", state.services);
        assert_eq!(state.meta.len(), 1, "{step}");
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

/// Any single failing call, at any point of a churn sequence (in a small
/// array, so grace periods and reuse happen), leaves the reconciler's
/// record equal to the maps; the next apply heals.
#[test]
fn any_single_failure_leaves_a_consistent_state() {
    let kinds = [
        OpKind::PutBackends,
        OpKind::Grace,
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
        desired(&[
            (fe(1), "a", vec![be(7, 80), be(8, 80), be(1, 80)]),
            (fe(3), "c2", vec![be(5, 80), be(6, 80)]),
        ]),
        desired(&[]),
    ];
    for kind in kinds {
        for nth in 1..=6 {
            let mut r = Reconciler::adopt(MemoryDatapath::with_limits(64, 8)).unwrap();
            r.datapath_mut().fail_nth(kind, nth);
            for d in &rounds {
                r.apply(d, Prune::Yes);
                assert_consistent(&r);
                // The next apply heals whatever the failure left.
                let report = r.apply(d, Prune::Yes);
                assert!(
                    report.errors.is_empty(),
                    "{kind:?} #{nth}: {:?}",
                    report.errors
                );
                assert!(report.other_errors.is_empty(), "{kind:?} #{nth}");
                let state = &r.datapath().state;
                for (f, want) in d {
                    assert_eq!(backends_of(state, f), want.backends, "{kind:?} #{nth}");
                }
                assert_eq!(state.services.len(), d.len(), "{kind:?} #{nth}");
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
            affinity: 0,
            spared: vec![],
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
    assert_eq!(state.services.len(), 1);
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
            .all(|op| !matches!(op, Op::PutService(..) | Op::PutBackends(..))),
        "no range or master written"
    );
    assert_consistent(&r);
    // Once complete, the same input shrinks to the one backend.
    let report = r.apply(&one(fe(1), "huge", vec![extra]), Prune::Yes);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(backends_of(&r.datapath().state, &fe(1)), vec![extra]);
}

/// Service ids continue past the highest adopted one, wrap around past
/// `u32::MAX` to 1 (never 0) and skip every id in use.
#[test]
fn ids_wrap_around_and_skip_ids_in_use() {
    const TOP: u32 = u32::MAX;
    let mut dp = MemoryDatapath::default();
    dp.put_backends(0, &[encode_backend(be(1, 80), Proto::Tcp)])
        .unwrap();
    dp.put_service(&frontend_key(&fe(1)), &ServiceValue::new(0, 1, TOP - 1))
        .unwrap();
    dp.put_service(&frontend_key(&fe(2)), &ServiceValue::new(0, 0, 1))
        .unwrap();
    dp.log.clear();
    let mut r = Reconciler::adopt(dp).unwrap();
    assert_consistent(&r);
    assert_eq!(r.installed()[&fe(1)].backends, vec![be(1, 80)]);

    let d = desired(&[
        (fe(3), "c", vec![be(3, 80), be(4, 80)]),
        (fe(4), "d", vec![be(5, 80), be(6, 80)]),
        (fe(5), "e", vec![]),
    ]);
    let report = r.apply(&d, Prune::No);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let svc_ids: Vec<u32> = [3, 4, 5].map(|i| r.installed()[&fe(i)].svc_id).to_vec();
    // TOP is free, then the counter wraps: 1 is taken, 2 is not.
    assert_eq!(svc_ids, vec![TOP, 2, 3]);
    assert_consistent(&r);
    assert_eq!(
        backends_of(&r.datapath().state, &fe(4)),
        vec![be(5, 80), be(6, 80)]
    );
}

/// With every service id taken, a new frontend fails cleanly; once one is
/// freed it is handed out again.
#[test]
fn exhausted_ids_fail_cleanly_until_one_is_freed() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    r.limit_ids(3);
    let mut entries = vec![
        (fe(1), "a", vec![be(1, 80)]),
        (fe(2), "b", vec![be(2, 80)]),
        (fe(3), "c", vec![be(3, 80)]),
    ];
    assert!(r.apply(&desired(&entries), Prune::Yes).errors.is_empty());
    entries.push((fe(4), "d", vec![be(1, 80)]));
    let report = r.apply(&desired(&entries), Prune::Yes);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].name, "d");
    assert!(report.errors[0].to_string().contains("no free service id"));
    assert!(!r.installed().contains_key(&fe(4)));
    assert_consistent(&r);

    // b goes: removals come first within one apply, so its id is free
    // for d at once.
    let b_id = r.installed()[&fe(2)].svc_id;
    entries.remove(1);
    let report = r.apply(&desired(&entries), Prune::Yes);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(r.installed()[&fe(4)].svc_id, b_id);
    assert_consistent(&r);
}

#[test]
fn id_allocator_probes_once_in_the_common_case() {
    let mut a = IdAllocator::after_up_to(u32::MAX - 1, u32::MAX);
    let probes = std::cell::Cell::new(0);
    let taken = |id: u32| {
        probes.set(probes.get() + 1);
        id == 1
    };
    assert_eq!(a.allocate(1, taken), Some(u32::MAX));
    assert_eq!(probes.get(), 1);
    assert_eq!(a.allocate(1, taken), Some(2));
    assert_eq!(probes.get(), 3);
    // Everything taken: bounded by the ids in use, then None.
    let mut a = IdAllocator::after_up_to(0, 5);
    assert_eq!(a.allocate(5, |_| true), None);
    assert_eq!(a.allocate(2, |id| id < 3), Some(3));
}

fn meta_of(f: Frontend, name: &str) -> lb_common::ServiceMeta {
    crate::datapath::encode_meta(&f, &svc(name))
}

/// What a crash or another tool can leave: a meta entry of no frontend, a
/// master of an unknown protocol, a master whose range runs past the
/// array. Adoption writes nothing; the first pruning apply deletes the
/// strays, and a frontend without a usable range gets a new one.
#[test]
fn adoption_sweeps_entries_no_frontend_reaches() {
    let mut dp = MemoryDatapath::with_limits(64, 16);
    dp.put_backends(0, &[encode_backend(be(1, 80), Proto::Tcp)])
        .unwrap();
    dp.put_service(&frontend_key(&fe(1)), &ServiceValue::new(0, 1, 5))
        .unwrap();
    dp.state.meta.insert(5, meta_of(fe(1), "web"));
    dp.state.meta.insert(9, meta_of(fe(2), "crashed"));
    let mut foreign: ServiceKey = frontend_key(&fe(6));
    foreign.proto = 99;
    dp.state
        .services
        .insert(foreign, ServiceValue::new(1, 1, 6));
    dp.state
        .services
        .insert(frontend_key(&fe(7)), ServiceValue::new(15, 4, 7));
    dp.log.clear();

    let mut r = Reconciler::adopt(dp).unwrap();
    assert!(r.datapath().log.is_empty());
    assert_eq!(r.installed().len(), 2);
    assert_eq!(r.installed()[&fe(1)].backends, vec![be(1, 80)]);

    let d = desired(&[
        (fe(1), "web", vec![be(1, 80)]),
        (fe(3), "new", vec![be(6, 80)]),
        (fe(7), "past", vec![be(7, 80)]),
    ]);
    let report = r.apply(&d, Prune::No);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.deletes, 0);
    assert!(![5, 6, 7, 9].contains(&r.installed()[&fe(3)].svc_id));

    let report = r.apply(&d, Prune::Yes);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.other_errors.is_empty(), "{:?}", report.other_errors);
    let state = &r.datapath().state;
    assert!(!state.services.contains_key(&foreign));
    assert_eq!(state.services.len(), 3);
    assert!(!state.meta.contains_key(&9));
    assert_eq!(backends_of(state, &fe(7)), vec![be(7, 80)]);
    assert_consistent(&r);
}

/// A failed range write frees its space at once (no master reached it):
/// the whole array stays usable.
#[test]
fn a_failed_range_write_leaks_nothing() {
    let mut r = Reconciler::adopt(MemoryDatapath::with_limits(8, 4)).unwrap();
    r.datapath_mut().fail_nth(OpKind::PutBackends, 1);
    let d = desired(&[(fe(1), "a", vec![be(1, 80), be(2, 80), be(3, 80), be(4, 80)])]);
    assert_eq!(r.apply(&d, Prune::Yes).errors.len(), 1);
    r.datapath_mut()
        .fail_when(|c| matches!(c, Call::PutService(..)));
    assert_eq!(r.apply(&d, Prune::Yes).errors.len(), 1);
    r.datapath_mut().clear_faults();
    assert!(r.apply(&d, Prune::Yes).errors.is_empty());
    assert_eq!(backends_of(&r.datapath().state, &fe(1)).len(), 4);
    assert_consistent(&r);
}

/// Many frontends are written in three batches (ranges, meta, masters); a
/// failure in the middle of a batch fails that frontend only: those before
/// and after it are complete, its range is not leaked (the array is sized
/// for exactly the three), and the next apply completes it.
#[test]
fn a_failure_inside_a_batch_fails_that_frontend_only() {
    for kind in [OpKind::PutBackends, OpKind::PutMeta, OpKind::PutService] {
        let mut r = Reconciler::adopt(MemoryDatapath::with_limits(8, 6)).unwrap();
        r.datapath_mut().fail_nth(kind, 2);
        let d = desired(&[
            (fe(1), "a", vec![be(1, 80), be(2, 80)]),
            (fe(2), "b", vec![be(3, 80), be(4, 80)]),
            (fe(3), "c", vec![be(5, 80), be(6, 80)]),
        ]);
        let report = r.apply(&d, Prune::Yes);
        let failed: Vec<&str> = report.errors.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(failed, ["b"], "{kind:?}");
        assert_consistent(&r);
        let state = &r.datapath().state;
        assert!(master(state, &fe(2)).is_none(), "{kind:?}");
        for f in [fe(1), fe(3)] {
            assert_eq!(backends_of(state, &f).len(), 2, "{kind:?} {f}");
        }
        let writes: Vec<&Op> = r
            .datapath()
            .log
            .iter()
            .filter(|op| !matches!(op, Op::Grace))
            .collect();
        let first_meta = writes.iter().position(|op| matches!(op, Op::PutMeta(_)));
        let last_range = writes
            .iter()
            .rposition(|op| matches!(op, Op::PutBackends(..)));
        let first_master = writes
            .iter()
            .position(|op| matches!(op, Op::PutService(..)));
        assert!(
            last_range < first_meta && first_meta < first_master,
            "{writes:?}"
        );

        let report = r.apply(&d, Prune::Yes);
        assert!(report.errors.is_empty(), "{kind:?}: {:?}", report.errors);
        assert_eq!(backends_of(&r.datapath().state, &fe(2)).len(), 2);
        assert_consistent(&r);
    }
}

/// Ids stay within the per-service counter array (`max_svc_id`), and a
/// reused id's counters start at 0: a new service never inherits a removed
/// one's translations or terminated sockets.
#[test]
fn a_reused_id_starts_with_zeroed_counters() {
    let mut dp = MemoryDatapath::default();
    dp.max_svc_id = 2;
    let mut r = Reconciler::adopt(dp).unwrap();
    let mut entries = vec![(fe(1), "a", vec![be(1, 80)]), (fe(2), "b", vec![be(2, 80)])];
    assert!(r.apply(&desired(&entries), Prune::Yes).errors.is_empty());
    let b_id = r.installed()[&fe(2)].svc_id;
    assert!(b_id <= 2);
    let counts = lb_common::SvcStats {
        connect: 7,
        sendmsg: 1,
        refused: 2,
    };
    r.datapath_mut().svc_stats.insert(b_id, counts);
    r.datapath_mut().state.terminated.insert(b_id, 3);
    // A third service does not fit in two ids.
    entries.push((fe(3), "c", vec![be(3, 80)]));
    let report = r.apply(&desired(&entries), Prune::Yes);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    // b goes; c gets its id, with nothing of b's counts.
    entries.remove(1);
    let report = r.apply(&desired(&entries), Prune::Yes);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(r.installed()[&fe(3)].svc_id, b_id);
    assert!(!r.datapath().svc_stats.contains_key(&b_id));
    assert!(!r.datapath().state.terminated.contains_key(&b_id));
    // An id kept by its frontend keeps its counts.
    let a_id = r.installed()[&fe(1)].svc_id;
    r.datapath_mut().svc_stats.insert(a_id, counts);
    assert!(r.apply(&desired(&entries), Prune::Yes).errors.is_empty());
    assert_eq!(r.datapath().svc_stats.get(&a_id), Some(&counts));
    assert_consistent(&r);
}
