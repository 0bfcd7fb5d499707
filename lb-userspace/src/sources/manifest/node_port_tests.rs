//! nodePort allocation: what the API server fills in and refuses, stable
//! across edits and restarts, by the ClusterIPs' first-come rule.
use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use tempfile::TempDir;

use super::{
    Allocator, Change, DirCache, Manifests, NodePortRange, PortKey,
    read::DEFAULT_MAX_FILE_SIZE,
    tests::{docs, load_with, service},
};
use crate::model::Diagnostic;

/// One service port: (name, port, protocol, nodePort as written).
type Port<'a> = (&'a str, i32, &'a str, Option<i32>);

/// A Service `name` of type `ty` with `ports`; `extra` more spec lines.
fn svc(name: &str, ty: &str, ports: &[Port<'_>], extra: &str) -> String {
    let ports: String = ports
        .iter()
        .map(|(n, port, proto, np)| {
            let np = np.map_or_else(String::new, |np| format!("\n    nodePort: {np}"));
            format!("  - name: {n}\n    port: {port}\n    protocol: {proto}{np}\n")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: {ty}\n  selector:\n    app: {name}\n{extra}  ports:\n{ports}"
    )
}

/// A NodePort Service with one TCP port `http` on 80.
fn web(name: &str, node_port: Option<i32>) -> String {
    svc(name, "NodePort", &[("http", 80, "TCP", node_port)], "")
}

fn alloc() -> Allocator {
    Allocator::new("10.96.0.0/12".parse().unwrap(), [])
}

fn alloc_in(range: &str) -> Allocator {
    alloc().with_node_ports(range.parse().unwrap(), [])
}

/// `spec.ports[].nodePort` of a Service as the API server would have
/// left it.
fn node_ports(m: &Manifests, name: &str) -> Vec<Option<i32>> {
    service(m, name)
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|ps| ps.iter().map(|p| p.node_port).collect())
        .unwrap_or_default()
}

fn node_port(m: &Manifests, name: &str) -> i32 {
    node_ports(m, name)[0].unwrap_or_else(|| panic!("{name} has no nodePort"))
}

/// What the maps would hand a restarted agent: every service port's
/// nodePort (its node-address frontends).
fn as_previous(m: &Manifests) -> Vec<(PortKey, u16)> {
    m.services
        .iter()
        .flat_map(|s| {
            let name = s.metadata.name.clone().unwrap_or_default();
            s.spec
                .iter()
                .flat_map(|spec| spec.ports.iter().flatten())
                .filter_map(move |p| {
                    let key = ("default".to_owned(), name.clone(), p.name.clone()?);
                    Some((key, u16::try_from(p.node_port?).ok()?))
                })
        })
        .collect()
}

fn restarted(m: &Manifests) -> Allocator {
    alloc().with_node_ports(NodePortRange::default(), as_previous(m))
}

fn diag_of<'a>(m: &'a Manifests, object: &str) -> Vec<&'a Diagnostic> {
    m.diagnostics
        .iter()
        .filter(|d| d.object == object)
        .collect()
}

#[test]
fn node_port_ranges_parse_as_kube_apiserver_takes_them() {
    let r: NodePortRange = "30000-32767".parse().unwrap();
    assert_eq!(r, NodePortRange::default());
    assert_eq!(r.to_string(), "30000-32767");
    assert_eq!(
        "30000+99".parse::<NodePortRange>().unwrap().to_string(),
        "30000-30099"
    );
    for bad in [
        "",
        "30000",
        "32767-30000",
        "0-10",
        "1-70000",
        "a-b",
        "65535+1",
    ] {
        assert!(bad.parse::<NodePortRange>().is_err(), "{bad:?}");
    }
}

