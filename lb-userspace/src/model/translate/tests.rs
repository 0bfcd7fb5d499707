use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{Value, json};

use super::{translate, translate_service};
use crate::model::{
    DesiredService, DesiredState, Diagnostic, ExternalIps, Frontend, FrontendKind, Proto,
    SOURCE_ANNOTATION, ServiceRef, ServiceType, TranslateOptions, frontend,
};

// ---------- builders ----------

/// Deep-merges `patch` into `base` (objects merge, everything else replaces).
fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

fn svc_json(ns: &str, name: &str, ip: &str, ports: Value) -> Value {
    json!({
        "metadata": {"namespace": ns, "name": name},
        "spec": {"clusterIP": ip, "ports": ports},
    })
}

fn svc(ns: &str, name: &str, ip: &str, ports: Value) -> Service {
    to_svc(svc_json(ns, name, ip, ports))
}

fn svc_with(ns: &str, name: &str, ip: &str, ports: Value, patch: Value) -> Service {
    let mut v = svc_json(ns, name, ip, ports);
    merge(&mut v, patch);
    to_svc(v)
}

fn to_svc(v: Value) -> Service {
    serde_json::from_value(v).expect("test Service JSON")
}

/// An IPv4 slice for `service`, named `name`.
fn slice(ns: &str, name: &str, service: &str, ports: Value, endpoints: Value) -> EndpointSlice {
    to_slice(json!({
        "metadata": {
            "namespace": ns,
            "name": name,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    }))
}

fn slice_with(
    ns: &str,
    name: &str,
    service: &str,
    ports: Value,
    endpoints: Value,
    patch: Value,
) -> EndpointSlice {
    let mut v = serde_json::to_value(slice(ns, name, service, ports, endpoints)).expect("to json");
    merge(&mut v, patch);
    to_slice(v)
}

fn to_slice(v: Value) -> EndpointSlice {
    serde_json::from_value(v).expect("test EndpointSlice JSON")
}

/// A plain endpoint (all conditions unset).
fn ep(ip: &str) -> Value {
    json!({"addresses": [ip]})
}

fn ep_cond(
    ip: &str,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
) -> Value {
    let mut c = serde_json::Map::new();
    if let Some(r) = ready {
        c.insert("ready".into(), json!(r));
    }
    if let Some(s) = serving {
        c.insert("serving".into(), json!(s));
    }
    if let Some(t) = terminating {
        c.insert("terminating".into(), json!(t));
    }
    json!({"addresses": [ip], "conditions": c})
}

fn ep_node(ip: &str, node: &str) -> Value {
    json!({"addresses": [ip], "nodeName": node})
}

fn ep_zones(ip: &str, zones: &[&str]) -> Value {
    let z: Vec<Value> = zones.iter().map(|z| json!({"name": z})).collect();
    json!({"addresses": [ip], "hints": {"forZones": z}})
}

fn ep_nodes(ip: &str, nodes: &[&str], zones: &[&str]) -> Value {
    let n: Vec<Value> = nodes.iter().map(|n| json!({"name": n})).collect();
    let z: Vec<Value> = zones.iter().map(|z| json!({"name": z})).collect();
    json!({"addresses": [ip], "hints": {"forNodes": n, "forZones": z}})
}

fn tcp(port: i32) -> Value {
    json!([{"port": port}])
}

fn sport(port: i32) -> Value {
    json!([{"name": "", "port": port, "protocol": "TCP"}])
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn fe(a: &str, port: u16, proto: Proto) -> Frontend {
    frontend(ip(a), port, proto)
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|s| s.parse().expect("test addr")).collect()
}

fn desired(
    ns: &str,
    name: &str,
    port_name: &str,
    ty: ServiceType,
    backends: &[&str],
) -> DesiredService {
    DesiredService {
        service: ServiceRef {
            namespace: ns.into(),
            name: name.into(),
            port_name: port_name.into(),
            svc_type: ty,
            frontend: FrontendKind::ClusterIP,
        },
        backends: addrs(backends),
        affinity: 0,
        spared: vec![],
    }
}

fn cip(ns: &str, name: &str, port_name: &str, backends: &[&str]) -> DesiredService {
    desired(ns, name, port_name, ServiceType::ClusterIP, backends)
}

fn state(entries: Vec<(Frontend, DesiredService)>) -> DesiredState {
    entries.into_iter().collect()
}

fn d(object: &str, field: &str, message: &str) -> Diagnostic {
    Diagnostic {
        source: String::new(),
        object: object.into(),
        field: field.into(),
        message: message.into(),
        severity: Default::default(),
    }
}

fn run(services: &[Service], slices: &[EndpointSlice]) -> (DesiredState, Vec<Diagnostic>) {
    translate(services, slices, &TranslateOptions::default())
}

fn opts(node: Option<&str>, zone: Option<&str>) -> TranslateOptions {
    TranslateOptions {
        node_name: node.map(Into::into),
        zone: zone.map(Into::into),
        ..TranslateOptions::default()
    }
}

/// Backends of the single frontend 10.0.0.1:80/TCP of `default/web`.
fn web_backends(endpoints: Value, o: &TranslateOptions) -> Vec<SocketAddr> {
    web_backends_patched(json!({}), endpoints, o)
}

fn web_backends_patched(patch: Value, endpoints: Value, o: &TranslateOptions) -> Vec<SocketAddr> {
    let s = svc_with("default", "web", "10.0.0.1", tcp(80), patch);
    let sl = slice("default", "web-a", "web", sport(8080), endpoints);
    let (st, diags) = translate(&[s], &[sl], o);
    assert_eq!(diags, vec![]);
    assert_eq!(st.len(), 1);
    st.get(&fe("10.0.0.1", 80, Proto::Tcp))
        .expect("frontend present")
        .backends
        .clone()
}

// ---------- basics ----------

#[test]
fn empty_input_gives_empty_state() {
    assert_eq!(run(&[], &[]), (DesiredState::new(), vec![]));
}

#[test]
fn basic_service() {
    let s = svc("default", "web", "10.0.0.1", tcp(80));
    let sl = slice(
        "default",
        "web-abc",
        "web",
        sport(8080),
        json!([ep("10.1.0.3"), ep("10.1.0.2"), ep("10.1.0.2")]),
    );
    let (st, diags) = run(&[s], &[sl]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.1", 80, Proto::Tcp),
            cip("default", "web", "", &["10.1.0.2:8080", "10.1.0.3:8080"]),
        )])
    );
}

#[test]
fn multi_port() {
    let s = svc(
        "default",
        "web",
        "10.0.0.1",
        json!([{"name": "http", "port": 80}, {"name": "https", "port": 443}]),
    );
    let sl = slice(
        "default",
        "web-abc",
        "web",
        json!([{"name": "https", "port": 8443}, {"name": "http", "port": 8080}]),
        json!([ep("10.1.0.1"), ep("10.1.0.2")]),
    );
    let (st, diags) = run(&[s], &[sl]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![
            (
                fe("10.0.0.1", 80, Proto::Tcp),
                cip(
                    "default",
                    "web",
                    "http",
                    &["10.1.0.1:8080", "10.1.0.2:8080"]
                ),
            ),
            (
                fe("10.0.0.1", 443, Proto::Tcp),
                cip(
                    "default",
                    "web",
                    "https",
                    &["10.1.0.1:8443", "10.1.0.2:8443"]
                ),
            ),
        ])
    );
}

#[test]
fn named_target_port_resolves_per_slice() {
    let s = svc_with(
        "default",
        "web",
        "10.0.0.1",
        json!([{"name": "http", "port": 80, "targetPort": "web"}]),
        json!({}),
    );
    let a = slice(
        "default",
        "web-a",
        "web",
        json!([{"name": "http", "port": 8080}]),
        json!([ep("10.1.0.1")]),
    );
    let b = slice(
        "default",
        "web-b",
        "web",
        json!([{"name": "http", "port": 9090}]),
        json!([ep("10.1.0.2")]),
    );
    let (st, diags) = run(&[s], &[a, b]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.1", 80, Proto::Tcp),
            cip(
                "default",
                "web",
                "http",
                &["10.1.0.1:8080", "10.1.0.2:9090"]
            ),
        )])
    );
}

#[test]
fn service_target_port_is_never_used() {
    let s = svc(
        "default",
        "web",
        "10.0.0.1",
        json!([{"port": 80, "targetPort": 1234}]),
    );
    let sl = slice(
        "default",
        "web-a",
        "web",
        sport(8080),
        json!([ep("10.1.0.1")]),
    );
    let (st, _) = run(&[s], &[sl]);
    assert_eq!(
        st[&fe("10.0.0.1", 80, Proto::Tcp)].backends,
        addrs(&["10.1.0.1:8080"])
    );
}

#[test]
fn same_port_tcp_and_udp_are_two_frontends() {
    let s = svc(
        "kube-system",
        "dns",
        "10.0.0.10",
        json!([
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]),
    );
    let sl = slice(
        "kube-system",
        "dns-1",
        "dns",
        json!([
            {"name": "dns", "port": 5353, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 5354, "protocol": "TCP"},
        ]),
        json!([ep("10.1.0.1")]),
    );
    let (st, diags) = run(&[s], &[sl]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![
            (
                fe("10.0.0.10", 53, Proto::Tcp),
                cip("kube-system", "dns", "dns-tcp", &["10.1.0.1:5354"]),
            ),
            (
                fe("10.0.0.10", 53, Proto::Udp),
                cip("kube-system", "dns", "dns", &["10.1.0.1:5353"]),
            ),
        ])
    );
}

