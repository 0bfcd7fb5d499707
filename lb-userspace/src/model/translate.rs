//! Services + EndpointSlices → desired frontends, with kube-proxy's rules
//! (`pkg/proxy/endpointslicecache.go`, `pkg/proxy/topology.go`,
//! `ShouldSkipService`).
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::{
    api::{
        core::v1::Service,
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{
    DesiredService, DesiredState, Diagnostic, Frontend, Proto, SOURCE_ANNOTATION, ServiceRef,
    ServiceType, TranslateOptions,
};

#[cfg(test)]
mod tests;

use super::labels::{
    HEADLESS as HEADLESS_LABEL, SERVICE_NAME as SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME as PROXY_NAME_LABEL,
};

/// Pure: the same objects always give the same state, whatever their order.
///
/// Services are visited in (namespace, name) order so that, when two claim
/// the same frontend, the winner does not depend on input order.
pub fn translate(
    services: &[Service],
    slices: &[EndpointSlice],
    opts: &TranslateOptions,
) -> (DesiredState, Vec<Diagnostic>) {
    let mut diags = Vec::new();

    // Index once so each service finds its slices in O(1).
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    let mut unlabelled: Vec<&EndpointSlice> = Vec::new();
    for slice in slices {
        match service_name_label(&slice.metadata) {
            Some(svc) => by_service
                .entry((namespace_of(&slice.metadata), svc))
                .or_default()
                .push(slice),
            None => unlabelled.push(slice),
        }
    }
    // Sorted so that diagnostics come out in the same order whatever the input order.
    unlabelled.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));
    for slice in unlabelled {
        diags.push(diag(
            &slice.metadata,
            "EndpointSlice",
            "metadata.labels",
            format!("missing label {SERVICE_NAME_LABEL}; the slice is ignored"),
        ));
    }

    let mut ordered: Vec<&Service> = services.iter().collect();
    ordered.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));

    let mut state = DesiredState::new();
    // Frontend → the (namespace, name) that won it, for the loser's diagnostic.
    let mut owners: HashMap<Frontend, (&str, &str)> = HashMap::new();
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    for svc in ordered {
        let key = object_key(&svc.metadata);
        if !seen.insert(key) {
            diags.push(diag(
                &svc.metadata,
                "Service",
                "",
                "duplicate object with the same namespace and name; only the first is used"
                    .to_owned(),
            ));
            continue;
        }
        let own = by_service.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        for (fe, desired) in translate_service(svc, own, opts, &mut diags) {
            if let Some((wns, wname)) = owners.get(&fe) {
                diags.push(diag(
                    &svc.metadata,
                    "Service",
                    &port_field(svc, &fe),
                    format!("frontend {fe} is already served by Service {wns}/{wname}; skipped"),
                ));
                continue;
            }
            owners.insert(fe, key);
            state.insert(fe, desired);
        }
    }
    (state, diags)
}

/// One service's frontends, for incremental recomputation. `slices` should be
/// this service's slices; any other slice is ignored. Frontends another
/// service also claims are not resolved here: that needs the whole set
/// (see [`translate`]).
pub fn translate_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    opts: &TranslateOptions,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(Frontend, DesiredService)> {
    let ns = namespace_of(&svc.metadata);
    let name = svc.metadata.name.as_deref().unwrap_or("");
    let own: Vec<&EndpointSlice> = slices
        .iter()
        .copied()
        .filter(|s| {
            namespace_of(&s.metadata) == ns && service_name_label(&s.metadata) == Some(name)
        })
        .collect();
    service_frontends(svc, &own, opts, diags)
}

/// The field of the service port a frontend came from. Later duplicates of a
/// (port, protocol) were dropped, so the first match is the one that was used.
/// (Also used by the API source for the same diagnostic, found incrementally.)
pub fn port_field(svc: &Service, fe: &Frontend) -> String {
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or(&[]);
    ports
        .iter()
        .position(|p| {
            p.port == i32::from(fe.addr.port())
                && parse_proto(p.protocol.as_deref()) == Ok(fe.proto)
        })
        .map(|i| format!("spec.ports[{i}]"))
        .unwrap_or_default()
}

