use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{ClientIPConfig, Service, SessionAffinityConfig},
    discovery::v1::EndpointSlice,
};
use lb_common::MAX_SLOTS;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::model::{
    Proto, frontend,
    input::{EndpointInfo, Endpoints, Family, SlicePortInfo},
    translate,
};

fn svc(ns: &str, name: &str, ip: &str, ports: Value, created: Option<&str>) -> Service {
    let mut meta = json!({"namespace": ns, "name": name});
    if let Some(t) = created {
        meta["creationTimestamp"] = json!(t);
    }
    serde_json::from_value(json!({
        "metadata": meta,
        "spec": {"clusterIP": ip, "ports": ports},
    }))
    .unwrap()
}

fn slice(ns: &str, name: &str, service: Option<&str>, endpoints: Value) -> EndpointSlice {
    let mut meta = json!({"namespace": ns, "name": name});
    if let Some(s) = service {
        meta["labels"] = json!({"kubernetes.io/service-name": s});
    }
    serde_json::from_value(json!({
        "metadata": meta,
        "addressType": "IPv4",
        "ports": [{"port": 8080}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn fe(ip: &str, port: u16) -> Frontend {
    frontend(ip.parse::<std::net::IpAddr>().unwrap(), port, Proto::Tcp)
}

fn owner(index: &Index, f: &Frontend) -> Option<String> {
    index.served(f).map(|d| d.service.name.to_string())
}

#[test]
fn a_no_op_update_is_dropped_before_any_sync() {
    let mut index = Index::default();
    let s = svc("default", "web", "10.0.0.1", json!([{"port": 80}]), None);
    let sl = slice(
        "default",
        "web-1",
        Some("web"),
        json!([{"addresses": ["10.1.0.1"]}]),
    );
    assert!(index.apply_service(ServiceInfo::from(&s)));
    assert!(index.apply_slice(SliceInfo::from(&sl)));
    assert_eq!(index.checkout().changes.len(), 1);
    // The same objects again (a relist, a resync of the watch): nothing.
    assert!(!index.apply_service(ServiceInfo::from(&s)));
    assert!(!index.apply_slice(SliceInfo::from(&sl)));
    assert!(!index.has_changes());
    // A change that does not alter what is served: translated, not handed out.
    let mut hinted = sl.clone();
    hinted.endpoints[0].node_name = Some("n1".into());
    assert!(index.apply_slice(SliceInfo::from(&hinted)));
    assert!(index.checkout().changes.is_empty());
    // A real change.
    let sl2 = slice(
        "default",
        "web-1",
        Some("web"),
        json!([{"addresses": ["10.1.0.2"]}]),
    );
    assert!(index.apply_slice(SliceInfo::from(&sl2)));
    let out = index.checkout();
    assert_eq!(out.changes.len(), 1);
    assert_eq!(
        out.changes[&fe("10.0.0.1", 80)].as_ref().unwrap().backends,
        vec!["10.1.0.2:8080".parse().unwrap()]
    );
}

/// `s` with `sessionAffinity: ClientIP` and the timeout given (`None`: unset).
fn client_ip(mut s: Service, timeout: Option<i32>) -> Service {
    let spec = s.spec.get_or_insert_default();
    spec.session_affinity = Some("ClientIP".into());
    spec.session_affinity_config = timeout.map(|t| SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(t),
        }),
    });
    s
}

#[test]
fn an_affinity_change_alone_is_a_change_of_what_is_served() {
    let mut index = Index::default();
    let plain = svc(
        "default",
        "web",
        "10.0.0.1",
        json!([{"port": 80}, {"port": 53, "protocol": "UDP"}]),
        None,
    );
    let sl = slice(
        "default",
        "web-1",
        Some("web"),
        json!([{"addresses": ["10.1.0.1"]}]),
    );
    index.apply_service(ServiceInfo::from(&plain));
    index.apply_slice(SliceInfo::from(&sl));
    index.checkout();
    let udp = frontend(
        "10.0.0.1".parse::<std::net::IpAddr>().unwrap(),
        53,
        Proto::Udp,
    );
    let affinity_of = |out: &Checkout| -> Vec<(Frontend, u32)> {
        out.changes
            .iter()
            .map(|(fe, want)| (*fe, want.as_ref().unwrap().affinity))
            .collect()
    };
    // On: both frontends change, and nothing else about them.
    let on = client_ip(plain.clone(), None);
    assert!(index.apply_service(ServiceInfo::from(&on)));
    let out = index.checkout();
    assert_eq!(
        affinity_of(&out),
        vec![(udp, 10_800), (fe("10.0.0.1", 80), 10_800)]
    );
    assert_eq!(
        out.changes[&fe("10.0.0.1", 80)].as_ref().unwrap().backends,
        vec!["10.1.0.1:8080".parse().unwrap()]
    );
    // The same again: dropped before any translation.
    assert!(!index.apply_service(ServiceInfo::from(&on)));
    assert!(!index.has_changes());
    // Another timeout.
    assert!(index.apply_service(ServiceInfo::from(&client_ip(plain.clone(), Some(60)))));
    let out = index.checkout();
    assert_eq!(affinity_of(&out), vec![(udp, 60), (fe("10.0.0.1", 80), 60)]);
    // The default written out is what was served before: translated, not
    // handed out.
    assert!(index.apply_service(ServiceInfo::from(&on)));
    index.checkout();
    assert!(index.apply_service(ServiceInfo::from(&client_ip(plain.clone(), Some(10_800)))));
    assert!(index.checkout().changes.is_empty());
    // Off.
    assert!(index.apply_service(ServiceInfo::from(&plain)));
    let out = index.checkout();
    assert_eq!(affinity_of(&out), vec![(udp, 0), (fe("10.0.0.1", 80), 0)]);
    assert_eq!(index.served(&udp).unwrap().affinity, 0);
}

/// Endpoints are most of what the index holds: ten or more per service.
#[test]
fn an_endpoint_is_kept_in_24_bytes() {
    assert!(std::mem::size_of::<EndpointInfo>() <= 24);
    let sl = slice(
        "default",
        "a-1",
        Some("a"),
        json!([{"addresses": ["10.244.1.1"], "nodeName": "n1",
                "hints": {"forZones": [{"name": "z1"}]}},
               {"addresses": ["10.244.1.2"]}]),
    );
    let info = SliceInfo::from(&sl);
    let hints = info.hints(0).unwrap();
    assert_eq!(hints.for_zones, ["z1"]);
    assert!(hints.for_nodes.is_empty());
    assert_eq!(info.hints(1), None);
    assert_eq!(info.node_of(&info.endpoints[0]), Some("n1"));
    assert_eq!(info.node_of(&info.endpoints[1]), None);
}

#[test]
fn a_slice_keeps_each_node_name_once() {
    // Three endpoints on two nodes; then forty on forty nodes (past the
    // scan, through the map), with repeats.
    let few = slice(
        "default",
        "a-1",
        Some("a"),
        json!([{"addresses": ["10.244.1.1"], "nodeName": "n1"},
               {"addresses": ["10.244.1.2"], "nodeName": "n2"},
               {"addresses": ["10.244.1.3"], "nodeName": "n1"}]),
    );
    let info = SliceInfo::from(&few);
    assert_eq!(&*info.nodes, [Box::from("n1"), Box::from("n2")]);
    let nodes: Vec<_> = info.endpoints.iter().map(|e| info.node_of(e)).collect();
    assert_eq!(nodes, [Some("n1"), Some("n2"), Some("n1")]);

    let eps: Vec<_> = (0..80)
        .map(
            |i| json!({"addresses": [format!("10.244.2.{i}")], "nodeName": format!("n{}", i % 40)}),
        )
        .collect();
    let many = SliceInfo::from(&slice("default", "a-2", Some("a"), json!(eps)));
    assert_eq!(many.nodes.len(), 40);
    for (i, ep) in many.endpoints.iter().enumerate() {
        assert_eq!(many.node_of(ep), Some(format!("n{}", i % 40).as_str()));
    }
}

#[test]
fn a_newcomer_never_takes_a_running_services_frontend() {
    let mut index = Index::default();
    let a = svc("default", "zeta", "10.0.0.1", json!([{"port": 80}]), None);
    index.apply_service(ServiceInfo::from(&a));
    index.checkout();
    // "alpha" sorts first, but zeta was there first.
    let b = svc("default", "alpha", "10.0.0.1", json!([{"port": 80}]), None);
    index.apply_service(ServiceInfo::from(&b));
    let out = index.checkout();
    assert_eq!(owner(&index, &fe("10.0.0.1", 80)).as_deref(), Some("zeta"));
    // Nothing to write: zeta's frontend is as it was.
    assert!(
        out.changes
            .values()
            .all(|d| d.as_ref().unwrap().service.name == "zeta")
    );
    assert_eq!(
        out.diagnostics,
        vec![Diagnostic {
            source: String::new(),
            object: "Service default/alpha".into(),
            field: "spec.ports[0]".into(),
            message: "frontend 10.0.0.1:80/TCP is already served by Service default/zeta; skipped"
                .into(),
            severity: Default::default(),
        }]
    );
    // zeta goes: alpha takes over.
    index.delete_service("default", "zeta");
    let out = index.checkout();
    assert_eq!(
        out.changes[&fe("10.0.0.1", 80)]
            .as_ref()
            .unwrap()
            .service
            .name,
        "alpha"
    );
    assert!(out.diagnostics.is_empty());
}

#[test]
fn seeds_from_the_maps_keep_the_owner_across_a_restart() {
    // Before the restart "zeta" held the frontend; the new agent sees
    // "alpha" first (the API lists in name order).
    let mut index = Index::default();
    index.seed([("default".to_owned(), "zeta".to_owned())]);
    let b = svc("default", "alpha", "10.0.0.1", json!([{"port": 80}]), None);
    let a = svc("default", "zeta", "10.0.0.1", json!([{"port": 80}]), None);
    index.apply_service(ServiceInfo::from(&b));
    index.apply_service(ServiceInfo::from(&a));
    index.checkout();
    assert_eq!(owner(&index, &fe("10.0.0.1", 80)).as_deref(), Some("zeta"));
    index.end_seeding();
    // A creation time still decides first.
    let older = svc(
        "default",
        "alpha",
        "10.0.0.1",
        json!([{"port": 80}]),
        Some("2020-01-01T00:00:00Z"),
    );
    index.apply_service(ServiceInfo::from(&older));
    let out = index.checkout();
    assert_eq!(owner(&index, &fe("10.0.0.1", 80)).as_deref(), Some("alpha"));
    assert!(out.changes.contains_key(&fe("10.0.0.1", 80)));
}

#[test]
fn a_service_beyond_max_slots_is_capped_with_a_diagnostic() {
    let mut index = Index::default();
    let s = svc("default", "big", "10.0.0.1", json!([{"port": 80}]), None);
    index.apply_service(ServiceInfo::from(&s));
    let n = u32::from(MAX_SLOTS) + 10;
    let mut endpoints = Endpoints::default();
    for i in 0..n {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
        endpoints.push(Some(&ip), Family::V4, [None; 3], None, vec![], vec![]);
    }
    let meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta =
        serde_json::from_value(json!({
            "namespace": "default", "name": "big-1",
            "labels": {"kubernetes.io/service-name": "big"},
        }))
        .unwrap();
    let ports = vec![SlicePortInfo {
        name: Default::default(),
        proto: Proto::Tcp,
        port: Some(8080),
    }];
    index.apply_slice(SliceInfo::from_parts(
        &meta,
        Some(Family::V4),
        ports,
        endpoints,
    ));
    let out = index.checkout();
    let want = out.changes[&fe("10.0.0.1", 80)].as_ref().unwrap();
    assert_eq!(want.backends.len(), usize::from(MAX_SLOTS));
    assert_eq!(want.backends[0], "10.0.0.0:8080".parse().unwrap());
    assert_eq!(
        out.diagnostics,
        vec![Diagnostic {
            source: String::new(),
            object: "Service default/big".into(),
            field: "spec.ports[0]".into(),
            message: format!(
                "{n} endpoints for 10.0.0.1:80/TCP; only the first {MAX_SLOTS} by address are used"
            ),
            severity: Default::default(),
        }]
    );
}

#[test]
fn a_slice_moving_between_services_updates_both() {
    let mut index = Index::default();
    for name in ["a", "b"] {
        let ip = if name == "a" { "10.0.0.1" } else { "10.0.0.2" };
        index.apply_service(ServiceInfo::from(&svc(
            "default",
            name,
            ip,
            json!([{"port": 80}]),
            None,
        )));
    }
    let eps = json!([{"addresses": ["10.1.0.1"]}]);
    index.apply_slice(SliceInfo::from(&slice(
        "default",
        "x",
        Some("a"),
        eps.clone(),
    )));
    index.checkout();
    index.apply_slice(SliceInfo::from(&slice("default", "x", Some("b"), eps)));
    let out = index.checkout();
    assert_eq!(
        out.changes[&fe("10.0.0.1", 80)].as_ref().unwrap().backends,
        vec![]
    );
    assert_eq!(
        out.changes[&fe("10.0.0.2", 80)]
            .as_ref()
            .unwrap()
            .backends
            .len(),
        1
    );
}

// ---------- property: incremental == fresh ----------

#[derive(Clone, Debug)]
enum Op {
    ApplyService {
        n: usize,
        ip: u8,
        ports: Vec<u16>,
        created: Option<u8>,
        /// 0: none; 1: ClientIP, default timeout; 2: ClientIP, 5 s;
        /// 3: ClientIP, out of range (reported).
        affinity: u8,
    },
    DeleteService(usize),
    ApplySlice {
        n: usize,
        owner: Option<usize>,
        eps: Vec<(u8, bool, bool)>,
    },
    DeleteSlice(usize),
    Checkout,
}

const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..6usize, 1..4u8, prop::collection::vec(prop::sample::select(vec![80u16, 81, 82]), 0..3), prop::option::of(0..3u8), 0..4u8)
            .prop_map(|(n, ip, ports, created, affinity)| Op::ApplyService { n, ip, ports, created, affinity }),
        1 => (0..6usize).prop_map(Op::DeleteService),
        4 => (0..8usize, prop::option::weighted(0.9, 0..6usize), prop::collection::vec((0..6u8, any::<bool>(), any::<bool>()), 0..4))
            .prop_map(|(n, owner, eps)| Op::ApplySlice { n, owner, eps }),
        1 => (0..8usize).prop_map(Op::DeleteSlice),
        2 => Just(Op::Checkout),
    ]
}

