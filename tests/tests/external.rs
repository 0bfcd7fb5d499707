//! End-to-end: a Service's `externalIPs` and LoadBalancer ingress IPs
//! reached from inside the node (issue 13). Every address here is one this
//! test gives (`--node-ip`, the manifests); no namespace owns or routes
//! them, so a connect that the program does not rewrite fails with
//! ENETUNREACH in the client's namespace. Privileged: run by `cargo xtask
//! test` with `--test-threads=1`.
use std::{collections::BTreeSet, time::Duration};

use lb_tests::{Bins, ClientReport, Lab, find_service, pod_ip};

const SYNC: Duration = Duration::from_secs(10);
const PODS: &[(&str, u8)] = &[("back-end-1", 11), ("back-end-2", 12), ("back-end-3", 13)];
const NODE_IP: &str = "10.250.0.1";
/// An external IP that is none of this node's addresses.
const FOREIGN_IP: &str = "10.250.9.9";
const LB_IP: &str = "10.250.8.8";
const PROXY_LB_IP: &str = "10.250.8.9";

fn bins() -> Bins {
    lb_tests::test_bins!()
}

/// `web` (ClusterIP 10.96.7.8, TCP and UDP on 8080, nodePort 30080) over
/// the lab's pods, with `spec` lines added under `spec:` and `status`
/// as the Service's status.
fn web(ty: &str, spec: &str, status: &str) -> String {
    let service = lb_tests::web_service(
        ty,
        "10.96.7.8",
        Some(30080),
        &format!("{spec}status:\n{status}\n"),
    );
    service + &lb_tests::web_pods(PODS)
}

/// The addresses of `web` that `list -o json` shows under `key`
/// (`externalIp`, `loadBalancerIp`, `nodeIp`) with endpoints, each once.
fn addresses(doc: &serde_json::Value, key: &str) -> Vec<String> {
    let set: BTreeSet<String> = find_service(doc, "default", "web")
        .and_then(|s| s["ports"].as_array())
        .into_iter()
        .flatten()
        .filter(|p| p["endpoints"].as_array().is_some_and(|e| !e.is_empty()))
        .filter_map(|p| Some(p[key].as_str()?.to_owned()))
        .collect();
    set.into_iter().collect()
}

/// A lab whose agent runs with `--node-ip NODE_IP` and `args`, serving
/// `manifest`, once `ready` holds for `list -o json`.
fn lab(args: &[&str], manifest: &str, ready: impl Fn(&serde_json::Value) -> bool) -> Lab {
    let mut lab = Lab::with_node_ips(&bins(), PODS, 80, &[NODE_IP], args).unwrap();
    lab.write_manifest("web.yaml", manifest).unwrap();
    lab.agent.start().unwrap();
    lab.agent.wait_for("web programmed", SYNC, ready).unwrap();
    lab
}

/// Connects (`count`, TCP or `--udp`) to `target` from the client pod.
fn connects(lab: &Lab, target: &str, count: u32, udp: bool) -> ClientReport {
    let count = count.to_string();
    let mut args = vec!["--count", count.as_str()];
    if udp {
        args.push("--udp");
    }
    lab.client(target, &args).unwrap()
}

/// Every one of `count` connects answered, by every pod.
fn assert_balanced(lab: &Lab, target: &str, udp: bool) {
    let r = connects(lab, target, 300, udp);
    assert_eq!(r.failed(), 0, "{target} udp={udp} {r:?}");
    assert_eq!(r.backends.len(), PODS.len(), "{target} udp={udp} {r:?}");
}

fn assert_untouched(lab: &Lab, target: &str) {
    let r = connects(lab, target, 5, false);
    assert_eq!(r.errors.get("ENETUNREACH"), Some(&5), "{target} {r:?}");
}

#[test]
fn an_external_ip_is_translated_only_when_it_is_a_node_address() {
    let manifest = web(
        "ClusterIP",
        &format!("  externalIPs: [{NODE_IP}, {FOREIGN_IP}]\n"),
        "  {}",
    );
    let lab = lab(&[], &manifest, |d| addresses(d, "externalIp") == [NODE_IP]);
    for udp in [false, true] {
        assert_balanced(&lab, &format!("{NODE_IP}:8080"), udp);
    }
    // CVE-2020-8554: a Service cannot capture an arbitrary address.
    assert_untouched(&lab, &format!("{FOREIGN_IP}:8080"));
    // A ClusterIP Service has no node port, whatever its ports say.
    assert_untouched(&lab, &format!("{NODE_IP}:30080"));
    let table = lab.agent.list(&[]).unwrap();
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        row[2..6],
        ["ClusterIP", "10.96.7.8", NODE_IP, "8080/TCP,8080/UDP"],
        "{table}"
    );
}

