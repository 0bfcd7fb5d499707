//! `/healthz` and `/livez` (the sync loop makes progress), `/readyz` (the
//! programs are attached, every source has completed its initial sync and
//! every frontend is programmed) for kubelet probes, and `/metrics` for
//! Prometheus, over HTTP/1.1 (hyper). One request per connection, headers
//! bounded in size and time, request bodies never read.
//!
//! The bound address and the initial sync's time also go into the
//! installation's pinned `LB_AGENT` record (`lb-agent status` shows them),
//! so a script or a test finds `/metrics` without reading the log, also
//! when `--health-addr` asks for an ephemeral port.
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{bpf, ip_be},
    metrics::{self, Collect, Metrics},
};

/// Default `--health-addr`. kube-proxy serves its healthz on 10256; we run
/// alongside it (README), so we take a port no Kubernetes component uses
/// (10248-10259 are kubelet, kube-proxy, controller-manager, cloud-controller
/// and scheduler ports). All addresses, like kube-proxy, so kubelet's default
/// probe (the pod IP, which is the node IP under hostNetwork) reaches it.
pub const DEFAULT_ADDR: &str = "0.0.0.0:10266";

/// Default `--stall-timeout`: an iteration of the sync loop (read the
/// sources, translate, write the maps) that has not finished after this long
/// is stuck, and `/healthz` says so. A cold load of 100,000 services takes a
/// few seconds; a blocked read or a wedged syscall never ends.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a probe may take to send its request line and headers.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may last in all (a scrape reads the maps).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head read (hyper's least allowed buffer).
const MAX_HEAD: usize = 8192;
/// Retry interval when the address is taken (the agent keeps working meanwhile).
const BIND_RETRY: Duration = Duration::from_secs(5);
/// Frontends named in a `/readyz` body; the rest are counted.
const MAX_LISTED: usize = 20;

/// Liveness and readiness as the probes see them.
#[derive(Debug)]
pub struct Health {
    ready: AtomicBool,
    stall_timeout: Duration,
    /// When the sync loop's current iteration started; `None` between iterations.
    iteration: Mutex<Option<Instant>>,
    /// Frontends the last sync could not program (a full map, a refused write).
    failing: Mutex<Vec<String>>,
    /// Woken after a sync that wrote or deleted map entries (one stored
    /// wake-up: changes while nobody waits coalesce into one).
    maps_changed: tokio::sync::Notify,
    metrics: Arc<Metrics>,
    record: Mutex<Record>,
}

/// What goes into this agent's `LB_AGENT` record once it exists.
#[derive(Debug, Default)]
struct Record {
    /// The pin directory, once this process's record is written.
    dir: Option<PathBuf>,
    bound: Option<SocketAddr>,
    initial_sync: Option<SystemTime>,
}

impl Health {
    /// `stall_timeout`: how long one sync-loop iteration may run before
    /// `/healthz` fails.
    pub fn new(stall_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(false),
            stall_timeout,
            iteration: Mutex::new(None),
            failing: Mutex::new(Vec::new()),
            maps_changed: tokio::sync::Notify::new(),
            metrics: Arc::new(Metrics::new()),
            record: Mutex::new(Record::default()),
        })
    }

    /// This process's record in `dir`'s `LB_AGENT` is written (it started):
    /// what is known already goes in, the rest when it happens.
    pub fn record_in(&self, dir: &Path) {
        let mut r = lock(&self.record);
        r.dir = Some(dir.to_owned());
        publish(&r);
    }

    /// The health server is listening on `addr`.
    fn bound(&self, addr: SocketAddr) {
        let mut r = lock(&self.record);
        r.bound = Some(addr);
        publish(&r);
    }

    /// What `/metrics` serves; the sync loop and the sources update it.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A sync wrote or deleted map entries.
    pub fn note_maps_changed(&self) {
        self.maps_changed.notify_one();
    }

    /// Until a sync has changed the maps since the last call returned.
    pub async fn maps_changed(&self) {
        self.maps_changed.notified().await;
    }

    /// The first sync with complete sources is written.
    pub fn set_ready(&self) {
        if !self.ready.swap(true, Ordering::SeqCst) {
            self.metrics.initial_sync_complete();
            let mut r = lock(&self.record);
            r.initial_sync = Some(SystemTime::now());
            publish(&r);
            info!("ready");
        }
    }

    /// The first complete sync has happened (whatever failed in it).
    pub fn synced(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && lock(&self.failing).is_empty()
    }

    /// The sync loop began an iteration: it must finish within the stall
    /// timeout for `/healthz` to keep answering 200.
    pub fn iteration_started(&self) {
        *lock(&self.iteration) = Some(Instant::now());
    }

    pub fn iteration_finished(&self) {
        *lock(&self.iteration) = None;
    }

    /// Frontends that failed to program (empty: all programmed); `/readyz`
    /// is not ready while any fails, and names them.
    pub fn set_failing(&self, frontends: Vec<String>) {
        let mut failing = lock(&self.failing);
        if failing.is_empty() && !frontends.is_empty() {
            warn!(
                frontends = frontends.len(),
                "not ready: some frontends failed to program"
            );
        } else if !failing.is_empty() && frontends.is_empty() {
            info!("every frontend programmed again");
        }
        *failing = frontends;
    }

    /// `Some(reason)` when the sync loop is stuck.
    fn stalled(&self, now: Instant) -> Option<String> {
        let started = (*lock(&self.iteration))?;
        let running = now.saturating_duration_since(started);
        (running > self.stall_timeout).then(|| {
            format!(
                "sync loop stalled: an iteration started {}s ago has not finished (--stall-timeout {}s)\n",
                running.as_secs(),
                self.stall_timeout.as_secs()
            )
        })
    }

    /// `Some(reason)` when not ready.
    fn not_ready(&self) -> Option<String> {
        if !self.ready.load(Ordering::SeqCst) {
            return Some("not ready: waiting for the initial sync\n".to_owned());
        }
        let failing = lock(&self.failing);
        if failing.is_empty() {
            return None;
        }
        let mut body = format!(
            "not ready: {} frontend(s) failed to program:\n",
            failing.len()
        );
        for fe in failing.iter().take(MAX_LISTED) {
            body.push_str(fe);
            body.push('\n');
        }
        if failing.len() > MAX_LISTED {
            body.push_str(&format!("... and {} more\n", failing.len() - MAX_LISTED));
        }
        Some(body)
    }
}

