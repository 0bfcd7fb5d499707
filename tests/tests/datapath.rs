//! End-to-end: the real lb-agent binary loads the real connect4 program into
//! a child cgroup; a client in that cgroup connects from its own network
//! namespace to HTTP servers in pod namespaces. Privileged: run by
//! `cargo xtask test` with `--test-threads=1`.
use std::{
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{Bins, Lab, back_end_manifest, endpoints, run, service_ip, wait_client};

const SYNC: Duration = Duration::from_secs(10);
const PODS: &[(&str, u8)] = &[("back-end-1", 11), ("back-end-2", 12), ("back-end-3", 13)];

fn bins() -> Bins {
    lb_tests::test_bins!()
}

fn pod_ip(octet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, octet)
}

/// All three textbook pods, each ready or not.
fn back_end(ready: [bool; 3]) -> String {
    let pods: Vec<(&str, Ipv4Addr, bool)> = PODS
        .iter()
        .zip(ready)
        .map(|((name, octet), r)| (*name, pod_ip(*octet), r))
        .collect();
    back_end_manifest(&pods)
}

/// A lab running the agent on the textbook example; returns it and the
/// allocated ClusterIP once all `ready` pods are programmed.
fn lab_with_back_end(ready: [bool; 3]) -> (Lab, Ipv4Addr) {
    let mut lab = Lab::new(&bins(), PODS, 80).expect("lab");
    lab.write_manifest("back-end.yaml", &back_end(ready))
        .expect("manifest");
    lab.agent.start().expect("agent start");
    let want = ready.iter().filter(|r| **r).count();
    let doc = lab
        .agent
        .wait_for("back-end programmed", SYNC, |d| {
            service_ip(d, "default", "back-end").is_some()
                && endpoints(d, "default", "back-end", 80).len() == want
        })
        .expect("sync");
    let ip = service_ip(&doc, "default", "back-end").expect("cluster ip");
    (lab, ip)
}

/// Pearson's chi-square statistic of `counts` against a uniform spread.
fn chi_square(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let expected = total as f64 / counts.len() as f64;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

#[test]
fn connects_to_cluster_ip_spread_uniformly_over_backends() {
    let (lab, ip) = lab_with_back_end([true; 3]);
    assert!(
        ip.octets()[0] == 10 && (96..112).contains(&ip.octets()[1]),
        "allocated from 10.96.0.0/12: {ip}"
    );
    let report = lab
        .client(&format!("{ip}:80"), &["--count", "1500"])
        .unwrap();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.ok(), 1500);
    let counts: Vec<u64> = PODS
        .iter()
        .map(|(n, _)| report.backends.get(*n).copied().unwrap_or(0))
        .collect();
    // df = 2: 13.8 is p = 0.001; 20 keeps a real bias (say 40/30/30: chi² ≈ 30) visible.
    let chi = chi_square(&counts);
    assert!(chi < 20.0, "not uniform: {counts:?} (chi² = {chi:.1})");
    let doc = lab.agent.list_json().unwrap();
    assert!(doc["attached"].as_bool().unwrap());
    assert!(doc["counters"]["translated"].as_u64().unwrap() >= 1500);
}

#[test]
fn destinations_that_are_not_services_are_untouched() {
    let (lab, ip) = lab_with_back_end([true; 3]);
    // A pod IP straight from the attached cgroup: reaches exactly that pod.
    let direct = lab
        .client(&format!("{}:80", pod_ip(12)), &["--count", "50"])
        .unwrap();
    assert_eq!(direct.backends.get("back-end-2"), Some(&50), "{direct:?}");
    // The ClusterIP on a port that is not a service port is not rewritten,
    // and the client namespace has no route to it.
    let other_port = lab.client(&format!("{ip}:81"), &["--count", "5"]).unwrap();
    assert_eq!(
        other_port.errors.get("ENETUNREACH"),
        Some(&5),
        "{other_port:?}"
    );
    // Outside the attached cgroup the program does not run at all.
    let outside = lab
        .client_outside_cgroup(&format!("{ip}:80"), &["--count", "5"])
        .unwrap();
    assert_eq!(outside.errors.get("ENETUNREACH"), Some(&5), "{outside:?}");
}

