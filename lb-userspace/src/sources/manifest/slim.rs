//! What the cache keeps of a parsed object: only the fields the allocator,
//! the controllers and translation read. A Pod as written is kilobytes of
//! containers, volumes and `last-applied-configuration`; a node with
//! 100,000 Pods in its manifests should not hold all of that.
//!
//! Applied after validation, so every diagnostic still sees the object as
//! written.
use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Container, Endpoints, LoadBalancerIngress, LoadBalancerStatus, Pod, PodCondition, PodSpec,
        PodStatus, Service, ServicePort, ServiceSpec, ServiceStatus, SessionAffinityConfig,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use smol_str::SmolStr;

use super::{MetaNames, alloc::Filled};
use crate::model::{
    ServiceInfo,
    input::{MetaFields, ServiceSpecInfo, SpecFields},
};

/// Identity, labels (selectors, the proxy labels), and the timestamps that
/// decide who came first and whether a Pod is terminating.
fn meta(m: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        labels: m.labels,
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        ..ObjectMeta::default()
    }
}

/// A Service as the cache keeps it: the fields of `spec` the allocator,
/// the controllers and translation read, under their Kubernetes names, so
/// the code reads `svc.spec.cluster_ip` either way. A `ServiceSpec` has
/// some twenty more fields, never read here, each taking room in every
/// cached Service even when unset.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct SlimService {
    pub metadata: SlimMeta,
    pub spec: Option<SlimServiceSpec>,
    /// `status.loadBalancer.ingress` as written: no controller here fills
    /// it in, so the manifest's word is the load balancer's.
    pub lb_ingress: Option<Vec<LoadBalancerIngress>>,
}

/// A Service's metadata as the cache keeps it: 88 bytes where an
/// `ObjectMeta` takes 360, and its names inline (no allocation up to 23
/// bytes), for every Service of the directory.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct SlimMeta {
    pub name: SmolStr,
    pub namespace: SmolStr,
    /// Selectors of derived slices copy them; the proxy labels are read.
    pub labels: Option<BTreeMap<String, String>>,
    pub creation_timestamp: Option<Time>,
}

impl MetaNames for SlimMeta {
    fn namespace(&self) -> &str {
        if self.namespace.is_empty() {
            "default"
        } else {
            &self.namespace
        }
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// The spec fields the allocator, the controllers and translation read.
/// What most Services leave unset sits behind one pointer, and the
/// ClusterIP is inline: every Service of the directory is cached.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct SlimServiceSpec {
    pub type_: Option<SmolStr>,
    pub cluster_ip: Option<SmolStr>,
    pub selector: Option<BTreeMap<String, String>>,
    pub ports: Option<Vec<ServicePort>>,
    rare: Option<Box<RareSpec>>,
}

/// Spec fields a hand-written Service seldom sets (an exported one sets
/// most of them).
#[derive(Clone, Debug, Default, PartialEq)]
struct RareSpec {
    cluster_ips: Option<Vec<String>>,
    ip_families: Option<Vec<String>>,
    ip_family_policy: Option<String>,
    publish_not_ready_addresses: Option<bool>,
    internal_traffic_policy: Option<String>,
    session_affinity: Option<String>,
    session_affinity_config: Option<SessionAffinityConfig>,
    external_ips: Option<Vec<String>>,
    /// `false`: a LoadBalancer Service gets no nodePorts allocated.
    allocate_load_balancer_node_ports: Option<bool>,
}

impl SlimServiceSpec {
    pub fn cluster_ips(&self) -> Option<&[String]> {
        self.rare.as_ref()?.cluster_ips.as_deref()
    }

    pub fn ip_families(&self) -> Option<&[String]> {
        self.rare.as_ref()?.ip_families.as_deref()
    }

    pub fn ip_family_policy(&self) -> Option<&str> {
        self.rare.as_ref()?.ip_family_policy.as_deref()
    }

    pub fn publish_not_ready_addresses(&self) -> Option<bool> {
        self.rare.as_ref()?.publish_not_ready_addresses
    }

    fn internal_traffic_policy(&self) -> Option<&str> {
        self.rare.as_ref()?.internal_traffic_policy.as_deref()
    }

    fn session_affinity(&self) -> Option<&str> {
        self.rare.as_ref()?.session_affinity.as_deref()
    }

    fn session_affinity_config(&self) -> Option<&SessionAffinityConfig> {
        self.rare.as_ref()?.session_affinity_config.as_ref()
    }

    fn external_ips(&self) -> Option<&[String]> {
        self.rare.as_ref()?.external_ips.as_deref()
    }

