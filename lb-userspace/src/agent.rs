//! The composition root: wires a source into the model's index, the sync
//! loop, the reconciler and the datapath, and runs them until shutdown.
//!
//! `sources` → `model::Index` → `sync::Driver` → `reconciler` → `datapath`;
//! after a sync that changed the maps, `datapath::terminate` destroys the
//! sockets whose backend is gone.
use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::{
    datapath::{
        DatapathError,
        bpf::{self, BpfDatapath, DirLock, LoadError, MapSizes, ProgramOptions},
        sockdiag::SockDiag,
        sys,
        terminate::{self, Spared, Terminator},
    },
    health::{self, Health},
    model::{FrontendKind, Index, TranslateOptions},
    reconciler::Reconciler,
    sources::{
        dir_watch::DirWatcher,
        kube::{self as kube_source, ClientConfig, ClientError, Signals},
        manifest::{self, Allocator, DirCache, NodePortRange, ServiceCidr},
        node,
    },
    sync::{self, Coalesce, Driver, Input, Syncer},
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

/// What `lb-agent run` needs whatever the source: where the datapath lives,
/// its sizes, the probes and the sync loop's timers.
#[derive(Clone, Debug)]
pub struct CommonConfig {
    pub bpffs: PathBuf,
    /// `None`: the host's cgroup v2 root from `/proc/mounts`.
    pub cgroup: Option<PathBuf>,
    pub sizes: MapSizes,
    /// `--bpf-log`, `--host-netns-only`.
    pub programs: ProgramOptions,
    /// Share `bpffs` with pins lb-agent did not create.
    pub allow_foreign_pins: bool,
    /// `zone: None` means: read it from this node's `topology.kubernetes.io/zone` label
    /// (API source only).
    pub translate: TranslateOptions,
    /// `/healthz` and `/readyz`; `None`: not served.
    pub health_addr: Option<SocketAddr>,
    /// `/healthz` fails while one sync-loop iteration has run longer than this.
    pub stall_timeout: Duration,
    /// `--resync-period`: how often the maps are compared with the whole
    /// desired state and repaired; `None`: never.
    pub resync_period: Option<Duration>,
    /// `--terminate-sockets`.
    pub terminate: terminate::Mode,
}

/// Everything `lb-agent run --manifests` needs.
#[derive(Clone, Debug)]
pub struct ManifestAgentConfig {
    pub common: CommonConfig,
    pub manifests: PathBuf,
    /// Manifest files larger than this are skipped with a diagnostic.
    pub max_manifest_size: u64,
    pub service_cidr: ServiceCidr,
    /// `--node-port-range`: where missing nodePorts are allocated from.
    pub node_port_range: NodePortRange,
}

/// Everything `lb-agent run` against the Kubernetes API needs.
#[derive(Clone, Debug)]
pub struct KubeAgentConfig {
    pub common: CommonConfig,
    pub client: ClientConfig,
}

/// Loads and attaches the programs (re-adopting pinned maps and state) and
/// keeps the maps equal to the manifest directory until `shutdown`. Leaving
/// does not detach: the pinned link keeps connects balanced while no agent runs.
pub async fn run_manifests(
    cfg: ManifestAgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let health = start_health(cfg.common.health_addr, cfg.common.stall_timeout);
    let mut files = DirCache::new(&cfg.manifests, cfg.max_manifest_size);
    // Parsing the directory needs nothing from the datapath: it runs on a
    // second CPU while the programs are loaded and verified.
    let Attached(reconciler, _lock, spared) = std::thread::scope(|s| {
        let parsing = s.spawn(|| files.prefetch());
        let attached = attach(&cfg.common, &health);
        if parsing.join().is_err() {
            warn!("reading the manifests ahead failed; the first read does it again");
        }
        attached
    })?;
    // Addresses a previous agent allocated stay with their services, per
    // family (the allocator keeps those inside its ranges), and nodePorts
    // with their service ports (read from the node-address frontends).
    let named = || {
        reconciler
            .installed()
            .iter()
            .filter(|(_, i)| !i.service.name.is_empty())
    };
    let previous = named().map(|(fe, i)| {
        (
            (i.service.namespace.to_string(), i.service.name.to_string()),
            fe.addr.ip(),
        )
    });
    let previous_node_ports = named()
        .filter(|(_, i)| i.service.frontend == FrontendKind::NodePort)
        .map(|(fe, i)| {
            let s = &i.service;
            (
                (
                    s.namespace.to_string(),
                    s.name.to_string(),
                    s.port_name.to_string(),
                ),
                fe.addr.port(),
            )
        });
    let mut alloc = Allocator::new(cfg.service_cidr, previous)
        .with_node_ports(cfg.node_port_range, previous_node_ports);
    let mut opts = cfg.common.translate.clone();
    if opts.node_ips.is_empty() {
        opts.node_ips = interface_addresses();
    }
    let mut driver = driver(reconciler, opts, cfg.common.resync_period, spared);
    driver.set_metrics(health.metrics().clone());
    let input = driver.input().clone();
    let mut watcher = DirWatcher::new(&cfg.manifests);

    tokio::pin!(shutdown);
    // One task reads the directory and syncs, so a read that never returns
    // shows as a stalled iteration.
    // The first look is at once; later ones wait for inotify or the poll.
    let mut at_once = true;
    let mut complete = false;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = async {
                if !at_once {
                    watcher.wait().await;
                }
            } => {
                at_once = false;
                health.iteration_started();
                if watcher.changed().await {
                    read(&mut files, &mut alloc, &input);
                    if !complete {
                        // The directory is the whole truth from the first read on.
                        input.set_complete();
                        complete = true;
                    }
                }
                health.iteration_finished();
            }
            wake = driver.wait() => {
                let step = driver.iterate(wake, &health);
                info!(
                    frontends = step.stats.frontends,
                    writes = step.stats.writes,
                    deletes = step.stats.deletes,
                    errors = step.stats.errors,
                    elapsed_ms = step.since_change.unwrap_or_default().as_millis() as u64,
                    "synced manifests"
                );
            }
        }
    }
    info!("stopping; the datapath stays attached through its pinned link");
    Ok(())
}

