//! End-to-end for the Kubernetes API source: the real lb-agent binary in API
//! mode, with a kubeconfig pointing at the fake API server on loopback (the
//! real list/watch protocol; no real kube-apiserver is exercised), the real
//! connect4 program in a child cgroup, and clients in network namespaces.
//! Privileged: run by `cargo xtask test` with `--test-threads=1`.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_fake_apiserver::{Config, FakeApiServer, kubeconfig};
use lb_tests::{
    Bins, ClientReport, Histogram, Lab, endpoints, http_status, metric, scrape, wait_client,
};
use lb_userspace::{
    datapath::{Datapath as _, backend_addr, bpf::BpfDatapath},
    model::{TranslateOptions, translate},
    reconciler::Reconciler,
};
use serde_json::{Value, json};

const SYNC: Duration = Duration::from_secs(15);
/// The longest retry delay of a failing watch (kube-runtime's default backoff).
const WATCH_BACKOFF_CAP: Duration = Duration::from_secs(30);
const PODS: &[(&str, u8)] = &[("pod-1", 11), ("pod-2", 12), ("pod-3", 13), ("pod-4", 14)];
const VIP: &str = "10.96.100.10";

fn bins() -> Bins {
    lb_tests::test_bins!()
}

fn pod_ip(octet: u8) -> String {
    format!("10.244.1.{octet}")
}

fn service(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ipFamilies": ["IPv4"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]},
    })
}

/// One slice of `svc`: (ip, ready, serving, terminating) per endpoint, port 80.
fn slice(name: &str, svc: &str, eps: &[(String, bool, bool, bool)]) -> Value {
    let eps: Vec<Value> = eps
        .iter()
        .map(|(ip, ready, serving, terminating)| {
            json!({"addresses": [ip],
                   "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
    })
}

fn ready_pods(octets: &[u8]) -> Vec<(String, bool, bool, bool)> {
    octets
        .iter()
        .map(|o| (pod_ip(*o), true, true, false))
        .collect()
}

/// A lab whose agent watches a fake API server. Drops the agent (unpinned)
/// before the namespaces, then the server, then its runtime.
struct ApiLab {
    lab: Lab,
    api: FakeApiServer,
    rt: tokio::runtime::Runtime,
}

impl ApiLab {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let cfg = Config {
            bookmark_interval: Duration::from_secs(1),
            ..Config::default()
        };
        let api = rt
            .block_on(FakeApiServer::start_with(cfg, ([127, 0, 0, 1], 0).into()))
            .expect("fake API server");
        let mut lab = Lab::new(&bins(), PODS, 80).expect("lab");
        let kc = lab.work.path().join("kubeconfig");
        std::fs::write(&kc, kubeconfig(&api.url())).expect("kubeconfig");
        lab.agent.kubeconfig = Some(kc);
        lab.agent.extra_args = vec!["--node-name".into(), "node-a".into()];
        Self { lab, api, rt }
    }

    fn start_agent(&mut self) {
        self.lab.agent.start().expect("agent start");
        self.lab.agent.wait_ready(SYNC).expect("agent ready");
    }

    fn connect(&self, n: u32) -> ClientReport {
        self.lab
            .client(&format!("{VIP}:80"), &["--count", &n.to_string()])
            .expect("client")
    }

    /// Waits until the VIP's endpoints are exactly `octets`.
    fn wait_endpoints(&mut self, octets: &[u8]) {
        let mut want: Vec<String> = octets
            .iter()
            .map(|o| format!("{}:80", pod_ip(*o)))
            .collect();
        want.sort();
        self.lab
            .agent
            .wait_for(&format!("endpoints {want:?}"), SYNC, |d| {
                endpoints(d, "default", "web", 80) == want
            })
            .expect("endpoints");
    }

    fn backends(report: &ClientReport) -> Vec<String> {
        report.backends.keys().cloned().collect()
    }
}

impl Drop for ApiLab {
    fn drop(&mut self) {
        let _ = self.lab.agent.stop();
    }
}

#[test]
fn api_objects_reach_the_maps_and_every_change_the_next_connects() {
    let mut l = ApiLab::new();
    l.api.apply("services", service("web", VIP)).unwrap();
    l.api
        .apply(
            "endpointslices",
            slice("web-1", "web", &ready_pods(&[11, 12])),
        )
        .unwrap();
    l.start_agent();
    l.wait_endpoints(&[11, 12]);
    let r = l.connect(200);
    assert_eq!(r.failed(), 0, "{r:?}");
    assert_eq!(ApiLab::backends(&r), ["pod-1", "pod-2"], "{r:?}");

    // Scale up, with a second slice.
    l.api
        .apply(
            "endpointslices",
            slice("web-2", "web", &ready_pods(&[13, 14])),
        )
        .unwrap();
    l.wait_endpoints(&[11, 12, 13, 14]);
    let r = l.connect(400);
    assert_eq!(r.failed(), 0, "{r:?}");
    assert_eq!(r.backends.len(), 4, "{r:?}");

    // Scale down.
    l.api.delete("endpointslices", "default", "web-2").unwrap();
    l.wait_endpoints(&[11, 12]);
    let r = l.connect(200);
    assert_eq!(ApiLab::backends(&r), ["pod-1", "pod-2"], "{r:?}");

    // pod-1 not ready (terminating, still serving): only ready ones are used.
    let eps = vec![
        (pod_ip(11), false, true, true),
        (pod_ip(12), true, true, false),
    ];
    l.api
        .apply("endpointslices", slice("web-1", "web", &eps))
        .unwrap();
    l.wait_endpoints(&[12]);
    let r = l.connect(100);
    assert_eq!(ApiLab::backends(&r), ["pod-2"], "{r:?}");

    // Nothing ready: serving+terminating endpoints take over (KEP-1669).
    let eps = vec![
        (pod_ip(11), false, true, true),
        (pod_ip(12), false, false, true),
    ];
    l.api
        .apply("endpointslices", slice("web-1", "web", &eps))
        .unwrap();
    l.wait_endpoints(&[11]);
    let r = l.connect(100);
    assert_eq!(ApiLab::backends(&r), ["pod-1"], "{r:?}");

    // Nothing usable: refused at once.
    let eps = vec![(pod_ip(11), false, false, true)];
    l.api
        .apply("endpointslices", slice("web-1", "web", &eps))
        .unwrap();
    l.wait_endpoints(&[]);
    let r = l.connect(10);
    assert_eq!(r.errors.get("ECONNREFUSED"), Some(&10), "{r:?}");

    // The service deleted: the VIP is no longer translated (no route: ENETUNREACH).
    l.api.delete("services", "default", "web").unwrap();
    l.lab
        .agent
        .wait_for("web gone", SYNC, |d| {
            d["items"].as_array().is_some_and(|a| a.is_empty())
        })
        .unwrap();
    let r = l.connect(5);
    assert_eq!(r.errors.get("ENETUNREACH"), Some(&5), "{r:?}");
}

/// This agent's Node (`node-a`) with `addresses` (type, address) as its
/// `status.addresses`.
fn node(addresses: &[(&str, &str)]) -> Value {
    let addresses: Vec<Value> = addresses
        .iter()
        .map(|(t, a)| json!({"type": t, "address": a}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"kubernetes.io/hostname": "node-a"}},
        "status": {"addresses": addresses},
    })
}

