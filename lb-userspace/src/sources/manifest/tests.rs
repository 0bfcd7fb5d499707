use std::{collections::BTreeMap, fmt::Write as _, fs, net::Ipv4Addr, path::Path};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use tempfile::TempDir;

use super::{ClusterIpAllocator, Manifests, ServiceCidr, load_dir, parse::split_documents};
use crate::model::{Diagnostic, SOURCE_ANNOTATION};

const BACK_END: &str = include_str!("../../../../examples/back-end/back-end.yaml");

fn cidr() -> ServiceCidr {
    "10.96.0.0/12".parse().unwrap()
}

fn write_files(dir: &Path, files: &[(&str, &str)]) {
    for (name, text) in files {
        fs::write(dir.join(name), text).unwrap();
    }
}

fn load_with(files: &[(&str, &str)], alloc: &mut ClusterIpAllocator) -> Manifests {
    let dir = TempDir::new().unwrap();
    write_files(dir.path(), files);
    load_dir(dir.path(), alloc)
}

fn load(files: &[(&str, &str)]) -> Manifests {
    load_with(files, &mut ClusterIpAllocator::new(cidr(), []))
}

fn service<'a>(m: &'a Manifests, name: &str) -> &'a Service {
    m.services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no service {name}"))
}

fn cluster_ip(m: &Manifests, name: &str) -> String {
    let spec = service(m, name).spec.as_ref().unwrap();
    let ip = spec.cluster_ip.clone().unwrap();
    assert_eq!(spec.cluster_ips.as_deref(), Some(std::slice::from_ref(&ip)));
    ip
}

fn slices_of<'a>(m: &'a Manifests, svc: &str) -> Vec<&'a EndpointSlice> {
    m.slices
        .iter()
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                .map(String::as_str)
                == Some(svc)
        })
        .collect()
}

/// (address, ready, serving, terminating) per endpoint.
type Ep = (String, Option<bool>, Option<bool>, Option<bool>);

fn endpoints(slice: &EndpointSlice) -> Vec<Ep> {
    slice
        .endpoints
        .iter()
        .map(|e| {
            let c = e.conditions.clone().unwrap_or_default();
            (e.addresses.join(","), c.ready, c.serving, c.terminating)
        })
        .collect()
}

fn ep(ip: &str, ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> Ep {
    (ip.to_owned(), ready, serving, terminating)
}

/// (name, port, protocol) of a slice port.
type Port = (String, i32, String);

fn ports(slice: &EndpointSlice) -> Vec<Port> {
    slice
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port.unwrap_or_default(),
                p.protocol.clone().unwrap_or_default(),
            )
        })
        .collect()
}

fn port(name: &str, n: i32) -> Port {
    (name.to_owned(), n, "TCP".to_owned())
}

fn source(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(SOURCE_ANNOTATION))
        .map_or("", String::as_str)
}

fn d(source: &str, object: &str, field: &str, message: &str) -> Diagnostic {
    Diagnostic {
        source: source.to_owned(),
        object: object.to_owned(),
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

fn svc_yaml(name: &str, selector_app: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  selector:
    app: {selector_app}
  ports:
  - port: 80
    targetPort: 8080
{extra_spec}"
    )
}

/// A running pod; `extra_meta`/`extra_status` are indented YAML lines.
fn pod_yaml(name: &str, app: &str, ip: &str, ready: bool, extra_meta: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels:
    app: {app}
{extra_meta}spec:
  nodeName: node-a
  containers:
  - name: c
    image: nginx
status:
  phase: Running
  podIP: {ip}
  conditions:
  - type: Ready
    status: \"{}\"
",
        if ready { "True" } else { "False" }
    )
}

fn docs(parts: &[&str]) -> String {
    parts.join("---\n")
}

