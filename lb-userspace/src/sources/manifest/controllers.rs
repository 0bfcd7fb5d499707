//! What a cluster's controllers would write: EndpointSlices for selector
//! Services (from Pods) and mirrored ones for selectorless Services (from
//! Endpoints). Modelled on kube-controller-manager's `endpointslice` and
//! `endpointslicemirroring` controllers.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::{
        core::v1::{Container, EndpointAddress, Endpoints, ObjectReference, Pod, ServicePort},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::{
    Allocated, FamilyIps, IpFamily, Sourced, diag, fnv1a, name_of, namespace_of, set_source,
    slim::SlimService,
};
use crate::model::{
    Diagnostic,
    labels::{HEADLESS as HEADLESS_LABEL, SERVICE_NAME as SERVICE_NAME_LABEL},
};

const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
const MANAGED_BY: &str = "lb-agent";
const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";

/// Slices for `services` from `pods` and `endpoints`. `given` names the
/// hand-written slices (namespace, name), so derived ones never shadow them.
pub(super) fn derive_slices<'g>(
    services: &[Allocated],
    pods: &[Sourced<Pod>],
    endpoints: &[Sourced<Endpoints>],
    given: impl IntoIterator<Item = (&'g str, &'g str)>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<EndpointSlice> {
    let mut names = SliceNames(
        given
            .into_iter()
            .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
            .collect(),
    );
    let index = PodIndex::new(pods, diags);
    let mut out = Vec::new();
    for svc in services {
        if let Some(selector) = selector_of(&svc.svc.obj) {
            from_pods(svc, selector, &index, &mut names, &mut out, diags);
        }
    }

    let by_key: HashMap<(&str, &str), &Allocated> = services
        .iter()
        .map(|s| {
            let meta = &s.svc.obj.metadata;
            ((namespace_of(meta), name_of(meta)), s)
        })
        .collect();
    for ep in endpoints {
        let (ns, name) = (namespace_of(&ep.obj.metadata), name_of(&ep.obj.metadata));
        let Some(svc) = by_key.get(&(ns, name)) else {
            diags.push(diag(
                ep.source.clone(),
                format!("Endpoints {ns}/{name}"),
                "",
                format!("no Service {ns}/{name}; Endpoints are only used for a selectorless Service of the same name; ignored"),
            ));
            continue;
        };
        // The Service's own controller owns these Endpoints; a cluster does not mirror them.
        let skip = ep
            .obj
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SKIP_MIRROR_LABEL))
            .is_some_and(|v| v == "true");
        if selector_of(&svc.svc.obj).is_none() && !skip {
            mirror(ep, svc, &mut names, diags, &mut out);
        }
    }
    out
}

/// A non-empty selector on a Service the endpoint controller serves. An empty
/// map is no selector: the API server stores it as absent.
fn selector_of(svc: &SlimService) -> Option<&BTreeMap<String, String>> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    spec.selector.as_ref().filter(|s| !s.is_empty())
}

/// A Pod that can be an endpoint, with what the controller derives from it.
struct PodInfo<'a> {
    pod: &'a Pod,
    /// At least one.
    ips: FamilyIps,
    ready: bool,
    terminating: bool,
}

/// Pods per namespace and per label pair, so matching a selector costs the
/// smallest matching label set rather than every Pod.
struct PodIndex<'a> {
    namespaces: HashMap<&'a str, NamespacePods<'a>>,
}

#[derive(Default)]
struct NamespacePods<'a> {
    /// Sorted by name, so endpoints come out in a stable order.
    pods: Vec<PodInfo<'a>>,
    /// (key, value) → indices into `pods`, ascending.
    by_label: HashMap<(&'a str, &'a str), Vec<usize>>,
}