#[test]
fn with_external_ips_all_a_foreign_external_ip_is_translated() {
    let manifest = web(
        "ClusterIP",
        &format!("  externalIPs: [{FOREIGN_IP}]\n"),
        "  {}",
    );
    let lab = lab(&["--external-ips", "all"], &manifest, |d| {
        addresses(d, "externalIp") == [FOREIGN_IP]
    });
    for udp in [false, true] {
        assert_balanced(&lab, &format!("{FOREIGN_IP}:8080"), udp);
    }
}

#[test]
fn a_load_balancer_ingress_ip_is_translated_unless_in_proxy_mode() {
    let manifest = web(
        "LoadBalancer",
        "",
        &format!(
            "  loadBalancer:
    ingress:
      - ip: {LB_IP}
      - ip: {PROXY_LB_IP}
        ipMode: Proxy
      - hostname: lb.example"
        ),
    );
    let lab = lab(&[], &manifest, |d| {
        addresses(d, "loadBalancerIp") == [LB_IP]
            && addresses(d, "nodeIp") == [NODE_IP, "127.0.0.1"]
    });
    for udp in [false, true] {
        assert_balanced(&lab, &format!("{LB_IP}:8080"), udp);
        assert_balanced(&lab, &format!("{NODE_IP}:30080"), udp);
    }
    assert_untouched(&lab, &format!("{PROXY_LB_IP}:8080"));
    let table = lab.agent.list(&[]).unwrap();
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        row[2..6],
        [
            "LoadBalancer",
            "10.96.7.8",
            LB_IP,
            "8080:30080/TCP,8080:30080/UDP"
        ],
        "{table}"
    );
}

/// A selectorless LoadBalancer Service with both traffic policies Local,
/// its endpoints (the lab's pods) on the nodes named in `nodes`; the agent
/// is node `n1`.
fn local_policies(nodes: [&str; 3]) -> String {
    let endpoints: Vec<_> = PODS
        .iter()
        .zip(nodes)
        .map(|((_, octet), node)| (pod_ip(*octet), Some(node)))
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: LoadBalancer
  clusterIP: 10.96.7.8
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  externalIPs: [{NODE_IP}]
  ports:
    - name: http
      port: 8080
      protocol: TCP
      nodePort: 30080
status:
  loadBalancer:
    ingress:
      - ip: {LB_IP}
{slice}",
        slice = lb_tests::http_slice("web-1", "web", 80, &endpoints)
    )
}

/// kube-proxy's rule for clients on the node: a connect to a node port,
/// an external IP or a load balancer IP is short-circuited to the
/// cluster-wide endpoints whatever `externalTrafficPolicy` says, while
/// `internalTrafficPolicy: Local` narrows the ClusterIP to this node's
/// endpoints (and refuses it when there is none).
#[test]
fn in_node_clients_of_external_addresses_reach_every_endpoint_whatever_the_traffic_policies() {
    let externals = [
        format!("{NODE_IP}:30080"),
        format!("{NODE_IP}:8080"),
        format!("{LB_IP}:8080"),
    ];
    let mut lab = lab(
        &["--node-name", "n1"],
        &local_policies(["n1", "n2", "n2"]),
        |d| {
            addresses(d, "externalIp") == [NODE_IP]
                && addresses(d, "loadBalancerIp") == [LB_IP]
                && addresses(d, "nodeIp") == [NODE_IP, "127.0.0.1"]
        },
    );
    let local = connects(&lab, "10.96.7.8:8080", 50, false);
    assert_eq!(local.failed(), 0, "{local:?}");
    assert_eq!(
        local.backends.keys().collect::<Vec<_>>(),
        ["back-end-1"],
        "{local:?}"
    );
    for target in &externals {
        assert_balanced(&lab, target, false);
    }

    // No endpoint on this node: the ClusterIP refuses, the external
    // addresses still reach every endpoint.
    lab.write_manifest("web.yaml", &local_policies(["n2", "n2", "n3"]))
        .unwrap();
    lab.agent
        .wait_for("no local endpoint", SYNC, |d| {
            find_service(d, "default", "web")
                .and_then(|s| s["ports"].as_array())
                .into_iter()
                .flatten()
                .any(|p| p["clusterIp"].is_string() && p["endpoints"] == serde_json::json!([]))
        })
        .unwrap();
    let refused = connects(&lab, "10.96.7.8:8080", 5, false);
    assert_eq!(refused.errors.get("ECONNREFUSED"), Some(&5), "{refused:?}");
    for target in &externals {
        assert_balanced(&lab, target, false);
    }
    lab.agent.stop().unwrap();
}
