//! End-to-end: what only the host's network namespace is served (issue 13):
//! `127.0.0.1:nodePort`, and with `--host-netns-only` every frontend.
//!
//! Network safety: a client in the host namespace (joined to the test
//! cgroup, no netns) only ever connects to `127.0.0.1`, and the Service it
//! reaches there has its one endpoint on `127.0.0.2`, where a test server
//! listens in the host namespace: translated or not, nothing leaves
//! loopback. Clients in the test's pod namespace reach the lab's pods (or,
//! untranslated, nothing: no route). Privileged: run by `cargo xtask test`
//! with `--test-threads=1`.
use std::{
    io::BufRead as _,
    process::{Child, Command, Stdio},
    time::Duration,
};

use lb_tests::{Bins, ClientReport, Lab};

const SYNC: Duration = Duration::from_secs(10);
const PODS: &[(&str, u8)] = &[("back-end-1", 11), ("back-end-2", 12)];
const NODE_IP: &str = "10.250.0.1";
/// Where the host-namespace server listens: the `local` Service's endpoint.
const HOST_SERVER_IP: &str = "127.0.0.2";

fn bins() -> Bins {
    lb_tests::test_bins!()
}

/// `lb-testserver` in the host namespace on `127.0.0.2:<free port>`,
/// answering as `host`; killed on drop.
struct HostServer {
    child: Child,
    port: u16,
}

impl HostServer {
    fn start(bins: &Bins) -> Self {
        let port = std::net::TcpListener::bind((HOST_SERVER_IP, 0))
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let mut child = Command::new(&bins.server)
            .args(["--name", "host", "--listen"])
            .arg(format!("{HOST_SERVER_IP}:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("listening"), "{line:?}");
        Self { child, port }
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `web` (ClusterIP 10.96.7.7:8080 over the lab's pods, nodePort 30080)
/// and `local` (ClusterIP 10.96.7.20:8090, nodePort 30090, its one
/// endpoint the host server).
fn manifest(host_port: u16) -> String {
    let host: std::net::Ipv4Addr = HOST_SERVER_IP.parse().unwrap();
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  clusterIP: 10.96.7.7
  selector:
    app: web
  ports:
    - name: http
      port: 8080
      targetPort: 80
      nodePort: 30080
---
apiVersion: v1
kind: Service
metadata:
  name: local
spec:
  type: NodePort
  clusterIP: 10.96.7.20
  ports:
    - name: http
      port: 8090
      nodePort: 30090
{slice}{pods}",
        slice = lb_tests::http_slice("local-1", "local", host_port, &[(host, None)]),
        pods = lb_tests::web_pods(PODS)
    )
}

fn lab(args: &[&str]) -> (Lab, HostServer) {
    let mut lab = Lab::new(&bins(), PODS, 80).unwrap();
    let server = HostServer::start(&lab.bins);
    lab.agent.extra_args = ["--node-ip", NODE_IP]
        .iter()
        .chain(args)
        .map(|a| (*a).to_owned())
        .collect();
    lab.write_manifest("services.yaml", &manifest(server.port))
        .unwrap();
    lab.agent.start().unwrap();
    lab.agent
        .wait_for("services programmed", SYNC, |d| {
            lb_tests::endpoints(d, "default", "local", 8090).len() == 1
                && lb_tests::endpoints(d, "default", "web", 8080).len() == 2
        })
        .unwrap();
    (lab, server)
}

/// `count` connects from the host's network namespace, inside the test
/// cgroup, to `127.0.0.1:port` (the only destination this suite lets a
/// host-namespace client use).
fn host_client(lab: &Lab, port: u16, count: u32) -> ClientReport {
    let out = lb_tests::run(
        Command::new(&lab.bins.client)
            .arg("--cgroup")
            .arg(&lab.cgroup.path)
            .arg("--target")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--count", &count.to_string()]),
    )
    .unwrap();
    serde_json::from_str(out.trim()).unwrap()
}

/// A host-namespace client reaches the `local` Service's endpoint (the
/// host server) through `127.0.0.1:30090`, every connect.
fn assert_host_reaches_its_server(lab: &Lab) {
    let host = host_client(lab, 30090, 20);
    assert_eq!(host.failed(), 0, "{host:?}");
    assert_eq!(
        host.backends.keys().collect::<Vec<_>>(),
        ["host"],
        "{host:?}"
    );
}

fn pod_client(lab: &Lab, target: &str, count: u32) -> ClientReport {
    lab.client(target, &["--count", &count.to_string()])
        .unwrap()
}

/// `127.0.0.1:nodePort` is translated for host-namespace sockets only; a
/// pod's own loopback stays its own (nothing listens there).
#[test]
fn localhost_node_ports_answer_the_host_namespace_only() {
    let (first, server) = lab(&[]);
    assert_host_reaches_its_server(&first);

    let pod = pod_client(&first, "127.0.0.1:30080", 5);
    assert_eq!((pod.ok(), pod.failed()), (0, 5), "{pod:?}");
    // Pods are translated as usual everywhere else.
    let pod = pod_client(&first, &format!("{NODE_IP}:30080"), 40);
    assert_eq!(pod.failed(), 0, "{pod:?}");
    assert_eq!(pod.backends.len(), PODS.len(), "{pod:?}");

    // Turned off, the host's loopback stays its own too.
    drop((first, server));
    let (second, _server) = lab(&["--localhost-node-ports=false"]);
    let host = host_client(&second, 30090, 5);
    assert_eq!(host.ok(), 0, "{host:?}");
}

/// With `--host-netns-only` a pod's connects to a ClusterIP or a node port
/// are left alone (no route: ENETUNREACH), while host sockets are still
/// translated.
#[test]
fn with_host_netns_only_pods_are_left_alone() {
    let (lab, _server) = lab(&["--host-netns-only"]);
    for target in ["10.96.7.7:8080", &format!("{NODE_IP}:30080")] {
        let pod = pod_client(&lab, target, 5);
        assert_eq!(pod.errors.get("ENETUNREACH"), Some(&5), "{target} {pod:?}");
    }
    assert_host_reaches_its_server(&lab);
}
