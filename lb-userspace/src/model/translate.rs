//! Services + EndpointSlices → desired frontends, with kube-proxy's rules
//! (`pkg/proxy/endpointslicecache.go`, `pkg/proxy/topology.go`,
//! `ShouldSkipService`). The rules work on the slim types of
//! [`super::input`]; [`super::Index`] runs them per service, and
//! [`translate`] is "apply everything to a fresh index, check out".
use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::MAX_SLOTS;
use smol_str::SmolStr;

use super::{
    DesiredService, DesiredState, Diagnostic, ExternalIps, Frontend, FrontendKind, Index, Proto,
    ServiceRef, ServiceType, TranslateOptions,
    input::{Address, EndpointInfo, Hints, ServiceInfo, ServiceSpecInfo, SliceInfo},
};

#[cfg(test)]
mod tests;

/// Pure: the same objects in the same order always give the same state.
///
/// Objects are applied in input order, as a source would have seen them:
/// when two Services claim one frontend, the one with the older
/// `creationTimestamp` keeps it, then the one listed first (never the
/// name). A Service listed twice is used once, the first time.
pub fn translate(
    services: &[Service],
    slices: &[EndpointSlice],
    opts: &TranslateOptions,
) -> (DesiredState, Vec<Diagnostic>) {
    let mut index = Index::new(opts.clone());
    let mut seen: HashSet<(SmolStr, SmolStr)> = HashSet::new();
    let mut duplicates: Vec<ServiceInfo> = Vec::new();
    for svc in services {
        let info = ServiceInfo::from(svc);
        if seen.insert((info.namespace.clone(), info.name.clone())) {
            index.apply_service(info);
        } else {
            duplicates.push(info);
        }
    }
    duplicates.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut slice_keys: HashSet<(SmolStr, SmolStr)> = HashSet::new();
    for slice in slices {
        let info = SliceInfo::from(slice);
        // As for Services, the first of two copies is used.
        if slice_keys.insert((info.namespace.clone(), info.name.clone())) {
            index.apply_slice(info);
        }
    }
    index.checkout();
    let (mut diags, per_service) = index.diagnostics_grouped();
    // A duplicate is reported right after its Service's own problems.
    let mut duplicates = duplicates.into_iter().peekable();
    for (key, group) in per_service {
        while let Some(dup) =
            duplicates.next_if(|d| (d.namespace.as_str(), d.name.as_str()) < (&key.0, &key.1))
        {
            diags.push(duplicate(&dup));
        }
        diags.extend(group.iter().cloned());
        while let Some(dup) =
            duplicates.next_if(|d| (d.namespace.as_str(), d.name.as_str()) == (&key.0, &key.1))
        {
            diags.push(duplicate(&dup));
        }
    }
    diags.extend(duplicates.map(|d| duplicate(&d)));
    (index.desired(), diags)
}

fn duplicate(dup: &ServiceInfo) -> Diagnostic {
    diag(
        "Service",
        &dup.namespace,
        &dup.name,
        &dup.source,
        "",
        "duplicate object with the same namespace and name; only the first is used".to_owned(),
    )
}

/// One service's frontends, for incremental recomputation. `slices` should be
/// this service's slices; any other slice is ignored. Frontends another
/// service also claims are not resolved here: that needs the whole set
/// (see [`super::Index`]).
pub fn translate_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    opts: &TranslateOptions,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(Frontend, DesiredService)> {
    let info = ServiceInfo::from(svc);
    let mut own: Vec<SliceInfo> = slices
        .iter()
        .map(|s| SliceInfo::from(*s))
        .filter(|s| s.namespace == info.namespace && s.service.as_deref() == Some(&info.name))
        .collect();
    own.sort_by(|a, b| a.name.cmp(&b.name));
    let refs: Vec<&SliceInfo> = own.iter().collect();
    service_frontends(&info, &refs, opts, diags)
}

/// The field of the service port a frontend came from. Later duplicates of a
/// (port, protocol) were dropped, so the first match is the one that was used.
pub fn port_field(svc: &ServiceInfo, fe: &Frontend) -> String {
    let ports = svc.spec.as_ref().map_or(&[][..], |s| &s.ports[..]);
    ports
        .iter()
        .position(|p| {
            p.port == i32::from(fe.addr.port())
                && parse_proto(p.protocol.as_deref()) == Ok(fe.proto)
        })
        .map(|i| format!("spec.ports[{i}]"))
        .or_else(|| {
            // A NodePort frontend: the port is the node port.
            ports
                .iter()
                .position(|p| {
                    p.node_port == i32::from(fe.addr.port())
                        && parse_proto(p.protocol.as_deref()) == Ok(fe.proto)
                })
                .map(|i| format!("spec.ports[{i}].nodePort"))
        })
        .unwrap_or_default()
}

