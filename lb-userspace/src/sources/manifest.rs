//! The manifest-directory source: ordinary Kubernetes YAML stands in for an
//! API server and for the controllers a cluster would run (endpoints from
//! Pods, mirroring of Endpoints, ClusterIP allocation).
use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::Path};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::model::{Diagnostic, SOURCE_ANNOTATION};

mod alloc;
mod controllers;
mod parse;
#[cfg(test)]
mod tests;

/// Everything one read of the directory produced.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// Services with `spec.clusterIP`/`clusterIPs` filled in where they were missing.
    pub services: Vec<Service>,
    /// Given EndpointSlices plus those derived from Pods and Endpoints.
    pub slices: Vec<EndpointSlice>,
    pub diagnostics: Vec<Diagnostic>,
}

/// An IPv4 service CIDR such as `10.96.0.0/12`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceCidr {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
}

impl std::str::FromStr for ServiceCidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        alloc::parse_cidr(s)
    }
}

impl fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// Hands out ClusterIPs for Services that have none, stable across edits and
/// (seeded with what the maps hold) across agent restarts.
#[derive(Clone, Debug)]
pub struct ClusterIpAllocator {
    pub cidr: ServiceCidr,
    /// (namespace, name) → address.
    pub assigned: BTreeMap<(String, String), Ipv4Addr>,
}

impl ClusterIpAllocator {
    /// `previous`: allocations a previous agent made, read back from the maps.
    pub fn new(
        cidr: ServiceCidr,
        previous: impl IntoIterator<Item = ((String, String), Ipv4Addr)>,
    ) -> Self {
        Self {
            cidr,
            assigned: previous.into_iter().collect(),
        }
    }
}

/// Reads every `*.yaml`/`*.yml` in `dir` (not recursive). Never fails: an
/// unreadable directory, file or object is a diagnostic.
pub fn load_dir(dir: &Path, alloc: &mut ClusterIpAllocator) -> Manifests {
    let mut diagnostics = Vec::new();
    let objects = parse::read_dir(dir, &mut diagnostics);
    let parse::Objects {
        mut services,
        pods,
        endpoints,
        slices: given,
        ..
    } = objects;

    let keep = alloc.allocate(&mut services, &mut diagnostics);
    let services: Vec<Sourced<Service>> = services
        .into_iter()
        .zip(keep)
        .filter_map(|(s, keep)| keep.then_some(s))
        .collect();

    let mut slices: Vec<EndpointSlice> = Vec::with_capacity(given.len() + services.len());
    slices.extend(given.into_iter().map(Sourced::annotated));
    let derived =
        controllers::derive_slices(&services, &pods, &endpoints, &slices, &mut diagnostics);
    slices.extend(derived);

    Manifests {
        services: services.into_iter().map(Sourced::annotated).collect(),
        slices,
        diagnostics,
    }
}

/// An object with where it was read from (`file.yaml#2`).
#[derive(Clone, Debug)]
struct Sourced<T> {
    obj: T,
    source: String,
}

/// Objects that carry `metadata`, so the source annotation can be set generically.
trait HasMeta {
    fn meta_mut(&mut self) -> &mut ObjectMeta;
}

impl HasMeta for Service {
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl HasMeta for EndpointSlice {
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<T: HasMeta> Sourced<T> {
    /// The object with its source recorded, so diagnostics computed later
    /// (in the model) can still point at the file.
    fn annotated(mut self) -> T {
        set_source(self.obj.meta_mut(), self.source);
        self.obj
    }
}

fn set_source(meta: &mut ObjectMeta, source: String) {
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(SOURCE_ANNOTATION.to_owned(), source);
}

/// `metadata.namespace` after defaulting (always set by the parser).
fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// `metadata.name` (the parser rejects objects without one).
fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

/// Deterministic across runs and builds (std's hasher is randomly seeded),
/// so ClusterIPs and slice names do not move when the agent restarts.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn diag(
    source: impl Into<String>,
    object: impl Into<String>,
    field: impl Into<String>,
    message: impl Into<String>,
) -> Diagnostic {
    Diagnostic {
        source: source.into(),
        object: object.into(),
        field: field.into(),
        message: message.into(),
    }
}
