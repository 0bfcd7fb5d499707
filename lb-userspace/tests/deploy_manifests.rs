//! deploy/ against the Kubernetes API types: every document parses as its
//! kind and survives a round trip through `k8s-openapi` unchanged, so a
//! misspelt or misplaced field (which the API server would drop or refuse)
//! fails here; and the DaemonSet runs the image `cargo xtask image` builds,
//! with the capabilities the README documents.
use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// deploy/'s Grafana dashboard.
const DASHBOARD: &str = "grafana-dashboard.json";

/// Every YAML document of every file in deploy/, with its file name.
fn documents() -> Vec<(String, serde_json::Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/")
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        // The Grafana dashboard is no Kubernetes object: checked by
        // `the_dashboard_queries_metrics_the_agent_exports`.
        if name == DASHBOARD {
            continue;
        }
        assert!(
            name.ends_with(".yaml"),
            "deploy/{name}: only Kubernetes manifests belong in deploy/ (the image is built by cargo xtask image)"
        );
        let text = std::fs::read_to_string(&file).expect("readable");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("deploy/{name}: {e}"));
            if !value.is_null() {
                docs.push((name.clone(), value));
            }
        }
    }
    docs
}

/// Parses `doc` as `T` and checks that serialising it gives `doc` back.
fn strict<T: DeserializeOwned + Serialize>(file: &str, doc: &serde_json::Value) -> T {
    let typed: T = serde_path_to_error::deserialize(doc)
        .unwrap_or_else(|e| panic!("deploy/{file}: {} at {}", e.inner(), e.path()));
    let back = serde_json::to_value(&typed).expect("serialisable");
    assert_eq!(
        &back, doc,
        "deploy/{file}: a field the API types do not know (it would be dropped)"
    );
    typed
}

#[test]
fn deploy_manifests_are_strictly_valid_api_objects() {
    let docs = documents();
    let mut kinds = Vec::new();
    for (file, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        match kind {
            "DaemonSet" => drop(strict::<DaemonSet>(file, doc)),
            "ServiceAccount" => drop(strict::<ServiceAccount>(file, doc)),
            "ClusterRole" => drop(strict::<ClusterRole>(file, doc)),
            "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(file, doc)),
            // A Prometheus Operator CRD, not in k8s-openapi: checked by
            // hand, field by field, against the DaemonSet it scrapes.
            "PodMonitor" => pod_monitor(file, doc),
            other => panic!("deploy/{file}: unexpected kind {other:?}"),
        }
        kinds.push(kind.to_owned());
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "PodMonitor",
            "ServiceAccount"
        ]
    );
}

fn daemonset() -> DaemonSet {
    let (file, doc) = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "DaemonSet")
        .expect("a DaemonSet in deploy/");
    strict(&file, &doc)
}

fn containers(ds: &DaemonSet) -> (Vec<Container>, Vec<Container>) {
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("a pod spec");
    (pod.init_containers.unwrap_or_default(), pod.containers)
}

#[test]
fn the_daemonset_runs_the_built_image_with_bpf_net_admin_and_perfmon() {
    let tag = format!("localhost/lb-agent:{}", env!("CARGO_PKG_VERSION"));
    let (init, main) = containers(&daemonset());
    for c in init.iter().chain(&main) {
        assert_eq!(c.image.as_deref(), Some(tag.as_str()), "{}", c.name);
        // The image has no shell: arguments go to the agent's entrypoint.
        assert_eq!(c.command, None, "{}", c.name);
    }
    let [agent] = main.as_slice() else {
        panic!("one agent container, got {}", main.len());
    };
    assert_eq!(
        agent
            .args
            .as_ref()
            .and_then(|a| a.first())
            .map(String::as_str),
        Some("run")
    );
    let sc = agent.security_context.as_ref().expect("a securityContext");
    assert_eq!(sc.privileged, None);
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(
        caps.add.as_deref(),
        Some(&["BPF".to_owned(), "NET_ADMIN".into(), "PERFMON".into()][..])
    );
    // Only the init container mounts bpffs, with the agent's own subcommand.
    let [mount] = init.as_slice() else {
        panic!("one init container, got {}", init.len());
    };
    assert_eq!(mount.args.as_deref(), Some(&["mount-bpffs".to_owned()][..]));
}