#[test]
fn textbook_example() {
    let m = load(&[("back-end.yaml", BACK_END)]);
    assert_eq!(m.diagnostics, vec![]);
    assert_eq!(m.services.len(), 1);
    let ip: Ipv4Addr = cluster_ip(&m, "back-end").parse().unwrap();
    let octets = ip.octets();
    assert!(octets[0] == 10 && (96..112).contains(&octets[1]), "{ip}");
    assert_ne!(ip, Ipv4Addr::new(10, 96, 0, 1));
    assert_eq!(
        service(&m, "back-end").metadata.namespace.as_deref(),
        Some("default")
    );
    assert_eq!(source(&service(&m, "back-end").metadata), "back-end.yaml#1");

    assert_eq!(m.slices.len(), 1);
    let slice = &m.slices[0];
    assert_eq!(slice.address_type, "IPv4");
    assert_eq!(slice.metadata.namespace.as_deref(), Some("default"));
    assert!(
        slice
            .metadata
            .name
            .as_deref()
            .unwrap()
            .starts_with("back-end-")
    );
    assert_eq!(source(&slice.metadata), "back-end.yaml#1");
    let labels = slice.metadata.labels.clone().unwrap();
    assert_eq!(labels["kubernetes.io/service-name"], "back-end");
    assert_eq!(labels["endpointslice.kubernetes.io/managed-by"], "lb-agent");
    assert_eq!(ports(slice), vec![port("", 80)]);
    let t = Some(true);
    let f = Some(false);
    assert_eq!(
        endpoints(slice),
        vec![
            ep("10.244.1.11", t, t, f),
            ep("10.244.1.12", t, t, f),
            ep("10.244.1.13", t, t, f),
        ]
    );
    let target = slice.endpoints[0].target_ref.clone().unwrap();
    assert_eq!(target.kind.as_deref(), Some("Pod"));
    assert_eq!(target.name.as_deref(), Some("back-end-1"));
    assert_eq!(target.namespace.as_deref(), Some("default"));
}

#[test]
fn multi_document_files_and_lists() {
    let list = "apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: b, namespace: other}
  spec: {selector: {app: b}, ports: [{port: 80}]}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: cm}
";
    let multi = format!(
        "# leading comment\n---\n{}---\n---\n{}...\n",
        svc_yaml("a", "a", ""),
        pod_yaml("a-1", "a", "10.0.0.1", true, "")
    );
    let m = load(&[("1-multi.yaml", &multi), ("2-list.yml", list)]);
    assert_eq!(
        m.diagnostics,
        vec![d(
            "2-list.yml#1.items[1]",
            "ConfigMap default/cm",
            "",
            "kind ConfigMap (apiVersion v1) is not used by lb-agent; ignored"
        )]
    );
    assert_eq!(m.services.len(), 2);
    assert_eq!(source(&service(&m, "a").metadata), "1-multi.yaml#1");
    assert_eq!(source(&service(&m, "b").metadata), "2-list.yml#1.items[0]");
    assert_eq!(
        service(&m, "b").metadata.namespace.as_deref(),
        Some("other")
    );
    let a = slices_of(&m, "a");
    assert_eq!(a.len(), 1);
    assert_eq!(ports(a[0]), vec![port("", 8080)]);
    assert_eq!(
        endpoints(a[0]),
        vec![ep("10.0.0.1", Some(true), Some(true), Some(false))]
    );
    // A selector matches nothing in another namespace.
    assert_eq!(slices_of(&m, "b").len(), 0);
}

#[test]
fn documents_split_like_serde_yaml() {
    let docs = split_documents("# c\n---\na: 1\n--- |\n  x\n---\n...\n\nb: 2\n");
    let texts: Vec<(&str, usize)> = docs.iter().map(|d| (d.text, d.line)).collect();
    assert_eq!(
        texts,
        vec![
            ("\na: 1\n", 2),
            (" |\n  x\n", 4),
            ("\n", 6),
            ("\nb: 2\n", 8)
        ]
    );
    assert_eq!(split_documents("a: 1\n").len(), 1);
    assert_eq!(split_documents("").len(), 0);
    assert_eq!(split_documents("---").len(), 1);
    assert_eq!(split_documents("a: ---x\n----\n").len(), 1);
}