/// A service port that survived validation.
struct PortSpec<'a> {
    index: usize,
    port: u16,
    proto: Proto,
    name: &'a str,
}

/// An endpoint address with its conditions resolved (nil ready/serving count
/// as true, nil terminating as false).
#[derive(Clone, Copy)]
struct ParsedEndpoint<'a> {
    ip: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    ep: &'a Endpoint,
}

/// One usable (IPv4 or IPv6) slice with its endpoints parsed once for all ports.
struct ParsedSlice<'a> {
    slice: &'a EndpointSlice,
    endpoints: Vec<ParsedEndpoint<'a>>,
}

fn service_frontends(
    svc: &Service,
    slices: &[&EndpointSlice],
    opts: &TranslateOptions,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(Frontend, DesiredService)> {
    let meta = &svc.metadata;
    let Some(spec) = svc.spec.as_ref() else {
        // No spec means no clusterIP: headless, which kube-proxy skips silently.
        return Vec::new();
    };
    if !is_served(meta, opts) {
        return Vec::new();
    }
    let svc_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIP,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => return Vec::new(),
        Some(other) => {
            diags.push(diag(
                meta,
                "Service",
                "spec.type",
                format!("unknown type {other:?}; treated as ClusterIP"),
            ));
            ServiceType::ClusterIP
        }
    };
    let Some(name) = meta.name.as_deref().filter(|n| !n.is_empty()) else {
        diags.push(diag(
            meta,
            "Service",
            "metadata.name",
            "missing name; the service is ignored".to_owned(),
        ));
        return Vec::new();
    };

    let ips = cluster_ips(svc, diags);
    if ips.is_empty() {
        return Vec::new();
    }
    let ports = service_ports(svc, diags);
    if ports.is_empty() {
        return Vec::new();
    }

    let local_only = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            diags.push(diag(
                meta,
                "Service",
                "spec.internalTrafficPolicy",
                format!("unknown policy {other:?}; using Cluster"),
            ));
            false
        }
    };

    let parsed = parse_slices(slices, diags);
    let ns = namespace_of(meta);
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
        for ip in &ips {
            let backends = if ip.is_ipv4() {
                &v4_backends
            } else {
                &v6_backends
            };
            out.push((
                Frontend {
                    addr: SocketAddr::new(*ip, port.port),
                    proto: port.proto,
                },
                DesiredService {
                    service: ServiceRef {
                        namespace: ns.to_owned(),
                        name: name.to_owned(),
                        port_name: port.name.to_owned(),
                        svc_type,
                    },
                    backends: backends.clone().unwrap_or_default(),
                },
            ));
        }
    }
    out
}

/// kube-proxy's informer label selector: no headless label, and the proxy
/// name label absent (default) or equal to ours.
fn is_served(meta: &ObjectMeta, opts: &TranslateOptions) -> bool {
    let labels = meta.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    if label(HEADLESS_LABEL).is_some() {
        return false;
    }
    label(PROXY_NAME_LABEL) == opts.service_proxy_name.as_deref()
}

/// The ClusterIPs to serve, of both families. Empty for headless services
/// (silently); bad ones are reported each.
fn cluster_ips(svc: &Service, diags: &mut Vec<Diagnostic>) -> Vec<IpAddr> {
    let meta = &svc.metadata;
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
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
            Ok(IpAddr::V6(ip)) if ip.to_ipv4_mapped().is_some() => diags.push(diag(
                meta,
                "Service",
                &field,
                format!("{ip} is an IPv4-mapped address, not a ClusterIP; skipped"),
            )),
            Ok(ip) => {
                if out.contains(&ip) {
                    diags.push(diag(
                        meta,
                        "Service",
                        &field,
                        format!("duplicate ClusterIP {ip}; skipped"),
                    ));
                } else {
                    out.push(ip);
                }
            }
            Err(_) => diags.push(diag(
                meta,
                "Service",
                &field,
                format!("{raw:?} is not an IP address; skipped"),
            )),
        }
    }
    out
}