/// The keys of a JSON object, sorted.
fn keys(v: &serde_json::Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    k.sort_unstable();
    k
}

/// The PodMonitor has only fields of `monitoring.coreos.com/v1` (those it
/// needs), selects the DaemonSet's pods and scrapes `/metrics` on the
/// agent container's port named in it, which is the `--health-addr` port.
fn pod_monitor(file: &str, doc: &serde_json::Value) {
    assert_eq!(
        doc["apiVersion"], "monitoring.coreos.com/v1",
        "deploy/{file}"
    );
    assert_eq!(
        keys(doc),
        ["apiVersion", "kind", "metadata", "spec"],
        "deploy/{file}"
    );
    assert_eq!(
        keys(&doc["metadata"]),
        ["labels", "name", "namespace"],
        "deploy/{file}"
    );
    assert_eq!(
        keys(&doc["spec"]),
        ["podMetricsEndpoints", "selector"],
        "deploy/{file}"
    );
    let ds = daemonset();
    let pod_labels = serde_json::to_value(
        &ds.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels,
    )
    .unwrap();
    assert_eq!(
        keys(&doc["spec"]["selector"]),
        ["matchLabels"],
        "deploy/{file}"
    );
    assert_eq!(
        doc["spec"]["selector"]["matchLabels"], pod_labels,
        "deploy/{file}: selects no lb-agent pod"
    );
    assert_eq!(
        doc["metadata"]["namespace"].as_str(),
        ds.metadata.namespace.as_deref(),
        "deploy/{file}: not in the DaemonSet's namespace"
    );
    let endpoints = doc["spec"]["podMetricsEndpoints"]
        .as_array()
        .expect("podMetricsEndpoints");
    let [ep] = endpoints.as_slice() else {
        panic!("deploy/{file}: one endpoint, got {}", endpoints.len());
    };
    assert_eq!(keys(ep), ["interval", "path", "port"], "deploy/{file}");
    assert_eq!(ep["path"], "/metrics", "deploy/{file}");
    let (_, main) = containers(&ds);
    let port = main[0]
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == ep["port"].as_str())
        .unwrap_or_else(|| panic!("deploy/{file}: the agent has no port named {}", ep["port"]));
    let health = main[0]
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix("--health-addr="))
        .expect("--health-addr in the DaemonSet");
    assert_eq!(
        health.rsplit_once(':').map(|(_, p)| p),
        Some(port.container_port.to_string().as_str()),
        "deploy/{file}: the metrics port is not --health-addr's"
    );
}

/// Every query of the Grafana dashboard names only metric families the
/// agent exports (a renamed metric would leave a panel silently empty).
#[test]
fn the_dashboard_queries_metrics_the_agent_exports() {
    let text = std::fs::read_to_string(deploy_dir().join(DASHBOARD)).expect("the dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 4);
    let mut seen = std::collections::BTreeSet::new();
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("lb_") {
                    continue;
                }
                let family = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                assert!(
                    lb_userspace::metrics::FAMILIES.contains(&family),
                    "panel {}: {word} is not exported",
                    p["title"]
                );
                seen.insert(family.to_owned());
            }
        }
    }
    // What the issue asks of it: connects, refusals, map fill, programming latency.
    for needed in [
        "lb_service_translations",
        "lb_service_refused",
        "lb_map_entries",
        "lb_map_capacity",
        "lb_network_programming_duration_seconds",
    ] {
        assert!(seen.contains(needed), "no panel shows {needed}");
    }
}
