//! End-to-end: the control plane can be trusted. A newcomer never takes a
//! running Service's traffic, a full map lets waiting services in as soon as
//! there is room, and drift in the maps is repaired. The real lb-agent binary
//! on a manifest directory, real connects from a client namespace in the
//! attached cgroup. Privileged: run by `cargo xtask test` with
//! `--test-threads=1`.
use std::{net::Ipv4Addr, process::Command, time::Duration};

use lb_tests::{
    Bins, Lab, back_end_manifest, endpoints, find_service, pod_ip, pod_manifest, run, service_ip,
};

const SYNC: Duration = Duration::from_secs(15);
const PODS: &[(&str, u8)] = &[
    ("back-end-1", 11),
    ("back-end-2", 12),
    ("back-end-3", 13),
    ("intruder", 14),
];
const BACK_END: &[&str] = &["back-end-1", "back-end-2", "back-end-3"];
/// A ClusterIP both Services below name.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 10);

fn bins() -> Bins {
    lb_tests::test_bins!()
}

/// The textbook back-end with a fixed ClusterIP.
fn back_end() -> String {
    let pods: Vec<(&str, Ipv4Addr, bool)> = PODS[..3]
        .iter()
        .map(|(name, octet)| (*name, pod_ip(*octet), true))
        .collect();
    back_end_manifest(&pods).replacen("spec:\n", &format!("spec:\n  clusterIP: {CLUSTER_IP}\n"), 1)
}

/// A Service `name` selecting only the intruder pod, claiming `ip`:80.
fn intruder(name: &str, ip: Ipv4Addr) -> String {
    lb_tests::selector_service(name, ip, "intruder")
}

/// The intruder pod, in a file of its own.
fn intruder_pod() -> String {
    pod_manifest(
        "intruder",
        "default",
        &[("app", "intruder")],
        "    - name: c\n      image: nginx\n",
        pod_ip(14),
        true,
    )
}

/// Which pods answered `count` connects to `ip:80`.
fn answered_by(lab: &Lab, ip: Ipv4Addr, count: u32) -> Vec<String> {
    let report = lab
        .client(&format!("{ip}:80"), &["--count", &count.to_string()])
        .expect("client");
    assert_eq!(report.failed(), 0, "{report:?}");
    report.backends.keys().cloned().collect()
}

/// A newcomer claiming a ClusterIP a running Service holds is reported
/// (naming the newcomer's file) and skipped, even when its name and file
/// sort first; the running Service keeps every connect, also across an
/// agent restart. The same for a second definition of a running Service.
#[test]
fn a_newcomer_never_takes_a_running_services_traffic() {
    let mut lab = Lab::new(&bins(), PODS, 80).expect("lab");
    lab.write_manifest("m-back-end.yaml", &back_end()).unwrap();
    lab.write_manifest("pods.yaml", &intruder_pod()).unwrap();
    lab.agent.start().unwrap();
    lab.agent
        .wait_for("back-end", SYNC, |d| {
            endpoints(d, "default", "back-end", 80).len() == 3
        })
        .unwrap();
    assert_eq!(answered_by(&lab, CLUSTER_IP, 30), BACK_END);

    // "aaa" in "a.yaml": first by name and by file, last by arrival.
    lab.write_manifest("a.yaml", &intruder("aaa", CLUSTER_IP))
        .unwrap();
    // A second definition of back-end itself, in a file that sorts first,
    // pointing at the intruder pod.
    lab.write_manifest("0-twin.yaml", &intruder("back-end", CLUSTER_IP))
        .unwrap();
    // A marker edit after both, so the sync that saw them is known to be done.
    lab.write_manifest(
        "z-marker.yaml",
        &intruder("marker", Ipv4Addr::new(10, 96, 100, 11)),
    )
    .unwrap();
    lab.agent
        .wait_for("the marker", SYNC, |d| {
            find_service(d, "default", "marker").is_some()
        })
        .unwrap();
    assert_eq!(answered_by(&lab, CLUSTER_IP, 30), BACK_END);
    let log = lab.agent.current_log();
    assert!(
        log.lines()
            .any(|l| l.contains("a.yaml") && l.contains("Service default/aaa")),
        "the newcomer is not named:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("0-twin.yaml") && l.contains("Service default/back-end")),
        "the second definition is not named:\n{log}"
    );

    // A restart sees every file at once: the owner the maps name keeps it.
    lab.agent.stop().unwrap();
    lab.agent.start().unwrap();
    lab.agent.wait_ready(SYNC).unwrap();
    assert_eq!(answered_by(&lab, CLUSTER_IP, 30), BACK_END);
    let doc = lab.agent.list_json().unwrap();
    assert_eq!(service_ip(&doc, "default", "aaa"), None, "{doc}");
}