/// A missing nodePort is handed out from the range; it stays with its
/// service port when other Services come and go, when the Service is
/// edited (another port number, another file), across a restart seeded
/// from the maps, and a fresh agent computes the same one.
#[test]
fn allocated_node_ports_are_stable() {
    let mut a = alloc();
    let m1 = load_with(&[("a.yaml", &web("m", None))], &mut a);
    assert_eq!(m1.diagnostics, vec![]);
    let np = node_port(&m1, "m");
    assert!(NodePortRange::default().contains(np), "{np}");
    let key = ("default".to_owned(), "m".to_owned(), "http".to_owned());
    assert_eq!(
        a.node_ports.assigned,
        BTreeMap::from([(key.clone(), np as u16)])
    );

    let others = docs(&[&web("first", None), &web("z", None)]);
    let m2 = load_with(&[("a.yaml", &web("m", None)), ("b.yaml", &others)], &mut a);
    assert_eq!(node_port(&m2, "m"), np);
    let np_z = node_port(&m2, "z");
    let nps: BTreeSet<i32> = ["m", "first", "z"]
        .iter()
        .map(|n| node_port(&m2, n))
        .collect();
    assert_eq!(nps.len(), 3, "each its own: {nps:?}");

    let edited = svc("m", "NodePort", &[("http", 8080, "TCP", None)], "");
    let m3 = load_with(&[("b.yaml", &others), ("c.yaml", &edited)], &mut a);
    assert_eq!(node_port(&m3, "m"), np, "same port name, same nodePort");
    assert_eq!(node_port(&m3, "z"), np_z);

    let mut r = restarted(&m3);
    let m4 = load_with(&[("b.yaml", &others), ("c.yaml", &edited)], &mut r);
    assert_eq!((node_port(&m4, "m"), node_port(&m4, "z")), (np, np_z));
    let m5 = load_with(&[("b.yaml", &others), ("c.yaml", &edited)], &mut alloc());
    assert_eq!(node_port(&m5, "m"), np, "deterministic without state");

    // Removed services release their ports.
    let _ = load_with(&[("c.yaml", &edited)], &mut a);
    assert_eq!(a.node_ports.assigned, BTreeMap::from([(key, np as u16)]));
}

/// As the API server: TCP and UDP ports of one number share one nodePort,
/// the one written if either names it; ClusterIP Services get none; a
/// LoadBalancer gets them unless `allocateLoadBalancerNodePorts: false`,
/// which still keeps the ones written.
#[test]
fn which_ports_get_a_node_port() {
    let dns = svc(
        "dns",
        "NodePort",
        &[
            ("dns-tcp", 53, "TCP", None),
            ("dns", 53, "UDP", None),
            ("metrics", 9153, "TCP", None),
        ],
        "",
    );
    let named = svc(
        "named",
        "NodePort",
        &[("tcp", 53, "TCP", None), ("udp", 53, "UDP", Some(31053))],
        "",
    );
    let lb = svc("lb", "LoadBalancer", &[("http", 80, "TCP", None)], "");
    let lb_off = svc(
        "lb-off",
        "LoadBalancer",
        &[
            ("http", 80, "TCP", None),
            ("https", 443, "TCP", Some(31443)),
        ],
        "  allocateLoadBalancerNodePorts: false\n",
    );
    let cluster = svc("cluster", "ClusterIP", &[("http", 80, "TCP", None)], "");
    let text = docs(&[&dns, &named, &lb, &lb_off, &cluster]);
    let m = load_with(&[("s.yaml", &text)], &mut alloc());
    assert_eq!(m.diagnostics, vec![]);
    let dns = node_ports(&m, "dns");
    assert_eq!(dns[0], dns[1], "53/TCP and 53/UDP share one");
    assert!(dns[0].is_some() && dns[2].is_some() && dns[0] != dns[2]);
    assert_eq!(node_ports(&m, "named"), [Some(31053), Some(31053)]);
    assert!(node_ports(&m, "lb")[0].is_some());
    assert_eq!(node_ports(&m, "lb-off"), [None, Some(31443)]);
    assert_eq!(node_ports(&m, "cluster"), [None]);
}