#[test]
fn named_target_port_resolves_per_pod() {
    let svc = "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: metrics, port: 9090, targetPort: 9090}
";
    let pod = |name: &str, ip: &str, ports: &str| {
        format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: web}}}}
spec:
  containers:
  - name: c
    ports: {ports}
status:
  podIP: {ip}
  conditions: [{{type: Ready, status: \"True\"}}]
"
        )
    };
    let text = docs(&[
        svc,
        &pod("web-1", "10.0.0.1", "[{name: http, containerPort: 8080}]"),
        &pod("web-2", "10.0.0.2", "[{name: http, containerPort: 8081}]"),
        &pod("web-3", "10.0.0.3", "[{name: http, containerPort: 8080}]"),
        // The name exists only for UDP: no http entry, metrics still served.
        &pod(
            "web-4",
            "10.0.0.4",
            "[{name: http, containerPort: 8080, protocol: UDP}]",
        ),
    ]);
    let m = load(&[("web.yaml", &text)]);
    assert_eq!(m.diagnostics, vec![]);
    let mut got: Vec<(Vec<Port>, Vec<String>)> = slices_of(&m, "web")
        .into_iter()
        .map(|s| (ports(s), endpoints(s).into_iter().map(|e| e.0).collect()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (
                vec![port("http", 8080), port("metrics", 9090)],
                vec!["10.0.0.1".into(), "10.0.0.3".into()]
            ),
            (
                vec![port("http", 8081), port("metrics", 9090)],
                vec!["10.0.0.2".into()]
            ),
            (vec![port("metrics", 9090)], vec!["10.0.0.4".into()]),
        ]
    );
    let names: Vec<&str> = m
        .slices
        .iter()
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    assert_eq!(names.len(), 3);
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("web-") && n.len() == "web-".len() + 10)
    );
    assert_ne!(names[0], names[1]);
}

#[test]
fn pod_conditions_follow_the_endpointslice_controller() {
    let terminating = "  deletionTimestamp: \"2024-01-01T00:00:00Z\"\n";
    let text = docs(&[
        &svc_yaml("s", "s", ""),
        &pod_yaml("s-ready", "s", "10.0.0.1", true, ""),
        &pod_yaml("s-unready", "s", "10.0.0.2", false, ""),
        &pod_yaml("s-terminating", "s", "10.0.0.3", true, terminating),
        &pod_yaml("s-terminating-unready", "s", "10.0.0.4", false, terminating),
    ]);
    let m = load(&[("s.yaml", &text)]);
    assert_eq!(m.diagnostics, vec![]);
    let s = slices_of(&m, "s");
    assert_eq!(s.len(), 1);
    let (t, f) = (Some(true), Some(false));
    // Sorted by pod name.
    assert_eq!(
        endpoints(s[0]),
        vec![
            ep("10.0.0.1", t, t, f),
            ep("10.0.0.3", f, t, t),
            ep("10.0.0.4", f, f, t),
            ep("10.0.0.2", f, f, f),
        ]
    );
    assert_eq!(s[0].endpoints[0].node_name.as_deref(), Some("node-a"));
}

#[test]
fn publish_not_ready_addresses_makes_every_pod_ready() {
    let terminating = "  deletionTimestamp: \"2024-01-01T00:00:00Z\"\n";
    let text = docs(&[
        &svc_yaml("s", "s", "  publishNotReadyAddresses: true\n"),
        &pod_yaml("s-1", "s", "10.0.0.1", false, ""),
        &pod_yaml("s-2", "s", "10.0.0.2", true, terminating),
    ]);
    let m = load(&[("s.yaml", &text)]);
    let s = slices_of(&m, "s");
    let (t, f) = (Some(true), Some(false));
    assert_eq!(
        endpoints(s[0]),
        vec![ep("10.0.0.1", t, f, f), ep("10.0.0.2", t, t, t)]
    );
}