#[test]
fn service_without_endpoints_refuses_connects_at_once() {
    let (lab, ip) = lab_with_back_end([false; 3]);
    let report = lab.client(&format!("{ip}:80"), &["--count", "20"]).unwrap();
    // Refused by the program at connect(): a connect that hung instead
    // would hit the client's 1 s timeout and count as ETIMEDOUT, and one
    // that was not rewritten would be ENETUNREACH.
    assert_eq!(report.errors.get("ECONNREFUSED"), Some(&20), "{report:?}");
    assert_eq!(report.ok(), 0);
    let doc = lab.agent.list_json().unwrap();
    assert!(doc["counters"]["noBackend"].as_u64().unwrap() >= 20);
}

#[test]
fn endpoint_changes_apply_to_new_connects() {
    let (mut lab, ip) = lab_with_back_end([true; 3]);
    let target = format!("{ip}:80");
    lab.write_manifest("back-end.yaml", &back_end([true, false, true]))
        .unwrap();
    let edited = Instant::now();
    lab.agent
        .wait_for("back-end-2 withdrawn", SYNC, |d| {
            endpoints(d, "default", "back-end", 80)
                == [format!("{}:80", pod_ip(11)), format!("{}:80", pod_ip(13))]
        })
        .unwrap();
    eprintln!("edit visible in the maps after {:?}", edited.elapsed());
    let report = lab.client(&target, &["--count", "600"]).unwrap();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.backends.get("back-end-2"), None, "{report:?}");
    assert_eq!(report.backends.len(), 2, "{report:?}");

    // Ready again, and then every pod gone: the service refuses.
    lab.write_manifest("back-end.yaml", &back_end([true; 3]))
        .unwrap();
    lab.agent
        .wait_for("back-end-2 back", SYNC, |d| {
            endpoints(d, "default", "back-end", 80).len() == 3
        })
        .unwrap();
    let report = lab.client(&target, &["--count", "300"]).unwrap();
    assert_eq!(report.backends.len(), 3, "{report:?}");
    lab.write_manifest("back-end.yaml", &back_end_manifest(&[]))
        .unwrap();
    lab.agent
        .wait_for("no endpoints", SYNC, |d| {
            endpoints(d, "default", "back-end", 80).is_empty()
        })
        .unwrap();
    let report = lab.client(&target, &["--count", "5"]).unwrap();
    assert_eq!(report.errors.get("ECONNREFUSED"), Some(&5), "{report:?}");

    // The service itself removed: its frontend leaves the maps.
    lab.remove_manifest("back-end.yaml").unwrap();
    lab.agent
        .wait_for("service removed", SYNC, |d| {
            service_ip(d, "default", "back-end").is_none()
        })
        .unwrap();
    let report = lab.client(&target, &["--count", "5"]).unwrap();
    assert_eq!(report.errors.get("ENETUNREACH"), Some(&5), "{report:?}");
}

