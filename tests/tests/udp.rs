//! End-to-end for the UDP and peer-address hooks: sendmsg4 (unconnected UDP,
//! sticky per socket), recvmsg4 (replies carry the frontend), getpeername4,
//! the reverse map's staleness check, and a real DNS server (dnsmasq) behind
//! a ClusterIP, resolved with dig and glibc. Privileged: run with
//! `--test-threads=1`.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    Bins, Lab, UdpSession, back_end_manifest,
    dns::{Dnsmasq, dig, in_client},
    endpoints, find_service, pod_manifest, run, service_ip,
};
use serde_json::Value;

const SYNC: Duration = Duration::from_secs(10);
const PODS: &[(&str, u8)] = &[("back-end-1", 11), ("back-end-2", 12), ("back-end-3", 13)];
/// The UDP echo service in front of the lb-testservers (which answer every
/// datagram on port 80 with their name).
const ECHO_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 53, 1);
const ECHO_PORT: u16 = 5300;
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 53, 2);
/// `lb_common::maps::REVERSE` and `DEFAULT_MAX_REVERSE`, as an operator
/// sees them (this crate does not link lb-common).
const REVERSE_PIN: &str = "LB_REVERSE";
const REVERSE_MAX: u64 = 262_144;

fn bins() -> Bins {
    lb_tests::test_bins!()
}

fn pod_ip(octet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, octet)
}

/// `back-end` (TCP 80, the textbook pods), `echo` (UDP 5300 → 80 on the
/// same pods) and `empty` (UDP, selects nothing).
fn services_manifest() -> String {
    services_manifest_ready([true; 3])
}

/// [`services_manifest`] with each pod ready or not.
fn services_manifest_ready(ready: [bool; 3]) -> String {
    let pods: Vec<(&str, Ipv4Addr, bool)> = PODS
        .iter()
        .zip(ready)
        .map(|((n, o), r)| (*n, pod_ip(*o), r))
        .collect();
    format!(
        "{}---
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  clusterIP: {ECHO_IP}
  selector:
    app: myapp
  ports:
    - port: {ECHO_PORT}
      protocol: UDP
      targetPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: empty
spec:
  clusterIP: {EMPTY_IP}
  selector:
    app: nothing
  ports:
    - port: {ECHO_PORT}
      protocol: UDP
",
        back_end_manifest(&pods)
    )
}

fn lab_with_services() -> (Lab, Ipv4Addr) {
    lab_with_services_and(&[])
}

/// [`lab_with_services`] with more `lb-agent run` flags.
fn lab_with_services_and(flags: &[&str]) -> (Lab, Ipv4Addr) {
    let mut lab = Lab::new(&bins(), PODS, 80).expect("lab");
    lab.write_manifest("services.yaml", &services_manifest())
        .expect("manifest");
    lab.agent
        .extra_args
        .extend(flags.iter().map(|f| (*f).to_owned()));
    lab.agent.start().expect("agent start");
    let doc = lab
        .agent
        .wait_for("services programmed", SYNC, |d| {
            endpoints(d, "default", "back-end", 80).len() == 3
                && endpoints(d, "default", "echo", ECHO_PORT).len() == 3
                && service_ip(d, "default", "empty").is_some()
        })
        .expect("sync");
    let ip = service_ip(&doc, "default", "back-end").expect("cluster ip");
    (lab, ip)
}

fn client(lab: &Lab, target: &str, args: &[&str]) -> Value {
    lab.client_json(target, args).expect("lb-testclient")
}

fn map_of(v: &Value) -> Vec<(String, u64)> {
    lb_tests::counts(v)
}

/// `bpftool map dump` of the pinned reverse map: its entries.
fn reverse_entries(lab: &Lab) -> Vec<Value> {
    let pin = lab.agent.bpffs.join(REVERSE_PIN);
    let out = run(Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&pin))
    .expect("bpftool map dump");
    serde_json::from_str::<Vec<Value>>(&out).expect("bpftool json")
}

