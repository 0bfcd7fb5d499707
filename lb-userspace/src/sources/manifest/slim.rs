//! What the cache keeps of a parsed object: only the fields the allocator,
//! the controllers and translation read. A Pod as written is kilobytes of
//! containers, volumes and `last-applied-configuration`; a node with
//! 100,000 Pods in its manifests should not hold all of that.
//!
//! Applied after validation, so every diagnostic still sees the object as
//! written.
use k8s_openapi::{
    api::core::v1::{Container, Endpoints, Pod, PodCondition, PodSpec, PodStatus, Service},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
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

pub(super) fn service(s: Service) -> Service {
    Service {
        metadata: meta(s.metadata),
        spec: s.spec,
        status: None,
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
