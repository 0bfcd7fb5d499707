//! The Kubernetes API source: two reflectors (Services and
//! `discovery.k8s.io/v1` EndpointSlices) with kube-proxy's label selector,
//! feeding the same [`Syncer`] as the manifest source.
//!
//! Watch tasks ([`pump`]) apply each event to their reflector store and raise
//! a dirty flag; one [`Driver`] wakes on it, syncs at once if it was idle or
//! else waits a short debounce so a burst becomes one sync, snapshots both
//! stores and syncs. Nothing is pruned or
//! shrunk ([`Prune::No`]) until both watches have completed their initial
//! list; afterwards each sync sees complete stores, so after a relist (410) the
//! store swap makes vanished objects disappear and exactly those are removed.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    path::PathBuf,
    pin::pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store, store::Writer},
        watcher,
    },
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::{
    agent::{SyncStats, Syncer},
    datapath::Datapath,
    model::{
        DesiredService, DesiredState, Diagnostic, Frontend, TranslateOptions,
        labels::{HEADLESS, SERVICE_NAME, SERVICE_PROXY_NAME},
        port_field, translate_service,
    },
    reconciler::Prune,
};

#[cfg(test)]
mod tests;

/// The node label holding this node's zone, for topology hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Written by `kubectl apply`; a full copy of the object, never read here.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// kube-proxy's server-side selector, applied to both watches
/// (`cmd/kube-proxy/app/server.go`).
pub fn label_selector(service_proxy_name: Option<&str>) -> String {
    match service_proxy_name {
        Some(name) => format!("{SERVICE_PROXY_NAME}={name},!{HEADLESS}"),
        None => format!("!{SERVICE_PROXY_NAME},!{HEADLESS}"),
    }
}

/// Where the API server is and how to authenticate.
#[derive(Clone, Debug, Default)]
pub struct ClientConfig {
    /// `--kubeconfig`; `None`: `kube::Config::infer()` (`KUBECONFIG`,
    /// `~/.kube/config`, then the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// `--api-server`: replaces the server URL of whatever configuration was
    /// found, so the agent does not depend on the `default/kubernetes`
    /// ClusterIP it programs itself.
    pub api_server: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("no Kubernetes configuration found (pass --kubeconfig or --api-server): {0}")]
    Infer(String),
    #[error("--api-server {url:?}: {message}")]
    ApiServer { url: String, message: String },
    #[error("creating the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Builds the client; contacts nothing yet.
pub async fn client(cfg: &ClientConfig) -> Result<Client, ClientError> {
    let api_server = cfg
        .api_server
        .as_deref()
        .map(|url| {
            url.parse::<http::Uri>()
                .map_err(|e| ClientError::ApiServer {
                    url: url.to_owned(),
                    message: e.to_string(),
                })
        })
        .transpose()?;
    let mut config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| ClientError::Kubeconfig {
                path: path.clone(),
                message: e.to_string(),
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| ClientError::Kubeconfig {
                    path: path.clone(),
                    message: e.to_string(),
                })?
        }
        None => match (kube::Config::infer().await, &api_server) {
            (Ok(c), _) => c,
            // No credentials at all, but a server: anonymous access (tests,
            // an insecure local API server).
            (Err(e), Some(url)) => {
                warn!(error = %e, "no kubeconfig or service account; connecting without credentials");
                kube::Config::new(url.clone())
            }
            (Err(e), None) => return Err(ClientError::Infer(e.to_string())),
        },
    };
    if let Some(url) = api_server {
        config.cluster_url = url;
    }
    info!(server = %config.cluster_url, "Kubernetes API");
    Ok(Client::try_from(config)?)
}

/// The `topology.kubernetes.io/zone` label of `node` (needs `get nodes`).
pub async fn node_zone(client: Client, node: &str) -> Result<Option<String>, kube::Error> {
    let api: Api<Node> = Api::all(client);
    let n = api.get(node).await?;
    Ok(n.labels().get(ZONE_LABEL).cloned())
}

/// A watch with kube-proxy's selector, backoff on errors, and the fields we
/// never read dropped before they reach the store.
pub fn watch<K>(
    api: Api<K>,
    selector: &str,
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static
where
    K: Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + Sync + 'static,
{
    // Like kube-proxy's informers, the initial list (and a relist) is served
    // from the API server's watch cache rather than a quorum read of etcd:
    // every node lists at once when a DaemonSet rolls.
    let cfg = watcher::Config::default().labels(selector).any_semantic();
    watcher(api, cfg).default_backoff().modify(|o| {
        o.managed_fields_mut().clear();
        o.annotations_mut().remove(LAST_APPLIED);
    })
}

/// Which watch an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Services,
    EndpointSlices,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
        })
    }
}

