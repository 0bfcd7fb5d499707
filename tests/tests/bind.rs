//! End-to-end: bind protection (issue 13). A socket of the host's network
//! namespace in the attached cgroup may not bind a NodePort (of its
//! protocol) on a wildcard address or on a node address the port is served
//! on: bind() fails with EADDRINUSE. Pods, other ports, other addresses and
//! sockets outside the cgroup bind as usual; `--bind-protection=false`
//! leaves every bind alone.
//!
//! Network safety: the host-namespace sockets here only bind() (with
//! IP_FREEBIND, so the test's node address needs no interface) and close;
//! they send nothing and listen on nothing. Connects come from the test's
//! client namespace, which has no route off the pod subnet. The nodePorts
//! are unusual numbers, and each refusal is checked against the same bind
//! from outside the test cgroup, which succeeds: the port is free, the
//! program refused it. Privileged: run by `cargo xtask test` with
//! `--test-threads=1`.
use std::{collections::BTreeMap, process::Command, time::Duration};

use lb_tests::{Bins, Lab, node_frontends};

const SYNC: Duration = Duration::from_secs(10);
const PODS: &[(&str, u8)] = &[("back-end-1", 11), ("back-end-2", 12)];
const NODE_IP: &str = "10.250.0.1";
/// `web`'s nodePort, TCP and UDP.
const NODE_PORT: u16 = 31937;
/// `tcp-only`'s nodePort: a UDP socket may bind it.
const TCP_NODE_PORT: u16 = 31939;
/// A port no Service uses.
const FREE_PORT: u16 = 31938;

fn bins() -> Bins {
    lb_tests::test_bins!()
}

/// `web` (TCP and UDP 8080, nodePort [`NODE_PORT`] on both, or a plain
/// ClusterIP Service) and `tcp-only` (TCP 8081, nodePort
/// [`TCP_NODE_PORT`]), over the lab's pods.
fn manifest(web_node_port: bool) -> String {
    let ty = if web_node_port {
        "NodePort"
    } else {
        "ClusterIP"
    };
    let web = lb_tests::web_service(ty, "10.96.7.7", web_node_port.then_some(NODE_PORT), "");
    format!(
        "{web}---
apiVersion: v1
kind: Service
metadata:
  name: tcp-only
spec:
  type: NodePort
  clusterIP: 10.96.7.21
  selector:
    app: web
  ports:
    - port: 8081
      targetPort: 80
      nodePort: {TCP_NODE_PORT}
{pods}",
        pods = lb_tests::web_pods(PODS)
    )
}

fn lab(args: &[&str]) -> Lab {
    let mut lab = Lab::with_node_ips(&bins(), PODS, 80, &[NODE_IP], args).unwrap();
    lab.write_manifest("services.yaml", &manifest(true))
        .unwrap();
    lab.agent.start().unwrap();
    wait_node_ports(&mut lab, 4);
    lab
}

/// Waits until `web` has `n` node-address frontends (TCP and UDP on the
/// node address and on 127.0.0.1; none as a ClusterIP Service) and
/// `tcp-only` its two.
fn wait_node_ports(lab: &mut Lab, n: usize) {
    lab.agent
        .wait_for("node ports programmed", SYNC, |d| {
            node_frontends(d, "default", "web").len() == n
                && node_frontends(d, "default", "tcp-only").len() == 2
        })
        .unwrap();
}

/// Where a `--try-bind` socket lives.
#[derive(Clone, Copy)]
enum Where {
    /// The host's network namespace, in the attached cgroup.
    Host,
    /// The host's network namespace, outside the attached cgroup.
    HostOutside,
    /// The client pod's namespace, in the attached cgroup.
    Pod,
}

/// (TCP, UDP) results of bind()ing `addr`: `ok` or the errno name.
fn bind(lab: &Lab, at: Where, addr: &str) -> (String, String) {
    let mut cmd = Command::new(&lab.bins.client);
    if matches!(at, Where::Host | Where::Pod) {
        cmd.arg("--cgroup").arg(&lab.cgroup.path);
    }
    if matches!(at, Where::Pod) {
        cmd.arg("--netns").arg(&lab.topo.client);
    }
    let out = lb_tests::run(cmd.args(["--try-bind", addr])).unwrap();
    let doc: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let probe: BTreeMap<String, String> = serde_json::from_value(doc["probe"].clone()).unwrap();
    (probe["bind-tcp"].clone(), probe["bind-udp"].clone())
}

fn pair(tcp: &str, udp: &str) -> (String, String) {
    (tcp.to_owned(), udp.to_owned())
}

