//! The API source without HTTP: synthetic watcher events go through the
//! real pumps into the index; the sync driver syncs a `MemoryDatapath`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::runtime::watcher::Event;
use serde_json::json;

use super::*;
use crate::{
    datapath::{Datapath as _, MemoryDatapath},
    model::{Diagnostic, Frontend, Proto, TranslateOptions, frontend},
    reconciler::{Prune, Reconciler},
    sync::{Coalesce, Driver, Step, Syncer},
};

fn svc(name: &str, ip: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]},
    }))
    .unwrap()
}

/// A slice of `service` with one ready endpoint per address, on port 8080.
fn slice(name: &str, service: &str, addrs: &[&str]) -> EndpointSlice {
    let eps: Vec<_> = addrs
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "1",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }))
    .unwrap()
}

fn fe(ip: &str) -> Frontend {
    frontend(ip.parse::<std::net::IpAddr>().unwrap(), 80, Proto::Tcp)
}

/// What the watch decodes, and the full object it stands for.
trait Slim: Ingest + serde::de::DeserializeOwned {
    type Full: serde::Serialize;
}

impl Slim for SlimService {
    type Full = Service;
}

impl Slim for SlimSlice {
    type Full = EndpointSlice;
}

/// Decodes a full object's JSON as the watch does: the slim way.
fn wire<K: Slim>(o: &K::Full) -> K {
    serde_json::from_value(serde_json::to_value(o).unwrap()).unwrap()
}

fn wire_event<K: Slim>(event: Event<K::Full>) -> Event<K> {
    match event {
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(wire(&o)),
        Event::InitDone => Event::InitDone,
        Event::Apply(o) => Event::Apply(wire(&o)),
        Event::Delete(o) => Event::Delete(wire(&o)),
    }
}

/// The two pumps and what they share, as `run_kube` wires them.
struct Feeds {
    services: Pump<SlimService>,
    slices: Pump<SlimSlice>,
    signals: Arc<Signals>,
}

fn driver_with(dp: MemoryDatapath) -> (Driver<MemoryDatapath>, Feeds) {
    let syncer = Syncer::new(Reconciler::adopt(dp).unwrap());
    let input = Input::new(Index::new(TranslateOptions::default()));
    let signals = Signals::new(input.clone());
    let feeds = Feeds {
        services: Pump::new(signals.clone()),
        slices: Pump::new(signals.clone()),
        signals,
    };
    (Driver::new(syncer, input, Coalesce::default()), feeds)
}

/// What `pump` does for one event (of a full object, decoded as the watch
/// would), without a stream.
fn feed<K: Slim>(pump: &mut Pump<K>, _signals: &Signals, kind: Kind, event: Event<K::Full>)
where
    Index: IndexNamespaced<K::Info>,
{
    assert_eq!(kind, K::KIND);
    pump.handle(Ok(wire_event(event)));
}

fn list<K: Slim>(pump: &mut Pump<K>, signals: &Signals, kind: Kind, objs: Vec<K::Full>)
where
    Index: IndexNamespaced<K::Info>,
{
    feed(pump, signals, kind, Event::Init);
    for o in objs {
        feed(pump, signals, kind, Event::InitApply(o));
    }
    feed(pump, signals, kind, Event::InitDone);
}

async fn step(d: &mut Driver<MemoryDatapath>) -> Step {
    tokio::time::timeout(Duration::from_secs(5), d.step())
        .await
        .expect("a sync")
}

/// Backends of `fe` as the maps hold them (active slots only).
fn backends(d: &Driver<MemoryDatapath>, fe: &Frontend) -> Vec<std::net::IpAddr> {
    let r = d.syncer().reconciler();
    let snap = r.datapath().snapshot().unwrap();
    let Some(inst) = r.installed().get(fe) else {
        return Vec::new();
    };
    let mut out: Vec<std::net::IpAddr> = inst
        .slots()
        .map(|id| {
            crate::datapath::backend_addr(&snap.backends[&id])
                .ip()
                .to_owned()
        })
        .collect();
    out.sort();
    out
}