#[test]
fn unconnected_udp_sticks_to_one_backend_and_replies_carry_the_frontend() {
    let (lab, _) = lab_with_services();
    let frontend = format!("{ECHO_IP}:{ECHO_PORT}");
    let one = client(
        &lab,
        &frontend,
        &["--udp-unconnected", "--sockets", "1", "--count", "100"],
    );
    assert_eq!(one["errors"], serde_json::json!({}), "{one}");
    let backends = map_of(&one["backends"]);
    assert_eq!(backends.len(), 1, "one socket, one backend: {one}");
    assert_eq!(backends[0].1, 100, "{one}");
    // recvfrom() reports the address the datagrams were sent to.
    assert_eq!(map_of(&one["sources"]), [(frontend.clone(), 100)], "{one}");

    let many = client(
        &lab,
        &frontend,
        &["--udp-unconnected", "--sockets", "30", "--count", "5"],
    );
    assert_eq!(many["errors"], serde_json::json!({}), "{many}");
    for socket in many["perSocket"].as_array().unwrap() {
        let reached = map_of(socket);
        assert_eq!(reached.len(), 1, "each socket sticks: {many}");
        assert_eq!(reached[0].1, 5, "{many}");
    }
    assert_eq!(map_of(&many["backends"]).len(), 3, "sockets spread: {many}");
    assert_eq!(map_of(&many["sources"]), [(frontend, 150)], "{many}");

    // The reverse map is pinned where an operator finds it, and holds one
    // entry per (socket, backend).
    let entries = reverse_entries(&lab);
    assert!(entries.len() >= 31, "{} entries", entries.len());
    let show = run(Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(lab.agent.bpffs.join(REVERSE_PIN)))
    .unwrap();
    let show: Value = serde_json::from_str(&show).unwrap();
    assert_eq!(show["type"], "lru_hash", "{show}");
    assert_eq!(show["max_entries"].as_u64(), Some(REVERSE_MAX), "{show}");
}

#[test]
fn datagrams_to_a_service_without_endpoints_are_refused_at_once() {
    let (lab, _) = lab_with_services();
    let report = client(
        &lab,
        &format!("{EMPTY_IP}:{ECHO_PORT}"),
        &["--udp-unconnected", "--count", "10"],
    );
    assert_eq!(
        map_of(&report["errors"]),
        [("ECONNREFUSED".into(), 10)],
        "{report}"
    );
}

#[test]
fn getpeername_returns_the_cluster_ip_for_tcp_and_connected_udp() {
    let (lab, ip) = lab_with_services();
    let tcp = client(&lab, &format!("{ip}:80"), &["--count", "20"]);
    assert_eq!(map_of(&tcp["backends"]).len(), 3, "{tcp}");
    assert_eq!(map_of(&tcp["peers"]), [(format!("{ip}:80"), 20)], "{tcp}");
    let frontend = format!("{ECHO_IP}:{ECHO_PORT}");
    let udp = client(&lab, &frontend, &["--udp", "--count", "20"]);
    assert_eq!(map_of(&udp["backends"]).len(), 3, "{udp}");
    assert_eq!(map_of(&udp["peers"]), [(frontend, 20)], "{udp}");
    // A pod reached directly keeps its own address.
    let direct = client(&lab, &format!("{}:80", pod_ip(12)), &["--count", "3"]);
    assert_eq!(
        map_of(&direct["peers"]),
        [(format!("{}:80", pod_ip(12)), 3)],
        "{direct}"
    );
}

/// Entries of the LRU reverse map of unconnected UDP, as `lb-agent list`
/// counts them.
fn reverse_occupancy(lab: &Lab) -> u64 {
    let doc = lab.agent.list_json().expect("list");
    doc["reverseMap"]["entries"].as_u64().expect("reverseMap")
}

/// `lb_common::maps::SOCK`: the slot array of translated sockets.
const SOCK_PIN: &str = "LB_SOCK";

/// `list -o json`'s `sockets`: slots held and spilled records.
fn socket_records(lab: &Lab) -> (u64, u64) {
    let doc = lab.agent.list_json().expect("list");
    let s = &doc["sockets"];
    (
        s["slots"].as_u64().expect("sockets.slots"),
        s["spilled"].as_u64().expect("sockets.spilled"),
    )
}

/// `stored` of a client report: each socket's record, `FRONTEND -> BACKEND`.
fn stored(report: &Value) -> Vec<(String, u64)> {
    map_of(&report["stored"])
}

/// A TCP service in front of the same pods on a port nothing listens on.
const REFUSE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 53, 3);
fn refused_manifest() -> String {
    service_manifest("refuse", REFUSE_IP, "- port: 81")
}

/// A Service named `name` at `ip` selecting the lab's
/// pods, with the given port list entry.
fn service_manifest(name: &str, ip: Ipv4Addr, port: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  clusterIP: {ip}
  selector:
    app: myapp
  ports:
    {port}
"
    )
}

