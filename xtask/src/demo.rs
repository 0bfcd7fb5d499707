//! `cargo xtask demo`: the textbook `back-end` Service and three Pods, in
//! isolated namespaces (a node with a bridge, three pods serving HTTP, a
//! client; no route off the machine), balanced by the real agent.
use std::{
    net::Ipv4Addr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_tests::{
    Bins, ClientReport, Lab,
    dns::{Dnsmasq, dig, in_client},
    endpoints, pod_ip6, pod_manifest, service_ip, service_ips,
};

use crate::{cmd, exec};

const EXAMPLE: &str = include_str!("../../examples/back-end/back-end.yaml");
const CONNECTS: &str = "3000";
const DUAL_CONNECTS: &str = "300";
const DNS_IP: &str = "10.96.0.10";
const DNS_NAME: &str = "back-end.default.svc.cluster.local";
const DNS_PODS: [(&str, u8); 2] = [("coredns-1", 21), ("coredns-2", 22)];

/// kube-dns as a cluster has it: a ClusterIP on UDP and TCP 53, two pods.
fn kube_dns() -> String {
    let mut y = String::from(
        "apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
spec:
  clusterIP: 10.96.0.10
  selector:
    k8s-app: kube-dns
  ports:
    - name: dns
      port: 53
      protocol: UDP
    - name: dns-tcp
      port: 53
      protocol: TCP
",
    );
    for (name, octet) in DNS_PODS {
        y.push_str(&pod_manifest(
            name,
            "kube-system",
            &[("k8s-app", "kube-dns")],
            "    - name: coredns\n      image: dnsmasq\n",
            Ipv4Addr::new(10, 244, 1, octet),
            true,
        ));
    }
    y
}

pub fn run() -> anyhow::Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // Ctrl-C also reaches the agent and clients (same process group);
        // xtask itself survives it to tear everything down.
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    exec(cmd("cargo").args([
        "build",
        "--package",
        "lb-userspace",
        "--package",
        "lb-tests",
        "--bins",
    ]))?;
    let _lock = lb_tests::PrivilegedLock::acquire()?;
    lb_tests::cleanup_leftovers();
    let bins = Bins::in_dir(Path::new("target/debug"));
    let result = demo(&bins, &interrupted);
    lb_tests::cleanup_leftovers();
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted; everything the demo created was removed");
    }
    result
}

