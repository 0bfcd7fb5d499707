use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use tempfile::TempDir;

use super::{
    Allocator, FamilyIps, IpFamily, Manifests, ServiceCidr, ServiceCidrError, load_dir,
    parse::split_documents, read::DEFAULT_MAX_FILE_SIZE,
};
use crate::model::{
    Diagnostic, Proto, SOURCE_ANNOTATION,
    input::{Address, Family, SlicePortInfo},
};

const BACK_END: &str = include_str!("../../../../examples/back-end/back-end.yaml");

fn cidr() -> ServiceCidr {
    "10.96.0.0/12".parse().unwrap()
}

/// The default: IPv4 primary, IPv6 secondary.
fn dual() -> ServiceCidr {
    super::DEFAULT_SERVICE_CIDR.parse().unwrap()
}

/// An allocation of one IPv4 address.
fn v4_only(ip: &str) -> FamilyIps {
    FamilyIps {
        v4: Some(ip.parse().unwrap()),
        v6: None,
    }
}

/// What the maps would hand a restarted agent: every allocated address.
fn as_previous(
    assigned: &BTreeMap<(String, String), FamilyIps>,
) -> Vec<((String, String), IpAddr)> {
    assigned
        .iter()
        .flat_map(|(key, ips)| {
            [ips.get(IpFamily::V4), ips.get(IpFamily::V6)]
                .into_iter()
                .flatten()
                .map(|ip| (key.clone(), ip))
        })
        .collect()
}

fn write_files(dir: &Path, files: &[(&str, &str)]) {
    for (name, text) in files {
        fs::write(dir.join(name), text).unwrap();
    }
}

pub(super) fn load_with(files: &[(&str, &str)], alloc: &mut Allocator) -> Manifests {
    let dir = TempDir::new().unwrap();
    write_files(dir.path(), files);
    load_dir(dir.path(), alloc, DEFAULT_MAX_FILE_SIZE)
}

fn load(files: &[(&str, &str)]) -> Manifests {
    load_with(files, &mut Allocator::new(cidr(), []))
}

pub(super) fn service<'a>(m: &'a Manifests, name: &str) -> &'a Service {
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
        severity: Default::default(),
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

pub(super) fn docs(parts: &[&str]) -> String {
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
    // Kinds the agent does not read are not problems (logged at debug).
    assert_eq!(m.diagnostics, vec![]);
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
    assert_eq!(m.slices.len(), 0, "nothing derived");
    assert_eq!(m.given.len(), 1);
    let s = &m.given[0];
    assert_eq!(s.name, "ext-1");
    assert_eq!(s.namespace, "default");
    assert_eq!(s.source, "slice.yaml#1");
    assert_eq!(s.service.as_deref(), Some("ext"));
    assert_eq!(
        s.ports,
        vec![SlicePortInfo {
            name: Default::default(),
            proto: Proto::Tcp,
            port: Some(8080)
        }]
    );
    let e = &s.endpoints[0];
    assert_eq!(e.address, Address::Ip("192.168.1.1".parse().unwrap()));
    assert_eq!((e.ready, e.serving, e.terminating), (false, true, true));
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
    let mut alloc = Allocator::new(cidr(), []);
    let a = svc_yaml("m", "a", "");
    let m1 = load_with(&[("a.yaml", &a)], &mut alloc);
    let ip_a = cluster_ip(&m1, "m");
    let key = ("default".to_owned(), "m".to_owned());
    assert_eq!(
        alloc.cluster_ips.assigned,
        BTreeMap::from([(key.clone(), v4_only(&ip_a))])
    );

    // Adding other services (sorting before and after) does not move it.
    let others = docs(&[&svc_yaml("first", "x", ""), &svc_yaml("z", "x", "")]);
    let m2 = load_with(&[("a.yaml", &a), ("b.yaml", &others)], &mut alloc);
    assert_eq!(cluster_ip(&m2, "m"), ip_a);
    let ip_z = cluster_ip(&m2, "z");
    assert_eq!(alloc.cluster_ips.assigned.len(), 3);

    // Editing it (ports, selector, file) does not move it either.
    let edited = svc_yaml("m", "changed", "").replace("port: 80", "port: 81");
    let m3 = load_with(&[("b.yaml", &others), ("c.yaml", &edited)], &mut alloc);
    assert_eq!(cluster_ip(&m3, "m"), ip_a);
    assert_eq!(cluster_ip(&m3, "z"), ip_z);

    // A restarted agent seeded from the maps keeps every address.
    let mut restarted = Allocator::new(cidr(), as_previous(&alloc.cluster_ips.assigned));
    let m4 = load_with(&[("b.yaml", &others), ("c.yaml", &edited)], &mut restarted);
    assert_eq!(cluster_ip(&m4, "m"), ip_a);
    assert_eq!(cluster_ip(&m4, "z"), ip_z);

    // A fresh agent without that state computes the same addresses here
    // (no collisions), because the hash is deterministic.
    let m5 = load(&[("b.yaml", &others), ("c.yaml", &edited)]);
    assert_eq!(cluster_ip(&m5, "m"), ip_a);

    // Removed services release their addresses.
    let _ = load_with(&[("c.yaml", &edited)], &mut alloc);
    assert_eq!(
        alloc.cluster_ips.assigned,
        BTreeMap::from([(key, v4_only(&ip_a))])
    );
}

/// As the API server's allocator: a running service keeps the address it
/// was given; a newcomer naming it is refused, and says why.
#[test]
fn explicit_cluster_ip_of_an_allocated_one_is_refused() {
    let mut alloc = Allocator::new(cidr(), []);
    let a = svc_yaml("a", "a", "");
    let ip_a = cluster_ip(&load_with(&[("a.yaml", &a)], &mut alloc), "a");
    let b = svc_yaml("b", "b", &format!("  clusterIP: {ip_a}\n"));
    let m = load_with(&[("a.yaml", &a), ("b.yaml", &b)], &mut alloc);
    assert_eq!(cluster_ip(&m, "a"), ip_a, "a keeps its address");
    assert!(
        m.services
            .iter()
            .all(|s| s.metadata.name.as_deref() != Some("b"))
    );
    assert_eq!(m.diagnostics.len(), 1, "{:?}", m.diagnostics);
    let d = &m.diagnostics[0];
    assert_eq!(d.source, "b.yaml#1");
    assert_eq!(d.object, "Service default/b");
    assert_eq!(d.field, "spec.clusterIP");
    assert_eq!(
        d.message,
        format!("{ip_a} is already allocated to Service default/a; the service is ignored")
    );
    assert_eq!(
        alloc.cluster_ips.assigned,
        BTreeMap::from([(("default".to_owned(), "a".to_owned()), v4_only(&ip_a))])
    );
    // Once a is gone, b may have it.
    let m = load_with(&[("b.yaml", &b)], &mut alloc);
    assert_eq!(m.diagnostics, vec![]);
    assert_eq!(cluster_ip(&m, "b"), ip_a);

    // A seeded address outside the CIDR (or reserved) is not reused.
    let mut seeded = Allocator::new(
        cidr(),
        [(
            ("default".to_owned(), "a".to_owned()),
            IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)),
        )],
    );
    let m = load_with(&[("a.yaml", &a)], &mut seeded);
    assert_eq!(cluster_ip(&m, "a"), ip_a);
}