/// A TCP or connected UDP socket's translation is recorded in its slot of
/// `LB_SOCK` (by socket cookie), whichever family the socket is: read back
/// by the socket's cookie, it holds the frontend the socket asked for and
/// the backend it reached. Nothing goes to the LRU of unconnected UDP, and
/// `sock_release` frees each slot at close: after 2,420 short-lived
/// sockets the array holds what it held before. A connect the backend
/// refuses fails as before.
#[test]
fn connected_sockets_are_recorded_in_a_slot_freed_at_close() {
    let (mut lab, ip) = lab_with_services();
    lab.write_manifest("refuse.yaml", &refused_manifest())
        .unwrap();
    lab.agent
        .wait_for("refuse programmed", SYNC, |d| {
            endpoints(d, "default", "refuse", 81).len() == 3
        })
        .unwrap();
    let pin = lab.agent.bpffs.join(SOCK_PIN);
    let pin = pin.to_str().expect("utf-8 path");
    let start = reverse_occupancy(&lab);
    let records = socket_records(&lab);
    let backends: BTreeSet<String> = PODS
        .iter()
        .map(|(_, o)| format!("{}:80", pod_ip(*o)))
        .collect();
    let check = |report: &Value, frontend: &str, count: u64| {
        let stored = stored(report);
        assert_eq!(
            stored.iter().map(|(_, n)| n).sum::<u64>(),
            count,
            "{report}"
        );
        for (record, _) in &stored {
            let (front, back) = record.split_once(" -> ").expect("FRONTEND -> BACKEND");
            assert_eq!(front, frontend, "{report}");
            assert!(backends.contains(back), "{record} {report}");
        }
        assert!(stored.len() > 1, "one backend only: {report}");
    };
    let frontend = format!("{ip}:80");
    // 9,600 + 200 + 200 short-lived translated sockets: 10,000 in all.
    let tcp = client(&lab, &frontend, &["--count", "9600", "--sock-slots", pin]);
    assert_eq!(tcp["errors"], serde_json::json!({}), "{tcp}");
    assert_eq!(map_of(&tcp["peers"]), [(frontend.clone(), 9600)], "{tcp}");
    check(&tcp, &frontend, 9600);
    let mapped = format!("[::ffff:{ip}]:80");
    let v6 = client(&lab, &mapped, &["--count", "200", "--sock-slots", pin]);
    assert_eq!(map_of(&v6["peers"]), [(mapped, 200)], "{v6}");
    check(&v6, &frontend, 200);
    let echo = format!("{ECHO_IP}:{ECHO_PORT}");
    let udp = client(
        &lab,
        &echo,
        &["--udp", "--count", "200", "--sock-slots", pin],
    );
    assert_eq!(map_of(&udp["peers"]), [(echo.clone(), 200)], "{udp}");
    check(&udp, &echo, 200);
    let refused = client(&lab, &format!("{REFUSE_IP}:81"), &["--count", "20"]);
    assert!(
        refused["errors"].to_string().contains("ECONNREFUSED"),
        "{refused}"
    );
    let doc = lab.agent.list_json().unwrap();
    assert!(
        doc["counters"]["translated"].as_u64() >= Some(10_020),
        "{doc}"
    );
    assert_eq!(doc["counters"]["reverseWriteFailed"], 0, "{doc}");
    assert_eq!(reverse_occupancy(&lab), start, "{doc}");
    assert_eq!(socket_records(&lab), records, "{doc}");
}

