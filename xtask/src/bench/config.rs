//! The configurations every datapath is loaded with, for N services × 10
//! endpoints: agent manifests, the same objects as JSON for the fake API
//! server, a kube-proxy iptables-mode ruleset and a kube-proxy nftables-mode
//! ruleset, plus the partial updates kube-proxy would apply for one endpoint
//! change. Service i has ClusterIP `VIP_BASE + i`, port 80/TCP; all services
//! share the ten pod IPs 10.244.1.10-19:8080 (so every service is reachable),
//! but rules and endpoints are still written per (service, endpoint), as
//! kube-proxy and the EndpointSlice controller do. Service 0 alone also has
//! a bulk port (5001/TCP → 8081) and a UDP port (53/UDP → 8053) for the
//! throughput and UDP workloads, so per-service figures stay those of a
//! one-port service.
use std::{fmt::Write as _, fs, io::Write as _, net::Ipv4Addr, path::Path};

/// ClusterIP of service 0; service i is `VIP_BASE + i` (inside 10.96.0.0/12
/// for every N we use).
pub const VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 0);
pub const SVC_PORT: u16 = 80;
pub const POD_BASE: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
pub const PODS: u32 = 10;
pub const POD_PORT: u16 = 8080;
/// Service 0's bulk-stream port and the server's sink behind it.
pub const BULK_SVC_PORT: u16 = 5001;
pub const BULK_POD_PORT: u16 = 8081;
/// Service 0's UDP port and the server's echo behind it.
pub const UDP_SVC_PORT: u16 = 53;
pub const UDP_POD_PORT: u16 = 8053;
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// The node addresses of the miss-path slot (`--node-ip`): four IPv4
/// addresses from here. They exist nowhere; a frontend only needs them in
/// the maps.
pub const NODE_IP_BASE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
pub const NODE_IPS: u32 = 4;
/// NodePort Services of the miss-path slot (services 1..=this, at most
/// N - 1), each with `nodePort: FIRST_NODE_PORT + i - 1` on its TCP port.
pub const NODE_PORT_SERVICES: u32 = 2000;
pub const FIRST_NODE_PORT: u16 = 30000;

/// `--node-ip` of the miss-path slot.
pub fn node_ips() -> String {
    (0..NODE_IPS)
        .map(|k| Ipv4Addr::from(u32::from(NODE_IP_BASE) + k).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// NodePort Services among N.
pub fn node_port_services(n: u32) -> u32 {
    NODE_PORT_SERVICES.min(n.saturating_sub(1))
}

/// One set of destinations that are no service, for the miss path
/// (`lb-benchclient --mode miss`: a UDP connect, so nothing is sent).
#[derive(Clone, Copy, Debug)]
pub struct MissSweep {
    pub name: &'static str,
    pub base: Ipv4Addr,
    pub addrs: u32,
    pub port: u16,
    pub ports: u32,
}

/// Addresses that belong to nothing (10.200.0.0/16, one port).
pub const MISS_FOREIGN: MissSweep = MissSweep {
    name: "foreign",
    base: Ipv4Addr::new(10, 200, 0, 0),
    addrs: 1 << 16,
    port: 8080,
    ports: 1,
};
/// The node addresses over the whole nodePort range, UDP: the same
/// addresses and ports as the (TCP) NodePort frontends, other protocol.
pub const MISS_NODE: MissSweep = MissSweep {
    name: "node",
    base: NODE_IP_BASE,
    addrs: NODE_IPS,
    port: 30000,
    ports: 2768,
};

impl MissSweep {
    /// Every destination of the sweep (address, port), host byte order.
    pub fn destinations(&self) -> impl Iterator<Item = (Ipv4Addr, u16)> + '_ {
        (0..self.addrs).flat_map(move |a| {
            let ip = Ipv4Addr::from(u32::from(self.base) + a);
            (0..self.ports).map(move |p| (ip, self.port + p as u16))
        })
    }
}
pub const NAMESPACE: &str = "bench";
/// Services per manifest file (service 0 has a file of its own, the one the
/// endpoint-change measurement edits).
const PER_FILE: u32 = 1000;

pub fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(VIP_BASE) + i)
}