/// Whether each bind protection program is attached, from `status`.
fn bind_programs_attached(lab: &Lab) -> Vec<(String, bool)> {
    let doc = lab.agent.status_json().unwrap();
    doc["programs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["program"].as_str().unwrap().starts_with("lb_post_bind"))
        .map(|p| {
            (
                p["program"].as_str().unwrap().to_owned(),
                p["attached"] == true,
            )
        })
        .collect()
}

#[test]
fn binding_a_node_port_in_the_host_namespace_fails_with_eaddrinuse() {
    let mut lab = lab(&[]);
    assert_eq!(
        bind_programs_attached(&lab),
        [
            ("lb_post_bind4".to_owned(), true),
            ("lb_post_bind6".to_owned(), true)
        ]
    );
    let taken = pair("EADDRINUSE", "EADDRINUSE");
    let free = pair("ok", "ok");
    // Wildcards of both families, the node address, and 127.0.0.1 (served
    // as a localhost node port).
    for addr in [
        format!("0.0.0.0:{NODE_PORT}"),
        format!("[::]:{NODE_PORT}"),
        format!("{NODE_IP}:{NODE_PORT}"),
        format!("127.0.0.1:{NODE_PORT}"),
    ] {
        assert_eq!(bind(&lab, Where::Host, &addr), taken, "host {addr}");
        // Free all along: only the program refused it.
        assert_eq!(bind(&lab, Where::HostOutside, &addr), free, "{addr}");
    }
    // The nodePort's protocol only.
    assert_eq!(
        bind(&lab, Where::Host, &format!("0.0.0.0:{TCP_NODE_PORT}")),
        pair("EADDRINUSE", "ok")
    );
    // Another port; another address that is no node address.
    assert_eq!(
        bind(&lab, Where::Host, &format!("0.0.0.0:{FREE_PORT}")),
        free
    );
    assert_eq!(
        bind(&lab, Where::Host, &format!("10.250.0.9:{NODE_PORT}")),
        free
    );
    // A pod has addresses of its own.
    for addr in [
        format!("0.0.0.0:{NODE_PORT}"),
        format!("{NODE_IP}:{NODE_PORT}"),
    ] {
        assert_eq!(bind(&lab, Where::Pod, &addr), free, "pod {addr}");
    }
    // The node port still answers pods.
    let r = lab
        .client(&format!("{NODE_IP}:{NODE_PORT}"), &["--count", "10"])
        .unwrap();
    assert_eq!(r.ok(), 10, "{r:?}");

    // No longer a NodePort: the host may bind the port.
    lab.write_manifest("services.yaml", &manifest(false))
        .unwrap();
    wait_node_ports(&mut lab, 0);
    assert_eq!(
        bind(&lab, Where::Host, &format!("0.0.0.0:{NODE_PORT}")),
        free
    );
    assert_eq!(
        bind(&lab, Where::Host, &format!("0.0.0.0:{TCP_NODE_PORT}")),
        pair("EADDRINUSE", "ok"),
        "tcp-only is still a NodePort"
    );
}

/// `--bind-protection=false` detaches the programs a previous agent left
/// and every bind succeeds; turned on again, the NodePorts the pinned maps
/// hold are protected again at once.
#[test]
fn with_bind_protection_off_the_host_binds_node_ports() {
    let mut lab = lab(&[]);
    let wildcard = format!("0.0.0.0:{NODE_PORT}");
    let node = format!("{NODE_IP}:{NODE_PORT}");
    assert_eq!(
        bind(&lab, Where::Host, &wildcard),
        pair("EADDRINUSE", "EADDRINUSE")
    );

    lab.agent.stop().unwrap();
    lab.agent.extra_args.push("--bind-protection=false".into());
    lab.agent.start().unwrap();
    lab.agent.wait_ready(SYNC).unwrap();
    assert_eq!(
        bind_programs_attached(&lab),
        [
            ("lb_post_bind4".to_owned(), false),
            ("lb_post_bind6".to_owned(), false)
        ]
    );
    for addr in [&wildcard, &node] {
        assert_eq!(bind(&lab, Where::Host, addr), pair("ok", "ok"), "{addr}");
    }
    let r = lab.client(&node, &["--count", "10"]).unwrap();
    assert_eq!(r.ok(), 10, "the node port is still served: {r:?}");

    lab.agent.stop().unwrap();
    lab.agent.extra_args.pop();
    lab.agent.start().unwrap();
    lab.agent.wait_ready(SYNC).unwrap();
    for addr in [&wildcard, &node] {
        assert_eq!(
            bind(&lab, Where::Host, addr),
            pair("EADDRINUSE", "EADDRINUSE"),
            "{addr}"
        );
    }

    // Uninstalled: nothing is refused any more.
    lab.agent.stop().unwrap();
    lab.agent.uninstall().unwrap();
    assert_eq!(bind(&lab, Where::Host, &wildcard), pair("ok", "ok"));
}
