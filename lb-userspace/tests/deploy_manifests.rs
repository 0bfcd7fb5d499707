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
