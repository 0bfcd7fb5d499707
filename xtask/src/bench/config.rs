//! The configurations every datapath is loaded with, for N services × 10
//! endpoints: agent manifests, a kube-proxy iptables-mode ruleset and a
//! kube-proxy nftables-mode ruleset. Service i has ClusterIP `VIP_BASE + i`,
//! port 80/TCP; all services share the ten pod IPs 10.244.1.10-19:8080 (so
//! every service is reachable), but rules and endpoints are still written
//! per (service, endpoint), as kube-proxy and the EndpointSlice controller do.
use std::{fmt::Write as _, fs, io::Write as _, net::Ipv4Addr, path::Path};

/// ClusterIP of service 0; service i is `VIP_BASE + i` (inside 10.96.0.0/12
/// for every N we use).
pub const VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 0);
pub const SVC_PORT: u16 = 80;
pub const POD_BASE: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
pub const PODS: u32 = 10;
pub const POD_PORT: u16 = 8080;
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
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

/// A selectorless Service with an explicit ClusterIP and its EndpointSlice.
/// `not_ready`: endpoints (from the last) marked `ready: false`.
pub fn service_yaml(i: u32, not_ready: u32) -> String {
    let mut y = format!(
        "apiVersion: v1
kind: Service
metadata:
  name: svc-{i}
  namespace: {NAMESPACE}
spec:
  clusterIP: {vip}
  ports:
  - name: http
    port: {SVC_PORT}
    protocol: TCP
    targetPort: {POD_PORT}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-{i}-x
  namespace: {NAMESPACE}
  labels:
    kubernetes.io/service-name: svc-{i}
addressType: IPv4
ports:
- name: http
  port: {POD_PORT}
  protocol: TCP
endpoints:
",
        vip = vip(i)
    );
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
            let y = service_yaml(j, 0);
            total += y.len() as u64 + 4;
            f.write_all(b"---\n")?;
            f.write_all(y.as_bytes())?;
        }
        f.flush()?;
        i = end;
    }
    Ok(total)
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

/// kube-proxy's iptables mode (nat table only, ClusterIP only): KUBE-SERVICES
/// with one rule per service then the NodePort rule; per service a
/// KUBE-SVC chain (masquerade mark for off-cluster sources, then
/// `statistic --mode random` with probability 1/(10-k)); per endpoint a
/// KUBE-SEP chain (hairpin mark, DNAT); KUBE-POSTROUTING masquerades marked
/// packets. One `*nat … COMMIT` for `iptables-restore`.
pub fn write_iptables(path: &Path, n: u32) -> anyhow::Result<RulesetSize> {
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    let mut rules = 0u64;
    let mut chains = 8u64;
    let svc_name = |i: u32| format!("{NAMESPACE}/svc-{i}:http");
    let svc_chain = |i: u32| format!("KUBE-SVC-{}", hash16(&format!("{}tcp", svc_name(i))));
    let sep_chain = |i: u32, k: u32| {
        format!(
            "KUBE-SEP-{}",
            hash16(&format!("{}tcp{}:{POD_PORT}", svc_name(i), pod(k)))
        )
    };
    writeln!(f, "*nat")?;
    for c in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        writeln!(f, ":{c} ACCEPT [0:0]")?;
    }
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        writeln!(f, ":{c} - [0:0]")?;
    }
    for i in 0..n {
        writeln!(f, ":{} - [0:0]", svc_chain(i))?;
        for k in 0..PODS {
            writeln!(f, ":{} - [0:0]", sep_chain(i, k))?;
        }
        chains += 1 + u64::from(PODS);
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
    rules += 7;
    for i in 0..n {
        writeln!(
            f,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" -m tcp --dport {SVC_PORT} -j {}",
            vip(i),
            svc_name(i),
            svc_chain(i)
        )?;
        rules += 1;
    }
    writeln!(
        f,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    )?;
    rules += 1;
    for i in 0..n {
        let sc = svc_chain(i);
        let name = svc_name(i);
        writeln!(
            f,
            "-A {sc} -d {}/32 ! -s {CLUSTER_CIDR} -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {SVC_PORT} -j KUBE-MARK-MASQ",
            vip(i)
        )?;
        rules += 1;
        for k in 0..PODS {
            let left = PODS - k;
            if left > 1 {
                writeln!(
                    f,
                    "-A {sc} -m comment --comment \"{name} -> {}:{POD_PORT}\" -m statistic --mode random --probability {:.11} -j {}",
                    pod(k),
                    1.0 / f64::from(left),
                    sep_chain(i, k)
                )?;
            } else {
                writeln!(
                    f,
                    "-A {sc} -m comment --comment \"{name} -> {}:{POD_PORT}\" -j {}",
                    pod(k),
                    sep_chain(i, k)
                )?;
            }
            rules += 1;
        }
        for k in 0..PODS {
            let ep = sep_chain(i, k);
            writeln!(
                f,
                "-A {ep} -s {}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ",
                pod(k)
            )?;
            writeln!(
                f,
                "-A {ep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {}:{POD_PORT}",
                pod(k)
            )?;
            rules += 2;
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

/// kube-proxy's nftables mode (ClusterIP only): table `ip kube-proxy`, a
/// `service-ips` verdict map keyed by `daddr . l4proto . dport` jumping to a
/// per-service chain (masquerade mark, then `numgen random mod 10` into an
/// anonymous vmap of endpoint chains: hairpin mark and DNAT). Written as
/// `add` commands like kube-proxy's transaction, for one `nft -f`.
pub fn write_nft(path: &Path, n: u32) -> anyhow::Result<RulesetSize> {
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    let mut rules = 0u64;
    let mut chains = 0u64;
    let t = "ip kube-proxy";
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
        let svc = format!("{}/svc-{i}/tcp/http", NAMESPACE);
        let sc = format!("service-{}-{svc}", &hash16(&svc)[..8]);
        let _ = writeln!(out, "add chain {t} {sc}");
        chains += 1;
        let _ = writeln!(
            out,
            "add rule {t} {sc} ip daddr {} tcp dport {SVC_PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            vip(i)
        );
        let mut vmap = String::new();
        for k in 0..PODS {
            let ep = format!(
                "endpoint-{}-{svc}__{}/{POD_PORT}",
                &hash16(&format!("{svc}{k}"))[..8],
                pod(k)
            );
            let _ = writeln!(out, "add chain {t} {ep}");
            let _ = writeln!(
                out,
                "add rule {t} {ep} ip saddr {} jump mark-for-masquerade",
                pod(k)
            );
            let _ = writeln!(
                out,
                "add rule {t} {ep} meta l4proto tcp dnat to {}:{POD_PORT}",
                pod(k)
            );
            chains += 1;
            rules += 2;
            if k > 0 {
                vmap.push_str(", ");
            }
            let _ = write!(vmap, "{k} : goto {ep}");
        }
        let _ = writeln!(
            out,
            "add rule {t} {sc} numgen random mod {PODS} vmap {{ {vmap} }}"
        );
        rules += 2;
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {} . tcp . {SVC_PORT} : goto {sc} }}",
            vip(i)
        );
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
