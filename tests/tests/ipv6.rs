//! End-to-end for IPv6: the real lb-agent's connect6, sendmsg6, recvmsg6 and
//! getpeername6 in the test cgroup, with an IPv6-only service, an IPv4
//! service reached through AF_INET6 sockets with v4-mapped addresses, a
//! dual-stack service, a service without endpoints, raw and ICMP sockets
//! (never touched), and `lb-agent list`. Every namespace is on
//! 10.244.1.0/24 and fd00:244:1::/64 with no other route; ClusterIPs are
//! ULA (fd00:96::/64). Privileged: run with `--test-threads=1`.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    time::Duration,
};

use lb_tests::{
    Bins, Lab, UdpSession, endpoints, find_service, http_echo_slice, pod_ip, pod_ip6,
    pod_manifest_ips, run, service_ips,
};
use serde_json::Value;

const SYNC: Duration = Duration::from_secs(10);
const PODS: &[(&str, u8)] = &[("pod-1", 11), ("pod-2", 12), ("pod-3", 13)];
/// Every service here has `http` (TCP 80) and `echo` (UDP 5300), both to
/// port 80 of the lb-testservers, which answer HTTP and datagrams there
/// with their pod's name, on both of the pod's addresses.
const HTTP: u16 = 80;
const ECHO: u16 = 5300;

/// IPv6-only, on all three pods' IPv6 addresses.
const WEB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// IPv6-only, no endpoints.
const EMPTY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11);
/// IPv4-only, on all three pods' IPv4 addresses.
const WEB4: Ipv4Addr = Ipv4Addr::new(10, 96, 60, 10);
/// Dual-stack: pod-1 and pod-2 on IPv4, pod-2 and pod-3 on IPv6, so a
/// client can tell which family's endpoints its connect went to.
const DUAL4: Ipv4Addr = Ipv4Addr::new(10, 96, 60, 20);
const DUAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);

fn bins() -> Bins {
    lb_tests::test_bins!()
}