/// A service port that survived validation.
struct PortSpec<'a> {
    index: usize,
    port: u16,
    proto: Proto,
    name: &'a str,
    /// `nodePort`, if set and valid.
    node_port: Option<u16>,
}

/// An endpoint with a usable address.
#[derive(Clone, Copy)]
struct ParsedEndpoint<'a> {
    ip: IpAddr,
    ep: &'a EndpointInfo,
    node: Option<&'a str>,
    hints: Option<&'a Hints>,
}

impl ParsedEndpoint<'_> {
    fn for_nodes(&self) -> &[String] {
        self.hints.map_or(&[], |h| &h.for_nodes)
    }

    fn for_zones(&self) -> &[String] {
        self.hints.map_or(&[], |h| &h.for_zones)
    }
}

/// One usable (IPv4 or IPv6) slice with its usable endpoints.
struct ParsedSlice<'a> {
    slice: &'a SliceInfo,
    endpoints: Vec<ParsedEndpoint<'a>>,
}

/// Where a nodePort is also served with `localhost_node_ports`.
const LOOPBACK: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
];

/// One service's frontends. `slices` are its own, sorted by name (the
/// deduplication order).
pub(super) fn service_frontends(
    svc: &ServiceInfo,
    slices: &[&SliceInfo],
    opts: &TranslateOptions,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(Frontend, DesiredService)> {
    let sdiag = |field: &str, message: String| service_diag(svc, field, message);
    let Some(spec) = svc.spec.as_ref() else {
        // No spec means no clusterIP: headless, which kube-proxy skips silently.
        return Vec::new();
    };
    if !is_served(svc, opts) {
        return Vec::new();
    }
    let svc_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIP,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => return Vec::new(),
        Some(other) => {
            diags.push(sdiag(
                "spec.type",
                format!("unknown type {other:?}; treated as ClusterIP"),
            ));
            ServiceType::ClusterIP
        }
    };
    if svc.name.is_empty() {
        diags.push(sdiag(
            "metadata.name",
            "missing name; the service is ignored".to_owned(),
        ));
        return Vec::new();
    }

    let ips = cluster_ips(svc, diags);
    if ips.is_empty() {
        return Vec::new();
    }
    let ports = service_ports(svc, diags);
    if ports.is_empty() {
        return Vec::new();
    }

    let local_only = match spec.internal_traffic_policy() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            diags.push(sdiag(
                "spec.internalTrafficPolicy",
                format!("unknown policy {other:?}; using Cluster"),
            ));
            false
        }
    };
    let affinity = session_affinity(svc, diags);
    let externals = external_frontends(spec, &ips, opts, &sdiag, diags);

    let parsed = parse_slices(slices, diags);
    let mut out = Vec::with_capacity(ips.len() * ports.len());
    for port in &ports {
        let endpoints = endpoints_for_port(&parsed, port);
        // kube-proxy runs one proxier per family: each ClusterIP balances
        // over its own family's endpoints, categorised on their own.
        let (v4, v6): (BTreeMap<_, _>, BTreeMap<_, _>) =
            endpoints.into_iter().partition(|(a, _)| a.is_ipv4());
        let v4_backends = ips
            .iter()
            .any(IpAddr::is_ipv4)
            .then(|| choose_backends(&v4, local_only, opts));
        let v6_backends = ips
            .iter()
            .any(IpAddr::is_ipv6)
            .then(|| choose_backends(&v6, local_only, opts));
        // In-node clients of a node port, an external IP or a load
        // balancer IP reach the cluster-wide endpoints whatever the traffic
        // policies say (see `external_frontends`).
        let loopback: &[IpAddr] = if opts.localhost_node_ports {
            &LOOPBACK
        } else {
            &[]
        };
        let node_port = port.node_port.filter(|_| {
            svc_type != ServiceType::ClusterIP && !(opts.node_ips.is_empty() && loopback.is_empty())
        });
        let external = node_port.is_some() || !externals.is_empty();
        let cluster_v4 = (external && local_only && ips.iter().any(IpAddr::is_ipv4))
            .then(|| choose_backends(&v4, false, opts));
        let cluster_v6 = (external && local_only && ips.iter().any(IpAddr::is_ipv6))
            .then(|| choose_backends(&v6, false, opts));
        let node_frontends = node_port.into_iter().flat_map(|np| {
            opts.node_ips
                .iter()
                .chain(loopback)
                .filter(|node| ips.iter().any(|ip| ip.is_ipv4() == node.is_ipv4()))
                .map(move |node| (*node, np, FrontendKind::NodePort))
        });
        let cluster_frontends = ips
            .iter()
            .map(|ip| (*ip, port.port, FrontendKind::ClusterIP));
        let external_frontends = externals.iter().map(|(ip, kind)| (*ip, port.port, *kind));
        let first = out.len();
        for (ip, number, kind) in cluster_frontends
            .chain(node_frontends)
            .chain(external_frontends)
        {
            let (backends, family) = match (ip.is_ipv4(), kind.is_external() && local_only) {
                (true, false) => (&v4_backends, &v4),
                (false, false) => (&v6_backends, &v6),
                (true, true) => (&cluster_v4, &v4),
                (false, true) => (&cluster_v6, &v6),
            };
            let fe = Frontend {
                addr: SocketAddr::new(ip, number),
                proto: port.proto,
            };
            // One address listed twice (an external IP that is also an
            // ingress IP, or a node address on a port equal to the nodePort).
            if out[first..].iter().any(|(f, _)| *f == fe) {
                continue;
            }
            let mut backends = backends.clone().unwrap_or_default();
            if backends.len() > usize::from(MAX_SLOTS) {
                // The datapath numbers slots with 16 bits; sorted, so the
                // same endpoints are kept on every sync.
                diags.push(sdiag(
                    &format!("spec.ports[{}]", port.index),
                    format!(
                        "{} endpoints for {fe}; only the first {MAX_SLOTS} by address are used",
                        backends.len()
                    ),
                ));
                backends.truncate(usize::from(MAX_SLOTS));
            }
            let spared = spared(family, &backends);
            out.push((
                fe,
                DesiredService {
                    service: ServiceRef {
                        namespace: SmolStr::new(&svc.namespace),
                        name: SmolStr::new(&svc.name),
                        port_name: SmolStr::new(port.name),
                        svc_type,
                        frontend: kind,
                    },
                    backends,
                    affinity,
                    spared,
                },
            ));
        }
    }
    out
}