pub fn pod(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(POD_BASE) + k)
}

/// One service port: (name, protocol, service port, pod port).
#[derive(Clone, Copy)]
pub struct Port {
    pub name: &'static str,
    pub proto: &'static str,
    pub port: u16,
    pub target: u16,
}

const HTTP: Port = Port {
    name: "http",
    proto: "TCP",
    port: SVC_PORT,
    target: POD_PORT,
};
const SERVICE0_PORTS: [Port; 3] = [
    HTTP,
    Port {
        name: "bulk",
        proto: "TCP",
        port: BULK_SVC_PORT,
        target: BULK_POD_PORT,
    },
    Port {
        name: "dns",
        proto: "UDP",
        port: UDP_SVC_PORT,
        target: UDP_POD_PORT,
    },
];

/// The ports of service `i`.
pub fn ports(i: u32) -> &'static [Port] {
    if i == 0 {
        &SERVICE0_PORTS
    } else {
        std::slice::from_ref(&HTTP)
    }
}

/// Frontends (service ports) of `n` services.
pub fn frontends(n: u32) -> u64 {
    u64::from(n) + SERVICE0_PORTS.len() as u64 - 1
}

/// A selectorless Service with an explicit ClusterIP and its EndpointSlice.
/// `not_ready`: endpoints (from the last) marked `ready: false`.
pub fn service_yaml(i: u32, not_ready: u32) -> String {
    service_yaml_with(i, not_ready, None)
}

/// [`service_yaml`], of `type: NodePort` with this `nodePort` on its first
/// port when `node_port` is given.
fn service_yaml_with(i: u32, not_ready: u32, node_port: Option<u16>) -> String {
    let mut y = format!(
        "apiVersion: v1
kind: Service
metadata:
  name: svc-{i}
  namespace: {NAMESPACE}
spec:
  clusterIP: {vip}
",
        vip = vip(i)
    );
    if node_port.is_some() {
        y.push_str("  type: NodePort\n");
    }
    y.push_str("  ports:\n");
    for (k, p) in ports(i).iter().enumerate() {
        let _ = write!(
            y,
            "  - name: {}\n    port: {}\n    protocol: {}\n    targetPort: {}\n",
            p.name, p.port, p.proto, p.target
        );
        if let (0, Some(np)) = (k, node_port) {
            let _ = writeln!(y, "    nodePort: {np}");
        }
    }
    let _ = write!(
        y,
        "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-{i}-x
  namespace: {NAMESPACE}
  labels:
    kubernetes.io/service-name: svc-{i}
addressType: IPv4
ports:
"
    );
    for p in ports(i) {
        let _ = write!(
            y,
            "- name: {}\n  port: {}\n  protocol: {}\n",
            p.name, p.target, p.proto
        );
    }
    y.push_str("endpoints:\n");
    for k in 0..PODS {
        let ready = k < PODS - not_ready;
        let _ = writeln!(
            y,
            "- addresses: [\"{}\"]\n  conditions: {{ready: {ready}}}",
            pod(k)
        );
    }
    y
}

/// Writes the manifest directory for `n` services; returns its size in bytes.
pub fn write_manifests(dir: &Path, n: u32) -> anyhow::Result<u64> {
    write_manifests_with(dir, n, 0)
}

/// [`write_manifests`] with services 1..=`node_ports` of type NodePort
/// (see [`NODE_PORT_SERVICES`]).
pub fn write_manifests_with(dir: &Path, n: u32, node_ports: u32) -> anyhow::Result<u64> {
    fs::create_dir_all(dir)?;
    let mut total = 0u64;
    let first = service_yaml(0, 0);
    total += first.len() as u64;
    fs::write(dir.join("svc-0.yaml"), first)?;
    let mut i = 1;
    while i < n {
        let end = (i + PER_FILE).min(n);
        let mut f = std::io::BufWriter::new(fs::File::create(
            dir.join(format!("svc-{i:06}-{end:06}.yaml")),
        )?);
        for j in i..end {
            let np = (j <= node_ports).then(|| FIRST_NODE_PORT + (j - 1) as u16);
            let y = service_yaml_with(j, 0, np);
            total += y.len() as u64 + 4;
            f.write_all(b"---\n")?;
            f.write_all(y.as_bytes())?;
        }
        f.flush()?;
        i = end;
    }
    Ok(total)
}