fn demo(bins: &Bins, interrupted: &AtomicBool) -> anyhow::Result<()> {
    let check = || {
        if interrupted.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    };
    step(
        "Topology: node namespace with a bridge, 3 backend pods serving HTTP on 10.244.1.11-13:80, a client at 10.244.1.100; nothing routes off the machine",
    );
    let pods = [("back-end-1", 11), ("back-end-2", 12), ("back-end-3", 13)];
    let mut lab = Lab::new(bins, &[&pods[..], &DNS_PODS[..]].concat(), 80)?;
    println!(
        "  namespaces {}-*, cgroup {}",
        lab.name,
        lab.cgroup.path.display()
    );

    step("Manifests: the textbook back-end Service and its Pods (examples/back-end/back-end.yaml)");
    lab.write_manifest("back-end.yaml", EXAMPLE)?;
    println!("  {}", lab.manifests.join("back-end.yaml").display());

    step("Agent: lb-agent run --manifests DIR --bpffs DIR --cgroup CGROUP");
    lab.agent.start()?;
    let doc = lab
        .agent
        .wait_for("back-end programmed", Duration::from_secs(15), |d| {
            endpoints(d, "default", "back-end", 80).len() == 3
        })?;
    let ip = service_ip(&doc, "default", "back-end").context("no ClusterIP")?;
    println!("  back-end got ClusterIP {ip} from --service-cidr 10.96.0.0/12");
    check()?;

    step(&format!(
        "{CONNECTS} connects from the client to {ip}:80 (each an HTTP GET; the pod answers with its name)"
    ));
    let report = lab.client(&format!("{ip}:80"), &["--count", CONNECTS])?;
    print_distribution(&report, &pods);
    check()?;

    step(
        "Dual-stack: the same Service with ipFamilyPolicy: PreferDualStack, the Pods reporting their IPv6 addresses too (status.podIPs)",
    );
    let dual = dual_stack(EXAMPLE, &pods)?;
    lab.write_manifest("back-end.yaml", &dual)?;
    let doc = lab
        .agent
        .wait_for("back-end dual-stack", Duration::from_secs(15), |d| {
            service_ips(d, "default", "back-end").len() == 2
                && endpoints(d, "default", "back-end", 80).len() == 6
        })?;
    let ips = service_ips(&doc, "default", "back-end");
    let ip6 = ips
        .iter()
        .find(|i| i.is_ipv6())
        .context("no IPv6 ClusterIP")?;
    println!(
        "  back-end now has ClusterIPs {} (the IPv4 one kept, the IPv6 one from fd00:10:96::/108)",
        ips.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (what, target) in [
        ("IPv6 ClusterIP", format!("[{ip6}]:80")),
        (
            "AF_INET6 sockets to the IPv4 ClusterIP, v4-mapped",
            format!("[::ffff:{ip}]:80"),
        ),
    ] {
        println!("  {DUAL_CONNECTS} connects to {target} ({what}):");
        let r = lab.client(&target, &["--count", DUAL_CONNECTS])?;
        print_distribution(&r, &pods);
    }
    check()?;

    step(&format!(
        "DNS: kube-dns at {DNS_IP} (UDP and TCP 53) backed by two dnsmasq pods; the client resolves back-end by name"
    ));
    lab.write_manifest("kube-dns.yaml", &kube_dns())?;
    let coredns: Vec<_> = lab
        .topo
        .pods
        .iter()
        .filter(|p| p.name.starts_with("coredns"))
        .cloned()
        .collect();
    let _dns = Dnsmasq::start(&lab, &coredns, &[(DNS_NAME, ip)])?;
    lab.agent
        .wait_for("kube-dns programmed", Duration::from_secs(15), |d| {
            endpoints(d, "kube-system", "kube-dns", 53).len() == 4
        })?;
    // Each dig is a new socket, so each lookup picks a pod at random.
    for _ in 0..4 {
        let answer = dig(&lab, &[&format!("@{DNS_IP}"), DNS_NAME])?;
        let who = dig(
            &lab,
            &[&format!("@{DNS_IP}"), "TXT", &format!("whoami.{DNS_NAME}")],
        )?;
        println!(
            "  dig @{DNS_IP} {DNS_NAME} -> {} (answered by {})",
            answer.trim(),
            who.trim().trim_matches('"')
        );
    }
    let resolv = lab.work.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!(
            "nameserver {DNS_IP}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        ),
    )?;
    let hosts = in_client(&lab, Some(&resolv), &["getent", "hosts", "back-end"])?;
    println!(
        "  getent hosts back-end (glibc, resolv.conf -> {DNS_IP}) -> {}",
        hosts.trim()
    );
    check()?;

    step("lb-agent list");
    print!("{}", indent(&lab.agent.list(&[])?));

    step("Edit: back-end-2 turns not ready (status.conditions Ready=False)");
    lab.write_manifest("back-end.yaml", &with_pod_not_ready(&dual, "back-end-2")?)?;
    let edited = Instant::now();
    lab.agent
        .wait_for("back-end-2 withdrawn", Duration::from_secs(15), |d| {
            endpoints(d, "default", "back-end", 80).len() == 4
        })?;
    println!(
        "  the maps dropped back-end-2 {:.0?} after the edit",
        edited.elapsed()
    );
    check()?;

    step(&format!("{CONNECTS} more connects to {ip}:80"));
    let after = lab.client(&format!("{ip}:80"), &["--count", CONNECTS])?;
    print_distribution(&after, &pods);
    let leaked = after.backends.get("back-end-2").copied().unwrap_or(0);
    if leaked > 0 || after.failed() > 0 {
        bail!(
            "{leaked} new connects reached the not-ready pod, {} failed",
            after.failed()
        );
    }
    println!("  no new connection reached back-end-2");
    print!("{}", indent(&lab.agent.list(&[])?));

    step("Cleaning up: agent stopped, pins, cgroup and namespaces removed");
    lab.agent.stop()?;
    drop(lab);
    println!("\ndemo: ok");
    Ok(())
}

fn step(title: &str) {
    println!("\n==> {title}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn print_distribution(report: &ClientReport, pods: &[(&str, u8)]) {
    let total = report.attempts.max(1);
    for (name, _) in pods {
        let n = report.backends.get(*name).copied().unwrap_or(0);
        let share = n as f64 * 100.0 / total as f64;
        let bar = "#".repeat((share / 2.0).round() as usize);
        println!("  {name:<12} {n:>5}  {share:>5.1}%  {bar}");
    }
    if report.failed() > 0 {
        println!("  failed: {:?}", report.errors);
    }
    println!(
        "  {} connects in {} ms, {} failed",
        report.attempts,
        report.elapsed_ms,
        report.failed()
    );
}

/// The example as a dual-stack cluster reports it: the Service asks for
/// both families, and each Pod lists its IPv6 address (`fd00:244:1::<n>`
/// for `10.244.1.<n>`) after its IPv4 one in `status.podIPs`.
fn dual_stack(yaml: &str, pods: &[(&str, u8)]) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let mut v: serde_yaml::Value = serde::Deserialize::deserialize(doc)?;
        if v["kind"] == "Service" {
            v["spec"]["ipFamilyPolicy"] = "PreferDualStack".into();
        }
        if v["kind"] == "Pod" {
            let name = v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let (_, octet) = pods
                .iter()
                .find(|(n, _)| *n == name)
                .with_context(|| format!("example pod {name} is not in the topology"))?;
            let ip4 = v["status"]["podIP"].clone();
            let mut ip6 = serde_yaml::Mapping::new();
            ip6.insert("ip".into(), pod_ip6(*octet).to_string().into());
            let mut ip = serde_yaml::Mapping::new();
            ip.insert("ip".into(), ip4);
            v["status"]["podIPs"] = serde_yaml::Value::Sequence(vec![ip.into(), ip6.into()]);
        }
        out.push(serde_yaml::to_string(&v)?);
    }
    Ok(out.join("---\n"))
}

/// The example with one Pod's Ready condition set to False.
fn with_pod_not_ready(yaml: &str, pod: &str) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let mut v: serde_yaml::Value = serde::Deserialize::deserialize(doc)?;
        if v["kind"] == "Pod" && v["metadata"]["name"] == pod {
            let conditions = v["status"]["conditions"]
                .as_sequence_mut()
                .context("example pod has no status.conditions")?;
            for c in conditions {
                if c["type"] == "Ready" {
                    c["status"] = "False".into();
                }
            }
        }
        out.push(serde_yaml::to_string(&v)?);
    }
    Ok(out.join("---\n"))
}