/// Two manifests naming one ClusterIP: the API server would have refused
/// the second Service whole (every port), whatever its ports; the holder
/// keeps it across edits and across a restart (seeded from the maps).
#[test]
fn two_services_naming_one_cluster_ip_the_holder_keeps_it() {
    let ip = "10.96.0.50";
    let a = svc_yaml("a", "a", &format!("  clusterIP: {ip}\n"));
    // Another port than a's: still refused whole.
    let b = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: b\nspec:\n  clusterIP: {ip}\n  selector:\n    app: b\n  ports:\n  - port: 9999\n"
    );
    let names = |m: &Manifests| -> Vec<String> {
        m.services
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect()
    };
    let mut alloc = Allocator::new(cidr(), []);
    let m = load_with(&[("a.yaml", &a), ("b.yaml", &b)], &mut alloc);
    assert_eq!(names(&m), ["a"]);
    let d = m
        .diagnostics
        .iter()
        .find(|d| d.object == "Service default/b")
        .expect("b is reported");
    assert_eq!(d.source, "b.yaml#1");
    assert_eq!(d.field, "spec.clusterIP");
    assert_eq!(
        d.message,
        format!("{ip} is already allocated to Service default/a; the service is ignored")
    );
    // The holder keeps it even when the newcomer comes first in file order.
    let m = load_with(&[("0-b.yaml", &b), ("1-a.yaml", &a)], &mut alloc);
    assert_eq!(names(&m), ["a"]);
    // A restarted agent seeded with the maps (where b held it) keeps b.
    let mut restarted = Allocator::new(
        cidr(),
        [(("default".to_owned(), "b".to_owned()), ip.parse().unwrap())],
    );
    let m = load_with(&[("a.yaml", &a), ("b.yaml", &b)], &mut restarted);
    assert_eq!(names(&m), ["b"]);
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
    assert_eq!(spec("headless").cluster_ips, Some(vec!["None".to_owned()]));
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
    let mut alloc = Allocator::new(small, []);
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
        ok.primary().network(),
        IpAddr::V4(Ipv4Addr::new(10, 96, 0, 0))
    );
    assert_eq!(ok.primary().prefix_len(), 12);
    assert_eq!(ok.secondary(), None);
    assert!(!ok.is_dual_stack());
    assert_eq!(ok.range(IpFamily::V6), None);
    assert_eq!(ok.to_string(), "10.96.0.0/12");

    let v6: ServiceCidr = "fd00:10:96::/112".parse().unwrap();
    assert_eq!(v6.primary().family(), IpFamily::V6);
    assert_eq!(v6.to_string(), "fd00:10:96::/112");

    let both: ServiceCidr = " fd00:10:96::/108 , 10.96.0.0/12 ".parse().unwrap();
    assert_eq!(both.primary().family(), IpFamily::V6);
    assert_eq!(both.secondary().map(|r| r.family()), Some(IpFamily::V4));
    assert_eq!(both.to_string(), "fd00:10:96::/108,10.96.0.0/12");
    assert_eq!(dual().to_string(), "10.96.0.0/12,fd00:10:96::/108");
    assert_eq!(dual().primary().family(), IpFamily::V4);

    let err = |s: &str| s.parse::<ServiceCidr>().unwrap_err().to_string();
    assert_eq!(
        err("10.96.0.1/12"),
        "10.96.0.1/12: host bits set; did you mean 10.96.0.0/12?"
    );
    assert_eq!(
        err("fd00:10:96::1/108"),
        "fd00:10:96::1/108: host bits set; did you mean fd00:10:96::/108?"
    );
    assert_eq!(
        err("10.96.0.0"),
        "\"10.96.0.0\": expected a CIDR such as 10.96.0.0/12 or fd00:10:96::/108"
    );
    assert_eq!(
        err("10.96.0/12"),
        "10.96.0/12: \"10.96.0\" is not an IP address"
    );
    assert_eq!(
        err("10.96.0.0/x"),
        "10.96.0.0/x: prefix length \"x\" is not a number"
    );
    assert_eq!(
        err("10.96.0.0/31"),
        "10.96.0.0/31: an IPv4 prefix length must be between 8 and 30 (a longer one leaves no address to allocate)"
    );
    assert!(err("10.0.0.0/7").contains("between 8 and 30"));
    assert_eq!(
        err("fd00::/127"),
        "fd00::/127: an IPv6 prefix length must be between 64 and 126 (a longer one leaves no address to allocate)"
    );
    assert_eq!(
        err("fd00::/48"),
        "fd00::/48: an IPv6 prefix length must be between 64 and 126"
    );
    assert_eq!(
        err("::ffff:10.0.0.0/120"),
        "::ffff:10.0.0.0/120: an IPv4-mapped IPv6 range; give the IPv4 range instead"
    );
    assert_eq!(
        err("10.96.0.0/12,10.112.0.0/12"),
        "10.96.0.0/12 and 10.112.0.0/12 are both IPv4; give at most one range per family"
    );
    assert_eq!(
        err("10.96.0.0/12,fd00::/108,fd01::/108"),
        "10.96.0.0/12,fd00::/108,fd01::/108: at most two ranges (one IPv4, one IPv6)"
    );
    assert_eq!(
        "".parse::<ServiceCidr>().unwrap_err(),
        ServiceCidrError::Empty
    );
    assert!(err("10.96.0.0/12,").contains("expected a CIDR"));
}

