//! Make-before-break against the real maps: a client hammers connect()s to
//! a service while the agent rewrites its backend set (and a second
//! service's) at random. Every connect must succeed and reach one of the
//! service's own pods. The backend array is kept tiny, so nearly every
//! change reuses a range another service or an older version held: a range
//! reused before its grace period (or written while live) would send a
//! connect to the other service's pods or to a torn address.
//! Privileged: run with `--test-threads=1`.
use std::time::{Duration, Instant};

use lb_tests::{Bins, Lab, endpoints, metric, scrape, wait_client};

const SYNC: Duration = Duration::from_secs(10);
/// Service `a` balances over the first three, `b` over the last three.
const PODS: &[(&str, u8)] = &[
    ("a-1", 21),
    ("a-2", 22),
    ("a-3", 23),
    ("b-1", 24),
    ("b-2", 25),
    ("b-3", 26),
];
const CLUSTER_IP_A: &str = "10.250.0.1";
const CLUSTER_IP_B: &str = "10.250.0.2";

fn bins() -> Bins {
    lb_tests::test_bins!()
}

/// A selectorless service with one EndpointSlice of the pods `octets`.
fn service(name: &str, ip: &str, octets: &[u8]) -> String {
    let endpoints: String = octets
        .iter()
        .map(|o| format!("  - addresses: [\"10.244.1.{o}\"]\n"))
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  clusterIP: {ip}
  ports:
    - port: 80
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
  - port: 80
endpoints:
{endpoints}"
    )
}

/// A non-empty random subset of `group`.
fn subset(group: &[u8], rng: &mut u64) -> Vec<u8> {
    loop {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let picked: Vec<u8> = group
            .iter()
            .enumerate()
            .filter(|(i, _)| *rng >> (i * 3) & 1 == 1)
            .map(|(_, o)| *o)
            .collect();
        if !picked.is_empty() {
            return picked;
        }
    }
}

#[test]
fn connects_racing_backend_changes_never_fail_nor_stray() {
    let mut lab = Lab::new(&bins(), PODS, 80).expect("lab");
    // Both services' live ranges (up to 3 slots each) and a new 3-slot
    // range in whatever holes they leave (two live ranges cut the rest in
    // up to three holes: 3 x 2 + 1 slots guarantee one of 3): 13 slots.
    // Every other change or so waits for a grace period and reuses a
    // released range.
    lab.agent.extra_args = vec!["--max-backends".into(), "13".into()];
    let (group_a, group_b) = ([21u8, 22, 23], [24u8, 25, 26]);
    lab.write_manifest("a.yaml", &service("a", CLUSTER_IP_A, &group_a))
        .unwrap();
    lab.write_manifest("b.yaml", &service("b", CLUSTER_IP_B, &group_b))
        .unwrap();
    lab.agent.start().unwrap();
    lab.agent
        .wait_for("both programmed", SYNC, |d| {
            endpoints(d, "default", "a", 80).len() == 3
                && endpoints(d, "default", "b", 80).len() == 3
        })
        .unwrap();

    let client = lab
        .spawn_client(&format!("{CLUSTER_IP_A}:80"), &["--duration-ms", "8000"])
        .unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let started = Instant::now();
    let mut changes = 0;
    while started.elapsed() < Duration::from_millis(7000) {
        let a = subset(&group_a, &mut rng);
        let b = subset(&group_b, &mut rng);
        lab.write_manifest("a.yaml", &service("a", CLUSTER_IP_A, &a))
            .unwrap();
        lab.write_manifest("b.yaml", &service("b", CLUSTER_IP_B, &b))
            .unwrap();
        let want = a.len();
        // Each change applied before the next, so every one is raced.
        lab.agent
            .wait_for("the change applied", SYNC, |d| {
                let mut got: Vec<String> = endpoints(d, "default", "a", 80);
                got.sort();
                let mut expect: Vec<String> =
                    a.iter().map(|o| format!("10.244.1.{o}:80")).collect();
                expect.sort();
                got.len() == want && got == expect
            })
            .unwrap();
        changes += 1;
    }
    let report = wait_client(client).unwrap();
    assert!(changes >= 5, "only {changes} changes in 7 s");
    assert!(report.ok() > 0, "{report:?}");
    assert_eq!(report.failed(), 0, "failed connects: {report:?}");
    let strays: Vec<&String> = report
        .backends
        .keys()
        .filter(|name| !name.starts_with("a-"))
        .collect();
    assert!(
        strays.is_empty(),
        "connects to a reached {strays:?}: {report:?}"
    );
    // The tiny backend array never refused a write, nor is any frontend
    // left failing.
    let health = lab.agent.wait_health_addr(SYNC).unwrap();
    let figures = scrape(health).unwrap();
    assert_eq!(
        metric(
            &figures,
            "lb_map_full_errors_total",
            &[("map", "LB_BACKENDS")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&figures, "lb_frontends", &[("state", "failed")]),
        Some(0.0)
    );
    eprintln!(
        "{changes} backend-set changes under {} connects: {:?}",
        report.attempts, report.backends
    );
}