/// With 2 slots, sockets open at once collide: each one whose slot another
/// live socket holds is recorded in the spill hash instead, and is served
/// the same (getpeername() shows the frontend; the counter `sockSpilled`
/// counts them). At close every slot and spilled record goes.
#[test]
fn sockets_whose_slot_is_held_spill_and_are_freed_at_close() {
    let (lab, ip) = lab_with_services_and(&["--max-sockets", "2"]);
    let pin = lab.agent.bpffs.join(SOCK_PIN);
    let pin = pin.to_str().expect("utf-8 path");
    let records = socket_records(&lab);
    let frontend = format!("{ip}:80");
    let echo = format!("{ECHO_IP}:{ECHO_PORT}");
    for (target, flags) in [(&frontend, &[][..]), (&echo, &["--udp"][..])] {
        let args = [flags, &["--count", "40", "--hold", "--sock-slots", pin]].concat();
        let report = client(&lab, target, &args);
        assert_eq!(report["errors"], serde_json::json!({}), "{report}");
        assert_eq!(map_of(&report["peers"]), [(target.clone(), 40)], "{report}");
        let stored = stored(&report);
        assert_eq!(stored.iter().map(|(_, n)| n).sum::<u64>(), 40, "{report}");
        let spilled: u64 = stored
            .iter()
            .filter(|(r, _)| r.ends_with(" (spilled)"))
            .map(|(_, n)| n)
            .sum();
        // 40 sockets open at once over 2 slots: at most 2 hold a slot.
        assert!(spilled >= 38, "{report}");
        for (record, _) in &stored {
            assert!(record.starts_with(&format!("{target} -> ")), "{report}");
        }
    }
    let doc = lab.agent.list_json().unwrap();
    assert!(doc["counters"]["sockSpilled"].as_u64() >= Some(76), "{doc}");
    assert_eq!(doc["sockets"]["maxSlots"], 2, "{doc}");
    assert_eq!(socket_records(&lab), records, "{doc}");
}

/// `terminatedSockets` of the `echo` frontend in `list -o json`.
fn echo_terminated(doc: &Value) -> u64 {
    find_service(doc, "default", "echo")
        .and_then(|s| s["ports"].as_array())
        .into_iter()
        .flatten()
        .find(|p| p["port"] == ECHO_PORT)
        .and_then(|p| p["terminatedSockets"].as_u64())
        .unwrap_or(0)
}

/// Opens connected UDP socket `name` of session `s` to `echo` and returns
/// the backend its first exchange reached.
fn udp_to_echo(s: &mut UdpSession, name: &str) -> String {
    let echo = format!("{ECHO_IP}:{ECHO_PORT}");
    let open = s.command(&format!("udp {name} {echo}")).unwrap();
    assert_eq!(open["peer"], echo.as_str(), "{open}");
    let r = s.command(&format!("send {name}")).unwrap();
    r["name"].as_str().expect("a reply").to_owned()
}

/// Marks pod `gone` not ready and waits until `echo` has the two others.
fn take_out(lab: &mut Lab, gone: &str) {
    let ready: [bool; 3] = std::array::from_fn(|i| PODS[i].0 != gone);
    lab.write_manifest("services.yaml", &services_manifest_ready(ready))
        .unwrap();
    lab.agent
        .wait_for("echo without the pod", SYNC, |d| {
            endpoints(d, "default", "echo", ECHO_PORT).len() == 2
        })
        .unwrap();
}

/// Each UDP socket `{prefix}{i}` of `s` whose backend was `gone` fails its
/// next exchange (the send, as the socket is disconnected, or the receive
/// with ECONNABORTED); the others reach the backend they had.
fn assert_destroyed_only_on(s: &mut UdpSession, prefix: &str, backends: &[String], gone: &str) {
    for (i, before) in backends.iter().enumerate() {
        let r = s.command(&format!("send {prefix}{i}")).unwrap();
        if before == gone {
            let err = r["error"].as_str().unwrap_or_default();
            assert!(
                err == "ECONNABORTED" || err == "EDESTADDRREQ",
                "{prefix}{i} on {before}: {r}"
            );
        } else {
            assert_eq!(r["name"], before.as_str(), "{prefix}{i}: {r}");
        }
    }
}

/// Connected UDP and TCP sockets to `echo` and `back-end`, and the backend
/// of each UDP socket; one UDP socket connected straight to the pod the
/// first UDP socket reached; then that pod is marked not ready.
/// Returns the session, the UDP sockets' backends and the pod taken out.
fn sockets_then_backend_removed(
    lab: &mut Lab,
    ip: Ipv4Addr,
) -> (UdpSession, Vec<String>, &'static str) {
    let mut s = UdpSession::start(lab, &[]).unwrap();
    let backends: Vec<String> = (0..12)
        .map(|i| udp_to_echo(&mut s, &format!("u{i}")))
        .collect();
    for i in 0..6 {
        let open = s.command(&format!("tcp t{i} {ip}:80")).unwrap();
        assert_eq!(open["peer"], format!("{ip}:80").as_str(), "{open}");
    }
    let (gone, octet) = *PODS
        .iter()
        .find(|(n, _)| *n == backends[0])
        .expect("a pod's name");
    let direct = format!("{}:80", pod_ip(octet));
    let open = s.command(&format!("udp direct {direct}")).unwrap();
    assert_eq!(open["peer"], direct.as_str(), "{open}");
    take_out(lab, gone);
    (s, backends, gone)
}