#[test]
fn unreadable_directory_is_a_diagnostic() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("missing");
    let m = load_dir(
        &missing,
        &mut Allocator::new(cidr(), []),
        DEFAULT_MAX_FILE_SIZE,
    );
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
    let m = load_dir(
        dir.path(),
        &mut Allocator::new(cidr(), []),
        DEFAULT_MAX_FILE_SIZE,
    );
    assert_eq!(m.services.len(), 1);
    assert_eq!(m.diagnostics.len(), 1);
    assert_eq!(
        m.diagnostics[0].source,
        dir.path().join("sub.yaml").display().to_string()
    );
    assert!(
        m.diagnostics[0]
            .message
            .starts_with("a directory is not a regular file; skipped"),
        "{}",
        m.diagnostics[0].message
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

// ---- IPv6 and dual-stack ----

fn load_cidr(files: &[(&str, &str)], cidr: &str) -> Manifests {
    load_with(files, &mut Allocator::new(cidr.parse().unwrap(), []))
}

fn spec_of(m: &Manifests, name: &str) -> k8s_openapi::api::core::v1::ServiceSpec {
    service(m, name).spec.clone().unwrap()
}

/// (clusterIPs, ipFamilies, ipFamilyPolicy), checking clusterIP = clusterIPs[0].
fn families(m: &Manifests, name: &str) -> (Vec<String>, Vec<String>, String) {
    let spec = spec_of(m, name);
    let ips = spec.cluster_ips.clone().unwrap_or_default();
    assert_eq!(spec.cluster_ip, ips.first().cloned(), "{name}");
    (
        ips,
        spec.ip_families.unwrap_or_default(),
        spec.ip_family_policy.unwrap_or_default(),
    )
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn in_range(ip: &str, range: &str) -> bool {
    let range: super::CidrRange = range.parse().unwrap();
    range.is_usable(ip.parse().unwrap())
}

/// A running, ready pod with the given `status.podIP` (if any) and `status.podIPs`.
fn pod_ips_yaml(name: &str, app: &str, pod_ip: Option<&str>, pod_ips: &[&str]) -> String {
    let mut status = String::from("status:\n  phase: Running\n");
    if let Some(ip) = pod_ip {
        let _ = writeln!(status, "  podIP: \"{ip}\"");
    }
    if !pod_ips.is_empty() {
        status.push_str("  podIPs:\n");
        for ip in pod_ips {
            let _ = writeln!(status, "  - ip: \"{ip}\"");
        }
    }
    status.push_str("  conditions: [{type: Ready, status: \"True\"}]\n");
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {app}}}}}
spec: {{nodeName: node-a, containers: [{{name: c, image: nginx}}]}}
{status}"
    )
}

fn slice_of<'a>(m: &'a Manifests, svc: &str, address_type: &str) -> Vec<&'a EndpointSlice> {
    slices_of(m, svc)
        .into_iter()
        .filter(|s| s.address_type == address_type)
        .collect()
}

fn addresses(slice: &EndpointSlice) -> Vec<String> {
    endpoints(slice).into_iter().map(|e| e.0).collect()
}

#[test]
fn single_stack_defaults_to_the_primary_family() {
    // With the default (dual-stack) --service-cidr the textbook example is
    // unchanged: IPv4, one IPv4 slice.
    let m = load_with(
        &[("back-end.yaml", BACK_END)],
        &mut Allocator::new(dual(), []),
    );
    assert_eq!(m.diagnostics, vec![]);
    let (ips, fams, policy) = families(&m, "back-end");
    assert_eq!(ips.len(), 1);
    assert!(in_range(&ips[0], "10.96.0.0/12"), "{ips:?}");
    assert_eq!(fams, strings(&["IPv4"]));
    assert_eq!(policy, "SingleStack");
    assert_eq!(m.slices.len(), 1);
    assert_eq!(m.slices[0].address_type, "IPv4");

    // An IPv6-primary cluster gives single-stack services IPv6.
    let m = load_cidr(
        &[("s.yaml", &svc_yaml("s", "s", ""))],
        "fd00:10:96::/112,10.96.0.0/12",
    );
    assert_eq!(m.diagnostics, vec![]);
    let (ips, fams, _) = families(&m, "s");
    assert_eq!(fams, strings(&["IPv6"]));
    assert!(in_range(&ips[0], "fd00:10:96::/112"), "{ips:?}");
}

#[test]
fn dual_stack_policies_allocate_both_families() {
    let text = docs(&[
        &svc_yaml("prefer", "x", "  ipFamilyPolicy: PreferDualStack\n"),
        &svc_yaml("require", "x", "  ipFamilyPolicy: RequireDualStack\n"),
        &svc_yaml(
            "v6-first",
            "x",
            "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n",
        ),
        &svc_yaml(
            "v6-single",
            "x",
            "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv6]\n",
        ),
        &svc_yaml("v6-implied", "x", "  ipFamilies: [IPv6]\n"),
        &svc_yaml("single", "x", ""),
    ]);
    let m = load_with(&[("s.yaml", &text)], &mut Allocator::new(dual(), []));
    assert_eq!(m.diagnostics, vec![]);
    let v4 = "10.96.0.0/12";
    let v6 = "fd00:10:96::/108";
    for name in ["prefer", "require"] {
        let (ips, fams, policy) = families(&m, name);
        assert_eq!(fams, strings(&["IPv4", "IPv6"]), "{name}");
        assert_eq!(ips.len(), 2, "{name}");
        assert!(in_range(&ips[0], v4) && in_range(&ips[1], v6), "{ips:?}");
        assert_eq!(
            policy,
            if name == "prefer" {
                "PreferDualStack"
            } else {
                "RequireDualStack"
            }
        );
    }
    let (ips, fams, _) = families(&m, "v6-first");
    assert_eq!(fams, strings(&["IPv6", "IPv4"]));
    assert!(in_range(&ips[0], v6) && in_range(&ips[1], v4), "{ips:?}");
    for name in ["v6-single", "v6-implied"] {
        let (ips, fams, policy) = families(&m, name);
        assert_eq!(fams, strings(&["IPv6"]), "{name}");
        assert_eq!(policy, "SingleStack");
        assert_eq!(ips.len(), 1);
        assert!(in_range(&ips[0], v6), "{ips:?}");
    }
    let (ips, fams, _) = families(&m, "single");
    assert_eq!(fams, strings(&["IPv4"]));
    assert!(in_range(&ips[0], v4));
    // Every address distinct.
    let all: std::collections::HashSet<String> = m
        .services
        .iter()
        .flat_map(|s| s.spec.clone().unwrap().cluster_ips.unwrap())
        .collect();
    assert_eq!(all.len(), 2 + 2 + 2 + 1 + 1 + 1);
}