fn service_of(op: &Op) -> Service {
    let Op::ApplyService {
        n,
        ip,
        ports,
        created,
        affinity,
    } = op
    else {
        unreachable!()
    };
    let ports: Vec<Value> = ports.iter().map(|p| json!({"port": p})).collect();
    let created = created.map(|c| format!("2026-01-0{}T00:00:00Z", c + 1));
    // Two namespaces, so equal names in different ones stay apart.
    let ns = if n.is_multiple_of(2) {
        "default"
    } else {
        "other"
    };
    let s = svc(
        ns,
        NAMES[*n],
        &format!("10.0.0.{ip}"),
        Value::Array(ports),
        created.as_deref(),
    );
    match affinity {
        1 => client_ip(s, None),
        2 => client_ip(s, Some(5)),
        3 => client_ip(s, Some(0)),
        _ => s,
    }
}

fn slice_of(op: &Op) -> EndpointSlice {
    let Op::ApplySlice { n, owner, eps } = op else {
        unreachable!()
    };
    let eps: Vec<Value> = eps
        .iter()
        .map(|(a, ready, terminating)| {
            json!({"addresses": [if *a == 5 { "bad".to_owned() } else { format!("10.1.0.{a}") }],
                   "conditions": {"ready": ready, "serving": true, "terminating": terminating}})
        })
        .collect();
    let ns = if n.is_multiple_of(2) {
        "default"
    } else {
        "other"
    };
    slice(
        ns,
        &format!("x{n}"),
        owner.map(|o| NAMES[o]),
        Value::Array(eps),
    )
}