/// The Service's external IPs and load balancer IPs this node serves, of
/// its ClusterIPs' families (kube-proxy runs one proxier per family), each
/// once, with its kind.
///
/// Which endpoints they get is kube-proxy's rule for traffic that starts
/// on the node: every cluster-wide endpoint (ready, topology hints applied),
/// whatever `externalTrafficPolicy` and `internalTrafficPolicy` say. Its
/// `UsesClusterEndpoints` (pkg/proxy/serviceport.go) keeps the cluster
/// endpoints of every externally accessible port "to implement short
/// circuiting", and the service's external chain sends pod traffic
/// (`localDetector`) and host traffic (`fib saddr type local`) to them
/// before `externalTrafficPolicy: Local` can narrow anything
/// (pkg/proxy/nftables/proxier.go; kubernetes#131765 made nftables mode
/// short-circuit also when the node has no local endpoint, as iptables and
/// IPVS modes did).
fn external_frontends(
    spec: &ServiceSpecInfo,
    ips: &[IpAddr],
    opts: &TranslateOptions,
    sdiag: &dyn Fn(&str, String) -> Diagnostic,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(IpAddr, FrontendKind)> {
    let mut out: Vec<(IpAddr, FrontendKind)> = Vec::new();
    let mut add = |ip: IpAddr, kind| {
        // A v4-mapped address would alias an IPv4 frontend in the maps.
        let ip = ip.to_canonical();
        if ips.iter().any(|c| c.is_ipv4() == ip.is_ipv4()) && !out.iter().any(|(a, _)| *a == ip) {
            out.push((ip, kind));
        }
    };
    for (i, raw) in spec.external_ips().iter().enumerate() {
        match raw.parse::<IpAddr>() {
            Ok(ip) => {
                // CVE-2020-8554: any Service could claim any address.
                let allowed = opts.external_ips == ExternalIps::All
                    || opts.node_ips.contains(&ip.to_canonical());
                if allowed {
                    add(ip, FrontendKind::ExternalIP);
                }
            }
            Err(_) => diags.push(sdiag(
                &format!("spec.externalIPs[{i}]"),
                format!("{raw:?} is not an IP address; not served"),
            )),
        }
    }
    for (i, ingress) in spec.lb_ingress().iter().enumerate() {
        if ingress.ip.is_empty() {
            continue;
        }
        match ingress.ip_mode.as_deref() {
            None | Some("VIP") => {}
            // The load balancer must see this traffic itself (KEP-1860).
            Some("Proxy") => continue,
            Some(other) => {
                diags.push(sdiag(
                    &format!("status.loadBalancer.ingress[{i}].ipMode"),
                    format!("unknown mode {other:?} (VIP or Proxy); not served"),
                ));
                continue;
            }
        }
        match ingress.ip.parse::<IpAddr>() {
            Ok(ip) => add(ip, FrontendKind::LoadBalancer),
            Err(_) => diags.push(sdiag(
                &format!("status.loadBalancer.ingress[{i}].ip"),
                format!("{:?} is not an IP address; not served", ingress.ip),
            )),
        }
    }
    out
}

/// The endpoints still serving (ready counts as serving) that `backends`
/// leaves out, in address order.
fn spared(
    endpoints: &BTreeMap<SocketAddr, ParsedEndpoint<'_>>,
    backends: &[SocketAddr],
) -> Vec<SocketAddr> {
    endpoints
        .iter()
        .filter(|(a, e)| (e.ep.serving || e.ep.ready) && backends.binary_search(a).is_err())
        .map(|(a, _)| *a)
        .collect()
}

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset: the API
/// server's default (three hours).
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// The largest timeout the API server accepts (a day).
const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

/// The session affinity timeout of every frontend of the Service (0: none),
/// as kube-proxy takes it. A setting the API server would refuse is
/// reported and the Service served without affinity: balancing without
/// stickiness is closer to what was meant than not serving at all.
fn session_affinity(svc: &ServiceInfo, diags: &mut Vec<Diagnostic>) -> u32 {
    let Some(spec) = svc.spec.as_ref() else {
        return 0;
    };
    match spec.session_affinity() {
        // The API server defaults an empty value to None.
        None | Some("" | "None") => 0,
        Some("ClientIP") => match spec.session_affinity_timeout() {
            None => DEFAULT_AFFINITY_TIMEOUT,
            Some(t) => match u32::try_from(t) {
                Ok(secs @ 1..=MAX_AFFINITY_TIMEOUT) => secs,
                _ => {
                    diags.push(service_diag(
                        svc,
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!(
                            "timeout {t} is outside 1-{MAX_AFFINITY_TIMEOUT} seconds; served without session affinity"
                        ),
                    ));
                    0
                }
            },
        },
        Some(other) => {
            diags.push(service_diag(
                svc,
                "spec.sessionAffinity",
                format!(
                    "unknown session affinity {other:?} (only None and ClientIP); served without session affinity"
                ),
            ));
            0
        }
    }
}

/// kube-proxy's informer label selector: no headless label, and the proxy
/// name label absent (default) or equal to ours.
fn is_served(svc: &ServiceInfo, opts: &TranslateOptions) -> bool {
    !svc.headless_label && svc.proxy_name.as_deref() == opts.service_proxy_name.as_deref()
}

/// The ClusterIPs to serve, of both families. Empty for headless services
/// (silently); bad ones are reported each.
fn cluster_ips(svc: &ServiceInfo, diags: &mut Vec<Diagnostic>) -> Vec<IpAddr> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let sdiag = |field: &str, message: String| service_diag(svc, field, message);
    let is_none = |s: &str| s.is_empty() || s == "None";
    // `clusterIPs` wins when set; `["None"]` there is just the headless marker.
    let list: Vec<(String, &str)> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() && !matches!(ips, [only] if is_none(only)) => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        _ => match spec.cluster_ip.as_deref() {
            Some(ip) if !is_none(ip) => vec![("spec.clusterIP".to_owned(), ip)],
            _ => return Vec::new(),
        },
    };

    let mut out: Vec<IpAddr> = Vec::with_capacity(list.len());
    for (field, raw) in list {
        match raw.parse::<IpAddr>() {
            // The maps keep IPv4 in this form: it would alias an IPv4 service.
            Ok(IpAddr::V6(ip)) if ip.to_ipv4_mapped().is_some() => diags.push(sdiag(
                &field,
                format!("{ip} is an IPv4-mapped address, not a ClusterIP; skipped"),
            )),
            Ok(ip) => {
                if out.contains(&ip) {
                    diags.push(sdiag(&field, format!("duplicate ClusterIP {ip}; skipped")));
                } else {
                    out.push(ip);
                }
            }
            Err(_) => diags.push(sdiag(
                &field,
                format!("{raw:?} is not an IP address; skipped"),
            )),
        }
    }
    out
}

