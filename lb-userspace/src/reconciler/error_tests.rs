//! Failure paths, driven through the failure-injecting memory datapath.
use lb_common::{ServiceKey, ServiceValue};

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

fn put(dp: &mut MemoryDatapath, f: Frontend, slot: u16, value: ServiceValue) {
    dp.state.services.insert(frontend_key(&f, slot), value);
}

fn put_backend(dp: &mut MemoryDatapath, id: u32, addr: SocketAddr) {
    dp.state
        .backends
        .insert(id, crate::datapath::encode_backend(addr, Proto::Tcp));
}

/// Ids continue past the highest adopted one, wrap around past `u32::MAX`
/// to 1 (never 0) and skip every id in use, also a backend id only a
/// slot still names.
#[test]
fn ids_wrap_around_and_skip_ids_in_use() {
    const TOP: u32 = u32::MAX;
    let mut dp = MemoryDatapath::default();
    // fe(1): svc TOP - 1, slot 1 -> backend TOP - 1; a half-shrunk slot 2
    // still names backend 2, which has no entry.
    put(&mut dp, fe(1), 0, ServiceValue::master(1, TOP - 1));
    put(&mut dp, fe(1), 1, ServiceValue::slot(TOP - 1, TOP - 1));
    put(&mut dp, fe(1), 2, ServiceValue::slot(2, TOP - 1));
    put_backend(&mut dp, TOP - 1, be(1, 80));
    // fe(2): svc 1 -> backend 1.
    put(&mut dp, fe(2), 0, ServiceValue::master(1, 1));
    put(&mut dp, fe(2), 1, ServiceValue::slot(1, 1));
    put_backend(&mut dp, 1, be(2, 80));
    let mut r = Reconciler::adopt(dp).unwrap();
    assert_consistent(&r);

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
    let state = &r.datapath().state;
    let new: BTreeSet<u32> = state
        .backends
        .keys()
        .copied()
        .filter(|id| ![1, TOP - 1].contains(id))
        .collect();
    // TOP, then 1 (taken) and 2 (named by a slot) are skipped.
    assert_eq!(new, BTreeSet::from([TOP, 3, 4, 5]));
    assert_consistent(&r);
    assert_eq!(backends_of(state, &fe(4)), vec![be(5, 80), be(6, 80)]);
}

/// With every id taken, a new frontend or backend fails cleanly; once one
/// is freed it is handed out again.
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

    // A fourth backend: no backend id left.
    entries[2].2.push(be(4, 80));
    let report = r.apply(&desired(&entries), Prune::Yes);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].name, "c");
    assert!(
        matches!(
            report.errors[0].source,
            DatapathError::IdsExhausted { kind: "backend" }
        ),
        "{}",
        report.errors[0]
    );
    assert_eq!(backends_of(&r.datapath().state, &fe(3)), vec![be(3, 80)]);
    entries[2].2.pop();

    // A fourth frontend on a known backend: no service id left.
    entries.push((fe(4), "d", vec![be(1, 80)]));
    let report = r.apply(&desired(&entries), Prune::Yes);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].name, "d");
    assert!(report.errors[0].to_string().contains("no free service id"));
    assert!(!r.installed().contains_key(&fe(4)));
    assert_consistent(&r);

    // b goes: its service id and backend id are free for d, from the next
    // apply on (removals come after additions within one apply).
    let b_id = r.installed()[&fe(2)].svc_id;
    entries.remove(1);
    entries[2].2 = vec![be(9, 80)];
    let report = r.apply(&desired(&entries), Prune::Yes);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(!r.installed().contains_key(&fe(2)));
    let report = r.apply(&desired(&entries), Prune::Yes);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(r.installed()[&fe(4)].svc_id, b_id);
    assert_eq!(backends_of(&r.datapath().state, &fe(4)), vec![be(9, 80)]);
    assert!(
        r.datapath()
            .state
            .backends
            .keys()
            .all(|id| (1..=3).contains(id))
    );
    assert_consistent(&r);
}

