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
    diagnostics: Family<SeverityLabel, Gauge>,
    map_full: Family<MapLabel, Counter>,
    /// The pin directory, once the maps exist: until then no datapath figures.
    bpffs: OnceLock<PathBuf>,
    /// One datapath read at a time: two scrapes at once would walk the
    /// maps twice for the same figures.
    reading: Mutex<()>,
}

/// Buckets from 1 ms to about 65 s (doubling): a sync of one change takes
/// microseconds to milliseconds, a cold start of 100,000 services seconds.
fn duration_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17)
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

    /// A sync finished after `elapsed`, at `now`.
    pub fn observe_sync(&self, elapsed: Duration, now: SystemTime) {
        self.sync_duration.observe(elapsed.as_secs_f64());
        let unix = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_sync.set(unix.as_secs_f64());
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

    /// The whole exposition. Reads the pinned maps (blocking: call it off
    /// the async runtime); if they cannot be read, `lb_datapath_up` is 0 and
    /// the control-plane figures are still there.
    pub fn render(&self) -> String {
        let mut out = String::new();
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
        // Writing to a String cannot fail.
        let _ = text::encode_registry(&mut out, &self.registry);
        let _ = text::encode_registry(&mut out, &datapath);
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
        );
        m.observe_programming(Duration::from_millis(20));
        m.observe_programming(Duration::from_millis(40));
        m.set_frontends(5, 1);
        m.set_diagnostics(2, 0);
        m.map_full(maps::BACKENDS);
        m.watching(SERVICES);
        m.watch_restarted(SERVICES);
        m.relisted(SERVICES);
        let text = m.render();
        for line in [
            "lb_sync_duration_seconds_count 1",
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
}