/// A nodePort another Service holds is refused for the newcomer, which
/// keeps its ClusterIP and other ports: a diagnostic names its file and
/// field. The holder keeps it whatever the file order, across a restart
/// (seeded from the maps), and whatever the protocol (one pool of port
/// numbers, as the API server's). Once the holder is gone, it is free.
#[test]
fn a_node_port_held_by_another_service_is_refused_for_the_newcomer() {
    let mut a = alloc();
    let first = load_with(&[("a.yaml", &web("a", None))], &mut a);
    let np = node_port(&first, "a");
    // b names a's allocated port (on UDP) and has a second port.
    let b = svc(
        "b",
        "NodePort",
        &[("dns", 53, "UDP", Some(np)), ("http", 80, "TCP", None)],
        "",
    );
    let m = load_with(&[("a.yaml", &web("a", None)), ("b.yaml", &b)], &mut a);
    assert_eq!(node_port(&m, "a"), np, "a keeps it");
    let b_ports = node_ports(&m, "b");
    assert_eq!(b_ports[0], None, "refused");
    assert!(b_ports[1].is_some_and(|p| p != np), "{b_ports:?}");
    let d = diag_of(&m, "Service default/b");
    assert_eq!(d.len(), 1, "{:?}", m.diagnostics);
    assert_eq!(d[0].source, "b.yaml#1");
    assert_eq!(d[0].field, "spec.ports[0].nodePort");
    assert_eq!(
        d[0].message,
        format!(
            "provided port {np} is already allocated to Service default/a; not served on node addresses"
        )
    );
    assert!(
        m.services
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some("b")),
        "b itself is served"
    );

    // Two Services naming one port: the first keeps it, then the holder,
    // even when it comes second in file order.
    let (x, y) = (web("x", Some(30500)), web("y", Some(30500)));
    let mut a = alloc();
    let m = load_with(&[("1-x.yaml", &x), ("2-y.yaml", &y)], &mut a);
    assert_eq!(
        (node_ports(&m, "x"), node_ports(&m, "y")),
        (vec![Some(30500)], vec![None])
    );
    let m = load_with(&[("0-y.yaml", &y), ("1-x.yaml", &x)], &mut a);
    assert_eq!(node_ports(&m, "x"), [Some(30500)]);
    assert_eq!(diag_of(&m, "Service default/y").len(), 1);
    let mut r = alloc().with_node_ports(
        NodePortRange::default(),
        [(("default".into(), "y".into(), "http".into()), 30500)],
    );
    let m = load_with(&[("1-x.yaml", &x), ("2-y.yaml", &y)], &mut r);
    assert_eq!(node_ports(&m, "y"), [Some(30500)], "the maps say y held it");
    assert_eq!(node_ports(&m, "x"), [None]);
    // x gone: y may have it.
    let m = load_with(&[("2-y.yaml", &y)], &mut a);
    assert_eq!(
        (node_ports(&m, "y"), m.diagnostics),
        (vec![Some(30500)], vec![])
    );
}

/// A nodePort outside the range is refused as the API server words it;
/// another range admits it. A full range refuses the ports it cannot
/// give, with a diagnostic, and keeps the others.
#[test]
fn out_of_range_and_full() {
    let m = load_with(&[("w.yaml", &web("w", Some(8080)))], &mut alloc());
    assert_eq!(node_ports(&m, "w"), [None]);
    let d = diag_of(&m, "Service default/w");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].field, "spec.ports[0].nodePort");
    assert_eq!(
        d[0].message,
        "provided port 8080 is not in the valid range. The range of valid ports is 30000-32767; not served on node addresses"
    );
    let m = load_with(
        &[("w.yaml", &web("w", Some(8080)))],
        &mut alloc_in("8000-8999"),
    );
    assert_eq!(
        (node_ports(&m, "w"), m.diagnostics),
        (vec![Some(8080)], vec![])
    );

    let text = docs(&[&web("a", None), &web("b", None), &web("c", None)]);
    let m = load_with(&[("s.yaml", &text)], &mut alloc_in("30000-30001"));
    let got: Vec<Option<i32>> = ["a", "b", "c"]
        .iter()
        .map(|n| node_ports(&m, n)[0])
        .collect();
    assert_eq!(got.iter().filter(|p| p.is_some()).count(), 2, "{got:?}");
    assert_eq!(m.diagnostics.len(), 1, "{:?}", m.diagnostics);
    assert_eq!(
        m.diagnostics[0].message,
        "range 30000-30001 has no free port; not served on node addresses"
    );
}

/// One nodePort for two ports of one protocol is refused whole, as the API
/// server's validation does; for TCP and UDP it is fine.
#[test]
fn a_node_port_twice_for_one_protocol_is_invalid() {
    let dup = svc(
        "dup",
        "NodePort",
        &[
            ("a", 80, "TCP", Some(30001)),
            ("b", 443, "TCP", Some(30001)),
        ],
        "",
    );
    let m = load_with(&[("d.yaml", &dup)], &mut alloc());
    assert!(m.services.is_empty());
    assert_eq!(m.diagnostics.len(), 1);
    assert_eq!(m.diagnostics[0].field, "spec.ports[1].nodePort");
    assert_eq!(
        m.diagnostics[0].message,
        "duplicate nodePort 30001/TCP; the object is ignored, as the API server would refuse it"
    );
    let both = svc(
        "both",
        "NodePort",
        &[("a", 53, "TCP", Some(30001)), ("b", 53, "UDP", Some(30001))],
        "",
    );
    let m = load_with(&[("d.yaml", &both)], &mut alloc());
    assert_eq!(m.diagnostics, vec![]);
}

