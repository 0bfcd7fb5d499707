//! What translation needs of each object, taken at ingestion (kube-proxy's
//! `endpointInfo`: "just the attributes kube-proxy cares about ...
//! intentionally small"). The index keeps these, never full objects, and
//! compares them to drop updates that change nothing.
//!
//! Values a rule may report on stay raw (a bad ClusterIP is reported as
//! written); endpoint addresses and conditions are resolved here, since
//! there are many of them and the rules for them need nothing else.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use smol_str::SmolStr;

use k8s_openapi::{
    api::{
        core::v1::{LoadBalancerIngress, Service, ServicePort, SessionAffinityConfig},
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};

use super::{
    Proto, SOURCE_ANNOTATION,
    labels::{HEADLESS, SERVICE_NAME, SERVICE_PROXY_NAME},
};

/// A Service as translation sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `default` when unset, as kubectl would.
    pub namespace: SmolStr,
    /// Empty when missing (reported by translation).
    pub name: SmolStr,
    /// Where it came from, for diagnostics (`file.yaml#2`); empty for the API.
    pub source: SmolStr,
    /// `metadata.creationTimestamp`: the older of two Services claiming one
    /// frontend keeps it, as the API server's allocator would have decided.
    pub created: Option<Time>,
    /// Carries `service.kubernetes.io/headless` (any value).
    pub headless_label: bool,
    /// `service.kubernetes.io/service-proxy-name`.
    pub proxy_name: Option<String>,
    /// `None`: no spec at all (nothing to serve).
    pub spec: Option<ServiceSpecInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSpecInfo {
    pub type_: Option<SmolStr>,
    pub cluster_ip: Option<SmolStr>,
    pub cluster_ips: Option<Vec<SmolStr>>,
    pub ports: Vec<ServicePortInfo>,
    /// `None` when all of it is at its default (most Services): every
    /// Service is kept, and these fields took half of its spec.
    pub extras: Option<Box<SpecExtras>>,
}

/// A Service's internal traffic policy, session affinity and external
/// addresses, as written (raw, so an unknown value can be reported).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecExtras {
    pub internal_traffic_policy: Option<SmolStr>,
    pub session_affinity: Option<SmolStr>,
    /// `spec.sessionAffinityConfig.clientIP.timeoutSeconds`, unchecked
    /// (translation reports a value out of range).
    pub session_affinity_timeout: Option<i32>,
    /// `spec.externalIPs` as written (translation reports one that is no
    /// address).
    pub external_ips: Vec<SmolStr>,
    /// `status.loadBalancer.ingress`, every entry, so a diagnostic's index
    /// is the one written.
    pub lb_ingress: Vec<LbIngressInfo>,
}

/// One `status.loadBalancer.ingress[]` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbIngressInfo {
    /// Empty for a hostname-only entry (nothing to serve).
    pub ip: SmolStr,
    /// `ipMode` as written: unset and `VIP` are served, `Proxy` is not
    /// (KEP-1860: the load balancer, not the node, must see the traffic).
    pub ip_mode: Option<SmolStr>,
}

impl From<&LoadBalancerIngress> for LbIngressInfo {
    fn from(i: &LoadBalancerIngress) -> Self {
        Self::new(i.ip.as_deref(), i.ip_mode.as_deref())
    }
}

impl LbIngressInfo {
    pub fn new(ip: Option<&str>, ip_mode: Option<&str>) -> Self {
        Self {
            ip: SmolStr::new(ip.unwrap_or_default()),
            ip_mode: ip_mode.map(SmolStr::new),
        }
    }
}

impl SpecExtras {
    /// `None` when all is at its default. The internal traffic policy
    /// `Cluster` and the affinity `None` are dropped: the API server sets
    /// them on every Service, and they mean what unset means.
    pub fn boxed(self) -> Option<Box<Self>> {
        let affinity = self
            .session_affinity
            .filter(|a| !matches!(a.as_str(), "" | "None"));
        let normal = Self {
            internal_traffic_policy: self.internal_traffic_policy.filter(|p| p != "Cluster"),
            session_affinity_timeout: affinity.as_ref().and(self.session_affinity_timeout),
            session_affinity: affinity,
            ..self
        };
        (normal != Self::default()).then(|| Box::new(normal))
    }
}