/// The default `--terminate-sockets udp`: when a backend leaves `echo`,
/// the connected UDP sockets translated to it through `echo` are destroyed
/// (their next call fails: the send, as the socket is disconnected, or the
/// receive with ECONNABORTED) and counted on the frontend; the others keep
/// their backend. A new socket reaches a live backend. Untouched: TCP
/// connections (even to that pod), a UDP socket connected straight to the
/// pod, and the unconnected socket (it picks again on its next datagram).
#[test]
fn connected_udp_sockets_of_a_removed_backend_are_destroyed() {
    let (mut lab, ip) = lab_with_services();
    let (mut s, backends, gone) = sockets_then_backend_removed(&mut lab, ip);
    let on_gone = backends.iter().filter(|b| *b == gone).count() as u64;
    let doc = lab
        .agent
        .wait_for("sockets destroyed", SYNC, |d| echo_terminated(d) >= on_gone)
        .unwrap();
    assert_eq!(echo_terminated(&doc), on_gone, "{doc}");
    assert_destroyed_only_on(&mut s, "u", &backends, gone);
    // The passes run on a thread of their own, at nice 19, so that
    // reading every record never takes a CPU from the sync loop.
    let pid = lab.agent.pid().expect("the agent runs");
    assert_eq!(thread_nice(pid, "lb-terminate"), Some(19));
    assert_eq!(
        thread_nice(pid, "lb-agent"),
        Some(0),
        "the rest keeps its priority"
    );
    let echo = format!("{ECHO_IP}:{ECHO_PORT}");
    s.command(&format!("udp fresh {echo}")).unwrap();
    let fresh = s.command("send fresh").unwrap();
    assert!(fresh["name"].as_str().is_some_and(|n| n != gone), "{fresh}");
    let direct = s.command("send direct").unwrap();
    assert_eq!(direct["name"], gone, "{direct}");
    for i in 0..6 {
        let r = s.command(&format!("send t{i}")).unwrap();
        assert!(r["name"].as_str().is_some(), "t{i}: {r}");
    }
    let unconnected = s.send(&echo).unwrap();
    assert_eq!(unconnected["from"], echo.as_str(), "{unconnected}");
    assert_ne!(unconnected["name"], gone, "{unconnected}");
}

/// The nice value of `pid`'s thread named `name` (field 19 of its stat).
fn thread_nice(pid: u32, name: &str) -> Option<i64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|t| {
        let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
        if comm.trim_end() != name {
            return None;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
        // After the ")" that closes the command: state is field 3.
        let rest = &stat[stat.rfind(')')? + 2..];
        rest.split(' ').nth(19 - 3)?.parse().ok()
    })
}

/// `--terminate-sockets none`: the sockets on a removed backend stay and
/// keep talking to it (its server still answers).
#[test]
fn with_termination_off_sockets_keep_their_backend() {
    let (mut lab, ip) = lab_with_services_and(&["--terminate-sockets", "none"]);
    let (mut s, backends, gone) = sockets_then_backend_removed(&mut lab, ip);
    // A later sync has happened once the endpoints changed; a termination
    // pass would have run right after it.
    for (i, before) in backends.iter().enumerate() {
        let r = s.command(&format!("send u{i}")).unwrap();
        assert_eq!(r["name"], before.as_str(), "u{i}: {r}");
    }
    assert!(backends.iter().any(|b| b == gone));
    let doc = lab.agent.list_json().unwrap();
    assert_eq!(echo_terminated(&doc), 0, "{doc}");
}