/// Valid, distinct (port, protocol) pairs; each bad one is reported and skipped.
fn service_ports<'a>(svc: &'a ServiceInfo, diags: &mut Vec<Diagnostic>) -> Vec<PortSpec<'a>> {
    let ports = svc.spec.as_ref().map_or(&[][..], |s| &s.ports[..]);
    let sdiag = |field: &str, message: String| service_diag(svc, field, message);
    let mut out: Vec<PortSpec<'a>> = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let proto = match parse_proto(p.protocol.as_deref()) {
            Ok(proto) => Some(proto),
            Err(raw) => {
                diags.push(sdiag(
                    &format!("spec.ports[{i}].protocol"),
                    format!("protocol {raw} is not supported (only TCP and UDP); port skipped"),
                ));
                None
            }
        };
        let number = match u16::try_from(p.port) {
            Ok(n) if n != 0 => Some(n),
            _ => {
                diags.push(sdiag(
                    &format!("spec.ports[{i}].port"),
                    format!("port {} is outside 1-65535; skipped", p.port),
                ));
                None
            }
        };
        let (Some(proto), Some(port)) = (proto, number) else {
            continue;
        };
        if let Some(first) = out.iter().find(|o| o.port == port && o.proto == proto) {
            diags.push(sdiag(
                &format!("spec.ports[{i}]"),
                format!(
                    "{port}/{proto} is already defined by spec.ports[{}]; skipped",
                    first.index
                ),
            ));
            continue;
        }
        let node_port = match p.node_port {
            0 => None,
            n => match u16::try_from(n) {
                Ok(n) => Some(n),
                Err(_) => {
                    diags.push(sdiag(
                        &format!("spec.ports[{i}].nodePort"),
                        format!("node port {n} is outside 1-65535; not served on node addresses"),
                    ));
                    None
                }
            },
        };
        out.push(PortSpec {
            index: i,
            port,
            proto,
            name: &p.name,
            node_port,
        });
    }
    out
}