#[test]
fn agent_restart_under_load_fails_no_connect() {
    let (mut lab, ip) = lab_with_back_end([true; 3]);
    let before = lab.agent.list_json().unwrap();
    let client = lab
        .spawn_client(&format!("{ip}:80"), &["--duration-ms", "4000"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    lab.agent.stop().expect("clean stop");
    // No agent: the pinned link keeps the program attached.
    std::thread::sleep(Duration::from_millis(700));
    lab.agent.start().unwrap();
    lab.agent.wait_ready(SYNC).unwrap();
    let report = wait_client(client).unwrap();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(report.ok() > 100, "{report:?}");
    assert_eq!(report.backends.len(), 3, "{report:?}");
    // Same ClusterIP and service id: state was re-adopted, not rebuilt.
    let after = lab.agent.list_json().unwrap();
    assert_eq!(after["items"], before["items"]);
    let log = lab.agent.log_text();
    assert!(log.contains("re-adopted pinned state"), "{log}");
}

#[test]
fn bad_manifests_are_reported_and_good_ones_keep_working() {
    let (mut lab, ip) = lab_with_back_end([true; 3]);
    lab.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [unclosed\n",
    )
    .unwrap();
    lab.write_manifest(
        "mixed.yaml",
        "apiVersion: v1
kind: Service
metadata:
  name: typo
spec:
  clusterIP: 10.96.50.1
  ports:
    - port: eighty
---
apiVersion: v1
kind: Service
metadata:
  name: fine
spec:
  clusterIP: 10.96.50.2
  selector:
    app: myapp
  ports:
    - port: 8080
      targetPort: 80
",
    )
    .unwrap();
    lab.agent
        .wait_for("service fine", SYNC, |d| {
            endpoints(d, "default", "fine", 8080).len() == 3
        })
        .unwrap();
    let log = lab.agent.log_text();
    assert!(log.contains("broken.yaml"), "{log}");
    assert!(
        log.contains("mixed.yaml") && log.contains("typo") && log.contains("spec.ports[0].port"),
        "{log}"
    );
    for target in [format!("{ip}:80"), "10.96.50.2:8080".to_owned()] {
        let report = lab.client(&target, &["--count", "30"]).unwrap();
        assert_eq!(report.ok(), 30, "{target}: {report:?}");
    }
    let doc = lab.agent.list_json().unwrap();
    assert!(service_ip(&doc, "default", "typo").is_none());
}

#[test]
fn list_prints_a_kubectl_like_table_with_or_without_the_agent() {
    let (mut lab, ip) = lab_with_back_end([true, true, false]);
    let check = |table: &str| {
        let lines: Vec<&str> = table.lines().collect();
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            [
                "NAMESPACE",
                "NAME",
                "TYPE",
                "CLUSTER-IP",
                "EXTERNAL-IP",
                "PORT(S)",
                "ENDPOINTS"
            ]
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "default",
                "back-end",
                "ClusterIP",
                &ip.to_string(),
                "<none>",
                "80/TCP",
                "10.244.1.11:80,10.244.1.12:80"
            ],
            "{table}"
        );
    };
    check(&lab.agent.list(&[]).unwrap());
    lab.agent.stop().unwrap();
    check(&lab.agent.list(&[]).unwrap());
}

#[test]
fn uninstall_detaches_and_removes_pins() {
    let (mut lab, ip) = lab_with_back_end([true; 3]);
    lab.agent.stop().unwrap();
    let ok = lab.client(&format!("{ip}:80"), &["--count", "5"]).unwrap();
    assert_eq!(ok.ok(), 5, "still attached while no agent runs: {ok:?}");
    lab.agent.uninstall().unwrap();
    assert!(!lab.agent.bpffs.exists());
    let report = lab.client(&format!("{ip}:80"), &["--count", "5"]).unwrap();
    assert_eq!(report.errors.get("ENETUNREACH"), Some(&5), "{report:?}");
}

/// `web` selects its own Pods (same pod IPs) whose container port is named
/// `web`; port 8080 is served on TCP through the named targetPort and on UDP.
const WEB: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 10.96.7.7
  selector:
    app: web
  ports:
    - name: http
      port: 8080
      protocol: TCP
      targetPort: web
    - name: echo
      port: 8080
      protocol: UDP
      targetPort: 80
";

fn web_pods() -> String {
    lb_tests::web_pods(PODS)
}