/// At most this many pending event timestamps are kept between two syncs
/// (only for the latency figures; the dirty flag itself is never lost).
const MAX_PENDING_SAMPLES: usize = 100_000;

/// What the watch tasks tell the sync task.
#[derive(Debug, Default)]
pub struct Signals {
    notify: Notify,
    pending: Mutex<Pending>,
    services_synced: AtomicBool,
    slices_synced: AtomicBool,
    /// Every event that changed a store; lets the debounce see a burst go on.
    events: AtomicU64,
}

#[derive(Debug, Default)]
struct Pending {
    dirty: bool,
    /// Arrival of each EndpointSlice Apply/Delete since the last sync.
    slice_events: Vec<Instant>,
    /// A zone found after start (`Some(zone)`), to apply on the next sync.
    zone: Option<Option<String>>,
    /// Objects applied or deleted since the last sync: only their services
    /// are translated again.
    changed: Vec<(Kind, Key)>,
    /// A (re)list completed, or too many changes: translate everything.
    full: bool,
}

/// (namespace, name).
type Key = (String, String);

/// Beyond this many pending changes a full translation is cheaper.
const MAX_CHANGES: usize = 100_000;

impl Signals {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn synced_flag(&self, kind: Kind) -> &AtomicBool {
        match kind {
            Kind::Services => &self.services_synced,
            Kind::EndpointSlices => &self.slices_synced,
        }
    }

    pub fn synced(&self, kind: Kind) -> bool {
        self.synced_flag(kind).load(Ordering::SeqCst)
    }

    /// Both watches have completed their initial list.
    pub fn all_synced(&self) -> bool {
        self.synced(Kind::Services) && self.synced(Kind::EndpointSlices)
    }

    /// Called after the event has been applied to its store.
    pub fn record<K: Resource>(&self, kind: Kind, event: &watcher::Result<watcher::Event<K>>) {
        use watcher::Event;
        let changed = match event {
            Ok(Event::Apply(o) | Event::Delete(o)) => {
                Some((kind, (o.namespace().unwrap_or_default(), o.name_any())))
            }
            _ => None,
        };
        let counts_for_latency = match event {
            // The store buffers a (re)list until InitDone: nothing visible changed.
            Ok(Event::Init | Event::InitApply(_)) => return,
            Ok(Event::InitDone) => {
                if self.synced_flag(kind).swap(true, Ordering::SeqCst) {
                    info!(%kind, "relisted");
                } else {
                    info!(%kind, "initial list complete");
                }
                false
            }
            Ok(Event::Apply(_) | Event::Delete(_)) => kind == Kind::EndpointSlices,
            Err(e) => {
                // The backoff delays the retry; the store keeps its last state.
                warn!(%kind, error = %e, "watch failed; retrying");
                return;
            }
        };
        {
            let mut p = self.lock();
            p.dirty = true;
            if counts_for_latency && p.slice_events.len() < MAX_PENDING_SAMPLES {
                p.slice_events.push(Instant::now());
            }
            match changed {
                Some(c) if !p.full && p.changed.len() < MAX_CHANGES => p.changed.push(c),
                _ => {
                    p.full = true;
                    p.changed.clear();
                }
            }
        }
        self.events.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// A zone learned after start; applied with the next sync.
    pub fn set_zone(&self, zone: Option<String>) {
        {
            let mut p = self.lock();
            p.zone = Some(zone);
            p.dirty = true;
            p.full = true;
        }
        self.notify.notify_one();
    }

    fn is_dirty(&self) -> bool {
        self.lock().dirty
    }
}

/// Drives one watch: applies each event to the store, then signals the driver.
/// Returns when the stream ends (never, for a real watcher).
pub async fn pump<K, S>(events: S, writer: Writer<K>, signals: Arc<Signals>, kind: Kind)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
    S: Stream<Item = watcher::Result<watcher::Event<K>>>,
{
    let mut stream = pin!(events.reflect(writer));
    while let Some(event) = stream.next().await {
        signals.record(kind, &event);
    }
    debug!(%kind, "watch stream ended");
}

/// How events are coalesced into syncs. An event that finds the driver
/// idle (no sync for `max_delay`) is synced at once: a lone endpoint change
/// pays no debounce. Events that arrive while syncs are frequent are
/// batched: a sync starts once no event arrived for `quiet`, or `max_delay`
/// after the first event of the burst, whichever is first.
#[derive(Clone, Copy, Debug)]
pub struct Coalesce {
    pub quiet: Duration,
    pub max_delay: Duration,
}

impl Default for Coalesce {
    fn default() -> Self {
        Self {
            quiet: Duration::from_millis(2),
            max_delay: Duration::from_millis(10),
        }
    }
}

/// What one [`Driver::step`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub prune: Prune,
    pub stats: SyncStats,
    /// This was the first sync with complete sources: the agent is ready.
    pub first_complete: bool,
}

