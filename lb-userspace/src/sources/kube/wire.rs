//! Services and EndpointSlices decoded off the wire straight into the
//! index's slim types ("watch with a slim decode", issue 10): serde skips
//! every field translation does not read (managed fields, target refs,
//! most labels and annotations) without allocating it, so a list page
//! never holds full `k8s-openapi` objects. The rules that turn the fields
//! into [`ServiceInfo`] and [`SliceInfo`] are the model's, shared with the
//! manifest source's `From<&Service>` and `From<&EndpointSlice>`.
use smol_str::SmolStr;
use std::{borrow::Cow, collections::BTreeMap, fmt};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::core::NamespaceResourceScope;
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, SeqAccess, Visitor},
};

use crate::model::{
    SOURCE_ANNOTATION, ServiceInfo, SliceInfo,
    input::{
        Endpoints, Family, LbIngressInfo, ServicePortInfo, ServiceSpecInfo, SlicePortInfo,
        SpecExtras,
    },
    labels::{HEADLESS, SERVICE_NAME, SERVICE_PROXY_NAME},
};

/// A Service as the watch decodes it: what the index keeps, plus the
/// metadata the watcher itself needs (name, namespace, resourceVersion).
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "WireService")]
pub struct SlimService {
    metadata: ObjectMeta,
    pub info: ServiceInfo,
}

/// An EndpointSlice as the watch decodes it.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "WireSlice")]
pub struct SlimSlice {
    metadata: ObjectMeta,
    pub info: SliceInfo,
}

/// Implements `kube::Resource` with `K`'s type information, so
/// `Api<Self>` and `kube::runtime::watcher` work as they would for `K`.
macro_rules! resource_like {
    ($slim:ty, $full:ty) => {
        impl kube::Resource for $slim {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::KIND.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::GROUP.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::VERSION.into()
            }
            fn api_version(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::API_VERSION.into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource_like!(SlimService, Service);
resource_like!(SlimSlice, EndpointSlice);

// Every field below is optional, and null reads as absent: `k8s-openapi`
// defaults missing required fields the same way.

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMeta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    creation_timestamp: Option<Time>,
    labels: Option<Picked>,
    annotations: Option<Picked>,
}

impl From<WireMeta> for ObjectMeta {
    fn from(m: WireMeta) -> Self {
        let picked = |p: Option<Picked>| p.map(|p| p.0).filter(|m| !m.is_empty());
        ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            resource_version: m.resource_version,
            creation_timestamp: m.creation_timestamp,
            labels: picked(m.labels),
            annotations: picked(m.annotations),
            ..ObjectMeta::default()
        }
    }
}

/// The labels and annotations translation reads; the keys of the others
/// are compared in place and their values skipped.
struct Picked(BTreeMap<String, String>);

const PICKED: [&str; 4] = [
    SERVICE_NAME,
    HEADLESS,
    SERVICE_PROXY_NAME,
    SOURCE_ANNOTATION,
];

impl<'de> Deserialize<'de> for Picked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapV;
        impl<'de> Visitor<'de> for MapV {
            type Value = Picked;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Picked, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(Key(key)) = map.next_key()? {
                    match key {
                        Some(key) => {
                            out.insert(key.to_owned(), map.next_value()?);
                        }
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Picked(out))
            }
        }
        /// One of [`PICKED`], or `None` for any other key.
        struct Key(Option<&'static str>);
        impl<'de> Deserialize<'de> for Key {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct KeyV;
                impl Visitor<'_> for KeyV {
                    type Value = Key;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a string")
                    }
                    fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                        Ok(Key(PICKED.iter().copied().find(|k| *k == v)))
                    }
                }
                d.deserialize_str(KeyV)
            }
        }
        d.deserialize_map(MapV)
    }
}

/// The first element of a list of strings (an endpoint's `addresses`:
/// kube-proxy uses no other); the rest are skipped.
struct First(Option<String>);

impl<'de> Deserialize<'de> for First {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SeqV;
        impl<'de> Visitor<'de> for SeqV {
            type Value = First;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<First, A::Error> {
                let first = seq.next_element::<String>()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(First(first))
            }
        }
        d.deserialize_seq(SeqV)
    }
}