#[test]
fn prefer_dual_stack_on_a_single_stack_cluster_is_single_stack() {
    let text = docs(&[
        &svc_yaml("prefer", "x", "  ipFamilyPolicy: PreferDualStack\n"),
        &svc_yaml(
            "prefer-v6",
            "x",
            "  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv6]\n",
        ),
    ]);
    let prefer = svc_yaml("prefer", "x", "  ipFamilyPolicy: PreferDualStack\n");
    let m = load(&[("s.yaml", &prefer)]);
    assert_eq!(m.diagnostics, vec![]);
    let (ips, fams, policy) = families(&m, "prefer");
    assert_eq!(fams, strings(&["IPv4"]));
    assert_eq!(policy, "PreferDualStack");
    assert!(in_range(&ips[0], "10.96.0.0/12"));
    // An IPv6-only cluster: PreferDualStack is IPv6 alone.
    let m = load_cidr(&[("s.yaml", &text)], "fd00:10:96::/112");
    assert_eq!(m.diagnostics, vec![]);
    let (ips, fams, _) = families(&m, "prefer");
    assert_eq!(fams, strings(&["IPv6"]));
    assert!(in_range(&ips[0], "fd00:10:96::/112"));
    assert_eq!(families(&m, "prefer-v6").1, strings(&["IPv6"]));
}

#[test]
fn given_cluster_ips_decide_the_families() {
    let text = docs(&[
        // One given IPv6 address: single-stack IPv6, whatever the primary.
        &svc_yaml("given-v6", "x", "  clusterIP: fd00:10:96::a\n"),
        // One given, the other family allocated.
        &svc_yaml(
            "half",
            "x",
            "  clusterIP: 10.96.0.10\n  ipFamilyPolicy: PreferDualStack\n",
        ),
        &svc_yaml(
            "half-v6",
            "x",
            "  clusterIPs: [\"fd00:10:96::b\"]\n  ipFamilyPolicy: RequireDualStack\n",
        ),
        // Both given, IPv6 first: the order is the families' order.
        &svc_yaml(
            "both",
            "x",
            "  clusterIP: fd00:10:96::c\n  clusterIPs: [\"fd00:10:96::c\", 10.96.0.12]\n  ipFamilyPolicy: RequireDualStack\n",
        ),
        // Outside the range, as copied from another cluster: used as written.
        &svc_yaml("outside-v6", "x", "  clusterIP: \"2001:db8::1\"\n"),
    ]);
    let m = load_with(&[("s.yaml", &text)], &mut Allocator::new(dual(), []));
    assert_eq!(m.diagnostics, vec![]);
    assert_eq!(
        families(&m, "given-v6"),
        (
            strings(&["fd00:10:96::a"]),
            strings(&["IPv6"]),
            "SingleStack".to_owned()
        )
    );
    let (ips, fams, _) = families(&m, "half");
    assert_eq!(fams, strings(&["IPv4", "IPv6"]));
    assert_eq!(ips[0], "10.96.0.10");
    assert!(in_range(&ips[1], "fd00:10:96::/108"), "{ips:?}");
    let (ips, fams, _) = families(&m, "half-v6");
    assert_eq!(fams, strings(&["IPv6", "IPv4"]));
    assert_eq!(ips[0], "fd00:10:96::b");
    assert!(in_range(&ips[1], "10.96.0.0/12"), "{ips:?}");
    assert_eq!(
        families(&m, "both"),
        (
            strings(&["fd00:10:96::c", "10.96.0.12"]),
            strings(&["IPv6", "IPv4"]),
            "RequireDualStack".to_owned()
        )
    );
    assert_eq!(families(&m, "outside-v6").0, strings(&["2001:db8::1"]));
}

#[test]
fn ipv6_cluster_ips_are_stable() {
    let mut alloc = Allocator::new(dual(), []);
    let a = svc_yaml("a", "a", "  ipFamilyPolicy: PreferDualStack\n");
    let m1 = load_with(&[("a.yaml", &a)], &mut alloc);
    let ips_a = families(&m1, "a").0;
    let key = ("default".to_owned(), "a".to_owned());
    let expected = FamilyIps {
        v4: Some(ips_a[0].parse().unwrap()),
        v6: Some(ips_a[1].parse().unwrap()),
    };
    assert_eq!(
        alloc.cluster_ips.assigned,
        BTreeMap::from([(key.clone(), expected)])
    );

    // Other services around it, and an edit, do not move it.
    let others = docs(&[
        &svc_yaml("0-first", "x", "  ipFamilyPolicy: RequireDualStack\n"),
        &svc_yaml("z", "x", "  ipFamilies: [IPv6]\n"),
    ]);
    let m2 = load_with(&[("a.yaml", &a), ("b.yaml", &others)], &mut alloc);
    assert_eq!(families(&m2, "a").0, ips_a);
    let ips_z = families(&m2, "z").0;
    let edited = a.replace("port: 80", "port: 81");
    let m3 = load_with(&[("b.yaml", &others), ("c.yaml", &edited)], &mut alloc);
    assert_eq!(families(&m3, "a").0, ips_a);
    assert_eq!(families(&m3, "z").0, ips_z);

    // A restarted agent seeded from the maps (IPv4 as stored, v4-mapped)
    // keeps every address.
    let previous: Vec<((String, String), IpAddr)> = as_previous(&alloc.cluster_ips.assigned)
        .into_iter()
        .map(|(k, ip)| match ip {
            IpAddr::V4(v4) => (k, IpAddr::V6(v4.to_ipv6_mapped())),
            v6 => (k, v6),
        })
        .collect();
    let mut restarted = Allocator::new(dual(), previous);
    assert_eq!(restarted.cluster_ips.assigned, alloc.cluster_ips.assigned);
    let m4 = load_with(&[("b.yaml", &others), ("c.yaml", &edited)], &mut restarted);
    assert_eq!(families(&m4, "a").0, ips_a);
    assert_eq!(families(&m4, "z").0, ips_z);

    // A previous address only comes back in its own family's slot: when the
    // service turns IPv6-first, its IPv6 address stays.
    let flipped = a.replace(
        "PreferDualStack\n",
        "PreferDualStack\n  ipFamilies: [IPv6, IPv4]\n",
    );
    let m5 = load_with(&[("a.yaml", &flipped)], &mut restarted);
    assert_eq!(
        families(&m5, "a").0,
        vec![ips_a[1].clone(), ips_a[0].clone()]
    );

    // Turning single-stack releases the IPv6 address.
    let single = svc_yaml("a", "a", "");
    let _ = load_with(&[("a.yaml", &single)], &mut restarted);
    assert_eq!(restarted.cluster_ips.assigned[&key].v6, None);
    assert_eq!(restarted.cluster_ips.assigned[&key].v4, expected.v4);

    // Seeds outside the ranges, or of a family the cluster lacks, are ignored.
    let seeded = Allocator::new(
        cidr(),
        [
            (key.clone(), "fd00:10:96::5".parse::<IpAddr>().unwrap()),
            (key.clone(), "192.168.0.1".parse().unwrap()),
        ],
    );
    assert!(seeded.cluster_ips.assigned.is_empty());
    // Per family the first usable seed wins.
    let seeded = Allocator::new(
        dual(),
        [
            (key.clone(), "10.96.0.7".parse::<IpAddr>().unwrap()),
            (key.clone(), "10.96.0.8".parse().unwrap()),
            (key.clone(), "fd00:10:96::1".parse().unwrap()),
        ],
    );
    assert_eq!(seeded.cluster_ips.assigned[&key], v4_only("10.96.0.7"));
}

