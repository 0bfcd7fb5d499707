//! The Kubernetes API source: two watches (Services and
//! `discovery.k8s.io/v1` EndpointSlices) with kube-proxy's label selector,
//! feeding the model's index through the sync [`Input`].
//!
//! Each watch decodes its objects straight into the index's slim types
//! ([`wire`]: no full object is ever built) and its task ([`pump`]) applies
//! them; an update that changes nothing is dropped there. A (re)list is
//! applied object by object as it arrives, and once it is complete what the
//! index held before and the list no longer has is deleted (kubert's
//! `reset`, from the index's own keys, so nothing is held twice). Nothing
//! is pruned or shrunk until both watches have completed their initial
//! list ([`Input::set_complete`]).
use std::{
    collections::HashSet,
    fmt,
    net::IpAddr,
    path::PathBuf,
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, Resource, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use tracing::{debug, info, warn};

use crate::{
    metrics::{self, Metrics},
    model::{
        Index, IndexNamespaced, Named, ServiceInfo, SliceInfo, TranslateOptions,
        index::Key,
        labels::{HEADLESS, SERVICE_PROXY_NAME},
    },
    sources::node,
    sync::Input,
};

#[cfg(test)]
mod tests;
pub mod wire;

pub use wire::{SlimService, SlimSlice};

/// The node label holding this node's zone, for topology hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

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

/// A watch with kube-proxy's selector and backoff on errors.
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
    watcher(api, cfg).default_backoff()
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

/// A kind the index takes: what the watch decodes, and the slim type it
/// carries.
pub trait Ingest: Resource + Sized {
    type Info: Named;
    const KIND: Kind;
    fn into_info(self) -> Self::Info;
}

impl Ingest for SlimService {
    type Info = ServiceInfo;
    const KIND: Kind = Kind::Services;
    fn into_info(self) -> ServiceInfo {
        self.info
    }
}

impl Ingest for SlimSlice {
    type Info = SliceInfo;
    const KIND: Kind = Kind::EndpointSlices;
    fn into_info(self) -> SliceInfo {
        self.info
    }
}

/// What the two watches share: the sync input and whether each has
/// completed its initial list.
#[derive(Debug)]
pub struct Signals {
    input: Arc<Input>,
    services_synced: AtomicBool,
    slices_synced: AtomicBool,
    /// Watch restarts and relists are counted here, if set.
    metrics: Option<Arc<Metrics>>,
}

impl Signals {
    pub fn new(input: Arc<Input>) -> Arc<Self> {
        Arc::new(Self {
            input,
            services_synced: AtomicBool::new(false),
            slices_synced: AtomicBool::new(false),
            metrics: None,
        })
    }

    /// The same, counting watch restarts and relists in `metrics`.
    pub fn with_metrics(self: Arc<Self>, metrics: Arc<Metrics>) -> Arc<Self> {
        metrics.watching(metrics::SERVICES);
        metrics.watching(metrics::ENDPOINT_SLICES);
        Arc::new(Self {
            input: self.input.clone(),
            services_synced: AtomicBool::new(self.synced(Kind::Services)),
            slices_synced: AtomicBool::new(self.synced(Kind::EndpointSlices)),
            metrics: Some(metrics),
        })
    }

    fn resource(kind: Kind) -> &'static str {
        match kind {
            Kind::Services => metrics::SERVICES,
            Kind::EndpointSlices => metrics::ENDPOINT_SLICES,
        }
    }

    pub fn input(&self) -> &Arc<Input> {
        &self.input
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

    /// A zone learned after start; every service is translated again.
    pub fn set_zone(&self, zone: Option<String>) {
        info!(zone = zone.as_deref().unwrap_or(""), "node zone");
        self.set_options(|opts| opts.zone = zone);
    }

    /// This node's addresses changed; every service is translated again.
    pub fn set_node_ips(&self, node_ips: Vec<IpAddr>) {
        self.set_options(|opts| opts.node_ips = node_ips);
    }

    fn set_options(&self, f: impl FnOnce(&mut TranslateOptions)) {
        self.input.update(Instant::now(), false, |index| {
            let mut opts = index.options().clone();
            f(&mut opts);
            index.set_options(opts);
            true
        });
    }
}

/// One watch's side: events → slim objects → index.
pub struct Pump<K: Ingest> {
    signals: Arc<Signals>,
    /// A (re)list in progress: the keys the index held before it that the
    /// list has not named yet; what is left at its end has vanished.
    /// Empty on the first list, so the cold start holds no second copy.
    relist: Option<HashSet<Key>>,
    kind: std::marker::PhantomData<fn(K)>,
}

impl<K: Ingest> Pump<K>
where
    Index: IndexNamespaced<K::Info>,
{
    pub fn new(signals: Arc<Signals>) -> Self {
        Self {
            signals,
            relist: None,
            kind: std::marker::PhantomData,
        }
    }

    /// Applies one watch event.
    pub fn handle(&mut self, event: watcher::Result<watcher::Event<K>>) {
        use watcher::Event;
        let kind = K::KIND;
        let input = &self.signals.input;
        // Only EndpointSlice events count in the latency figures.
        let measured = kind == Kind::EndpointSlices;
        match event {
            Ok(Event::Init) => {
                let held = input.with_index(IndexNamespaced::<K::Info>::keys);
                self.relist = Some(held.into_iter().collect());
            }
            Ok(Event::InitApply(o)) => {
                let info = o.into_info();
                if let Some(held) = &mut self.relist {
                    held.remove(&info.key());
                }
                // A listed object is current: applied at once (an unchanged
                // one is no change), not counted as an event.
                input.update(Instant::now(), false, |index| index.apply(info));
            }
            Ok(Event::InitDone) => {
                let gone = self.relist.take().unwrap_or_default();
                input.update(Instant::now(), false, |index| {
                    let mut changed = false;
                    for (namespace, name) in &gone {
                        changed |= index.delete(namespace, name);
                    }
                    changed
                });
                if self.signals.synced_flag(kind).swap(true, Ordering::SeqCst) {
                    info!(%kind, vanished = gone.len(), "relisted");
                    if let Some(m) = &self.signals.metrics {
                        m.relisted(Signals::resource(kind));
                    }
                } else {
                    info!(%kind, "initial list complete");
                }
                if self.signals.all_synced() {
                    input.set_complete();
                }
            }
            Ok(Event::Apply(o)) => {
                let info = o.into_info();
                input.update(Instant::now(), measured, |index| index.apply(info));
            }
            Ok(Event::Delete(o)) => {
                // Keyed (and defaulted) as the slim type keys it.
                let (namespace, name) = o.into_info().key();
                input.update(Instant::now(), measured, |index| {
                    index.delete(&namespace, &name)
                });
            }
            // The backoff delays the retry; the index keeps its last state.
            Err(e) => {
                warn!(%kind, error = %e, "watch failed; retrying");
                if let Some(m) = &self.signals.metrics {
                    m.watch_restarted(Signals::resource(kind));
                }
            }
        }
    }
}

/// Drives one watch into the index. Returns when the stream ends (never,
/// for a real watcher).
pub async fn pump<K, S>(events: S, signals: Arc<Signals>)
where
    K: Ingest,
    Index: IndexNamespaced<K::Info>,
    S: Stream<Item = watcher::Result<watcher::Event<K>>>,
{
    let mut p = Pump::<K>::new(signals);
    let mut stream = pin!(events);
    while let Some(event) = stream.next().await {
        p.handle(event);
    }
    debug!(kind = %K::KIND, "watch stream ended");
}

/// Keeps the node addresses of the translation equal to `node`'s
/// `status.addresses` (`InternalIP` and `ExternalIP`; see
/// [`node::from_node_status`]) for as long as it runs, through a watch on
/// that one Node (`list` and `watch` on nodes). Never returns.
pub async fn watch_node_addresses(client: Client, node: String, signals: Arc<Signals>) {
    let api: Api<Node> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut events = pin!(watcher(api, cfg).default_backoff());
    let mut watch = NodeWatch::new(node, signals);
    while let Some(event) = events.next().await {
        watch.handle(event);
    }
}

/// The Node watch's side: this node's Node object → the translation's
/// node addresses, its restarts and relists counted as the other watches'
/// (`resource="nodes"`).
pub struct NodeWatch {
    node: String,
    signals: Arc<Signals>,
    /// The addresses last handed to the index.
    current: Option<Vec<IpAddr>>,
    /// The initial list is complete: the next one is a relist.
    listed: bool,
}

impl NodeWatch {
    pub fn new(node: String, signals: Arc<Signals>) -> Self {
        if let Some(m) = &signals.metrics {
            m.watching(metrics::NODES);
        }
        Self {
            node,
            signals,
            current: None,
            listed: false,
        }
    }

    /// Applies one watch event.
    pub fn handle(&mut self, event: watcher::Result<watcher::Event<Node>>) {
        use watcher::Event;
        let node = &self.node;
        match event {
            Ok(Event::Apply(n) | Event::InitApply(n)) => self.addresses(&n),
            // A deleted Node keeps its last addresses: they are still this
            // host's until a new object says otherwise.
            Ok(Event::Delete(_)) => debug!(node, "node object deleted; its addresses are kept"),
            Ok(Event::Init) => {}
            Ok(Event::InitDone) => {
                if std::mem::replace(&mut self.listed, true) {
                    info!(node, "node relisted");
                    if let Some(m) = &self.signals.metrics {
                        m.relisted(metrics::NODES);
                    }
                }
            }
            Err(e) => {
                warn!(node, error = %e, "node watch failed; retrying");
                if let Some(m) = &self.signals.metrics {
                    m.watch_restarted(metrics::NODES);
                }
            }
        }
    }

    fn addresses(&mut self, n: &Node) {
        let node = &self.node;
        let given = n.status.as_ref().and_then(|s| s.addresses.as_deref());
        let (found, bad) = node::from_node_status(given.unwrap_or_default());
        let ips: Vec<IpAddr> = found.iter().map(|(_, ip)| *ip).collect();
        if self.current.as_ref() == Some(&ips) {
            return;
        }
        let shown: Vec<String> = found.iter().map(|(t, ip)| format!("{ip} ({t})")).collect();
        info!(node, addresses = %shown.join(", "), "node addresses (status.addresses)");
        if !bad.is_empty() {
            warn!(node, ignored = ?bad, "Node status.addresses: entries that are not IP addresses ignored");
        }
        self.signals.set_node_ips(ips.clone());
        self.current = Some(ips);
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