/// Reads what changed in the directory into the index.
fn read(files: &mut DirCache, alloc: &mut Allocator, input: &Input) {
    let started = Instant::now();
    let delta = files.load(alloc);
    info!(
        files_parsed = files.parses(),
        full_builds = files.builds(),
        services_changed = delta.services.len(),
        slices_changed = delta.slices.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "read manifests"
    );
    manifest::feed(input, delta, started);
}

/// The sync loop over a fresh index, seeded with who held which frontend
/// before a restart.
fn driver(
    reconciler: Reconciler<BpfDatapath>,
    opts: TranslateOptions,
    resync_period: Option<Duration>,
    spared: Option<Arc<Spared>>,
) -> Driver<BpfDatapath> {
    let mut index = Index::new(opts);
    index.seed(sync::owners_oldest_first(&reconciler));
    let mut driver = Driver::new(
        Syncer::new(reconciler).with_spared(spared),
        Input::new(index),
        Coalesce::default(),
    );
    driver.set_resync_period(resync_period);
    driver
}

/// What `attach` hands the sync loop: the reconciler over the adopted maps,
/// the claim on the pin directory, and (`--terminate-sockets all`) the
/// spared endpoints' list.
struct Attached(Reconciler<BpfDatapath>, DirLock, Option<Arc<Spared>>);

/// Serves the probes in the background (if asked); not ready yet.
fn start_health(addr: Option<SocketAddr>, stall_timeout: Duration) -> Arc<Health> {
    let health = Health::new(stall_timeout);
    if let Some(addr) = addr {
        tokio::spawn(health::serve(addr, health.clone()));
    }
    health
}