#[test]
fn join_requires_matching_protocol() {
    // The slice only has a UDP port named "": the TCP service port gets nothing.
    let s = svc("default", "web", "10.0.0.1", tcp(80));
    let sl = slice(
        "default",
        "web-a",
        "web",
        json!([{"port": 8080, "protocol": "UDP"}]),
        json!([ep("10.1.0.1")]),
    );
    let (st, diags) = run(&[s], &[sl]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.1", 80, Proto::Tcp),
            cip("default", "web", "", &[])
        )])
    );
}

#[test]
fn missing_names_and_protocols_default_to_unnamed_tcp() {
    // Service port without name/protocol joins a slice port without name/protocol.
    let s = svc("default", "web", "10.0.0.1", json!([{"port": 80}]));
    let sl = slice(
        "default",
        "web-a",
        "web",
        json!([{"port": 8080}]),
        json!([ep("10.1.0.1")]),
    );
    let (st, diags) = run(&[s], &[sl]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.1", 80, Proto::Tcp),
            cip("default", "web", "", &["10.1.0.1:8080"]),
        )])
    );
}

#[test]
fn slice_ports_without_usable_number_are_ignored() {
    let s = svc(
        "default",
        "web",
        "10.0.0.1",
        json!([{"name": "a", "port": 80}, {"name": "b", "port": 81}, {"name": "c", "port": 82}, {"name": "d", "port": 83}]),
    );
    let sl = slice(
        "default",
        "web-a",
        "web",
        json!([
            {"name": "a"},
            {"name": "b", "port": 0},
            {"name": "c", "port": 70000},
            {"name": "d", "port": 8083},
        ]),
        json!([ep("10.1.0.1")]),
    );
    let (st, diags) = run(&[s], &[sl]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![
            (
                fe("10.0.0.1", 80, Proto::Tcp),
                cip("default", "web", "a", &[])
            ),
            (
                fe("10.0.0.1", 81, Proto::Tcp),
                cip("default", "web", "b", &[])
            ),
            (
                fe("10.0.0.1", 82, Proto::Tcp),
                cip("default", "web", "c", &[])
            ),
            (
                fe("10.0.0.1", 83, Proto::Tcp),
                cip("default", "web", "d", &["10.1.0.1:8083"])
            ),
        ])
    );
}

#[test]
fn slice_without_ports_contributes_nothing() {
    let s = svc("default", "web", "10.0.0.1", tcp(80));
    let sl = to_slice(json!({
        "metadata": {"namespace": "default", "name": "web-a",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [ep("10.1.0.1")],
    }));
    let (st, diags) = run(&[s], &[sl]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.1", 80, Proto::Tcp),
            cip("default", "web", "", &[])
        )])
    );
}

#[test]
fn selectorless_service_with_hand_made_slice() {
    let s = svc(
        "ext",
        "db",
        "10.0.0.5",
        json!([{"name": "pg", "port": 5432}]),
    );
    let sl = slice(
        "ext",
        "db-manual",
        "db",
        json!([{"name": "pg", "port": 5432}]),
        json!([ep("192.168.1.10"), ep("192.168.1.11")]),
    );
    let (st, diags) = run(&[s], &[sl]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.5", 5432, Proto::Tcp),
            cip(
                "ext",
                "db",
                "pg",
                &["192.168.1.10:5432", "192.168.1.11:5432"]
            ),
        )])
    );
}

#[test]
fn slices_match_by_namespace_and_label() {
    let a = svc("a", "web", "10.0.0.1", tcp(80));
    let b = svc("b", "web", "10.0.0.2", tcp(80));
    let sa = slice("a", "web-1", "web", sport(8080), json!([ep("10.1.0.1")]));
    let sb = slice("b", "web-1", "web", sport(8080), json!([ep("10.2.0.1")]));
    let other = slice("a", "api-1", "api", sport(8080), json!([ep("10.3.0.1")]));
    let (st, diags) = run(&[a, b], &[sb, other, sa]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![
            (
                fe("10.0.0.1", 80, Proto::Tcp),
                cip("a", "web", "", &["10.1.0.1:8080"])
            ),
            (
                fe("10.0.0.2", 80, Proto::Tcp),
                cip("b", "web", "", &["10.2.0.1:8080"])
            ),
        ])
    );
}

// ---------- endpoint conditions ----------

#[test]
fn ready_nil_counts_as_ready() {
    let o = TranslateOptions::default();
    assert_eq!(
        web_backends(
            json!([ep("10.1.0.1"), {"addresses": ["10.1.0.2"], "conditions": {}}]),
            &o
        ),
        addrs(&["10.1.0.1:8080", "10.1.0.2:8080"])
    );
}

#[test]
fn not_ready_excluded() {
    let o = TranslateOptions::default();
    assert_eq!(
        web_backends(
            json!([
                ep_cond("10.1.0.1", Some(false), None, None),
                ep_cond("10.1.0.2", Some(true), None, None)
            ]),
            &o
        ),
        addrs(&["10.1.0.2:8080"])
    );
}

#[test]
fn serving_terminating_fallback_only_when_no_ready() {
    let o = TranslateOptions::default();
    let term = ep_cond("10.1.0.9", Some(false), Some(true), Some(true));
    // A ready endpoint exists: terminating ones are not used.
    assert_eq!(
        web_backends(json!([ep("10.1.0.1"), term.clone()]), &o),
        addrs(&["10.1.0.1:8080"])
    );
    // No ready endpoint: fall back to serving+terminating ones.
    assert_eq!(
        web_backends(
            json!([
                term,
                ep_cond("10.1.0.2", Some(false), None, None),
                ep_cond("10.1.0.3", Some(false), None, Some(true))
            ]),
            &o
        ),
        // serving nil counts as serving, so .3 (terminating, serving unset) also qualifies;
        // .2 is not ready and not terminating.
        addrs(&["10.1.0.3:8080", "10.1.0.9:8080"])
    );
}

/// The serving endpoints a frontend leaves out are its `spared` ones (for
/// `--terminate-sockets all`); not serving, or used, they are not.
#[test]
fn serving_endpoints_left_out_are_spared() {
    let o = TranslateOptions::default();
    let s = svc_with("default", "web", "10.0.0.1", tcp(80), json!({}));
    let sl = slice(
        "default",
        "web-a",
        "web",
        sport(8080),
        json!([
            ep("10.1.0.1"),
            ep_cond("10.1.0.8", Some(false), Some(false), Some(true)),
            ep_cond("10.1.0.9", Some(false), Some(true), Some(true)),
        ]),
    );
    let (st, diags) = translate(&[s], &[sl], &o);
    assert_eq!(diags, vec![]);
    let d = &st[&fe("10.0.0.1", 80, Proto::Tcp)];
    assert_eq!(d.backends, addrs(&["10.1.0.1:8080"]));
    assert_eq!(d.spared, addrs(&["10.1.0.9:8080"]));
    // No ready endpoint left: the terminating one is used, nothing is spared.
    let s = svc_with("default", "web", "10.0.0.1", tcp(80), json!({}));
    let sl = slice(
        "default",
        "web-a",
        "web",
        sport(8080),
        json!([ep_cond("10.1.0.9", Some(false), Some(true), Some(true))]),
    );
    let (st, _) = translate(&[s], &[sl], &o);
    let d = &st[&fe("10.0.0.1", 80, Proto::Tcp)];
    assert_eq!(d.backends, addrs(&["10.1.0.9:8080"]));
    assert!(d.spared.is_empty());
}

#[test]
fn terminating_but_not_serving_excluded() {
    let o = TranslateOptions::default();
    assert_eq!(
        web_backends(
            json!([ep_cond("10.1.0.1", Some(false), Some(false), Some(true))]),
            &o
        ),
        addrs(&[])
    );
}

#[test]
fn serving_but_not_terminating_not_ready_excluded() {
    let o = TranslateOptions::default();
    assert_eq!(
        web_backends(
            json!([ep_cond("10.1.0.1", Some(false), Some(true), Some(false))]),
            &o
        ),
        addrs(&[])
    );
}

#[test]
fn only_first_address_is_used() {
    let o = TranslateOptions::default();
    assert_eq!(
        web_backends(json!([{"addresses": ["10.1.0.1", "10.1.0.2"]}]), &o),
        addrs(&["10.1.0.1:8080"])
    );
}

