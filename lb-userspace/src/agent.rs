//! The agent: objects from a source → pure translation → reconciler → maps.
//!
//! Every source (the manifest directory, the API server) ends in
//! [`Syncer::sync`], so there is one code path from objects to map writes.
use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{
        Datapath, DatapathError,
        bpf::{self, BpfDatapath, DirLock, LoadError, MapSizes},
    },
    health::{self, Health},
    model::{
        DesiredService, DesiredState, Diagnostic, Frontend, Severity, TranslateOptions, translate,
    },
    reconciler::{Prune, Reconciler},
    sources::{
        dir_watch::{self, POLL_INTERVAL},
        kube::{self as kube_source, ClientConfig, ClientError, Coalesce, Driver, Kind},
        manifest::{self, ClusterIpAllocator, ServiceCidr},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("opening the pinned maps: {0}")]
    Datapath(#[from] DatapathError),
    #[error("cgroup v2: {0}")]
    Cgroup(std::io::Error),
    #[error(transparent)]
    Kube(#[from] ClientError),
}

/// Everything `lb-agent run --manifests` needs.
#[derive(Clone, Debug)]
pub struct ManifestAgentConfig {
    pub bpffs: PathBuf,
    /// `None`: the host's cgroup v2 root from `/proc/mounts`.
    pub cgroup: Option<PathBuf>,
    pub manifests: PathBuf,
    /// Manifest files larger than this are skipped with a diagnostic.
    pub max_manifest_size: u64,
    pub service_cidr: ServiceCidr,
    pub sizes: MapSizes,
    pub bpf_log: bool,
    /// Share `bpffs` with pins lb-agent did not create.
    pub allow_foreign_pins: bool,
    pub translate: TranslateOptions,
    /// `/healthz` and `/readyz`; `None`: not served.
    pub health_addr: Option<SocketAddr>,
    /// `/healthz` fails while one sync-loop iteration has run longer than this.
    pub stall_timeout: Duration,
}

/// Everything `lb-agent run` against the Kubernetes API needs.
#[derive(Clone, Debug)]
pub struct KubeAgentConfig {
    pub bpffs: PathBuf,
    /// `None`: the host's cgroup v2 root from `/proc/mounts`.
    pub cgroup: Option<PathBuf>,
    pub sizes: MapSizes,
    pub bpf_log: bool,
    /// Share `bpffs` with pins lb-agent did not create.
    pub allow_foreign_pins: bool,
    /// `zone: None` means: read it from this node's `topology.kubernetes.io/zone` label.
    pub translate: TranslateOptions,
    pub client: ClientConfig,
    /// `/healthz` and `/readyz`; `None`: not served.
    pub health_addr: Option<SocketAddr>,
    /// `/healthz` fails while one sync-loop iteration has run longer than this.
    pub stall_timeout: Duration,
}

/// What one sync did, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub frontends: usize,
    pub writes: usize,
    pub deletes: usize,
    pub errors: usize,
}

/// Translation plus reconciliation, with diagnostics reported once each
/// (a file that stays broken is not re-logged on every edit elsewhere).
pub struct Syncer<D> {
    reconciler: Reconciler<D>,
    opts: TranslateOptions,
    reported: BTreeSet<Diagnostic>,
    /// Frontends the last sync could not bring in line (a full map, a
    /// refused write): a source that syncs only what changed retries them.
    failed: BTreeSet<Frontend>,
}

impl<D: Datapath> Syncer<D> {
    pub fn new(reconciler: Reconciler<D>, opts: TranslateOptions) -> Self {
        Self {
            reconciler,
            opts,
            reported: BTreeSet::new(),
            failed: BTreeSet::new(),
        }
    }

    pub fn reconciler(&self) -> &Reconciler<D> {
        &self.reconciler
    }

    /// Frontends the last sync failed to write or remove.
    pub fn failed(&self) -> &BTreeSet<Frontend> {
        &self.failed
    }

    /// The problems currently reported (each logged once).
    pub fn diagnostics(&self) -> &BTreeSet<Diagnostic> {
        &self.reported
    }

    pub fn options(&self) -> &TranslateOptions {
        &self.opts
    }

    /// New node inputs (a zone learned late); used from the next sync on.
    pub fn set_options(&mut self, opts: TranslateOptions) {
        self.opts = opts;
    }

    /// Brings the maps to what `services` and `slices` describe. `source_diags`
    /// are problems the source found before translation (parse errors).
    pub fn sync(
        &mut self,
        services: &[Service],
        slices: &[EndpointSlice],
        source_diags: Vec<Diagnostic>,
        prune: Prune,
    ) -> SyncStats {
        let (desired, diags) = translate(services, slices, &self.opts);
        self.apply_desired(
            desired,
            source_diags.into_iter().chain(diags).collect(),
            prune,
        )
    }