/// Loads and attaches the programs, then re-adopts the pinned maps as they
/// are: nothing is flushed, whatever the sources will say later. If maps
/// were replaced (an upgrade), the new links are swapped in only after the
/// first complete sync has filled them.
/// The returned lock is the agent's claim on `bpffs`: hold it while
/// running. With `--terminate-sockets all`, also the spared endpoints' list
/// the sync loop keeps for the terminator.
fn attach(cfg: &CommonConfig, health: &Arc<Health>) -> Result<Attached, AgentError> {
    let bpffs = &cfg.bpffs;
    let cgroup = match &cfg.cgroup {
        Some(c) => c.to_owned(),
        None => bpf::cgroup2_root().map_err(AgentError::Cgroup)?,
    };
    let spared = (cfg.terminate == terminate::Mode::All).then(Spared::new);
    start_terminator(cfg.terminate, bpffs, &cgroup, health, spared.clone());
    health.metrics().set_bpffs(bpffs);
    let install = bpf::install(
        bpffs,
        &cgroup,
        cfg.sizes,
        cfg.programs,
        cfg.allow_foreign_pins,
    )?;
    info!(
        bpffs = %bpffs.display(),
        cgroup = %cgroup.display(),
        link = %install.link_pin.display(),
        "connect4 attached"
    );
    if !install.deferred.is_empty() {
        tokio::spawn(swap_links_when_synced(install.deferred, health.clone()));
    }
    let mut datapath = BpfDatapath::open(bpffs)?;
    datapath.note_started(std::time::SystemTime::now())?;
    health.record_in(bpffs);
    // Before the first sync: a filter the install just created is empty.
    datapath.rebuild_filter()?;
    let reconciler = Reconciler::adopt(datapath)?;
    let adopted = reconciler.installed().len();
    if adopted > 0 {
        info!(frontends = adopted, "re-adopted pinned state");
    }
    Ok(Attached(reconciler, install.lock, spared))
}

/// Destroys the sockets whose backend left their frontend after every sync
/// that changed the maps, off the sync loop (a pass reads every socket
/// record and enters namespaces) on a thread of its own at the lowest
/// priority: a pass reads the whole record array, some ms of CPU, and it
/// must not take a CPU from the sync loop or the node's workloads. Passes
/// asked for during one are one more pass. Off, with one warning, on a
/// kernel without `SOCK_DESTROY`.
fn start_terminator(
    mode: terminate::Mode,
    bpffs: &Path,
    cgroup: &Path,
    health: &Arc<Health>,
    spared: Option<Arc<Spared>>,
) {
    if mode == terminate::Mode::None {
        return;
    }
    let destroyer = match SockDiag::probe(cgroup) {
        Ok(d) => d,
        Err(e) => {
            warn!(
                error = %e,
                "socket termination off: this kernel cannot destroy sockets (SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY)"
            );
            return;
        }
    };
    let (wake, passes) = std::sync::mpsc::sync_channel::<()>(1);
    let bpffs = bpffs.to_owned();
    let thread = std::thread::Builder::new()
        .name("lb-terminate".into())
        .spawn(move || {
            if let Err(e) = sys::lower_thread_priority() {
                warn!(error = %e, "socket termination: lowering its thread's priority");
            }
            let mut terminator = None;
            while passes.recv().is_ok() {
                // Opened on first use: the maps exist once the programs are loaded.
                let t = match &mut terminator {
                    Some(t) => t,
                    None => match Terminator::open(&bpffs, destroyer.clone(), spared.clone()) {
                        Ok(t) => terminator.insert(t),
                        Err(e) => {
                            warn!(error = %e, "socket termination: opening the maps");
                            continue;
                        }
                    },
                };
                match t.pass() {
                    Ok(0) => {}
                    Ok(n) => info!(sockets = n, "destroyed sockets whose backend is gone"),
                    Err(e) => warn!(error = %e, "socket termination pass"),
                }
            }
        });
    if let Err(e) = thread {
        warn!(error = %e, "socket termination off: starting its thread");
        return;
    }
    let health = health.clone();
    tokio::spawn(async move {
        loop {
            health.maps_changed().await;
            // Full: a pass is asked for already, and it reads what this one would.
            if let Err(std::sync::mpsc::TrySendError::Disconnected(())) = wake.try_send(()) {
                return;
            }
        }
    });
}