/// Clients in two network namespaces of the attached cgroup: the connected
/// UDP sockets on the removed backend are destroyed in both. A socket of a
/// namespace outside the cgroup, connected to that pod, is untouched.
#[test]
fn sockets_in_two_client_namespaces_are_both_destroyed() {
    let (mut lab, _) = lab_with_services();
    let second = lab.topo.add_client(1).unwrap();
    let outsider = lab.topo.add_client(2).unwrap();
    let mut outside = UdpSession::start_outside_cgroup(&lab, &outsider).unwrap();
    let mut a = UdpSession::start(&lab, &[]).unwrap();
    let mut b = UdpSession::start_in(&lab, &second, &[]).unwrap();
    let in_a: Vec<String> = (0..6)
        .map(|i| udp_to_echo(&mut a, &format!("a{i}")))
        .collect();
    let gone = PODS
        .iter()
        .map(|(n, _)| *n)
        .find(|n| *n == in_a[0])
        .expect("a pod's name");
    // Sockets in b until one reaches the same pod (1 in 3 each).
    let mut in_b = Vec::new();
    while !in_b.iter().any(|n| n == gone) {
        assert!(in_b.len() < 40, "no socket of b reached {gone}: {in_b:?}");
        in_b.push(udp_to_echo(&mut b, &format!("b{}", in_b.len())));
    }
    let octet = PODS.iter().find(|(n, _)| *n == gone).unwrap().1;
    let direct = format!("{}:80", pod_ip(octet));
    let open = outside.command(&format!("udp o {direct}")).unwrap();
    assert_eq!(open["peer"], direct.as_str(), "{open}");
    take_out(&mut lab, gone);
    let on_gone = in_a.iter().chain(&in_b).filter(|n| *n == gone).count() as u64;
    let doc = lab
        .agent
        .wait_for("sockets destroyed", SYNC, |d| echo_terminated(d) >= on_gone)
        .unwrap();
    assert_eq!(echo_terminated(&doc), on_gone, "{doc}");
    assert_destroyed_only_on(&mut a, "a", &in_a, gone);
    assert_destroyed_only_on(&mut b, "b", &in_b, gone);
    let r = outside.command("send o").unwrap();
    assert_eq!(r["name"], gone, "outside the cgroup: {r}");
}

/// A second UDP service in front of the same pods.
const ECHO2_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 53, 4);
fn echo2_manifest() -> String {
    service_manifest(
        "echo2",
        ECHO2_IP,
        &format!("- port: {ECHO_PORT}\n      protocol: UDP\n      targetPort: 80"),
    )
}

/// A connected UDP socket that connects again, to another frontend, has
/// its record overwritten: getpeername() and the record show the second
/// frontend, and the reply (from a backend of the second) arrives.
#[test]
fn a_reconnected_socket_overwrites_its_record() {
    let (mut lab, _) = lab_with_services();
    lab.write_manifest("echo2.yaml", &echo2_manifest()).unwrap();
    lab.agent
        .wait_for("echo2 programmed", SYNC, |d| {
            endpoints(d, "default", "echo2", ECHO_PORT).len() == 3
        })
        .unwrap();
    let pin = lab.agent.bpffs.join(SOCK_PIN);
    let echo = format!("{ECHO_IP}:{ECHO_PORT}");
    let echo2 = format!("{ECHO2_IP}:{ECHO_PORT}");
    let report = client(
        &lab,
        &echo,
        &[
            "--udp",
            "--count",
            "50",
            "--reconnect",
            &echo2,
            "--sock-slots",
            pin.to_str().expect("utf-8 path"),
        ],
    );
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert_eq!(map_of(&report["peers"]), [(echo2.clone(), 50)], "{report}");
    let stored = stored(&report);
    assert_eq!(stored.iter().map(|(_, n)| n).sum::<u64>(), 50, "{report}");
    for (record, _) in &stored {
        assert!(record.starts_with(&format!("{echo2} -> ")), "{report}");
    }
}

/// `echo` as a selectorless service with one hand-written endpoint.
fn echo_one_endpoint() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: echo1
spec:
  clusterIP: {ECHO_IP}
  ports:
    - port: {ECHO_PORT}
      protocol: UDP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo1-1
  labels:
    kubernetes.io/service-name: echo1
addressType: IPv4
ports:
  - port: 80
    protocol: UDP
endpoints:
  - addresses: [\"{}\"]
",
        pod_ip(11)
    )
}

fn echo1_svc_id(doc: &Value) -> Option<u64> {
    find_service(doc, "default", "echo1")?["ports"][0]["svcId"].as_u64()
}

