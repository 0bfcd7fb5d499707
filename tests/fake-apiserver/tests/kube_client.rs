//! Drives the real kube-rs client, watcher and reflector against the fake apiserver.
//! No real kube-apiserver is involved: these check that the fake is faithful enough.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use lb_fake_apiserver::{Config, FakeApiServer, RequestRecord, kubeconfig};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc;

const PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
const WAIT: Duration = Duration::from_secs(10);

fn svc(ns: &str, name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    })
}

fn slice(ns: &str, name: &str, service: &str, endpoints: usize, seed: u64) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|i| {
            json!({"addresses": [format!("10.{}.{}.{}", seed % 250, i / 250, i % 250 + 1)],
                        "conditions": {"ready": true}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

async fn start(config: Config) -> Result<(FakeApiServer, Client)> {
    let server = FakeApiServer::start_with(config, ([127, 0, 0, 1], 0).into()).await?;
    let client = Client::try_from(kube::Config::new(server.url().parse()?))?;
    Ok((server, client))
}

fn quick_bookmarks() -> Config {
    Config {
        bookmark_interval: Duration::from_millis(200),
        ..Config::default()
    }
}

fn no_bookmarks() -> Config {
    Config {
        bookmark_interval: Duration::from_secs(600),
        ..Config::default()
    }
}

/// What the watcher emitted, reduced to what the tests assert on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Init,
    InitApply(String),
    InitDone,
    Apply(String),
    Delete(String),
    Error(String),
}

/// Runs `watcher(...).default_backoff().reflect(...)` in a task; returns the store and the events.
fn reflect<K>(api: Api<K>, cfg: watcher::Config) -> (Store<K>, mpsc::UnboundedReceiver<Seen>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let (tx, rx) = mpsc::unbounded_channel();
    let stream = watcher(api, cfg).default_backoff().reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let seen = match ev {
                Ok(watcher::Event::Init) => Seen::Init,
                Ok(watcher::Event::InitApply(o)) => Seen::InitApply(o.name_any()),
                Ok(watcher::Event::InitDone) => Seen::InitDone,
                Ok(watcher::Event::Apply(o)) => Seen::Apply(o.name_any()),
                Ok(watcher::Event::Delete(o)) => Seen::Delete(o.name_any()),
                Err(e) => Seen::Error(e.to_string()),
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    (reader, rx)
}

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(WAIT, fut)
        .await
        .with_context(|| format!("timed out: {what}"))
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) -> Result<()> {
    bounded(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Collects events until `pred` matches one; returns everything seen up to and including it.
async fn until(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    pred: impl Fn(&Seen) -> bool,
) -> Result<Vec<Seen>> {
    let mut seen = Vec::new();
    bounded("watcher event", async {
        while let Some(ev) = rx.recv().await {
            let done = pred(&ev);
            seen.push(ev);
            if done {
                return Ok(());
            }
        }
        bail!("watcher task ended")
    })
    .await??;
    Ok(seen)
}

fn names<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> BTreeSet<String> {
    store.state().iter().map(|o| o.name_any()).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn lists(log: &[RequestRecord], plural: &str) -> usize {
    log.iter().filter(|r| r.is_list_of(plural)).count()
}

#[tokio::test]
async fn initial_list_is_paged_and_complete() -> Result<()> {
    let (server, client) = start(no_bookmarks()).await?;
    let want: BTreeSet<String> = (0..25).map(|i| format!("svc-{i:02}")).collect();
    for (i, name) in want.iter().enumerate() {
        server.apply(
            "services",
            svc(if i % 2 == 0 { "default" } else { "apps" }, name, json!({})),
        )?;
    }
    server.apply_many(
        "endpointslices",
        (0..12).map(|i| slice("apps", &format!("s-{i}"), "svc-01", 3, i)),
    )?;

    let (store, _rx) = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().page_size(10),
    );
    let (slices, _srx) = reflect(
        Api::<EndpointSlice>::namespaced(client, "apps"),
        watcher::Config::default().page_size(5),
    );
    bounded("services ready", store.wait_until_ready()).await??;
    bounded("slices ready", slices.wait_until_ready()).await??;
    assert_eq!(names(&store), want);
    assert_eq!(slices.state().len(), 12);

    let log = server.request_log();
    let pages: Vec<_> = log.iter().filter(|r| r.is_list_of("services")).collect();
    assert_eq!(pages.len(), 3, "25 objects at limit=10: {pages:?}");
    assert!(pages.iter().all(|r| r.param("limit") == Some("10")));
    assert!(pages[0].param("continue").is_none() && pages[1].param("continue").is_some());
    assert_eq!(lists(&log, "endpointslices"), 3);
    assert!(
        log.iter()
            .any(|r| r.path == "/apis/discovery.k8s.io/v1/namespaces/apps/endpointslices")
    );
    server.wait_for_watches(2, WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn changes_and_selector_transitions_reach_the_store() -> Result<()> {
    let (server, client) = start(no_bookmarks()).await?;
    server.apply("services", svc("default", "a", json!({"app": "a"})))?;
    server.apply(
        "services",
        svc(
            "default",
            "b",
            json!({"service.kubernetes.io/headless": ""}),
        ),
    )?;
    server.apply(
        "services",
        svc(
            "default",
            "c",
            json!({"service.kubernetes.io/service-proxy-name": "x"}),
        ),
    )?;

    let cfg = watcher::Config::default().labels(PROXY_SELECTOR);
    let (store, mut rx) = reflect(Api::<Service>::all(client), cfg);
    until(&mut rx, |e| *e == Seen::InitDone).await?;
    assert_eq!(names(&store), set(&["a"]), "filtered server-side");
    server.wait_for_watches(1, WAIT).await?;
    let log = server.request_log();
    assert!(
        log.iter()
            .all(|r| r.param("labelSelector") == Some(PROXY_SELECTOR)),
        "{log:?}"
    );

    server.apply("services", svc("default", "d", json!({})))?;
    until(&mut rx, |e| *e == Seen::Apply("d".into())).await?;
    let mut modified = svc("default", "a", json!({"app": "a"}));
    modified["spec"]["ports"][0]["name"] = json!("web");
    server.apply("services", modified)?;
    until(&mut rx, |e| *e == Seen::Apply("a".into())).await?;
    let port = store
        .state()
        .iter()
        .find(|s| s.name_any() == "a")
        .and_then(|s| s.spec.as_ref()?.ports.as_ref()?.first()?.name.clone());
    assert_eq!(port.as_deref(), Some("web"));
    server.delete("services", "default", "d")?;
    until(&mut rx, |e| *e == Seen::Delete("d".into())).await?;

    // Gaining an excluded label looks like a delete; losing it like an add.
    server.apply(
        "services",
        svc(
            "default",
            "a",
            json!({"service.kubernetes.io/headless": ""}),
        ),
    )?;
    until(&mut rx, |e| *e == Seen::Delete("a".into())).await?;
    server.apply("services", svc("default", "b", json!({})))?;
    until(&mut rx, |e| *e == Seen::Apply("b".into())).await?;
    assert_eq!(names(&store), set(&["b"]));
    assert_eq!(lists(&server.request_log(), "services"), 1, "no relist");
    Ok(())
}

#[tokio::test]
async fn bookmarks_keep_an_idle_watch_alive_and_advance_its_rv() -> Result<()> {
    let (server, client) = start(quick_bookmarks()).await?;
    server.apply("services", svc("default", "a", json!({})))?;
    let (store, mut rx) = reflect(Api::<Service>::all(client), watcher::Config::default());
    until(&mut rx, |e| *e == Seen::InitDone).await?;
    server.wait_for_watches(1, WAIT).await?;

    // Writes to another resource move the global RV; only bookmarks tell the watcher.
    let node_rv = server.apply("nodes", json!({"metadata": {"name": "n1"}}))?;
    let before = server.bookmarks_sent();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(server.bookmarks_sent() >= before + 3, "bookmarks were sent");
    let log = server.request_log();
    assert_eq!(
        (
            lists(&log, "services"),
            log.iter().filter(|r| r.is_watch()).count()
        ),
        (1, 1)
    );

    server.sever_watches();
    let resumed = server
        .wait_for_request(
            |r| r.is_watch() && r.param("resourceVersion") != Some("1"),
            WAIT,
        )
        .await?;
    assert_eq!(
        resumed.param("resourceVersion"),
        Some(node_rv.to_string().as_str())
    );
    assert_eq!(
        lists(&server.request_log(), "services"),
        1,
        "resumed without a relist"
    );
    assert_eq!(names(&store), set(&["a"]));
    assert!(rx.try_recv().iter().all(|e| !matches!(e, Seen::Init)));
    Ok(())
}

#[tokio::test]
async fn watch_timeout_ends_the_stream_and_the_watcher_rewatches() -> Result<()> {
    let (server, client) = start(no_bookmarks()).await?;
    server.apply("services", svc("default", "a", json!({})))?;
    let (store, mut rx) = reflect(
        Api::<Service>::all(client),
        watcher::Config::default().timeout(1),
    );
    until(&mut rx, |e| *e == Seen::InitDone).await?;
    let watches = || server.request_log().iter().filter(|r| r.is_watch()).count();
    wait_until("a second watch after timeoutSeconds=1", || watches() >= 2).await?;
    let log = server.request_log();
    assert!(
        log.iter()
            .filter(|r| r.is_watch())
            .all(|r| r.param("timeoutSeconds") == Some("1"))
    );
    assert_eq!(lists(&log, "services"), 1);
    server.apply("services", svc("default", "b", json!({})))?;
    until(&mut rx, |e| *e == Seen::Apply("b".into())).await?;
    assert_eq!(names(&store), set(&["a", "b"]));
    Ok(())
}

#[tokio::test]
async fn compaction_forces_a_relist_that_drops_stale_objects() -> Result<()> {
    let (server, client) = start(no_bookmarks()).await?;
    for n in ["a", "b", "c"] {
        server.apply("services", svc("default", n, json!({})))?;
    }
    let (store, mut rx) = reflect(Api::<Service>::all(client), watcher::Config::default());
    until(&mut rx, |e| *e == Seen::InitDone).await?;
    server.wait_for_watches(1, WAIT).await?;

    // Phase 1: compact, then cut the watch; the resumed watch gets the in-stream 410.
    server.clear_request_log();
    server.compact();
    server.sever_watches();
    let seen = until(&mut rx, |e| *e == Seen::InitDone).await?;
    assert!(
        seen.iter()
            .any(|e| matches!(e, Seen::Error(m) if m.contains("410") || m.contains("too old"))),
        "{seen:?}"
    );
    let log = server.request_log();
    let first_watch = log
        .iter()
        .position(|r| r.is_watch())
        .context("a resumed watch")?;
    let relist = log
        .iter()
        .position(|r| r.is_list_of("services"))
        .context("a relist")?;
    assert!(
        first_watch < relist,
        "watch got 410, then relisted: {log:?}"
    );
    assert!(log[relist].param("continue").is_none());
    assert_eq!(names(&store), set(&["a", "b", "c"]));

    // Phase 2: b is deleted while the watch is down; only the relist can tell the watcher.
    server.wait_for_watches(1, WAIT).await?;
    server.stop().await?;
    server.delete("services", "default", "b")?;
    server.compact();
    server.restart().await?;
    let seen = until(&mut rx, |e| *e == Seen::InitDone).await?;
    let tail: Vec<_> = seen
        .iter()
        .filter(|e| !matches!(e, Seen::Error(_)))
        .cloned()
        .collect();
    assert_eq!(
        tail,
        vec![
            Seen::Init,
            Seen::InitApply("a".into()),
            Seen::InitApply("c".into()),
            Seen::InitDone
        ]
    );
    assert_eq!(
        names(&store),
        set(&["a", "c"]),
        "stale b dropped by the atomic swap"
    );
    Ok(())
}

#[tokio::test]
async fn severed_watch_resumes_from_last_rv_without_listing() -> Result<()> {
    let (server, client) = start(no_bookmarks()).await?;
    server.apply("services", svc("default", "a", json!({})))?;
    let (store, mut rx) = reflect(Api::<Service>::all(client), watcher::Config::default());
    until(&mut rx, |e| *e == Seen::InitDone).await?;
    server.wait_for_watches(1, WAIT).await?;
    let rv_x = server.apply("services", svc("default", "x", json!({})))?;
    until(&mut rx, |e| *e == Seen::Apply("x".into())).await?;

    server.clear_request_log();
    server.sever_watches();
    server.apply("services", svc("default", "y", json!({})))?;
    let seen = until(&mut rx, |e| *e == Seen::Apply("y".into())).await?;
    // kube-client reads a mid-chunk EOF as a resumable end of stream, so nothing surfaces.
    assert!(
        !seen.iter().any(|e| matches!(e, Seen::Error(_))),
        "{seen:?}"
    );
    assert_eq!(names(&store), set(&["a", "x", "y"]));
    let log = server.request_log();
    assert_eq!(lists(&log, "services"), 0, "{log:?}");
    let resumed = log.iter().find(|r| r.is_watch()).context("resumed watch")?;
    assert_eq!(
        resumed.param("resourceVersion"),
        Some(rv_x.to_string().as_str())
    );
    Ok(())
}

#[tokio::test]
async fn outage_then_recovery() -> Result<()> {
    let (server, client) = start(no_bookmarks()).await?;
    server.apply("services", svc("default", "a", json!({})))?;
    let (store, mut rx) = reflect(Api::<Service>::all(client), watcher::Config::default());
    until(&mut rx, |e| *e == Seen::InitDone).await?;
    server.wait_for_watches(1, WAIT).await?;

    server.stop().await?;
    let refused = tokio::net::TcpStream::connect(server.addr()).await;
    assert!(refused.is_err(), "connection refused while down");
    server.apply("services", svc("default", "z", json!({})))?;
    let errors = until(&mut rx, |e| matches!(e, Seen::Error(_))).await?;
    assert!(!errors.is_empty());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let down_since = server.request_log().len();
    server.restart().await?;
    until(&mut rx, |e| *e == Seen::Apply("z".into())).await?;
    assert_eq!(names(&store), set(&["a", "z"]));
    let after = server.request_log();
    assert_eq!(
        lists(&after[down_since..], "services"),
        0,
        "resumed by WATCH, no flush/relist"
    );
    Ok(())
}

#[tokio::test]
async fn streaming_list_initial_events() -> Result<()> {
    let (server, client) = start(quick_bookmarks()).await?;
    server.apply_many(
        "services",
        (0..5).map(|i| svc("default", &format!("s{i}"), json!({}))),
    )?;
    let (store, mut rx) = reflect(
        Api::<Service>::all(client),
        watcher::Config::default().streaming_lists(),
    );
    until(&mut rx, |e| *e == Seen::InitDone).await?;
    assert_eq!(store.state().len(), 5);
    let log = server.request_log();
    assert_eq!(lists(&log, "services"), 0);
    assert!(
        log.iter()
            .any(|r| r.param("sendInitialEvents") == Some("true"))
    );
    Ok(())
}

#[tokio::test]
async fn get_discovery_errors_and_kubeconfig() -> Result<()> {
    let (server, _) = start(no_bookmarks()).await?;
    server.apply(
        "nodes",
        json!({"metadata": {"name": "n1", "labels": {"role": "x"}}}),
    )?;
    let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig(&server.url()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let client = Client::try_from(cfg)?;

    let version = bounded("version", client.apiserver_version()).await??;
    assert_eq!(version.major, "1");
    let nodes: Api<Node> = Api::all(client.clone());
    assert_eq!(
        bounded("get", nodes.get("n1"))
            .await??
            .labels()
            .get("role")
            .map(String::as_str),
        Some("x")
    );
    match bounded("get missing", nodes.get("n2")).await? {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound")),
        other => bail!("expected a 404 Status, got {other:?}"),
    }
    let lp = ListParams::default().labels("role in (x");
    assert!(
        matches!(bounded("bad selector", nodes.list(&lp)).await?, Err(kube::Error::Api(s)) if s.code == 400)
    );

    let discovery = bounded("discovery", kube::discovery::Discovery::new(client).run()).await??;
    let kinds: BTreeMap<String, bool> = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .map(|(ar, caps)| (ar.plural, caps.scope == kube::discovery::Scope::Namespaced))
        .collect();
    assert_eq!(kinds.get("endpointslices"), Some(&true));
    assert_eq!(kinds.get("services"), Some(&true));
    assert_eq!(kinds.get("nodes"), Some(&false));
    Ok(())
}

/// Tiny deterministic PRNG, so the churn is reproducible without a dependency.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn rvs(objs: impl IntoIterator<Item = (String, String)>) -> BTreeMap<String, String> {
    objs.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_thousand_services_ten_thousand_changes() -> Result<()> {
    let (server, client) = start(quick_bookmarks()).await?;
    const N: usize = 1000;
    server.apply_many(
        "services",
        (0..N).map(|i| svc("churn", &format!("svc-{i}"), json!({}))),
    )?;
    server.apply_many(
        "endpointslices",
        (0..N).map(|i| {
            slice(
                "churn",
                &format!("svc-{i}-a"),
                &format!("svc-{i}"),
                10,
                i as u64,
            )
        }),
    )?;

    let (services, mut srx) = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels(PROXY_SELECTOR),
    );
    let (slices, mut erx) = reflect(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default(),
    );
    until(&mut srx, |e| *e == Seen::InitDone).await?;
    until(&mut erx, |e| *e == Seen::InitDone).await?;
    server.wait_for_watches(2, WAIT).await?;

    let started = Instant::now();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for step in 0..10_000u64 {
        let i = rng.below(N);
        let (svc_name, slice_name) = (format!("svc-{i}"), format!("svc-{i}-a"));
        match rng.below(10) {
            0..=5 => {
                let n = 1 + rng.below(10);
                server.apply(
                    "endpointslices",
                    slice("churn", &slice_name, &svc_name, n, step),
                )?;
            }
            6 => {
                let labels = if rng.below(2) == 0 {
                    json!({"service.kubernetes.io/headless": ""})
                } else {
                    json!({"v": step.to_string()})
                };
                server.apply("services", svc("churn", &svc_name, labels))?;
            }
            7 => {
                let _ = server.delete("endpointslices", "churn", &slice_name);
            }
            _ => {
                server.apply(
                    "services",
                    svc("churn", &svc_name, json!({"v": step.to_string()})),
                )?;
            }
        }
    }
    let write_time = started.elapsed();

    let want_svcs = || {
        rvs(server
            .list("services")
            .iter()
            .filter(|s| {
                s.pointer("/metadata/labels/service.kubernetes.io~1headless")
                    .is_none()
            })
            .map(|s| {
                (
                    s["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    s["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            }))
    };
    let want_slices = || {
        rvs(server.list("endpointslices").iter().map(|s| {
            (
                s["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                s["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }))
    };
    let have = |names: Vec<(String, String)>| rvs(names);
    wait_until("services converge", || {
        want_svcs()
            == have(
                services
                    .state()
                    .iter()
                    .map(|s| (s.name_any(), s.resource_version().unwrap_or_default()))
                    .collect(),
            )
    })
    .await?;
    wait_until("slices converge", || {
        want_slices()
            == have(
                slices
                    .state()
                    .iter()
                    .map(|s| (s.name_any(), s.resource_version().unwrap_or_default()))
                    .collect(),
            )
    })
    .await?;
    let log = server.request_log();
    assert_eq!(
        (lists(&log, "services"), lists(&log, "endpointslices")),
        (2, 2),
        "1000 objects at limit 500, no relist"
    );
    eprintln!(
        "churn: 10000 writes in {write_time:?}, converged after {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Raw HTTP: events arrive one per chunk as they happen, and a severed watch ends
/// without the terminating zero-length chunk (an abrupt cut, not a clean end).
#[tokio::test]
async fn raw_watch_is_chunked_flushed_and_severed_abruptly() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (server, _) = start(no_bookmarks()).await?;
    let rv = server.apply("services", svc("default", "a", json!({})))?;
    let mut conn = tokio::net::TcpStream::connect(server.addr()).await?;
    let req = format!(
        "GET /api/v1/namespaces/default/services?watch=1&resourceVersion={rv} HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await?;
    server.wait_for_watches(1, WAIT).await?;
    server.apply("services", svc("default", "b", json!({})))?;
    let mut buf = Vec::new();
    bounded("first event flushed", async {
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&buf).contains("\"name\":\"b\"") {
            let n = conn.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "closed early");
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    })
    .await??;
    let head = String::from_utf8_lossy(&buf).to_string();
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(head.contains("{\"type\":\"ADDED\",\"object\":"), "{head}");
    server.sever_watches();
    bounded("closed after sever", conn.read_to_end(&mut buf)).await??;
    assert!(
        !String::from_utf8_lossy(&buf).ends_with("0\r\n\r\n"),
        "no final chunk"
    );
    Ok(())
}