impl ServiceSpecInfo {
    pub fn internal_traffic_policy(&self) -> Option<&str> {
        self.extras.as_ref()?.internal_traffic_policy.as_deref()
    }

    /// `spec.sessionAffinity`; `None` when unset or `None`.
    pub fn session_affinity(&self) -> Option<&str> {
        self.extras.as_ref()?.session_affinity.as_deref()
    }

    pub fn session_affinity_timeout(&self) -> Option<i32> {
        self.extras.as_ref()?.session_affinity_timeout
    }

    /// `spec.externalIPs` as written.
    pub fn external_ips(&self) -> &[SmolStr] {
        self.extras.as_ref().map_or(&[], |e| &e.external_ips)
    }

    /// `status.loadBalancer.ingress`, every entry.
    pub fn lb_ingress(&self) -> &[LbIngressInfo] {
        self.extras.as_ref().map_or(&[], |e| &e.lb_ingress)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// Empty for the unnamed port.
    pub name: SmolStr,
    pub protocol: Option<SmolStr>,
    pub port: i32,
    /// `nodePort`; 0 when unset.
    pub node_port: i32,
}

/// An EndpointSlice as translation sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub namespace: SmolStr,
    pub name: SmolStr,
    pub source: SmolStr,
    /// The `kubernetes.io/service-name` label; `None` when missing or empty.
    pub service: Option<SmolStr>,
    /// `None`: an FQDN (or unknown) slice, which kube-proxy ignores; its
    /// endpoints are not kept.
    pub family: Option<Family>,
    /// Ports with a supported protocol (others never match a service port).
    pub ports: Vec<SlicePortInfo>,
    pub endpoints: Vec<EndpointInfo>,
    /// The node names of its endpoints, each once (an endpoint refers to
    /// its node by place): a slice's endpoints sit on a few nodes, and a
    /// name per endpoint would be a million allocations at 100,000
    /// services.
    pub nodes: Box<[Box<str>]>,
    /// What few endpoints have (hints, an invalid address's text), by
    /// endpoint place, sorted: most slices have none, and a pointer per
    /// endpoint would cost a third of its size.
    extras: Box<[(u32, Extra)]>,
}

/// The address family of an IP slice (`addressType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortInfo {
    /// Empty for the unnamed port.
    pub name: SmolStr,
    pub proto: Proto,
    /// `None`: nil, 0 or out of range, which makes the port unusable.
    pub port: Option<u16>,
}

/// One endpoint: its first address (kube-proxy uses no other), its node
/// and the three conditions resolved (nil ready/serving count as true, nil
/// terminating as false). There are ten or more per service, so it is kept
/// at 24 bytes: the node is a place in its slice's [`SliceInfo::nodes`],
/// and what is rarely set (hints, an invalid address's text) is in the
/// slice's table of extras ([`SliceInfo::hints`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub address: Address,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// 1 + its node's place in [`SliceInfo::nodes`]; 0: no `nodeName`.
    node: u32,
}

/// What few endpoints have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Extra {
    hints: Hints,
    /// An [`Address::Invalid`]'s text, for the diagnostic.
    invalid: Option<Box<str>>,
}

/// An endpoint's topology hints (`hints.forNodes`, `hints.forZones`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    pub for_nodes: Vec<String>,
    pub for_zones: Vec<String>,
}

/// An endpoint's first address, checked against the slice's family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Address {
    Ip(IpAddr),
    Missing,
    /// Not an address of the slice's family (or v4-mapped, which would
    /// alias an IPv4 backend in the maps); its text is
    /// [`SliceInfo::invalid_text`].
    Invalid,
}

/// Objects without a namespace are taken as `default`, as kubectl would.
fn namespace_of(meta: &ObjectMeta) -> SmolStr {
    SmolStr::new(
        meta.namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or("default"),
    )
}

fn source_of(meta: &ObjectMeta) -> SmolStr {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(SOURCE_ANNOTATION))
        .map(SmolStr::new)
        .unwrap_or_default()
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