/// Maps as a previous agent left them: a with 2 backends, b with 1.
fn previous_agent_maps() -> MemoryDatapath {
    let (mut d, mut f) = driver_with(MemoryDatapath::default());
    list(
        &mut f.services,
        &f.signals,
        Kind::Services,
        vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")],
    );
    list(
        &mut f.slices,
        &f.signals,
        Kind::EndpointSlices,
        vec![
            slice("a-1", "a", &["10.244.1.1", "10.244.1.2"]),
            slice("b-1", "b", &["10.244.1.3"]),
        ],
    );
    assert_eq!(d.sync_now().prune, Prune::Yes);
    d.syncer().reconciler().datapath().clone()
}

#[tokio::test]
async fn nothing_shrinks_or_goes_before_both_initial_lists() {
    let (mut d, mut f) = driver_with(previous_agent_maps());
    // Services listed (b is gone, a new service c has no slices yet); slices not.
    list(
        &mut f.services,
        &f.signals,
        Kind::Services,
        vec![svc("a", "10.96.0.1"), svc("c", "10.96.0.3")],
    );
    let s = step(&mut d).await;
    assert_eq!(s.prune, Prune::No);
    assert!(!s.first_complete);
    assert_eq!(backends(&d, &fe("10.96.0.1")).len(), 2, "a not shrunk");
    assert_eq!(backends(&d, &fe("10.96.0.2")).len(), 1, "b not deleted");
    assert!(
        !d.syncer()
            .reconciler()
            .installed()
            .contains_key(&fe("10.96.0.3")),
        "c not installed without backends before the slices are known"
    );
    // A slice update before the slice list completes: grow only.
    feed(
        &mut f.slices,
        &f.signals,
        Kind::EndpointSlices,
        Event::Apply(slice("a-1", "a", &["10.244.1.1"])),
    );
    assert_eq!(step(&mut d).await.prune, Prune::No);
    assert_eq!(backends(&d, &fe("10.96.0.1")).len(), 2);

    // The slice list completes: now the maps follow the stores exactly.
    list(
        &mut f.slices,
        &f.signals,
        Kind::EndpointSlices,
        vec![slice("a-1", "a", &["10.244.1.1"])],
    );
    let s = step(&mut d).await;
    assert_eq!(s.prune, Prune::Yes);
    assert!(s.first_complete);
    assert_eq!(
        backends(&d, &fe("10.96.0.1")),
        ["10.244.1.1".parse::<Ipv4Addr>().unwrap()]
    );
    assert!(
        !d.syncer()
            .reconciler()
            .installed()
            .contains_key(&fe("10.96.0.2"))
    );
    // c exists with no endpoints: installed, refusing connects.
    assert!(
        d.syncer()
            .reconciler()
            .installed()
            .contains_key(&fe("10.96.0.3"))
    );
    assert!(backends(&d, &fe("10.96.0.3")).is_empty());
    assert!(!step_pending(&d));
}

fn step_pending(d: &Driver<MemoryDatapath>) -> bool {
    d.input().is_dirty()
}

#[tokio::test]
async fn a_relist_removes_exactly_what_vanished_meanwhile() {
    let (mut d, mut f) = driver_with(MemoryDatapath::default());
    list(
        &mut f.services,
        &f.signals,
        Kind::Services,
        vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")],
    );
    list(
        &mut f.slices,
        &f.signals,
        Kind::EndpointSlices,
        vec![
            slice("a-1", "a", &["10.244.1.1", "10.244.1.2"]),
            slice("b-1", "b", &["10.244.1.3"]),
        ],
    );
    step(&mut d).await;
    let writes_before = d.syncer().reconciler().datapath().log.len();
    // The watch broke (410); b and its slice were deleted meanwhile. An
    // unchanged object in the relist is no change; what vanished goes at
    // InitDone.
    feed(&mut f.services, &f.signals, Kind::Services, Event::Init);
    feed(
        &mut f.services,
        &f.signals,
        Kind::Services,
        Event::InitApply(svc("a", "10.96.0.1")),
    );
    assert!(!step_pending(&d), "a relist in progress is not a change");
    feed(&mut f.services, &f.signals, Kind::Services, Event::InitDone);
    list(
        &mut f.slices,
        &f.signals,
        Kind::EndpointSlices,
        vec![slice("a-1", "a", &["10.244.1.1", "10.244.1.2"])],
    );
    let s = step(&mut d).await;
    assert_eq!(s.prune, Prune::Yes);
    assert!(!s.first_complete);
    assert!(
        !d.syncer()
            .reconciler()
            .installed()
            .contains_key(&fe("10.96.0.2"))
    );
    assert_eq!(backends(&d, &fe("10.96.0.1")).len(), 2);
    // Only deletes for b: its master and meta.
    let log = &d.syncer().reconciler().datapath().log[writes_before..];
    use crate::datapath::memory::Op;
    assert!(
        log.iter()
            .all(|op| matches!(op, Op::DeleteService(_) | Op::DeleteMeta(_))),
        "{log:?}"
    );
    assert_eq!(log.len(), 2, "{log:?}");
}

