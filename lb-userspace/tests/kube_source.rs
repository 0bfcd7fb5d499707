//! The API source end to end without privileges: the real kube-rs watchers
//! against the fake API server (real list/watch protocol over loopback HTTP),
//! the real driver, translation and reconciler, and the in-memory datapath.
//! No real kube-apiserver is exercised.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Api, Client};
use lb_fake_apiserver::{Config, FakeApiServer};
use lb_userspace::{
    datapath::{MemoryDatapath, backend_addr},
    model::{Index, TranslateOptions, translate},
    reconciler::{Prune, Reconciler},
    sources::kube::{Signals, SlimService, SlimSlice, label_selector, pump, watch},
    sync::{Coalesce, Driver, Input, Syncer},
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

fn svc(name: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]},
    })
}

fn slice(name: &str, service: &str, addrs: &[(&str, Value)]) -> Value {
    let eps: Vec<Value> = addrs
        .iter()
        .map(|(a, cond)| json!({"addresses": [a], "conditions": cond}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"port": 8080, "protocol": "TCP"}],
    })
}

fn ready() -> Value {
    json!({"ready": true})
}

struct Harness {
    server: FakeApiServer,
    driver: Driver<MemoryDatapath>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn start(server: FakeApiServer, dp: MemoryDatapath) -> Harness {
    let client = Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    let syncer = Syncer::new(Reconciler::adopt(dp).unwrap());
    let input = Input::new(Index::new(TranslateOptions::default()));
    let signals = Signals::new(input.clone());
    let driver = Driver::new(syncer, input, Coalesce::default());
    let sel = label_selector(None);
    let tasks = vec![
        tokio::spawn(pump(
            watch(Api::<SlimService>::all(client.clone()), &sel),
            signals.clone(),
        )),
        tokio::spawn(pump(watch(Api::<SlimSlice>::all(client), &sel), signals)),
    ];
    Harness {
        server,
        driver,
        tasks,
    }
}

async fn fake() -> FakeApiServer {
    FakeApiServer::start_with(
        Config {
            bookmark_interval: Duration::from_millis(500),
            ..Config::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .unwrap()
}

/// Frontend IP → sorted backend IPs, as the maps hold them.
fn programmed(d: &Driver<MemoryDatapath>) -> BTreeMap<IpAddr, Vec<IpAddr>> {
    let r = d.syncer().reconciler();
    let backends = &r.datapath().state.backends;
    r.installed()
        .iter()
        .map(|(fe, i)| {
            let mut b: Vec<IpAddr> = i
                .slots()
                .map(|id| backend_addr(&backends[&id]).ip())
                .collect();
            b.sort();
            (fe.addr.ip(), b)
        })
        .collect()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// Runs syncs until `pred` holds on the maps.
async fn sync_until(
    h: &mut Harness,
    what: &str,
    pred: impl Fn(&BTreeMap<IpAddr, Vec<IpAddr>>) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    while !pred(&programmed(&h.driver)) {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, h.driver.step()).await.is_err() {
            panic!(
                "timed out waiting for {what}; maps: {:?}",
                programmed(&h.driver)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_api_server_through_relists_and_severed_watches() {
    let server = fake().await;
    server
        .apply("services", svc("a", "10.96.0.1", json!({})))
        .unwrap();
    server
        .apply(
            "services",
            svc(
                "headless-label",
                "10.96.0.9",
                json!({"service.kubernetes.io/headless": ""}),
            ),
        )
        .unwrap();
    server
        .apply(
            "services",
            svc(
                "other-proxy",
                "10.96.0.8",
                json!({"service.kubernetes.io/service-proxy-name": "x"}),
            ),
        )
        .unwrap();
    server
        .apply(
            "endpointslices",
            slice(
                "a-1",
                "a",
                &[("10.244.1.1", ready()), ("10.244.1.2", ready())],
            ),
        )
        .unwrap();
    let mut h = start(server, MemoryDatapath::default()).await;
    sync_until(&mut h, "initial sync", |m| {
        m.get(&"10.96.0.1".parse().unwrap()) == Some(&ips(&["10.244.1.1", "10.244.1.2"]))
    })
    .await;
    assert_eq!(
        programmed(&h.driver).len(),
        1,
        "labelled services are not served"
    );
    let log = h.server.request_log();
    assert!(
        log.iter()
            .filter(|r| r.is_watch() || r.is_list_of("services") || r.is_list_of("endpointslices"))
            .all(|r| r.param("labelSelector") == Some(label_selector(None).as_str())),
        "{log:?}"
    );

    // Not ready → serving+terminating fallback → none.
    h.server
        .apply(
            "endpointslices",
            slice(
                "a-1",
                "a",
                &[
                    (
                        "10.244.1.1",
                        json!({"ready": false, "serving": true, "terminating": true}),
                    ),
                    ("10.244.1.2", json!({"ready": true})),
                ],
            ),
        )
        .unwrap();
    sync_until(&mut h, "not-ready dropped", |m| {
        m[&"10.96.0.1".parse().unwrap()] == ips(&["10.244.1.2"])
    })
    .await;

    // A 410 while b is created and a's slice deleted: after the relist both show.
    h.server
        .apply("services", svc("b", "10.96.0.2", json!({})))
        .unwrap();
    h.server
        .apply(
            "endpointslices",
            slice("b-1", "b", &[("10.244.1.3", ready())]),
        )
        .unwrap();
    sync_until(&mut h, "b", |m| {
        m.contains_key(&"10.96.0.2".parse().unwrap())
    })
    .await;
    let server = &h.server;
    server.stop().await.unwrap();
    server.delete("services", "default", "b").unwrap();
    server.delete("endpointslices", "default", "b-1").unwrap();
    server.compact();
    server.restart().await.unwrap();
    sync_until(&mut h, "b gone after the relist", |m| {
        !m.contains_key(&"10.96.0.2".parse().unwrap())
    })
    .await;
    assert_eq!(
        programmed(&h.driver)[&"10.96.0.1".parse().unwrap()],
        ips(&["10.244.1.2"]),
        "a untouched"
    );
    let relists = h
        .server
        .request_log()
        .iter()
        .filter(|r| r.is_list_of("services"))
        .count();
    assert!(relists >= 2, "relisted after the 410");

    // A severed watch resumes without a relist and without touching the maps.
    let before = h.driver.syncer().reconciler().datapath().log.len();
    let lists_before = h
        .server
        .request_log()
        .iter()
        .filter(|r| r.is_list_of("services"))
        .count();
    h.server.sever_watches();
    h.server.wait_for_watches(2, WAIT).await.unwrap();
    h.server
        .apply(
            "endpointslices",
            slice("a-1", "a", &[("10.244.1.4", ready())]),
        )
        .unwrap();
    sync_until(&mut h, "change after sever", |m| {
        m[&"10.96.0.1".parse().unwrap()] == ips(&["10.244.1.4"])
    })
    .await;
    let lists_after = h
        .server
        .request_log()
        .iter()
        .filter(|r| r.is_list_of("services"))
        .count();
    assert_eq!(lists_before, lists_after, "no relist after a severed watch");
    let ops = &h.driver.syncer().reconciler().datapath().log[before..];
    assert!(
        ops.len() <= 6,
        "only the endpoint change was written: {ops:?}"
    );

    // Deleting the service removes it.
    h.server.delete("services", "default", "a").unwrap();
    sync_until(&mut h, "a gone", |m| m.is_empty()).await;
    assert!(
        h.driver
            .syncer()
            .reconciler()
            .datapath()
            .state
            .services
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_leaves_adopted_maps_alone() {
    // A previous agent programmed a and b.
    let mut previous = Reconciler::adopt(MemoryDatapath::default()).unwrap();
    let objs = |names: &[&str]| -> (Vec<Service>, Vec<EndpointSlice>) {
        let s = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                serde_json::from_value(svc(n, &format!("10.96.0.{}", i + 1), json!({}))).unwrap()
            })
            .collect();
        let e = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                serde_json::from_value(slice(
                    &format!("{n}-1"),
                    n,
                    &[(&format!("10.244.1.{}", i + 1), ready())],
                ))
                .unwrap()
            })
            .collect();
        (s, e)
    };
    let (s, e) = objs(&["a", "b"]);
    let (desired, _) = translate(&s, &e, &TranslateOptions::default());
    previous.apply(&desired, Prune::Yes);
    let dp = previous.datapath().clone();

    let server = fake().await;
    server.stop().await.unwrap();
    let mut h = start(server, dp.clone()).await;
    // No sync happens while the API is down: nothing to wait for but time.
    let r = tokio::time::timeout(Duration::from_secs(2), h.driver.step()).await;
    assert!(r.is_err(), "no sync without a source");
    assert_eq!(
        h.driver.syncer().reconciler().datapath().state,
        dp.state,
        "nothing flushed"
    );

    // The API comes back with only a: b is removed, a untouched.
    h.server
        .apply("services", svc("a", "10.96.0.1", json!({})))
        .unwrap();
    h.server
        .apply(
            "endpointslices",
            slice("a-1", "a", &[("10.244.1.1", ready())]),
        )
        .unwrap();
    h.server.restart().await.unwrap();
    sync_until(&mut h, "b pruned", |m| m.len() == 1).await;
    assert_eq!(
        programmed(&h.driver)[&"10.96.0.1".parse().unwrap()],
        ips(&["10.244.1.1"])
    );
}
