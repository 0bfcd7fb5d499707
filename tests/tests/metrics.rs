//! End-to-end: `/metrics` tells the truth. K connects through a Service's
//! ClusterIP add exactly K to its `lb_service_translations_total`, connects
//! to a Service without endpoints add to its `lb_service_refused_total`,
//! the map gauges equal `lb-agent list -o json`, and the control-plane
//! figures move after a manifest edit. The real lb-agent on a manifest
//! directory, scraped over HTTP on 127.0.0.1; connects from a client
//! namespace in the attached cgroup. Privileged: run by `cargo xtask test`
//! with `--test-threads=1`.
use std::{net::Ipv4Addr, time::Duration};

use lb_tests::{Bins, Lab, back_end_at, endpoints, find_service, metric, scrape, selector_service};

const SYNC: Duration = Duration::from_secs(15);
const PODS: &[(&str, u8)] = &[("back-end-1", 11), ("back-end-2", 12), ("back-end-3", 13)];
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 10);
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 20);
/// UDP 5300 → 80 on the back-end pods (the test servers echo datagrams).
const ECHO_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 40);
const ECHO_PORT: u16 = 5300;

fn bins() -> Bins {
    lb_tests::test_bins!()
}

/// The textbook back-end with a fixed ClusterIP, and a Service `empty`
/// whose selector matches no pod.
fn manifests() -> String {
    let back_end = back_end_at(CLUSTER_IP, PODS);
    let echo = format!(
        "apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  clusterIP: {ECHO_IP}
  selector: {{app: myapp}}
  ports: [{{port: {ECHO_PORT}, protocol: UDP, targetPort: 80}}]
"
    );
    format!(
        "{back_end}\n---\n{}---\n{echo}",
        selector_service("empty", EMPTY_IP, "nobody")
    )
}

fn svc_labels(name: &str) -> [(&str, &str); 4] {
    [
        ("namespace", "default"),
        ("service", name),
        ("port", "80"),
        ("protocol", "TCP"),
    ]
}

fn with<'a>(base: [(&'a str, &'a str); 4], extra: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    let mut v = base.to_vec();
    v.push(extra);
    v
}