#[test]
fn multi_port_service_with_named_target_port_and_connected_udp() {
    let (mut lab, _) = lab_with_back_end([true; 3]);
    lab.write_manifest("web.yaml", &format!("{WEB}{}", web_pods()))
        .unwrap();
    let doc = lab
        .agent
        .wait_for("web programmed", SYNC, |d| {
            endpoints(d, "default", "web", 8080).len() == 6
        })
        .unwrap();
    let ports: Vec<&str> = lb_tests::find_service(&doc, "default", "web").unwrap()["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["protocol"].as_str().unwrap())
        .collect();
    assert_eq!(ports, ["TCP", "UDP"]);
    let tcp = lab.client("10.96.7.7:8080", &["--count", "300"]).unwrap();
    assert_eq!(tcp.failed(), 0, "{tcp:?}");
    assert_eq!(tcp.backends.len(), 3, "{tcp:?}");
    let udp = lab
        .client("10.96.7.7:8080", &["--count", "300", "--udp"])
        .unwrap();
    assert_eq!(udp.failed(), 0, "{udp:?}");
    assert_eq!(udp.backends.len(), 3, "{udp:?}");
}

/// Issue 11's sizing rule, as a new user meets it: with no sizing flag at
/// all, 10,000 Services of 10 endpoints each (and the textbook one) are
/// every one programmed, none waits for room, and connects are balanced.
#[test]
fn the_default_sizes_hold_ten_thousand_services_of_ten_endpoints() {
    const SERVICES: u32 = 10_000;
    let mut lab = Lab::new(&bins(), PODS, 80).unwrap();
    lab.write_manifest("back-end.yaml", &back_end([true; 3]))
        .unwrap();
    let mut many = String::new();
    for i in 0..SERVICES {
        // Inside the default service CIDR, away from what it allocates
        // first; endpoints that no client of this test reaches.
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 1)) + i);
        let endpoints: String = (0..10u32)
            .map(|k| {
                let pod = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + i * 10 + k);
                format!("  - addresses: [\"{pod}\"]\n")
            })
            .collect();
        many.push_str(&format!(
            "---
apiVersion: v1
kind: Service
metadata:
  name: many-{i}
spec:
  clusterIP: {ip}
  ports:
    - port: 80
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: many-{i}
  labels:
    kubernetes.io/service-name: many-{i}
addressType: IPv4
ports:
  - port: 80
endpoints:
{endpoints}"
        ));
    }
    lab.write_manifest("many.yaml", &many).unwrap();
    assert!(lab.agent.extra_args.is_empty(), "no sizing flag");
    lab.agent.start().unwrap();
    let doc = lab
        .agent
        .wait_for("every service programmed", Duration::from_secs(60), |d| {
            d["items"].as_array().map(Vec::len) == Some(SERVICES as usize + 1)
        })
        .unwrap();
    assert_eq!(doc["counters"]["mapFull"], 0, "nothing waits for room");
    let items = doc["items"].as_array().unwrap();
    let short: Vec<&str> = items
        .iter()
        .filter(|s| s["name"].as_str().is_some_and(|n| n.starts_with("many-")))
        .filter(|s| s["ports"][0]["endpoints"].as_array().map(Vec::len) != Some(10))
        .filter_map(|s| s["name"].as_str())
        .take(5)
        .collect();
    assert!(
        short.is_empty(),
        "services without their 10 endpoints: {short:?}"
    );
    let ip = service_ip(&doc, "default", "back-end").unwrap();
    let report = lab.client(&format!("{ip}:80"), &["--count", "30"]).unwrap();
    assert_eq!(report.ok(), 30, "{report:?}");
}