/// The per-file cache hands the index the allocated nodePort too, and an
/// edit elsewhere does not move it.
#[test]
fn the_index_sees_the_allocated_node_port() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("web.yaml"), web("web", None)).unwrap();
    let mut cache = DirCache::new(dir.path(), DEFAULT_MAX_FILE_SIZE);
    let mut a = alloc();
    let delta = cache.load(&mut a);
    let node_port = |delta: &super::Delta| {
        delta.services.iter().find_map(|c| match c {
            Change::Apply(s) if s.name == "web" => Some(s.spec.as_ref()?.ports[0].node_port),
            _ => None,
        })
    };
    let np = node_port(&delta).expect("web applied");
    assert!(NodePortRange::default().contains(np), "{np}");
    std::fs::write(dir.path().join("other.yaml"), web("other", None)).unwrap();
    let delta = cache.load(&mut a);
    assert_eq!(node_port(&delta), None, "web unchanged");
    let (services, _) = cache.current();
    let web_info = services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web_info.spec.as_ref().unwrap().ports[0].node_port, np);
}

/// A random Service: its type (0-3) and ports (port 0-2, TCP?, nodePort
/// written).
type RandomService = (u8, Vec<(u8, bool, Option<i32>)>);

fn random_service() -> impl Strategy<Value = RandomService> {
    let port = (
        0u8..3,
        any::<bool>(),
        prop::option::of(prop_oneof![30000..30006i32, Just(8080)]),
    );
    (0u8..4, prop::collection::vec(port, 1..4))
}

fn render(services: &[RandomService]) -> Vec<(String, String)> {
    services
        .iter()
        .enumerate()
        .map(|(i, (ty, ports))| {
            let (ty, extra) = match ty {
                0 => ("NodePort", ""),
                1 => ("LoadBalancer", ""),
                2 => ("LoadBalancer", "  allocateLoadBalancerNodePorts: false\n"),
                _ => ("ClusterIP", ""),
            };
            let mut seen = BTreeSet::new();
            let names: Vec<String> = (0..ports.len()).map(|j| format!("p{j}")).collect();
            let ports: Vec<Port<'_>> = ports
                .iter()
                .zip(&names)
                .filter(|((port, tcp, _), _)| seen.insert((*port, *tcp)))
                .map(|((port, tcp, np), name)| {
                    let np = np.filter(|_| ty != "ClusterIP");
                    (
                        name.as_str(),
                        [53, 80, 443][usize::from(*port)],
                        if *tcp { "TCP" } else { "UDP" },
                        np,
                    )
                })
                .collect();
            (
                format!("s{i}.yaml"),
                svc(&format!("s{i}"), ty, &ports, extra),
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the Services name: every port that should have a nodePort
    /// ends with one in the range or a diagnostic for it; no nodePort is
    /// two Services'; a second load changes nothing; a restart seeded from
    /// what the maps would hold gives the same nodePorts with the files in
    /// reverse order.
    #[test]
    fn node_ports_are_unique_in_range_and_stable(
        services in prop::collection::vec(random_service(), 1..7),
    ) {
        let range: NodePortRange = "30000-30007".parse().unwrap();
        let files = render(&services);
        let refs: Vec<(&str, &str)> = files.iter().map(|(f, t)| (f.as_str(), t.as_str())).collect();
        let mut a = alloc().with_node_ports(range, []);
        let m = load_with(&refs, &mut a);
        let mut owner: BTreeMap<i32, String> = BTreeMap::new();
        for s in &m.services {
            let name = s.metadata.name.clone().unwrap();
            let spec = s.spec.as_ref().unwrap();
            let allocates = match spec.type_.as_deref() {
                Some("NodePort") => true,
                Some("LoadBalancer") => spec.allocate_load_balancer_node_ports != Some(false),
                _ => false,
            };
            for (j, p) in spec.ports.iter().flatten().enumerate() {
                match p.node_port {
                    Some(np) => {
                        prop_assert!(range.contains(np), "{name} {np}");
                        let o = owner.entry(np).or_insert_with(|| name.clone());
                        prop_assert_eq!(&*o, &name, "{} twice", np);
                    }
                    None if allocates => {
                        let field = format!("spec.ports[{j}].nodePort");
                        prop_assert!(
                            m.diagnostics.iter().any(|d| d.object == format!("Service default/{name}") && d.field == field),
                            "{} {} has neither a nodePort nor a diagnostic: {:?}", name, field, m.diagnostics
                        );
                    }
                    None => {}
                }
            }
        }
        let again = load_with(&refs, &mut a);
        prop_assert_eq!(&again.services, &m.services);
        prop_assert_eq!(&again.diagnostics, &m.diagnostics);

        let mut r = alloc().with_node_ports(range, as_previous(&m));
        let reversed: Vec<(&str, &str)> = refs.iter().rev().copied().collect();
        let after = load_with(&reversed, &mut r);
        for s in &m.services {
            let name = s.metadata.name.as_deref().unwrap();
            prop_assert_eq!(node_ports(&after, name), node_ports(&m, name), "{}", name);
        }
    }
}