#[test]
fn a_recreated_service_does_not_revive_a_stale_reverse_entry() {
    let mut lab = Lab::new(&bins(), PODS, 80).expect("lab");
    lab.write_manifest("echo1.yaml", &echo_one_endpoint())
        .unwrap();
    lab.agent.start().unwrap();
    let doc = lab
        .agent
        .wait_for("echo1", SYNC, |d| {
            endpoints(d, "default", "echo1", ECHO_PORT).len() == 1
        })
        .unwrap();
    let old_id = echo1_svc_id(&doc).unwrap();
    let frontend = format!("{ECHO_IP}:{ECHO_PORT}");
    let pod = format!("{}:80", pod_ip(11));
    let mut session = UdpSession::start(&lab, &[]).unwrap();
    let first = session.send(&frontend).unwrap();
    assert_eq!(first["from"], frontend.as_str(), "{first}");
    assert_eq!(first["name"], "back-end-1", "{first}");

    // Delete the service and recreate it at the same address: a new id.
    lab.remove_manifest("echo1.yaml").unwrap();
    lab.agent
        .wait_for("echo1 gone", SYNC, |d| {
            find_service(d, "default", "echo1").is_none()
        })
        .unwrap();
    lab.write_manifest("echo1.yaml", &echo_one_endpoint())
        .unwrap();
    let doc = lab
        .agent
        .wait_for("echo1 again", SYNC, |d| {
            endpoints(d, "default", "echo1", ECHO_PORT).len() == 1
        })
        .unwrap();
    let new_id = echo1_svc_id(&doc).unwrap();
    assert_ne!(old_id, new_id, "recreated with a new id");

    // The socket now talks to the pod directly. Its (socket, pod) reverse
    // entry still names the old service: the frontend exists again with a
    // backend, so only the id check keeps the pod's reply from being
    // reported as coming from the ClusterIP.
    let direct = session.send(&pod).unwrap();
    assert_eq!(direct["from"], pod.as_str(), "{direct}");
    // Through the new service, translation works again.
    let again = session.send(&frontend).unwrap();
    assert_eq!(again["from"], frontend.as_str(), "{again}");
}

// ---------------------------------------------------------------- DNS ----

const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DNS_PODS: &[(&str, u8)] = &[("dns-1", 21), ("dns-2", 22)];

fn dns_manifest(ready: [bool; 2]) -> String {
    let mut y = format!(
        "apiVersion: v1
kind: Service
metadata:
  name: dns
spec:
  clusterIP: {DNS_IP}
  selector:
    app: dns
  ports:
    - name: dns
      port: 53
      protocol: UDP
    - name: dns-tcp
      port: 53
      protocol: TCP
"
    );
    for ((name, octet), ready) in DNS_PODS.iter().zip(ready) {
        y.push_str(&pod_manifest(
            name,
            "default",
            &[("app", "dns")],
            "    - name: dnsmasq\n      image: dnsmasq\n",
            pod_ip(*octet),
            ready,
        ));
    }
    y
}