impl<'a> PodIndex<'a> {
    fn new(pods: &'a [Sourced<Pod>], diags: &mut Vec<Diagnostic>) -> Self {
        let mut usable: Vec<(&'a str, &'a str, PodInfo<'a>)> = pods
            .iter()
            .filter_map(|p| pod_info(p, diags))
            .map(|info| {
                let m = &info.pod.metadata;
                (namespace_of(m), name_of(m), info)
            })
            .collect();
        usable.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let mut namespaces: HashMap<&'a str, NamespacePods<'a>> = HashMap::new();
        for (ns, _, info) in usable {
            let entry = namespaces.entry(ns).or_default();
            let idx = entry.pods.len();
            for (k, v) in info.pod.metadata.labels.iter().flatten() {
                entry
                    .by_label
                    .entry((k.as_str(), v.as_str()))
                    .or_default()
                    .push(idx);
            }
            entry.pods.push(info);
        }
        Self { namespaces }
    }

    fn select(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<&PodInfo<'a>> {
        let Some(ns) = self.namespaces.get(namespace) else {
            return Vec::new();
        };
        let mut smallest: Option<&Vec<usize>> = None;
        for (k, v) in selector {
            let Some(list) = ns.by_label.get(&(k.as_str(), v.as_str())) else {
                return Vec::new();
            };
            if smallest.is_none_or(|s| list.len() < s.len()) {
                smallest = Some(list);
            }
        }
        let Some(candidates) = smallest else {
            return Vec::new();
        };
        candidates
            .iter()
            .filter_map(|&i| ns.pods.get(i))
            .filter(|p| {
                let labels = p.pod.metadata.labels.as_ref();
                selector
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            })
            .collect()
    }
}

/// `None` for Pods that are never endpoints: finished, without an address,
/// or with an invalid one.
///
/// The addresses are the API server's view of `status`: `podIPs`, or
/// `[podIP]` when `podIPs` is empty or does not start with `podIP` (the
/// API server's conversion makes `podIP` win then), at most one per family.
fn pod_info<'a>(p: &'a Sourced<Pod>, diags: &mut Vec<Diagnostic>) -> Option<PodInfo<'a>> {
    let pod = &p.obj;
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let object = || {
        format!(
            "Pod {}/{}",
            namespace_of(&pod.metadata),
            name_of(&pod.metadata)
        )
    };
    let listed: Vec<(String, &str)> = status
        .pod_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| (format!("status.podIPs[{i}].ip"), p.ip.as_str()))
        .filter(|(_, ip)| !ip.is_empty())
        .collect();
    let candidates = match status.pod_ip.as_deref().filter(|ip| !ip.is_empty()) {
        None => listed,
        Some(ip) => {
            let single = vec![("status.podIP".to_owned(), ip)];
            match listed.first() {
                None => single,
                Some((_, first)) if *first == ip => {
                    let mut all = single;
                    all.extend(listed.into_iter().skip(1));
                    all
                }
                Some((field, first)) => {
                    diags.push(diag(
                        p.source.clone(),
                        object(),
                        field.clone(),
                        format!(
                            "{first:?} differs from status.podIP {ip:?}; status.podIP wins and status.podIPs is ignored, as in the API server"
                        ),
                    ));
                    single
                }
            }
        }
    };
    let mut ips = FamilyIps::default();
    for (field, text) in candidates {
        let problem = match text.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => {
                format!("{text:?} is an IPv4-mapped IPv6 address, not a pod IP")
            }
            Ok(ip) if ips.get(IpFamily::of(ip)).is_some() => {
                format!(
                    "{text:?}: at most one IP per family (status.podIPs); another {} address came first",
                    IpFamily::of(ip)
                )
            }
            Ok(ip) => {
                ips.set(ip);
                continue;
            }
            Err(_) => format!("{text:?} is not an IP address"),
        };
        diags.push(diag(
            p.source.clone(),
            object(),
            field,
            format!("{problem}; the pod is not an endpoint"),
        ));
        return None;
    }
    if ips.is_empty() {
        return None;
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    Some(PodInfo {
        pod,
        ips,
        ready,
        terminating: pod.metadata.deletion_timestamp.is_some(),
    })
}