fn ns_of(n: usize) -> &'static str {
    if n.is_multiple_of(2) {
        "default"
    } else {
        "other"
    }
}

proptest! {
    /// Any sequence of applies and deletes, checked out at any points,
    /// gives exactly what a fresh translation of the surviving objects
    /// gives (in the order they were first seen): the desired state, the
    /// frontends handed out (folded like the reconciler folds them) and the
    /// diagnostics.
    #[test]
    fn incremental_equals_a_fresh_translation(ops in prop::collection::vec(op(), 1..60)) {
        let opts = TranslateOptions::default();
        let mut index = Index::new(opts.clone());
        // The surviving objects, services in the order first seen.
        let mut services: Vec<Service> = Vec::new();
        let mut slices: BTreeMap<usize, EndpointSlice> = BTreeMap::new();
        let mut programmed: DesiredState = DesiredState::new();
        for op in ops.iter().chain([&Op::Checkout]) {
            match op {
                Op::ApplyService { n, .. } => {
                    let s = service_of(op);
                    index.apply_service(ServiceInfo::from(&s));
                    match services.iter_mut().find(|o| o.metadata.name.as_deref() == Some(NAMES[*n])) {
                        Some(o) => *o = s,
                        None => services.push(s),
                    }
                }
                Op::DeleteService(n) => {
                    index.delete_service(ns_of(*n), NAMES[*n]);
                    services.retain(|o| o.metadata.name.as_deref() != Some(NAMES[*n]));
                }
                Op::ApplySlice { n, .. } => {
                    let s = slice_of(op);
                    index.apply_slice(SliceInfo::from(&s));
                    slices.insert(*n, s);
                }
                Op::DeleteSlice(n) => {
                    index.delete_slice(ns_of(*n), &format!("x{n}"));
                    slices.remove(n);
                }
                Op::Checkout => {
                    let out = index.checkout();
                    for (fe, want) in out.changes {
                        match want {
                            Some(w) => programmed.insert(fe, w),
                            None => programmed.remove(&fe),
                        };
                    }
                    let all: Vec<EndpointSlice> = slices.values().cloned().collect();
                    let (want, want_diags) = translate(&services, &all, &opts);
                    prop_assert_eq!(&index.desired(), &want);
                    prop_assert_eq!(&programmed, &want);
                    prop_assert_eq!(&out.diagnostics, &want_diags);
                }
            }
        }
    }
}
