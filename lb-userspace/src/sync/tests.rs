//! The sync loop over a `MemoryDatapath`, fed through [`Input`] directly.
//! Timers run on tokio's paused clock: a retry or resync "after a minute"
//! happens at once, and nothing here depends on real time.
use std::time::{Duration, Instant};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;

use super::*;
use crate::{
    datapath::MemoryDatapath,
    model::{Proto, ServiceInfo, SliceInfo, TranslateOptions, frontend},
};

fn svc(name: &str, ip: &str) -> ServiceInfo {
    let s: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80}]},
    }))
    .unwrap();
    (&s).into()
}

fn slice(name: &str, service: &str, addrs: &[&str]) -> SliceInfo {
    let eps: Vec<_> = addrs.iter().map(|a| json!({"addresses": [a]})).collect();
    let s: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"port": 8080}],
    }))
    .unwrap();
    (&s).into()
}

fn fe(ip: &str) -> Frontend {
    frontend(ip.parse::<std::net::IpAddr>().unwrap(), 80, Proto::Tcp)
}

fn driver(dp: MemoryDatapath) -> Driver<MemoryDatapath> {
    Driver::new(
        Syncer::new(Reconciler::adopt(dp).unwrap()),
        Input::new(Index::new(TranslateOptions::default())),
        Coalesce::default(),
    )
}

/// a (2 endpoints) and b (2 endpoints), sources not yet complete.
fn apply_a_and_b(d: &Driver<MemoryDatapath>) {
    d.input().update(Instant::now(), false, |index| {
        index.apply_service(svc("a", "10.96.0.1"));
        index.apply_service(svc("b", "10.96.0.2"));
        index.apply_slice(slice("a-1", "a", &["10.244.1.1", "10.244.1.2"]));
        index.apply_slice(slice("b-1", "b", &["10.244.2.1", "10.244.2.2"]));
        true
    });
}

/// [`apply_a_and_b`], both sources complete.
fn feed_a_and_b(d: &Driver<MemoryDatapath>) {
    apply_a_and_b(d);
    d.input().set_complete();
}

async fn step(d: &mut Driver<MemoryDatapath>) -> Step {
    tokio::time::timeout(Duration::from_secs(3600), d.step())
        .await
        .expect("a sync")
}