#[test]
fn finished_and_addressless_pods_are_not_endpoints() {
    let succeeded = pod_yaml("s-done", "s", "10.0.0.1", true, "").replace("Running", "Succeeded");
    let failed = pod_yaml("s-failed", "s", "10.0.0.2", true, "").replace("Running", "Failed");
    let pending =
        pod_yaml("s-pending", "s", "10.0.0.3", false, "").replace("  podIP: 10.0.0.3\n", "");
    let bad_ip = pod_yaml("s-bad", "s", "10.0.0.300", true, "");
    let v6 = pod_yaml("s-v6", "s", "fd00::1", true, "");
    let text = docs(&[
        &svc_yaml("s", "s", ""),
        &succeeded,
        &failed,
        &pending,
        &bad_ip,
        &v6,
        &pod_yaml("s-ok", "s", "10.0.0.5", true, ""),
    ]);
    let m = load(&[("s.yaml", &text)]);
    assert_eq!(
        m.diagnostics,
        vec![d(
            "s.yaml#5",
            "Pod default/s-bad",
            "status.podIP",
            "\"10.0.0.300\" is not an IP address; the pod is not an endpoint"
        )]
    );
    let s = slices_of(&m, "s");
    assert_eq!(s.len(), 1);
    assert_eq!(
        endpoints(s[0]),
        vec![ep("10.0.0.5", Some(true), Some(true), Some(false))]
    );
}

#[test]
fn endpoints_are_mirrored_for_selectorless_services() {
    let text = "apiVersion: v1
kind: Service
metadata: {name: ext, labels: {team: db}}
spec:
  ports: [{name: pg, port: 5432}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: ext, labels: {team: db}}
subsets:
- addresses: [{ip: 192.168.0.10, nodeName: n1}, {ip: not-an-ip}]
  notReadyAddresses: [{ip: 192.168.0.11}]
  ports: [{name: pg, port: 5432}]
- addresses: [{ip: 192.168.0.20}]
  ports: [{name: pg, port: 6432, protocol: TCP}]
";
    let m = load(&[("ext.yaml", text)]);
    assert_eq!(
        m.diagnostics,
        vec![d(
            "ext.yaml#2",
            "Endpoints default/ext",
            "subsets[0].addresses[1].ip",
            "\"not-an-ip\" is not an IP address; the address is ignored"
        )]
    );
    let s = slices_of(&m, "ext");
    assert_eq!(s.len(), 2);
    assert_eq!(ports(s[0]), vec![port("pg", 5432)]);
    assert_eq!(
        endpoints(s[0]),
        vec![
            ep("192.168.0.10", Some(true), None, None),
            ep("192.168.0.11", Some(false), None, None)
        ]
    );
    assert_eq!(s[0].endpoints[0].node_name.as_deref(), Some("n1"));
    assert_eq!(ports(s[1]), vec![port("pg", 6432)]);
    assert_eq!(
        endpoints(s[1]),
        vec![ep("192.168.0.20", Some(true), None, None)]
    );
    assert_eq!(source(&s[0].metadata), "ext.yaml#2");
    let labels = s[0].metadata.labels.clone().unwrap();
    assert_eq!(labels["team"], "db");
    assert_eq!(labels["endpointslice.kubernetes.io/managed-by"], "lb-agent");
    // The service got an address although it has no selector.
    assert!(cluster_ip(&m, "ext").starts_with("10."));
}

#[test]
fn endpoints_are_not_mirrored_otherwise() {
    let endpoints = |name: &str, labels: &str| {
        format!(
            "apiVersion: v1
kind: Endpoints
metadata: {{name: {name}, labels: {{{labels}}}}}
subsets: [{{addresses: [{{ip: 192.168.0.1}}], ports: [{{port: 80}}]}}]
"
        )
    };
    let text = docs(&[
        &svc_yaml("sel", "sel", ""),
        &endpoints("sel", ""),
        "apiVersion: v1\nkind: Service\nmetadata: {name: skip}\nspec: {ports: [{port: 80}]}\n",
        &endpoints("skip", "endpointslice.kubernetes.io/skip-mirror: \"true\""),
        &endpoints("orphan", ""),
    ]);
    let m = load(&[("e.yaml", &text)]);
    assert_eq!(
        m.diagnostics,
        vec![d(
            "e.yaml#5",
            "Endpoints default/orphan",
            "",
            "no Service default/orphan; Endpoints are only used for a selectorless Service of the same name; ignored"
        )]
    );
    assert_eq!(m.slices.len(), 0);
}