#[test]
fn dedupe_across_slices_prefers_non_terminating() {
    let s = svc("default", "web", "10.0.0.1", tcp(80));
    // "web-a" sorts first and holds a terminating, not-serving copy; "web-b"
    // holds a ready one. The ready copy must win even though it comes second.
    let a = slice(
        "default",
        "web-a",
        "web",
        sport(8080),
        json!([ep_cond("10.1.0.1", Some(false), Some(false), Some(true))]),
    );
    let b = slice(
        "default",
        "web-b",
        "web",
        sport(8080),
        json!([ep("10.1.0.1")]),
    );
    for input in [vec![a.clone(), b.clone()], vec![b, a]] {
        let (st, diags) = run(std::slice::from_ref(&s), &input);
        assert_eq!(diags, vec![]);
        assert_eq!(
            st,
            state(vec![(
                fe("10.0.0.1", 80, Proto::Tcp),
                cip("default", "web", "", &["10.1.0.1:8080"]),
            )])
        );
    }
}

#[test]
fn dedupe_otherwise_keeps_first_slice_by_name() {
    let s = svc("default", "web", "10.0.0.1", tcp(80));
    // Both copies non-terminating; "web-a" (not ready) sorts first and wins
    // whatever the input order, so the address is not used.
    let a = slice(
        "default",
        "web-a",
        "web",
        sport(8080),
        json!([ep_cond("10.1.0.1", Some(false), None, None)]),
    );
    let b = slice(
        "default",
        "web-b",
        "web",
        sport(8080),
        json!([ep("10.1.0.1"), ep("10.1.0.2")]),
    );
    for input in [vec![a.clone(), b.clone()], vec![b, a]] {
        let (st, _) = run(std::slice::from_ref(&s), &input);
        assert_eq!(
            st[&fe("10.0.0.1", 80, Proto::Tcp)].backends,
            addrs(&["10.1.0.2:8080"])
        );
    }
}

#[test]
fn same_ip_different_port_numbers_are_distinct_backends() {
    let s = svc(
        "default",
        "web",
        "10.0.0.1",
        json!([{"name": "http", "port": 80}]),
    );
    let a = slice(
        "default",
        "web-a",
        "web",
        json!([{"name": "http", "port": 8080}]),
        json!([ep("10.1.0.1")]),
    );
    let b = slice(
        "default",
        "web-b",
        "web",
        json!([{"name": "http", "port": 9090}]),
        json!([ep("10.1.0.1")]),
    );
    let (st, _) = run(&[s], &[a, b]);
    assert_eq!(
        st[&fe("10.0.0.1", 80, Proto::Tcp)].backends,
        addrs(&["10.1.0.1:8080", "10.1.0.1:9090"])
    );
}

#[test]
fn zero_endpoints_still_present_with_empty_backends() {
    let s = svc(
        "default",
        "web",
        "10.0.0.1",
        json!([{"name": "a", "port": 80}, {"name": "b", "port": 81, "protocol": "UDP"}]),
    );
    let (st, diags) = run(&[s], &[]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![
            (
                fe("10.0.0.1", 80, Proto::Tcp),
                cip("default", "web", "a", &[])
            ),
            (
                fe("10.0.0.1", 81, Proto::Udp),
                cip("default", "web", "b", &[])
            ),
        ])
    );
}

#[test]
fn no_ports_gives_no_frontends() {
    let s = to_svc(
        json!({"metadata": {"namespace": "default", "name": "web"}, "spec": {"clusterIP": "10.0.0.1"}}),
    );
    assert_eq!(run(&[s], &[]), (DesiredState::new(), vec![]));
}

// ---------- filtering ----------

#[test]
fn headless_services_skipped() {
    let cases = [
        svc("default", "h1", "None", tcp(80)),
        svc("default", "h2", "", tcp(80)),
        svc_with(
            "default",
            "h3",
            "None",
            tcp(80),
            json!({"spec": {"clusterIPs": ["None"]}}),
        ),
        to_svc(
            json!({"metadata": {"namespace": "default", "name": "h4"}, "spec": {"ports": tcp(80)}}),
        ),
        to_svc(json!({"metadata": {"namespace": "default", "name": "h5"}})),
    ];
    let sl = slice(
        "default",
        "h1-a",
        "h1",
        sport(8080),
        json!([ep("10.1.0.1")]),
    );
    assert_eq!(run(&cases, &[sl]), (DesiredState::new(), vec![]));
}

#[test]
fn external_name_skipped() {
    let s = svc_with(
        "default",
        "ext",
        "10.0.0.1",
        tcp(80),
        json!({"spec": {"type": "ExternalName", "externalName": "example.com"}}),
    );
    assert_eq!(run(&[s], &[]), (DesiredState::new(), vec![]));
}

#[test]
fn headless_label_skipped_whatever_its_value() {
    let a = svc_with(
        "default",
        "a",
        "10.0.0.1",
        tcp(80),
        json!({"metadata": {"labels": {"service.kubernetes.io/headless": ""}}}),
    );
    let b = svc_with(
        "default",
        "b",
        "10.0.0.2",
        tcp(80),
        json!({"metadata": {"labels": {"service.kubernetes.io/headless": "true"}}}),
    );
    assert_eq!(run(&[a, b], &[]), (DesiredState::new(), vec![]));
}

fn proxy_named(name: &str, ip: &str, proxy: Option<&str>) -> Service {
    match proxy {
        Some(p) => svc_with(
            "default",
            name,
            ip,
            tcp(80),
            json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": p}}}),
        ),
        None => svc("default", name, ip, tcp(80)),
    }
}

#[test]
fn proxy_name_label_default_mode_serves_only_unlabelled() {
    let services = [
        proxy_named("plain", "10.0.0.1", None),
        proxy_named("ours", "10.0.0.2", Some("lb")),
        proxy_named("empty", "10.0.0.3", Some("")),
    ];
    let (st, diags) = run(&services, &[]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.1", 80, Proto::Tcp),
            cip("default", "plain", "", &[])
        )])
    );
}

#[test]
fn proxy_name_label_named_mode_serves_only_matching() {
    let services = [
        proxy_named("plain", "10.0.0.1", None),
        proxy_named("ours", "10.0.0.2", Some("lb")),
        proxy_named("theirs", "10.0.0.3", Some("other")),
    ];
    let o = TranslateOptions {
        service_proxy_name: Some("lb".into()),
        ..TranslateOptions::default()
    };
    let (st, diags) = translate(&services, &[], &o);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.2", 80, Proto::Tcp),
            cip("default", "ours", "", &[])
        )])
    );
}

#[test]
fn service_types() {
    let services = [
        svc("default", "none", "10.0.0.1", tcp(80)),
        svc_with(
            "default",
            "cip",
            "10.0.0.2",
            tcp(80),
            json!({"spec": {"type": "ClusterIP"}}),
        ),
        svc_with(
            "default",
            "np",
            "10.0.0.3",
            json!([{"port": 80, "nodePort": 30080}]),
            json!({"spec": {"type": "NodePort"}}),
        ),
        svc_with(
            "default",
            "lb",
            "10.0.0.4",
            tcp(80),
            json!({"spec": {"type": "LoadBalancer", "externalIPs": ["1.2.3.4"]}, "status": {"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}]}}}),
        ),
    ];
    let (st, diags) = run(&services, &[]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![
            (
                fe("10.0.0.1", 80, Proto::Tcp),
                cip("default", "none", "", &[])
            ),
            (
                fe("10.0.0.2", 80, Proto::Tcp),
                cip("default", "cip", "", &[])
            ),
            (
                fe("10.0.0.3", 80, Proto::Tcp),
                desired("default", "np", "", ServiceType::NodePort, &[])
            ),
            (
                fe("10.0.0.4", 80, Proto::Tcp),
                desired("default", "lb", "", ServiceType::LoadBalancer, &[])
            ),
            // The ingress IP is served; the external IP is no node address.
            (fe("5.6.7.8", 80, Proto::Tcp), {
                let mut d = desired("default", "lb", "", ServiceType::LoadBalancer, &[]);
                d.service.frontend = FrontendKind::LoadBalancer;
                d
            }),
        ])
    );
}

#[test]
fn unknown_type_is_reported_and_treated_as_cluster_ip() {
    let s = svc_with(
        "default",
        "web",
        "10.0.0.1",
        tcp(80),
        json!({"spec": {"type": "Weird"}}),
    );
    let (st, diags) = run(&[s], &[]);
    assert_eq!(
        diags,
        vec![d(
            "Service default/web",
            "spec.type",
            "unknown type \"Weird\"; treated as ClusterIP"
        )]
    );
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.1", 80, Proto::Tcp),
            cip("default", "web", "", &[])
        )])
    );
}

#[test]
fn slice_without_service_name_label_is_reported_and_ignored() {
    let s = svc("default", "web", "10.0.0.1", tcp(80));
    let sl = to_slice(json!({
        "metadata": {"namespace": "default", "name": "orphan",
                     "annotations": {SOURCE_ANNOTATION: "dir/eps.yaml#1"}},
        "addressType": "IPv4",
        "ports": sport(8080),
        "endpoints": [ep("10.1.0.1")],
    }));
    let (st, diags) = run(&[s], &[sl]);
    assert_eq!(
        diags,
        vec![Diagnostic {
            source: "dir/eps.yaml#1".into(),
            object: "EndpointSlice default/orphan".into(),
            field: "metadata.labels".into(),
            message: "missing label kubernetes.io/service-name; the slice is ignored".into(),
            severity: Default::default(),
        }]
    );
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.1", 80, Proto::Tcp),
            cip("default", "web", "", &[])
        )])
    );
}