    /// The second half of [`Syncer::sync`], for a source that keeps the
    /// translation up to date incrementally (per service, with the model's
    /// own [`crate::model::translate_service`]).
    pub fn apply_desired(
        &mut self,
        mut desired: DesiredState,
        diags: BTreeSet<Diagnostic>,
        prune: Prune,
    ) -> SyncStats {
        self.report(diags);
        if prune == Prune::No {
            let installed = self.reconciler.installed();
            desired.retain(|fe, want| may_install_early(installed, fe, want));
        }
        let report = self.reconciler.apply(&desired, prune);
        self.finish(&report)
    }

    /// Like [`Syncer::apply_desired`], for a source that knows which
    /// frontends changed: only those are written (`None`: the frontend is
    /// gone), so a sync costs what changed.
    pub fn apply_changes(
        &mut self,
        mut changes: BTreeMap<Frontend, Option<DesiredService>>,
        diags: BTreeSet<Diagnostic>,
        prune: Prune,
    ) -> SyncStats {
        self.report(diags);
        if prune == Prune::No {
            // Nothing removed until the sources are complete either.
            let installed = self.reconciler.installed();
            changes.retain(|fe, want| {
                want.as_ref()
                    .is_some_and(|w| may_install_early(installed, fe, w))
            });
        }
        let report = self.reconciler.apply_changes(&changes, prune);
        self.finish(&report)
    }

    fn finish(&mut self, report: &crate::reconciler::ApplyReport) -> SyncStats {
        for e in &report.errors {
            error!("{e}");
        }
        self.failed = report.errors.iter().map(|e| e.frontend).collect();
        for e in &report.other_errors {
            error!("{e}");
        }
        let full = report.map_full();
        if full > 0
            && let Err(e) = self.reconciler.datapath_mut().count_map_full(full as u64)
        {
            warn!(error = %e, "could not count map-full failures");
        }
        SyncStats {
            frontends: self.reconciler.installed().len(),
            writes: report.writes,
            deletes: report.deletes,
            errors: report.errors.len() + report.other_errors.len(),
        }
    }

    fn report(&mut self, now: BTreeSet<Diagnostic>) {
        for d in now.difference(&self.reported) {
            match d.severity {
                Severity::Warning => warn!("{d}"),
                Severity::Info => info!("{d}"),
            }
        }
        for d in self.reported.difference(&now) {
            info!("resolved: {d}");
        }
        self.reported = now;
    }
}

/// While sources are still syncing, an empty backend list may only mean the
/// slices have not arrived yet: a new frontend that would refuse connects
/// waits; installed ones keep their backends anyway (no shrink before then).
fn may_install_early(
    installed: &BTreeMap<Frontend, crate::reconciler::Installed>,
    fe: &Frontend,
    want: &DesiredService,
) -> bool {
    !want.backends.is_empty() || installed.contains_key(fe)
}

/// Loads and attaches the programs (re-adopting pinned maps and state) and
/// keeps the maps equal to the manifest directory until `shutdown`. Leaving
/// does not detach: the pinned link keeps connects balanced while no agent runs.
pub async fn run_manifests(
    cfg: ManifestAgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let health = start_health(cfg.health_addr, cfg.stall_timeout);
    let (reconciler, _lock) = attach(
        &cfg.bpffs,
        cfg.cgroup.as_deref(),
        cfg.sizes,
        cfg.bpf_log,
        cfg.allow_foreign_pins,
    )?;
    // Addresses a previous agent allocated stay with their services, per
    // family (the allocator keeps those inside its ranges).
    let previous = reconciler
        .installed()
        .iter()
        .filter(|(_, i)| !i.service.name.is_empty())
        .map(|(fe, i)| {
            (
                (i.service.namespace.clone(), i.service.name.clone()),
                fe.addr.ip(),
            )
        });
    let mut alloc = ClusterIpAllocator::new(cfg.service_cidr, previous);
    let mut syncer = Syncer::new(reconciler, cfg.translate.clone());
    let mut watcher = DirWatcher::new(&cfg.manifests);

    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        // Liveness is progress: an iteration stuck anywhere below (a read
        // that never returns) fails /healthz once it exceeds the bound.
        health.iteration_started();
        if !watcher.changed().await {
            health.iteration_finished();
            continue;
        }
        let started = Instant::now();
        // Synchronous on purpose: nothing else runs on this loop, and a
        // directory of a thousand services parses in milliseconds.
        let loaded = manifest::load_dir(&cfg.manifests, &mut alloc, cfg.max_manifest_size);
        let stats = syncer.sync(
            &loaded.services,
            &loaded.slices,
            loaded.diagnostics,
            Prune::Yes,
        );
        info!(
            frontends = stats.frontends,
            writes = stats.writes,
            deletes = stats.deletes,
            errors = stats.errors,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "synced manifests"
        );
        health.set_failing(syncer.failed().iter().map(ToString::to_string).collect());
        // The directory is the whole truth: the first sync is complete.
        health.set_ready();
        health.iteration_finished();
    }
    info!("stopping; the datapath stays attached through its pinned link");
    Ok(())
}