/// The Service and EndpointSlice of service `i` as API objects (JSON), the
/// same content as [`service_yaml`].
pub fn service_json(i: u32) -> serde_json::Value {
    let ports: Vec<serde_json::Value> = ports(i)
        .iter()
        .map(|p| {
            serde_json::json!({"name": p.name, "port": p.port, "protocol": p.proto,
                               "targetPort": p.target})
        })
        .collect();
    serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": NAMESPACE},
        "spec": {"type": "ClusterIP", "clusterIP": vip(i).to_string(),
                 "clusterIPs": [vip(i).to_string()], "ipFamilies": ["IPv4"],
                 "ports": ports},
    })
}

/// Service `i`'s EndpointSlice with its last `not_ready` endpoints not ready.
pub fn slice_json(i: u32, not_ready: u32) -> serde_json::Value {
    let ports: Vec<serde_json::Value> = ports(i)
        .iter()
        .map(|p| serde_json::json!({"name": p.name, "port": p.target, "protocol": p.proto}))
        .collect();
    let eps: Vec<serde_json::Value> = (0..PODS)
        .map(|k| {
            let ready = k < PODS - not_ready;
            serde_json::json!({"addresses": [pod(k).to_string()],
                               "conditions": {"ready": ready, "serving": ready,
                                              "terminating": false}})
        })
        .collect();
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-x"), "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "ports": ports, "endpoints": eps,
    })
}

/// Every object of `n` services as one JSON `List`, which `fake-apiserver`
/// loads at start; returns its size in bytes.
pub fn write_api_objects(path: &Path, n: u32) -> anyhow::Result<u64> {
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    f.write_all(b"{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[\n")?;
    for i in 0..n {
        if i > 0 {
            f.write_all(b",\n")?;
        }
        serde_json::to_writer(&mut f, &service_json(i))?;
        f.write_all(b",\n")?;
        serde_json::to_writer(&mut f, &slice_json(i, 0))?;
    }
    f.write_all(b"\n]}\n")?;
    f.flush()?;
    Ok(fs::metadata(path)?.len())
}

/// kube-proxy names chains after a base32 SHA-256 prefix; any stable
/// 16-character hash of the same alphabet gives the kernel the same work.
fn hash16(s: &str) -> String {
    const ALPHA: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(16);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    for round in 0..2u64 {
        let mut x = h ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        for _ in 0..8 {
            out.push(ALPHA[(x & 31) as usize] as char);
            x >>= 5;
        }
    }
    out
}

/// Counts of what a ruleset holds.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RulesetSize {
    pub rules: u64,
    pub chains: u64,
    pub bytes: u64,
}

/// kube-proxy's names for one service port.
fn ipt_svc_name(i: u32, p: &Port) -> String {
    format!("{NAMESPACE}/svc-{i}:{}", p.name)
}

fn ipt_svc_chain(i: u32, p: &Port) -> String {
    format!(
        "KUBE-SVC-{}",
        hash16(&format!("{}{}", ipt_svc_name(i, p), p.proto.to_lowercase()))
    )
}

fn ipt_sep_chain(i: u32, p: &Port, k: u32) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!(
            "{}{}{}:{}",
            ipt_svc_name(i, p),
            p.proto.to_lowercase(),
            pod(k),
            p.target
        ))
    )
}