#[test]
fn slice_for_unknown_service_is_silently_ignored() {
    let sl = slice(
        "default",
        "gone-a",
        "gone",
        sport(8080),
        json!([ep("10.1.0.1")]),
    );
    assert_eq!(run(&[], &[sl]), (DesiredState::new(), vec![]));
}

// ---------- address families ----------

#[test]
fn ipv6_service_balances_over_ipv6_slices() {
    let s = svc("default", "v6", "fd00:96::1", tcp(80));
    let sl = slice_with(
        "default",
        "v6-a",
        "v6",
        sport(8080),
        json!([
            ep("fd00:244::2"),
            ep("fd00:244::1"),
            ep_cond("fd00:244::3", Some(false), Some(true), Some(false))
        ]),
        json!({"addressType": "IPv6"}),
    );
    let (st, diags) = run(&[s], &[sl]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![(
            fe("fd00:96::1", 80, Proto::Tcp),
            DesiredService {
                // Serving but not ready: left out, and spared.
                spared: addrs(&["[fd00:244::3]:8080"]),
                ..cip(
                    "default",
                    "v6",
                    "",
                    &["[fd00:244::1]:8080", "[fd00:244::2]:8080"],
                )
            },
        )])
    );
}

#[test]
fn ipv6_service_without_ipv6_endpoints_refuses_even_with_ipv4_ones() {
    let s = svc("default", "v6", "fd00:96::1", tcp(80));
    let v4 = slice(
        "default",
        "v6-a",
        "v6",
        sport(8080),
        json!([ep("10.1.0.1")]),
    );
    let (st, diags) = run(&[s], &[v4]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![(
            fe("fd00:96::1", 80, Proto::Tcp),
            cip("default", "v6", "", &[])
        )])
    );
}

#[test]
fn dual_stack_gives_one_frontend_per_family_with_that_familys_endpoints() {
    let s = svc_with(
        "default",
        "ds",
        "fd00::10",
        json!([{"port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]),
        json!({"spec": {"clusterIPs": ["fd00::10", "10.0.0.10"], "ipFamilies": ["IPv6", "IPv4"]}}),
    );
    let ports = json!([
        {"name": "", "port": 8080, "protocol": "TCP"},
        {"name": "dns", "port": 5353, "protocol": "UDP"}
    ]);
    let v4 = slice(
        "default",
        "ds-v4",
        "ds",
        ports.clone(),
        json!([ep("10.1.0.1")]),
    );
    let v6 = slice_with(
        "default",
        "ds-v6",
        "ds",
        ports.clone(),
        // Not ready: the IPv6 family falls back on its own, whatever IPv4 has.
        json!([ep_cond("fd01::1", Some(false), Some(true), Some(true))]),
        json!({"addressType": "IPv6"}),
    );
    let fqdn = slice_with(
        "default",
        "ds-fqdn",
        "ds",
        ports,
        json!([ep("example.com")]),
        json!({"addressType": "FQDN"}),
    );
    let (st, diags) = run(&[s], &[v6, fqdn, v4]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![
            (
                fe("10.0.0.10", 80, Proto::Tcp),
                cip("default", "ds", "", &["10.1.0.1:8080"])
            ),
            (
                fe("10.0.0.10", 53, Proto::Udp),
                cip("default", "ds", "dns", &["10.1.0.1:5353"])
            ),
            (
                fe("fd00::10", 80, Proto::Tcp),
                cip("default", "ds", "", &["[fd01::1]:8080"])
            ),
            (
                fe("fd00::10", 53, Proto::Udp),
                cip("default", "ds", "dns", &["[fd01::1]:5353"])
            ),
        ])
    );
}

#[test]
fn addresses_of_the_wrong_family_or_v4_mapped_are_reported_and_skipped() {
    let s = svc_with(
        "default",
        "ds",
        "::ffff:10.0.0.9",
        tcp(80),
        json!({"spec": {"clusterIPs": ["::ffff:10.0.0.9", "fd00::10"]}}),
    );
    let v6 = slice_with(
        "default",
        "ds-v6",
        "ds",
        sport(8080),
        json!([ep("10.1.0.1"), ep("::ffff:10.1.0.2"), ep("fd01::1")]),
        json!({"addressType": "IPv6"}),
    );
    let v4 = slice(
        "default",
        "ds-v4",
        "ds",
        sport(8080),
        json!([ep("fd01::2")]),
    );
    let (st, mut diags) = run(&[s], &[v6, v4]);
    diags.sort();
    assert_eq!(
        diags,
        vec![
            d(
                "EndpointSlice default/ds-v4",
                "endpoints[0].addresses[0]",
                "\"fd01::2\" is not an IPv4 address; endpoint skipped"
            ),
            d(
                "EndpointSlice default/ds-v6",
                "endpoints[0].addresses[0]",
                "\"10.1.0.1\" is not an IPv6 address; endpoint skipped"
            ),
            d(
                "EndpointSlice default/ds-v6",
                "endpoints[1].addresses[0]",
                "\"::ffff:10.1.0.2\" is not an IPv6 address; endpoint skipped"
            ),
            d(
                "Service default/ds",
                "spec.clusterIPs[0]",
                "::ffff:10.0.0.9 is an IPv4-mapped address, not a ClusterIP; skipped"
            ),
        ]
    );
    assert_eq!(
        st,
        state(vec![(
            fe("fd00::10", 80, Proto::Tcp),
            cip("default", "ds", "", &["[fd01::1]:8080"])
        )])
    );
}

#[test]
fn cluster_ips_take_precedence_over_cluster_ip() {
    let s = svc_with(
        "default",
        "web",
        "10.0.0.99",
        tcp(80),
        json!({"spec": {"clusterIPs": ["10.0.0.1"]}}),
    );
    let (st, diags) = run(&[s], &[]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.1", 80, Proto::Tcp),
            cip("default", "web", "", &[])
        )])
    );
}

#[test]
fn cluster_ips_without_cluster_ip_are_served() {
    let s = to_svc(json!({
        "metadata": {"namespace": "default", "name": "web"},
        "spec": {"clusterIPs": ["10.0.0.1"], "ports": tcp(80)},
    }));
    let (st, diags) = run(&[s], &[]);
    assert_eq!(diags, vec![]);
    assert_eq!(st.len(), 1);
}

// ---------- internalTrafficPolicy ----------

fn local_eps() -> Value {
    json!([
        ep_node("10.1.0.1", "node-a"),
        ep_node("10.1.0.2", "node-b"),
        ep_cond("10.1.0.3", Some(false), Some(true), Some(true)),
    ])
}

#[test]
fn itp_local_keeps_only_ready_local_endpoints() {
    let local = json!({"spec": {"internalTrafficPolicy": "Local"}});
    assert_eq!(
        web_backends_patched(local.clone(), local_eps(), &opts(Some("node-a"), None)),
        addrs(&["10.1.0.1:8080"])
    );
    // No endpoint on this node: empty.
    assert_eq!(
        web_backends_patched(local.clone(), local_eps(), &opts(Some("node-c"), None)),
        addrs(&[])
    );
    // Node unknown: nothing is local.
    assert_eq!(
        web_backends_patched(local, local_eps(), &opts(None, None)),
        addrs(&[])
    );
}

#[test]
fn itp_cluster_explicit_uses_all_ready() {
    assert_eq!(
        web_backends_patched(
            json!({"spec": {"internalTrafficPolicy": "Cluster"}}),
            local_eps(),
            &opts(Some("node-a"), None)
        ),
        addrs(&["10.1.0.1:8080", "10.1.0.2:8080"])
    );
}

#[test]
fn itp_local_falls_back_to_local_serving_terminating() {
    let local = json!({"spec": {"internalTrafficPolicy": "Local"}});
    let eps = json!([
        // Ready but remote.
        ep_node("10.1.0.1", "node-b"),
        // Local, serving and terminating.
        {"addresses": ["10.1.0.2"], "nodeName": "node-a",
         "conditions": {"ready": false, "serving": true, "terminating": true}},
        // Local, terminating but not serving.
        {"addresses": ["10.1.0.3"], "nodeName": "node-a",
         "conditions": {"ready": false, "serving": false, "terminating": true}},
        // Remote serving+terminating: not local, never used.
        {"addresses": ["10.1.0.4"], "nodeName": "node-b",
         "conditions": {"ready": false, "serving": true, "terminating": true}},
    ]);
    assert_eq!(
        web_backends_patched(local, eps, &opts(Some("node-a"), None)),
        addrs(&["10.1.0.2:8080"])
    );
}

#[test]
fn itp_local_ignores_topology_hints() {
    let local = json!({"spec": {"internalTrafficPolicy": "Local"}});
    let eps = json!([
        {"addresses": ["10.1.0.1"], "nodeName": "node-a", "hints": {"forZones": [{"name": "z2"}]}},
        {"addresses": ["10.1.0.2"], "nodeName": "node-a", "hints": {"forZones": [{"name": "z1"}]}},
    ]);
    assert_eq!(
        web_backends_patched(local, eps, &opts(Some("node-a"), Some("z1"))),
        addrs(&["10.1.0.1:8080", "10.1.0.2:8080"])
    );
}

