//! End-to-end for session affinity (`sessionAffinity: ClientIP`): the
//! client is the socket's network namespace, so each test drives clients
//! in one or two client namespaces of the lab against a dual-stack Service
//! whose endpoints are hand-written slices (removing one is a manifest
//! edit). Which backend answered comes from the lb-testservers' replies;
//! occupancy from `lb-agent list -o json`. Privileged: run with
//! `--test-threads=1`.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use lb_tests::{Bins, Lab, endpoints, find_service, http_echo_slice, pod_ip, pod_ip6};
use serde_json::Value;

const SYNC: Duration = Duration::from_secs(10);
const PODS: &[(&str, u8)] = &[("pod-1", 11), ("pod-2", 12), ("pod-3", 13)];
const HTTP: u16 = 80;
const ECHO: u16 = 5300;
const STICKY4: Ipv4Addr = Ipv4Addr::new(10, 96, 70, 10);
const STICKY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x70);

fn bins() -> Bins {
    lb_tests::test_bins!()
}

/// `sticky`, dual-stack, `http` (TCP) and `echo` (UDP) to port 80 of the
/// lb-testservers; `affinity`: the `sessionAffinity` lines (empty: none).
fn service(affinity: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Service
metadata:
  name: sticky
spec:
  clusterIP: \"{STICKY4}\"
  clusterIPs: [\"{STICKY4}\", \"{STICKY6}\"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
{affinity}  ports:
    - name: http
      port: {HTTP}
      protocol: TCP
      targetPort: {HTTP}
    - name: echo
      port: {ECHO}
      protocol: UDP
      targetPort: {HTTP}
"
    )
}

fn client_ip(timeout: u32) -> String {
    format!(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {timeout}\n"
    )
}

/// A ready EndpointSlice of `sticky` on `addrs`.
fn slice(name: &str, addrs: &[IpAddr]) -> String {
    http_echo_slice(name, "sticky", addrs, HTTP)
}

/// The Service with `affinity` and endpoints on the pods of `octets`, both families.
fn manifest(affinity: &str, octets: &[u8]) -> String {
    let v4: Vec<IpAddr> = octets.iter().map(|o| pod_ip(*o).into()).collect();
    let v6: Vec<IpAddr> = octets.iter().map(|o| pod_ip6(*o).into()).collect();
    [
        service(affinity),
        slice("sticky-v4", &v4),
        slice("sticky-v6", &v6),
    ]
    .concat()
}

/// The affinity timeout `list` shows on every frontend of `sticky`, if
/// they all agree and each has `n` endpoints.
fn programmed(d: &Value, n: usize) -> Option<u64> {
    let svc = find_service(d, "default", "sticky")?;
    let ports = svc["ports"].as_array()?;
    if ports.len() != 4 || endpoints(d, "default", "sticky", HTTP).len() != 2 * n {
        return None;
    }
    let secs: BTreeSet<u64> = ports
        .iter()
        .filter_map(|p| p["affinitySeconds"].as_u64())
        .collect();
    (secs.len() == 1).then(|| *secs.first().unwrap())
}

fn apply(lab: &mut Lab, affinity: &str, octets: &[u8], secs: u64) {
    lab.write_manifest("sticky.yaml", &manifest(affinity, octets))
        .expect("manifest");
    lab.agent
        .wait_for("sticky programmed", SYNC, |d| {
            programmed(d, octets.len()) == Some(secs)
        })
        .expect("sync");
}

fn lab(affinity: &str, secs: u64) -> Lab {
    let mut lab = Lab::new(&bins(), PODS, HTTP).expect("lab");
    lab.write_manifest("sticky.yaml", &manifest(affinity, &[11, 12, 13]))
        .expect("manifest");
    lab.agent.start().expect("agent start");
    lab.agent
        .wait_for("sticky programmed", SYNC, |d| {
            programmed(d, 3) == Some(secs)
        })
        .expect("sync");
    lab
}

/// Backends reached, by name, after checking every attempt succeeded.
fn reached(report: &Value, n: u64) -> BTreeSet<String> {
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    let counts = lb_tests::counts(&report["backends"]);
    assert_eq!(counts.iter().map(|(_, c)| c).sum::<u64>(), n, "{report}");
    counts.into_iter().map(|(k, _)| k).collect()
}

/// `n` TCP connects from the lab's client namespace.
fn tcp(lab: &Lab, target: &str, n: u64) -> BTreeSet<String> {
    let n_arg = n.to_string();
    reached(
        &lab.client_json(target, &["--count", &n_arg])
            .expect("client"),
        n,
    )
}

/// The one backend all of `set` is; fails if there are several.
fn one(set: BTreeSet<String>, what: &str) -> String {
    assert_eq!(set.len(), 1, "{what}: {set:?}");
    set.into_iter().next().unwrap()
}

fn affinity_entries(lab: &Lab) -> u64 {
    let doc = lab.agent.list_json().expect("list -o json");
    doc["affinity"]["entries"]
        .as_u64()
        .unwrap_or_else(|| panic!("no affinity occupancy in {doc}"))
}