/// Services that did not fit in a full map are programmed as soon as room
/// is freed, without any further edit; until then /readyz names them.
#[test]
fn waiting_services_get_in_when_room_is_freed() {
    let mut lab = Lab::new(&bins(), PODS, 80).expect("lab");
    // One entry per service (a frontend): room for five.
    lab.agent
        .extra_args
        .extend(["--max-services".to_owned(), "5".to_owned()]);
    let svc = |i: u8| {
        back_end()
            .replace("name: back-end\n", &format!("name: svc-{i}\n"))
            .replace(
                &format!("clusterIP: {CLUSTER_IP}"),
                &format!("clusterIP: 10.96.101.{i}"),
            )
    };
    for i in 1..=7 {
        // The pods are defined once, in svc-1's file.
        let text = if i == 1 {
            svc(i)
        } else {
            svc(i).split("---").next().unwrap().to_owned()
        };
        lab.write_manifest(&format!("svc-{i}.yaml"), &text).unwrap();
    }
    lab.agent.start().unwrap();
    let health = lab.agent.wait_health_addr(SYNC).unwrap();
    let programmed = |d: &serde_json::Value| {
        (1..=7)
            .filter(|i| endpoints(d, "default", &format!("svc-{i}"), 80).len() == 3)
            .count()
    };
    lab.agent
        .wait_for("a full map", SYNC, |d| programmed(d) == 5)
        .unwrap();
    assert_eq!(lb_tests::http_status(health, "/readyz").unwrap(), 503);

    // Room for two: remove two programmed services (not svc-1: it has the pods).
    let doc = lab.agent.list_json().unwrap();
    let removable: Vec<u8> = (2..=7)
        .filter(|i| endpoints(&doc, "default", &format!("svc-{i}"), 80).len() == 3)
        .take(2)
        .collect();
    assert_eq!(removable.len(), 2, "{doc}");
    for i in &removable {
        lab.remove_manifest(&format!("svc-{i}.yaml")).unwrap();
    }
    lab.agent
        .wait_for("the waiting services", SYNC, |d| {
            (1..=7)
                .filter(|i| !removable.contains(i))
                .all(|i| endpoints(d, "default", &format!("svc-{i}"), 80).len() == 3)
        })
        .unwrap();
    lab.agent
        .wait_for("ready", SYNC, |_| {
            lb_tests::http_status(health, "/readyz").ok() == Some(200)
        })
        .unwrap();
    for i in (1..=7).filter(|i| !removable.contains(i)) {
        assert_eq!(
            answered_by(&lab, Ipv4Addr::new(10, 96, 101, i), 30).len(),
            3,
            "svc-{i}"
        );
    }
}

/// `LB_SERVICES` key of a frontend, as bpftool hex bytes: the v4-mapped
/// address, the port in network order, TCP, padding.
fn master_key(ip: Ipv4Addr, port: u16) -> Vec<String> {
    let mut key = vec![0u8; 10];
    key.extend([0xff, 0xff]);
    key.extend(ip.octets());
    key.extend(port.to_be_bytes());
    key.extend([6, 0]);
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// An entry deleted behind the agent's back is put back by the periodic
/// resync, with no edit of the sources.
#[test]
fn resync_repairs_drift() {
    let mut lab = Lab::new(&bins(), PODS, 80).expect("lab");
    lab.write_manifest("back-end.yaml", &back_end()).unwrap();
    lab.agent
        .extra_args
        .extend(["--resync-period".to_owned(), "1s".to_owned()]);
    lab.agent.start().unwrap();
    lab.agent
        .wait_for("back-end", SYNC, |d| {
            endpoints(d, "default", "back-end", 80).len() == 3
        })
        .unwrap();
    let pin = lab.agent.bpffs.join("LB_SERVICES");
    run(Command::new("bpftool")
        .args(["map", "delete", "pinned"])
        .arg(&pin)
        .arg("key")
        .arg("hex")
        .args(master_key(CLUSTER_IP, 80)))
    .expect("bpftool map delete");
    lab.agent
        .wait_for("the master entry back", SYNC, |d| {
            endpoints(d, "default", "back-end", 80).len() == 3
        })
        .unwrap();
    assert_eq!(answered_by(&lab, CLUSTER_IP, 30), BACK_END);
}

/// A selectorless Service `churn` whose slice holds the first `n` back-end pods.
fn churn(n: usize) -> String {
    let endpoints: String = PODS[..n]
        .iter()
        .map(|(_, octet)| format!("- addresses: [\"{}\"]\n", pod_ip(*octet)))
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: churn}}
spec:
  clusterIP: 10.96.100.20
  ports: [{{port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: churn-1
  labels: {{kubernetes.io/service-name: churn}}
addressType: IPv4
ports: [{{port: 80}}]
endpoints:
{endpoints}"
    )
}

/// Sustained edits (one every 50 ms for 10 s) never postpone syncs: the
/// maps follow the edits while they go on (the directory watch coalesces
/// with a cap, it does not wait for quiet), and end at the last one.
#[test]
fn sustained_edits_are_applied_while_they_go_on() {
    let mut lab = Lab::new(&bins(), PODS, 80).expect("lab");
    lab.write_manifest("churn.yaml", &churn(1)).unwrap();
    lab.agent.start().unwrap();
    lab.agent
        .wait_for("churn", SYNC, |d| {
            endpoints(d, "default", "churn", 80).len() == 1
        })
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Watches the maps (through `list`) while the edits go on.
    let watcher = {
        let (stop, bin, bpffs) = (stop.clone(), lab.agent.bin.clone(), lab.agent.bpffs.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = run(Command::new(&bin)
                    .args(["list", "-o", "json", "--bpffs"])
                    .arg(&bpffs))
                .unwrap();
                let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
                let n = endpoints(&doc, "default", "churn", 80).len();
                if seen.last() != Some(&n) {
                    seen.push(n);
                }
            }
            seen
        })
    };
    let edits = 200;
    for i in 0..edits {
        lab.write_manifest("churn.yaml", &churn(1 + (i + 1) % 3))
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    // The maps changed many times while the edits went on; waiting for a
    // quiet directory would have shown (almost) none of them.
    assert!(seen.len() > 20, "states seen during the edits: {seen:?}");
    let last = 1 + edits % 3;
    lab.agent
        .wait_for("the last edit", SYNC, |d| {
            endpoints(d, "default", "churn", 80).len() == last
        })
        .unwrap();
}
