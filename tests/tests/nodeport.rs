//! End-to-end: NodePorts reached from inside the node (issue 13). The node
//! addresses are ones this test gives with `--node-ip`; no namespace owns
//! or routes them, so a connect that the program does not rewrite fails
//! with ENETUNREACH in the client's namespace. Privileged: run by
//! `cargo xtask test` with `--test-threads=1`.
use std::time::Duration;

use lb_tests::{Bins, Lab, endpoints, find_service};

const SYNC: Duration = Duration::from_secs(10);
const PODS: &[(&str, u8)] = &[("back-end-1", 11), ("back-end-2", 12), ("back-end-3", 13)];
const NODE_IPS: [&str; 2] = ["10.250.0.1", "10.250.0.2"];

fn bins() -> Bins {
    lb_tests::test_bins!()
}

/// `web`: TCP and UDP on one service port number, both with node port
/// 30080 (a nodePort is per protocol), or a plain ClusterIP Service.
fn web(node_port: bool) -> String {
    let ty = if node_port { "NodePort" } else { "ClusterIP" };
    let service = lb_tests::web_service(ty, "10.96.7.7", node_port.then_some(30080), "");
    service + &lb_tests::web_pods(PODS)
}

/// The node-address frontends `list -o json` shows for `web`.
fn node_frontends(doc: &serde_json::Value) -> Vec<String> {
    lb_tests::node_frontends(doc, "default", "web")
}

fn lab_with_web(node_port: bool) -> Lab {
    let mut lab = Lab::with_node_ips(&bins(), PODS, 80, &NODE_IPS, &[]).unwrap();
    lab.write_manifest("web.yaml", &web(node_port)).unwrap();
    lab.agent.start().unwrap();
    lab.agent
        .wait_for("web programmed", SYNC, |d| {
            endpoints(d, "default", "web", 8080).len() == 6
                && node_frontends(d).len() == if node_port { 6 } else { 0 }
        })
        .unwrap();
    lab
}

#[test]
fn a_node_port_is_balanced_on_every_node_address_for_tcp_and_udp() {
    let lab = lab_with_web(true);
    let doc = lab.agent.list_json().unwrap();
    assert_eq!(
        node_frontends(&doc),
        [
            "10.250.0.1:30080/TCP",
            "10.250.0.1:30080/UDP",
            "10.250.0.2:30080/TCP",
            "10.250.0.2:30080/UDP",
            // For host-namespace sockets only (below).
            "127.0.0.1:30080/TCP",
            "127.0.0.1:30080/UDP"
        ]
    );
    // Node addresses are not ClusterIPs.
    assert_eq!(
        find_service(&doc, "default", "web").unwrap()["clusterIps"],
        serde_json::json!(["10.96.7.7"])
    );
    let table = lab.agent.list(&[]).unwrap();
    assert!(table.contains("8080:30080/TCP,8080:30080/UDP"), "{table}");
    for node in NODE_IPS {
        let tcp = lab
            .client(&format!("{node}:30080"), &["--count", "300"])
            .unwrap();
        assert_eq!(tcp.failed(), 0, "{node} {tcp:?}");
        assert_eq!(tcp.backends.len(), 3, "{node} {tcp:?}");
        let udp = lab
            .client(&format!("{node}:30080"), &["--count", "300", "--udp"])
            .unwrap();
        assert_eq!(udp.failed(), 0, "{node} {udp:?}");
        assert_eq!(udp.backends.len(), 3, "{node} {udp:?}");
    }
    // A node address on a port that is no NodePort is left alone.
    let other = lab
        .client(&format!("{}:30081", NODE_IPS[0]), &["--count", "5"])
        .unwrap();
    assert_eq!(other.errors.get("ENETUNREACH"), Some(&5), "{other:?}");
}

#[test]
fn a_service_changed_back_to_cluster_ip_stops_answering_on_its_node_port() {
    let mut lab = lab_with_web(true);
    let before = lab
        .client(&format!("{}:30080", NODE_IPS[1]), &["--count", "20"])
        .unwrap();
    assert_eq!(before.ok(), 20, "{before:?}");
    lab.write_manifest("web.yaml", &web(false)).unwrap();
    lab.agent
        .wait_for("node ports gone", SYNC, |d| {
            node_frontends(d).is_empty() && endpoints(d, "default", "web", 8080).len() == 6
        })
        .unwrap();
    for node in NODE_IPS {
        let after = lab
            .client(&format!("{node}:30080"), &["--count", "5"])
            .unwrap();
        assert_eq!(
            after.errors.get("ENETUNREACH"),
            Some(&5),
            "{node} {after:?}"
        );
    }
    let cluster = lab.client("10.96.7.7:8080", &["--count", "20"]).unwrap();
    assert_eq!(cluster.ok(), 20, "{cluster:?}");
}