/// Swaps the new links in (detaching the previous programs) once the first
/// complete sync has filled the new maps.
async fn swap_links_when_synced(staged: Vec<(PathBuf, PathBuf)>, health: Arc<Health>) {
    while !health.synced() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match bpf::swap_links(&staged) {
        Ok(()) => info!("first complete sync: the previous programs are detached"),
        Err(e) => tracing::error!(error = %e, "swapping the new links in"),
    }
}

/// Without `--node-ip`, the manifest source's node addresses: those of the
/// interfaces of the network namespace the agent runs in (the host's, for
/// the DaemonSet), read once.
fn interface_addresses() -> Vec<std::net::IpAddr> {
    match node::from_interfaces() {
        Ok(found) => {
            let shown: Vec<String> = found.iter().map(|(i, ip)| format!("{ip} ({i})")).collect();
            info!(
                addresses = %shown.join(", "),
                "no --node-ip: serving NodePorts on the interfaces' addresses (loopback and link-local left out)"
            );
            found.into_iter().map(|(_, ip)| ip).collect()
        }
        Err(e) => {
            warn!(error = %e, "no --node-ip, and the interfaces' addresses cannot be read: NodePorts are not served");
            Vec::new()
        }
    }
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
    let health = start_health(cfg.common.health_addr, cfg.common.stall_timeout);
    let client = kube_source::client(&cfg.client).await?;
    let Attached(reconciler, _lock, spared) = attach(&cfg.common, &health)?;
    let mut opts = cfg.common.translate.clone();
    let mut driver = driver(reconciler, opts.clone(), cfg.common.resync_period, spared);
    driver.set_metrics(health.metrics().clone());
    let signals = Signals::new(driver.input().clone()).with_metrics(health.metrics().clone());
    if opts.zone.is_none()
        && let Some(node) = opts.node_name.clone()
    {
        opts.zone = kube_source::resolve_zone(client.clone(), node, signals.clone()).await;
        // Before any object: nothing to translate again, nothing to sync.
        let zone = opts.zone.clone();
        driver.input().update(Instant::now(), false, |index| {
            let mut o = index.options().clone();
            o.zone = zone;
            index.set_options(o);
            false
        });
    }
    // Without --node-ip, the Node object's addresses, kept current.
    let node_addresses = match &opts.node_name {
        Some(node) if opts.node_ips.is_empty() => Some(tokio::spawn(
            kube_source::watch_node_addresses(client.clone(), node.clone(), signals.clone()),
        )),
        _ => None,
    };
    let selector = kube_source::label_selector(opts.service_proxy_name.as_deref());
    info!(
        selector,
        node = opts.node_name.as_deref().unwrap_or(""),
        zone = opts.zone.as_deref().unwrap_or(""),
        "watching services and endpointslices"
    );
    let services = tokio::spawn(kube_source::pump(
        kube_source::watch::<kube_source::SlimService>(kube::Api::all(client.clone()), &selector),
        signals.clone(),
    ));
    let slices = tokio::spawn(kube_source::pump(
        kube_source::watch::<kube_source::SlimSlice>(kube::Api::all(client), &selector),
        signals,
    ));
    driver.run(&health, shutdown).await;
    services.abort();
    slices.abort();
    if let Some(task) = node_addresses {
        task.abort();
    }
    info!("stopping; the datapath stays attached through its pinned link");
    Ok(())
}
