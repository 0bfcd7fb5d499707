//! `lb-agent list`: what the pinned maps hold, grouped the way `kubectl get
//! services` and `kubectl get endpoints` would show it. Built only from the
//! maps, so it works whether or not an agent is running.
use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use serde::Serialize;

use crate::{
    datapath::{Snapshot, backend_addr, decode_meta, key_frontend},
    model::{FrontendKind, Proto},
};

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRow {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub svc_type: &'static str,
    pub cluster_ips: Vec<String>,
    /// `spec.externalIPs` served on this node.
    pub external_ips: Vec<String>,
    /// Load balancer ingress IPs served on this node.
    pub load_balancer_ips: Vec<String>,
    pub ports: Vec<PortRow>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PortRow {
    pub name: String,
    pub port: u16,
    pub protocol: Proto,
    /// The frontend's address, one of four: a ClusterIP, (`nodeIp`) one of
    /// this node's addresses, `port` being the nodePort, an external IP or
    /// a load balancer ingress IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer_ip: Option<String>,
    pub svc_id: u32,
    /// Active backends in slot order; empty means connects are refused.
    pub endpoints: Vec<String>,
    /// Sockets destroyed because their backend left this frontend.
    pub terminated_sockets: u64,
    /// Session affinity timeout in seconds; 0: none.
    pub affinity_seconds: u32,
}

/// Rows sorted by namespace and name.
pub fn rows(snap: &Snapshot) -> Vec<ServiceRow> {
    let mut by_service: BTreeMap<(String, String), ServiceRow> = BTreeMap::new();
    for (key, master) in &snap.services {
        let Some(fe) = key_frontend(key) else {
            continue;
        };
        let svc = snap.meta.get(&master.svc_id).map(decode_meta);
        let (namespace, name, port_name, svc_type) = match &svc {
            Some(s) => (
                s.namespace.to_string(),
                s.name.to_string(),
                s.port_name.to_string(),
                s.svc_type.as_str(),
            ),
            None => (
                "<unknown>".into(),
                format!("svc-{}", master.svc_id),
                String::new(),
                "ClusterIP",
            ),
        };
        let endpoints: Vec<String> = (0..u32::from(master.count))
            .filter_map(|i| {
                snap.backends
                    .get(&master.base.checked_add(i)?)
                    .map(|b| backend_addr(b).to_string())
            })
            .collect();
        let row = by_service
            .entry((namespace.clone(), name.clone()))
            .or_insert_with(|| ServiceRow {
                namespace,
                name,
                svc_type,
                cluster_ips: Vec::new(),
                external_ips: Vec::new(),
                load_balancer_ips: Vec::new(),
                ports: Vec::new(),
            });
        let ip = fe.addr.ip().to_string();
        let kind = svc.as_ref().map_or(FrontendKind::ClusterIP, |s| s.frontend);
        let listed = match kind {
            FrontendKind::ClusterIP => Some(&mut row.cluster_ips),
            FrontendKind::NodePort => None,
            FrontendKind::ExternalIP => Some(&mut row.external_ips),
            FrontendKind::LoadBalancer => Some(&mut row.load_balancer_ips),
        };
        if let Some(list) = listed
            && !list.contains(&ip)
        {
            list.push(ip.clone());
        }
        let only = |k: FrontendKind| (kind == k).then(|| ip.clone());
        row.ports.push(PortRow {
            name: port_name,
            port: fe.addr.port(),
            protocol: fe.proto,
            cluster_ip: only(FrontendKind::ClusterIP),
            node_ip: only(FrontendKind::NodePort),
            external_ip: only(FrontendKind::ExternalIP),
            load_balancer_ip: only(FrontendKind::LoadBalancer),
            svc_id: master.svc_id,
            endpoints,
            terminated_sockets: snap.terminated.get(&master.svc_id).copied().unwrap_or(0),
            affinity_seconds: master.affinity,
        });
    }
    by_service.into_values().collect()
}

/// A kubectl-style table: NAMESPACE NAME TYPE CLUSTER-IP EXTERNAL-IP
/// PORT(S) ENDPOINTS. EXTERNAL-IP lists, as kubectl does, the load
/// balancer IPs and then the external IPs, but only those served here
/// (`<none>` also for a load balancer kubectl would show `<pending>`).
pub fn table(rows: &[ServiceRow]) -> String {
    const COLUMNS: usize = 7;
    let header = [
        "NAMESPACE",
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "ENDPOINTS",
    ];
    let mut lines: Vec<[String; COLUMNS]> = vec![header.map(String::from)];
    for r in rows {
        // A dual-stack service has one frontend per family on each port;
        // kubectl shows the port once, with its nodePort (`80:30080/TCP`).
        let mut ports: Vec<String> = Vec::new();
        for p in r.ports.iter().filter(|p| p.cluster_ip.is_some()) {
            let node_port = r
                .ports
                .iter()
                .find(|n| n.node_ip.is_some() && n.name == p.name && n.protocol == p.protocol)
                .map(|n| format!(":{}", n.port))
                .unwrap_or_default();
            let port = format!("{}{node_port}/{}", p.port, p.protocol);
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let ports = ports.join(",");
        let mut eps: Vec<&str> = Vec::new();
        for p in &r.ports {
            for e in &p.endpoints {
                if !eps.contains(&e.as_str()) {
                    eps.push(e);
                }
            }
        }
        let endpoints = match eps.len() {
            0 => "<none>".to_owned(),
            n if n <= 3 => eps.join(","),
            n => format!("{} + {} more...", eps[..3].join(","), n - 3),
        };
        let external: Vec<&str> = r
            .load_balancer_ips
            .iter()
            .chain(&r.external_ips)
            .map(String::as_str)
            .collect();
        let external = if external.is_empty() {
            "<none>".to_owned()
        } else {
            external.join(",")
        };
        lines.push([
            r.namespace.clone(),
            r.name.clone(),
            r.svc_type.to_owned(),
            r.cluster_ips.join(","),
            external,
            ports,
            endpoints,
        ]);
    }
    let mut widths = [0usize; COLUMNS];
    for l in &lines {
        for (w, cell) in widths.iter_mut().zip(l) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for l in &lines {
        let mut line = String::new();
        for (i, cell) in l.iter().enumerate() {
            if i + 1 == l.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}   ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Unique backends of a row, for callers that want addresses, not strings.
pub fn backends(row: &ServiceRow) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = row
        .ports
        .iter()
        .flat_map(|p| p.endpoints.iter().filter_map(|e| e.parse().ok()))
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::{
        datapath::MemoryDatapath,
        model::{DesiredService, DesiredState, ServiceRef, ServiceType, frontend},
        reconciler::{Prune, Reconciler},
    };

    /// The rows of maps holding `frontends`, each with the backends `be`.
    fn rows_of(
        frontends: &[(crate::model::Frontend, &ServiceRef)],
        be: &[SocketAddr],
    ) -> Vec<ServiceRow> {
        let mut desired = DesiredState::new();
        for (fe, svc) in frontends {
            desired.insert(
                *fe,
                DesiredService {
                    service: (*svc).clone(),
                    backends: be.to_vec(),
                    affinity: 0,
                    spared: vec![],
                },
            );
        }
        let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
        r.apply(&desired, Prune::Yes);
        rows(&r.datapath().state)
    }

    #[test]
    fn table_groups_ports_of_one_service() {
        let mut desired = DesiredState::new();
        let ip = Ipv4Addr::new(10, 96, 0, 10);
        for (port, proto, name) in [(53, Proto::Udp, "dns"), (53, Proto::Tcp, "dns-tcp")] {
            desired.insert(
                frontend(ip, port, proto),
                DesiredService {
                    service: ServiceRef {
                        namespace: "kube-system".into(),
                        name: "kube-dns".into(),
                        port_name: name.into(),
                        svc_type: ServiceType::ClusterIP,
                        frontend: FrontendKind::ClusterIP,
                    },
                    backends: vec![SocketAddr::from((Ipv4Addr::new(10, 244, 0, 5), 53))],
                    affinity: 0,
                    spared: vec![],
                },
            );
        }
        desired.insert(
            frontend(Ipv4Addr::new(10, 96, 0, 20), 80, Proto::Tcp),
            DesiredService {
                service: ServiceRef {
                    namespace: "default".into(),
                    name: "empty".into(),
                    port_name: Default::default(),
                    svc_type: ServiceType::NodePort,
                    frontend: FrontendKind::ClusterIP,
                },
                backends: vec![],
                affinity: 0,
                spared: vec![],
            },
        );
        let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
        r.apply(&desired, Prune::Yes);
        let rows = rows(&r.datapath().state);
        assert_eq!(rows.len(), 2);
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE"));
        assert!(lines[1].contains("default") && lines[1].ends_with("<none>"));
        assert!(lines[1].contains("NodePort"));
        assert!(lines[2].contains("kube-dns"));
        assert!(lines[2].contains("53/TCP,53/UDP"), "{t}");
        assert!(lines[2].ends_with("10.244.0.5:53"), "{t}");
    }

    #[test]
    fn node_ports_show_as_kubectl_shows_them_and_not_as_cluster_ips() {
        let cluster = ServiceRef {
            namespace: "default".into(),
            name: "web".into(),
            port_name: "http".into(),
            svc_type: ServiceType::NodePort,
            frontend: FrontendKind::ClusterIP,
        };
        let on_node = ServiceRef {
            frontend: FrontendKind::NodePort,
            ..cluster.clone()
        };
        let be = [SocketAddr::from((Ipv4Addr::new(10, 244, 0, 5), 8080))];
        let rows = rows_of(
            &[
                (
                    frontend(Ipv4Addr::new(10, 96, 0, 40), 80, Proto::Tcp),
                    &cluster,
                ),
                (
                    frontend(Ipv4Addr::new(192, 168, 0, 10), 30080, Proto::Tcp),
                    &on_node,
                ),
                (
                    frontend(Ipv4Addr::new(192, 168, 1, 10), 30080, Proto::Tcp),
                    &on_node,
                ),
            ],
            &be,
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].cluster_ips, vec!["10.96.0.40".to_owned()]);
        let node_ips: Vec<&str> = rows[0]
            .ports
            .iter()
            .filter_map(|p| p.node_ip.as_deref())
            .collect();
        assert_eq!(node_ips, ["192.168.0.10", "192.168.1.10"]);
        let t = table(&rows);
        let line = t.lines().nth(1).unwrap();
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells[2..6],
            ["NodePort", "10.96.0.40", "<none>", "80:30080/TCP"],
            "{t}"
        );
        assert!(!line.contains("192.168"), "{t}");
    }

    #[test]
    fn external_and_load_balancer_ips_show_under_external_ip() {
        let cluster = ServiceRef {
            namespace: "default".into(),
            name: "web".into(),
            port_name: "http".into(),
            svc_type: ServiceType::LoadBalancer,
            frontend: FrontendKind::ClusterIP,
        };
        let kinds: Vec<(crate::model::Frontend, ServiceRef)> = [
            ([10, 96, 0, 40], 80, FrontendKind::ClusterIP),
            ([192, 168, 0, 10], 30080, FrontendKind::NodePort),
            ([192, 168, 0, 10], 80, FrontendKind::ExternalIP),
            ([203, 0, 113, 7], 80, FrontendKind::LoadBalancer),
        ]
        .into_iter()
        .map(|(ip, port, kind)| {
            let svc = ServiceRef {
                frontend: kind,
                ..cluster.clone()
            };
            (frontend(Ipv4Addr::from(ip), port, Proto::Tcp), svc)
        })
        .collect();
        let frontends: Vec<_> = kinds.iter().map(|(fe, svc)| (*fe, svc)).collect();
        let be = [SocketAddr::from((Ipv4Addr::new(10, 244, 0, 5), 8080))];
        let rows = rows_of(&frontends, &be);
        assert_eq!(rows[0].cluster_ips, ["10.96.0.40"]);
        assert_eq!(rows[0].external_ips, ["192.168.0.10"]);
        assert_eq!(rows[0].load_balancer_ips, ["203.0.113.7"]);
        let json = serde_json::to_value(&rows[0].ports).unwrap();
        let mut addresses: Vec<(&str, &str)> = json
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p.as_object().unwrap())
            .filter(|(k, _)| k.ends_with("Ip"))
            .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
            .collect();
        addresses.sort_unstable();
        assert_eq!(
            addresses,
            [
                ("clusterIp", "10.96.0.40"),
                ("externalIp", "192.168.0.10"),
                ("loadBalancerIp", "203.0.113.7"),
                ("nodeIp", "192.168.0.10"),
            ]
        );
        let t = table(&rows);
        let cells: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            cells[2..6],
            [
                "LoadBalancer",
                "10.96.0.40",
                "203.0.113.7,192.168.0.10",
                "80:30080/TCP"
            ],
            "{t}"
        );
    }

    #[test]
    fn dual_stack_rows_show_both_cluster_ips_and_each_port_once() {
        let mut desired = DesiredState::new();
        let svc = ServiceRef {
            namespace: "default".into(),
            name: "web".into(),
            port_name: Default::default(),
            svc_type: ServiceType::ClusterIP,
            frontend: FrontendKind::ClusterIP,
        };
        for (ip, be) in [
            (IpAddr::from(Ipv4Addr::new(10, 96, 0, 30)), "10.244.0.5:80"),
            ("fd00:96::30".parse().unwrap(), "[fd00:244::5]:80"),
        ] {
            desired.insert(
                frontend(ip, 80, Proto::Tcp),
                DesiredService {
                    service: svc.clone(),
                    backends: vec![be.parse().unwrap()],
                    affinity: 0,
                    spared: vec![],
                },
            );
        }
        let mut r = Reconciler::adopt(MemoryDatapath::default()).unwrap();
        r.apply(&desired, Prune::Yes);
        let rows = rows(&r.datapath().state);
        assert_eq!(rows[0].cluster_ips, ["10.96.0.30", "fd00:96::30"]);
        let t = table(&rows);
        let line = t.lines().nth(1).unwrap();
        assert!(line.contains("10.96.0.30,fd00:96::30"), "{t}");
        assert!(line.contains("   80/TCP   "), "{t}");
        assert!(line.ends_with("10.244.0.5:80,[fd00:244::5]:80"), "{t}");
    }
}
