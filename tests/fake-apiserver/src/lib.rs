//! A fake Kubernetes API server speaking the real list/watch protocol over plain HTTP on
//! loopback, so kube-rs watchers and reflectors can be tested without a cluster.
//!
//! No real kube-apiserver is exercised: this mimics the behaviour kube-runtime's watcher
//! depends on (paging, bookmarks, in-stream 410, selector transitions), nothing more.
//! Objects are stored as untyped JSON, so every served resource kind works the same way.

mod selector;
mod server;
mod state;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::state::{Event, State, resource};

/// Errors from the test-control API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("unknown resource {0:?} (served: services, endpointslices, nodes, namespaces)")]
    UnknownResource(String),
    #[error("invalid object: {0}")]
    InvalidObject(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

/// Server tuning; the defaults suit manual use, tests shorten the intervals.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often an idle watch that allows bookmarks gets one.
    pub bookmark_interval: Duration,
    /// Events kept for resuming watches; older RVs get the in-stream 410.
    pub event_log_capacity: usize,
    /// Live events a watch may fall behind before it is closed (slow consumer).
    pub broadcast_capacity: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(3),
            event_log_capacity: 100_000,
            broadcast_capacity: 65_536,
        }
    }
}

/// One HTTP request as the server saw it, for assertions like "relisted after 410".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// Decoded query pairs, in request order.
    pub query: Vec<(String, String)>,
}

impl RequestRecord {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }

    /// A collection GET without `watch`; `path` must end in the plural, e.g. `/services`.
    pub fn is_list_of(&self, plural: &str) -> bool {
        self.method == "GET" && !self.is_watch() && self.path.ends_with(&format!("/{plural}"))
    }

    pub fn is_watch_of(&self, plural: &str) -> bool {
        self.is_watch() && self.path.ends_with(&format!("/{plural}"))
    }
}

pub(crate) struct Shared {
    pub config: Config,
    state: Mutex<State>,
    pub events: broadcast::Sender<Arc<Event>>,
    /// Bumped to cut every open watch mid-stream.
    pub sever: watch::Sender<u64>,
    /// Bumped to drop every connection (outage).
    pub conns: watch::Sender<u64>,
    pub open_watches: watch::Sender<usize>,
    pub bookmarks_sent: AtomicU64,
    /// CLOCK_MONOTONIC ns when a watch event (not a bookmark) was last handed to its connection.
    pub event_sent_ns: AtomicU64,
    requests: Mutex<Vec<RequestRecord>>,
}

impl Shared {
    /// A poisoned lock only means a test panicked elsewhere; the state itself stays consistent.
    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn log_request(&self, r: RequestRecord) {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(r);
    }
}

/// The running fake server plus its test-control API. Dropping it stops serving.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Lets a restart take the same port while old connections sit in TIME_WAIT.
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(server::serve_conn(shared.clone(), stream));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

