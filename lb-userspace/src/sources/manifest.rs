//! The manifest-directory source: ordinary Kubernetes YAML stands in for an
//! API server and for the controllers a cluster would run (endpoints from
//! Pods, mirroring of Endpoints, ClusterIP allocation).
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::model::Diagnostic;

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

    fn from_str(_s: &str) -> Result<Self, Self::Err> {
        Err("not implemented".into())
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
    pub fn new(cidr: ServiceCidr, previous: impl IntoIterator<Item = ((String, String), Ipv4Addr)>) -> Self {
        Self {
            cidr,
            assigned: previous.into_iter().collect(),
        }
    }
}

/// Reads every `*.yaml`/`*.yml` in `dir` (not recursive). Never fails: an
/// unreadable directory, file or object is a diagnostic.
pub fn load_dir(_dir: &Path, _alloc: &mut ClusterIpAllocator) -> Manifests {
    Manifests::default()
}