/// The host namespace's global IPv4 addresses (`ip -j -4 addr show scope
/// global`: neither loopback nor link-local), sorted.
fn host_ipv4_addresses() -> Vec<String> {
    let out = lb_tests::run(
        std::process::Command::new("ip").args(["-j", "-4", "addr", "show", "scope", "global"]),
    )
    .unwrap();
    let links: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut ips: Vec<String> = links
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| Some(a["local"].as_str()?.to_owned()))
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Without `--node-ip`, the manifest source serves NodePorts on the
/// addresses of the interfaces of the namespace the agent runs in (the
/// host's here): exactly its global ones, each reached from the client pod
/// (the client's namespace has no route to them, so only the program can
/// make these connects succeed).
#[test]
fn without_node_ip_the_interfaces_addresses_serve_node_ports() {
    let mut lab = Lab::new(&bins(), PODS, 80).unwrap();
    lab.write_manifest("web.yaml", &web(true)).unwrap();
    lab.agent.start().unwrap();
    let mut want: Vec<String> = host_ipv4_addresses()
        .iter()
        .map(String::as_str)
        .chain(["127.0.0.1"])
        .flat_map(|ip| [format!("{ip}:30080/TCP"), format!("{ip}:30080/UDP")])
        .collect();
    want.sort();
    assert!(!want.is_empty(), "the host has no global IPv4 address");
    lab.agent
        .wait_for("node ports on the interfaces", SYNC, |d| {
            node_frontends(d) == want
        })
        .unwrap();
    for ip in host_ipv4_addresses() {
        let r = lab
            .client(&format!("{ip}:30080"), &["--count", "60"])
            .unwrap();
        assert_eq!(r.failed(), 0, "{ip} {r:?}");
        assert_eq!(r.backends.len(), 3, "{ip} {r:?}");
    }
}

/// The one nodePort of `web`'s node-address frontends (TCP and UDP on port
/// 8080 share one), if it has any.
fn web_node_port(doc: &serde_json::Value) -> Option<u16> {
    let ports: std::collections::BTreeSet<u16> = find_service(doc, "default", "web")?["ports"]
        .as_array()?
        .iter()
        .filter(|p| p["nodeIp"].is_string())
        .filter_map(|p| u16::try_from(p["port"].as_u64()?).ok())
        .collect();
    (ports.len() == 1).then(|| *ports.iter().next().expect("one"))
}

/// Waits until the running agent's `lb_diagnostics{severity="warning"}`
/// is `n` (the figures follow the sync that read the files).
fn wait_warnings(lab: &mut Lab, n: f64) {
    let health = lab.agent.wait_health_addr(SYNC).unwrap();
    lab.agent
        .wait_for(&format!("{n} warnings"), SYNC, |_| {
            lb_tests::scrape(health).is_ok_and(|s| {
                lb_tests::metric(&s, "lb_diagnostics", &[("severity", "warning")]) == Some(n)
            })
        })
        .unwrap();
}

/// A NodePort Service whose ports name no nodePort gets one from the
/// range (the same for its TCP and UDP port of one number), served on
/// every node address and shown by `list` as kubectl shows it. A newcomer
/// naming that port is refused (a warning; its ClusterIP is served, no
/// node address is) while `web` keeps serving; after a restart `web` still
/// has its port and the newcomer is still refused: the agent knows who
/// held it from the maps (a fresh allocator would give the port to the
/// Service that names it).
#[test]
fn a_missing_node_port_is_allocated_and_kept_across_a_restart() {
    let mut lab = Lab::with_node_ips(&bins(), PODS, 80, &NODE_IPS, &[]).unwrap();
    let web = lb_tests::web_service("NodePort", "10.96.7.7", None, "") + &lb_tests::web_pods(PODS);
    lab.write_manifest("web.yaml", &web).unwrap();
    lab.agent.start().unwrap();
    let doc = lab
        .agent
        .wait_for("web's node ports", SYNC, |d| node_frontends(d).len() == 6)
        .unwrap();
    let port = web_node_port(&doc).expect("one nodePort for TCP and UDP");
    assert!((30000..=32767).contains(&port), "{port}");
    let table = lab.agent.list(&[]).unwrap();
    assert!(
        table.contains(&format!("8080:{port}/TCP,8080:{port}/UDP")),
        "{table}"
    );
    for node in NODE_IPS {
        let tcp = lab
            .client(&format!("{node}:{port}"), &["--count", "30"])
            .unwrap();
        assert_eq!((tcp.ok(), tcp.backends.len()), (30, 3), "{node} {tcp:?}");
        let udp = lab
            .client(&format!("{node}:{port}"), &["--count", "30", "--udp"])
            .unwrap();
        assert_eq!(udp.ok(), 30, "{node} {udp:?}");
    }
    wait_warnings(&mut lab, 0.0);

    let newcomer = format!(
        "apiVersion: v1
kind: Service
metadata:
  name: newcomer
spec:
  type: NodePort
  clusterIP: 10.96.7.8
  selector:
    app: web
  ports:
    - port: 9090
      targetPort: 80
      nodePort: {port}
"
    );
    lab.write_manifest("newcomer.yaml", &newcomer).unwrap();
    let check = |lab: &mut Lab| {
        let doc = lab
            .agent
            .wait_for("newcomer served on its ClusterIP", SYNC, |d| {
                endpoints(d, "default", "newcomer", 9090).len() == 3
            })
            .unwrap();
        assert_eq!(
            lb_tests::node_frontends(&doc, "default", "newcomer"),
            Vec::<String>::new()
        );
        assert_eq!(web_node_port(&doc), Some(port), "web keeps its port");
        let r = lab
            .client(&format!("{}:{port}", NODE_IPS[0]), &["--count", "30"])
            .unwrap();
        assert_eq!((r.ok(), r.backends.len()), (30, 3), "{r:?}");
        let r = lab.client("10.96.7.8:9090", &["--count", "5"]).unwrap();
        assert_eq!(r.ok(), 5, "{r:?}");
    };
    check(&mut lab);
    // Refused with one warning.
    wait_warnings(&mut lab, 1.0);

    lab.agent.stop().unwrap();
    lab.agent.start().unwrap();
    lab.agent.wait_ready(SYNC).unwrap();
    check(&mut lab);
    wait_warnings(&mut lab, 1.0);
}