/// The address types the endpointslice controller writes for `svc`
/// (`GetAddressTypesForService`): its `ipFamilies`; without them the
/// ClusterIP's family, and both for a headless service.
fn address_types(svc: &Allocated) -> Vec<IpFamily> {
    let Some(spec) = svc.svc.obj.spec.as_ref() else {
        return vec![IpFamily::V4, IpFamily::V6];
    };
    let mut families: Vec<IpFamily> = Vec::new();
    let written = spec
        .ip_families()
        .into_iter()
        .flatten()
        .filter_map(|f| IpFamily::parse(f));
    let listed: Vec<IpFamily> = match &svc.filled {
        Some(filled) => filled.families.clone(),
        None => written.collect(),
    };
    for f in listed {
        if !families.contains(&f) {
            families.push(f);
        }
    }
    if !families.is_empty() {
        return families;
    }
    match svc.cluster_ip() {
        Some(ip) if !ip.is_empty() && ip != "None" => {
            let v6 = ip.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6());
            vec![if v6 { IpFamily::V6 } else { IpFamily::V4 }]
        }
        _ => vec![IpFamily::V4, IpFamily::V6],
    }
}

/// A resolved endpoint port; ordered so groups come out deterministically.
type PortKey = (String, i32, String, Option<String>);

/// The endpointslice controller: one slice per address type of the service
/// and distinct resolved port list, with each Pod's address of that type.
fn from_pods(
    allocated: &Allocated,
    selector: &BTreeMap<String, String>,
    index: &PodIndex<'_>,
    names: &mut SliceNames,
    out: &mut Vec<EndpointSlice>,
    diags: &mut Vec<Diagnostic>,
) {
    let svc = &allocated.svc;
    let meta = &svc.obj.metadata;
    let (ns, name) = (namespace_of(meta), name_of(meta));
    let Some(spec) = svc.obj.spec.as_ref() else {
        return;
    };
    let publish = spec.publish_not_ready_addresses().unwrap_or(false);
    let svc_ports = spec.ports.as_deref().unwrap_or_default();
    let selected: Vec<(&PodInfo<'_>, Vec<PortKey>)> = index
        .select(ns, selector)
        .into_iter()
        .map(|info| (info, pod_ports(info.pod, svc_ports)))
        .collect();
    unresolved_named_ports(svc, svc_ports, &selected, diags);
    for family in address_types(allocated) {
        let mut groups: BTreeMap<Vec<PortKey>, Vec<Endpoint>> = BTreeMap::new();
        for (info, ports) in &selected {
            let Some(ip) = info.ips.get(family) else {
                continue;
            };
            groups
                .entry(ports.clone())
                .or_default()
                .push(pod_endpoint(info, ip, ns, name, publish));
        }
        for (ports, endpoints) in groups {
            let slice_name = names.unique(ns, name, family, &ports);
            let mut slice = EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(slice_name),
                    namespace: Some(ns.to_owned()),
                    labels: Some(slice_labels(allocated, meta.labels.as_ref())),
                    ..Default::default()
                },
                address_type: family.as_str().to_owned(),
                endpoints,
                ports: Some(ports.into_iter().map(endpoint_port).collect()),
            };
            set_source(&mut slice.metadata, &svc.source);
            out.push(slice);
        }
    }
}