/// The node addresses `list -o json` shows for `web`'s node port, sorted.
fn node_frontends(doc: &Value) -> Vec<String> {
    let mut ips: Vec<String> = lb_tests::find_service(doc, "default", "web")
        .and_then(|s| s["ports"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|p| Some(format!("{}:{}", p["nodeIp"].as_str()?, p["port"])))
        .collect();
    ips.sort();
    ips
}

/// Without `--node-ip`, the agent serves NodePorts on its Node's
/// `InternalIP` and `ExternalIP` addresses, and follows them when the Node
/// changes: the old address stops being translated (no route:
/// ENETUNREACH), the new ones answer.
#[test]
fn node_ports_follow_the_node_objects_addresses() {
    let mut l = ApiLab::new();
    let mut web = service("web", VIP);
    web["spec"]["type"] = json!("NodePort");
    web["spec"]["ports"][0]["nodePort"] = json!(30080);
    l.api.apply("services", web).unwrap();
    l.api
        .apply(
            "endpointslices",
            slice("web-1", "web", &ready_pods(&[11, 12])),
        )
        .unwrap();
    l.api
        .apply(
            "nodes",
            node(&[("Hostname", "node-a"), ("InternalIP", "10.250.0.1")]),
        )
        .unwrap();
    l.start_agent();
    l.lab
        .agent
        .wait_for("node port on InternalIP", SYNC, |d| {
            node_frontends(d) == ["10.250.0.1:30080", "127.0.0.1:30080"]
        })
        .unwrap();
    let r = l
        .lab
        .client("10.250.0.1:30080", &["--count", "100"])
        .unwrap();
    assert_eq!(r.failed(), 0, "{r:?}");
    assert_eq!(ApiLab::backends(&r), ["pod-1", "pod-2"], "{r:?}");

    l.api
        .apply(
            "nodes",
            node(&[
                ("InternalIP", "10.250.0.2"),
                ("ExternalIP", "10.250.0.3"),
                ("InternalDNS", "node-a.internal"),
            ]),
        )
        .unwrap();
    l.lab
        .agent
        .wait_for("node ports moved", SYNC, |d| {
            node_frontends(d) == ["10.250.0.2:30080", "10.250.0.3:30080", "127.0.0.1:30080"]
        })
        .unwrap();
    for ip in ["10.250.0.2", "10.250.0.3"] {
        let r = l
            .lab
            .client(&format!("{ip}:30080"), &["--count", "100"])
            .unwrap();
        assert_eq!(r.failed(), 0, "{ip} {r:?}");
        assert_eq!(ApiLab::backends(&r), ["pod-1", "pod-2"], "{ip} {r:?}");
    }
    let old = l.lab.client("10.250.0.1:30080", &["--count", "5"]).unwrap();
    assert_eq!(old.errors.get("ENETUNREACH"), Some(&5), "{old:?}");
}

#[test]
fn an_object_deleted_behind_a_410_is_removed_after_the_relist() {
    let mut l = ApiLab::new();
    l.api.apply("services", service("web", VIP)).unwrap();
    l.api
        .apply("services", service("gone", "10.96.100.11"))
        .unwrap();
    l.api
        .apply(
            "endpointslices",
            slice("web-1", "web", &ready_pods(&[11, 12])),
        )
        .unwrap();
    l.api
        .apply(
            "endpointslices",
            slice("gone-1", "gone", &ready_pods(&[13])),
        )
        .unwrap();
    l.start_agent();
    l.lab
        .agent
        .wait_for("both services", SYNC, |d| {
            d["items"].as_array().is_some_and(|a| a.len() == 2)
        })
        .unwrap();
    let lists_before = l
        .api
        .request_log()
        .iter()
        .filter(|r| r.is_list_of("services"))
        .count();
    // The connection drops; meanwhile "gone" is deleted and the event log is
    // compacted, so the resumed watch gets an in-stream 410 and relists.
    l.rt.block_on(l.api.stop()).unwrap();
    l.api.delete("services", "default", "gone").unwrap();
    l.api.delete("endpointslices", "default", "gone-1").unwrap();
    l.api.compact();
    l.rt.block_on(l.api.restart()).unwrap();
    let doc = l
        .lab
        .agent
        .wait_for("gone removed", SYNC, |d| {
            d["items"].as_array().is_some_and(|a| a.len() == 1)
        })
        .unwrap();
    assert_eq!(doc["items"][0]["name"], "web");
    assert_eq!(
        endpoints(&doc, "default", "web", 80).len(),
        2,
        "web untouched"
    );
    let lists_after = l
        .api
        .request_log()
        .iter()
        .filter(|r| r.is_list_of("services"))
        .count();
    assert!(lists_after > lists_before, "relisted");
    // The agent counted it: after the initial list, exactly one more.
    let health = l.lab.agent.wait_health_addr(SYNC).unwrap();
    let figures = scrape(health).unwrap();
    assert_eq!(
        metric(&figures, "lb_relists_total", &[("resource", "services")]),
        Some(1.0)
    );
    let r = l.connect(100);
    assert_eq!(r.failed(), 0, "{r:?}");
    let r = l.lab.client("10.96.100.11:80", &["--count", "5"]).unwrap();
    assert_eq!(r.errors.get("ENETUNREACH"), Some(&5), "{r:?}");
}

#[test]
fn severed_watches_resume_without_flushing_or_failing_a_connect() {
    let mut l = ApiLab::new();
    l.api.apply("services", service("web", VIP)).unwrap();
    l.api
        .apply(
            "endpointslices",
            slice("web-1", "web", &ready_pods(&[11, 12, 13])),
        )
        .unwrap();
    l.start_agent();
    l.wait_endpoints(&[11, 12, 13]);
    let before = l.lab.agent.list_json().unwrap();
    let client = l
        .lab
        .spawn_client(&format!("{VIP}:80"), &["--duration-ms", "3000"])
        .unwrap();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(400));
        l.api.sever_watches();
    }
    let report = wait_client(client).unwrap();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.backends.len(), 3, "{report:?}");
    assert_eq!(l.lab.agent.list_json().unwrap()["items"], before["items"]);
    // The watches are back: a change still arrives, with no relist.
    l.rt.block_on(l.api.wait_for_watches(2, SYNC)).unwrap();
    let lists = |api: &FakeApiServer| {
        api.request_log()
            .iter()
            .filter(|r| r.is_list_of("services") || r.is_list_of("endpointslices"))
            .count()
    };
    let lists_before = lists(&l.api);
    l.api
        .apply("endpointslices", slice("web-1", "web", &ready_pods(&[14])))
        .unwrap();
    l.wait_endpoints(&[14]);
    assert_eq!(lists(&l.api), lists_before, "resumed, not relisted");
    let r = l.connect(50);
    assert_eq!(ApiLab::backends(&r), ["pod-4"], "{r:?}");
}