#[tokio::test(start_paused = true)]
async fn a_failed_frontend_is_retried_on_a_timer_without_any_event() {
    // Room for one frontend (a): b does not fit.
    let mut d = driver(MemoryDatapath::with_limits(1, 64));
    feed_a_and_b(&d);
    let s = step(&mut d).await;
    assert!(s.first_complete);
    assert_eq!(d.syncer().failed(), [fe("10.96.0.2")].into());
    // The operator makes room (a larger map); no object changes.
    d.syncer.reconciler.datapath_mut().max_services = 64;
    let s = step(&mut d).await;
    assert_eq!(s.wake, Wake::Retry);
    assert!(d.syncer().failed().is_empty());
    assert!(
        d.syncer()
            .reconciler()
            .installed()
            .contains_key(&fe("10.96.0.2"))
    );
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_while_the_frontend_keeps_failing() {
    let mut d = driver(MemoryDatapath::with_limits(1, 64));
    feed_a_and_b(&d);
    step(&mut d).await;
    let mut gaps = Vec::new();
    let mut last = TimerInstant::now();
    for _ in 0..8 {
        let s = step(&mut d).await;
        assert_eq!(s.wake, Wake::Retry);
        let now = TimerInstant::now();
        gaps.push(now - last);
        last = now;
    }
    // 1 s, 2 s, 4 s, ... up to the cap (tokio's paused clock, exact).
    let secs: Vec<u64> = gaps.iter().map(Duration::as_secs).collect();
    assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
    assert_eq!(d.syncer().failed(), [fe("10.96.0.2")].into());
}

#[tokio::test(start_paused = true)]
async fn the_periodic_resync_repairs_what_drifted_and_counts_it() {
    let mut d = driver(MemoryDatapath::default());
    d.set_resync_period(Some(Duration::from_secs(300)));
    feed_a_and_b(&d);
    step(&mut d).await;
    // The resync only runs once the period is over, and finds nothing.
    let s = step(&mut d).await;
    assert_eq!(s.wake, Wake::Resync);
    assert_eq!(s.repaired, 0);
    // Something deletes b's master entry behind the agent's back.
    let master = crate::datapath::frontend_key(&fe("10.96.0.2"));
    assert!(
        d.syncer
            .reconciler
            .datapath_mut()
            .state
            .services
            .remove(&master)
            .is_some()
    );
    let s = step(&mut d).await;
    assert_eq!(s.wake, Wake::Resync);
    assert_eq!(s.repaired, 1);
    assert!(
        d.syncer()
            .reconciler()
            .datapath()
            .state
            .services
            .contains_key(&master)
    );
    // The reconciler's own view loses a (as a bug might): the full apply
    // of the desired state puts it back.
    let gone = [(fe("10.96.0.1"), None)].into();
    d.syncer.reconciler.apply_changes(&gone, Prune::Yes);
    assert!(
        !d.syncer()
            .reconciler()
            .installed()
            .contains_key(&fe("10.96.0.1"))
    );
    let s = step(&mut d).await;
    assert_eq!(s.wake, Wake::Resync);
    assert!(s.repaired > 0);
    assert_eq!(d.repaired(), 1 + s.repaired as u64);
    assert!(
        d.syncer()
            .reconciler()
            .installed()
            .contains_key(&fe("10.96.0.1"))
    );
}

#[tokio::test]
async fn nothing_is_written_for_a_change_that_changes_nothing() {
    let mut d = driver(MemoryDatapath::default());
    feed_a_and_b(&d);
    step(&mut d).await;
    let writes = d.syncer().reconciler().datapath().log.len();
    let changed = d.input().update(Instant::now(), true, |index| {
        index.apply_slice(slice("a-1", "a", &["10.244.1.1", "10.244.1.2"]))
    });
    assert!(!changed, "the same slice again");
    assert!(!d.input().is_dirty(), "no sync is even scheduled");
    assert_eq!(d.syncer().reconciler().datapath().log.len(), writes);
}

#[tokio::test]
async fn source_diagnostics_are_reported_with_the_index_ones() {
    let mut d = driver(MemoryDatapath::default());
    feed_a_and_b(&d);
    let parse_error = Diagnostic {
        source: "x.yaml#1".into(),
        object: String::new(),
        field: String::new(),
        message: "invalid YAML".into(),
        severity: Severity::Warning,
    };
    d.input().set_source_diagnostics(vec![parse_error.clone()]);
    step(&mut d).await;
    assert!(d.syncer().diagnostics().contains(&parse_error));
    d.input().set_source_diagnostics(Vec::new());
    assert!(d.input().is_dirty());
    step(&mut d).await;
    assert!(d.syncer().diagnostics().is_empty());
}

#[test]
fn owners_are_seeded_oldest_first() {
    let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let mut index = Index::new(TranslateOptions::default());
    // zeta installed first (service id 1), then alpha.
    index.apply_service(svc("zeta", "10.96.0.1"));
    index.checkout();
    r.apply(&index.desired(), Prune::Yes);
    index.apply_service(svc("alpha", "10.96.0.2"));
    index.checkout();
    r.apply(&index.desired(), Prune::Yes);
    assert_eq!(
        owners_oldest_first(&r),
        [
            ("default".to_owned(), "zeta".to_owned()),
            ("default".to_owned(), "alpha".to_owned())
        ]
    );
}

/// A frontend that failed and is then held back until the sources are
/// complete (its service went: nothing is removed before then) is not
/// retried in a loop meanwhile.
#[tokio::test(start_paused = true)]
async fn a_held_back_frontend_is_not_retried_in_a_loop() {
    let mut d = driver(MemoryDatapath::with_limits(1, 64));
    // Not complete: a gets in, b does not fit.
    apply_a_and_b(&d);
    step(&mut d).await;
    assert_eq!(d.syncer().failed(), [fe("10.96.0.2")].into());
    // b goes: its removal waits for the first complete sync.
    d.input().update(Instant::now(), false, |index| {
        index.delete_service("default", "b")
    });
    step(&mut d).await;
    assert!(d.syncer().failed().is_empty());
    assert_eq!(d.syncer().next_retry(), None);
}

/// `--terminate-sockets all`: an endpoint that turns terminating (still
/// serving) leaves the maps and enters the spared list, a sync with no
/// other change counts it (so a termination pass runs), and once it is
/// gone from the slice it leaves the list again.
#[tokio::test]
async fn spared_endpoints_follow_the_model_and_count_as_a_change() {
    let spared = crate::datapath::terminate::Spared::new();
    let mut d = Driver::new(
        Syncer::new(Reconciler::adopt(MemoryDatapath::default()).unwrap())
            .with_spared(Some(spared.clone())),
        Input::new(Index::new(TranslateOptions::default())),
        Coalesce::default(),
    );
    feed_a_and_b(&d);
    step(&mut d).await;
    let key = crate::datapath::frontend_key(&fe("10.96.0.1"));
    assert!(
        spared
            .snapshot()
            .expect("whole after the first full sync")
            .is_empty()
    );

    let terminating = |index: &mut Index| {
        let s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "a-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "a"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.1"]},
                {"addresses": ["10.244.1.2"],
                 "conditions": {"ready": false, "serving": true, "terminating": true}},
            ],
            "ports": [{"port": 8080}],
        }))
        .unwrap();
        index.apply_slice(SliceInfo::from(&s))
    };
    assert!(d.input().update(Instant::now(), true, terminating));
    let s = step(&mut d).await;
    assert_eq!(s.stats.spared, 1, "{:?}", s.stats);
    let b = crate::datapath::encode_backend("10.244.1.2:8080".parse().unwrap(), Proto::Tcp);
    assert!(spared.snapshot().unwrap()[&key].contains(&(b.addr, b.port)));

    assert!(d.input().update(Instant::now(), true, |index| {
        index.apply_slice(slice("a-1", "a", &["10.244.1.1"]))
    }));
    let s = step(&mut d).await;
    assert_eq!((s.stats.spared, s.stats.writes), (1, 0), "{:?}", s.stats);
    assert!(spared.snapshot().unwrap().is_empty());
}