fn http4() -> String {
    format!("{STICKY4}:{HTTP}")
}

#[test]
fn each_client_namespace_sticks_to_its_backend_on_every_frontend() {
    let mut lab = lab(&client_ip(10800), 10800);
    assert_eq!(affinity_entries(&lab), 0);
    let first = one(tcp(&lab, &http4(), 50), "50 TCP connects from one client");

    // The UDP frontend: connected sockets, and new unconnected sockets.
    let echo = format!("{STICKY4}:{ECHO}");
    let udp = one(
        reached(
            &lab.client_json(&echo, &["--udp", "--count", "30"])
                .expect("client"),
            30,
        ),
        "30 connected UDP sockets",
    );
    let unconnected = lab
        .client_json(
            &echo,
            &["--udp-unconnected", "--sockets", "20", "--count", "2"],
        )
        .expect("client");
    assert_eq!(
        one(reached(&unconnected, 40), "20 unconnected UDP sockets"),
        udp
    );

    // The IPv6 frontend of the same Service keeps its own choice.
    let http6 = format!("[{STICKY6}]:{HTTP}");
    one(tcp(&lab, &http6, 30), "30 IPv6 connects");

    // A second client namespace has a choice of its own, which sticks too,
    // and the first client's is unchanged.
    let other = lab.topo.add_client(1).expect("second client");
    let theirs = lab
        .client_json_in(&other, &http4(), &["--count", "30"])
        .expect("client");
    one(reached(&theirs, 30), "the second client's 30 connects");
    assert_eq!(one(tcp(&lab, &http4(), 20), "first client again"), first);

    // One entry per (client, frontend): TCP v4, UDP v4, TCP v6 of the
    // first client, TCP v4 of the second.
    assert_eq!(affinity_entries(&lab), 4);
}

#[test]
fn removing_the_chosen_backend_moves_the_client_to_one_that_sticks() {
    let mut lab = lab(&client_ip(10800), 10800);
    let first = one(tcp(&lab, &http4(), 20), "before");
    let octet = PODS.iter().find(|(n, _)| *n == first).unwrap().1;
    let rest: Vec<u8> = [11, 12, 13].into_iter().filter(|o| *o != octet).collect();
    apply(&mut lab, &client_ip(10800), &rest, 10800);
    let second = one(tcp(&lab, &http4(), 30), "after its backend left");
    assert_ne!(second, first);
    // The first backend comes back: the range is rewritten, and the client
    // stays where it is (its backend is found in the new range).
    apply(&mut lab, &client_ip(10800), &[11, 12, 13], 10800);
    assert_eq!(one(tcp(&lab, &http4(), 30), "after a backend came"), second);
}

#[test]
fn after_the_timeout_the_choice_is_random_again() {
    let lab = lab(&client_ip(1), 1);
    // Within the timeout, a burst sticks.
    one(tcp(&lab, &http4(), 20), "a burst");
    // Each connect after an idle period longer than the timeout picks anew
    // (and sticks again): ten such picks from three backends are all the
    // same with probability 3 × 3^-10.
    let mut picks = BTreeSet::new();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(1600));
        picks.insert(one(tcp(&lab, &http4(), 3), "one pick"));
    }
    assert!(picks.len() > 1, "every idle pick was {picks:?}");
}

#[test]
fn turning_affinity_off_spreads_connects_and_clears_the_entries() {
    let mut lab = lab(&client_ip(10800), 10800);
    one(tcp(&lab, &http4(), 20), "with affinity");
    assert_eq!(affinity_entries(&lab), 1);

    apply(&mut lab, "", &[11, 12, 13], 0);
    assert_eq!(
        affinity_entries(&lab),
        0,
        "entries of a service without affinity"
    );
    let spread = tcp(&lab, &http4(), 60);
    assert!(spread.len() > 1, "60 connects without affinity: {spread:?}");

    // Back on, then the Service deleted: its entries go with its id.
    apply(&mut lab, &client_ip(60), &[11, 12, 13], 60);
    one(tcp(&lab, &http4(), 10), "affinity again");
    assert_eq!(affinity_entries(&lab), 1);
    lab.remove_manifest("sticky.yaml").expect("remove");
    lab.agent
        .wait_for("sticky removed", SYNC, |d| {
            find_service(d, "default", "sticky").is_none()
        })
        .expect("removal");
    lab.agent
        .wait_for("its affinity entries swept", SYNC, |d| {
            d["affinity"]["entries"].as_u64() == Some(0)
        })
        .expect("sweep");
}

#[test]
fn an_agent_restart_keeps_the_entries() {
    let mut lab = lab(&client_ip(10800), 10800);
    let first = one(tcp(&lab, &http4(), 20), "before the restart");
    assert_eq!(affinity_entries(&lab), 1);
    lab.agent.stop().expect("stop");
    lab.agent.start().expect("start");
    lab.agent.wait_ready(SYNC).expect("ready");
    assert_eq!(affinity_entries(&lab), 1, "the entry survives the restart");
    assert_eq!(one(tcp(&lab, &http4(), 20), "after the restart"), first);
}