#[test]
fn unknown_itp_is_reported_and_treated_as_cluster() {
    let s = svc_with(
        "default",
        "web",
        "10.0.0.1",
        tcp(80),
        json!({"spec": {"internalTrafficPolicy": "local"}}),
    );
    let sl = slice("default", "web-a", "web", sport(8080), local_eps());
    let (st, diags) = translate(&[s], &[sl], &opts(Some("node-a"), None));
    assert_eq!(
        diags,
        vec![d(
            "Service default/web",
            "spec.internalTrafficPolicy",
            "unknown policy \"local\"; using Cluster"
        )]
    );
    assert_eq!(
        st[&fe("10.0.0.1", 80, Proto::Tcp)].backends,
        addrs(&["10.1.0.1:8080", "10.1.0.2:8080"])
    );
}

// ---------- sessionAffinity ----------

/// `d` with session affinity `secs`.
fn sticky(mut d: DesiredService, secs: u32) -> DesiredService {
    d.affinity = secs;
    d
}

/// `default/web` on 10.0.0.1:80 with one ready endpoint and `spec` merged
/// in: its frontend and the diagnostics.
fn web_affinity(spec: Value) -> (DesiredService, Vec<Diagnostic>) {
    let s = svc_with(
        "default",
        "web",
        "10.0.0.1",
        tcp(80),
        json!({ "spec": spec }),
    );
    let sl = slice(
        "default",
        "web-a",
        "web",
        sport(8080),
        json!([ep("10.1.0.1")]),
    );
    let (mut st, diags) = run(&[s], &[sl]);
    assert_eq!(st.len(), 1);
    let want = st
        .remove(&fe("10.0.0.1", 80, Proto::Tcp))
        .expect("frontend present");
    (want, diags)
}

#[test]
fn client_ip_affinity_defaults_to_three_hours_on_every_frontend() {
    let s = svc_with(
        "default",
        "ds",
        "fd00::10",
        json!([{"port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]),
        json!({"spec": {"clusterIPs": ["fd00::10", "10.0.0.10"], "sessionAffinity": "ClientIP"}}),
    );
    let ports = json!([
        {"name": "", "port": 8080, "protocol": "TCP"},
        {"name": "dns", "port": 5353, "protocol": "UDP"}
    ]);
    let v4 = slice(
        "default",
        "ds-v4",
        "ds",
        ports.clone(),
        json!([ep("10.1.0.1")]),
    );
    let v6 = slice_with(
        "default",
        "ds-v6",
        "ds",
        ports,
        json!([ep("fd01::1")]),
        json!({"addressType": "IPv6"}),
    );
    let (st, diags) = run(&[s], &[v4, v6]);
    assert_eq!(diags, vec![]);
    let h = super::DEFAULT_AFFINITY_TIMEOUT;
    assert_eq!(h, 10_800);
    assert_eq!(
        st,
        state(vec![
            (
                fe("10.0.0.10", 80, Proto::Tcp),
                sticky(cip("default", "ds", "", &["10.1.0.1:8080"]), h)
            ),
            (
                fe("10.0.0.10", 53, Proto::Udp),
                sticky(cip("default", "ds", "dns", &["10.1.0.1:5353"]), h)
            ),
            (
                fe("fd00::10", 80, Proto::Tcp),
                sticky(cip("default", "ds", "", &["[fd01::1]:8080"]), h)
            ),
            (
                fe("fd00::10", 53, Proto::Udp),
                sticky(cip("default", "ds", "dns", &["[fd01::1]:5353"]), h)
            ),
        ])
    );
}

#[test]
fn client_ip_affinity_takes_the_timeout_given() {
    for secs in [1, 5, 86_400] {
        let (want, diags) = web_affinity(json!({
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": secs}},
        }));
        assert_eq!(diags, vec![]);
        assert_eq!(
            want,
            sticky(cip("default", "web", "", &["10.1.0.1:8080"]), secs)
        );
    }
    // A config without a timeout: the default, as the API server fills it.
    for config in [
        json!({}),
        json!({"clientIP": {}}),
        json!({"clientIP": null}),
    ] {
        let (want, diags) =
            web_affinity(json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": config}));
        assert_eq!(diags, vec![]);
        assert_eq!(want.affinity, 10_800);
    }
}

#[test]
fn no_affinity_unless_client_ip() {
    for spec in [
        json!({}),
        json!({"sessionAffinity": "None"}),
        // The API server defaults an empty value to None.
        json!({"sessionAffinity": ""}),
        // A timeout alone asks for nothing.
        json!({"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}}),
    ] {
        let (want, diags) = web_affinity(spec.clone());
        assert_eq!(diags, vec![], "{spec}");
        assert_eq!(
            want,
            cip("default", "web", "", &["10.1.0.1:8080"]),
            "{spec}"
        );
    }
}

#[test]
fn an_affinity_timeout_out_of_range_is_reported_and_served_without_affinity() {
    for secs in [0, 86_401, -1, i32::MAX, i32::MIN] {
        let (want, diags) = web_affinity(json!({
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": secs}},
        }));
        assert_eq!(
            diags,
            vec![d(
                "Service default/web",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                &format!(
                    "timeout {secs} is outside 1-86400 seconds; served without session affinity"
                ),
            )]
        );
        assert_eq!(want, cip("default", "web", "", &["10.1.0.1:8080"]));
    }
}

#[test]
fn an_unknown_session_affinity_is_reported_and_served_without_affinity() {
    let (want, diags) = web_affinity(json!({
        "sessionAffinity": "clientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}},
    }));
    assert_eq!(
        diags,
        vec![d(
            "Service default/web",
            "spec.sessionAffinity",
            "unknown session affinity \"clientIP\" (only None and ClientIP); served without session affinity"
        )]
    );
    assert_eq!(want, cip("default", "web", "", &["10.1.0.1:8080"]));
}

#[test]
fn affinity_is_not_reported_for_services_not_served() {
    let bad = json!({"sessionAffinity": "Sticky"});
    let headless = svc_with("default", "h", "None", tcp(80), json!({ "spec": bad }));
    let external = svc_with(
        "default",
        "x",
        "",
        tcp(80),
        json!({"spec": {"type": "ExternalName", "sessionAffinity": "Sticky"}}),
    );
    assert_eq!(
        run(&[headless, external], &[]),
        (DesiredState::new(), vec![])
    );
}

// ---------- topology ----------

#[test]
fn zone_hints_filter_when_all_ready_have_hints() {
    let eps = json!([
        ep_zones("10.1.0.1", &["z1"]),
        ep_zones("10.1.0.2", &["z2"]),
        ep_zones("10.1.0.3", &["z2", "z1"]),
        // Not ready: does not count for all-or-nothing, and is never used.
        ep_cond("10.1.0.4", Some(false), None, None),
    ]);
    assert_eq!(
        web_backends(eps.clone(), &opts(None, Some("z1"))),
        addrs(&["10.1.0.1:8080", "10.1.0.3:8080"])
    );
    // No zone configured: no filtering.
    assert_eq!(
        web_backends(eps.clone(), &opts(Some("n"), None)),
        addrs(&["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"])
    );
    // Hints name no endpoint for our zone: no filtering.
    assert_eq!(
        web_backends(eps, &opts(None, Some("z9"))),
        addrs(&["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"])
    );
}

#[test]
fn zone_hints_are_all_or_nothing() {
    let eps = json!([
        ep_zones("10.1.0.1", &["z1"]),
        ep_zones("10.1.0.2", &["z2"]),
        ep("10.1.0.3"),
    ]);
    assert_eq!(
        web_backends(eps, &opts(None, Some("z1"))),
        addrs(&["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"])
    );
    // An empty forZones list counts as no hints.
    let eps = json!([
        ep_zones("10.1.0.1", &["z1"]),
        {"addresses": ["10.1.0.2"], "hints": {"forZones": []}},
    ]);
    assert_eq!(
        web_backends(eps, &opts(None, Some("z1"))),
        addrs(&["10.1.0.1:8080", "10.1.0.2:8080"])
    );
}

#[test]
fn zone_filter_empty_of_ready_falls_back_to_terminating() {
    // Only terminating endpoints: topology does not apply (no ready ones).
    let eps = json!([
        {"addresses": ["10.1.0.1"], "conditions": {"ready": false, "serving": true, "terminating": true},
         "hints": {"forZones": [{"name": "z2"}]}},
    ]);
    assert_eq!(
        web_backends(eps, &opts(None, Some("z1"))),
        addrs(&["10.1.0.1:8080"])
    );
}

#[test]
fn node_hints_filter_when_all_ready_have_them() {
    let eps = json!([
        ep_nodes("10.1.0.1", &["node-a"], &["z1"]),
        ep_nodes("10.1.0.2", &["node-b"], &["z1"]),
        ep_nodes("10.1.0.3", &["node-c"], &["z2"]),
    ]);
    // Node hints win over zone hints.
    assert_eq!(
        web_backends(eps.clone(), &opts(Some("node-a"), Some("z1"))),
        addrs(&["10.1.0.1:8080"])
    );
    // No endpoint for our node: fall through to zone hints.
    assert_eq!(
        web_backends(eps.clone(), &opts(Some("node-x"), Some("z1"))),
        addrs(&["10.1.0.1:8080", "10.1.0.2:8080"])
    );
    // ...and with no zone either, no filtering.
    assert_eq!(
        web_backends(eps, &opts(Some("node-x"), None)),
        addrs(&["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"])
    );
}

#[test]
fn node_hints_are_all_or_nothing() {
    let eps = json!([
        ep_nodes("10.1.0.1", &["node-a"], &["z1"]),
        ep_zones("10.1.0.2", &["z2"]),
    ]);
    // One ready endpoint lacks node hints: zone hints decide instead.
    assert_eq!(
        web_backends(eps, &opts(Some("node-a"), Some("z2"))),
        addrs(&["10.1.0.2:8080"])
    );
}

// ---------- conflicts and diagnostics ----------

/// The API server never lets two Services hold one ClusterIP:port: the
/// first one keeps it. Here "first" is the older creationTimestamp, then
/// the order seen (the input order); the name plays no part.
#[test]
fn duplicate_frontend_across_services_first_seen_wins() {
    let a = svc(
        "default",
        "alpha",
        "10.0.0.1",
        json!([{"port": 80}, {"port": 81}]),
    );
    let b = svc_with(
        "default",
        "beta",
        "10.0.0.1",
        json!([{"port": 80}, {"port": 82}]),
        json!({"metadata": {"annotations": {SOURCE_ANNOTATION: "b.yaml#0"}}}),
    );
    let alpha_wins = state(vec![
        (
            fe("10.0.0.1", 80, Proto::Tcp),
            cip("default", "alpha", "", &[]),
        ),
        (
            fe("10.0.0.1", 81, Proto::Tcp),
            cip("default", "alpha", "", &[]),
        ),
        (
            fe("10.0.0.1", 82, Proto::Tcp),
            cip("default", "beta", "", &[]),
        ),
    ]);
    let beta_reported = vec![Diagnostic {
        source: "b.yaml#0".into(),
        object: "Service default/beta".into(),
        field: "spec.ports[0]".into(),
        message: "frontend 10.0.0.1:80/TCP is already served by Service default/alpha; skipped"
            .into(),
        severity: Default::default(),
    }];
    assert_eq!(
        run(&[a.clone(), b.clone()], &[]),
        (alpha_wins.clone(), beta_reported.clone())
    );
    // Seen the other way round, beta is first and keeps it.
    let (st, diags) = run(&[b.clone(), a.clone()], &[]);
    assert_eq!(
        st[&fe("10.0.0.1", 80, Proto::Tcp)],
        cip("default", "beta", "", &[])
    );
    assert_eq!(
        diags,
        vec![d(
            "Service default/alpha",
            "spec.ports[0]",
            "frontend 10.0.0.1:80/TCP is already served by Service default/beta; skipped"
        )]
    );
    // An older creationTimestamp wins whatever the order; one without a
    // timestamp counts as younger than any with one.
    let created = |s: &Service, t: &str| {
        let mut s = s.clone();
        s.metadata.creation_timestamp = Some(serde_json::from_value(json!(t)).unwrap());
        s
    };
    let a_old = created(&a, "2026-01-01T00:00:00Z");
    let b_new = created(&b, "2026-06-01T00:00:00Z");
    for input in [
        [b_new.clone(), a_old.clone()],
        [a_old.clone(), b_new.clone()],
    ] {
        assert_eq!(
            run(&input, &[]),
            (alpha_wins.clone(), beta_reported.clone())
        );
    }
    assert_eq!(run(&[b, a_old], &[]), (alpha_wins, beta_reported));
}

#[test]
fn duplicate_service_object_uses_the_first() {
    let a = svc("default", "web", "10.0.0.1", tcp(80));
    let b = svc("default", "web", "10.0.0.2", tcp(80));
    let (st, diags) = run(&[a, b], &[]);
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.1", 80, Proto::Tcp),
            cip("default", "web", "", &[])
        )])
    );
    assert_eq!(
        diags,
        vec![d(
            "Service default/web",
            "",
            "duplicate object with the same namespace and name; only the first is used"
        )]
    );
}

#[test]
fn bad_ports_and_protocols_are_reported_and_others_kept() {
    let s = svc(
        "default",
        "web",
        "10.0.0.1",
        json!([
            {"name": "ok", "port": 80},
            {"name": "sctp", "port": 81, "protocol": "SCTP"},
            {"name": "zero", "port": 0},
            {"name": "big", "port": 70000},
            {"name": "dup", "port": 80, "protocol": "TCP"},
            {"name": "lower", "port": 83, "protocol": "tcp"},
            {"name": "both", "port": -1, "protocol": "ICMP"},
            {"name": "udp", "port": 80, "protocol": "UDP"},
        ]),
    );
    let sl = slice(
        "default",
        "web-a",
        "web",
        json!([{"name": "ok", "port": 8080}, {"name": "udp", "port": 8081, "protocol": "UDP"}]),
        json!([ep("10.1.0.1")]),
    );
    let (st, diags) = run(&[s], &[sl]);
    let o = "Service default/web";
    assert_eq!(
        diags,
        vec![
            d(
                o,
                "spec.ports[1].protocol",
                "protocol SCTP is not supported (only TCP and UDP); port skipped"
            ),
            d(
                o,
                "spec.ports[2].port",
                "port 0 is outside 1-65535; skipped"
            ),
            d(
                o,
                "spec.ports[3].port",
                "port 70000 is outside 1-65535; skipped"
            ),
            d(
                o,
                "spec.ports[4]",
                "80/TCP is already defined by spec.ports[0]; skipped"
            ),
            d(
                o,
                "spec.ports[5].protocol",
                "protocol tcp is not supported (only TCP and UDP); port skipped"
            ),
            d(
                o,
                "spec.ports[6].protocol",
                "protocol ICMP is not supported (only TCP and UDP); port skipped"
            ),
            d(
                o,
                "spec.ports[6].port",
                "port -1 is outside 1-65535; skipped"
            ),
        ]
    );
    assert_eq!(
        st,
        state(vec![
            (
                fe("10.0.0.1", 80, Proto::Tcp),
                cip("default", "web", "ok", &["10.1.0.1:8080"])
            ),
            (
                fe("10.0.0.1", 80, Proto::Udp),
                cip("default", "web", "udp", &["10.1.0.1:8081"])
            ),
        ])
    );
}

#[test]
fn bad_cluster_ips_are_reported_and_others_kept() {
    let s = svc_with(
        "default",
        "web",
        "10.0.0.1",
        tcp(80),
        json!({"spec": {"clusterIPs": ["10.0.0.1", "bogus", "10.0.0.1", "010.0.0.2"]}}),
    );
    let (st, diags) = run(&[s], &[]);
    let o = "Service default/web";
    assert_eq!(
        diags,
        vec![
            d(
                o,
                "spec.clusterIPs[1]",
                "\"bogus\" is not an IP address; skipped"
            ),
            d(
                o,
                "spec.clusterIPs[2]",
                "duplicate ClusterIP 10.0.0.1; skipped"
            ),
            d(
                o,
                "spec.clusterIPs[3]",
                "\"010.0.0.2\" is not an IP address; skipped"
            ),
        ]
    );
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.1", 80, Proto::Tcp),
            cip("default", "web", "", &[])
        )])
    );
}

