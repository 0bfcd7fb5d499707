//! `/metrics`: what the datapath did per service, how full the maps are,
//! and how the control plane keeps up, in the OpenMetrics text format
//! (which Prometheus scrapes natively) from `prometheus-client`.
//!
//! The control-plane figures live in a [`Registry`] the sync loop and the
//! watches update as they go. The datapath's are read from the pinned maps
//! at scrape time (per-CPU counters summed, names from `LB_SVC_META`), so
//! the program pays nothing for being scraped and the figures survive
//! agent restarts with the pins.
use std::{
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use lb_common::{maps, stats};
use prometheus_client::{
    encoding::{EncodeLabelSet, text},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tracing::debug;

use crate::datapath::{
    Datapath as _, DatapathError,
    bpf::{self, BpfDatapath},
    decode_meta, key_frontend,
};

/// `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric family `/metrics` exports (counters without `_total`,
/// histograms without `_bucket`/`_sum`/`_count`), for the dashboard check.
pub const FAMILIES: &[&str] = &[
    "lb_sync_duration_seconds",
    "lb_map_writes",
    "lb_map_deletes",
    "lb_initial_sync_complete",
    "lb_network_programming_duration_seconds",
    "lb_frontends",
    "lb_watch_restarts",
    "lb_relists",
    "lb_last_sync_timestamp_seconds",
    "lb_diagnostics",
    "lb_map_full_errors",
    "lb_datapath_up",
    "lb_service_translations",
    "lb_service_refused",
    "lb_service_sockets_terminated",
    "lb_map_entries",
    "lb_map_capacity",
    "lb_reverse_translations",
    "lb_reverse_stale",
    "lb_reverse_write_failures",
    "lb_slot_fallbacks",
    "lb_sock_spilled",
];

/// The watched resources, as `resource` label values.
pub const SERVICES: &str = "services";
pub const ENDPOINT_SLICES: &str = "endpointslices";
/// The watch on this node's Node object (its addresses).
pub const NODES: &str = "nodes";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabel {
    resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SeverityLabel {
    severity: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

/// One service port; a dual-stack service's two frontends of a port add
/// up under one label set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    namespace: String,
    service: String,
    port: u16,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabels {
    namespace: String,
    service: String,
    port: u16,
    protocol: &'static str,
    hook: &'static str,
}

/// The agent's metrics. One per agent, shared through [`crate::health::Health`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    programming: Histogram,
    frontends: Family<StateLabel, Gauge>,
    watch_restarts: Family<ResourceLabel, Counter>,
    relists: Family<ResourceLabel, Counter>,
    last_sync: Gauge<f64, AtomicU64>,
    map_writes: Counter,
    map_deletes: Counter,
    initial_sync: Gauge,
    diagnostics: Family<SeverityLabel, Gauge>,
    map_full: Family<MapLabel, Counter>,
    /// The pin directory, once the maps exist: until then no datapath figures.
    bpffs: OnceLock<PathBuf>,
    /// One datapath read at a time: two scrapes at once would walk the
    /// maps twice for the same figures.
    reading: Mutex<()>,
}

/// Bucket bounds from 10 µs to 80 s, ten a decade (1, 1.25, 1.5, 2, 2.5,
/// 3, 4, 5, 6, 8): a sync of one change and an event's way to the map take
/// tens to hundreds of microseconds, a cold start of 100,000 services
/// seconds. A quantile interpolated inside a bucket is off by at most the
/// bucket's width, a third of its lower bound.
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    const MANTISSAS: [u32; 10] = [100, 125, 150, 200, 250, 300, 400, 500, 600, 800];
    // m × 10^(e - 2), each the double nearest its decimal (one correctly
    // rounded division), so the exposition shows 0.0000125, not noise.
    (-5..=1).flat_map(|e: i32| {
        MANTISSAS.iter().map(move |&m| {
            let shift = e - 2;
            if shift < 0 {
                f64::from(m) / 10f64.powi(-shift)
            } else {
                f64::from(m) * 10f64.powi(shift)
            }
        })
    })
}

/// Which part of the figures a scrape asks for: `/metrics?collect[]=NAME`
/// (repeatable, as node_exporter's `collect[]`), NAME `control-plane` (the
/// agent's own counters: no map is read) or `datapath` (read from the maps
/// at scrape time, the costly part with many services); both without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Collect {
    pub control_plane: bool,
    pub datapath: bool,
}

impl Collect {
    pub const ALL: Self = Self {
        control_plane: true,
        datapath: true,
    };

    /// From a request's query string; `Err` names what is not understood.
    pub fn from_query(query: Option<&str>) -> Result<Self, String> {
        let mut picked = Self {
            control_plane: false,
            datapath: false,
        };
        let mut any = false;
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            if key != "collect[]" {
                continue;
            }
            any = true;
            match &*value {
                "control-plane" => picked.control_plane = true,
                "datapath" => picked.datapath = true,
                other => {
                    return Err(format!(
                        "unknown collector {other:?} (collect[]=control-plane or collect[]=datapath)"
                    ));
                }
            }
        }
        Ok(if any { picked } else { Self::ALL })
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(duration_buckets());
        let programming = Histogram::new(duration_buckets());
        let frontends = Family::<StateLabel, Gauge>::default();
        let watch_restarts = Family::<ResourceLabel, Counter>::default();
        let relists = Family::<ResourceLabel, Counter>::default();
        let last_sync = Gauge::<f64, AtomicU64>::default();
        let map_writes = Counter::default();
        let map_deletes = Counter::default();
        let initial_sync = Gauge::default();
        let diagnostics = Family::<SeverityLabel, Gauge>::default();
        let map_full = Family::<MapLabel, Counter>::default();
        // Every label value a panel or an alert may name, at 0 from the start.
        for state in ["programmed", "failed"] {
            let _ = frontends.get_or_create(&StateLabel { state });
        }
        for severity in ["warning", "info"] {
            let _ = diagnostics.get_or_create(&SeverityLabel { severity });
        }
        for map in [maps::SERVICES, maps::BACKENDS, maps::SERVICE_META] {
            let _ = map_full.get_or_create(&MapLabel { map });
        }
        registry.register(
            "lb_sync_duration_seconds",
            "Time of one sync: index check-out, translation and map writes",
            sync_duration.clone(),
        );
        registry.register(
            "lb_network_programming_duration_seconds",
            "From an EndpointSlice event (or, for Services and manifest files, the first change a sync picks up) to the end of its map writes",
            programming.clone(),
        );
        registry.register(
            "lb_frontends",
            "Frontends (service port and ClusterIP family) programmed in the maps, and failing to be",
            frontends.clone(),
        );
        registry.register(
            "lb_watch_restarts",
            "Watch failures of the Kubernetes source (each retried with backoff)",
            watch_restarts.clone(),
        );
        registry.register(
            "lb_relists",
            "Complete re-lists of a watched resource after the initial one",
            relists.clone(),
        );
        registry.register(
            "lb_last_sync_timestamp_seconds",
            "Unix time the last sync finished",
            last_sync.clone(),
        );
        registry.register(
            "lb_map_writes",
            "Map entries (frontends, backend ranges, names) written by syncs since the agent started",
            map_writes.clone(),
        );
        registry.register(
            "lb_map_deletes",
            "Map entries deleted by syncs since the agent started",
            map_deletes.clone(),
        );
        registry.register(
            "lb_initial_sync_complete",
            "1 once every source delivered everything once (the initial list, the manifest directory's first read) and a sync wrote it to the maps",
            initial_sync.clone(),
        );
        registry.register(
            "lb_diagnostics",
            "Problems with the input currently reported (invalid objects, conflicts, unresolved ports)",
            diagnostics.clone(),
        );
        registry.register(
            "lb_map_full_errors",
            "Frontend writes refused because a map was full, since the agent started",
            map_full.clone(),
        );
        Self {
            registry,
            sync_duration,
            programming,
            frontends,
            watch_restarts,
            relists,
            last_sync,
            map_writes,
            map_deletes,
            initial_sync,
            diagnostics,
            map_full,
            bpffs: OnceLock::new(),
            reading: Mutex::new(()),
        }
    }

    /// The maps are pinned in `dir`: datapath figures from now on.
    pub fn set_bpffs(&self, dir: &Path) {
        let _ = self.bpffs.set(dir.to_owned());
    }

    /// A sync finished after `elapsed`, at `now`, having written and
    /// deleted that many map entries.
    pub fn observe_sync(&self, elapsed: Duration, now: SystemTime, writes: usize, deletes: usize) {
        self.sync_duration.observe(elapsed.as_secs_f64());
        self.map_writes.inc_by(writes as u64);
        self.map_deletes.inc_by(deletes as u64);
        let unix = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_sync.set(unix.as_secs_f64());
    }

    /// The first sync with complete sources is written.
    pub fn initial_sync_complete(&self) {
        self.initial_sync.set(1);
    }

    /// A change reached the maps `latency` after it reached the agent.
    pub fn observe_programming(&self, latency: Duration) {
        self.programming.observe(latency.as_secs_f64());
    }

    pub fn set_frontends(&self, programmed: usize, failed: usize) {
        let set = |state, n: usize| {
            self.frontends
                .get_or_create(&StateLabel { state })
                .set(i64::try_from(n).unwrap_or(i64::MAX))
        };
        set("programmed", programmed);
        set("failed", failed);
    }

    pub fn set_diagnostics(&self, warnings: usize, infos: usize) {
        let set = |severity, n: usize| {
            self.diagnostics
                .get_or_create(&SeverityLabel { severity })
                .set(i64::try_from(n).unwrap_or(i64::MAX))
        };
        set("warning", warnings);
        set("info", infos);
    }

    /// A write to `map` was refused because it is full.
    pub fn map_full(&self, map: &'static str) {
        self.map_full.get_or_create(&MapLabel { map }).inc();
    }

    /// Shows the counters of a watched resource at 0 before anything happens.
    pub fn watching(&self, resource: &'static str) {
        let _ = self
            .watch_restarts
            .get_or_create(&ResourceLabel { resource });
        let _ = self.relists.get_or_create(&ResourceLabel { resource });
    }

    pub fn watch_restarted(&self, resource: &'static str) {
        self.watch_restarts
            .get_or_create(&ResourceLabel { resource })
            .inc();
    }

    pub fn relisted(&self, resource: &'static str) {
        self.relists
            .get_or_create(&ResourceLabel { resource })
            .inc();
    }

    /// The exposition of what `collect` asks for. The datapath part reads
    /// the pinned maps (blocking: call it off the async runtime); if they
    /// cannot be read, `lb_datapath_up` is 0 and the rest is still there.
    pub fn render(&self, collect: Collect) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        if collect.control_plane {
            let _ = text::encode_registry(&mut out, &self.registry);
        }
        if collect.datapath {
            let mut datapath = Registry::default();
            let up = Gauge::<i64>::default();
            if let Some(dir) = self.bpffs.get() {
                let _one = self.reading.lock().unwrap_or_else(|e| e.into_inner());
                match read_datapath(dir, &mut datapath) {
                    Ok(()) => {
                        up.set(1);
                    }
                    Err(e) => debug!(error = %e, "reading the maps for /metrics"),
                }
            }
            datapath.register(
                "lb_datapath_up",
                "1 if the pinned maps could be read for this scrape",
                up,
            );
            let _ = text::encode_registry(&mut out, &datapath);
        }
        let _ = text::encode_eof(&mut out);
        out
    }
}