/// Serves the probes in the background (if asked); not ready yet.
fn start_health(addr: Option<SocketAddr>, stall_timeout: Duration) -> Arc<Health> {
    let health = Health::new(stall_timeout);
    if let Some(addr) = addr {
        tokio::spawn(health::serve(addr, health.clone()));
    }
    health
}

/// Loads and attaches the programs, then re-adopts the pinned maps as they
/// are: nothing is flushed, whatever the sources will say later.
/// The returned lock is the agent's claim on `bpffs`: hold it while running.
fn attach(
    bpffs: &Path,
    cgroup: Option<&Path>,
    sizes: MapSizes,
    bpf_log: bool,
    allow_foreign_pins: bool,
) -> Result<(Reconciler<BpfDatapath>, DirLock), AgentError> {
    let cgroup = match cgroup {
        Some(c) => c.to_owned(),
        None => bpf::cgroup2_root().map_err(AgentError::Cgroup)?,
    };
    let install = bpf::install(bpffs, &cgroup, sizes, bpf_log, allow_foreign_pins)?;
    info!(
        bpffs = %bpffs.display(),
        cgroup = %cgroup.display(),
        link = %install.link_pin.display(),
        "connect4 attached"
    );
    let reconciler = Reconciler::adopt(BpfDatapath::open(bpffs)?)?;
    let adopted = reconciler.installed().len();
    if adopted > 0 {
        info!(frontends = adopted, "re-adopted pinned state");
    }
    Ok((reconciler, install.lock))
}

/// `lb-agent run` against the API server: attaches, re-adopts the pinned
/// maps, then keeps them equal to the Services and EndpointSlices the two
/// watches see until `shutdown`. While the API server is unreachable the maps
/// stay as they are; nothing is removed or shrunk before both watches have
/// listed once.
pub async fn run_kube(
    cfg: KubeAgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let health = start_health(cfg.health_addr, cfg.stall_timeout);
    let client = kube_source::client(&cfg.client).await?;
    let (reconciler, _lock) = attach(
        &cfg.bpffs,
        cfg.cgroup.as_deref(),
        cfg.sizes,
        cfg.bpf_log,
        cfg.allow_foreign_pins,
    )?;
    let mut opts = cfg.translate.clone();
    let (mut driver, feeds) =
        Driver::new(Syncer::new(reconciler, opts.clone()), Coalesce::default());
    if opts.zone.is_none()
        && let Some(node) = opts.node_name.clone()
    {
        opts.zone = kube_source::resolve_zone(client.clone(), node, feeds.signals.clone()).await;
        driver.set_options(opts.clone());
    }
    let selector = kube_source::label_selector(opts.service_proxy_name.as_deref());
    info!(
        selector,
        node = opts.node_name.as_deref().unwrap_or(""),
        zone = opts.zone.as_deref().unwrap_or(""),
        "watching services and endpointslices"
    );
    let services = tokio::spawn(kube_source::pump(
        kube_source::watch(kube::Api::all(client.clone()), &selector),
        feeds.services,
        feeds.signals.clone(),
        Kind::Services,
    ));
    let slices = tokio::spawn(kube_source::pump(
        kube_source::watch(kube::Api::all(client), &selector),
        feeds.slices,
        feeds.signals.clone(),
        Kind::EndpointSlices,
    ));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            step = driver.step() => {
                health.set_failing(
                    driver.syncer().failed().iter().map(ToString::to_string).collect(),
                );
                if step.first_complete {
                    health.set_ready();
                }
            }
        }
    }
    services.abort();
    slices.abort();
    driver.log_latency();
    info!("stopping; the datapath stays attached through its pinned link");
    Ok(())
}

/// Detects edits of the manifest directory and waits for them to settle, so
/// a file caught half-written is not applied (and its services not dropped).
struct DirWatcher {
    dir: PathBuf,
    last: Option<dir_watch::Fingerprint>,
    unreadable: bool,
}

/// How long a changed directory must stay unchanged before it is read.
const SETTLE: Duration = Duration::from_millis(100);

impl DirWatcher {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            last: None,
            unreadable: false,
        }
    }

    async fn changed(&mut self) -> bool {
        let Some(now) = dir_watch::fingerprint(&self.dir) else {
            // Keep the last good state: an unreadable directory (a remount, a
            // typo'd path) must not withdraw every service.
            if !self.unreadable {
                error!(dir = %self.dir.display(), "cannot read the manifest directory; keeping the current services");
                self.unreadable = true;
            }
            return false;
        };
        if self.unreadable {
            info!(dir = %self.dir.display(), "manifest directory readable again");
            self.unreadable = false;
        }
        if self.last.as_ref() == Some(&now) {
            return false;
        }
        tokio::time::sleep(SETTLE).await;
        if dir_watch::fingerprint(&self.dir).as_ref() != Some(&now) {
            debug!("manifest directory still changing");
            return false;
        }
        self.last = Some(now);
        true
    }
}