/// The always-rewritten top-level chains' rules; returns the rule count.
fn ipt_top_rules(f: &mut impl std::io::Write, n: u32) -> anyhow::Result<u64> {
    let mut rules = 0;
    writeln!(f, "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000")?;
    writeln!(
        f,
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN"
    )?;
    writeln!(f, "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0")?;
    writeln!(
        f,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    )?;
    rules += 4;
    for i in 0..n {
        for p in ports(i) {
            let proto = p.proto.to_lowercase();
            writeln!(
                f,
                "-A KUBE-SERVICES -d {}/32 -p {proto} -m comment --comment \"{} cluster IP\" -m {proto} --dport {} -j {}",
                vip(i),
                ipt_svc_name(i, p),
                p.port,
                ipt_svc_chain(i, p)
            )?;
            rules += 1;
        }
    }
    writeln!(
        f,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    )?;
    Ok(rules + 1)
}

/// One KUBE-SVC chain's rules over endpoints `0..eps`; returns the count.
fn ipt_svc_rules(f: &mut impl std::io::Write, i: u32, p: &Port, eps: u32) -> anyhow::Result<u64> {
    let sc = ipt_svc_chain(i, p);
    let name = ipt_svc_name(i, p);
    let proto = p.proto.to_lowercase();
    writeln!(
        f,
        "-A {sc} -d {}/32 ! -s {CLUSTER_CIDR} -p {proto} -m comment --comment \"{name} cluster IP\" -m {proto} --dport {} -j KUBE-MARK-MASQ",
        vip(i),
        p.port
    )?;
    for k in 0..eps {
        let left = eps - k;
        if left > 1 {
            writeln!(
                f,
                "-A {sc} -m comment --comment \"{name} -> {}:{}\" -m statistic --mode random --probability {:.11} -j {}",
                pod(k),
                p.target,
                1.0 / f64::from(left),
                ipt_sep_chain(i, p, k)
            )?;
        } else {
            writeln!(
                f,
                "-A {sc} -m comment --comment \"{name} -> {}:{}\" -j {}",
                pod(k),
                p.target,
                ipt_sep_chain(i, p, k)
            )?;
        }
    }
    Ok(1 + u64::from(eps))
}

/// One KUBE-SEP chain's two rules (hairpin mark, DNAT).
fn ipt_sep_rules(f: &mut impl std::io::Write, i: u32, p: &Port, k: u32) -> anyhow::Result<u64> {
    let ep = ipt_sep_chain(i, p, k);
    let name = ipt_svc_name(i, p);
    let proto = p.proto.to_lowercase();
    writeln!(
        f,
        "-A {ep} -s {}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ",
        pod(k)
    )?;
    writeln!(
        f,
        "-A {ep} -p {proto} -m comment --comment \"{name}\" -m {proto} -j DNAT --to-destination {}:{}",
        pod(k),
        p.target
    )?;
    Ok(2)
}

const IPT_TOP_CHAINS: [&str; 4] = [
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
];

/// kube-proxy's iptables mode (nat table only, ClusterIP only): KUBE-SERVICES
/// with one rule per service port then the NodePort rule; per service port a
/// KUBE-SVC chain (masquerade mark for off-cluster sources, then
/// `statistic --mode random` with probability 1/(10-k)); per endpoint a
/// KUBE-SEP chain (hairpin mark, DNAT); KUBE-POSTROUTING masquerades marked
/// packets. One `*nat … COMMIT` for `iptables-restore`.
pub fn write_iptables(path: &Path, n: u32) -> anyhow::Result<RulesetSize> {
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    let mut rules = 0u64;
    let mut chains = 8u64;
    writeln!(f, "*nat")?;
    for c in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        writeln!(f, ":{c} ACCEPT [0:0]")?;
    }
    for c in IPT_TOP_CHAINS {
        writeln!(f, ":{c} - [0:0]")?;
    }
    for i in 0..n {
        for p in ports(i) {
            writeln!(f, ":{} - [0:0]", ipt_svc_chain(i, p))?;
            for k in 0..PODS {
                writeln!(f, ":{} - [0:0]", ipt_sep_chain(i, p, k))?;
            }
            chains += 1 + u64::from(PODS);
        }
    }
    writeln!(
        f,
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    )?;
    writeln!(
        f,
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    )?;
    writeln!(
        f,
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
    )?;
    rules += 3;
    rules += ipt_top_rules(&mut f, n)?;
    for i in 0..n {
        for p in ports(i) {
            rules += ipt_svc_rules(&mut f, i, p, PODS)?;
            for k in 0..PODS {
                rules += ipt_sep_rules(&mut f, i, p, k)?;
            }
        }
    }
    writeln!(f, "COMMIT")?;
    f.flush()?;
    Ok(RulesetSize {
        rules,
        chains,
        bytes: fs::metadata(path)?.len(),
    })
}