#[test]
fn given_endpoint_slices_pass_through() {
    let text = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ext-1
  labels: {kubernetes.io/service-name: ext}
addressType: IPv4
ports: [{name: \"\", port: 8080, protocol: TCP}]
endpoints:
- addresses: [192.168.1.1]
  conditions: {ready: false, serving: true, terminating: true}
";
    let m = load(&[("slice.yaml", text)]);
    assert_eq!(m.diagnostics, vec![]);
    assert_eq!(m.slices.len(), 1);
    let s = &m.slices[0];
    assert_eq!(s.metadata.name.as_deref(), Some("ext-1"));
    assert_eq!(s.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(source(&s.metadata), "slice.yaml#1");
    assert_eq!(ports(s), vec![port("", 8080)]);
    assert_eq!(
        endpoints(s),
        vec![ep("192.168.1.1", Some(false), Some(true), Some(true))]
    );
}

#[test]
fn bad_objects_are_diagnostics_and_the_rest_loads() {
    let typed = format!(
        "{}---\n{}---\n{}",
        svc_yaml("good-1", "a", ""),
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec:\n  ports:\n  - port: eighty\n",
        svc_yaml("good-2", "a", "")
    );
    let broken = format!(
        "{}---\nkind: Service\n  metadata: [\n---\n{}",
        svc_yaml("good-3", "a", ""),
        svc_yaml("good-4", "a", "")
    );
    let m = load(&[
        ("a.yaml", &typed),
        ("b.yaml", &broken),
        ("c.yaml", "apiVersion: v1\nkind: Service\nspec: {}\n"),
        ("d.yaml", "- just\n- a list\n"),
    ]);
    let mut names: Vec<&str> = m
        .services
        .iter()
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    names.sort();
    assert_eq!(names, vec!["good-1", "good-2", "good-3", "good-4"]);
    assert_eq!(m.diagnostics.len(), 4, "{:#?}", m.diagnostics);
    assert_eq!(
        m.diagnostics[0],
        d(
            "a.yaml#2",
            "Service default/bad",
            "spec.ports[0].port",
            "invalid type: string \"eighty\", expected i32; the object is ignored"
        )
    );
    let syntax = &m.diagnostics[1];
    assert_eq!(
        (
            syntax.source.as_str(),
            syntax.object.as_str(),
            syntax.field.as_str()
        ),
        ("b.yaml#2", "", "")
    );
    // Line numbers are the file's, not the document's.
    assert!(
        syntax.message.starts_with("invalid YAML: "),
        "{}",
        syntax.message
    );
    assert!(syntax.message.contains("line 13"), "{}", syntax.message);
    assert_eq!(
        m.diagnostics[2],
        d(
            "c.yaml#1",
            "Service",
            "metadata.name",
            "missing metadata.name; the object is ignored"
        )
    );
    assert_eq!(
        m.diagnostics[3],
        d(
            "d.yaml#1",
            "",
            "",
            "not a Kubernetes object (expected a mapping with apiVersion and kind)"
        )
    );
}

#[test]
fn unknown_kinds_and_wrong_api_versions() {
    let text = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: prod}
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: old}
---
apiVersion: v1
metadata: {name: nokind}
";
    let m = load(&[("k.yaml", text)]);
    assert_eq!(
        m.diagnostics,
        vec![
            d(
                "k.yaml#1",
                "Deployment prod/web",
                "",
                "kind Deployment (apiVersion apps/v1) is not used by lb-agent; ignored"
            ),
            d(
                "k.yaml#2",
                "EndpointSlice default/old",
                "apiVersion",
                "apiVersion discovery.k8s.io/v1beta1 is not supported for EndpointSlice (expected discovery.k8s.io/v1); the object is ignored"
            ),
            d(
                "k.yaml#3",
                "default/nokind",
                "kind",
                "missing kind; the object is ignored"
            ),
        ]
    );
}

#[test]
fn duplicates_keep_the_first_definition() {
    let first = svc_yaml("s", "first", "");
    let second = svc_yaml("s", "second", "");
    let m = load(&[
        ("a.yaml", &first),
        ("b.yaml", &second),
        // Dot files and other extensions are not read.
        (".b.yaml.swp", "garbage: ["),
        (".hidden.yaml", &second),
        ("notes.txt", "garbage: ["),
    ]);
    assert_eq!(
        m.diagnostics,
        vec![d(
            "b.yaml#1",
            "Service default/s",
            "metadata.name",
            "Service default/s is already defined in a.yaml#1; this definition is ignored"
        )]
    );
    assert_eq!(m.services.len(), 1);
    let selector = service(&m, "s")
        .spec
        .as_ref()
        .unwrap()
        .selector
        .clone()
        .unwrap();
    assert_eq!(
        selector,
        BTreeMap::from([("app".to_owned(), "first".to_owned())])
    );
    // Same name, different kind or namespace: not duplicates.
    let other_ns = svc_yaml("s", "x", "").replace("name: s\n", "name: s\n  namespace: other\n");
    let m = load(&[
        ("a.yaml", &first),
        ("b.yaml", &other_ns),
        ("c.yaml", &pod_yaml("s", "x", "10.0.0.1", true, "")),
    ]);
    assert_eq!(m.diagnostics, vec![]);
    assert_eq!(m.services.len(), 2);
}

#[test]
fn cluster_ips_are_stable() {
    let mut alloc = ClusterIpAllocator::new(cidr(), []);
    let a = svc_yaml("a", "a", "");
    let m1 = load_with(&[("a.yaml", &a)], &mut alloc);
    let ip_a = cluster_ip(&m1, "a");
    let key = ("default".to_owned(), "a".to_owned());
    assert_eq!(
        alloc.assigned,
        BTreeMap::from([(key.clone(), ip_a.parse().unwrap())])
    );

    // Adding other services (sorting before and after) does not move it.
    let others = docs(&[&svc_yaml("0-first", "x", ""), &svc_yaml("z", "x", "")]);
    let m2 = load_with(&[("a.yaml", &a), ("b.yaml", &others)], &mut alloc);
    assert_eq!(cluster_ip(&m2, "a"), ip_a);
    let ip_z = cluster_ip(&m2, "z");
    assert_eq!(alloc.assigned.len(), 3);

    // Editing it (ports, selector, file) does not move it either.
    let edited = svc_yaml("a", "changed", "").replace("port: 80", "port: 81");
    let m3 = load_with(&[("b.yaml", &others), ("c.yaml", &edited)], &mut alloc);
    assert_eq!(cluster_ip(&m3, "a"), ip_a);
    assert_eq!(cluster_ip(&m3, "z"), ip_z);

    // A restarted agent seeded from the maps keeps every address.
    let mut restarted = ClusterIpAllocator::new(cidr(), alloc.assigned.clone());
    let m4 = load_with(&[("b.yaml", &others), ("c.yaml", &edited)], &mut restarted);
    assert_eq!(cluster_ip(&m4, "a"), ip_a);
    assert_eq!(cluster_ip(&m4, "z"), ip_z);

    // A fresh agent without that state computes the same addresses here
    // (no collisions), because the hash is deterministic.
    let m5 = load(&[("b.yaml", &others), ("c.yaml", &edited)]);
    assert_eq!(cluster_ip(&m5, "a"), ip_a);

    // Removed services release their addresses.
    let _ = load_with(&[("c.yaml", &edited)], &mut alloc);
    assert_eq!(
        alloc.assigned,
        BTreeMap::from([(key, ip_a.parse().unwrap())])
    );
}

#[test]
fn explicit_cluster_ip_takes_over_an_allocated_one() {
    let mut alloc = ClusterIpAllocator::new(cidr(), []);
    let a = svc_yaml("a", "a", "");
    let ip_a = cluster_ip(&load_with(&[("a.yaml", &a)], &mut alloc), "a");
    let b = svc_yaml("b", "b", &format!("  clusterIP: {ip_a}\n"));
    let m = load_with(&[("a.yaml", &a), ("b.yaml", &b)], &mut alloc);
    assert_eq!(m.diagnostics, vec![]);
    assert_eq!(cluster_ip(&m, "b"), ip_a);
    let moved = cluster_ip(&m, "a");
    assert_ne!(moved, ip_a);
    // Only allocations are tracked; the explicit address is not.
    assert_eq!(
        alloc.assigned,
        BTreeMap::from([(
            ("default".to_owned(), "a".to_owned()),
            moved.parse().unwrap()
        )])
    );

    // A seeded address outside the CIDR (or reserved) is not reused.
    let mut seeded = ClusterIpAllocator::new(
        cidr(),
        [(
            ("default".to_owned(), "a".to_owned()),
            Ipv4Addr::new(192, 168, 0, 1),
        )],
    );
    let m = load_with(&[("a.yaml", &a)], &mut seeded);
    assert_eq!(cluster_ip(&m, "a"), ip_a);
}

#[test]
fn special_cluster_ips() {
    let text = docs(&[
        &svc_yaml("headless", "x", "  clusterIP: None\n"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: extname}\nspec: {type: ExternalName, externalName: example.com}\n",
        &svc_yaml("listed", "x", "  clusterIPs: [10.96.5.5]\n"),
        &svc_yaml("outside", "x", "  clusterIP: 172.16.0.1\n"),
        &svc_yaml("kubernetes", "x", ""),
        &pod_yaml("x-1", "x", "10.0.0.1", true, ""),
    ]);
    let m = load(&[("s.yaml", &text)]);
    assert_eq!(m.diagnostics, vec![]);
    let spec = |n: &str| service(&m, n).spec.clone().unwrap();
    assert_eq!(spec("headless").cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec("headless").cluster_ips, None);
    assert_eq!(spec("extname").cluster_ip, None);
    assert_eq!(cluster_ip(&m, "listed"), "10.96.5.5");
    assert_eq!(spec("outside").cluster_ip.as_deref(), Some("172.16.0.1"));
    assert_eq!(cluster_ip(&m, "kubernetes"), "10.96.0.1");
    // Headless services get slices too, labelled as such.
    let headless = slices_of(&m, "headless");
    assert_eq!(headless.len(), 1);
    let labels = headless[0].metadata.labels.clone().unwrap();
    assert_eq!(
        labels
            .get("service.kubernetes.io/headless")
            .map(String::as_str),
        Some("")
    );
    assert_eq!(slices_of(&m, "extname").len(), 0);
    assert_eq!(slices_of(&m, "outside").len(), 1);
}

#[test]
fn full_cidr_is_a_diagnostic() {
    // A /30 has exactly one allocatable address.
    let small: ServiceCidr = "10.0.0.0/30".parse().unwrap();
    let mut alloc = ClusterIpAllocator::new(small, []);
    let text = docs(&[
        &svc_yaml("a", "a", ""),
        &svc_yaml("b", "b", ""),
        &svc_yaml("c", "c", ""),
    ]);
    let m = load_with(&[("s.yaml", &text)], &mut alloc);
    assert_eq!(m.services.len(), 1);
    assert_eq!(cluster_ip(&m, "a"), "10.0.0.2");
    let message = "service CIDR 10.0.0.0/30 has no free address; the service is ignored";
    assert_eq!(
        m.diagnostics,
        vec![
            d("s.yaml#2", "Service default/b", "spec.clusterIP", message),
            d("s.yaml#3", "Service default/c", "spec.clusterIP", message),
        ]
    );
}

#[test]
fn cidr_parsing() {
    let ok: ServiceCidr = "10.96.0.0/12".parse().unwrap();
    assert_eq!(
        ok,
        ServiceCidr {
            network: Ipv4Addr::new(10, 96, 0, 0),
            prefix_len: 12
        }
    );
    assert_eq!(ok.to_string(), "10.96.0.0/12");
    let err = |s: &str| s.parse::<ServiceCidr>().unwrap_err();
    assert_eq!(
        err("10.96.0.1/12"),
        "10.96.0.1/12: host bits set; did you mean 10.96.0.0/12?"
    );
    assert_eq!(
        err("10.96.0.0"),
        "\"10.96.0.0\": expected an IPv4 CIDR such as 10.96.0.0/12"
    );
    assert_eq!(
        err("10.96.0/12"),
        "10.96.0/12: \"10.96.0\" is not an IPv4 address"
    );
    assert_eq!(
        err("fd00::/108"),
        "fd00::/108: only IPv4 service CIDRs are supported"
    );
    assert_eq!(
        err("10.96.0.0/x"),
        "10.96.0.0/x: prefix length \"x\" is not a number"
    );
    assert_eq!(
        err("10.96.0.0/31"),
        "10.96.0.0/31: prefix length must be between 8 and 30 (a /31 or /32 leaves no address to allocate)"
    );
    assert!(err("10.0.0.0/7").contains("between 8 and 30"));
}

#[test]
fn unreadable_directory_is_a_diagnostic() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("missing");
    let m = load_dir(&missing, &mut ClusterIpAllocator::new(cidr(), []));
    assert_eq!(m.services.len(), 0);
    assert_eq!(m.diagnostics.len(), 1);
    assert_eq!(m.diagnostics[0].source, missing.display().to_string());
    assert!(
        m.diagnostics[0]
            .message
            .starts_with("cannot read the manifest directory: ")
    );

    // A directory named like a manifest cannot be read as a file.
    fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    write_files(dir.path(), &[("x.yaml", &svc_yaml("x", "x", ""))]);
    let m = load_dir(dir.path(), &mut ClusterIpAllocator::new(cidr(), []));
    assert_eq!(m.services.len(), 1);
    assert_eq!(m.diagnostics.len(), 1);
    assert_eq!(
        m.diagnostics[0].source,
        dir.path().join("sub.yaml").display().to_string()
    );
    assert!(
        m.diagnostics[0]
            .message
            .starts_with("cannot read the file: ")
    );
}