impl From<&Service> for ServiceInfo {
    fn from(svc: &Service) -> Self {
        let spec = svc.spec.as_ref().map(|s| {
            ServiceSpecInfo::from_fields(SpecFields {
                type_: s.type_.as_deref(),
                cluster_ip: s.cluster_ip.as_deref(),
                cluster_ips: s.cluster_ips.as_deref(),
                ports: s.ports.as_deref(),
                internal_traffic_policy: s.internal_traffic_policy.as_deref(),
                session_affinity: s.session_affinity.as_deref(),
                session_affinity_config: s.session_affinity_config.as_ref(),
                external_ips: s.external_ips.as_deref(),
                lb_ingress: svc
                    .status
                    .as_ref()
                    .and_then(|st| st.load_balancer.as_ref()?.ingress.as_deref()),
            })
        });
        Self::from_parts(&svc.metadata, spec)
    }
}

/// The spec fields translation reads, borrowed from a full `ServiceSpec`
/// or from the manifest source's slim copy of one.
pub struct SpecFields<'a> {
    pub type_: Option<&'a str>,
    pub cluster_ip: Option<&'a str>,
    pub cluster_ips: Option<&'a [String]>,
    pub ports: Option<&'a [ServicePort]>,
    pub internal_traffic_policy: Option<&'a str>,
    pub session_affinity: Option<&'a str>,
    pub session_affinity_config: Option<&'a SessionAffinityConfig>,
    pub external_ips: Option<&'a [String]>,
    /// `status.loadBalancer.ingress`.
    pub lb_ingress: Option<&'a [LoadBalancerIngress]>,
}

impl ServiceSpecInfo {
    /// The one place a spec's fields are taken for translation.
    pub fn from_fields(f: SpecFields<'_>) -> Self {
        Self {
            type_: f.type_.map(SmolStr::new),
            cluster_ip: f.cluster_ip.map(SmolStr::new),
            cluster_ips: f
                .cluster_ips
                .map(|ips| ips.iter().map(SmolStr::new).collect()),
            ports: f
                .ports
                .unwrap_or(&[])
                .iter()
                .map(ServicePortInfo::from)
                .collect(),
            extras: SpecExtras {
                internal_traffic_policy: f.internal_traffic_policy.map(SmolStr::new),
                session_affinity: f.session_affinity.map(SmolStr::new),
                // `clientIP.timeoutSeconds`, as written.
                session_affinity_timeout: f
                    .session_affinity_config
                    .and_then(|c| c.client_ip.as_ref()?.timeout_seconds),
                external_ips: f
                    .external_ips
                    .unwrap_or(&[])
                    .iter()
                    .map(SmolStr::new)
                    .collect(),
                lb_ingress: f
                    .lb_ingress
                    .unwrap_or(&[])
                    .iter()
                    .map(LbIngressInfo::from)
                    .collect(),
            }
            .boxed(),
        }
    }
}

/// The metadata fields translation reads, borrowed from a full
/// `ObjectMeta` or from the manifest source's slim copy of one.
pub struct MetaFields<'a> {
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    /// `file.yaml#2`; empty for the API.
    pub source: SmolStr,
    pub created: Option<&'a Time>,
    pub labels: Option<&'a BTreeMap<String, String>>,
}

impl ServiceInfo {
    /// From the metadata and the spec already taken, for full objects and
    /// for the API source's slim decode alike (see [`Self::from_meta`]).
    pub fn from_parts(meta: &ObjectMeta, spec: Option<ServiceSpecInfo>) -> Self {
        let source = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_ANNOTATION));
        Self::from_meta(
            MetaFields {
                namespace: meta.namespace.as_deref(),
                name: meta.name.as_deref(),
                source: source.map(SmolStr::new).unwrap_or_default(),
                created: meta.creation_timestamp.as_ref(),
                labels: meta.labels.as_ref(),
            },
            spec,
        )
    }

    /// The one place the metadata rules live.
    pub fn from_meta(meta: MetaFields<'_>, spec: Option<ServiceSpecInfo>) -> Self {
        let label = |key: &str| meta.labels.and_then(|l| l.get(key));
        Self {
            namespace: SmolStr::new(
                meta.namespace
                    .filter(|n| !n.is_empty())
                    .unwrap_or("default"),
            ),
            name: SmolStr::new(meta.name.unwrap_or_default()),
            source: meta.source,
            created: meta.created.cloned(),
            headless_label: label(HEADLESS).is_some(),
            proxy_name: label(SERVICE_PROXY_NAME).cloned(),
            spec,
        }
    }
}