#[test]
fn id_allocator_probes_once_in_the_common_case() {
    let mut a = IdAllocator::after(u32::MAX - 1);
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

/// What a crash can leave behind: slots without their master, a slot past
/// a gap, a meta entry of no frontend, a key and a backend of an unknown
/// protocol. Adoption writes nothing; the first pruning apply deletes them
/// (slots before the backends they name), and their ids stay unused until
/// then.
#[test]
fn adoption_sweeps_entries_no_frontend_reaches() {
    let mut dp = MemoryDatapath::default();
    put(&mut dp, fe(1), 0, ServiceValue::master(1, 5));
    put(&mut dp, fe(1), 1, ServiceValue::slot(11, 5));
    put(&mut dp, fe(1), 3, ServiceValue::slot(13, 5)); // past a gap
    dp.state.meta.insert(5, meta_of(fe(1), "web"));
    put(&mut dp, fe(2), 1, ServiceValue::slot(12, 9)); // no master
    put(&mut dp, fe(2), 2, ServiceValue::slot(14, 9));
    dp.state.meta.insert(9, meta_of(fe(2), "crashed"));
    let mut foreign = frontend_key(&fe(6), 0);
    foreign.proto = 99;
    dp.state
        .services
        .insert(foreign, ServiceValue::master(0, 6));
    for (id, last) in [(11, 1), (12, 2), (13, 3), (14, 4)] {
        put_backend(&mut dp, id, be(last, 80));
    }
    let mut odd = crate::datapath::encode_backend(be(5, 80), Proto::Tcp);
    odd.proto = 99;
    dp.state.backends.insert(15, odd);

    let mut r = Reconciler::adopt(dp).unwrap();
    assert!(r.datapath().log.is_empty());
    assert_eq!(r.installed().len(), 1);
    assert_eq!(r.installed()[&fe(1)].slots, vec![11]);
    assert_consistent(&r);

    // Before the sources are complete nothing is deleted, and a new
    // frontend gets neither the stray meta's id nor a backend id a stray
    // slot names.
    let d = desired(&[
        (fe(1), "web", vec![be(1, 80)]),
        (fe(3), "new", vec![be(6, 80)]),
    ]);
    let report = r.apply(&d, Prune::No);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.deletes, 0);
    assert!(![5, 9].contains(&r.installed()[&fe(3)].svc_id));
    assert_eq!(r.datapath().state.backends.len(), 6);

    let start = r.datapath().log.len();
    let mid = r.datapath().state.clone();
    let report = r.apply(&d, Prune::Yes);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.other_errors.is_empty(), "{:?}", report.other_errors);
    let state = r.datapath().state.clone();
    let keys: BTreeSet<ServiceKey> = state.services.keys().copied().collect();
    let want: BTreeSet<ServiceKey> = [
        frontend_key(&fe(1), 0),
        frontend_key(&fe(1), 1),
        frontend_key(&fe(3), 0),
        frontend_key(&fe(3), 1),
    ]
    .into();
    assert_eq!(keys, want);
    let fe3_id = r.installed()[&fe(3)].svc_id;
    assert_eq!(
        state.meta.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([5, fe3_id])
    );
    assert_eq!(state.backends.len(), 2);
    assert!(state.backends.contains_key(&11));
    // Each stray slot goes before the backend it names.
    let log = &r.datapath().log[start..];
    let pos = |op: &Op| log.iter().position(|o| o == op).unwrap();
    for (slot, id) in [(frontend_key(&fe(1), 3), 13), (frontend_key(&fe(2), 1), 12)] {
        assert!(pos(&Op::DeleteService(slot)) < pos(&Op::DeleteBackend(id)));
    }
    super::tests::replay_checked(&mid, log, &mid);
    assert_consistent(&r);
}

/// A frontend whose slots a crash left without a master is written over
/// them; the stray slot past its new count goes, and a stray delete that
/// fails is retried by the next pruning apply.
#[test]
fn strays_are_taken_over_or_retried() {
    let mut dp = MemoryDatapath::default();
    for (slot, id, last) in [(1, 21, 1), (2, 22, 2), (3, 23, 3)] {
        put(&mut dp, fe(2), slot, ServiceValue::slot(id, 4));
        put_backend(&mut dp, id, be(last, 80));
    }
    let mut r = Reconciler::adopt(dp).unwrap();
    let third = frontend_key(&fe(2), 3);
    r.datapath_mut()
        .fail_when(move |c| matches!(c, Call::DeleteService(k) if **k == third));
    let d = desired(&[(fe(2), "back", vec![be(2, 80), be(9, 80)])]);
    let report = r.apply(&d, Prune::Yes);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.other_errors.len(), 1);
    assert_eq!(
        backends_of(&r.datapath().state, &fe(2)),
        vec![be(2, 80), be(9, 80)]
    );
    // The failed stray still names backend 23: it is kept.
    assert!(r.datapath().state.backends.contains_key(&23));
    assert!(!r.datapath().state.backends.contains_key(&21));
    assert_consistent(&r);

    r.datapath_mut().clear_faults();
    let report = r.apply(&d, Prune::Yes);
    assert!(report.other_errors.is_empty(), "{:?}", report.other_errors);
    let state = &r.datapath().state;
    assert_eq!(state.services.len(), 3);
    assert_eq!(state.backends.len(), 2);
    assert_consistent(&r);
}