#[test]
fn thousand_services_ten_thousand_pods() {
    let mut files = vec![String::new(); 5];
    for i in 0..1000 {
        let ns = if i % 2 == 0 { "even" } else { "odd" };
        let _ = write!(
            files[0],
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: {ns}}}\nspec:\n  selector: {{app: app-{i}, tier: web}}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n"
        );
        for j in 0..10 {
            let _ = write!(
                files[1 + j % 4],
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{i}-{j}\n  namespace: {ns}\n  labels: {{app: app-{i}, tier: web}}\nspec:\n  containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]\nstatus:\n  podIP: 10.{}.{}.{j}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
                i / 250,
                i % 250
            );
        }
    }
    let named: Vec<(String, &str)> = files
        .iter()
        .enumerate()
        .map(|(i, text)| (format!("{i}.yaml"), text.as_str()))
        .collect();
    let refs: Vec<(&str, &str)> = named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let started = std::time::Instant::now();
    let m = load(&refs);
    eprintln!("loaded in {:?}", started.elapsed());
    assert_eq!(m.diagnostics, vec![]);
    assert_eq!(m.services.len(), 1000);
    assert_eq!(m.slices.len(), 1000);
    assert_eq!(
        m.slices.iter().map(|s| s.endpoints.len()).sum::<usize>(),
        10_000
    );
    assert!(
        m.slices
            .iter()
            .all(|s| ports(s) == vec![port("http", 8080)])
    );
    let ips: std::collections::HashSet<String> = m
        .services
        .iter()
        .filter_map(|s| s.spec.as_ref()?.cluster_ip.clone())
        .collect();
    assert_eq!(ips.len(), 1000);
}