/// A named `targetPort` that no selected Pod declares leaves that service
/// port without endpoints (its connects are refused), as in a cluster; that
/// is valid but rarely meant, so it is a notice, cleared once a Pod has it.
fn unresolved_named_ports(
    svc: &Sourced<SlimService>,
    svc_ports: &[ServicePort],
    selected: &[(&PodInfo<'_>, Vec<PortKey>)],
    diags: &mut Vec<Diagnostic>,
) {
    if selected.is_empty() {
        return;
    }
    let meta = &svc.obj.metadata;
    for (i, sp) in svc_ports.iter().enumerate() {
        let Some(IntOrString::String(wanted)) = &sp.target_port else {
            continue;
        };
        let name = sp.name.clone().unwrap_or_default();
        let proto = protocol(sp.protocol.as_deref());
        let resolved = selected
            .iter()
            .any(|(_, ports)| ports.iter().any(|(n, _, p, _)| *n == name && *p == proto));
        if !wanted.is_empty() && !resolved {
            diags.push(
                diag(
                    svc.source.clone(),
                    format!("Service {}/{}", namespace_of(meta), name_of(meta)),
                    format!("spec.ports[{i}].targetPort"),
                    format!(
                        "named port {wanted:?} ({proto}) matches no container port of the {} selected Pod(s); connects to this port are refused until one declares it",
                        selected.len()
                    ),
                )
                .info(),
            );
        }
    }
}

/// The service ports `pod` serves, resolved.
fn pod_ports(pod: &Pod, svc_ports: &[ServicePort]) -> Vec<PortKey> {
    svc_ports
        .iter()
        .filter_map(|sp| {
            let port = find_port(pod, sp)?;
            Some((
                sp.name.clone().unwrap_or_default(),
                port,
                protocol(sp.protocol.as_deref()),
                sp.app_protocol.clone(),
            ))
        })
        .collect()
}

/// kube-controller-manager's podToEndpoint, for the address `ip`.
fn pod_endpoint(
    info: &PodInfo<'_>,
    ip: IpAddr,
    ns: &str,
    service: &str,
    publish: bool,
) -> Endpoint {
    let pod = info.pod;
    let pod_spec = pod.spec.as_ref();
    let hostname = pod_spec
        .and_then(|s| s.hostname.as_ref())
        .filter(|h| !h.is_empty())
        .filter(|_| pod_spec.and_then(|s| s.subdomain.as_deref()) == Some(service));
    let ready = publish || (info.ready && !info.terminating);
    Endpoint {
        addresses: vec![ip.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(info.ready),
            terminating: Some(info.terminating),
        }),
        node_name: pod_spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        hostname: hostname.cloned(),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".to_owned()),
            namespace: Some(ns.to_owned()),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// podutil.FindPort: a number is used as is; a name is looked up among the
/// Pod's containers (and sidecars) with the same protocol. `None`: the Pod
/// does not serve this port.
fn find_port(pod: &Pod, sp: &ServicePort) -> Option<i32> {
    match &sp.target_port {
        // API server defaulting: no (or a zero) targetPort means `port`.
        None => Some(sp.port),
        Some(IntOrString::Int(0)) => Some(sp.port),
        Some(IntOrString::String(s)) if s.is_empty() => Some(sp.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(wanted)) => {
            let proto = protocol(sp.protocol.as_deref());
            let spec = pod.spec.as_ref()?;
            let sidecars = spec
                .init_containers
                .iter()
                .flatten()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"));
            spec.containers
                .iter()
                .chain(sidecars)
                .flat_map(|c: &Container| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(wanted.as_str())
                        && protocol(p.protocol.as_deref()) == proto
                })
                .map(|p| p.container_port)
        }
    }
}

fn protocol(p: Option<&str>) -> String {
    p.filter(|p| !p.is_empty()).unwrap_or("TCP").to_owned()
}

fn endpoint_port((name, port, protocol, app_protocol): PortKey) -> EndpointPort {
    EndpointPort {
        name: Some(name),
        port: Some(port),
        protocol: Some(protocol),
        app_protocol,
    }
}

/// The controllers' labels: the owner's labels (minus reserved ones), the
/// service name, the manager, and the headless marker for headless services.
fn slice_labels(
    svc: &Allocated,
    owner_labels: Option<&BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = owner_labels
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != SERVICE_NAME_LABEL && k.as_str() != MANAGED_BY_LABEL)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let headless = svc.cluster_ip() == Some("None");
    if headless {
        labels.insert(HEADLESS_LABEL.to_owned(), String::new());
    } else {
        labels.remove(HEADLESS_LABEL);
    }
    labels.insert(
        SERVICE_NAME_LABEL.to_owned(),
        name_of(&svc.svc.obj.metadata).to_owned(),
    );
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    labels
}

/// The mirroring controller: one slice per subset and address family (it
/// splits by family whatever the Service's `ipFamilies`). Addresses are
/// ready, notReadyAddresses are not; serving and terminating stay unset, as
/// there.
fn mirror(
    ep: &Sourced<Endpoints>,
    svc: &Allocated,
    names: &mut SliceNames,
    diags: &mut Vec<Diagnostic>,
    out: &mut Vec<EndpointSlice>,
) {
    let meta = &ep.obj.metadata;
    let (ns, name) = (namespace_of(meta), name_of(meta));
    for (i, subset) in ep.obj.subsets.iter().flatten().enumerate() {
        let mut by_family: BTreeMap<IpFamily, Vec<Endpoint>> = BTreeMap::new();
        let lists = [
            ("addresses", subset.addresses.as_deref(), true),
            (
                "notReadyAddresses",
                subset.not_ready_addresses.as_deref(),
                false,
            ),
        ];
        for (list, addrs, ready) in lists {
            for (j, addr) in addrs.unwrap_or_default().iter().enumerate() {
                let problem = match addr.ip.parse::<IpAddr>() {
                    Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => {
                        "is an IPv4-mapped IPv6 address; write the IPv4 address"
                    }
                    Ok(ip) => {
                        by_family
                            .entry(IpFamily::of(ip))
                            .or_default()
                            .push(mirrored_endpoint(addr, ip, ready));
                        continue;
                    }
                    Err(_) => "is not an IP address",
                };
                diags.push(diag(
                    ep.source.clone(),
                    format!("Endpoints {ns}/{name}"),
                    format!("subsets[{i}].{list}[{j}].ip"),
                    format!("{:?} {problem}; the address is ignored", addr.ip),
                ));
            }
        }
        let ports: Vec<PortKey> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone().unwrap_or_default(),
                    p.port,
                    protocol(p.protocol.as_deref()),
                    p.app_protocol.clone(),
                )
            })
            .collect();
        for (family, endpoints) in by_family {
            let mut slice = EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(names.unique(ns, name, family, &ports)),
                    namespace: Some(ns.to_owned()),
                    labels: Some(slice_labels(svc, meta.labels.as_ref())),
                    ..Default::default()
                },
                address_type: family.as_str().to_owned(),
                endpoints,
                ports: Some(ports.iter().cloned().map(endpoint_port).collect()),
            };
            set_source(&mut slice.metadata, &ep.source);
            out.push(slice);
        }
    }
}

fn mirrored_endpoint(addr: &EndpointAddress, ip: IpAddr, ready: bool) -> Endpoint {
    Endpoint {
        addresses: vec![ip.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            ..Default::default()
        }),
        hostname: addr.hostname.clone(),
        node_name: addr.node_name.clone(),
        target_ref: addr.target_ref.clone(),
        ..Default::default()
    }
}

/// Slice names in use per namespace. Derived names hash the address type
/// and the port list, so a slice keeps its name across reloads while its
/// ports stay the same.
struct SliceNames(HashSet<(String, String)>);

impl SliceNames {
    fn unique(&mut self, ns: &str, service: &str, family: IpFamily, ports: &[PortKey]) -> String {
        // IPv4 names are those from before IPv6 slices existed.
        let key = match family {
            IpFamily::V4 => format!("{ports:?}"),
            IpFamily::V6 => format!("IPv6 {ports:?}"),
        };
        let hash = fnv1a(key.as_bytes()) & 0xff_ffff_ffff;
        let base = format!("{service}-{hash:010x}");
        let mut candidate = base.clone();
        let mut n = 2;
        while !self.0.insert((ns.to_owned(), candidate.clone())) {
            candidate = format!("{base}-{n}");
            n += 1;
        }
        candidate
    }
}