/// Writes what `r` knows into the agent record, once it exists.
fn publish(r: &Record) {
    let Some(dir) = &r.dir else {
        return;
    };
    let written = bpf::update_agent_record(dir, |state| {
        if let Some(addr) = r.bound {
            state.health_addr = ip_be(addr.ip());
            state.health_port = addr.port().to_be();
        }
        if let Some(t) = r.initial_sync {
            state.initial_sync_ns = bpf::unix_ns(t);
        }
    });
    if let Err(e) = written {
        warn!(error = %e, "recording the health address and sync for status");
    }
}

/// A poisoned lock only means a panic elsewhere; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Binds `addr` (retrying while it is taken: a failed bind must not stop the
/// datapath from being kept in sync) and serves the probes forever.
pub async fn serve(addr: SocketAddr, health: Arc<Health>) {
    let mut logged = false;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                if !logged {
                    error!(%addr, error = %e, "cannot serve /healthz and /readyz; retrying");
                    logged = true;
                }
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    };
    serve_on(listener, health).await;
}

/// Serves on an already bound listener (tests bind port 0).
pub async fn serve_on(listener: TcpListener, health: Arc<Health>) {
    match listener.local_addr() {
        Ok(addr) => {
            info!(%addr, "health endpoints listening");
            health.bound(addr);
        }
        Err(e) => error!(error = %e, "health listener has no address"),
    }
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let health = health.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let health = health.clone();
                        async move { Ok::<_, Infallible>(answer(req, health).await) }
                    });
                    let mut builder = http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(READ_TIMEOUT)
                        .max_buf_size(MAX_HEAD)
                        .keep_alive(false);
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => debug!(error = %e, "health request"),
                        Err(_) => debug!("health connection timed out"),
                    }
                });
            }
            Err(e) => {
                debug!(error = %e, "health accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(req: Request<Incoming>, health: Arc<Health>) -> Response<Full<Bytes>> {
    let head = matches!(*req.method(), Method::GET | Method::HEAD);
    if head && req.uri().path() == "/metrics" {
        let collect = match Collect::from_query(req.uri().query()) {
            Ok(c) => c,
            Err(e) => return reply(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n")),
        };
        let h = health.clone();
        return match tokio::task::spawn_blocking(move || h.metrics().render(collect)).await {
            Ok(body) => reply(StatusCode::OK, metrics::CONTENT_TYPE, body),
            Err(e) => {
                warn!(error = %e, "rendering /metrics");
                reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    "metrics unavailable\n".into(),
                )
            }
        };
    }
    let (status, body) = respond(req.method(), req.uri().path(), &health, Instant::now());
    reply(status, TEXT, body)
}

const TEXT: &str = "text/plain; charset=utf-8";

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Status and body of a probe.
fn respond(method: &Method, path: &str, health: &Health, now: Instant) -> (StatusCode, String) {
    if !matches!(*method, Method::GET | Method::HEAD) {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
    }
    const OK: StatusCode = StatusCode::OK;
    const UNAVAILABLE: StatusCode = StatusCode::SERVICE_UNAVAILABLE;
    match path {
        "/healthz" | "/livez" => match health.stalled(now) {
            None => (OK, "ok\n".into()),
            Some(reason) => (UNAVAILABLE, reason),
        },
        "/readyz" => match health.stalled(now).or_else(|| health.not_ready()) {
            None => (OK, "ok\n".into()),
            Some(reason) => (UNAVAILABLE, reason),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };

    use super::*;

    /// A request line's status, as the old hand-written server reported it.
    fn status(health: &Health, path: &str, now: Instant) -> &'static str {
        status_line(respond(&Method::GET, path.split('?').next().unwrap(), health, now).0)
    }

    fn status_line(code: StatusCode) -> &'static str {
        match code {
            StatusCode::OK => "200 OK",
            StatusCode::SERVICE_UNAVAILABLE => "503 Service Unavailable",
            StatusCode::NOT_FOUND => "404 Not Found",
            StatusCode::METHOD_NOT_ALLOWED => "405 Method Not Allowed",
            _ => "other",
        }
    }

    fn get(health: &Health, path: &str, now: Instant) -> (&'static str, String) {
        let (code, body) = respond(&Method::GET, path, health, now);
        (status_line(code), body)
    }

    #[test]
    fn routes() {
        let health = Health::new(DEFAULT_STALL_TIMEOUT);
        let now = Instant::now();
        assert_eq!(status(&health, "/healthz", now), "200 OK");
        assert_eq!(status(&health, "/readyz", now), "503 Service Unavailable");
        health.set_ready();
        assert_eq!(status(&health, "/readyz?verbose", now), "200 OK");
        assert_eq!(status(&health, "/x", now), "404 Not Found");
        assert_eq!(
            status_line(respond(&Method::POST, "/readyz", &health, now).0),
            "405 Method Not Allowed"
        );
    }

    #[test]
    fn liveness_is_progress() {
        let health = Health::new(Duration::from_secs(10));
        health.set_ready();
        let start = Instant::now();
        health.iteration_started();
        // Still within the bound: alive.
        assert_eq!(status(&health, "/healthz", start), "200 OK");
        // An iteration that never ends fails both probes, with the reason.
        let later = start + Duration::from_secs(11);
        let (code, body) = get(&health, "/healthz", later);
        assert_eq!(code, "503 Service Unavailable");
        assert!(body.contains("sync loop stalled"), "{body}");
        assert_eq!(status(&health, "/livez", later), "503 Service Unavailable");
        assert_eq!(status(&health, "/readyz", later), "503 Service Unavailable");
        // Finishing it is progress again.
        health.iteration_finished();
        assert_eq!(status(&health, "/healthz", later), "200 OK");
        assert_eq!(status(&health, "/readyz", later), "200 OK");
    }

    #[test]
    fn failing_frontends_are_not_ready_and_named() {
        let health = Health::new(DEFAULT_STALL_TIMEOUT);
        health.set_ready();
        let fes: Vec<String> = (0..25).map(|i| format!("10.96.0.{i}:80/TCP")).collect();
        health.set_failing(fes);
        let (code, body) = get(&health, "/readyz", Instant::now());
        assert_eq!(code, "503 Service Unavailable");
        assert!(body.contains("25 frontend(s) failed"), "{body}");
        assert!(body.contains("10.96.0.19:80/TCP"), "{body}");
        assert!(!body.contains("10.96.0.20:80/TCP"), "{body}");
        assert!(body.contains("and 5 more"), "{body}");
        // Liveness is unaffected: the loop is making progress.
        assert_eq!(status(&health, "/healthz", Instant::now()), "200 OK");
        health.set_failing(Vec::new());
        assert_eq!(status(&health, "/readyz", Instant::now()), "200 OK");
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new(DEFAULT_STALL_TIMEOUT);
        tokio::spawn(serve_on(listener, health.clone()));
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        health.set_ready();
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/livez").await.starts_with("HTTP/1.1 200"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        health.metrics().set_frontends(3, 0);
        let scraped = get("/metrics").await;
        assert!(scraped.starts_with("HTTP/1.1 200"), "{scraped}");
        assert!(
            scraped.contains("application/openmetrics-text"),
            "{scraped}"
        );
        assert!(
            scraped.contains("\nlb_frontends{state=\"programmed\"} 3\n"),
            "{scraped}"
        );
        assert!(scraped.contains("\nlb_datapath_up 0\n"), "{scraped}");
        // The control plane alone: the maps are not read.
        let cp = get("/metrics?collect[]=control-plane").await;
        assert!(cp.starts_with("HTTP/1.1 200"), "{cp}");
        assert!(
            cp.contains("\nlb_frontends{state=\"programmed\"} 3\n"),
            "{cp}"
        );
        assert!(!cp.contains("lb_datapath_up"), "{cp}");
        assert!(
            get("/metrics?collect[]=cpu")
                .await
                .starts_with("HTTP/1.1 400")
        );
        // A head larger than the bound is refused, not buffered.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let huge = format!(
            "GET /healthz HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let _ = s.write_all(huge.as_bytes()).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(!out.starts_with("HTTP/1.1 200"), "{out}");
    }
}