/// Registers the datapath's figures, read from the maps pinned in `dir`.
fn read_datapath(dir: &Path, reg: &mut Registry) -> Result<(), DatapathError> {
    let dp = BpfDatapath::open(dir)?;
    let snap = dp.snapshot()?;
    let translations = Family::<HookLabels, Counter>::default();
    let refused = Family::<ServiceLabels, Counter>::default();
    let terminated = Family::<ServiceLabels, Counter>::default();
    for (key, master) in &snap.services {
        let Some(fe) = key_frontend(key) else {
            continue;
        };
        let (namespace, service) = match snap.meta.get(&master.svc_id).map(decode_meta) {
            Some(s) => (s.namespace.to_string(), s.name.to_string()),
            None => ("<unknown>".to_owned(), format!("svc-{}", master.svc_id)),
        };
        let labels = ServiceLabels {
            namespace,
            service,
            port: fe.addr.port(),
            protocol: fe.proto.as_str(),
        };
        let counts = dp.service_stats(master.svc_id)?.unwrap_or_default();
        for (hook, n) in [("connect", counts.connect), ("sendmsg", counts.sendmsg)] {
            let l = HookLabels {
                namespace: labels.namespace.clone(),
                service: labels.service.clone(),
                port: labels.port,
                protocol: labels.protocol,
                hook,
            };
            translations.get_or_create(&l).inc_by(n);
        }
        refused.get_or_create(&labels).inc_by(counts.refused);
        let gone = snap.terminated.get(&master.svc_id).copied().unwrap_or(0);
        terminated.get_or_create(&labels).inc_by(gone);
    }
    reg.register(
        "lb_service_translations",
        "Connects (hook=connect) and unconnected UDP datagrams (hook=sendmsg) translated to a backend of the service port",
        translations,
    );
    reg.register(
        "lb_service_refused",
        "Connects and datagrams refused with ECONNREFUSED because the service port had no endpoint",
        refused,
    );
    reg.register(
        "lb_service_sockets_terminated",
        "Sockets the agent destroyed because their backend left the service port (--terminate-sockets)",
        terminated,
    );
    let entries = Family::<MapLabel, Gauge>::default();
    let capacity = Family::<MapLabel, Gauge>::default();
    for f in bpf::map_fill(dir, &dp, &snap)? {
        let l = MapLabel { map: f.map };
        entries
            .get_or_create(&l)
            .set(i64::try_from(f.entries).unwrap_or(i64::MAX));
        capacity
            .get_or_create(&l)
            .set(i64::try_from(f.capacity).unwrap_or(i64::MAX));
    }
    reg.register(
        "lb_map_entries",
        "Entries in use in a pinned map (as `lb-agent list -o json` shows under maps)",
        entries,
    );
    reg.register("lb_map_capacity", "Entries a pinned map can hold", capacity);
    let global = dp.stats()?;
    let counter = |i: u32| {
        let c = Counter::<u64>::default();
        c.inc_by(global.get(i as usize).copied().unwrap_or(0));
        c
    };
    for (name, help, index) in [
        (
            "lb_reverse_translations",
            "Reply sources and getpeername() addresses rewritten back to the frontend",
            stats::REVERSE_TRANSLATED,
        ),
        (
            "lb_reverse_stale",
            "Reverse records dropped on read because their frontend was gone, renumbered or empty",
            stats::REVERSE_STALE,
        ),
        (
            "lb_reverse_write_failures",
            "Reverse records that could not be written (the socket's replies show the backend)",
            stats::REVERSE_WRITE_FAILED,
        ),
        (
            "lb_slot_fallbacks",
            "Connects refused because a frontend's range pointed past the backend array (never written by the agent)",
            stats::SLOT_FALLBACK,
        ),
        (
            "lb_sock_spilled",
            "Connected sockets recorded in LB_SOCK_SPILL because their LB_SOCK slot was held (many: raise --max-sockets)",
            stats::SOCK_SPILLED,
        ),
    ] {
        reg.register(name, help, counter(index));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_plane_figures_render_without_a_datapath() {
        let m = Metrics::new();
        m.observe_sync(
            Duration::from_millis(3),
            SystemTime::UNIX_EPOCH + Duration::from_secs(7),
            12,
            2,
        );
        m.observe_programming(Duration::from_millis(20));
        m.observe_programming(Duration::from_millis(40));
        m.set_frontends(5, 1);
        m.set_diagnostics(2, 0);
        m.map_full(maps::BACKENDS);
        m.watching(SERVICES);
        m.watch_restarted(SERVICES);
        m.relisted(SERVICES);
        let text = m.render(Collect::ALL);
        for line in [
            "lb_sync_duration_seconds_count 1",
            "lb_map_writes_total 12",
            "lb_map_deletes_total 2",
            "lb_initial_sync_complete 0",
            "lb_network_programming_duration_seconds_count 2",
            "lb_frontends{state=\"programmed\"} 5",
            "lb_frontends{state=\"failed\"} 1",
            "lb_diagnostics{severity=\"warning\"} 2",
            "lb_diagnostics{severity=\"info\"} 0",
            "lb_map_full_errors_total{map=\"LB_BACKENDS\"} 1",
            "lb_map_full_errors_total{map=\"LB_SERVICES\"} 0",
            "lb_watch_restarts_total{resource=\"services\"} 1",
            "lb_relists_total{resource=\"services\"} 1",
            "lb_last_sync_timestamp_seconds 7.0",
            "lb_datapath_up 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = family.split_whitespace().next().unwrap();
            assert!(FAMILIES.contains(&name), "{name} is not in FAMILIES");
        }
    }

    #[test]
    fn durations_resolve_microseconds_and_print_as_decimals() {
        let b: Vec<f64> = duration_buckets().collect();
        assert_eq!(b.len(), 70);
        assert_eq!((b[0], b[1], b[69]), (1e-5, 1.25e-5, 80.0));
        assert!(b.windows(2).all(|w| w[1] > w[0] && w[1] / w[0] <= 1.34));
        let m = Metrics::new();
        m.observe_programming(Duration::from_micros(360));
        let text = m.render(Collect::ALL);
        // 360 µs falls in (0.3 ms, 0.4 ms]: counted from that bound up.
        for (le, n) in [("0.0003", 0), ("0.0004", 1), ("80.0", 1), ("+Inf", 1)] {
            let line = format!("lb_network_programming_duration_seconds_bucket{{le=\"{le}\"}} {n}");
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.contains("le=\"0.0000125\""), "{text}");
    }

    #[test]
    fn a_scrape_can_leave_the_maps_unread() {
        assert_eq!(Collect::from_query(None), Ok(Collect::ALL));
        assert_eq!(Collect::from_query(Some("x=1")), Ok(Collect::ALL));
        let cp = Collect {
            control_plane: true,
            datapath: false,
        };
        assert_eq!(Collect::from_query(Some("collect[]=control-plane")), Ok(cp));
        assert_eq!(
            Collect::from_query(Some("collect%5B%5D=control-plane")),
            Ok(cp)
        );
        assert_eq!(
            Collect::from_query(Some("collect[]=datapath&collect[]=control-plane")),
            Ok(Collect::ALL)
        );
        assert!(Collect::from_query(Some("collect[]=cpu")).is_err());
        let m = Metrics::new();
        let text = m.render(cp);
        assert!(text.contains("lb_sync_duration_seconds_count 0"), "{text}");
        assert!(!text.contains("lb_datapath_up"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        let text = m.render(Collect {
            control_plane: false,
            datapath: true,
        });
        assert!(!text.contains("lb_sync_duration"), "{text}");
        assert!(text.contains("lb_datapath_up 0"), "{text}");
    }
}