    pub fn allocate_load_balancer_node_ports(&self) -> Option<bool> {
        self.rare.as_ref()?.allocate_load_balancer_node_ports
    }
}

pub(super) fn service(s: Service) -> SlimService {
    let m = s.metadata;
    SlimService {
        metadata: SlimMeta {
            name: m.name.map(SmolStr::from).unwrap_or_default(),
            namespace: m.namespace.map(SmolStr::from).unwrap_or_default(),
            labels: m.labels,
            creation_timestamp: m.creation_timestamp,
        },
        spec: s.spec.map(|s| {
            let rare = RareSpec {
                cluster_ips: s.cluster_ips,
                ip_families: s.ip_families,
                ip_family_policy: s.ip_family_policy,
                publish_not_ready_addresses: s.publish_not_ready_addresses,
                internal_traffic_policy: s.internal_traffic_policy,
                session_affinity: s.session_affinity,
                session_affinity_config: s.session_affinity_config,
                external_ips: s.external_ips,
                allocate_load_balancer_node_ports: s.allocate_load_balancer_node_ports,
            };
            SlimServiceSpec {
                type_: s.type_.map(SmolStr::from),
                cluster_ip: s.cluster_ip.map(SmolStr::from),
                selector: s.selector,
                // Without serde's growth slack (room for four ports when one
                // was read): the cache keeps every Service.
                ports: s.ports.map(|mut p| {
                    p.shrink_to_fit();
                    p
                }),
                rare: (rare != RareSpec::default()).then(|| Box::new(rare)),
            }
        }),
        lb_ingress: s
            .status
            .and_then(|st| st.load_balancer?.ingress)
            .filter(|i| !i.is_empty()),
    }
}

impl SlimService {
    /// As a `Service` again, with every field it kept.
    pub(super) fn into_service(self) -> Service {
        let m = self.metadata;
        Service {
            metadata: ObjectMeta {
                name: Some(m.name.to_string()),
                namespace: Some(m.namespace.to_string()),
                labels: m.labels,
                creation_timestamp: m.creation_timestamp,
                ..ObjectMeta::default()
            },
            spec: self.spec.map(|s| {
                let rare = s.rare.map(|r| *r).unwrap_or_default();
                ServiceSpec {
                    type_: s.type_.map(String::from),
                    cluster_ip: s.cluster_ip.map(String::from),
                    cluster_ips: rare.cluster_ips,
                    ip_families: rare.ip_families,
                    ip_family_policy: rare.ip_family_policy,
                    selector: s.selector,
                    ports: s.ports,
                    publish_not_ready_addresses: rare.publish_not_ready_addresses,
                    internal_traffic_policy: rare.internal_traffic_policy,
                    session_affinity: rare.session_affinity,
                    session_affinity_config: rare.session_affinity_config,
                    external_ips: rare.external_ips,
                    allocate_load_balancer_node_ports: rare.allocate_load_balancer_node_ports,
                    ..ServiceSpec::default()
                }
            }),
            status: self.lb_ingress.map(|ingress| ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(ingress),
                }),
                ..ServiceStatus::default()
            }),
        }
    }

    /// What translation takes of it (as `ServiceInfo::from(&Service)`),
    /// read from `source` (`file.yaml#2`), with the ClusterIPs the API
    /// server filled in (`filled`), if any.
    pub(super) fn info(&self, source: SmolStr, filled: Option<&Filled>) -> ServiceInfo {
        let spec = self.spec.as_ref().map(|s| {
            let (cluster_ip, cluster_ips) = match filled {
                Some(f) => (
                    f.cluster_ips.first().map(String::as_str),
                    Some(f.cluster_ips.as_slice()),
                ),
                None => (s.cluster_ip.as_deref(), s.cluster_ips()),
            };
            let mut info = ServiceSpecInfo::from_fields(SpecFields {
                type_: s.type_.as_deref(),
                cluster_ip,
                cluster_ips,
                ports: s.ports.as_deref(),
                internal_traffic_policy: s.internal_traffic_policy(),
                session_affinity: s.session_affinity(),
                session_affinity_config: s.session_affinity_config(),
                external_ips: s.external_ips(),
                lb_ingress: self.lb_ingress.as_deref(),
            });
            // The nodePorts the allocator handed out (or refused).
            for &(i, node_port) in filled.map_or(&[][..], |f| &f.node_ports) {
                if let Some(p) = info.ports.get_mut(i) {
                    p.node_port = node_port;
                }
            }
            info
        });
        let m = &self.metadata;
        ServiceInfo::from_meta(
            MetaFields {
                namespace: Some(m.namespace()),
                name: Some(&m.name),
                source,
                created: m.creation_timestamp.as_ref(),
                labels: m.labels.as_ref(),
            },
            spec,
        )
    }
}

pub(super) fn endpoints(e: Endpoints) -> Endpoints {
    Endpoints {
        metadata: meta(e.metadata),
        subsets: e.subsets,
    }
}