#[test]
fn kubernetes_service_gets_the_first_host_of_each_family() {
    let text = svc_yaml("kubernetes", "x", "  ipFamilyPolicy: RequireDualStack\n");
    let m = load_with(&[("k.yaml", &text)], &mut Allocator::new(dual(), []));
    assert_eq!(
        families(&m, "kubernetes").0,
        strings(&["10.96.0.1", "fd00:10:96::1"])
    );
}

#[test]
fn full_ipv6_range_is_a_diagnostic_and_releases_the_other_family() {
    // A /126 has two allocatable IPv6 addresses (::2 and ::3).
    let mut alloc = Allocator::new("10.0.0.0/29,fd00::/126".parse().unwrap(), []);
    let dual_svc = |name: &str| svc_yaml(name, "x", "  ipFamilyPolicy: RequireDualStack\n");
    let text = docs(&[&dual_svc("a"), &dual_svc("b"), &dual_svc("c")]);
    let m = load_with(&[("s.yaml", &text)], &mut alloc);
    assert_eq!(
        m.diagnostics,
        vec![d(
            "s.yaml#3",
            "Service default/c",
            "spec.clusterIPs[1]",
            "service CIDR fd00::/126 has no free address; the service is ignored"
        )]
    );
    assert_eq!(m.services.len(), 2);
    let mut v6: Vec<String> = ["a", "b"]
        .iter()
        .map(|n| families(&m, n).0[1].clone())
        .collect();
    v6.sort();
    assert_eq!(v6, strings(&["fd00::2", "fd00::3"]));
    let kept: Vec<&(String, String)> = alloc.cluster_ips.assigned.keys().collect();
    assert_eq!(
        kept.len(),
        2,
        "c keeps nothing: {:?}",
        alloc.cluster_ips.assigned
    );

    // c's IPv4 address went back: a /29 has five, so four single-stack
    // services fit next to a and b... and a fifth does not.
    let v4 = |name: &str| svc_yaml(name, "x", "");
    let text = docs(&[
        &dual_svc("a"),
        &dual_svc("b"),
        &dual_svc("c"),
        &v4("d"),
        &v4("e"),
        &v4("f"),
    ]);
    let m = load_with(&[("s.yaml", &text)], &mut alloc);
    assert_eq!(m.services.len(), 5, "{:#?}", m.diagnostics);
    assert_eq!(m.diagnostics.len(), 1);
    assert_eq!(m.diagnostics[0].object, "Service default/c");
}