/// A selectorless Service with `http` and `echo` on `ips` (`clusterIPs`).
fn service(name: &str, ips: &[IpAddr]) -> String {
    let families: Vec<&str> = ips
        .iter()
        .map(|ip| if ip.is_ipv6() { "IPv6" } else { "IPv4" })
        .collect();
    let policy = if ips.len() > 1 {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    let list = |v: Vec<String>| v.join(", ");
    format!(
        "---
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  clusterIP: \"{}\"
  clusterIPs: [{}]
  ipFamilies: [{}]
  ipFamilyPolicy: {policy}
  ports:
    - name: http
      port: {HTTP}
      protocol: TCP
      targetPort: {HTTP}
    - name: echo
      port: {ECHO}
      protocol: UDP
      targetPort: {HTTP}
",
        ips[0],
        list(ips.iter().map(|ip| format!("\"{ip}\"")).collect()),
        list(families.iter().map(|f| (*f).to_owned()).collect()),
    )
}

/// A hand-written EndpointSlice of `service` with ready endpoints on
/// `http` and `echo`.
fn slice(name: &str, service: &str, addrs: &[IpAddr]) -> String {
    http_echo_slice(name, service, addrs, HTTP)
}

fn v4(octets: &[u8]) -> Vec<IpAddr> {
    octets.iter().map(|o| pod_ip(*o).into()).collect()
}

fn v6(octets: &[u8]) -> Vec<IpAddr> {
    octets.iter().map(|o| pod_ip6(*o).into()).collect()
}

/// All services of this suite, with explicit ClusterIPs and hand-written
/// slices (what the manifest source passes through untouched).
fn manifest() -> String {
    [
        service("web6", &[WEB6.into()]),
        slice("web6-1", "web6", &v6(&[11, 12, 13])),
        service("empty6", &[EMPTY6.into()]),
        service("web4", &[WEB4.into()]),
        slice("web4-1", "web4", &v4(&[11, 12, 13])),
        service("dual", &[DUAL4.into(), DUAL6.into()]),
        slice("dual-v4", "dual", &v4(&[11, 12])),
        slice("dual-v6", "dual", &v6(&[12, 13])),
    ]
    .concat()
}

/// A lab with every service of [`manifest`] programmed.
fn lab() -> Lab {
    let mut lab = Lab::new(&bins(), PODS, HTTP).expect("lab");
    lab.write_manifest("services.yaml", &manifest())
        .expect("manifest");
    lab.agent.start().expect("agent start");
    lab.agent
        .wait_for("services programmed", SYNC, |d| {
            endpoints(d, "default", "web6", HTTP).len() == 3
                && endpoints(d, "default", "web6", ECHO).len() == 3
                && endpoints(d, "default", "web4", HTTP).len() == 3
                && endpoints(d, "default", "web4", ECHO).len() == 3
                // Two per family on each port.
                && endpoints(d, "default", "dual", HTTP).len() == 4
                && endpoints(d, "default", "dual", ECHO).len() == 4
                && find_service(d, "default", "empty6").is_some_and(|s| {
                    s["ports"].as_array().is_some_and(|p| p.len() == 2)
                })
        })
        .expect("sync");
    lab
}

fn client(lab: &Lab, target: &str, args: &[&str]) -> Value {
    lab.client_json(target, args).expect("lb-testclient")
}

fn map_of(v: &Value) -> Vec<(String, u64)> {
    lb_tests::counts(v)
}

fn names(v: &Value) -> BTreeSet<String> {
    map_of(v).into_iter().map(|(k, _)| k).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

fn all_pods() -> BTreeSet<String> {
    set(&["pod-1", "pod-2", "pod-3"])
}

/// The datapath's counters from `lb-agent list -o json`.
fn counters(lab: &Lab) -> Value {
    lab.agent.list_json().expect("list -o json")["counters"].clone()
}

fn counter(c: &Value, name: &str) -> u64 {
    c[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {c}"))
}

/// Asserts that `n` attempts all succeeded.
fn all_ok(report: &Value, n: u64) {
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    let ok: u64 = map_of(&report["backends"]).iter().map(|(_, c)| c).sum();
    assert_eq!(ok, n, "{report}");
}

#[test]
fn tcp_to_an_ipv6_cluster_ip_spreads_over_the_ipv6_backends() {
    let lab = lab();
    let before = counter(&counters(&lab), "translated");
    let frontend = format!("[{WEB6}]:{HTTP}");
    let tcp = client(&lab, &frontend, &["--count", "60"]);
    all_ok(&tcp, 60);
    assert_eq!(names(&tcp["backends"]), all_pods(), "each reached: {tcp}");
    // getpeername() on the translated socket shows the ClusterIP and port.
    assert_eq!(map_of(&tcp["peers"]), [(frontend, 60)], "{tcp}");
    assert!(
        counter(&counters(&lab), "translated") >= before + 60,
        "connect6 counted its translations"
    );
    // A pod reached directly keeps its own address.
    let pod = format!("[{}]:{HTTP}", pod_ip6(12));
    let direct = client(&lab, &pod, &["--count", "3"]);
    assert_eq!(
        map_of(&direct["backends"]),
        [("pod-2".into(), 3)],
        "{direct}"
    );
    assert_eq!(map_of(&direct["peers"]), [(pod, 3)], "{direct}");
}

#[test]
fn udp_to_an_ipv6_cluster_ip_connected_and_unconnected() {
    let lab = lab();
    let frontend = format!("[{WEB6}]:{ECHO}");
    // Connected: connect6 rewrites, getpeername6 shows the frontend.
    let udp = client(&lab, &frontend, &["--udp", "--count", "60"]);
    all_ok(&udp, 60);
    assert_eq!(names(&udp["backends"]), all_pods(), "{udp}");
    assert_eq!(map_of(&udp["peers"]), [(frontend.clone(), 60)], "{udp}");

    // Unconnected: sendmsg6 sticks a socket to one backend, recvmsg6 makes
    // the replies come from the frontend.
    let one = client(
        &lab,
        &frontend,
        &["--udp-unconnected", "--sockets", "1", "--count", "50"],
    );
    all_ok(&one, 50);
    assert_eq!(
        map_of(&one["backends"]).len(),
        1,
        "one socket, one backend: {one}"
    );
    assert_eq!(map_of(&one["sources"]), [(frontend.clone(), 50)], "{one}");
    let many = client(
        &lab,
        &frontend,
        &["--udp-unconnected", "--sockets", "30", "--count", "4"],
    );
    all_ok(&many, 120);
    for socket in many["perSocket"].as_array().unwrap() {
        let reached = map_of(socket);
        assert_eq!(reached.len(), 1, "each socket sticks: {many}");
        assert_eq!(reached[0].1, 4, "{many}");
    }
    assert_eq!(
        names(&many["backends"]),
        all_pods(),
        "sockets spread: {many}"
    );
    assert_eq!(map_of(&many["sources"]), [(frontend, 120)], "{many}");
}

#[test]
fn an_ipv4_service_through_ipv6_sockets_with_v4_mapped_addresses() {
    let lab = lab();
    let mapped = WEB4.to_ipv6_mapped();
    // TCP: an AF_INET6 socket connecting to ::ffff:<ClusterIP> reaches the
    // IPv4 backends, and getpeername() gives back the mapped ClusterIP.
    let http = format!("[{mapped}]:{HTTP}");
    let tcp = client(&lab, &http, &["--count", "60"]);
    all_ok(&tcp, 60);
    assert_eq!(names(&tcp["backends"]), all_pods(), "{tcp}");
    assert_eq!(map_of(&tcp["peers"]), [(http, 60)], "{tcp}");

    // Connected UDP on a `[::]:0` socket.
    let echo = format!("[{mapped}]:{ECHO}");
    let udp = client(&lab, &echo, &["--udp", "--count", "60"]);
    all_ok(&udp, 60);
    assert_eq!(names(&udp["backends"]), all_pods(), "{udp}");
    assert_eq!(map_of(&udp["peers"]), [(echo.clone(), 60)], "{udp}");

    // Unconnected UDP: sticky, and recvfrom() shows the mapped frontend.
    let many = client(
        &lab,
        &echo,
        &["--udp-unconnected", "--sockets", "30", "--count", "4"],
    );
    all_ok(&many, 120);
    for socket in many["perSocket"].as_array().unwrap() {
        assert_eq!(map_of(socket).len(), 1, "each socket sticks: {many}");
    }
    assert_eq!(names(&many["backends"]), all_pods(), "{many}");
    assert_eq!(map_of(&many["sources"]), [(echo, 120)], "{many}");

    // The same socket type to the IPv4 ClusterIP itself still works.
    let plain = format!("{WEB4}:{HTTP}");
    let tcp4 = client(&lab, &plain, &["--count", "10"]);
    all_ok(&tcp4, 10);
    assert_eq!(map_of(&tcp4["peers"]), [(plain, 10)], "{tcp4}");
}

#[test]
fn a_dual_stack_service_answers_on_both_cluster_ips() {
    let lab = lab();
    // IPv4 clients reach the IPv4 endpoints (pod-1, pod-2), IPv6 clients
    // the IPv6 ones (pod-2, pod-3).
    let cases = [
        (format!("{DUAL4}"), set(&["pod-1", "pod-2"])),
        (
            format!("[{}]", DUAL4.to_ipv6_mapped()),
            set(&["pod-1", "pod-2"]),
        ),
        (format!("[{DUAL6}]"), set(&["pod-2", "pod-3"])),
    ];
    for (ip, want) in cases {
        let http = format!("{ip}:{HTTP}");
        let tcp = client(&lab, &http, &["--count", "40"]);
        all_ok(&tcp, 40);
        assert_eq!(names(&tcp["backends"]), want, "TCP {http}: {tcp}");
        assert_eq!(map_of(&tcp["peers"]), [(http, 40)], "{tcp}");

        let echo = format!("{ip}:{ECHO}");
        let udp = client(&lab, &echo, &["--udp", "--count", "40"]);
        all_ok(&udp, 40);
        assert_eq!(names(&udp["backends"]), want, "UDP {echo}: {udp}");
        assert_eq!(map_of(&udp["peers"]), [(echo.clone(), 40)], "{udp}");

        let un = client(
            &lab,
            &echo,
            &["--udp-unconnected", "--sockets", "20", "--count", "2"],
        );
        all_ok(&un, 40);
        assert_eq!(names(&un["backends"]), want, "unconnected {echo}: {un}");
        assert_eq!(map_of(&un["sources"]), [(echo, 40)], "{un}");
    }
}

#[test]
fn an_ipv6_service_without_endpoints_refuses_at_once() {
    let lab = lab();
    let before = counter(&counters(&lab), "noBackend");
    let refused = |r: &Value, n: u64| {
        assert_eq!(map_of(&r["errors"]), [("ECONNREFUSED".into(), n)], "{r}");
        assert_eq!(r["backends"], serde_json::json!({}), "{r}");
    };
    let http = format!("[{EMPTY6}]:{HTTP}");
    let echo = format!("[{EMPTY6}]:{ECHO}");
    refused(&client(&lab, &http, &["--count", "5"]), 5);
    refused(&client(&lab, &echo, &["--udp", "--count", "5"]), 5);
    refused(
        &client(&lab, &echo, &["--udp-unconnected", "--count", "5"]),
        5,
    );
    assert!(
        counter(&counters(&lab), "noBackend") >= before + 15,
        "refusals counted: {}",
        counters(&lab)
    );
}

#[test]
fn raw_and_icmp_sockets_are_never_translated() {
    let lab = lab();
    // Ping sockets need the client's group in the namespace's range.
    run(Command::new("ip").args([
        "netns",
        "exec",
        &lab.topo.client,
        "sysctl",
        "-qw",
        "net.ipv4.ping_group_range=0 2147483647",
    ]))
    .expect("ping_group_range");
    let moved = ["translated", "sendmsgTranslated", "noBackend"];
    let before = counters(&lab);
    // On this kernel connect4 and connect6 run for ping sockets (they have
    // a pre_connect hook; SOCK_DGRAM, but IPPROTO_ICMP(V6)), and no hook
    // runs for raw sockets: the programs must tell ping from UDP by the
    // protocol. Each frontend (ClusterIP, port) is a TCP or UDP frontend or refuses:
    // a socket mistaken for TCP or UDP would be rewritten to an on-link
    // pod (connect and sendto succeed) or refused (ECONNREFUSED). Left
    // alone, it has no route.
    let targets = [
        format!("{WEB4}:{ECHO}"),
        format!("{WEB4}:{HTTP}"),
        format!("[{WEB6}]:{ECHO}"),
        format!("[{WEB6}]:{HTTP}"),
        format!("[{DUAL6}]:{ECHO}"),
        format!("[{EMPTY6}]:{ECHO}"),
        format!("[{EMPTY6}]:{HTTP}"),
    ];
    for target in &targets {
        for kind in ["ping", "raw-icmp", "raw-udp", "raw-tcp"] {
            let r = client(&lab, target, &["--probe", kind]);
            let probe = &r["probe"];
            assert_eq!(probe["socket"], "ok", "{kind} socket: {r}");
            assert_eq!(
                probe["sendto"], "ENETUNREACH",
                "{kind} sendto {target}: {r}"
            );
            assert_eq!(
                probe["connect"], "ENETUNREACH",
                "{kind} connect {target}: {r}"
            );
        }
    }
    // The control: to a pod, which is on-link, the same probes go through,
    // so a rewritten address would not have failed.
    for target in [
        format!("{}:{ECHO}", pod_ip(11)),
        format!("[{}]:{ECHO}", pod_ip6(11)),
    ] {
        for kind in ["ping", "raw-icmp", "raw-udp", "raw-tcp"] {
            let r = client(&lab, &target, &["--probe", kind]);
            let probe = &r["probe"];
            assert_eq!(probe["sendto"], "ok", "{kind} sendto {target}: {r}");
            assert_eq!(probe["connect"], "ok", "{kind} connect {target}: {r}");
        }
    }
    let after = counters(&lab);
    for c in moved {
        assert_eq!(
            counter(&after, c),
            counter(&before, c),
            "{c}: {before} → {after}"
        );
    }
    // The counters do move for a UDP socket to the same frontends.
    for target in [&targets[0], &targets[2], &targets[4]] {
        all_ok(
            &client(&lab, target, &["--udp-unconnected", "--count", "1"]),
            1,
        );
    }
    assert!(
        counter(&counters(&lab), "sendmsgTranslated") >= counter(&before, "sendmsgTranslated") + 3
    );
}

#[test]
fn list_shows_ipv6_cluster_ips_and_bracketed_endpoints() {
    let lab = lab();
    let doc = lab.agent.list_json().unwrap();
    assert_eq!(service_ips(&doc, "default", "web6"), [IpAddr::from(WEB6)]);
    let web6: Vec<String> = [11, 12, 13]
        .map(|o| format!("[{}]:{HTTP}", pod_ip6(o)))
        .to_vec();
    assert_eq!(endpoints(&doc, "default", "web6", HTTP), web6);
    assert_eq!(endpoints(&doc, "default", "web6", ECHO), web6);
    let web6_svc = find_service(&doc, "default", "web6").unwrap();
    for port in web6_svc["ports"].as_array().unwrap() {
        assert_eq!(port["clusterIp"], WEB6.to_string(), "{port}");
    }
    assert_eq!(
        service_ips(&doc, "default", "dual")
            .into_iter()
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([IpAddr::from(DUAL4), IpAddr::from(DUAL6)])
    );
    // Per frontend, each family's own endpoints.
    let dual = find_service(&doc, "default", "dual").unwrap();
    for port in dual["ports"].as_array().unwrap() {
        let eps: BTreeSet<&str> = port["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        let want: BTreeSet<String> = if port["clusterIp"] == DUAL6.to_string() {
            [12, 13].map(|o| format!("[{}]:{HTTP}", pod_ip6(o))).into()
        } else {
            assert_eq!(port["clusterIp"], DUAL4.to_string(), "{port}");
            [11, 12].map(|o| format!("{}:{HTTP}", pod_ip(o))).into()
        };
        assert_eq!(eps, want.iter().map(String::as_str).collect(), "{port}");
    }
    assert_eq!(
        find_service(&doc, "default", "empty6").unwrap()["ports"][0]["endpoints"],
        serde_json::json!([])
    );

    let table = lab.agent.list(&[]).unwrap();
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no {name} row:\n{table}"))
            .to_owned()
    };
    let web6_row = row("web6");
    assert!(web6_row.contains(&WEB6.to_string()), "{table}");
    assert!(
        web6_row.contains("80/TCP") && web6_row.contains("5300/UDP"),
        "{table}"
    );
    assert!(
        web6_row.contains(&format!("[{}]:80", pod_ip6(11))),
        "{table}"
    );
    let dual_row = row("dual");
    assert!(
        dual_row.contains(&DUAL4.to_string()) && dual_row.contains(&DUAL6.to_string()),
        "{table}"
    );
    assert!(row("empty6").ends_with("<none>"), "{table}");
}

#[test]
fn a_recreated_ipv6_service_does_not_revive_a_stale_reverse_entry() {
    let mut lab = Lab::new(&bins(), PODS, HTTP).expect("lab");
    let one = || {
        [
            service("one6", &[WEB6.into()]),
            slice("one6-1", "one6", &v6(&[11])),
        ]
        .concat()
    };
    let svc_id = |d: &Value| find_service(d, "default", "one6")?["ports"][0]["svcId"].as_u64();
    lab.write_manifest("one6.yaml", &one()).unwrap();
    lab.agent.start().unwrap();
    let doc = lab
        .agent
        .wait_for("one6", SYNC, |d| {
            endpoints(d, "default", "one6", ECHO).len() == 1
        })
        .unwrap();
    let old_id = svc_id(&doc).unwrap();
    let frontend = format!("[{WEB6}]:{ECHO}");
    let pod = format!("[{}]:{HTTP}", pod_ip6(11));
    let mut session = UdpSession::start(&lab, &["--bind", "[::]:0"]).unwrap();
    let first = session.send(&frontend).unwrap();
    assert_eq!(first["from"], frontend.as_str(), "{first}");
    assert_eq!(first["name"], "pod-1", "{first}");

    // Deleted and recreated at the same address: a new service id.
    lab.remove_manifest("one6.yaml").unwrap();
    lab.agent
        .wait_for("one6 gone", SYNC, |d| {
            find_service(d, "default", "one6").is_none()
        })
        .unwrap();
    lab.write_manifest("one6.yaml", &one()).unwrap();
    let doc = lab
        .agent
        .wait_for("one6 again", SYNC, |d| {
            endpoints(d, "default", "one6", ECHO).len() == 1
        })
        .unwrap();
    assert_ne!(svc_id(&doc).unwrap(), old_id, "recreated with a new id");

    // Straight to the pod: the socket's (socket, pod) reverse entry names
    // the old service id, so the reply shows the pod, not the ClusterIP.
    let direct = session.send(&pod).unwrap();
    assert_eq!(direct["from"], pod.as_str(), "{direct}");
    let again = session.send(&frontend).unwrap();
    assert_eq!(again["from"], frontend.as_str(), "{again}");
    assert_eq!(again["name"], "pod-1", "{again}");
}

/// A Service with `ipFamilyPolicy: PreferDualStack` and no ClusterIP, and
/// Pods with an address of each family: the manifest source allocates one
/// ClusterIP per family (from `--service-cidr V4,V6`) and makes one slice
/// per family; both ClusterIPs reach all pods over their own family.
#[test]
fn prefer_dual_stack_gets_one_cluster_ip_per_family() {
    let mut lab = Lab::new(&bins(), PODS, HTTP).expect("lab");
    let mut y = String::from(
        "apiVersion: v1
kind: Service
metadata:
  name: auto
spec:
  ipFamilyPolicy: PreferDualStack
  selector:
    app: auto
  ports:
    - name: http
      port: 80
      targetPort: 80
",
    );
    for (name, octet) in PODS {
        y.push_str(&pod_manifest_ips(
            name,
            "default",
            &[("app", "auto")],
            "    - name: web\n      image: nginx\n",
            &[pod_ip(*octet).into(), pod_ip6(*octet).into()],
            true,
        ));
    }
    lab.write_manifest("auto.yaml", &y).unwrap();
    lab.agent.extra_args = vec!["--service-cidr".into(), "10.96.0.0/12,fd00:96::/108".into()];
    lab.agent.start().unwrap();
    let doc = lab
        .agent
        .wait_for("auto programmed", SYNC, |d| {
            service_ips(d, "default", "auto").len() == 2
                && endpoints(d, "default", "auto", HTTP).len() == 6
        })
        .unwrap();
    let ips = service_ips(&doc, "default", "auto");
    assert_eq!(ips.iter().filter(|ip| ip.is_ipv4()).count(), 1, "{ips:?}");
    assert_eq!(ips.iter().filter(|ip| ip.is_ipv6()).count(), 1, "{ips:?}");
    for ip in &ips {
        match ip {
            IpAddr::V4(v4) => assert!(
                v4.octets()[0] == 10 && (96..112).contains(&v4.octets()[1]),
                "from 10.96.0.0/12: {v4}"
            ),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                assert!(
                    s[..6] == [0xfd00, 0x96, 0, 0, 0, 0] && s[6] < 0x10,
                    "from fd00:96::/108: {v6}"
                );
            }
        }
    }
    // Each frontend holds its own family's pod addresses.
    for port in find_service(&doc, "default", "auto").unwrap()["ports"]
        .as_array()
        .unwrap()
    {
        let v6_frontend = port["clusterIp"].as_str().unwrap().contains(':');
        let want: BTreeSet<String> = PODS
            .iter()
            .map(|(_, o)| {
                if v6_frontend {
                    format!("[{}]:{HTTP}", pod_ip6(*o))
                } else {
                    format!("{}:{HTTP}", pod_ip(*o))
                }
            })
            .collect();
        let got: BTreeSet<String> = port["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(got, want, "{port}");
    }
    for ip in ips {
        let http = match ip {
            IpAddr::V4(v4) => format!("{v4}:{HTTP}"),
            IpAddr::V6(v6) => format!("[{v6}]:{HTTP}"),
        };
        let tcp = client(&lab, &http, &["--count", "60"]);
        all_ok(&tcp, 60);
        assert_eq!(names(&tcp["backends"]), all_pods(), "{http}: {tcp}");
        assert_eq!(map_of(&tcp["peers"]), [(http, 60)], "{tcp}");
    }
}

/// Issue 13: a dual-stack NodePort Service reached through an IPv4 and an
/// IPv6 node address (`--node-ip`, addresses no namespace owns): each
/// family's node address balances over that family's endpoints, and
/// getpeername() and unconnected replies show the node address and port.
#[test]
fn a_dual_stack_node_port_on_ipv4_and_ipv6_node_addresses() {
    const NODE4: &str = "10.250.0.1";
    const NODE6: &str = "fd00:250::1";
    let mut lab = Lab::new(&bins(), PODS, HTTP).expect("lab");
    lab.agent.extra_args = vec!["--node-ip".into(), format!("{NODE4},{NODE6}")];
    let svc = service("dual", &[DUAL4.into(), DUAL6.into()])
        .replace("  ports:\n", "  type: NodePort\n  ports:\n")
        .replace(
            &format!("      targetPort: {HTTP}\n    - name: echo"),
            &format!("      targetPort: {HTTP}\n      nodePort: 30080\n    - name: echo"),
        );
    let svc = format!("{svc}      nodePort: 30053\n");
    let manifest = [
        svc,
        slice("dual-v4", "dual", &v4(&[11, 12])),
        slice("dual-v6", "dual", &v6(&[12, 13])),
    ]
    .concat();
    lab.write_manifest("services.yaml", &manifest)
        .expect("manifest");
    lab.agent.start().expect("agent start");
    let doc = lab
        .agent
        .wait_for("node ports programmed", SYNC, |d| {
            // Each family's node address and loopback address: 2 x 2 x 2.
            endpoints(d, "default", "dual", 30080).len() == 8
                && endpoints(d, "default", "dual", 30053).len() == 8
        })
        .expect("sync");
    let mut node_frontends: Vec<String> = find_service(&doc, "default", "dual").unwrap()["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| Some(format!("{} {}", p["nodeIp"].as_str()?, p["port"])))
        .collect();
    node_frontends.sort();
    assert_eq!(
        node_frontends,
        [
            "10.250.0.1 30053",
            "10.250.0.1 30080",
            "127.0.0.1 30053",
            "127.0.0.1 30080",
            "::1 30053",
            "::1 30080",
            "fd00:250::1 30053",
            "fd00:250::1 30080"
        ]
    );

    let http4 = format!("{NODE4}:30080");
    let tcp4 = client(&lab, &http4, &["--count", "60"]);
    all_ok(&tcp4, 60);
    assert_eq!(names(&tcp4["backends"]), set(&["pod-1", "pod-2"]), "{tcp4}");
    assert_eq!(map_of(&tcp4["peers"]), [(http4, 60)], "{tcp4}");

    let http6 = format!("[{NODE6}]:30080");
    let tcp6 = client(&lab, &http6, &["--count", "60"]);
    all_ok(&tcp6, 60);
    assert_eq!(names(&tcp6["backends"]), set(&["pod-2", "pod-3"]), "{tcp6}");
    assert_eq!(map_of(&tcp6["peers"]), [(http6, 60)], "{tcp6}");

    let echo6 = format!("[{NODE6}]:30053");
    let udp6 = client(
        &lab,
        &echo6,
        &["--udp-unconnected", "--sockets", "1", "--count", "20"],
    );
    all_ok(&udp6, 20);
    assert_eq!(map_of(&udp6["sources"]), [(echo6, 20)], "{udp6}");
}