/// Event→map-write latency of EndpointSlice events, since start.
#[derive(Debug, Default)]
pub struct Latency {
    samples_us: Vec<u32>,
    last_logged: Option<Instant>,
    logged_len: usize,
}

/// Keeps at most this many samples (a few MB at most); later ones are dropped.
const MAX_SAMPLES: usize = 1_000_000;

impl Latency {
    fn add(&mut self, arrivals: &[Instant], written: Instant) {
        for t in arrivals {
            if self.samples_us.len() >= MAX_SAMPLES {
                break;
            }
            let us = written.saturating_duration_since(*t).as_micros();
            self.samples_us.push(u32::try_from(us).unwrap_or(u32::MAX));
        }
    }

    /// (count, median, p99, max) in microseconds.
    pub fn summary(&self) -> Option<(usize, u32, u32, u32)> {
        if self.samples_us.is_empty() {
            return None;
        }
        let mut s = self.samples_us.clone();
        s.sort_unstable();
        let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
        Some((s.len(), at(0.5), at(0.99), s[s.len() - 1]))
    }

    /// Logs the figures at most once a second, and only when new ones came in.
    fn maybe_log(&mut self, syncs: u64, force: bool) {
        let due = self
            .last_logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if self.samples_us.len() == self.logged_len || !(due || force) {
            return;
        }
        if let Some((n, p50, p99, max)) = self.summary() {
            info!(
                events = n,
                syncs,
                p50_us = p50,
                p99_us = p99,
                max_us = max,
                "endpointslice event to map write latency"
            );
        }
        self.logged_len = self.samples_us.len();
        self.last_logged = Some(Instant::now());
    }
}

/// The writers a [`Driver`]'s stores are fed through.
pub struct Feeds {
    pub services: Writer<Service>,
    pub slices: Writer<EndpointSlice>,
    pub signals: Arc<Signals>,
}

/// The sync side: waits for changes, coalesces them, syncs both stores.
pub struct Driver<D> {
    syncer: Syncer<D>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    signals: Arc<Signals>,
    coalesce: Coalesce,
    latency: Latency,
    syncs: u64,
    /// When the last sync finished: decides between syncing at once and debouncing.
    last_sync: Option<Instant>,
    complete: bool,
    index: Index,
}

impl<D: Datapath> Driver<D> {
    pub fn new(syncer: Syncer<D>, coalesce: Coalesce) -> (Self, Feeds) {
        let (services, services_writer) = reflector::store();
        let (slices, slices_writer) = reflector::store();
        let signals = Arc::new(Signals::default());
        let driver = Self {
            syncer,
            services,
            slices,
            signals: signals.clone(),
            coalesce,
            latency: Latency::default(),
            syncs: 0,
            last_sync: None,
            complete: false,
            index: Index::default(),
        };
        let feeds = Feeds {
            services: services_writer,
            slices: slices_writer,
            signals,
        };
        (driver, feeds)
    }

    pub fn syncer(&self) -> &Syncer<D> {
        &self.syncer
    }

    /// Node inputs for the next sync (the zone found at start).
    pub fn set_options(&mut self, opts: TranslateOptions) {
        self.syncer.set_options(opts);
        self.signals.lock().full = true;
    }

    pub fn signals(&self) -> &Arc<Signals> {
        &self.signals
    }