#[tokio::test]
async fn deletes_and_updates_after_sync_apply() {
    let (mut d, mut f) = driver_with(MemoryDatapath::default());
    list(
        &mut f.services,
        &f.signals,
        Kind::Services,
        vec![svc("a", "10.96.0.1")],
    );
    list(&mut f.slices, &f.signals, Kind::EndpointSlices, vec![]);
    step(&mut d).await;
    assert!(backends(&d, &fe("10.96.0.1")).is_empty());
    feed(
        &mut f.slices,
        &f.signals,
        Kind::EndpointSlices,
        Event::Apply(slice(
            "a-1",
            "a",
            &["10.244.1.1", "10.244.1.2", "10.244.1.3"],
        )),
    );
    step(&mut d).await;
    assert_eq!(backends(&d, &fe("10.96.0.1")).len(), 3);
    feed(
        &mut f.slices,
        &f.signals,
        Kind::EndpointSlices,
        Event::Delete(slice("a-1", "a", &[])),
    );
    step(&mut d).await;
    assert!(backends(&d, &fe("10.96.0.1")).is_empty());
    feed(
        &mut f.services,
        &f.signals,
        Kind::Services,
        Event::Delete(svc("a", "10.96.0.1")),
    );
    step(&mut d).await;
    assert!(d.syncer().reconciler().installed().is_empty());
    assert!(d.syncer().reconciler().datapath().state.services.is_empty());
    // Two EndpointSlice events were measured.
    assert_eq!(d.latency().summary().map(|s| s.0), Some(2));
}