impl From<&ServicePort> for ServicePortInfo {
    fn from(p: &ServicePort) -> Self {
        Self::new(p.name.clone(), p.protocol.clone(), p.port)
            .with_node_port(p.node_port.unwrap_or_default())
    }
}

impl ServicePortInfo {
    pub fn new(name: Option<String>, protocol: Option<String>, port: i32) -> Self {
        Self {
            name: name.map(SmolStr::from).unwrap_or_default(),
            protocol: protocol.map(SmolStr::from),
            port,
            node_port: 0,
        }
    }

    pub fn with_node_port(self, node_port: i32) -> Self {
        Self { node_port, ..self }
    }
}

impl From<&EndpointSlice> for SliceInfo {
    fn from(slice: &EndpointSlice) -> Self {
        let family = Family::from_address_type(&slice.address_type);
        let given = slice.ports.as_deref().unwrap_or(&[]);
        // Sized to the ports read: a `filter_map` collect would leave room
        // for four, and the index keeps every slice.
        let mut ports = Vec::with_capacity(given.len());
        ports.extend(
            given
                .iter()
                .filter_map(|p| SlicePortInfo::new(p.name.clone(), p.protocol.as_deref(), p.port)),
        );
        let mut endpoints = Endpoints::with_capacity(family.map_or(0, |_| slice.endpoints.len()));
        if let Some(family) = family {
            for ep in &slice.endpoints {
                endpoints.push_endpoint(ep, family);
            }
        }
        Self::from_parts(&slice.metadata, family, ports, endpoints)
    }
}

impl SliceInfo {
    /// From the metadata and the parts already taken (see
    /// [`ServiceInfo::from_parts`]); `endpoints` must be empty when
    /// `family` is `None`.
    pub fn from_parts(
        meta: &ObjectMeta,
        family: Option<Family>,
        ports: Vec<SlicePortInfo>,
        endpoints: Endpoints,
    ) -> Self {
        let (endpoints, nodes, extras) = endpoints.into_parts();
        Self {
            namespace: namespace_of(meta),
            name: SmolStr::new(meta.name.as_deref().unwrap_or_default()),
            source: source_of(meta),
            service: label(meta, SERVICE_NAME)
                .filter(|s| !s.is_empty())
                .map(SmolStr::new),
            family,
            ports,
            endpoints,
            nodes,
            extras,
        }
    }

    /// The hints of its endpoint at `place` (`None`: it has none).
    pub fn hints(&self, place: usize) -> Option<&Hints> {
        self.extra(place)
            .map(|e| &e.hints)
            .filter(|h| **h != Hints::default())
    }

    /// The text of its endpoint at `place` when that is an
    /// [`Address::Invalid`].
    pub fn invalid_text(&self, place: usize) -> &str {
        self.extra(place)
            .and_then(|e| e.invalid.as_deref())
            .unwrap_or_default()
    }

    fn extra(&self, place: usize) -> Option<&Extra> {
        let place = u32::try_from(place).ok()?;
        let i = self.extras.binary_search_by_key(&place, |(p, _)| *p).ok()?;
        Some(&self.extras[i].1)
    }

    /// The endpoint's `nodeName` (`ep` is one of this slice's endpoints).
    pub fn node_of(&self, ep: &EndpointInfo) -> Option<&str> {
        let place = usize::try_from(ep.node.checked_sub(1)?).ok()?;
        self.nodes.get(place).map(|n| &**n)
    }
}

/// A slice's endpoints as they are read, with their node names kept once.
#[derive(Debug, Default)]
pub struct Endpoints {
    endpoints: Vec<EndpointInfo>,
    nodes: Vec<Box<str>>,
    extras: Vec<(u32, Extra)>,
    /// Node name → place, once the table outgrows a scan.
    places: HashMap<Box<str>, u32>,
}