#[test]
fn unparsable_cluster_ip_field_gives_no_frontend() {
    let s = svc("default", "web", "10.0.0.300", tcp(80));
    let (st, diags) = run(&[s], &[]);
    assert_eq!(st, DesiredState::new());
    assert_eq!(
        diags,
        vec![d(
            "Service default/web",
            "spec.clusterIP",
            "\"10.0.0.300\" is not an IP address; skipped"
        )]
    );
}

#[test]
fn bad_endpoint_addresses_are_reported_and_others_kept() {
    let s = svc(
        "default",
        "web",
        "10.0.0.1",
        json!([{"name": "a", "port": 80}, {"name": "b", "port": 81}]),
    );
    let sl = slice_with(
        "default",
        "web-a",
        "web",
        json!([{"name": "a", "port": 8080}, {"name": "b", "port": 8081}]),
        json!([ep("nope"), ep("fd00::1"), {"addresses": []}, ep("10.1.0.1")]),
        json!({"metadata": {"annotations": {SOURCE_ANNOTATION: "eps.yaml#3"}}}),
    );
    let (st, diags) = run(&[s], &[sl]);
    let diag = |field: &str, message: &str| Diagnostic {
        source: "eps.yaml#3".into(),
        object: "EndpointSlice default/web-a".into(),
        field: field.into(),
        message: message.into(),
        severity: Default::default(),
    };
    // Reported once per slice, not once per service port.
    assert_eq!(
        diags,
        vec![
            diag(
                "endpoints[0].addresses[0]",
                "\"nope\" is not an IPv4 address; endpoint skipped"
            ),
            diag(
                "endpoints[1].addresses[0]",
                "\"fd00::1\" is not an IPv4 address; endpoint skipped"
            ),
            diag("endpoints[2].addresses", "no address; endpoint skipped"),
        ]
    );
    assert_eq!(
        st,
        state(vec![
            (
                fe("10.0.0.1", 80, Proto::Tcp),
                cip("default", "web", "a", &["10.1.0.1:8080"])
            ),
            (
                fe("10.0.0.1", 81, Proto::Tcp),
                cip("default", "web", "b", &["10.1.0.1:8081"])
            ),
        ])
    );
}