#[tokio::test]
async fn a_burst_of_events_is_coalesced_into_few_syncs() {
    let (mut d, f) = driver_with(MemoryDatapath::default());
    let Feeds {
        services,
        slices,
        signals,
    } = f;
    let svcs: Vec<Service> = (0..100)
        .map(|i| svc(&format!("s{i}"), &format!("10.96.1.{i}")))
        .collect();
    drop((services, slices));
    tokio::spawn(pump(
        futures::stream::iter(
            [Event::Init]
                .into_iter()
                .chain(svcs.into_iter().map(Event::InitApply))
                .chain([Event::InitDone])
                .map(|e| Ok(wire_event::<SlimService>(e))),
        ),
        signals.clone(),
    ));
    // 1,000 slice updates arriving over ~50 ms, as a watch would deliver them.
    let (tx, rx) = futures::channel::mpsc::unbounded();
    tokio::spawn(pump(rx, signals.clone()));
    tx.unbounded_send(Ok(Event::Init)).unwrap();
    tx.unbounded_send(Ok(Event::InitDone)).unwrap();
    let producer = tokio::spawn(async move {
        for i in 0..1000u32 {
            let n = i % 100;
            let ep = format!("10.244.{}.{}", 1 + i / 250, i % 250 + 1);
            let s = slice(&format!("s{n}-1"), &format!("s{n}"), &[&ep]);
            tx.unbounded_send(Ok(Event::Apply(wire::<SlimSlice>(&s))))
                .unwrap();
            if i % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    // Until every event has been synced (the count, not the producer task's
    // state: the last sync can consume the last events before the task is
    // reported finished, and another step would then wait for nothing).
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.latency().summary().map(|s| s.0) != Some(1000) && Instant::now() < deadline {
        step(&mut d).await;
    }
    producer.await.unwrap();
    assert_eq!(
        d.latency().summary().map(|s| s.0),
        Some(1000),
        "every event measured"
    );
    assert!(d.syncs() < 100, "1,000 events took {} syncs", d.syncs());
    // Each of the 100 services ends with the last endpoint written for it.
    for n in 0..100u32 {
        let last = 900 + n;
        let ep: Ipv4Addr = format!("10.244.{}.{}", 1 + last / 250, last % 250 + 1)
            .parse()
            .unwrap();
        assert_eq!(backends(&d, &fe(&format!("10.96.1.{n}"))), [ep]);
    }
}

#[tokio::test]
async fn a_single_change_is_synced_on_its_own() {
    let (mut d, mut f) = driver_with(MemoryDatapath::default());
    list(
        &mut f.services,
        &f.signals,
        Kind::Services,
        vec![svc("a", "10.96.0.1")],
    );
    list(&mut f.slices, &f.signals, Kind::EndpointSlices, vec![]);
    step(&mut d).await;
    let before = d.syncs();
    // One event, no burst after it: the quiet period alone starts the sync.
    // (How fast is measured by the churn test and the benchmark, not here.)
    feed(
        &mut f.slices,
        &f.signals,
        Kind::EndpointSlices,
        Event::Apply(slice("a-1", "a", &["10.244.1.1"])),
    );
    step(&mut d).await;
    assert_eq!(d.syncs(), before + 1);
    assert_eq!(backends(&d, &fe("10.96.0.1")).len(), 1);
}

#[tokio::test]
async fn a_late_zone_applies_topology_hints_on_the_next_sync() {
    let (mut d, mut f) = driver_with(MemoryDatapath::default());
    let hinted: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "a-1", "namespace": "default", "resourceVersion": "1",
                     "labels": {"kubernetes.io/service-name": "a"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.244.1.1"], "zone": "z1", "hints": {"forZones": [{"name": "z1"}]}},
            {"addresses": ["10.244.1.2"], "zone": "z2", "hints": {"forZones": [{"name": "z2"}]}},
        ],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }))
    .unwrap();
    list(
        &mut f.services,
        &f.signals,
        Kind::Services,
        vec![svc("a", "10.96.0.1")],
    );
    list(
        &mut f.slices,
        &f.signals,
        Kind::EndpointSlices,
        vec![hinted],
    );
    step(&mut d).await;
    assert_eq!(backends(&d, &fe("10.96.0.1")).len(), 2);
    f.signals.set_zone(Some("z2".into()));
    step(&mut d).await;
    assert_eq!(
        backends(&d, &fe("10.96.0.1")),
        ["10.244.1.2".parse::<Ipv4Addr>().unwrap()]
    );
}