impl FakeApiServer {
    /// Starts on `127.0.0.1:0` with the default [`Config`].
    pub async fn start() -> Result<Self, Error> {
        Self::start_with(Config::default(), SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_with(config: Config, addr: SocketAddr) -> Result<Self, Error> {
        let listener = listen(addr).map_err(|source| Error::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let (events, _) = broadcast::channel(config.broadcast_capacity.max(16));
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State::default()),
            events,
            sever: watch::Sender::new(0),
            conns: watch::Sender::new(0),
            open_watches: watch::Sender::new(0),
            bookmarks_sent: AtomicU64::new(0),
            event_sent_ns: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
        });
        let acceptor = tokio::spawn(accept_loop(shared.clone(), listener));
        Ok(Self {
            shared,
            addr,
            acceptor: Mutex::new(Some(acceptor)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, ready for `kube::Config::new(url.parse()?)`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces an object of `resource` (plural, e.g. `services`); returns its new RV.
    /// Namespaced objects without a namespace land in `default`, as with kubectl.
    pub fn apply(&self, resource_name: &str, object: Value) -> Result<u64, Error> {
        let def = resource(resource_name)?;
        let cap = self.shared.config.event_log_capacity;
        self.shared
            .lock_state()
            .apply(def, object, cap, &self.shared.events)
    }

    /// Applies many objects under one lock; each still gets its own RV and event.
    /// Returns the last RV (the current one when `objects` is empty).
    pub fn apply_many(
        &self,
        resource_name: &str,
        objects: impl IntoIterator<Item = Value>,
    ) -> Result<u64, Error> {
        let def = resource(resource_name)?;
        let cap = self.shared.config.event_log_capacity;
        let mut st = self.shared.lock_state();
        for obj in objects {
            st.apply(def, obj, cap, &self.shared.events)?;
        }
        Ok(st.rv)
    }

    /// Deletes an object (namespace `""` for cluster-scoped kinds); returns the delete's RV.
    pub fn delete(&self, resource_name: &str, namespace: &str, name: &str) -> Result<u64, Error> {
        let def = resource(resource_name)?;
        let cap = self.shared.config.event_log_capacity;
        self.shared
            .lock_state()
            .delete(def, namespace, name, cap, &self.shared.events)
    }

    /// The stored object, with the metadata the server filled in.
    pub fn get(&self, resource_name: &str, namespace: &str, name: &str) -> Option<Value> {
        let def = resource(resource_name).ok()?;
        let ns = if def.namespaced { namespace } else { "" };
        let st = self.shared.lock_state();
        let obj = st
            .objects
            .get(def.plural)?
            .get(&(ns.to_string(), name.to_string()))?;
        Some((**obj).clone())
    }

    /// Every stored object of `resource`, in (namespace, name) order.
    pub fn list(&self, resource_name: &str) -> Vec<Value> {
        let st = self.shared.lock_state();
        let objs = st.objects.get(resource_name);
        objs.map(|m| m.values().map(|v| (**v).clone()).collect())
            .unwrap_or_default()
    }

    /// Number of stored objects of `resource`.
    pub fn count(&self, resource_name: &str) -> usize {
        let st = self.shared.lock_state();
        st.objects.get(resource_name).map_or(0, |m| m.len())
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock_state().rv
    }

    /// Drops the event log (and paged-list snapshots): any watch resuming from an RV older
    /// than now gets the in-stream 410 and must relist.
    pub fn compact(&self) {
        self.shared.lock_state().compact();
    }

    /// Cuts every open watch mid-stream (no final chunk), like a lost connection.
    pub fn sever_watches(&self) {
        self.shared.sever.send_modify(|n| *n += 1);
    }

    /// `false` closes the listener and every connection, so clients get connection refused;
    /// `true` listens again on the same port.
    pub async fn set_available(&self, available: bool) -> Result<(), Error> {
        let old = self
            .acceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = old {
            task.abort();
            // Awaiting the abort guarantees the listener is closed before we return.
            let _ = task.await;
            self.shared.conns.send_modify(|n| *n += 1);
            // And every watch stream has ended: no event written after this
            // returns can reach a client through an old connection.
            let mut open = self.shared.open_watches.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(5), open.wait_for(|n| *n == 0)).await;
        }
        if available {
            let mut tries = 0;
            let listener = loop {
                match listen(self.addr) {
                    Ok(l) => break l,
                    Err(_) if tries < 50 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(source) => {
                        return Err(Error::Bind {
                            addr: self.addr,
                            source,
                        });
                    }
                }
            };
            let task = tokio::spawn(accept_loop(self.shared.clone(), listener));
            *self.acceptor.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
        Ok(())
    }

    pub async fn stop(&self) -> Result<(), Error> {
        self.set_available(false).await
    }

    pub async fn restart(&self) -> Result<(), Error> {
        self.set_available(true).await
    }

    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn clear_request_log(&self) {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Waits until a request matching `pred` has been logged (including earlier ones).
    pub async fn wait_for_request(
        &self,
        pred: impl Fn(&RequestRecord) -> bool,
        timeout: Duration,
    ) -> Result<RequestRecord, Error> {
        let poll = async {
            loop {
                if let Some(r) = self.request_log().into_iter().find(|r| pred(r)) {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(timeout, poll)
            .await
            .map_err(|_| Error::Timeout("a matching request".into()))
    }

    pub fn open_watches(&self) -> usize {
        *self.shared.open_watches.borrow()
    }

    /// Waits until at least `n` watch streams are open.
    pub async fn wait_for_watches(&self, n: usize, timeout: Duration) -> Result<(), Error> {
        let mut rx = self.shared.open_watches.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .map_err(|_| Error::Timeout(format!("{n} open watches")))?
            .map(|_| ())
            .map_err(|_| Error::Timeout(format!("{n} open watches (server gone)")))
    }

    /// Bookmarks sent over all watches so far.
    /// CLOCK_MONOTONIC ns (the clock other processes read too) when a watch event was last
    /// handed to its connection, 0 before the first: where a change leaves this server, so a
    /// client's latency can be told from the server's own.
    pub fn event_sent_ns(&self) -> u64 {
        self.shared.event_sent_ns.load(Ordering::Relaxed)
    }

    pub fn bookmarks_sent(&self) -> u64 {
        self.shared.bookmarks_sent.load(Ordering::Relaxed)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(task) = self
            .acceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
        self.shared.conns.send_modify(|n| *n += 1);
    }
}

/// The plural resource name for a `kind`, for loading manifests.
pub fn resource_for_kind(kind: &str) -> Option<&'static str> {
    state::RESOURCES
        .iter()
        .find(|r| r.kind == kind)
        .map(|r| r.plural)
}

/// A kubeconfig pointing at `url` over plain http with no credentials.
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
         current-context: fake\nusers:\n- name: fake\n  user: {{}}\npreferences: {{}}\n"
    )
}