/// A caching-off dnsmasq forwarder in the client pod (and the attached
/// cgroup) on 127.0.0.1:53 that forwards to the DNS ClusterIP, like a
/// node-local DNS cache. It sends every query from an unconnected UDP socket
/// with sendto() and accepts a reply only if recvfrom() reports the server
/// it asked: unlike glibc and dig, which connect() their sockets and so
/// accept a reply from whatever peer the kernel lets through, it needs
/// recvmsg4's reverse translation.
fn start_forwarder(lab: &Lab) -> Child {
    let mut child = lab
        .client_command(true)
        .arg("--exec")
        .args([
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--port=53",
            "--cache-size=0",
            "--log-facility=-",
        ])
        .arg(format!("--server={DNS_IP}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq forwarder");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dig(lab, &["@127.0.0.1", "example.test"]).is_ok_and(|o| o.trim() == "10.1.2.3") {
        if Instant::now() > deadline || child.try_wait().is_ok_and(|s| s.is_some()) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the forwarder in the client pod never resolved example.test");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dns_through_a_cluster_ip_with_dnsmasq_dig_and_glibc() {
    let mut lab = Lab::new(&bins(), DNS_PODS, 80).expect("lab");
    let mut dnsmasq = Dnsmasq::start(
        &lab,
        &lab.topo.pods,
        &[("example.test", Ipv4Addr::new(10, 1, 2, 3))],
    )
    .expect("dnsmasq pods");
    lab.write_manifest("dns.yaml", &dns_manifest([true, true]))
        .unwrap();
    lab.agent.start().unwrap();
    lab.agent
        .wait_for("dns programmed", SYNC, |d| {
            // Two pods on each of UDP 53 and TCP 53.
            endpoints(d, "default", "dns", 53).len() == 4
        })
        .unwrap();
    let server = format!("@{DNS_IP}");
    let resolv = lab.work.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {DNS_IP}\noptions timeout:1 attempts:2\n"),
    )
    .unwrap();

    // dig over UDP and TCP, each run a new socket: every reply accepted,
    // both pods answer.
    let mut answered = BTreeSet::new();
    for i in 0..16 {
        let a = dig(&lab, &[&server, "example.test"]).unwrap();
        assert_eq!(a.trim(), "10.1.2.3", "dig #{i}");
        let who = dig(&lab, &[&server, "TXT", "whoami.example.test"]).unwrap();
        answered.insert(who.trim().trim_matches('"').to_owned());
    }
    assert_eq!(
        answered,
        BTreeSet::from(["dns-1".to_owned(), "dns-2".to_owned()])
    );
    for _ in 0..3 {
        let a = dig(&lab, &["+tcp", &server, "example.test"]).unwrap();
        assert_eq!(a.trim(), "10.1.2.3", "dig +tcp");
    }
    // glibc's stub resolver through resolv.conf. It connect()s its UDP
    // socket, so this shows connect4 and TCP/UDP fallbacks work for it;
    // it would accept the replies even without reverse translation.
    for _ in 0..5 {
        let out = in_client(&lab, Some(&resolv), &["getent", "hosts", "example.test"]).unwrap();
        assert!(out.starts_with("10.1.2.3"), "getent: {out:?}");
    }
    // A resolver on unconnected sockets that checks the reply's source:
    // this one fails without recvmsg4.
    let _forwarder = Killed(start_forwarder(&lab));
    for _ in 0..8 {
        let a = dig(&lab, &["@127.0.0.1", "example.test"]).unwrap();
        assert_eq!(a.trim(), "10.1.2.3", "through the forwarder");
    }

    // One DNS pod dies and turns not ready: new lookups go to the other.
    dnsmasq.kill("dns-1");
    lab.write_manifest("dns.yaml", &dns_manifest([false, true]))
        .unwrap();
    lab.agent
        .wait_for("dns-1 removed", SYNC, |d| {
            endpoints(d, "default", "dns", 53).len() == 2
        })
        .unwrap();
    for _ in 0..8 {
        let who = dig(&lab, &[&server, "TXT", "whoami.example.test"]).unwrap();
        assert_eq!(who.trim(), "\"dns-2\"");
        let who = dig(&lab, &["@127.0.0.1", "TXT", "whoami.example.test"]).unwrap();
        assert_eq!(who.trim(), "\"dns-2\"", "through the forwarder");
        let out = in_client(&lab, Some(&resolv), &["getent", "hosts", "example.test"]).unwrap();
        assert!(out.starts_with("10.1.2.3"), "getent: {out:?}");
    }
}

/// Not a check: prints connect4's average run time from the kernel's BPF
/// stats (`kernel.bpf_stats_enabled`). Run against any agent build with
/// `LB_AGENT_BIN=... cargo test -p lb-tests --test udp -- --ignored --nocapture`.
#[test]
#[ignore = "measurement"]
fn measure_connect4_cost() {
    let (lab, ip) = lab_with_services();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").unwrap();
    let report = client(&lab, &format!("{ip}:80"), &["--count", "3000"]);
    let udp = client(
        &lab,
        &format!("{ECHO_IP}:{ECHO_PORT}"),
        &["--udp", "--count", "2000"],
    );
    let unconnected = client(
        &lab,
        &format!("{ECHO_IP}:{ECHO_PORT}"),
        &["--udp-unconnected", "--sockets", "20", "--count", "100"],
    );
    if let Ok(map) = run(Command::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(lab.agent.bpffs.join(REVERSE_PIN)))
    {
        println!("{}", map.trim());
    }
    let show = run(Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(&lab.cgroup.path))
    .unwrap();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0").unwrap();
    let attached: Vec<Value> = serde_json::from_str(&show).unwrap();
    for prog in attached {
        let id = prog["id"].as_u64().unwrap();
        let info: Value = serde_json::from_str(
            &run(Command::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]))
                .unwrap(),
        )
        .unwrap();
        let (ns, cnt) = (
            info["run_time_ns"].as_u64().unwrap_or(0),
            info["run_cnt"].as_u64().unwrap_or(0),
        );
        println!(
            "{} {}: run_cnt {cnt} run_time_ns {ns} avg {:.0} ns",
            prog["attach_type"],
            info["name"],
            ns as f64 / cnt.max(1) as f64
        );
    }
    assert_eq!(map_of(&report["backends"]).len(), 3, "{report}");
    assert_eq!(map_of(&udp["backends"]).len(), 3, "{udp}");
    assert_eq!(map_of(&unconnected["backends"]).len(), 3, "{unconnected}");
}