/// The partial sync kube-proxy's iptables mode (MinimizeIPTablesRestore, the
/// default since 1.28) runs for one endpoint change of service 0's http
/// port, for `iptables-restore --noflush`: the top-level chains rewritten in
/// full (KUBE-SERVICES has a rule per service port, so this grows with N),
/// the changed KUBE-SVC chain rewritten, and the last endpoint's KUBE-SEP
/// chain deleted (`remove`) or created again.
pub fn write_iptables_change(path: &Path, n: u32, remove: bool) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    let p = &HTTP;
    let last = PODS - 1;
    writeln!(f, "*nat")?;
    for c in IPT_TOP_CHAINS {
        writeln!(f, ":{c} - [0:0]")?;
    }
    writeln!(f, ":{} - [0:0]", ipt_svc_chain(0, p))?;
    writeln!(f, ":{} - [0:0]", ipt_sep_chain(0, p, last))?;
    ipt_top_rules(&mut f, n)?;
    if remove {
        ipt_svc_rules(&mut f, 0, p, PODS - 1)?;
        writeln!(f, "-X {}", ipt_sep_chain(0, p, last))?;
    } else {
        ipt_svc_rules(&mut f, 0, p, PODS)?;
        ipt_sep_rules(&mut f, 0, p, last)?;
    }
    writeln!(f, "COMMIT")?;
    f.flush()?;
    Ok(())
}

const NFT_TABLE: &str = "ip kube-proxy";

fn nft_svc_chain(i: u32, p: &Port) -> String {
    let svc = format!("{NAMESPACE}/svc-{i}/{}/{}", p.proto.to_lowercase(), p.name);
    format!("service-{}-{svc}", &hash16(&svc)[..8])
}

fn nft_ep_chain(i: u32, p: &Port, k: u32) -> String {
    let svc = format!("{NAMESPACE}/svc-{i}/{}/{}", p.proto.to_lowercase(), p.name);
    format!(
        "endpoint-{}-{svc}__{}/{}",
        &hash16(&format!("{svc}{k}"))[..8],
        pod(k),
        p.target
    )
}

/// A service chain's two rules over endpoints `0..eps`.
fn nft_svc_rules(out: &mut String, i: u32, p: &Port, eps: u32) {
    let t = NFT_TABLE;
    let sc = nft_svc_chain(i, p);
    let proto = p.proto.to_lowercase();
    let _ = writeln!(
        out,
        "add rule {t} {sc} ip daddr {} {proto} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        vip(i),
        p.port
    );
    let mut vmap = String::new();
    for k in 0..eps {
        if k > 0 {
            vmap.push_str(", ");
        }
        let _ = write!(vmap, "{k} : goto {}", nft_ep_chain(i, p, k));
    }
    let _ = writeln!(
        out,
        "add rule {t} {sc} numgen random mod {eps} vmap {{ {vmap} }}"
    );
}

/// An endpoint chain and its two rules (hairpin mark, DNAT).
fn nft_ep(out: &mut String, i: u32, p: &Port, k: u32) {
    let t = NFT_TABLE;
    let ep = nft_ep_chain(i, p, k);
    let _ = writeln!(out, "add chain {t} {ep}");
    let _ = writeln!(
        out,
        "add rule {t} {ep} ip saddr {} jump mark-for-masquerade",
        pod(k)
    );
    let _ = writeln!(
        out,
        "add rule {t} {ep} meta l4proto {} dnat to {}:{}",
        p.proto.to_lowercase(),
        pod(k),
        p.target
    );
}