    /// Syncs run so far.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    pub fn latency(&self) -> &Latency {
        &self.latency
    }

    /// Waits for a change, lets a burst settle, and runs one sync. Cancel-safe:
    /// it only awaits before the sync, which itself is synchronous.
    pub async fn step(&mut self) -> Step {
        while !self.signals.is_dirty() {
            self.signals.notify.notified().await;
        }
        let idle = self
            .last_sync
            .is_none_or(|t| t.elapsed() >= self.coalesce.max_delay);
        if idle {
            return self.sync_now();
        }
        let burst = Instant::now();
        let mut seen = self.signals.events.load(Ordering::SeqCst);
        loop {
            tokio::time::sleep(self.coalesce.quiet).await;
            let now = self.signals.events.load(Ordering::SeqCst);
            if now == seen || burst.elapsed() >= self.coalesce.max_delay {
                break;
            }
            seen = now;
        }
        self.sync_now()
    }

    /// One sync of whatever the stores hold now.
    pub fn sync_now(&mut self) -> Step {
        let (arrivals, zone, changed, full) = {
            let mut p = self.signals.lock();
            p.dirty = false;
            (
                std::mem::take(&mut p.slice_events),
                p.zone.take(),
                std::mem::take(&mut p.changed),
                std::mem::take(&mut p.full),
            )
        };
        let full = full || zone.is_some();
        if let Some(zone) = zone {
            let mut opts = self.syncer.options().clone();
            info!(zone = zone.as_deref().unwrap_or(""), "node zone");
            opts.zone = zone;
            self.syncer.set_options(opts);
        }
        // Read the flags before the stores: a store that is synced now was
        // complete when read below.
        let prune = if self.signals.all_synced() {
            Prune::Yes
        } else {
            Prune::No
        };
        // The first sync with complete stores may prune: a full pass, so
        // whatever earlier partial syncs held back is brought in line.
        let full = full || (prune == Prune::Yes && !self.complete);
        let started = Instant::now();
        let changes = changed.len();
        let (update, diags) = self.index.update(
            &self.services,
            &self.slices,
            changed,
            full,
            self.syncer.options(),
        );
        let stats = match update {
            Update::Full(desired) => self.syncer.apply_desired(desired, diags, prune),
            Update::Changes(mut changes) => {
                // What the last sync failed to write (a full map that since
                // got room, say) is tried again with whatever changed now.
                for fe in self.syncer.failed().clone() {
                    changes
                        .entry(fe)
                        .or_insert_with(|| self.index.served(&fe).cloned());
                }
                self.syncer.apply_changes(changes, diags, prune)
            }
        };
        let written = Instant::now();
        self.syncs += 1;
        self.last_sync = Some(written);
        self.latency.add(&arrivals, written);
        let first_complete = prune == Prune::Yes && !self.complete;
        self.complete |= prune == Prune::Yes;
        debug!(
            full,
            changes,
            events = arrivals.len(),
            frontends = stats.frontends,
            writes = stats.writes,
            deletes = stats.deletes,
            errors = stats.errors,
            prune = ?prune,
            elapsed_us = (written - started).as_micros() as u64,
            "synced"
        );
        if first_complete {
            info!(
                services = self.services.len(),
                slices = self.slices.len(),
                frontends = stats.frontends,
                writes = stats.writes,
                deletes = stats.deletes,
                errors = stats.errors,
                elapsed_ms = (written - started).as_millis() as u64,
                "initial sync complete"
            );
        }
        self.latency.maybe_log(self.syncs, false);
        Step {
            prune,
            stats,
            first_complete,
        }
    }

    /// Logs the latency figures now if any are new (used at shutdown).
    pub fn log_latency(&mut self) {
        self.latency.maybe_log(self.syncs, true);
    }
}

/// The translation, kept per service: a change re-translates only the
/// services it touches, with the model's [`translate_service`], and the
/// desired state is assembled exactly as [`crate::model::translate`] does
/// (services in (namespace, name) order, the first claim of a frontend wins).
#[derive(Debug, Default)]
struct Index {
    per_service: BTreeMap<Key, Translated>,
    /// EndpointSlice → the (namespace, service) its label names.
    slice_owner: HashMap<Key, Key>,
    /// (namespace, service) → its slices' names.
    by_service: HashMap<Key, BTreeSet<String>>,
    /// Every frontend → the services translating to it; the first in key
    /// order serves it, as in a full translation.
    claims: HashMap<Frontend, BTreeSet<Key>>,
    /// Frontends with more than one claim (each loser is a diagnostic).
    contested: BTreeSet<Frontend>,
    /// Services whose translation reported problems.
    with_diags: BTreeSet<Key>,
    /// Slices without the service-name label (each is a diagnostic).
    unlabeled: BTreeSet<Key>,
}