#[test]
fn metrics_count_translations_refusals_and_map_fill() {
    let mut lab = Lab::running(&bins(), PODS, &manifests()).expect("lab");
    lab.agent
        .wait_for("back-end and empty", SYNC, |d| {
            endpoints(d, "default", "back-end", 80).len() == 3
                && endpoints(d, "default", "echo", ECHO_PORT).len() == 3
                && find_service(d, "default", "empty").is_some()
        })
        .unwrap();
    let health = lab.agent.wait_health_addr(SYNC).unwrap();
    let connects = with(svc_labels("back-end"), ("hook", "connect"));
    let before = scrape(health).unwrap();
    let t0 = metric(&before, "lb_service_translations_total", &connects)
        .expect("back-end's translations");
    let r0 = metric(&before, "lb_service_refused_total", &svc_labels("empty"))
        .expect("empty's refusals");

    // K connects through the ClusterIP: exactly K translations.
    const K: u64 = 57;
    lab.connects_ok(&format!("{CLUSTER_IP}:80"), K);
    // R connects to a Service without endpoints: R refusals.
    const R: u64 = 9;
    lab.connects_refused(&format!("{EMPTY_IP}:80"), R);

    // D datagrams from an unconnected UDP socket: D sendmsg translations;
    // one connected UDP socket: one connect (its sends pass no address, so
    // no sendmsg hook).
    const D: usize = 6;
    let echo = format!("{ECHO_IP}:{ECHO_PORT}");
    let mut udp = lb_tests::UdpSession::start(&lab, &[]).unwrap();
    for _ in 0..D {
        let r = udp.send(&echo).unwrap();
        assert_eq!(r["from"], echo.as_str(), "{r}");
    }
    let r = udp.command(&format!("udp c {echo}")).unwrap();
    assert!(r["peer"].is_string(), "{r}");
    let r = udp.command("send c").unwrap();
    assert!(r["name"].is_string(), "{r}");
    drop(udp);

    let after = scrape(health).unwrap();
    let echo_labels = [
        ("namespace", "default"),
        ("service", "echo"),
        ("port", "5300"),
        ("protocol", "UDP"),
    ];
    assert_eq!(
        metric(
            &after,
            "lb_service_translations_total",
            &with(echo_labels, ("hook", "sendmsg"))
        ),
        Some(D as f64)
    );
    assert_eq!(
        metric(
            &after,
            "lb_service_translations_total",
            &with(echo_labels, ("hook", "connect"))
        ),
        Some(1.0)
    );
    let t1 = metric(&after, "lb_service_translations_total", &connects).unwrap();
    assert_eq!(t1 - t0, K as f64);
    let r1 = metric(&after, "lb_service_refused_total", &svc_labels("empty")).unwrap();
    assert_eq!(r1 - r0, R as f64);
    // Nothing leaks to the other service or the other hook.
    assert_eq!(
        metric(&after, "lb_service_refused_total", &svc_labels("back-end")),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &after,
            "lb_service_translations_total",
            &with(svc_labels("empty"), ("hook", "connect"))
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &after,
            "lb_service_translations_total",
            &with(svc_labels("back-end"), ("hook", "sendmsg"))
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &after,
            "lb_service_sockets_terminated_total",
            &svc_labels("back-end")
        ),
        Some(0.0)
    );
    assert_eq!(metric(&after, "lb_datapath_up", &[]), Some(1.0));
    for name in [
        "lb_reverse_translations_total",
        "lb_reverse_stale_total",
        "lb_slot_fallbacks_total",
    ] {
        assert!(metric(&after, name, &[]).is_some(), "no {name}");
    }

    // LB_REVERSE (an LRU hash) is counted in batches, not key by key: with
    // 10,000 more records than the datagrams left (made-up socket cookies
    // no socket has), the gauge is what bpftool dumps, record for record.
    let reverse = lab.agent.bpffs.join("LB_REVERSE");
    fill_reverse(&lab, &reverse, 10_000);
    let dumped = bpftool_entries(&reverse);
    assert!(dumped >= 10_000, "{dumped}");
    let after = scrape(health).unwrap();
    assert_eq!(
        metric(&after, "lb_map_entries", &[("map", "LB_REVERSE")]),
        Some(dumped as f64)
    );

    // The map gauges are what `list -o json` computes.
    let doc = lab.agent.list_json().unwrap();
    let maps = doc["maps"].as_array().expect("maps in list -o json");
    assert!(maps.len() >= 8, "{doc}");
    for m in maps {
        let name = m["map"].as_str().unwrap();
        let label = [("map", name)];
        assert_eq!(
            metric(&after, "lb_map_entries", &label),
            m["entries"].as_f64(),
            "entries of {name}"
        );
        assert_eq!(
            metric(&after, "lb_map_capacity", &label),
            m["capacity"].as_f64(),
            "capacity of {name}"
        );
    }
    // Three frontends, six backend slots in use.
    assert_eq!(
        metric(&after, "lb_map_entries", &[("map", "LB_SERVICES")]),
        Some(3.0)
    );
    assert_eq!(
        metric(&after, "lb_map_entries", &[("map", "LB_BACKENDS")]),
        Some(6.0)
    );

    // Control plane: there, and moving after an edit.
    let cp = |s: &[lb_tests::Sample], name: &str, labels: &[(&str, &str)]| {
        metric(s, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?}"))
    };
    assert_eq!(cp(&after, "lb_frontends", &[("state", "programmed")]), 3.0);
    assert_eq!(cp(&after, "lb_frontends", &[("state", "failed")]), 0.0);
    assert_eq!(
        cp(&after, "lb_diagnostics", &[("severity", "warning")]),
        0.0
    );
    assert!(cp(&after, "lb_sync_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(cp(&after, "lb_initial_sync_complete", &[]), 1.0);
    // Three frontends' entries and names, six backends, at the least.
    let writes = cp(&after, "lb_map_writes_total", &[]);
    assert!(writes >= 6.0, "{writes}");
    assert!(cp(&after, "lb_last_sync_timestamp_seconds", &[]) > 0.0);
    let programmed = cp(&after, "lb_network_programming_duration_seconds_count", &[]);
    assert!(programmed >= 1.0);
    let syncs = cp(&after, "lb_sync_duration_seconds_count", &[]);
    lab.write_manifest(
        "marker.yaml",
        &selector_service("marker", Ipv4Addr::new(10, 96, 100, 30), "nobody"),
    )
    .unwrap();
    lab.agent
        .wait_for("the marker", SYNC, |d| {
            find_service(d, "default", "marker").is_some()
        })
        .unwrap();
    // The map write is done; the figures are updated right after it, in
    // the same iteration: wait for that iteration to finish.
    lab.agent
        .wait_for("the marker counted", SYNC, |_| {
            scrape(health)
                .is_ok_and(|s| metric(&s, "lb_frontends", &[("state", "programmed")]) == Some(4.0))
        })
        .unwrap();
    let edited = scrape(health).unwrap();
    // Shown with --nocapture, and in the output of a failure below.
    println!("{}", lb_tests::http_get(health, "/metrics").unwrap().1);
    assert!(
        cp(
            &edited,
            "lb_network_programming_duration_seconds_count",
            &[]
        ) > programmed
    );
    assert!(cp(&edited, "lb_sync_duration_seconds_count", &[]) > syncs);
    assert!(cp(&edited, "lb_map_writes_total", &[]) > writes);
    // The control plane alone is the same figures, without the maps'.
    let alone = lb_tests::scrape_control_plane(health).unwrap();
    assert_eq!(
        metric(&alone, "lb_frontends", &[("state", "programmed")]),
        Some(4.0)
    );
    assert_eq!(metric(&alone, "lb_datapath_up", &[]), None);
    assert_eq!(
        metric(&alone, "lb_map_entries", &[("map", "LB_SERVICES")]),
        None
    );
    assert_eq!(
        cp(&edited, "lb_map_entries", &[("map", "LB_SERVICES")]),
        4.0
    );
    // The probes still answer as before on the same server.
    assert_eq!(lb_tests::http_status(health, "/healthz").unwrap(), 200);
    assert_eq!(lb_tests::http_status(health, "/readyz").unwrap(), 200);
    assert_eq!(lb_tests::http_status(health, "/livez").unwrap(), 200);
}

/// Writes `n` records with made-up socket cookies (2^62 and up: no socket
/// has them, so no reply is ever translated by them) into the reverse map
/// pinned at `pin`, through one `bpftool batch`.
fn fill_reverse(lab: &Lab, pin: &std::path::Path, n: u32) {
    let hex = |bytes: &[u8]| {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut script = String::new();
    for i in 0..n {
        // ReverseKey: cookie, backend address (v4-mapped), port, padding.
        let mut key = ((1u64 << 62) + u64::from(i)).to_ne_bytes().to_vec();
        key.extend([0u8; 10]);
        key.extend([0xff, 0xff, 10, 244, 1, 11]);
        key.extend(80u16.to_be_bytes());
        key.extend([0u8; 6]);
        // ReverseValue: frontend address, port, padding, service id.
        let mut value = vec![0u8; 10];
        value.extend([0xff, 0xff]);
        value.extend(CLUSTER_IP.octets());
        value.extend(80u16.to_be_bytes());
        value.extend([0u8; 2]);
        value.extend(u32::MAX.to_ne_bytes());
        script.push_str(&format!(
            "map update pinned {} key hex {} value hex {}\n",
            pin.display(),
            hex(&key),
            hex(&value)
        ));
    }
    let file = lab.work.path().join("reverse.batch");
    std::fs::write(&file, script).unwrap();
    lb_tests::run(
        std::process::Command::new("bpftool")
            .args(["batch", "file"])
            .arg(&file),
    )
    .unwrap();
}

/// Entries of the map pinned at `pin`, as `bpftool map dump` lists them.
fn bpftool_entries(pin: &std::path::Path) -> usize {
    let out = lb_tests::run(
        std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(pin),
    )
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    doc.as_array().expect("a JSON array").len()
}