#[test]
fn diagnostic_source_comes_from_annotation() {
    let s = svc_with(
        "prod",
        "web",
        "10.0.0.1",
        json!([{"port": 80, "protocol": "SCTP"}]),
        json!({"metadata": {"annotations": {SOURCE_ANNOTATION: "manifests/web.yaml#2"}}}),
    );
    let (st, diags) = run(&[s], &[]);
    assert_eq!(st, DesiredState::new());
    assert_eq!(
        diags,
        vec![Diagnostic {
            source: "manifests/web.yaml#2".into(),
            object: "Service prod/web".into(),
            field: "spec.ports[0].protocol".into(),
            message: "protocol SCTP is not supported (only TCP and UDP); port skipped".into(),
            severity: Default::default(),
        }]
    );
    assert_eq!(
        diags[0].to_string(),
        "manifests/web.yaml#2: Service prod/web: spec.ports[0].protocol: protocol SCTP is not supported (only TCP and UDP); port skipped"
    );
}

#[test]
fn diagnostics_for_skipped_services_slices_are_not_reported() {
    // A headless service's slice may hold anything; it is never parsed.
    let s = svc("default", "h", "None", tcp(80));
    let sl = slice("default", "h-a", "h", sport(8080), json!([ep("not-an-ip")]));
    assert_eq!(run(&[s], &[sl]), (DesiredState::new(), vec![]));
}

#[test]
fn missing_namespace_means_default() {
    let s = to_svc(
        json!({"metadata": {"name": "web"}, "spec": {"clusterIP": "10.0.0.1", "ports": tcp(80)}}),
    );
    let sl = to_slice(json!({
        "metadata": {"name": "web-a", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": sport(8080), "endpoints": [ep("10.1.0.1")],
    }));
    let (st, diags) = run(&[s], &[sl]);
    assert_eq!(diags, vec![]);
    assert_eq!(
        st,
        state(vec![(
            fe("10.0.0.1", 80, Proto::Tcp),
            cip("default", "web", "", &["10.1.0.1:8080"])
        )])
    );
}

#[test]
fn service_without_name_is_reported() {
    let s = to_svc(
        json!({"metadata": {"namespace": "default"}, "spec": {"clusterIP": "10.0.0.1", "ports": tcp(80)}}),
    );
    let (st, diags) = run(&[s], &[]);
    assert_eq!(st, DesiredState::new());
    assert_eq!(
        diags,
        vec![d(
            "Service default/",
            "metadata.name",
            "missing name; the service is ignored"
        )]
    );
}

#[test]
fn degenerate_objects_do_not_panic() {
    let services = [
        Service::default(),
        to_svc(json!({"metadata": {"name": "x"}, "spec": {}})),
        to_svc(json!({"metadata": {"name": "y"}, "spec": {"clusterIPs": [], "ports": []}})),
        to_svc(
            json!({"metadata": {"name": "z"}, "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": i32::MAX}, {"port": i32::MIN}]}}),
        ),
    ];
    let slices = [
        EndpointSlice::default(),
        to_slice(
            json!({"metadata": {"labels": {"kubernetes.io/service-name": "z"}}, "addressType": "IPv4",
                        "ports": [{"port": -5}, {"port": i32::MAX}], "endpoints": [{"addresses": []}]}),
        ),
    ];
    let (st, diags) = run(&services, &slices);
    assert_eq!(st, DesiredState::new());
    assert!(!diags.is_empty());
}

// ---------- determinism, incremental core, scale ----------