#[derive(Deserialize)]
struct WireService {
    metadata: Option<WireMeta>,
    spec: Option<WireServiceSpec>,
    status: Option<WireServiceStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireServiceStatus {
    load_balancer: Option<WireLbStatus>,
}

#[derive(Deserialize)]
struct WireLbStatus {
    ingress: Option<Vec<WireLbIngress>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireLbIngress {
    ip: Option<String>,
    ip_mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireServiceSpec {
    #[serde(rename = "type")]
    type_: Option<String>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    cluster_ips: Option<Vec<String>>,
    ports: Option<Vec<WireServicePort>>,
    internal_traffic_policy: Option<String>,
    session_affinity: Option<String>,
    session_affinity_config: Option<WireAffinityConfig>,
    #[serde(rename = "externalIPs")]
    external_ips: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct WireAffinityConfig {
    #[serde(rename = "clientIP")]
    client_ip: Option<WireClientIp>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireClientIp {
    timeout_seconds: Option<i32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireServicePort {
    name: Option<String>,
    protocol: Option<String>,
    port: Option<i32>,
    node_port: Option<i32>,
}

impl From<WireService> for SlimService {
    fn from(w: WireService) -> Self {
        let metadata = ObjectMeta::from(w.metadata.unwrap_or_default());
        let lb_ingress = w
            .status
            .and_then(|st| st.load_balancer?.ingress)
            .unwrap_or_default();
        let spec = w.spec.map(|s| ServiceSpecInfo {
            type_: s.type_.map(SmolStr::from),
            cluster_ip: s.cluster_ip.map(SmolStr::from),
            cluster_ips: s
                .cluster_ips
                .map(|ips| kept(ips, |ip| Some(SmolStr::from(ip)))),
            ports: kept(s.ports.unwrap_or_default(), |p| {
                Some(
                    ServicePortInfo::new(p.name, p.protocol, p.port.unwrap_or_default())
                        .with_node_port(p.node_port.unwrap_or_default()),
                )
            }),
            extras: SpecExtras {
                internal_traffic_policy: s.internal_traffic_policy.map(SmolStr::from),
                session_affinity: s.session_affinity.map(SmolStr::from),
                session_affinity_timeout: s
                    .session_affinity_config
                    .and_then(|c| c.client_ip)
                    .and_then(|c| c.timeout_seconds),
                external_ips: kept(s.external_ips.unwrap_or_default(), |ip| {
                    Some(SmolStr::from(ip))
                }),
                lb_ingress: kept(lb_ingress, |i| {
                    Some(LbIngressInfo::new(i.ip.as_deref(), i.ip_mode.as_deref()))
                }),
            }
            .boxed(),
        });
        let info = ServiceInfo::from_parts(&metadata, spec);
        Self { metadata, info }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireSlice {
    metadata: Option<WireMeta>,
    address_type: Option<String>,
    endpoints: Option<Vec<WireEndpoint>>,
    ports: Option<Vec<WireSlicePort>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEndpoint {
    addresses: Option<First>,
    conditions: Option<WireConditions>,
    node_name: Option<String>,
    hints: Option<WireHints>,
}

#[derive(Deserialize)]
struct WireConditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireHints {
    for_nodes: Option<Vec<WireName>>,
    for_zones: Option<Vec<WireName>>,
}

#[derive(Deserialize)]
struct WireName {
    name: Option<String>,
}

#[derive(Deserialize)]
struct WireSlicePort {
    name: Option<String>,
    protocol: Option<String>,
    port: Option<i32>,
}

fn names(list: Option<Vec<WireName>>) -> Vec<String> {
    kept(list.unwrap_or_default(), |n| {
        Some(n.name.unwrap_or_default())
    })
}

/// What the index keeps of a decoded list, in an allocation of its own
/// sized to it. A plain `into_iter().map().collect()` reuses the decoded
/// list's allocation when the kept type is no larger, and that one has the
/// slack of serde's growth (room for 16 endpoints when 10 were read): it
/// made a slice's endpoints half again as large.
fn kept<T, U>(decoded: Vec<T>, f: impl FnMut(T) -> Option<U>) -> Vec<U> {
    let mut out = Vec::with_capacity(decoded.len());
    out.extend(decoded.into_iter().filter_map(f));
    out
}

impl From<WireSlice> for SlimSlice {
    fn from(w: WireSlice) -> Self {
        let metadata = ObjectMeta::from(w.metadata.unwrap_or_default());
        let family = Family::from_address_type(w.address_type.as_deref().unwrap_or_default());
        let ports = kept(w.ports.unwrap_or_default(), |p| {
            SlicePortInfo::new(p.name, p.protocol.as_deref(), p.port)
        });
        let decoded = w.endpoints.unwrap_or_default();
        let mut endpoints = Endpoints::with_capacity(family.map_or(0, |_| decoded.len()));
        if let Some(family) = family {
            for ep in decoded {
                let c = ep.conditions;
                let (for_nodes, for_zones) = ep
                    .hints
                    .map_or_else(Default::default, |h| (h.for_nodes, h.for_zones));
                endpoints.push(
                    ep.addresses.and_then(|a| a.0).as_deref(),
                    family,
                    [
                        c.as_ref().and_then(|c| c.ready),
                        c.as_ref().and_then(|c| c.serving),
                        c.as_ref().and_then(|c| c.terminating),
                    ],
                    ep.node_name.as_deref(),
                    names(for_nodes),
                    names(for_zones),
                );
            }
        }
        let info = SliceInfo::from_parts(&metadata, family, ports, endpoints);
        Self { metadata, info }
    }
}

#[cfg(test)]
mod tests;
