//! The desired datapath state, computed by pure code from Kubernetes objects.
//!
//! Sources (manifest directory, API server) only collect objects; everything
//! that decides *what* the maps should hold lives here, without I/O, so it is
//! tested exhaustively with hand-built objects. Objects enter as the slim
//! types of [`input`], into the [`Index`], which keeps the translation per
//! service and hands out what changed.
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
};

use smol_str::SmolStr;

pub mod index;
pub mod input;
mod translate;

pub use index::{Checkout, Index, IndexNamespaced, Named};
pub use input::{ServiceInfo, SliceInfo};
pub use translate::{port_field, translate, translate_service};

/// L4 protocol of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::PROTO_TCP,
            Proto::Udp => lb_common::PROTO_UDP,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::PROTO_TCP => Some(Proto::Tcp),
            lb_common::PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One service frontend: what a client connects to. A dual-stack service
/// has one frontend per family, each balancing over that family's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: SocketAddr,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto)
    }
}

/// Kubernetes service type, as far as it is visible to in-cluster clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub const fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Which Kubernetes service port a frontend came from. Names are stored
/// inline up to 23 bytes (Kubernetes names rarely exceed that): the
/// reconciler keeps one per installed frontend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    pub namespace: SmolStr,
    pub name: SmolStr,
    /// Service port name; empty for the unnamed port.
    pub port_name: SmolStr,
    pub svc_type: ServiceType,
    /// Which of the Service's addresses this frontend is.
    pub frontend: FrontendKind,
}

/// Which address of a Service a frontend is: what clients connect to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum FrontendKind {
    /// A ClusterIP on a service port.
    #[default]
    ClusterIP,
    /// One of this node's addresses on the port's nodePort.
    NodePort,
    /// One of `spec.externalIPs` on a service port.
    ExternalIP,
    /// A `status.loadBalancer.ingress[].ip` on a service port.
    LoadBalancer,
}

impl FrontendKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIP => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIP => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        }
    }

    /// An address for traffic from outside the cluster (kube-proxy's
    /// "external destinations"), as opposed to a ClusterIP.
    pub const fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIP)
    }
}

/// What one frontend should balance over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub service: ServiceRef,
    /// Sorted and deduplicated, so slot order is deterministic and stable.
    /// Empty means the service exists but connects are refused. Always of
    /// the frontend's family.
    pub backends: Vec<SocketAddr>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds (1–86400); 0
    /// when the Service has no session affinity.
    pub affinity: u32,
    /// Endpoints of the frontend's family that are still `serving` but not
    /// among `backends` (terminating ones while ready ones exist, or ones
    /// the traffic policy or topology leaves out), sorted. Never in the
    /// maps: `--terminate-sockets all` spares their TCP connections (a
    /// graceful shutdown keeps its connections).
    pub spared: Vec<SocketAddr>,
}

/// Everything the maps should hold, keyed by frontend.
pub type DesiredState = BTreeMap<Frontend, DesiredService>;

/// Convenience for tests and sources.
pub fn frontend(ip: impl Into<IpAddr>, port: u16, proto: Proto) -> Frontend {
    Frontend {
        addr: SocketAddr::new(ip.into(), port),
        proto,
    }
}

/// A problem with one input object: reported with where it came from, the
/// object and the field, and skipped. Everything else keeps working.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Diagnostic {
    /// Where the object came from: `dir/file.yaml#2` (document index) or `api`.
    pub source: String,
    /// `Kind namespace/name`, e.g. `Service default/web`.
    pub object: String,
    /// Path of the offending field, e.g. `spec.ports[1].targetPort`; empty for the whole object.
    pub field: String,
    pub message: String,
    pub severity: Severity,
}

/// How a diagnostic is logged: a warning is an object (or part of one) that
/// was refused; a notice is valid input that does not do what it may seem to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    #[default]
    Warning,
    Info,
}

impl Diagnostic {
    /// The same problem, reported as a notice.
    pub fn info(self) -> Self {
        Self {
            severity: Severity::Info,
            ..self
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.source.is_empty() {
            write!(f, "{}: ", self.source)?;
        }
        for part in [&self.object, &self.field] {
            if !part.is_empty() {
                write!(f, "{part}: ")?;
            }
        }
        f.write_str(&self.message)
    }
}

/// Node-specific inputs of the translation (traffic policy and topology).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TranslateOptions {
    /// This node's name: `internalTrafficPolicy: Local` keeps only endpoints with this `nodeName`.
    pub node_name: Option<String>,
    /// This node's addresses (`--node-ip`, the Node object's or the
    /// interfaces'): a NodePort is served on each, for the Services of
    /// that address's family.
    pub node_ips: Vec<IpAddr>,
    /// Also serve each nodePort on `127.0.0.1` and `::1`, for sockets of the
    /// host's network namespace only (the program checks).
    pub localhost_node_ports: bool,
    /// Which `spec.externalIPs` are served (`--external-ips`).
    pub external_ips: ExternalIps,
    /// This node's zone, for topology hints (`hints.forZones`).
    pub zone: Option<String>,
    /// `--service-proxy-name`: serve only services whose
    /// `service.kubernetes.io/service-proxy-name` label equals it. `None`:
    /// serve only services without that label (kube-proxy's default).
    pub service_proxy_name: Option<String>,
}

/// Which of a Service's `spec.externalIPs` become frontends. Any user who
/// can create a Service can set them (CVE-2020-8554): served everywhere,
/// they would let that user capture in-node connects to any address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExternalIps {
    /// Only those that are one of this node's addresses.
    #[default]
    Node,
    /// Every one, whatever address it is.
    All,
}

/// Well-known labels, as kube-proxy and the endpoint controllers use them.
pub mod labels {
    /// Ties an EndpointSlice to its Service.
    pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
    /// kube-proxy's informers exclude services carrying it (any value).
    pub const HEADLESS: &str = "service.kubernetes.io/headless";
    /// Services owned by another proxy (`--service-proxy-name`).
    pub const SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
}

/// Annotation the manifest source sets on every object it emits (`file.yaml#2`),
/// so diagnostics raised later, in the pure translation, can still name the file.
pub const SOURCE_ANNOTATION: &str = "lb-agent.io/source";