#[test]
fn an_agent_restarted_while_the_api_is_down_keeps_connectivity_and_is_not_ready() {
    let mut l = ApiLab::new();
    l.api.apply("services", service("web", VIP)).unwrap();
    l.api
        .apply(
            "endpointslices",
            slice("web-1", "web", &ready_pods(&[11, 12])),
        )
        .unwrap();
    l.start_agent();
    l.wait_endpoints(&[11, 12]);
    let health = l.lab.agent.wait_health_addr(SYNC).unwrap();
    assert_eq!(http_status(health, "/readyz").unwrap(), 200);
    let before = l.lab.agent.list_json().unwrap();

    l.lab.agent.stop().unwrap();
    l.rt.block_on(l.api.stop()).unwrap();
    l.lab.agent.start().unwrap();
    let health = l.lab.agent.wait_health_addr(SYNC).unwrap();
    assert_eq!(http_status(health, "/healthz").unwrap(), 200);
    // Attached and adopted, but no source: not ready, and nothing flushed.
    l.lab
        .agent
        .wait_for("attached", SYNC, |d| d["attached"] == true)
        .unwrap();
    for _ in 0..4 {
        assert_eq!(http_status(health, "/readyz").unwrap(), 503);
        let r = l.connect(50);
        assert_eq!(r.failed(), 0, "{r:?}");
        assert_eq!(r.backends.len(), 2, "{r:?}");
        assert_eq!(l.lab.agent.list_json().unwrap()["items"], before["items"]);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        l.lab
            .agent
            .current_log()
            .contains("re-adopted pinned state")
    );

    // The API is back (with one more endpoint): ready, and in sync.
    l.api
        .apply(
            "endpointslices",
            slice("web-1", "web", &ready_pods(&[11, 12, 13])),
        )
        .unwrap();
    l.rt.block_on(l.api.restart()).unwrap();
    l.wait_endpoints(&[11, 12, 13]);
    // Each watch retries on its own backoff (kube-runtime's default, as
    // client-go's: 0.8 s doubling to 30 s, jittered), so the services watch
    // may come back up to 30 s after the slices watch did, when the outage
    // ran long on a loaded machine.
    let deadline = Instant::now() + WATCH_BACKOFF_CAP + SYNC;
    while http_status(health, "/readyz").unwrap() != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready after the API came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = l.connect(300);
    assert_eq!(r.failed(), 0, "{r:?}");
    assert_eq!(r.backends.len(), 3, "{r:?}");
}

