//! The slim decode gives exactly what decoding the full object and taking
//! its slim type gives, for objects with any mix of the fields read,
//! fields skipped, nulls and absences.
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::*;

/// `v`, or absent, or null.
fn maybe(v: impl Strategy<Value = Value>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        2 => v.prop_map(Some),
        1 => Just(None),
        1 => Just(Some(Value::Null)),
    ]
}

fn object(fields: Vec<(&'static str, Option<Value>)>) -> Value {
    let map: Map<String, Value> = fields
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), v?)))
        .collect();
    Value::Object(map)
}

fn name() -> impl Strategy<Value = Value> {
    prop_oneof![Just(json!("")), "[a-z]{1,3}".prop_map(Value::from)]
}

fn string_map() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just(SERVICE_NAME.to_owned()),
        Just(HEADLESS.to_owned()),
        Just(SERVICE_PROXY_NAME.to_owned()),
        Just(SOURCE_ANNOTATION.to_owned()),
        Just("app".to_owned()),
        Just("kubectl.kubernetes.io/last-applied-configuration".to_owned()),
    ];
    proptest::collection::btree_map(key, "[a-z]{0,3}", 0..4)
        .prop_map(|m| serde_json::to_value(m).unwrap())
}

fn metadata() -> impl Strategy<Value = Value> {
    (
        maybe(name()),
        maybe(name()),
        maybe(Just(json!("42"))),
        maybe(Just(json!("2026-01-02T03:04:05Z"))),
        maybe(string_map()),
        maybe(string_map()),
        maybe(Just(json!([{"manager": "kubectl", "operation": "Apply",
                            "fieldsV1": {"f:spec": {}}}]))),
    )
        .prop_map(|(n, ns, rv, created, labels, annotations, managed)| {
            object(vec![
                ("name", n),
                ("namespace", ns),
                ("resourceVersion", rv),
                ("creationTimestamp", created),
                ("labels", labels),
                ("annotations", annotations),
                ("managedFields", managed),
            ])
        })
}

fn protocol() -> impl Strategy<Value = Value> {
    prop_oneof![Just(json!("TCP")), Just(json!("UDP")), Just(json!("SCTP"))]
}

fn service() -> impl Strategy<Value = Value> {
    let port = (
        maybe(name()),
        maybe(protocol()),
        maybe((-2i32..70_000).prop_map(Value::from)),
        maybe((-2i32..70_000).prop_map(Value::from)),
    )
        .prop_map(|(n, p, port, node_port)| {
            object(vec![
                ("name", n),
                ("protocol", p),
                ("port", port),
                ("nodePort", node_port),
                ("targetPort", Some(json!("http"))),
            ])
        });
    let spec = (
        maybe(prop_oneof![
            Just(json!("ClusterIP")),
            Just(json!("NodePort")),
            Just(json!("LoadBalancer"))
        ]),
        maybe(prop_oneof![Just(json!("10.96.0.1")), Just(json!("None"))]),
        maybe(Just(json!(["10.96.0.1", "fd00::1"]))),
        maybe(proptest::collection::vec(port, 0..3).prop_map(Value::from)),
        maybe(Just(json!("Local"))),
        maybe(prop_oneof![
            Just(json!("None")),
            Just(json!("ClientIP")),
            Just(json!("Sticky"))
        ]),
        maybe(
            maybe(
                maybe((-1i32..3).prop_map(Value::from))
                    .prop_map(|t| object(vec![("timeoutSeconds", t)])),
            )
            .prop_map(|c| object(vec![("clientIP", c)])),
        ),
        maybe(external_ips()),
    )
        .prop_map(|(t, ip, ips, ports, itp, affinity, config, external)| {
            object(vec![
                ("type", t),
                ("clusterIP", ip),
                ("clusterIPs", ips),
                ("ports", ports),
                ("internalTrafficPolicy", itp),
                ("sessionAffinity", affinity),
                ("sessionAffinityConfig", config),
                ("externalIPs", external),
            ])
        });
    let ingress = (
        maybe(prop_oneof![
            Just(json!("192.0.2.1")),
            Just(json!("fd00::2"))
        ]),
        maybe(prop_oneof![Just(json!("VIP")), Just(json!("Proxy"))]),
    )
        .prop_map(|(ip, mode)| {
            object(vec![
                ("ip", ip),
                ("ipMode", mode),
                ("hostname", Some(json!("lb.example"))),
                ("ports", Some(json!([{"port": 80, "protocol": "TCP"}]))),
            ])
        });
    let status = maybe(
        maybe(proptest::collection::vec(ingress, 0..3).prop_map(Value::from))
            .prop_map(|i| object(vec![("ingress", i)])),
    )
    .prop_map(|lb| object(vec![("loadBalancer", lb), ("conditions", Some(json!([])))]));
    (maybe(metadata()), maybe(spec), maybe(status))
        .prop_map(|(m, s, st)| object(vec![("metadata", m), ("spec", s), ("status", st)]))
}

fn external_ips() -> impl Strategy<Value = Value> {
    proptest::collection::vec(
        prop_oneof![
            Just(json!("192.0.2.7")),
            Just(json!("fd00::7")),
            Just(json!("not-an-ip"))
        ],
        0..3,
    )
    .prop_map(Value::from)
}