/// kube-proxy's nftables mode (ClusterIP only): table `ip kube-proxy`, a
/// `service-ips` verdict map keyed by `daddr . l4proto . dport` jumping to a
/// per-service-port chain (masquerade mark, then `numgen random mod 10` into
/// an anonymous vmap of endpoint chains: hairpin mark and DNAT). Written as
/// `add` commands like kube-proxy's transaction, for one `nft -f`.
pub fn write_nft(path: &Path, n: u32) -> anyhow::Result<RulesetSize> {
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    let mut rules = 0u64;
    let mut chains = 0u64;
    let t = NFT_TABLE;
    writeln!(f, "add table {t} {{ comment \"rules for kube-proxy\" ; }}")?;
    writeln!(
        f,
        "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    )?;
    let base: [(&str, &str, &[&str]); 6] = [
        ("mark-for-masquerade", "", &["mark set mark or 0x4000"]),
        (
            "masquerading",
            "",
            &[
                "mark and 0x4000 == 0 return",
                "mark set mark xor 0x4000",
                "masquerade fully-random",
            ],
        ),
        (
            "services",
            "",
            &["ip daddr . meta l4proto . th dport vmap @service-ips"],
        ),
        (
            "nat-prerouting",
            " { type nat hook prerouting priority -100 ; }",
            &["jump services"],
        ),
        (
            "nat-output",
            " { type nat hook output priority -100 ; }",
            &["jump services"],
        ),
        (
            "nat-postrouting",
            " { type nat hook postrouting priority 100 ; }",
            &["jump masquerading"],
        ),
    ];
    for (c, spec, body) in base {
        writeln!(f, "add chain {t} {c}{spec}")?;
        chains += 1;
        for r in body {
            writeln!(f, "add rule {t} {c} {r}")?;
            rules += 1;
        }
    }
    let mut out = String::new();
    for i in 0..n {
        for p in ports(i) {
            let sc = nft_svc_chain(i, p);
            let _ = writeln!(out, "add chain {t} {sc}");
            chains += 1;
            for k in 0..PODS {
                nft_ep(&mut out, i, p, k);
                chains += 1;
                rules += 2;
            }
            nft_svc_rules(&mut out, i, p, PODS);
            rules += 2;
            let _ = writeln!(
                out,
                "add element {t} service-ips {{ {} . {} . {} : goto {sc} }}",
                vip(i),
                p.proto.to_lowercase(),
                p.port
            );
        }
        if out.len() > 1 << 20 {
            f.write_all(out.as_bytes())?;
            out.clear();
        }
    }
    f.write_all(out.as_bytes())?;
    f.flush()?;
    Ok(RulesetSize {
        rules,
        chains,
        bytes: fs::metadata(path)?.len(),
    })
}

/// The transaction kube-proxy's nftables mode sends for one endpoint change
/// of service 0's http port, for `nft -f`: the service chain flushed and
/// rewritten; the last endpoint's chain flushed (kube-proxy deletes stale
/// chains in a later sync) or filled again.
pub fn write_nft_change(path: &Path, remove: bool) -> anyhow::Result<()> {
    let t = NFT_TABLE;
    let p = &HTTP;
    let last = PODS - 1;
    let mut out = format!("add table {t}\n");
    let _ = writeln!(out, "flush chain {t} {}", nft_svc_chain(0, p));
    if remove {
        nft_svc_rules(&mut out, 0, p, PODS - 1);
        let _ = writeln!(out, "flush chain {t} {}", nft_ep_chain(0, p, last));
    } else {
        let _ = writeln!(out, "flush chain {t} {}", nft_ep_chain(0, p, last));
        nft_ep(&mut out, 0, p, last);
        nft_svc_rules(&mut out, 0, p, PODS);
    }
    fs::write(path, out)?;
    Ok(())
}