#[test]
fn invalid_family_settings_are_diagnostics() {
    let bad = [
        ("policy", "  ipFamilyPolicy: Bogus\n"),
        (
            "unknown-family",
            "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv5]\n",
        ),
        (
            "duplicate-family",
            "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv4]\n",
        ),
        ("two-families-single", "  ipFamilies: [IPv4, IPv6]\n"),
        (
            "two-ips-single",
            "  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:10:96::10\"]\n",
        ),
        (
            "same-family-ips",
            "  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 10.96.0.11]\n  ipFamilyPolicy: RequireDualStack\n",
        ),
        (
            "mismatch",
            "  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.11]\n",
        ),
        ("bad-ip", "  clusterIP: not-an-ip\n"),
        (
            "bad-second-ip",
            "  clusterIPs: [10.96.0.10, bogus]\n  ipFamilyPolicy: RequireDualStack\n",
        ),
        (
            "wrong-family-ip",
            "  clusterIP: 10.96.0.10\n  ipFamilies: [IPv6]\n",
        ),
        ("mapped", "  clusterIP: \"::ffff:10.96.0.10\"\n"),
        ("none-and-more", "  clusterIPs: [None, 10.96.0.1]\n"),
        (
            "three",
            "  clusterIPs: [10.96.0.1, \"fd00::1\", 10.96.0.2]\n  ipFamilyPolicy: RequireDualStack\n",
        ),
    ];
    let mut parts: Vec<String> = bad
        .iter()
        .map(|(name, extra)| svc_yaml(name, "x", extra))
        .collect();
    parts.push(svc_yaml("good", "x", "  ipFamilyPolicy: PreferDualStack\n"));
    parts.push(pod_ips_yaml("x-1", "x", None, &["10.0.0.1", "fd00::1"]));
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let m = load_with(&[("s.yaml", &docs(&refs))], &mut Allocator::new(dual(), []));
    let ignored = "; the service is ignored";
    let expect = |i: usize, field: &str, message: &str| {
        d(
            &format!("s.yaml#{}", i + 1),
            &format!("Service default/{}", bad[i].0),
            field,
            &format!("{message}{ignored}"),
        )
    };
    assert_eq!(
        m.diagnostics,
        vec![
            expect(
                0,
                "spec.ipFamilyPolicy",
                "unsupported value \"Bogus\": supported values are \"SingleStack\", \"PreferDualStack\", \"RequireDualStack\""
            ),
            expect(
                1,
                "spec.ipFamilies[1]",
                "unsupported value \"IPv5\": supported values are \"IPv4\", \"IPv6\""
            ),
            expect(2, "spec.ipFamilies[1]", "duplicate value \"IPv4\""),
            expect(
                3,
                "spec.ipFamilyPolicy",
                "must be RequireDualStack or PreferDualStack when two ipFamilies are given"
            ),
            expect(
                4,
                "spec.ipFamilyPolicy",
                "must be RequireDualStack or PreferDualStack when two ClusterIPs are given"
            ),
            expect(
                5,
                "spec.clusterIPs",
                "may specify no more than one IP for each IP family"
            ),
            expect(
                6,
                "spec.clusterIPs[0]",
                "\"10.96.0.11\" must match spec.clusterIP (\"10.96.0.10\")"
            ),
            expect(
                7,
                "spec.clusterIP",
                "\"not-an-ip\" is not a valid IP address"
            ),
            expect(
                8,
                "spec.clusterIPs[1]",
                "\"bogus\" is not a valid IP address"
            ),
            expect(
                9,
                "spec.clusterIP",
                "\"10.96.0.10\" is not an IPv6 address, as spec.ipFamilies[0] requires"
            ),
            expect(
                10,
                "spec.clusterIP",
                "\"::ffff:10.96.0.10\" is an IPv4-mapped IPv6 address; write the IPv4 address"
            ),
            expect(
                11,
                "spec.clusterIPs",
                "\"None\" must be the first and only value"
            ),
            expect(12, "spec.clusterIPs", "may hold at most 2 values"),
        ]
    );
    // Everything else keeps working: the good service, with its slices.
    assert_eq!(m.services.len(), 1);
    assert_eq!(families(&m, "good").1, strings(&["IPv4", "IPv6"]));
    assert_eq!(m.slices.len(), 2);
    assert!(
        m.slices
            .iter()
            .all(|s| s.metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"] == "good")
    );
}

#[test]
fn families_the_cluster_lacks_are_diagnostics() {
    let text = docs(&[
        &svc_yaml("require", "x", "  ipFamilyPolicy: RequireDualStack\n"),
        &svc_yaml("v6", "x", "  ipFamilies: [IPv6]\n"),
        &svc_yaml(
            "prefer-both",
            "x",
            "  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4, IPv6]\n",
        ),
        &svc_yaml("v6-ip", "x", "  clusterIP: \"fd00::10\"\n"),
        &svc_yaml(
            "v6-second-ip",
            "x",
            "  clusterIPs: [10.96.0.10, \"fd00::10\"]\n  ipFamilyPolicy: PreferDualStack\n",
        ),
        &svc_yaml("fine", "x", ""),
    ]);
    let m = load(&[("s.yaml", &text)]);
    let msg = |m: &str| format!("{m}; the service is ignored");
    let lacks = msg("IPv6 is not configured on this cluster (--service-cidr 10.96.0.0/12)");
    assert_eq!(
        m.diagnostics,
        vec![
            d(
                "s.yaml#1",
                "Service default/require",
                "spec.ipFamilyPolicy",
                &msg(
                    "RequireDualStack, but this cluster is not configured for dual-stack services (--service-cidr 10.96.0.0/12)"
                )
            ),
            d(
                "s.yaml#2",
                "Service default/v6",
                "spec.ipFamilies[0]",
                &lacks
            ),
            d(
                "s.yaml#3",
                "Service default/prefer-both",
                "spec.ipFamilies[1]",
                &lacks
            ),
            d(
                "s.yaml#4",
                "Service default/v6-ip",
                "spec.clusterIP",
                &lacks
            ),
            d(
                "s.yaml#5",
                "Service default/v6-second-ip",
                "spec.clusterIPs[1]",
                &lacks
            ),
        ]
    );
    assert_eq!(m.services.len(), 1);
    assert!(cluster_ip(&m, "fine").starts_with("10."));

    // And an IPv6-only cluster refuses IPv4 the same way.
    let m = load_cidr(
        &[("s.yaml", &svc_yaml("v4", "x", "  clusterIP: 10.96.0.10\n"))],
        "fd00::/112",
    );
    assert_eq!(
        m.diagnostics,
        vec![d(
            "s.yaml#1",
            "Service default/v4",
            "spec.clusterIP",
            &msg("IPv4 is not configured on this cluster (--service-cidr fd00::/112)")
        )]
    );
}

#[test]
fn headless_and_external_name_get_no_address() {
    let selectorless_headless = "apiVersion: v1
kind: Service
metadata: {name: hand}
spec: {clusterIP: None, ports: [{port: 80}]}
";
    let text = docs(&[
        &svc_yaml("headless", "x", "  clusterIP: None\n"),
        &svc_yaml(
            "headless-dual",
            "x",
            "  clusterIP: None\n  ipFamilyPolicy: PreferDualStack\n",
        ),
        selectorless_headless,
        "apiVersion: v1\nkind: Service\nmetadata: {name: extname}\nspec: {type: ExternalName, externalName: example.com, ipFamilyPolicy: RequireDualStack}\n",
        &pod_ips_yaml("x-1", "x", Some("10.0.0.1"), &["10.0.0.1", "fd00::1"]),
    ]);
    let m = load_with(&[("s.yaml", &text)], &mut Allocator::new(dual(), []));
    assert_eq!(m.diagnostics, vec![]);
    assert_eq!(
        families(&m, "headless"),
        (
            strings(&["None"]),
            strings(&["IPv4"]),
            "SingleStack".to_owned()
        )
    );
    assert_eq!(families(&m, "headless-dual").1, strings(&["IPv4", "IPv6"]));
    // Headless without a selector defaults to RequireDualStack.
    assert_eq!(
        families(&m, "hand"),
        (
            strings(&["None"]),
            strings(&["IPv4", "IPv6"]),
            "RequireDualStack".to_owned()
        )
    );
    let ext = spec_of(&m, "extname");
    assert_eq!(
        (ext.cluster_ip, ext.cluster_ips, ext.ip_families),
        (None, None, None)
    );
    // Headless services get slices of their families.
    assert_eq!(slice_of(&m, "headless", "IPv4").len(), 1);
    assert_eq!(slice_of(&m, "headless", "IPv6").len(), 0);
    assert_eq!(slice_of(&m, "headless-dual", "IPv6").len(), 1);

    // Even on a single-stack cluster, selectorless headless services may be
    // dual-stack (their endpoints are written by hand).
    let m = load(&[("s.yaml", selectorless_headless)]);
    assert_eq!(m.diagnostics, vec![]);
    assert_eq!(families(&m, "hand").1, strings(&["IPv4", "IPv6"]));
}

#[test]
fn dual_stack_pods_give_one_slice_per_family() {
    let text = docs(&[
        &svc_yaml("dual", "x", "  ipFamilyPolicy: PreferDualStack\n"),
        &svc_yaml("v4", "x", ""),
        &svc_yaml("v6", "x", "  ipFamilies: [IPv6]\n"),
        // The kubelet's shape: podIP is podIPs[0].
        &pod_ips_yaml("x-1", "x", Some("10.0.0.1"), &["10.0.0.1", "fd00::1"]),
        // IPv6-primary pod, podIPs only.
        &pod_ips_yaml("x-2", "x", None, &["fd00::2", "10.0.0.2"]),
        &pod_ips_yaml("x-3", "x", Some("10.0.0.3"), &[]),
        &pod_ips_yaml("x-4", "x", Some("fd00::4"), &[]),
    ]);
    let m = load_with(&[("s.yaml", &text)], &mut Allocator::new(dual(), []));
    assert_eq!(m.diagnostics, vec![]);
    let dual4 = slice_of(&m, "dual", "IPv4");
    let dual6 = slice_of(&m, "dual", "IPv6");
    assert_eq!((dual4.len(), dual6.len()), (1, 1));
    assert_eq!(
        addresses(dual4[0]),
        strings(&["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    );
    assert_eq!(
        addresses(dual6[0]),
        strings(&["fd00::1", "fd00::2", "fd00::4"])
    );
    assert_eq!(ports(dual6[0]), vec![port("", 8080)]);
    let (t, f) = (Some(true), Some(false));
    assert_eq!(endpoints(dual6[0])[0], ep("fd00::1", t, t, f));
    assert_eq!(
        dual6[0].endpoints[0]
            .target_ref
            .as_ref()
            .and_then(|r| r.name.as_deref()),
        Some("x-1")
    );
    assert_ne!(dual4[0].metadata.name, dual6[0].metadata.name);
    // The IPv4 name is what it was before IPv6 slices existed; the IPv6 one
    // has no counter suffix either.
    let name6 = dual6[0].metadata.name.clone().unwrap();
    assert_eq!(name6.len(), "dual-".len() + 10, "{name6}");
    assert_eq!(source(&dual6[0].metadata), "s.yaml#1");

    assert_eq!(slices_of(&m, "v4").len(), 1);
    assert_eq!(slice_of(&m, "v4", "IPv4").len(), 1);
    assert_eq!(slices_of(&m, "v6").len(), 1);
    assert_eq!(
        addresses(slice_of(&m, "v6", "IPv6")[0]),
        strings(&["fd00::1", "fd00::2", "fd00::4"])
    );
}

#[test]
fn pod_address_conflicts_are_diagnostics() {
    let text = docs(&[
        &svc_yaml("s", "s", "  ipFamilyPolicy: PreferDualStack\n"),
        // podIP wins over a different podIPs, as in the API server.
        &pod_ips_yaml("s-1", "s", Some("10.0.0.1"), &["10.0.0.9", "fd00::9"]),
        &pod_ips_yaml("s-2", "s", None, &["10.0.0.2", "10.0.0.3"]),
        &pod_ips_yaml("s-3", "s", Some("::ffff:10.0.0.4"), &[]),
        &pod_ips_yaml("s-4", "s", None, &["fd00::5", "fd00::zz"]),
    ]);
    let m = load_with(&[("s.yaml", &text)], &mut Allocator::new(dual(), []));
    assert_eq!(
        m.diagnostics,
        vec![
            d(
                "s.yaml#2",
                "Pod default/s-1",
                "status.podIPs[0].ip",
                "\"10.0.0.9\" differs from status.podIP \"10.0.0.1\"; status.podIP wins and status.podIPs is ignored, as in the API server"
            ),
            d(
                "s.yaml#3",
                "Pod default/s-2",
                "status.podIPs[1].ip",
                "\"10.0.0.3\": at most one IP per family (status.podIPs); another IPv4 address came first; the pod is not an endpoint"
            ),
            d(
                "s.yaml#4",
                "Pod default/s-3",
                "status.podIP",
                "\"::ffff:10.0.0.4\" is an IPv4-mapped IPv6 address, not a pod IP; the pod is not an endpoint"
            ),
            d(
                "s.yaml#5",
                "Pod default/s-4",
                "status.podIPs[1].ip",
                "\"fd00::zz\" is not an IP address; the pod is not an endpoint"
            ),
        ]
    );
    assert_eq!(
        addresses(slice_of(&m, "s", "IPv4")[0]),
        strings(&["10.0.0.1"])
    );
    assert_eq!(slice_of(&m, "s", "IPv6").len(), 0);
}

#[test]
fn ipv6_endpoints_are_mirrored_into_ipv6_slices() {
    let text = "apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  ipFamilyPolicy: PreferDualStack
  ports: [{name: pg, port: 5432}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: ext}
subsets:
- addresses: [{ip: 192.168.0.10}, {ip: \"fd00::10\", nodeName: n1}, {ip: \"::ffff:192.168.0.12\"}]
  notReadyAddresses: [{ip: \"fd00::11\"}]
  ports: [{name: pg, port: 5432}]
- addresses: [{ip: \"fd00::20\"}]
  ports: [{name: pg, port: 6432}]
---
apiVersion: v1
kind: Service
metadata: {name: v4only}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: v4only}
subsets: [{addresses: [{ip: \"fd00::30\"}], ports: [{port: 80}]}]
";
    let m = load_with(&[("ext.yaml", text)], &mut Allocator::new(dual(), []));
    assert_eq!(
        m.diagnostics,
        vec![d(
            "ext.yaml#2",
            "Endpoints default/ext",
            "subsets[0].addresses[2].ip",
            "\"::ffff:192.168.0.12\" is an IPv4-mapped IPv6 address; write the IPv4 address; the address is ignored"
        )]
    );
    let v4 = slice_of(&m, "ext", "IPv4");
    let v6 = slice_of(&m, "ext", "IPv6");
    assert_eq!((v4.len(), v6.len()), (1, 2));
    assert_eq!(
        endpoints(v4[0]),
        vec![ep("192.168.0.10", Some(true), None, None)]
    );
    assert_eq!(ports(v4[0]), vec![port("pg", 5432)]);
    assert_eq!(
        endpoints(v6[0]),
        vec![
            ep("fd00::10", Some(true), None, None),
            ep("fd00::11", Some(false), None, None)
        ]
    );
    assert_eq!(v6[0].endpoints[0].node_name.as_deref(), Some("n1"));
    assert_eq!(ports(v6[0]), vec![port("pg", 5432)]);
    assert_eq!(
        endpoints(v6[1]),
        vec![ep("fd00::20", Some(true), None, None)]
    );
    assert_eq!(ports(v6[1]), vec![port("pg", 6432)]);
    assert_eq!(source(&v6[0].metadata), "ext.yaml#2");
    let names: std::collections::HashSet<_> = slices_of(&m, "ext")
        .iter()
        .map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(names.len(), 3);
    // The mirroring controller splits by family whatever the Service says.
    assert_eq!(
        addresses(slice_of(&m, "v4only", "IPv6")[0]),
        strings(&["fd00::30"])
    );
}

#[test]
fn ipv6_endpoint_slices_pass_through() {
    let text = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ext-v6
  labels: {kubernetes.io/service-name: ext}
addressType: IPv6
ports: [{name: \"\", port: 8080, protocol: TCP}]
endpoints:
- addresses: [\"fd00::1\"]
";
    let m = load(&[("slice.yaml", text)]);
    assert_eq!(m.diagnostics, vec![]);
    assert_eq!(m.given.len(), 1);
    assert_eq!(m.given[0].family, Some(Family::V6));
    assert_eq!(
        m.given[0].endpoints[0].address,
        Address::Ip("fd00::1".parse().unwrap())
    );
}

/// The whole pure path: a dual-stack manifest → parse, allocation and the
/// endpointslice controller → translation: one frontend per family, each
/// with that family's backends.
#[test]
fn dual_stack_manifest_translates_to_one_frontend_per_family() {
    use crate::model::{Proto, TranslateOptions, frontend, translate};
    let text = docs(&[
        &svc_yaml("web", "web", "  ipFamilyPolicy: RequireDualStack\n"),
        &pod_ips_yaml("web-1", "web", Some("10.0.0.1"), &["10.0.0.1", "fd00::1"]),
        &pod_ips_yaml("web-2", "web", Some("10.0.0.2"), &["10.0.0.2", "fd00::2"]),
        &pod_ips_yaml("web-3", "web", Some("10.0.0.3"), &[]),
    ]);
    let m = load_with(&[("web.yaml", &text)], &mut Allocator::new(dual(), []));
    assert_eq!(m.diagnostics, vec![]);
    let ips = families(&m, "web").0;
    let v4: Ipv4Addr = ips[0].parse().unwrap();
    let v6: Ipv6Addr = ips[1].parse().unwrap();

    let (state, diags) = translate(&m.services, &m.slices, &TranslateOptions::default());
    assert_eq!(diags, vec![]);
    let got: Vec<_> = state
        .iter()
        .map(|(fe, want)| (*fe, want.backends.clone()))
        .collect();
    let sock = |ip: &str| std::net::SocketAddr::new(ip.parse().unwrap(), 8080);
    assert_eq!(
        got,
        vec![
            (
                frontend(v4, 80, Proto::Tcp),
                vec![sock("10.0.0.1"), sock("10.0.0.2"), sock("10.0.0.3")]
            ),
            (
                frontend(v6, 80, Proto::Tcp),
                vec![sock("fd00::1"), sock("fd00::2")]
            ),
        ]
    );
}

/// `sessionAffinity: ClientIP` with its timeout, from a manifest to what is
/// served: through the full objects and through the cache's slim ones.
#[test]
fn session_affinity_from_a_manifest_is_served() {
    use crate::model::{Index, TranslateOptions, translate};
    let extra =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}\n";
    let text = docs(&[
        &svc_yaml("web", "web", extra),
        &pod_yaml("web-1", "web", "10.244.0.1", true, ""),
    ]);
    let files = [("web.yaml", text.as_str())];
    let m = load(&files);
    assert_eq!(m.diagnostics, vec![]);
    let (state, diags) = translate(&m.services, &m.slices, &TranslateOptions::default());
    assert_eq!(diags, vec![]);
    assert_eq!(state.len(), 1);
    let want = state.values().next().unwrap();
    assert_eq!(want.affinity, 5);
    assert_eq!(want.backends, vec!["10.244.0.1:8080".parse().unwrap()]);

    let dir = TempDir::new().unwrap();
    write_files(dir.path(), &files);
    let mut cache = super::DirCache::new(dir.path(), DEFAULT_MAX_FILE_SIZE);
    cache.load(&mut Allocator::new(cidr(), []));
    let (services, slices) = cache.current();
    let mut index = Index::default();
    services.into_iter().for_each(|s| {
        index.apply_service(s);
    });
    slices.into_iter().for_each(|s| {
        index.apply_slice(s);
    });
    index.checkout();
    assert_eq!(index.desired().values().next().unwrap().affinity, 5);
}

#[test]
fn objects_the_api_server_would_refuse_are_reported_and_skipped() {
    let endpoints: String = (0..1001)
        .map(|i| format!("- addresses: [\"10.1.{}.{}\"]\n", i / 250, i % 250 + 1))
        .collect();
    let big = format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: big
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
{endpoints}"
    );
    let bad_port = svc_yaml("badport", "x", "").replace("targetPort: 8080", "targetPort: 70000");
    let bad_name = svc_yaml("Web_1", "x", "");
    let wrong_family = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: mixed, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [\"fd00::1\"]}]
";
    let m = load(&[
        ("a.yaml", &big),
        ("b.yaml", &bad_port),
        ("c.yaml", &bad_name),
        ("d.yaml", wrong_family),
        ("e.yaml", &svc_yaml("good", "x", "")),
    ]);
    let suffix = "; the object is ignored, as the API server would refuse it";
    assert_eq!(
        m.diagnostics,
        vec![
            d(
                "a.yaml#1",
                "EndpointSlice default/big",
                "endpoints",
                &format!(
                    "1001 endpoints; an EndpointSlice holds at most 1000 (split them over several slices){suffix}"
                ),
            ),
            d(
                "b.yaml#1",
                "Service default/badport",
                "spec.ports[0].targetPort",
                &format!("70000 is not between 1 and 65535{suffix}"),
            ),
            d(
                "c.yaml#1",
                "Service default/Web_1",
                "metadata.name",
                &format!(
                    "\"Web_1\" is not a DNS-1035 label (lower-case letters, digits and '-', starting with a letter, ending with a letter or digit, at most 63 characters){suffix}"
                ),
            ),
            d(
                "d.yaml#1",
                "EndpointSlice default/mixed",
                "endpoints[0].addresses[0]",
                &format!("\"fd00::1\" is not an IPv4 address{suffix}"),
            ),
        ]
    );
    // Everything else keeps working.
    assert_eq!(m.services.len(), 1);
    assert_eq!(
        m.slices
            .iter()
            .filter(|s| s.metadata.name.as_deref() == Some("big"))
            .count(),
        0
    );
}

#[test]
fn unresolved_named_target_port_is_a_notice_until_a_pod_declares_it() {
    let svc = svc_yaml("web", "web", "").replace("targetPort: 8080", "targetPort: http");
    let pod = pod_yaml("web-1", "web", "10.0.0.1", true, "");
    let m = load(&[("a.yaml", &svc), ("b.yaml", &pod)]);
    let mut want = d(
        "a.yaml#1",
        "Service default/web",
        "spec.ports[0].targetPort",
        "named port \"http\" (TCP) matches no container port of the 1 selected Pod(s); connects to this port are refused until one declares it",
    );
    want.severity = crate::model::Severity::Info;
    assert_eq!(m.diagnostics, vec![want]);

    let with_port = pod.replace(
        "    image: nginx\n",
        "    image: nginx\n    ports: [{name: http, containerPort: 8080}]\n",
    );
    let m = load(&[("a.yaml", &svc), ("b.yaml", &with_port)]);
    assert_eq!(m.diagnostics, vec![]);
}
