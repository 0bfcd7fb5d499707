//! Random sequences of applies and repairs, each with a random injected
//! failure: the reconciler's record always matches the maps, no write
//! breaks a connect() in flight, and once failures stop one apply converges.
use proptest::prelude::*;

use super::{
    error_tests::assert_consistent,
    tests::{be, desired, fe, replay_checked},
    *,
};
use crate::datapath::{MemoryDatapath, memory::OpKind};

#[derive(Clone, Debug)]
enum Step {
    Apply {
        services: Vec<(u8, Vec<u8>)>,
        prune: bool,
    },
    Repair,
}

fn kind() -> impl Strategy<Value = OpKind> {
    prop_oneof![
        Just(OpKind::Snapshot),
        Just(OpKind::PutBackends),
        Just(OpKind::Grace),
        Just(OpKind::PutService),
        Just(OpKind::DeleteService),
        Just(OpKind::PutMeta),
        Just(OpKind::DeleteMeta),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let services = prop::collection::vec((1u8..=4, prop::collection::vec(1u8..=8, 0..5)), 0..4);
    prop_oneof![
        4 => (services, any::<bool>()).prop_map(|(services, prune)| Step::Apply { services, prune }),
        1 => Just(Step::Repair),
    ]
}

fn to_desired(services: &[(u8, Vec<u8>)]) -> DesiredState {
    let entries: Vec<_> = services
        .iter()
        .map(|(f, bs)| (fe(*f), "svc", bs.iter().map(|b| be(*b, 80)).collect()))
        .collect();
    desired(&entries)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn failures_never_break_the_maps_and_always_heal(
        steps in prop::collection::vec((step(), prop::option::of((kind(), 1usize..4))), 1..12),
    ) {
        // A small array: releases, grace periods and reuse happen often.
        let mut r = Reconciler::adopt(MemoryDatapath::with_limits(64, 40)).unwrap();
        let mut last = DesiredState::new();
        for (step, fault) in &steps {
            if let Some((kind, nth)) = fault {
                r.datapath_mut().fail_nth(*kind, *nth);
            }
            let before = r.datapath().state.clone();
            let start = r.datapath().log.len();
            match step {
                Step::Apply { services, prune } => {
                    last = to_desired(services);
                    let prune = if *prune { Prune::Yes } else { Prune::No };
                    r.apply(&last, prune);
                }
                Step::Repair => {
                    r.repair();
                }
            }
            r.datapath_mut().clear_faults();
            replay_checked(&before, &r.datapath().log[start..]);
            assert_consistent(&r);
            // With no drift, a repair finds nothing to do.
            let report = r.repair();
            prop_assert_eq!(report.repaired, 0, "{}", report);
        }
        let report = r.apply(&last, Prune::Yes);
        prop_assert!(report.errors.is_empty(), "{:?}", report.errors);
        prop_assert!(report.other_errors.is_empty(), "{:?}", report.other_errors);
        let state = &r.datapath().state;
        prop_assert_eq!(state.services.len(), last.len());
        prop_assert_eq!(state.meta.len(), last.len());
        prop_assert_eq!(r.datapath().live_slot_writes, 0);
        for (f, want) in &last {
            prop_assert_eq!(super::tests::backends_of(state, f), want.backends.clone());
        }
        prop_assert!(r.repair().is_clean());
    }
}
