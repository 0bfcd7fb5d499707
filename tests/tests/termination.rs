//! End-to-end for `--terminate-sockets all`: established TCP connections
//! through a ClusterIP are destroyed when their endpoint is gone from the
//! Service or no longer serving, and kept while it is terminating but
//! still serving (a graceful shutdown keeps its connections). The Service
//! is selectorless with a hand-written EndpointSlice, so each endpoint's
//! conditions are set directly. Which pod a connection reached is read
//! with `ss` (getpeername() shows the ClusterIP). Privileged: run with
//! `--test-threads=1`.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use lb_tests::{Bins, Lab, UdpSession, endpoints, find_service, pod_ip, run};
use serde_json::Value;

const SYNC: Duration = Duration::from_secs(10);
const PODS: &[(&str, u8)] = &[("pod-1", 11), ("pod-2", 12), ("pod-3", 13)];
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 81, 10);

fn bins() -> Bins {
    lb_tests::test_bins!()
}

/// `web` (TCP 80) with one endpoint per pod; `conditions[i]`: pod i's
/// conditions as YAML flow (`None`: not in the slice).
fn manifest(conditions: [Option<&str>; 3]) -> String {
    let eps: String = PODS
        .iter()
        .zip(conditions)
        .filter_map(|((_, octet), c)| {
            Some(format!(
                "  - addresses: [\"{}\"]\n    conditions: {}\n",
                pod_ip(*octet),
                c?
            ))
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: \"{WEB}\"
  ports:
    - port: 80
      protocol: TCP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
  - port: 80
    protocol: TCP
endpoints:
{eps}"
    )
}

const READY: Option<&str> = Some("{ready: true}");
const DRAINING: Option<&str> = Some("{ready: false, serving: true, terminating: true}");
const STOPPING: Option<&str> = Some("{ready: false, serving: false, terminating: true}");

fn apply(lab: &mut Lab, conditions: [Option<&str>; 3], used: usize) {
    lab.write_manifest("web.yaml", &manifest(conditions))
        .expect("manifest");
    lab.agent
        .wait_for("web programmed", SYNC, |d| {
            endpoints(d, "default", "web", 80).len() == used
        })
        .expect("sync");
}

fn terminated(d: &Value) -> u64 {
    find_service(d, "default", "web")
        .and_then(|s| s["ports"][0]["terminatedSockets"].as_u64())
        .unwrap_or(0)
}

/// The real peer (pod IP) of each established TCP connection of `netns`,
/// by local address.
fn real_peers(netns: &str) -> BTreeMap<SocketAddr, SocketAddr> {
    let out = run(Command::new("ip").args([
        "netns",
        "exec",
        netns,
        "ss",
        "-Htn",
        "state",
        "established",
    ]))
    .expect("ss");
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = f.len();
            (n >= 2).then(|| Some((f[n - 2].parse().ok()?, f[n - 1].parse().ok()?)))?
        })
        .collect()
}

/// Which pod each of `names`' connections reached.
fn pods_of(lab: &Lab, locals: &[(String, SocketAddr)]) -> Vec<(String, &'static str)> {
    let peers = real_peers(&lab.topo.client);
    locals
        .iter()
        .map(|(name, local)| {
            let peer = peers
                .get(local)
                .unwrap_or_else(|| panic!("{name} ({local}) not in ss: {peers:?}"));
            let pod = PODS
                .iter()
                .find(|(_, o)| peer.ip() == std::net::IpAddr::V4(pod_ip(*o)))
                .unwrap_or_else(|| panic!("{name}: peer {peer} is no pod"))
                .0;
            (name.clone(), pod)
        })
        .collect()
}

/// One exchange on connection `name`: the pod's name, or the error.
fn exchange(s: &mut UdpSession, name: &str) -> Result<String, String> {
    let r = s.command(&format!("send {name}")).expect("session");
    match r["name"].as_str() {
        Some(n) => Ok(n.to_owned()),
        None => Err(r.to_string()),
    }
}

#[test]
fn tcp_connections_go_with_their_endpoint_but_not_while_it_still_serves() {
    let mut lab = Lab::new(&bins(), PODS, 80).expect("lab");
    lab.write_manifest("web.yaml", &manifest([READY; 3]))
        .expect("manifest");
    lab.agent
        .extra_args
        .extend(["--terminate-sockets", "all"].map(String::from));
    lab.agent.start().expect("agent start");
    lab.agent
        .wait_for("web programmed", SYNC, |d| {
            endpoints(d, "default", "web", 80).len() == 3
        })
        .expect("sync");

    // Connections through the ClusterIP until each pod has two, and one
    // straight to pod-2's IP (no record: never the agent's to destroy).
    let mut s = UdpSession::start(&lab, &[]).expect("session");
    let mut locals = Vec::new();
    let web = format!("{WEB}:80");
    loop {
        let name = format!("t{}", locals.len());
        let open = s.command(&format!("tcp {name} {web}")).unwrap();
        assert_eq!(open["peer"], web.as_str(), "{open}");
        locals.push((name, open["local"].as_str().unwrap().parse().unwrap()));
        let pods = pods_of(&lab, &locals);
        let each = PODS
            .iter()
            .all(|(p, _)| pods.iter().filter(|(_, q)| q == p).count() >= 2);
        if each {
            break;
        }
        assert!(locals.len() < 80, "connections did not spread: {pods:?}");
    }
    let pods = pods_of(&lab, &locals);
    let direct = format!("{}:80", pod_ip(12));
    let open = s.command(&format!("tcp direct {direct}")).unwrap();
    assert_eq!(open["peer"], direct.as_str(), "{open}");
    let on = |pod: &str| -> Vec<String> {
        pods.iter()
            .filter(|(_, p)| *p == pod)
            .map(|(n, _)| n.clone())
            .collect()
    };

    // pod-1 terminating but serving, pod-2 gone, pod-3 ready: new
    // connects use pod-3 only; pod-2's connections are destroyed.
    apply(&mut lab, [DRAINING, None, READY], 1);
    let gone = on("pod-2").len() as u64;
    let doc = lab
        .agent
        .wait_for("pod-2's connections destroyed", SYNC, |d| {
            terminated(d) >= gone
        })
        .unwrap();
    assert_eq!(terminated(&doc), gone, "{doc}");
    for name in on("pod-2") {
        assert!(exchange(&mut s, &name).is_err(), "{name} on pod-2 survived");
    }
    for pod in ["pod-1", "pod-3"] {
        let name = &on(pod)[0];
        assert_eq!(exchange(&mut s, name).as_deref(), Ok(pod), "{name}");
    }
    assert_eq!(exchange(&mut s, "direct").as_deref(), Ok("pod-2"));

    // pod-1 no longer serving: its connections go too (the one used
    // above as well: the server closed its side, the session has not, so
    // it is still open in CLOSE_WAIT); pod-3's unused one stays.
    apply(&mut lab, [STOPPING, None, READY], 1);
    let left = on("pod-1").len() as u64;
    lab.agent
        .wait_for("pod-1's connections destroyed", SYNC, |d| {
            terminated(d) >= gone + left
        })
        .unwrap();
    for name in &on("pod-1")[1..] {
        assert!(exchange(&mut s, name).is_err(), "{name} on pod-1 survived");
    }
    let name = &on("pod-3")[1];
    assert_eq!(exchange(&mut s, name).as_deref(), Ok("pod-3"), "{name}");
    let doc = lab.agent.list_json().unwrap();
    assert_eq!(terminated(&doc), gone + left, "{doc}");
}