#[test]
fn a_full_map_is_an_error_and_a_counter_and_other_services_keep_working() {
    let mut lab = Lab::new(&bins(), PODS, 80).unwrap();
    // back-end needs 3 backend slots, `big` 10: the array has 8. The
    // reverse map is sized on its own flag.
    lab.agent.extra_args = ["--max-backends", "8", "--max-reverse", "512"]
        .map(String::from)
        .to_vec();
    let addresses: String = (21..31)
        .map(|i| format!("  - addresses: [\"10.244.1.{i}\"]\n"))
        .collect();
    lab.write_manifest("back-end.yaml", &back_end([true; 3]))
        .unwrap();
    lab.write_manifest(
        "big.yaml",
        &format!(
            "apiVersion: v1
kind: Service
metadata:
  name: big
spec:
  clusterIP: 10.250.0.1
  ports:
    - port: 80
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: big-1
  labels:
    kubernetes.io/service-name: big
addressType: IPv4
ports:
  - port: 80
endpoints:
{addresses}"
        ),
    )
    .unwrap();
    lab.agent.start().unwrap();
    let doc = lab
        .agent
        .wait_for("map-full counted", SYNC, |d| {
            d["counters"]["mapFull"].as_u64() > Some(0)
        })
        .unwrap();
    assert_eq!(endpoints(&doc, "default", "back-end", 80).len(), 3);
    assert_eq!(doc["reverseMap"]["maxEntries"], 512, "{doc}");
    // Never half-visible: big has no service entry, so the program does not
    // know it (and a client gets ENETUNREACH, not a partial service).
    assert!(service_ip(&doc, "default", "big").is_none(), "{doc}");
    let log = lab.agent.log_text();
    assert!(
        log.contains("default/big") && log.contains("--max-backends"),
        "{log}"
    );
    let ip = service_ip(&doc, "default", "back-end").unwrap();
    let report = lab.client(&format!("{ip}:80"), &["--count", "30"]).unwrap();
    assert_eq!(report.ok(), 30, "{report:?}");
}