#[test]
fn selectors_are_kube_proxys() {
    assert_eq!(
        label_selector(None),
        "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    );
    assert_eq!(
        label_selector(Some("lb")),
        "service.kubernetes.io/service-proxy-name=lb,!service.kubernetes.io/headless"
    );
}

/// A frontend that could not be written (the map was full) is tried again
/// on the next sync, not only when its own objects change.
#[tokio::test]
async fn a_failed_frontend_is_retried_once_there_is_room() {
    // Room for one frontend.
    let (mut d, mut f) = driver_with(MemoryDatapath::with_limits(1, 64));
    list(
        &mut f.services,
        &f.signals,
        Kind::Services,
        vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")],
    );
    list(
        &mut f.slices,
        &f.signals,
        Kind::EndpointSlices,
        vec![
            slice("a-1", "a", &["10.244.1.1", "10.244.1.2"]),
            slice("b-1", "b", &["10.244.2.1", "10.244.2.2"]),
        ],
    );
    d.sync_now();
    assert_eq!(backends(&d, &fe("10.96.0.1")).len(), 2);
    assert!(backends(&d, &fe("10.96.0.2")).is_empty(), "b did not fit");
    assert!(d.syncer().failed().contains(&fe("10.96.0.2")));
    // a goes: that event's sync frees the room and retries b.
    feed(
        &mut f.services,
        &f.signals,
        Kind::Services,
        Event::Delete(svc("a", "10.96.0.1")),
    );
    d.sync_now();
    assert!(
        !d.syncer()
            .reconciler()
            .installed()
            .contains_key(&fe("10.96.0.1"))
    );
    assert_eq!(backends(&d, &fe("10.96.0.2")).len(), 2);
    assert!(d.syncer().failed().is_empty());
}

/// What the API server holds, as the test fed it: services in the order the
/// index first saw them (which decides contested frontends).
#[derive(Default)]
struct Mirror {
    services: Vec<Service>,
    slices: BTreeMap<String, EndpointSlice>,
}

impl Mirror {
    fn apply_service(&mut self, s: Service) {
        match self
            .services
            .iter_mut()
            .find(|o| o.metadata.name == s.metadata.name)
        {
            Some(o) => *o = s,
            None => self.services.push(s),
        }
    }

    fn delete_service(&mut self, s: &Service) {
        self.services.retain(|o| o.metadata.name != s.metadata.name);
    }
}

/// The pumps, the index and the syncs give exactly what a full translation
/// of the objects gives, through slices moving between services, services
/// coming and going, and relists.
#[tokio::test]
async fn incremental_translation_equals_a_full_one() {
    let (mut d, mut f) = driver_with(MemoryDatapath::default());
    list(&mut f.services, &f.signals, Kind::Services, vec![]);
    list(&mut f.slices, &f.signals, Kind::EndpointSlices, vec![]);
    d.sync_now();
    let mut mirror = Mirror::default();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for round in 0..400 {
        let n = next(8);
        let event_svc = |n: u64| svc(&format!("s{n}"), &format!("10.96.0.{}", n % 6 + 1));
        match next(6) {
            0 => {
                mirror.apply_service(event_svc(n));
                feed(
                    &mut f.services,
                    &f.signals,
                    Kind::Services,
                    Event::Apply(event_svc(n)),
                );
            }
            1 => {
                mirror.delete_service(&event_svc(n));
                feed(
                    &mut f.services,
                    &f.signals,
                    Kind::Services,
                    Event::Delete(event_svc(n)),
                );
            }
            2 => {
                let name = format!("x{}", next(10));
                mirror.slices.remove(&name);
                feed(
                    &mut f.slices,
                    &f.signals,
                    Kind::EndpointSlices,
                    Event::Delete(slice(&name, "s0", &[])),
                );
            }
            3 if next(4) == 0 => {
                // A slice that names no service: only a diagnostic.
                let mut orphan = slice(&format!("x{}", next(10)), "s0", &[]);
                orphan.metadata.labels = None;
                mirror
                    .slices
                    .insert(orphan.metadata.name.clone().unwrap(), orphan.clone());
                feed(
                    &mut f.slices,
                    &f.signals,
                    Kind::EndpointSlices,
                    Event::Apply(orphan),
                );
            }
            5 if round % 50 == 49 => {
                // A relist with what the server holds plus one new service,
                // listed in reverse: the order seen before still counts.
                let mut all: Vec<Service> = mirror.services.clone();
                all.reverse();
                all.push(event_svc(n));
                mirror.apply_service(event_svc(n));
                list(&mut f.services, &f.signals, Kind::Services, all);
            }
            _ => {
                let ep = format!("10.244.{}.{}", next(3), next(3) + 1);
                let owner = format!("s{}", next(8));
                let s = slice(&format!("x{}", next(10)), &owner, &[&ep]);
                mirror
                    .slices
                    .insert(s.metadata.name.clone().unwrap(), s.clone());
                feed(
                    &mut f.slices,
                    &f.signals,
                    Kind::EndpointSlices,
                    Event::Apply(s),
                );
            }
        }
        if next(3) == 0 {
            d.sync_now();
            let slices: Vec<EndpointSlice> = mirror.slices.values().cloned().collect();
            let (want, want_diags) =
                crate::model::translate(&mirror.services, &slices, &TranslateOptions::default());
            let want_diags: BTreeSet<Diagnostic> = want_diags.into_iter().collect();
            assert_eq!(d.syncer().diagnostics(), &want_diags, "round {round}");
            // The masters reach exactly the slots the record says.
            let r = d.syncer().reconciler();
            let used: BTreeSet<u32> = r.installed().values().flat_map(|i| i.slots()).collect();
            let reached: BTreeSet<u32> = r
                .datapath()
                .state
                .services
                .values()
                .flat_map(|m| m.base..m.base + u32::from(m.count))
                .collect();
            assert_eq!(reached, used, "round {round}");
            let got: BTreeMap<Frontend, (String, Vec<std::net::IpAddr>)> = d
                .syncer()
                .reconciler()
                .installed()
                .iter()
                .map(|(fe, i)| (*fe, (i.service.name.to_string(), backends(&d, fe))))
                .collect();
            let want: BTreeMap<Frontend, (String, Vec<std::net::IpAddr>)> = want
                .into_iter()
                .map(|(fe, w)| {
                    (
                        fe,
                        (
                            w.service.name.to_string(),
                            w.backends.iter().map(|b| b.ip()).collect(),
                        ),
                    )
                })
                .collect();
            assert_eq!(got, want, "round {round}");
        }
    }
}

/// Not a test: how long one EndpointSlice change takes to sync (translate,
/// assemble, reconcile, in-memory writes) among N services × 10 endpoints.
/// `cargo test --release -p lb-userspace --lib -- --ignored --nocapture sync_cost`
#[tokio::test]
#[ignore = "measurement"]
async fn sync_cost_of_one_change_among_many_services() {
    for n in [1_000u32, 10_000, 100_000] {
        let (mut d, mut f) = driver_with(MemoryDatapath::default());
        let ip = |i: u32| Ipv4Addr::from(0x0a60_0000 + i).to_string();
        let ep = |i: u32, j: u32| Ipv4Addr::from(0x0af4_0000 + i * 16 + j).to_string();
        let svcs = (0..n).map(|i| svc(&format!("s{i}"), &ip(i))).collect();
        let slices = (0..n)
            .map(|i| {
                let eps: Vec<String> = (0..10).map(|j| ep(i, j)).collect();
                let refs: Vec<&str> = eps.iter().map(String::as_str).collect();
                slice(&format!("s{i}-1"), &format!("s{i}"), &refs)
            })
            .collect();
        list(&mut f.services, &f.signals, Kind::Services, svcs);
        list(&mut f.slices, &f.signals, Kind::EndpointSlices, slices);
        let t = std::time::Instant::now();
        d.sync_now();
        let cold = t.elapsed();
        let mut times = Vec::new();
        for k in 0..50u32 {
            let eps: Vec<String> = (0..10 - (k % 2)).map(|j| ep(7, j)).collect();
            let refs: Vec<&str> = eps.iter().map(String::as_str).collect();
            feed(
                &mut f.slices,
                &f.signals,
                Kind::EndpointSlices,
                Event::Apply(slice("s7-1", "s7", &refs)),
            );
            let t = std::time::Instant::now();
            d.sync_now();
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "N={n}: cold sync {cold:?}; one change: p50 {:?} p99 {:?}",
            times[25], times[49]
        );
    }
}

/// The control-plane metrics follow the watches and the syncs: a relist
/// and a watch failure are counted per resource, an EndpointSlice event
/// that reaches the maps is one programming-latency sample, and the
/// frontends are counted as programmed.
#[tokio::test]
async fn metrics_count_relists_restarts_and_programming() {
    let metrics = Arc::new(Metrics::new());
    let syncer = Syncer::new(Reconciler::adopt(MemoryDatapath::default()).unwrap());
    let input = Input::new(Index::new(TranslateOptions::default()));
    let signals = Signals::new(input.clone()).with_metrics(metrics.clone());
    let mut services: Pump<SlimService> = Pump::new(signals.clone());
    let mut slices: Pump<SlimSlice> = Pump::new(signals.clone());
    let mut d = Driver::new(syncer, input, Coalesce::default());
    d.set_metrics(metrics.clone());
    let health = crate::health::Health::new(Duration::from_secs(60));
    let has = |line: &str| {
        let text = metrics.render(crate::metrics::Collect::ALL);
        text.lines().any(|l| l == line)
    };
    assert!(has("lb_relists_total{resource=\"services\"} 0"));
    list(
        &mut services,
        &signals,
        Kind::Services,
        vec![svc("a", "10.96.0.1")],
    );
    list(&mut slices, &signals, Kind::EndpointSlices, vec![]);
    let initial = |h: &crate::health::Health| {
        h.metrics()
            .render(crate::metrics::Collect::ALL)
            .lines()
            .any(|l| l == "lb_initial_sync_complete 1")
    };
    assert!(!initial(&health));
    let wake = tokio::time::timeout(Duration::from_secs(5), d.wait())
        .await
        .expect("a wake-up");
    d.iterate(wake, &health);
    assert!(initial(&health), "both lists are in the maps");
    assert!(has("lb_relists_total{resource=\"services\"} 0"));
    assert!(has("lb_frontends{state=\"programmed\"} 1"));
    // One frontend: its service entry and its name.
    assert!(
        has("lb_map_writes_total 2"),
        "{}",
        metrics.render(crate::metrics::Collect::ALL)
    );
    assert!(has("lb_sync_duration_seconds_count 1"));
    // The initial list is one change, programmed by one sync: one sample.
    assert!(has("lb_network_programming_duration_seconds_count 1"));
    feed(
        &mut slices,
        &signals,
        Kind::EndpointSlices,
        Event::Apply(slice("a-1", "a", &["10.244.1.1"])),
    );
    step(&mut d).await;
    assert!(has("lb_network_programming_duration_seconds_count 2"));
    services.handle(Err(watcher::Error::NoResourceVersion));
    assert!(has("lb_watch_restarts_total{resource=\"services\"} 1"));
    assert!(has(
        "lb_watch_restarts_total{resource=\"endpointslices\"} 0"
    ));
    list(
        &mut services,
        &signals,
        Kind::Services,
        vec![svc("a", "10.96.0.1")],
    );
    assert!(has("lb_relists_total{resource=\"services\"} 1"));
    assert!(has("lb_relists_total{resource=\"endpointslices\"} 0"));
}

/// The Node watch is counted as the others: a failure is a restart, a
/// second complete list a relist (`resource="nodes"`), and its addresses
/// reach the index; an update that keeps them changes nothing.
#[test]
fn the_node_watch_counts_restarts_and_relists() {
    use k8s_openapi::api::core::v1::Node;
    let metrics = Arc::new(Metrics::new());
    let input = Input::new(Index::new(TranslateOptions::default()));
    let signals = Signals::new(input.clone()).with_metrics(metrics.clone());
    let node = |ips: &[&str]| -> Node {
        let addresses: Vec<_> = ips
            .iter()
            .map(|ip| json!({"type": "InternalIP", "address": ip}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "node-a", "resourceVersion": "1"},
            "status": {"addresses": addresses},
        }))
        .unwrap()
    };
    let has = |line: &str| {
        metrics
            .render(crate::metrics::Collect::ALL)
            .lines()
            .any(|l| l == line)
    };
    let node_ips = || input.with_index(|i| i.options().node_ips.clone());
    let mut watch = NodeWatch::new("node-a".into(), signals.clone());
    assert!(has("lb_watch_restarts_total{resource=\"nodes\"} 0"));
    assert!(has("lb_relists_total{resource=\"nodes\"} 0"));
    for event in [
        Event::Init,
        Event::InitApply(node(&["10.250.0.1"])),
        Event::InitDone,
    ] {
        watch.handle(Ok(event));
    }
    assert!(
        has("lb_relists_total{resource=\"nodes\"} 0"),
        "the initial list"
    );
    assert_eq!(node_ips(), ["10.250.0.1".parse::<IpAddr>().unwrap()]);

    watch.handle(Err(watcher::Error::NoResourceVersion));
    assert!(has("lb_watch_restarts_total{resource=\"nodes\"} 1"));
    assert!(has("lb_watch_restarts_total{resource=\"services\"} 0"));
    for event in [
        Event::Init,
        Event::InitApply(node(&["10.250.0.2"])),
        Event::InitDone,
    ] {
        watch.handle(Ok(event));
    }
    assert!(has("lb_relists_total{resource=\"nodes\"} 1"));
    assert!(has("lb_relists_total{resource=\"services\"} 0"));
    assert_eq!(node_ips(), ["10.250.0.2".parse::<IpAddr>().unwrap()]);
}