/// Valid, distinct (port, protocol) pairs; each bad one is reported and skipped.
fn service_ports<'a>(svc: &'a Service, diags: &mut Vec<Diagnostic>) -> Vec<PortSpec<'a>> {
    let meta = &svc.metadata;
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or(&[]);
    let mut out: Vec<PortSpec<'a>> = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let proto = match parse_proto(p.protocol.as_deref()) {
            Ok(proto) => Some(proto),
            Err(raw) => {
                diags.push(diag(
                    meta,
                    "Service",
                    &format!("spec.ports[{i}].protocol"),
                    format!("protocol {raw} is not supported (only TCP and UDP); port skipped"),
                ));
                None
            }
        };
        let number = match u16::try_from(p.port) {
            Ok(n) if n != 0 => Some(n),
            _ => {
                diags.push(diag(
                    meta,
                    "Service",
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
            diags.push(diag(
                meta,
                "Service",
                &format!("spec.ports[{i}]"),
                format!(
                    "{port}/{proto} is already defined by spec.ports[{}]; skipped",
                    first.index
                ),
            ));
            continue;
        }
        out.push(PortSpec {
            index: i,
            port,
            proto,
            name: p.name.as_deref().unwrap_or(""),
        });
    }
    out
}

/// Kubernetes' default protocol is TCP; anything but TCP/UDP is returned as the error.
fn parse_proto(raw: Option<&str>) -> Result<Proto, &str> {
    match raw {
        None | Some("TCP") => Ok(Proto::Tcp),
        Some("UDP") => Ok(Proto::Udp),
        Some(other) => Err(other),
    }
}

/// Keeps IPv4 and IPv6 slices (FQDN ones are for other consumers, as in
/// kube-proxy), in namespace/name order so deduplication is deterministic.
fn parse_slices<'a>(
    slices: &[&'a EndpointSlice],
    diags: &mut Vec<Diagnostic>,
) -> Vec<ParsedSlice<'a>> {
    let mut ip: Vec<&'a EndpointSlice> = slices
        .iter()
        .copied()
        .filter(|s| s.address_type == "IPv4" || s.address_type == "IPv6")
        .collect();
    ip.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));
    ip.into_iter()
        .map(|slice| ParsedSlice {
            slice,
            endpoints: parse_endpoints(slice, diags),
        })
        .collect()
}

fn parse_endpoints<'a>(
    slice: &'a EndpointSlice,
    diags: &mut Vec<Diagnostic>,
) -> Vec<ParsedEndpoint<'a>> {
    let meta = &slice.metadata;
    let mut out = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        // kube-proxy uses only the first address.
        let Some(raw) = ep.addresses.first() else {
            diags.push(diag(
                meta,
                "EndpointSlice",
                &format!("endpoints[{i}].addresses"),
                "no address; endpoint skipped".to_owned(),
            ));
            continue;
        };
        // Each address must be of the slice's type; a v4-mapped IPv6 address
        // would alias an IPv4 backend in the maps.
        let ip = match (slice.address_type.as_str(), raw.parse::<IpAddr>()) {
            ("IPv4", Ok(ip @ IpAddr::V4(_))) => ip,
            ("IPv6", Ok(IpAddr::V6(v6))) if v6.to_ipv4_mapped().is_none() => IpAddr::V6(v6),
            (family, _) => {
                diags.push(diag(
                    meta,
                    "EndpointSlice",
                    &format!("endpoints[{i}].addresses[0]"),
                    format!("{raw:?} is not an {family} address; endpoint skipped"),
                ));
                continue;
            }
        };
        let cond = ep.conditions.as_ref();
        out.push(ParsedEndpoint {
            ip,
            ready: cond.and_then(|c| c.ready) != Some(false),
            serving: cond.and_then(|c| c.serving) != Some(false),
            terminating: cond.and_then(|c| c.terminating) == Some(true),
            ep,
        });
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
                .is_none_or(|existing| existing.terminating && !ep.terminating);
            if replace {
                out.insert(addr, *ep);
            }
        }
    }
    out
}