#[test]
fn result_does_not_depend_on_input_order_with_creation_times() {
    // Creation times decide the clash (without them, the order seen would).
    let services = vec![
        svc("b", "web", "10.0.0.2", tcp(80)),
        svc_with(
            "a",
            "web",
            "10.0.0.1",
            json!([{"name": "x", "port": 80}, {"name": "y", "port": 81}]),
            json!({"metadata": {"creationTimestamp": "2026-02-01T00:00:00Z"}}),
        ),
        svc_with(
            "a",
            "clash",
            "10.0.0.1",
            json!([{"name": "x", "port": 80}]),
            json!({"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}}),
        ),
    ];
    let slices = vec![
        slice(
            "a",
            "web-2",
            "web",
            json!([{"name": "x", "port": 1}, {"name": "y", "port": 2}]),
            json!([ep("10.1.0.2"), ep("bad")]),
        ),
        slice(
            "a",
            "web-1",
            "web",
            json!([{"name": "x", "port": 1}]),
            json!([ep("10.1.0.1")]),
        ),
        slice("b", "web-1", "web", sport(8080), json!([ep("10.2.0.1")])),
        to_slice(
            json!({"metadata": {"namespace": "a", "name": "nolabel-1"}, "addressType": "IPv4", "endpoints": []}),
        ),
        to_slice(
            json!({"metadata": {"namespace": "a", "name": "nolabel-0"}, "addressType": "IPv4", "endpoints": []}),
        ),
    ];
    let forward = run(&services, &slices);
    let mut rs = services.clone();
    rs.reverse();
    let mut rsl = slices.clone();
    rsl.reverse();
    assert_eq!(run(&rs, &rsl), forward);
    // "a/clash" is older than "a/web" and so wins 10.0.0.1:80.
    assert_eq!(
        forward.0[&fe("10.0.0.1", 80, Proto::Tcp)],
        cip("a", "clash", "x", &[])
    );
    assert_eq!(forward.1.len(), 4);
}

#[test]
fn translate_service_matches_translate_and_ignores_foreign_slices() {
    let s = svc(
        "default",
        "web",
        "10.0.0.1",
        json!([{"name": "http", "port": 80}]),
    );
    let own = slice(
        "default",
        "web-a",
        "web",
        json!([{"name": "http", "port": 8080}]),
        json!([ep("10.1.0.1")]),
    );
    let foreign_ns = slice(
        "other",
        "web-a",
        "web",
        json!([{"name": "http", "port": 8080}]),
        json!([ep("10.9.0.1")]),
    );
    let foreign_svc = slice(
        "default",
        "api-a",
        "api",
        json!([{"name": "http", "port": 8080}]),
        json!([ep("10.9.0.2")]),
    );
    let mut diags = Vec::new();
    let got = translate_service(
        &s,
        &[&foreign_ns, &own, &foreign_svc],
        &TranslateOptions::default(),
        &mut diags,
    );
    assert_eq!(diags, vec![]);
    assert_eq!(
        got,
        vec![(
            fe("10.0.0.1", 80, Proto::Tcp),
            cip("default", "web", "http", &["10.1.0.1:8080"]),
        )]
    );
    let (st, _) = run(&[s], &[own, foreign_ns, foreign_svc]);
    assert_eq!(st, got.into_iter().collect::<DesiredState>());
}

#[test]
fn thousand_services_with_ten_endpoints_each() {
    const N: u32 = 1000;
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..N {
        let name = format!("svc-{i}");
        let cluster_ip = Ipv4Addr::from(0x0a60_0000 + i).to_string();
        services.push(svc(
            "default",
            &name,
            &cluster_ip,
            json!([{"name": "http", "port": 80}]),
        ));
        let eps: Vec<Value> = (0..10u32)
            .map(|j| ep(&Ipv4Addr::from(0x0a01_0000 + i * 16 + j).to_string()))
            .collect();
        slices.push(slice(
            "default",
            &format!("{name}-abcde"),
            &name,
            json!([{"name": "http", "port": 8080}]),
            Value::Array(eps),
        ));
    }
    let (st, diags) = run(&services, &slices);
    assert_eq!(diags, vec![]);
    assert_eq!(st.len(), N as usize);
    assert!(st.values().all(|d| d.backends.len() == 10));
}

// ---------- NodePort (in-node clients) ----------

fn node_opts(node: &str, node_ips: &[&str]) -> TranslateOptions {
    TranslateOptions {
        node_name: Some(node.into()),
        node_ips: node_ips.iter().map(|s| ip(s)).collect(),
        ..TranslateOptions::default()
    }
}

#[test]
fn a_node_port_is_served_on_every_node_address_of_the_services_family() {
    let s = svc_with(
        "default",
        "web",
        "10.0.0.1",
        json!([{"port": 80, "nodePort": 30080}, {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]),
        json!({"spec": {"type": "NodePort"}}),
    );
    let sl = slice(
        "default",
        "web-a",
        "web",
        json!([{"port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
        json!([ep("10.1.0.2")]),
    );
    let o = node_opts("n1", &["192.168.0.10", "192.168.1.10", "fd00::10"]);
    let (st, diags) = translate(&[s], &[sl], &o);
    assert_eq!(diags, vec![]);
    let cluster = |port_name: &str, b: &[&str]| {
        desired("default", "web", port_name, ServiceType::NodePort, b)
    };
    let np = |port_name: &str, b: &[&str]| {
        let mut d = cluster(port_name, b);
        d.service.frontend = FrontendKind::NodePort;
        d
    };
    assert_eq!(
        st,
        state(vec![
            (
                fe("10.0.0.1", 80, Proto::Tcp),
                cluster("", &["10.1.0.2:8080"])
            ),
            (
                fe("192.168.0.10", 30080, Proto::Tcp),
                np("", &["10.1.0.2:8080"])
            ),
            (
                fe("192.168.1.10", 30080, Proto::Tcp),
                np("", &["10.1.0.2:8080"])
            ),
            (
                fe("10.0.0.1", 53, Proto::Udp),
                cluster("dns", &["10.1.0.2:5353"])
            ),
            (
                fe("192.168.0.10", 30053, Proto::Udp),
                np("dns", &["10.1.0.2:5353"])
            ),
            (
                fe("192.168.1.10", 30053, Proto::Udp),
                np("dns", &["10.1.0.2:5353"])
            ),
        ]),
        "an IPv4 Service is not served on the IPv6 node address"
    );
}

#[test]
fn node_ports_follow_the_type_and_the_flag() {
    let ports = json!([{"port": 80, "nodePort": 30080}]);
    let sl = slice(
        "default",
        "web-a",
        "web",
        sport(8080),
        json!([ep("10.1.0.2")]),
    );
    let frontends = |ty: &str, o: &TranslateOptions| -> Vec<Frontend> {
        let s = svc_with(
            "default",
            "web",
            "10.0.0.1",
            ports.clone(),
            json!({"spec": {"type": ty}}),
        );
        translate(&[s], std::slice::from_ref(&sl), o)
            .0
            .into_keys()
            .collect()
    };
    let o = node_opts("n1", &["192.168.0.10"]);
    let on_node = fe("192.168.0.10", 30080, Proto::Tcp);
    assert!(frontends("LoadBalancer", &o).contains(&on_node));
    assert!(frontends("NodePort", &o).contains(&on_node));
    // A nodePort left on a ClusterIP Service (the API server clears it) is not served.
    assert_eq!(
        frontends("ClusterIP", &o),
        vec![fe("10.0.0.1", 80, Proto::Tcp)]
    );
    // Without --node-ip there is no node address to serve it on.
    assert_eq!(
        frontends("NodePort", &TranslateOptions::default()),
        vec![fe("10.0.0.1", 80, Proto::Tcp)]
    );
}

/// `default/web` on 10.0.0.1:80 with `node_port`, `patch` merged in.
fn web_with(node_port: i32, patch: Value) -> Service {
    svc_with(
        "default",
        "web",
        "10.0.0.1",
        json!([{"port": 80, "nodePort": node_port}]),
        patch,
    )
}

/// `default/web`, a NodePort Service on 10.0.0.1:80 with `node_port`.
fn node_port_web(node_port: i32) -> Service {
    web_with(node_port, json!({"spec": {"type": "NodePort"}}))
}

#[test]
fn a_node_port_out_of_range_is_reported_and_the_cluster_ip_still_served() {
    let s = node_port_web(70000);
    let (st, diags) = translate(&[s], &[], &node_opts("n1", &["192.168.0.10"]));
    assert_eq!(
        st.keys().copied().collect::<Vec<_>>(),
        vec![fe("10.0.0.1", 80, Proto::Tcp)]
    );
    assert_eq!(
        diags,
        vec![d(
            "Service default/web",
            "spec.ports[0].nodePort",
            "node port 70000 is outside 1-65535; not served on node addresses"
        )]
    );
}

// ---------- ExternalIPs and LoadBalancer ingress (in-node clients) ----------

/// The frontends of `s` (with one endpoint) and their kinds, sorted.
fn kinds(s: Service, o: &TranslateOptions) -> (Vec<(Frontend, FrontendKind)>, Vec<Diagnostic>) {
    let sl = slice(
        "default",
        "web-a",
        "web",
        sport(8080),
        json!([ep("10.1.0.2")]),
    );
    let (st, diags) = translate(&[s], &[sl], o);
    let mut out: Vec<_> = st
        .into_iter()
        .map(|(f, d)| (f, d.service.frontend))
        .collect();
    out.sort_by_key(|(f, _)| *f);
    (out, diags)
}

#[test]
fn external_ips_are_served_on_this_nodes_addresses_unless_all_are_allowed() {
    let s = || {
        svc_with(
            "default",
            "web",
            "10.0.0.1",
            json!([{"port": 80}]),
            json!({"spec": {"externalIPs": ["192.168.0.10", "203.0.113.5", "fd00::10", "bogus"]}}),
        )
    };
    let cluster = (fe("10.0.0.1", 80, Proto::Tcp), FrontendKind::ClusterIP);
    let on_node = (fe("192.168.0.10", 80, Proto::Tcp), FrontendKind::ExternalIP);
    let foreign = (fe("203.0.113.5", 80, Proto::Tcp), FrontendKind::ExternalIP);
    let bogus = d(
        "Service default/web",
        "spec.externalIPs[3]",
        "\"bogus\" is not an IP address; not served",
    );
    // The default guards against CVE-2020-8554: a foreign address is not
    // captured; the IPv6 one is of no family the Service has.
    let o = node_opts("n1", &["192.168.0.10", "fd00::10"]);
    assert_eq!(
        kinds(s(), &o),
        (vec![cluster, on_node], vec![bogus.clone()])
    );
    let all = TranslateOptions {
        external_ips: ExternalIps::All,
        ..o
    };
    assert_eq!(
        kinds(s(), &all),
        (vec![cluster, on_node, foreign], vec![bogus])
    );
}

#[test]
fn load_balancer_ingress_ips_are_served_unless_in_proxy_mode() {
    let s = web_with(
        30080,
        json!({
            "spec": {"type": "LoadBalancer", "externalIPs": ["198.51.100.2"]},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "198.51.100.1"},
                {"ip": "198.51.100.2", "ipMode": "VIP"},
                {"ip": "198.51.100.3", "ipMode": "Proxy"},
                {"hostname": "lb.example"},
                {"ip": "198.51.100.4", "ipMode": "Tunnel"},
                {"ip": "fd00::1"},
            ]}},
        }),
    );
    let o = TranslateOptions {
        external_ips: ExternalIps::All,
        ..node_opts("n1", &[])
    };
    let (frontends, diags) = kinds(s, &o);
    assert_eq!(
        frontends,
        vec![
            (fe("10.0.0.1", 80, Proto::Tcp), FrontendKind::ClusterIP),
            (
                fe("198.51.100.1", 80, Proto::Tcp),
                FrontendKind::LoadBalancer
            ),
            // Listed as an external IP too: one frontend, the first kind.
            (fe("198.51.100.2", 80, Proto::Tcp), FrontendKind::ExternalIP),
        ]
    );
    assert_eq!(
        diags,
        vec![d(
            "Service default/web",
            "status.loadBalancer.ingress[4].ipMode",
            "unknown mode \"Tunnel\" (VIP or Proxy); not served"
        )]
    );
}

#[test]
fn in_node_clients_of_external_addresses_use_every_endpoint_whatever_the_traffic_policies() {
    // kube-proxy short-circuits pod and host traffic to external
    // destinations to the cluster-wide endpoints; internalTrafficPolicy
    // narrows only the ClusterIP.
    for (etp, itp) in [
        ("Local", "Local"),
        ("Local", "Cluster"),
        ("Cluster", "Local"),
        ("Cluster", "Cluster"),
    ] {
        let s = web_with(
            30080,
            json!({
                "spec": {"type": "LoadBalancer", "externalTrafficPolicy": etp,
                         "internalTrafficPolicy": itp, "externalIPs": ["192.168.0.10"]},
                "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}},
            }),
        );
        let sl = slice(
            "default",
            "web-a",
            "web",
            sport(8080),
            json!([ep_node("10.1.0.2", "n1"), ep_node("10.1.0.3", "n2")]),
        );
        let (st, _) = translate(&[s], &[sl], &node_opts("n1", &["192.168.0.10"]));
        let every = addrs(&["10.1.0.2:8080", "10.1.0.3:8080"]);
        let cluster_ip = if itp == "Local" {
            addrs(&["10.1.0.2:8080"])
        } else {
            every.clone()
        };
        assert_eq!(
            st[&fe("10.0.0.1", 80, Proto::Tcp)].backends,
            cluster_ip,
            "{etp}/{itp}"
        );
        for external in [
            fe("192.168.0.10", 30080, Proto::Tcp),
            fe("192.168.0.10", 80, Proto::Tcp),
            fe("198.51.100.1", 80, Proto::Tcp),
        ] {
            assert_eq!(st[&external].backends, every, "{external} {etp}/{itp}");
        }
    }
}

#[test]
fn localhost_node_ports_are_served_on_the_loopback_address_of_the_services_family() {
    let s = node_port_web(30080);
    let o = TranslateOptions {
        localhost_node_ports: true,
        ..TranslateOptions::default()
    };
    assert_eq!(
        kinds(s, &o),
        (
            vec![
                (fe("10.0.0.1", 80, Proto::Tcp), FrontendKind::ClusterIP),
                (fe("127.0.0.1", 30080, Proto::Tcp), FrontendKind::NodePort),
            ],
            vec![]
        ),
        "no ::1 for an IPv4 Service; no node address needed"
    );
}