/// Kubernetes' default protocol is TCP; anything but TCP/UDP is returned as the error.
pub(super) fn parse_proto(raw: Option<&str>) -> Result<Proto, &str> {
    match raw {
        None | Some("TCP") => Ok(Proto::Tcp),
        Some("UDP") => Ok(Proto::Udp),
        Some(other) => Err(other),
    }
}

/// Keeps IPv4 and IPv6 slices (FQDN ones are for other consumers, as in
/// kube-proxy), in the given (name) order so deduplication is deterministic.
fn parse_slices<'a>(slices: &[&'a SliceInfo], diags: &mut Vec<Diagnostic>) -> Vec<ParsedSlice<'a>> {
    slices
        .iter()
        .filter(|s| s.family.is_some())
        .map(|slice| ParsedSlice {
            slice,
            endpoints: parse_endpoints(slice, diags),
        })
        .collect()
}

fn parse_endpoints<'a>(
    slice: &'a SliceInfo,
    diags: &mut Vec<Diagnostic>,
) -> Vec<ParsedEndpoint<'a>> {
    let family = slice.family.map_or("", |f| f.as_str());
    let mut out = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let edig = |field: String, message: String| {
            diag(
                "EndpointSlice",
                &slice.namespace,
                &slice.name,
                &slice.source,
                &field,
                message,
            )
        };
        match &ep.address {
            Address::Ip(ip) => out.push(ParsedEndpoint {
                ip: *ip,
                ep,
                node: slice.node_of(ep),
                hints: slice.hints(i),
            }),
            // kube-proxy uses only the first address.
            Address::Missing => diags.push(edig(
                format!("endpoints[{i}].addresses"),
                "no address; endpoint skipped".to_owned(),
            )),
            Address::Invalid => diags.push(edig(
                format!("endpoints[{i}].addresses[0]"),
                format!(
                    "{:?} is not an {family} address; endpoint skipped",
                    slice.invalid_text(i)
                ),
            )),
        }
    }
    out
}

