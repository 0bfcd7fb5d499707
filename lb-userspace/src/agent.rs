//! The agent: objects from a source → pure translation → reconciler → maps.
//!
//! Every source (the manifest directory here, the API server later) ends in
//! [`Syncer::sync`], so there is one code path from objects to map writes.
use std::{
    collections::BTreeSet,
    future::Future,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{
        Datapath, DatapathError,
        bpf::{self, BpfDatapath, LoadError, MapSizes},
    },
    model::{Diagnostic, TranslateOptions, translate},
    reconciler::{Prune, Reconciler},
    sources::{
        dir_watch::{self, POLL_INTERVAL},
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
}

/// Everything `lb-agent run --manifests` needs.
#[derive(Clone, Debug)]
pub struct ManifestAgentConfig {
    pub bpffs: PathBuf,
    /// `None`: the host's cgroup v2 root from `/proc/mounts`.
    pub cgroup: Option<PathBuf>,
    pub manifests: PathBuf,
    pub service_cidr: ServiceCidr,
    pub sizes: MapSizes,
    pub bpf_log: bool,
    pub translate: TranslateOptions,
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
}

impl<D: Datapath> Syncer<D> {
    pub fn new(reconciler: Reconciler<D>, opts: TranslateOptions) -> Self {
        Self {
            reconciler,
            opts,
            reported: BTreeSet::new(),
        }
    }

    pub fn reconciler(&self) -> &Reconciler<D> {
        &self.reconciler
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
        self.report(source_diags.into_iter().chain(diags).collect());
        let report = self.reconciler.apply(&desired, prune);
        for e in &report.errors {
            error!("{e}");
        }
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
            frontends: desired.len(),
            writes: report.writes,
            deletes: report.deletes,
            errors: report.errors.len() + report.other_errors.len(),
        }
    }

    fn report(&mut self, now: BTreeSet<Diagnostic>) {
        for d in now.difference(&self.reported) {
            warn!("{d}");
        }
        for d in self.reported.difference(&now) {
            info!("resolved: {d}");
        }
        self.reported = now;
    }
}

/// Loads and attaches the programs (re-adopting pinned maps and state) and
/// keeps the maps equal to the manifest directory until `shutdown`. Leaving
/// does not detach: the pinned link keeps connects balanced while no agent runs.
pub async fn run_manifests(
    cfg: ManifestAgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let cgroup = match &cfg.cgroup {
        Some(c) => c.clone(),
        None => bpf::cgroup2_root().map_err(AgentError::Cgroup)?,
    };
    let install = bpf::install(&cfg.bpffs, &cgroup, cfg.sizes, cfg.bpf_log)?;
    info!(
        bpffs = %cfg.bpffs.display(),
        cgroup = %cgroup.display(),
        link = %install.link_pin.display(),
        "connect4 attached"
    );
    let reconciler = Reconciler::adopt(BpfDatapath::open(&cfg.bpffs)?)?;
    let adopted = reconciler.installed().len();
    if adopted > 0 {
        info!(frontends = adopted, "re-adopted pinned state");
    }
    // Addresses a previous agent allocated stay with their services.
    let previous = reconciler
        .installed()
        .iter()
        .filter(|(_, i)| !i.service.name.is_empty())
        .map(|(fe, i)| {
            (
                (i.service.namespace.clone(), i.service.name.clone()),
                *fe.addr.ip(),
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
        if !watcher.changed().await {
            continue;
        }
        let started = Instant::now();
        // Synchronous on purpose: nothing else runs on this loop, and a
        // directory of a thousand services parses in milliseconds.
        let loaded = manifest::load_dir(&cfg.manifests, &mut alloc);
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
    }
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