/// What one [`Index::update`] produced.
enum Update {
    /// Everything (a full pass): the reconciler diffs it against the maps.
    Full(DesiredState),
    /// Only the frontends that changed; `None`: no service serves it now.
    Changes(BTreeMap<Frontend, Option<DesiredService>>),
}

#[derive(Debug)]
struct Translated {
    frontends: Vec<(Frontend, DesiredService)>,
    diags: Vec<Diagnostic>,
}

fn slice_service(s: &EndpointSlice) -> Option<Key> {
    let svc = s
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME)
        .filter(|n| !n.is_empty())?;
    Some((namespace_of(s), svc.clone()))
}

fn namespace_of<K: Resource>(o: &K) -> String {
    o.meta()
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

fn object_ref<K: Resource<DynamicType = ()>>(key: &Key) -> ObjectRef<K> {
    ObjectRef::new(&key.1).within(&key.0)
}

impl Index {
    fn update(
        &mut self,
        services: &Store<Service>,
        slices: &Store<EndpointSlice>,
        changed: Vec<(Kind, Key)>,
        full: bool,
        opts: &TranslateOptions,
    ) -> (Update, BTreeSet<Diagnostic>) {
        let mut dirty: BTreeSet<Key> = BTreeSet::new();
        if full {
            self.slice_owner.clear();
            self.by_service.clear();
            self.unlabeled.clear();
            for s in slices.state() {
                if slice_service(&s).is_none() {
                    self.unlabeled.insert((namespace_of(&*s), s.name_any()));
                }
                if let Some(owner) = slice_service(&s) {
                    let name = s.name_any();
                    self.by_service
                        .entry(owner.clone())
                        .or_default()
                        .insert(name.clone());
                    self.slice_owner.insert((namespace_of(&*s), name), owner);
                }
            }
            dirty.extend(self.per_service.keys().cloned());
            dirty.extend(
                services
                    .state()
                    .iter()
                    .map(|s| (namespace_of(&**s), s.name_any())),
            );
        } else {
            for (kind, key) in changed {
                match kind {
                    Kind::Services => {
                        dirty.insert(key);
                    }
                    Kind::EndpointSlices => {
                        // The store is the truth; the index follows it.
                        let stored = slices.get(&object_ref(&key));
                        let now = stored.as_ref().and_then(|s| slice_service(s));
                        if stored.is_some() && now.is_none() {
                            self.unlabeled.insert(key.clone());
                        } else {
                            self.unlabeled.remove(&key);
                        }
                        let old = self.slice_owner.get(&key).cloned();
                        if old != now {
                            if let Some(o) = &old
                                && let Some(set) = self.by_service.get_mut(o)
                            {
                                set.remove(&key.1);
                                if set.is_empty() {
                                    self.by_service.remove(o);
                                }
                            }
                            match &now {
                                Some(n) => {
                                    self.by_service
                                        .entry(n.clone())
                                        .or_default()
                                        .insert(key.1.clone());
                                    self.slice_owner.insert(key, n.clone());
                                }
                                None => {
                                    self.slice_owner.remove(&key);
                                }
                            }
                        }
                        dirty.extend(old);
                        dirty.extend(now);
                    }
                }
            }
        }
        let mut touched: BTreeSet<Frontend> = BTreeSet::new();
        for key in dirty {
            self.with_diags.remove(&key);
            if let Some(old) = self.per_service.remove(&key) {
                for (fe, _) in &old.frontends {
                    touched.insert(*fe);
                    if let Some(set) = self.claims.get_mut(fe) {
                        set.remove(&key);
                        match set.len() {
                            0 => {
                                self.claims.remove(fe);
                            }
                            1 => {
                                self.contested.remove(fe);
                            }
                            _ => {}
                        }
                    }
                }
            }
            let Some(svc) = services.get(&object_ref(&key)) else {
                continue;
            };
            let own: Vec<Arc<EndpointSlice>> = self
                .by_service
                .get(&key)
                .into_iter()
                .flatten()
                .filter_map(|name| slices.get(&object_ref(&(key.0.clone(), name.clone()))))
                .collect();
            let refs: Vec<&EndpointSlice> = own.iter().map(|s| &**s).collect();
            let mut diags = Vec::new();
            let frontends = translate_service(&svc, &refs, opts, &mut diags);
            for (fe, _) in &frontends {
                touched.insert(*fe);
                let set = self.claims.entry(*fe).or_default();
                set.insert(key.clone());
                if set.len() > 1 {
                    self.contested.insert(*fe);
                }
            }
            if !diags.is_empty() {
                self.with_diags.insert(key.clone());
            }
            self.per_service
                .insert(key, Translated { frontends, diags });
        }
        let update = if full {
            Update::Full(self.desired())
        } else {
            Update::Changes(
                touched
                    .into_iter()
                    .map(|fe| (fe, self.served(&fe).cloned()))
                    .collect(),
            )
        };
        (update, self.diagnostics(services))
    }

    /// What the service first in key order among those claiming `fe` wants.
    fn served(&self, fe: &Frontend) -> Option<&DesiredService> {
        let winner = self.claims.get(fe)?.first()?;
        self.per_service[winner]
            .frontends
            .iter()
            .find(|(f, _)| f == fe)
            .map(|(_, want)| want)
    }

    fn desired(&self) -> DesiredState {
        self.claims
            .keys()
            .filter_map(|fe| Some((*fe, self.served(fe)?.clone())))
            .collect()
    }

    /// Every current problem: per-service ones, unlabeled slices and
    /// frontends claimed twice. Only services with problems are visited.
    fn diagnostics(&self, services: &Store<Service>) -> BTreeSet<Diagnostic> {
        let mut diags: BTreeSet<Diagnostic> = self
            .unlabeled
            .iter()
            .map(|(ns, name)| Diagnostic {
                source: String::new(),
                object: format!("EndpointSlice {ns}/{name}"),
                field: "metadata.labels".to_owned(),
                message: format!("missing label {SERVICE_NAME}; the slice is ignored"),
                severity: Default::default(),
            })
            .collect();
        for key in &self.with_diags {
            diags.extend(self.per_service[key].diags.iter().cloned());
        }
        for fe in &self.contested {
            let mut keys = self.claims[fe].iter();
            let Some(winner) = keys.next() else {
                continue;
            };
            for key in keys {
                let field = services
                    .get(&object_ref(key))
                    .map(|svc| port_field(&crate::model::ServiceInfo::from(&*svc), fe))
                    .unwrap_or_default();
                diags.insert(Diagnostic {
                    source: String::new(),
                    object: format!("Service {}/{}", key.0, key.1),
                    field,
                    message: format!(
                        "frontend {fe} is already served by Service {}/{}; skipped",
                        winner.0, winner.1
                    ),
                    severity: Default::default(),
                });
            }
        }
        diags
    }
}

/// Looks the zone up once now; if the API is unreachable, keeps trying in the
/// background and hands a late answer to the driver. A node without the
/// label, or a refused `get nodes`, means no zone (topology hints unused).
pub async fn resolve_zone(client: Client, node: String, signals: Arc<Signals>) -> Option<String> {
    const FIRST_TRY: Duration = Duration::from_secs(3);
    match tokio::time::timeout(FIRST_TRY, node_zone(client.clone(), &node)).await {
        Ok(Ok(zone)) => {
            info!(node, zone = zone.as_deref().unwrap_or(""), "node zone");
            return zone;
        }
        Ok(Err(kube::Error::Api(e))) => {
            warn!(node, error = %e, "cannot read the node's zone label; topology hints are not used");
            return None;
        }
        Ok(Err(e)) => {
            warn!(node, error = %e, "cannot read the node's zone label yet; continuing without a zone and retrying")
        }
        Err(_) => warn!(
            node,
            "reading the node's zone label timed out; continuing without a zone and retrying"
        ),
    }
    tokio::spawn(async move {
        let mut delay = Duration::from_secs(1);
        loop {
            tokio::time::sleep(delay).await;
            match node_zone(client.clone(), &node).await {
                Ok(zone) => {
                    if zone.is_some() {
                        signals.set_zone(zone);
                    }
                    return;
                }
                Err(kube::Error::Api(e)) => {
                    warn!(node, error = %e, "cannot read the node's zone label; topology hints are not used");
                    return;
                }
                Err(e) => debug!(node, error = %e, "zone lookup"),
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    });
    None
}