/// A container's name and ports (named `targetPort`s resolve against
/// them), and the restart policy that makes an init container a sidecar.
fn container(c: Container) -> Container {
    Container {
        name: c.name,
        ports: c.ports,
        restart_policy: c.restart_policy,
        ..Container::default()
    }
}

pub(super) fn pod(p: Pod) -> Pod {
    let spec = p.spec.map(|s| PodSpec {
        containers: s.containers.into_iter().map(container).collect(),
        init_containers: s.init_containers.map(|cs| {
            cs.into_iter()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"))
                .map(container)
                .collect()
        }),
        hostname: s.hostname,
        subdomain: s.subdomain,
        node_name: s.node_name,
        ..PodSpec::default()
    });
    let status = p.status.map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        conditions: s.conditions.map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| PodCondition {
                    type_: c.type_,
                    status: c.status,
                    ..PodCondition::default()
                })
                .collect()
        }),
        ..PodStatus::default()
    });
    Pod {
        metadata: meta(p.metadata),
        spec,
        status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_keeps_what_the_allocator_controllers_and_translation_read() {
        let yaml = r#"
metadata:
  name: web
  namespace: shop
  labels: {app: web, service.kubernetes.io/service-proxy-name: other}
  creationTimestamp: "2026-01-02T03:04:05Z"
  annotations: {note: dropped}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  selector: {app: web}
  publishNotReadyAddresses: true
  internalTrafficPolicy: Local
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}
  externalIPs: [192.0.2.1]
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: http, nodePort: 30080}
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.9, ipMode: Proxy}]
  conditions: []
"#;
        let full: Service = serde_yaml::from_str(yaml).unwrap();
        let kept = service(full.clone());
        assert_eq!(
            kept.info(SmolStr::default(), None),
            ServiceInfo::from(&full)
        );
        let back = kept.clone().into_service();
        let ingress = back.status.as_ref().unwrap().load_balancer.as_ref();
        assert_eq!(ingress, full.status.unwrap().load_balancer.as_ref());
        assert_eq!(back.status.as_ref().unwrap().conditions, None);
        assert_eq!(back.metadata.annotations, None);
        assert_eq!(back.metadata.labels, full.metadata.labels);
        assert_eq!(
            back.metadata.creation_timestamp,
            full.metadata.creation_timestamp
        );
        let (spec, was) = (back.spec.unwrap(), full.spec.unwrap());
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        let info = kept.info(SmolStr::default(), None).spec.unwrap();
        assert_eq!(info.session_affinity_timeout(), Some(5));
        assert_eq!(spec, was);
        assert_eq!(service(back_again(&kept)), kept);
    }

    fn back_again(s: &SlimService) -> Service {
        s.clone().into_service()
    }

    #[test]
    fn a_pod_keeps_what_the_controllers_read() {
        let yaml = r#"
metadata:
  name: web
  namespace: shop
  labels: {app: web}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: "{...}"
spec:
  nodeName: node-1
  hostname: web-0
  subdomain: web
  containers:
  - name: app
    image: nginx
    args: ["-g", "daemon off;"]
    ports: [{name: http, containerPort: 8080}]
  initContainers:
  - name: proxy
    image: envoy
    restartPolicy: Always
    ports: [{name: admin, containerPort: 9901}]
  - name: migrate
    image: tool
  volumes: [{name: data, emptyDir: {}}]
status:
  phase: Running
  podIP: 10.244.0.5
  podIPs: [{ip: 10.244.0.5}]
  conditions:
  - {type: Ready, status: "True", reason: ok}
  - {type: PodScheduled, status: "True"}
"#;
        let p = pod(serde_yaml::from_str(yaml).unwrap());
        assert_eq!(p.metadata.annotations, None);
        assert_eq!(p.metadata.labels.as_ref().unwrap()["app"], "web");
        let spec = p.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        assert_eq!(spec.hostname.as_deref(), Some("web-0"));
        assert_eq!(spec.subdomain.as_deref(), Some("web"));
        assert_eq!(spec.volumes, None);
        assert_eq!(spec.containers[0].image, None);
        assert_eq!(
            spec.containers[0].ports.as_ref().unwrap()[0].container_port,
            8080
        );
        let init = spec.init_containers.unwrap();
        assert_eq!(init.len(), 1, "only the sidecar");
        assert_eq!(init[0].ports.as_ref().unwrap()[0].container_port, 9901);
        let status = p.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.244.0.5"));
        let conditions = status.conditions.unwrap();
        assert_eq!(conditions.len(), 1);
        assert_eq!(
            (conditions[0].type_.as_str(), conditions[0].status.as_str()),
            ("Ready", "True")
        );
        assert_eq!(conditions[0].reason, None);
    }
}