/// Endpoints of one service port, keyed (and so deduplicated and sorted) by
/// address. The port number comes from each slice, since a named targetPort
/// may resolve differently per slice.
fn endpoints_for_port<'a>(
    slices: &[ParsedSlice<'a>],
    port: &PortSpec<'_>,
) -> BTreeMap<SocketAddr, ParsedEndpoint<'a>> {
    let mut out: BTreeMap<SocketAddr, ParsedEndpoint<'a>> = BTreeMap::new();
    for ps in slices {
        let Some(number) = slice_port(ps.slice, port) else {
            continue;
        };
        for ep in &ps.endpoints {
            let addr = SocketAddr::new(ep.ip, number);
            let replace = out
                .get(&addr)
                .is_none_or(|existing| existing.ep.terminating && !ep.ep.terminating);
            if replace {
                out.insert(addr, *ep);
            }
        }
    }
    out
}

/// The slice's number for a service port, joined on (name, protocol).
/// A nil, 0 or out-of-range number makes the slice port unusable.
fn slice_port(slice: &SliceInfo, port: &PortSpec<'_>) -> Option<u16> {
    slice
        .ports
        .iter()
        .find(|p| p.name == port.name && p.proto == port.proto)
        .and_then(|p| p.port)
}

/// kube-proxy's `CategorizeEndpoints`, for in-cluster (ClusterIP) traffic.
fn choose_backends(
    endpoints: &BTreeMap<SocketAddr, ParsedEndpoint<'_>>,
    local_only: bool,
    opts: &TranslateOptions,
) -> Vec<SocketAddr> {
    let pick_where = |f: &dyn Fn(&ParsedEndpoint<'_>) -> bool| -> Vec<SocketAddr> {
        endpoints
            .iter()
            .filter(|(_, e)| f(e))
            .map(|(a, _)| *a)
            .collect()
    };
    let pick = |f: &dyn Fn(&EndpointInfo) -> bool| pick_where(&|e| f(e.ep));
    let fallback = |e: &EndpointInfo| e.serving && e.terminating;

    if local_only {
        let node = opts.node_name.as_deref();
        let is_local = |e: &ParsedEndpoint<'_>| node.is_some() && e.node == node;
        let ready = pick_where(&|e| e.ep.ready && is_local(e));
        if !ready.is_empty() {
            return ready;
        }
        return pick_where(&|e| fallback(e.ep) && is_local(e));
    }

    let ready = match topology_filter(endpoints, opts) {
        None => pick(&|e| e.ready),
        Some(Hint::Node(node)) => {
            pick_where(&|e| e.ep.ready && e.for_nodes().iter().any(|n| n == node))
        }
        Some(Hint::Zone(zone)) => {
            pick_where(&|e| e.ep.ready && e.for_zones().iter().any(|z| z == zone))
        }
    };
    if !ready.is_empty() {
        return ready;
    }
    pick(&fallback)
}

enum Hint<'a> {
    Node(&'a str),
    Zone(&'a str),
}

/// kube-proxy's `topologyModeFromHints`: all-or-nothing over the ready
/// endpoints, so one endpoint without hints disables filtering (no client
/// can be starved by a half-rolled-out hint set).
fn topology_filter<'o>(
    endpoints: &BTreeMap<SocketAddr, ParsedEndpoint<'_>>,
    opts: &'o TranslateOptions,
) -> Option<Hint<'o>> {
    let ready: Vec<&ParsedEndpoint<'_>> = endpoints.values().filter(|e| e.ep.ready).collect();
    if ready.is_empty() {
        return None;
    }
    if let Some(node) = opts.node_name.as_deref() {
        let all = ready.iter().all(|e| !e.for_nodes().is_empty());
        if all
            && ready
                .iter()
                .any(|e| e.for_nodes().iter().any(|n| n == node))
        {
            return Some(Hint::Node(node));
        }
    }
    if let Some(zone) = opts.zone.as_deref() {
        let all = ready.iter().all(|e| !e.for_zones().is_empty());
        if all
            && ready
                .iter()
                .any(|e| e.for_zones().iter().any(|z| z == zone))
        {
            return Some(Hint::Zone(zone));
        }
    }
    None
}

/// A problem with `field` of the Service `svc`.
fn service_diag(svc: &ServiceInfo, field: &str, message: String) -> Diagnostic {
    diag(
        "Service",
        &svc.namespace,
        &svc.name,
        &svc.source,
        field,
        message,
    )
}

pub(super) fn diag(
    kind: &str,
    namespace: &str,
    name: &str,
    source: &str,
    field: &str,
    message: String,
) -> Diagnostic {
    Diagnostic {
        source: source.to_owned(),
        object: format!("{kind} {namespace}/{name}"),
        field: field.to_owned(),
        message,
        severity: Default::default(),
    }
}