fn slice() -> impl Strategy<Value = Value> {
    let address = prop_oneof![
        Just(json!("10.244.1.1")),
        Just(json!("fd00::1")),
        Just(json!("::ffff:10.0.0.1")),
        Just(json!("pod.example")),
    ];
    let names = || {
        maybe(
            proptest::collection::vec(maybe(name()), 0..3).prop_map(|v| {
                Value::from(
                    v.into_iter()
                        .map(|n| object(vec![("name", n)]))
                        .collect::<Vec<_>>(),
                )
            }),
        )
    };
    let conditions = (
        maybe(any::<bool>().prop_map(Value::from)),
        maybe(any::<bool>().prop_map(Value::from)),
        maybe(any::<bool>().prop_map(Value::from)),
    )
        .prop_map(|(r, s, t)| object(vec![("ready", r), ("serving", s), ("terminating", t)]));
    let endpoint = (
        maybe(proptest::collection::vec(address, 0..3).prop_map(Value::from)),
        maybe(conditions),
        maybe(name()),
        maybe((names(), names()).prop_map(|(n, z)| object(vec![("forNodes", n), ("forZones", z)]))),
    )
        .prop_map(|(a, c, node, hints)| {
            object(vec![
                ("addresses", a),
                ("conditions", c),
                ("nodeName", node),
                ("hints", hints),
                (
                    "targetRef",
                    Some(json!({"kind": "Pod", "name": "p", "uid": "u"})),
                ),
                ("zone", Some(json!("z1"))),
            ])
        });
    let port = (
        maybe(name()),
        maybe(protocol()),
        maybe((-2i32..70_000).prop_map(Value::from)),
    )
        .prop_map(|(n, p, port)| object(vec![("name", n), ("protocol", p), ("port", port)]));
    (
        maybe(metadata()),
        maybe(prop_oneof![
            Just(json!("IPv4")),
            Just(json!("IPv6")),
            Just(json!("FQDN"))
        ]),
        maybe(proptest::collection::vec(endpoint, 0..4).prop_map(Value::from)),
        maybe(proptest::collection::vec(port, 0..3).prop_map(Value::from)),
    )
        .prop_map(|(m, at, eps, ports)| {
            object(vec![
                ("metadata", m),
                ("addressType", at),
                ("endpoints", eps),
                ("ports", ports),
            ])
        })
}

proptest! {
    #[test]
    fn a_service_decodes_to_what_the_full_object_gives(obj in service()) {
        let full: Service = serde_json::from_value(obj.clone()).unwrap();
        let slim: SlimService = serde_json::from_value(obj).unwrap();
        prop_assert_eq!(slim.info, ServiceInfo::from(&full));
        prop_assert_eq!(slim.metadata.resource_version, full.metadata.resource_version);
    }

    #[test]
    fn a_slice_decodes_to_what_the_full_object_gives(obj in slice()) {
        let full: EndpointSlice = serde_json::from_value(obj.clone()).unwrap();
        let slim: SlimSlice = serde_json::from_value(obj).unwrap();
        prop_assert_eq!(slim.info, SliceInfo::from(&full));
        prop_assert_eq!(slim.metadata.resource_version, full.metadata.resource_version);
    }
}

/// The watch decodes list pages and events from bytes, where keys and
/// strings are borrowed: the same result as from a `Value`.
#[test]
fn a_list_page_decodes_from_bytes() {
    let page = br#"{"kind":"EndpointSliceList","apiVersion":"discovery.k8s.io/v1",
        "metadata":{"resourceVersion":"7"},
        "items":[{"metadata":{"name":"a-1","namespace":"ns","resourceVersion":"5",
                  "labels":{"kubernetes.io/service-name":"a","x\u0041":"y"},
                  "managedFields":[{"manager":"m"}]},
                  "addressType":"IPv4",
                  "endpoints":[{"addresses":["10.0.0.1","10.0.0.2"],"nodeName":"n1"}],
                  "ports":[{"port":80}]}]}"#;
    let list: kube::core::ObjectList<SlimSlice> = serde_json::from_slice(page).unwrap();
    let info = &list.items[0].info;
    assert_eq!((info.namespace.as_str(), info.name.as_str()), ("ns", "a-1"));
    assert_eq!(info.service.as_deref(), Some("a"));
    assert_eq!(info.endpoints.len(), 1);
    assert_eq!(info.node_of(&info.endpoints[0]), Some("n1"));
    assert_eq!(
        list.items[0].metadata.resource_version.as_deref(),
        Some("5")
    );
    assert_eq!(
        <SlimSlice as kube::Resource>::url_path(&(), None),
        "/apis/discovery.k8s.io/v1/endpointslices"
    );
    assert_eq!(
        <SlimService as kube::Resource>::url_path(&(), Some("ns")),
        "/api/v1/namespaces/ns/services"
    );
}

/// `sessionAffinity` and its timeout come through the slim decode, and the
/// index serves them.
#[test]
fn session_affinity_decodes_into_what_is_served() {
    let svc = json!({
        "metadata": {"name": "web", "namespace": "ns", "resourceVersion": "3"},
        "spec": {
            "clusterIP": "10.96.0.5",
            "ports": [{"port": 80}],
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}},
        },
    });
    let slim: SlimService = serde_json::from_slice(&serde_json::to_vec(&svc).unwrap()).unwrap();
    let spec = slim.info.spec.as_ref().unwrap();
    assert_eq!(spec.session_affinity(), Some("ClientIP"));
    assert_eq!(spec.session_affinity_timeout(), Some(5));
    let mut index = crate::model::Index::default();
    index.apply_service(slim.info);
    let out = index.checkout();
    assert_eq!(out.diagnostics, vec![]);
    let fe = crate::model::frontend(
        "10.96.0.5".parse::<std::net::IpAddr>().unwrap(),
        80,
        crate::model::Proto::Tcp,
    );
    assert_eq!(out.changes[&fe].as_ref().unwrap().affinity, 5);
}