/// The slice's number for a service port, joined on (name, protocol).
/// A nil, 0 or out-of-range number makes the slice port unusable.
fn slice_port(slice: &EndpointSlice, port: &PortSpec<'_>) -> Option<u16> {
    slice
        .ports
        .as_deref()?
        .iter()
        .find(|p| {
            p.name.as_deref().unwrap_or("") == port.name
                && parse_proto(p.protocol.as_deref()) == Ok(port.proto)
        })
        .and_then(|p| p.port)
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n != 0)
}

/// kube-proxy's `CategorizeEndpoints`, for in-cluster (ClusterIP) traffic.
fn choose_backends(
    endpoints: &BTreeMap<SocketAddr, ParsedEndpoint<'_>>,
    local_only: bool,
    opts: &TranslateOptions,
) -> Vec<SocketAddr> {
    let pick = |f: &dyn Fn(&ParsedEndpoint<'_>) -> bool| -> Vec<SocketAddr> {
        endpoints
            .iter()
            .filter(|(_, e)| f(e))
            .map(|(a, _)| *a)
            .collect()
    };
    let fallback = |e: &ParsedEndpoint<'_>| e.serving && e.terminating;

    if local_only {
        let node = opts.node_name.as_deref();
        let is_local = |e: &ParsedEndpoint<'_>| node.is_some() && e.ep.node_name.as_deref() == node;
        let ready = pick(&|e| e.ready && is_local(e));
        if !ready.is_empty() {
            return ready;
        }
        return pick(&|e| fallback(e) && is_local(e));
    }

    let ready = match topology_filter(endpoints, opts) {
        None => pick(&|e| e.ready),
        Some(Hint::Node(node)) => pick(&|e| e.ready && hinted_nodes(e).any(|n| n == node)),
        Some(Hint::Zone(zone)) => pick(&|e| e.ready && hinted_zones(e).any(|z| z == zone)),
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
    let ready: Vec<&ParsedEndpoint<'_>> = endpoints.values().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return None;
    }
    if let Some(node) = opts.node_name.as_deref() {
        let all = ready.iter().all(|e| hinted_nodes(e).next().is_some());
        if all && ready.iter().any(|e| hinted_nodes(e).any(|n| n == node)) {
            return Some(Hint::Node(node));
        }
    }
    if let Some(zone) = opts.zone.as_deref() {
        let all = ready.iter().all(|e| hinted_zones(e).next().is_some());
        if all && ready.iter().any(|e| hinted_zones(e).any(|z| z == zone)) {
            return Some(Hint::Zone(zone));
        }
    }
    None
}

fn hinted_nodes<'a>(e: &ParsedEndpoint<'a>) -> impl Iterator<Item = &'a str> {
    e.ep.hints
        .as_ref()
        .and_then(|h| h.for_nodes.as_deref())
        .unwrap_or(&[])
        .iter()
        .map(|n| n.name.as_str())
}

fn hinted_zones<'a>(e: &ParsedEndpoint<'a>) -> impl Iterator<Item = &'a str> {
    e.ep.hints
        .as_ref()
        .and_then(|h| h.for_zones.as_deref())
        .unwrap_or(&[])
        .iter()
        .map(|z| z.name.as_str())
}

/// Objects without a namespace are taken as `default`, as kubectl would.
fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
}

fn object_key(meta: &ObjectMeta) -> (&str, &str) {
    (namespace_of(meta), meta.name.as_deref().unwrap_or(""))
}

fn service_name_label(meta: &ObjectMeta) -> Option<&str> {
    meta.labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

fn diag(meta: &ObjectMeta, kind: &str, field: &str, message: String) -> Diagnostic {
    let (ns, name) = object_key(meta);
    Diagnostic {
        source: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_ANNOTATION))
            .cloned()
            .unwrap_or_default(),
        object: format!("{kind} {ns}/{name}"),
        field: field.to_owned(),
        message,
        severity: Default::default(),
    }
}