/// xorshift64*: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const CHURN_SERVICES: usize = 1_000;
const CHURN_ENDPOINTS: usize = 10;
const CHURN_CHANGES: usize = 10_000;

fn churn_vip(i: usize) -> String {
    format!("10.97.{}.{}", i / 250, i % 250 + 1)
}

/// Endpoint `e` of service `i` in generation `g` (addresses only, never dialled).
fn churn_ep(i: usize, e: usize, g: u64) -> String {
    format!(
        "10.{}.{}.{}",
        100 + (g % 100),
        i / 250 * 10 + e,
        i % 250 + 1
    )
}

fn churn_slice(i: usize, state: &[(u64, bool)]) -> Value {
    let eps: Vec<(String, bool, bool, bool)> = state
        .iter()
        .enumerate()
        .map(|(e, (g, ready))| (churn_ep(i, e, *g), *ready, *ready, false))
        .collect();
    slice(&format!("s{i}-1"), &format!("s{i}"), &eps)
}

/// Frontend → (namespace/name, sorted backends), from the pinned maps.
fn pinned_state(bpffs: &std::path::Path) -> BTreeMap<String, (String, Vec<SocketAddr>)> {
    let r = Reconciler::adopt(BpfDatapath::open(bpffs).expect("open pins")).expect("adopt");
    let snap = r.datapath().snapshot().expect("snapshot");
    r.installed()
        .iter()
        .map(|(fe, i)| {
            let mut b: Vec<SocketAddr> = i
                .slots()
                .map(|id| backend_addr(&snap.backends[&id]))
                .collect();
            b.sort();
            (
                fe.to_string(),
                (format!("{}/{}", i.service.namespace, i.service.name), b),
            )
        })
        .collect()
}