impl Endpoints {
    /// Room for `n` endpoints and no more: the index keeps every slice.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            endpoints: Vec::with_capacity(n),
            ..Self::default()
        }
    }

    /// The endpoints and the tables they refer to.
    #[allow(clippy::type_complexity)]
    fn into_parts(self) -> (Vec<EndpointInfo>, Box<[Box<str>]>, Box<[(u32, Extra)]>) {
        (
            self.endpoints,
            self.nodes.into_boxed_slice(),
            self.extras.into_boxed_slice(),
        )
    }

    fn push_endpoint(&mut self, ep: &Endpoint, family: Family) {
        let cond = ep.conditions.as_ref();
        let hints = ep.hints.as_ref();
        self.push(
            ep.addresses.first().map(String::as_str),
            family,
            [
                cond.and_then(|c| c.ready),
                cond.and_then(|c| c.serving),
                cond.and_then(|c| c.terminating),
            ],
            ep.node_name.as_deref(),
            hints
                .and_then(|h| h.for_nodes.as_deref())
                .unwrap_or(&[])
                .iter()
                .map(|n| n.name.clone())
                .collect(),
            hints
                .and_then(|h| h.for_zones.as_deref())
                .unwrap_or(&[])
                .iter()
                .map(|z| z.name.clone())
                .collect(),
        );
    }

    /// Adds an endpoint: its first address checked against the slice's
    /// family, and the conditions `[ready, serving, terminating]` as
    /// written (nil ready/serving count as true, nil terminating as false).
    pub fn push(
        &mut self,
        first_address: Option<&str>,
        family: Family,
        [ready, serving, terminating]: [Option<bool>; 3],
        node_name: Option<&str>,
        for_nodes: Vec<String>,
        for_zones: Vec<String>,
    ) {
        let mut invalid = None;
        let address = match first_address {
            None => Address::Missing,
            Some(raw) => match (family, raw.parse::<IpAddr>()) {
                (Family::V4, Ok(ip @ IpAddr::V4(_))) => Address::Ip(ip),
                (Family::V6, Ok(IpAddr::V6(v6))) if v6.to_ipv4_mapped().is_none() => {
                    Address::Ip(IpAddr::V6(v6))
                }
                _ => {
                    invalid = Some(raw.into());
                    Address::Invalid
                }
            },
        };
        let hints = Hints {
            for_nodes,
            for_zones,
        };
        if invalid.is_some() || hints != Hints::default() {
            let place = u32::try_from(self.endpoints.len()).unwrap_or(u32::MAX);
            self.extras.push((place, Extra { hints, invalid }));
        }
        let node = node_name.map_or(0, |name| self.node_place(name));
        self.endpoints.push(EndpointInfo {
            address,
            ready: ready != Some(false),
            serving: serving != Some(false),
            terminating: terminating == Some(true),
            node,
        });
    }

    /// 1 + the node's place in the table, added if new. A slice's
    /// endpoints usually sit on a few nodes, where a scan is cheapest; a
    /// map takes over past `SCAN` names (a slice on thousands of nodes).
    fn node_place(&mut self, name: &str) -> u32 {
        const SCAN: usize = 16;
        let found = if self.nodes.len() <= SCAN {
            self.nodes.iter().position(|n| **n == *name)
        } else {
            if self.places.is_empty() {
                self.places = (0..)
                    .zip(&self.nodes)
                    .map(|(place, n)| (n.clone(), place))
                    .collect();
            }
            self.places.get(name).map(|p| *p as usize)
        };
        let place = found.unwrap_or_else(|| {
            self.nodes.push(name.into());
            let place = self.nodes.len() - 1;
            if !self.places.is_empty() {
                self.places.insert(name.into(), place as u32);
            }
            place
        });
        u32::try_from(place + 1).unwrap_or(u32::MAX)
    }
}

impl Family {
    /// `addressType`: `None` for FQDN (or anything unknown).
    pub fn from_address_type(address_type: &str) -> Option<Self> {
        match address_type {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }
}

impl SlicePortInfo {
    /// `None` for a protocol translation does not support (such a port
    /// never matches a service port).
    pub fn new(name: Option<String>, protocol: Option<&str>, port: Option<i32>) -> Option<Self> {
        Some(Self {
            name: name.map(SmolStr::from).unwrap_or_default(),
            proto: super::translate::parse_proto(protocol).ok()?,
            port: port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0),
        })
    }
}