#[test]
fn bpf_log_reports_each_translation_only_when_asked() {
    let (mut lab, ip) = lab_with_back_end([true; 3]);
    let record = format!("connect4 {ip}:80 -> 10.244.1.");
    lab.client(&format!("{ip}:80"), &["--count", "3"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!lab.agent.log_text().contains(&record), "off by default");
    lab.agent.stop().unwrap();
    lab.agent.extra_args = vec!["--bpf-log".into()];
    lab.agent.start().unwrap();
    lab.agent.wait_ready(SYNC).unwrap();
    lab.client(&format!("{ip}:80"), &["--count", "3"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab.agent.log_text().contains(&record) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = lab.agent.log_text();
    assert!(log.contains(&record), "{log}");
}

#[test]
fn pins_of_an_older_layout_are_replaced_not_misread() {
    // Connects all through the upgrade: the running programs keep their
    // own maps while the pins are replaced, and stay attached until the
    // new agent has filled the new maps.
    let (mut lab, ip, during) = stopped_with_client_running();
    // What an agent from before the IPv6 maps left: a 12-byte LB_SERVICES
    // key (IPv4 address) and the IPv4-only reverse map; the backend hash of
    // agents before the backend array (same key and value sizes, another
    // type); and the debug switch array of agents before it became a
    // load-time global.
    let services = lab.agent.bpffs.join("LB_SERVICES");
    let backends = lab.agent.bpffs.join("LB_BACKENDS");
    let legacy_reverse = lab.agent.bpffs.join("LB_REVERSE4");
    let legacy_config = lab.agent.bpffs.join("LB_CONFIG");
    std::fs::remove_file(&services).unwrap();
    std::fs::remove_file(&backends).unwrap();
    for (pin, args) in [
        (
            &services,
            "type hash key 12 value 16 entries 1024 name LB_SERVICES flags 1",
        ),
        (
            &backends,
            "type hash key 4 value 20 entries 1024 name LB_BACKENDS flags 1",
        ),
        (
            &legacy_reverse,
            "type lru_hash key 16 value 12 entries 1024 name LB_REVERSE4",
        ),
        (
            &legacy_config,
            "type array key 4 value 4 entries 1 name LB_CONFIG",
        ),
    ] {
        run(Command::new("bpftool")
            .args(["map", "create"])
            .arg(pin)
            .args(args.split(' ')))
        .unwrap();
    }
    lab.agent.start().unwrap();
    lab.agent
        .wait_for("back-end re-programmed", SYNC, |d| {
            endpoints(d, "default", "back-end", 80).len() == 3
        })
        .unwrap();
    let show: serde_json::Value = serde_json::from_str(
        &run(Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&services))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(show["bytes_key"].as_u64(), Some(20), "{show}");
    let show: serde_json::Value = serde_json::from_str(
        &run(Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&backends))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(show["type"].as_str(), Some("array"), "{show}");
    assert!(
        !legacy_reverse.exists(),
        "the IPv4-only reverse map is gone"
    );
    assert!(!legacy_config.exists(), "the debug switch array is gone");
    let log = lab.agent.log_text();
    assert!(log.contains("another layout"), "{log}");
    let report = wait_client(during).unwrap();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.backends.len(), 3, "{report:?}");
    assert_old_programs_kept_until_synced(&lab);
    assert!(!lab.agent.bpffs.join("link_connect4_new").exists());
    let report = lab.client(&format!("{ip}:80"), &["--count", "30"]).unwrap();
    assert_eq!(report.ok(), 30, "{report:?}");
    assert_eq!(report.backends.len(), 3, "{report:?}");
}

/// An upgrade from an agent with the one-bit frontend filter and the
/// connected-socket hash: its pins have `LB_FILTER` but no `LB_FILTER2`
/// (the new one starts empty: programs reading it would pass every service
/// by) and have `LB_REVERSE_SOCK`. The new links wait for the first
/// complete sync (which fills the new filter), so no connect fails or goes
/// untranslated during the upgrade, and both legacy maps are unpinned (the
/// previous programs keep their own references until their links go).
#[test]
fn an_upgrade_that_changes_the_frontend_filter_translates_throughout() {
    let (mut lab, ip, during) = stopped_with_client_running();
    let filter = lab.agent.bpffs.join("LB_FILTER2");
    let legacy_filter = lab.agent.bpffs.join("LB_FILTER");
    let legacy_sock = lab.agent.bpffs.join("LB_REVERSE_SOCK");
    // The running programs' filter, under the name earlier versions gave it.
    std::fs::rename(&filter, &legacy_filter).unwrap();
    run(Command::new("bpftool")
        .args(["map", "create"])
        .arg(&legacy_sock)
        .args("type hash key 8 value 40 entries 1024 name LB_REVERSE_SOCK flags 1".split(' ')))
    .unwrap();
    lab.agent.start().unwrap();
    lab.agent
        .wait_for("back-end re-adopted", SYNC, |d| {
            endpoints(d, "default", "back-end", 80).len() == 3
        })
        .unwrap();
    let report = wait_client(during).unwrap();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.backends.len(), 3, "{report:?}");
    assert_old_programs_kept_until_synced(&lab);
    assert!(filter.exists(), "a new filter is pinned");
    assert!(!legacy_filter.exists(), "the one-bit filter is gone");
    assert!(!legacy_sock.exists(), "the connected-socket hash is gone");
    // The new programs alone now: every connect to the ClusterIP is
    // translated, so the filter holds its bit.
    let report = lab.client(&format!("{ip}:80"), &["--count", "30"]).unwrap();
    assert_eq!(report.ok(), 30, "{report:?}");
    assert_eq!(report.backends.len(), 3, "{report:?}");
}

/// A lab whose agent is stopped while a client connects to its service
/// for 4 s (the first 0.5 s before the stop): the start of an upgrade.
fn stopped_with_client_running() -> (Lab, Ipv4Addr, std::process::Child) {
    let (mut lab, ip) = lab_with_back_end([true; 3]);
    let during = lab
        .spawn_client(&format!("{ip}:80"), &["--duration-ms", "4000"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.agent.stop().unwrap();
    (lab, ip, during)
}

/// An upgrade kept the previous programs attached until the first complete
/// sync, then detached them (waits for the second log line).
fn assert_old_programs_kept_until_synced(lab: &Lab) {
    let deadline = Instant::now() + SYNC;
    while !lab
        .agent
        .log_text()
        .contains("previous programs are detached")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = lab.agent.log_text();
    assert!(
        log.contains("previous programs stay attached until the first complete sync")
            && log.contains("previous programs are detached"),
        "{log}"
    );
}