/// The same, from a fresh translation of the fake API server's objects.
fn expected_state(api: &FakeApiServer) -> BTreeMap<String, (String, Vec<SocketAddr>)> {
    let services: Vec<Service> = api
        .list("services")
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    let slices: Vec<EndpointSlice> = api
        .list("endpointslices")
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    let opts = TranslateOptions {
        node_name: Some("node-a".into()),
        ..TranslateOptions::default()
    };
    let (desired, _) = translate(&services, &slices, &opts);
    desired
        .into_iter()
        .map(|(fe, d)| {
            (
                fe.to_string(),
                (
                    format!("{}/{}", d.service.namespace, d.service.name),
                    d.backends,
                ),
            )
        })
        .collect()
}

fn vm_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn churn_of_ten_thousand_endpoint_changes_ends_exactly_in_sync() {
    let started = Instant::now();
    let mut l = ApiLab::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut state: Vec<Vec<(u64, bool)>> = vec![vec![(0, true); CHURN_ENDPOINTS]; CHURN_SERVICES];
    l.api
        .apply_many(
            "services",
            (0..CHURN_SERVICES).map(|i| service(&format!("s{i}"), &churn_vip(i))),
        )
        .unwrap();
    l.api
        .apply_many(
            "endpointslices",
            (0..CHURN_SERVICES).map(|i| churn_slice(i, &state[i])),
        )
        .unwrap();
    l.lab
        .agent
        .extra_args
        .extend(["--max-services".into(), "65536".into()]);
    l.start_agent();
    let synced = started.elapsed();
    let pid = l.lab.agent.pid().unwrap();
    let rss_synced = vm_kb(pid, "VmRSS:");
    assert_eq!(pinned_state(&l.lab.agent.bpffs), expected_state(&l.api));
    // The agent's own figures (no map is read for them) before the churn.
    let health = l.lab.agent.wait_health_addr(SYNC).unwrap();
    const PROGRAMMING: &str = "lb_network_programming_duration_seconds";
    let before = lb_tests::scrape_control_plane(health).unwrap();
    let programmed_before = Histogram::from_samples(&before, PROGRAMMING).unwrap();
    let syncs_before = metric(&before, "lb_sync_duration_seconds_count", &[]).unwrap();

    // 10,000 random endpoint changes (an endpoint moves, or flips ready),
    // in bursts of 20 every 10 ms: about 2,000 events a second.
    let churn = Instant::now();
    for n in 0..CHURN_CHANGES {
        let i = rng.below(CHURN_SERVICES as u64) as usize;
        let e = rng.below(CHURN_ENDPOINTS as u64) as usize;
        if rng.below(2) == 0 {
            state[i][e].0 += 1;
        } else {
            state[i][e].1 = !state[i][e].1;
        }
        l.api
            .apply("endpointslices", churn_slice(i, &state[i]))
            .unwrap();
        if n % 20 == 19 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let applied = churn.elapsed();
    let expected = expected_state(&l.api);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = pinned_state(&l.lab.agent.bpffs);
        if got == expected {
            break;
        }
        if Instant::now() > deadline {
            let diff: Vec<_> = expected
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(v))
                .take(5)
                .collect();
            panic!("maps differ from a fresh translation, e.g. {diff:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let converged = churn.elapsed();
    let hwm = vm_kb(pid, "VmHWM:");
    let rss = vm_kb(pid, "VmRSS:");
    // Each EndpointSlice event is one sample of the programming latency,
    // from its arrival to its map write (quantiles interpolated inside the
    // histogram's buckets; the max is the bound of the highest bucket).
    // The figures follow the map writes of the same sync: wait (a while)
    // for the last one's.
    let deadline = Instant::now() + SYNC;
    let after = loop {
        let after = lb_tests::scrape_control_plane(health).unwrap();
        let measured =
            metric(&after, &format!("{PROGRAMMING}_count"), &[]).unwrap() - programmed_before.count;
        if measured >= CHURN_CHANGES as f64 || Instant::now() > deadline {
            break after;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let programmed = Histogram::from_samples(&after, PROGRAMMING)
        .unwrap()
        .since(&programmed_before);
    let syncs = metric(&after, "lb_sync_duration_seconds_count", &[]).unwrap() - syncs_before;
    let events = programmed.count as u64;
    let us = |s: Option<f64>| (s.unwrap_or(f64::NAN) * 1e6) as u64;
    let (p50, p99, max) = (
        us(programmed.quantile(0.5)),
        us(programmed.quantile(0.99)),
        us(programmed.max_bound()),
    );
    println!(
        "churn: {CHURN_SERVICES} services x {CHURN_ENDPOINTS} endpoints synced in {synced:?}; \
         {CHURN_CHANGES} changes applied in {applied:?}, maps exact after {converged:?}; \
         event->map write latency over {events} EndpointSlice events in {syncs} syncs: \
         p50 {:.2} ms, p99 {:.2} ms, max under {:.2} ms; agent RSS after initial sync {} MiB, \
         now {} MiB, VmHWM {} MiB",
        p50 as f64 / 1000.0,
        p99 as f64 / 1000.0,
        max as f64 / 1000.0,
        rss_synced / 1024,
        rss / 1024,
        hwm / 1024,
    );
    assert!(
        events >= CHURN_CHANGES as u64,
        "every change measured: {events}"
    );
    assert!(
        syncs < CHURN_CHANGES as f64 / 5.0,
        "coalesced: {syncs} syncs"
    );
}

/// A dual-stack Service as the API server stores it (two `clusterIPs`, an
/// EndpointSlice per family): each ClusterIP balances over its own family's
/// pods, and an IPv6 slice change reaches only the IPv6 frontend.
#[test]
fn a_dual_stack_service_from_the_api_uses_each_familys_slice() {
    const VIP6: &str = "fd00:96::100:10";
    let mut l = ApiLab::new();
    let mut svc = service("web", VIP);
    svc["spec"]["clusterIPs"] = json!([VIP, VIP6]);
    svc["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    svc["spec"]["ipFamilyPolicy"] = json!("PreferDualStack");
    l.api.apply("services", svc).unwrap();
    l.api
        .apply(
            "endpointslices",
            slice("web-v4", "web", &ready_pods(&[11, 12])),
        )
        .unwrap();
    let v6 = |octets: &[u8]| -> Value {
        let mut s = slice(
            "web-v6",
            "web",
            &octets
                .iter()
                .map(|o| (lb_tests::pod_ip6(*o).to_string(), true, true, false))
                .collect::<Vec<_>>(),
        );
        s["addressType"] = json!("IPv6");
        s
    };
    l.api.apply("endpointslices", v6(&[13, 14])).unwrap();
    l.start_agent();
    let want = |octets: &[u8]| -> Vec<String> {
        let mut v: Vec<String> = octets
            .iter()
            .map(|o| {
                if *o < 13 {
                    format!("{}:80", pod_ip(*o))
                } else {
                    format!("[{}]:80", lb_tests::pod_ip6(*o))
                }
            })
            .collect();
        v.sort();
        v
    };
    let all = want(&[11, 12, 13, 14]);
    l.lab
        .agent
        .wait_for("both families", SYNC, |d| {
            let mut e = endpoints(d, "default", "web", 80);
            e.sort();
            e == all
        })
        .unwrap();
    let v4 = l.connect(200);
    assert_eq!(ApiLab::backends(&v4), ["pod-1", "pod-2"], "{v4:?}");
    let through6 = |l: &ApiLab| {
        l.lab
            .client(&format!("[{VIP6}]:80"), &["--count", "200"])
            .expect("client")
    };
    let r6 = through6(&l);
    assert_eq!(r6.failed(), 0, "{r6:?}");
    assert_eq!(ApiLab::backends(&r6), ["pod-3", "pod-4"], "{r6:?}");

    // An IPv6-only change moves only the IPv6 frontend.
    l.api.apply("endpointslices", v6(&[14])).unwrap();
    let now = want(&[11, 12, 14]);
    l.lab
        .agent
        .wait_for("IPv6 shrink", SYNC, |d| {
            let mut e = endpoints(d, "default", "web", 80);
            e.sort();
            e == now
        })
        .unwrap();
    let r6 = through6(&l);
    assert_eq!(ApiLab::backends(&r6), ["pod-4"], "{r6:?}");
    let v4 = l.connect(100);
    assert_eq!(ApiLab::backends(&v4), ["pod-1", "pod-2"], "{v4:?}");
}
