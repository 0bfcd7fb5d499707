//! `/healthz` and `/livez` (the sync loop makes progress) and `/readyz` (the
//! programs are attached, every source has completed its initial sync and
//! every frontend is programmed) over plain HTTP/1.1, for kubelet probes.
//! Deliberately tiny: one request per connection, no keep-alive, bounded reads.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, error, info, warn};

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
        })
    }

    /// A sync wrote or deleted map entries.
    pub fn note_maps_changed(&self) {
        self.maps_changed.notify_one();
    }

    /// Until a sync has changed the maps since the last call returned.
    pub async fn maps_changed(&self) {
        self.maps_changed.notified().await;
    }

    pub fn set_ready(&self) {
        if !self.ready.swap(true, Ordering::SeqCst) {
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
        Ok(addr) => info!(%addr, "health endpoints listening"),
        Err(e) => error!(error = %e, "health listener has no address"),
    }
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let health = health.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &health).await {
                        debug!(error = %e, "health request");
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

async fn answer(mut stream: TcpStream, health: &Health) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let read = async {
        let mut chunk = [0u8; 512];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request"))??;
    let (status, body) = respond(&buf, health, Instant::now());
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Status line and body for a raw request.
fn respond(request: &[u8], health: &Health, now: Instant) -> (&'static str, String) {
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next(), parts.next());
    if !matches!(method, Some("GET" | "HEAD")) {
        return ("405 Method Not Allowed", "method not allowed\n".into());
    }
    const OK: &str = "200 OK";
    const UNAVAILABLE: &str = "503 Service Unavailable";
    let path = target.unwrap_or("/").split('?').next().unwrap_or("/");
    match path {
        "/healthz" | "/livez" => match health.stalled(now) {
            None => (OK, "ok\n".into()),
            Some(reason) => (UNAVAILABLE, reason),
        },
        "/readyz" => match health.stalled(now).or_else(|| health.not_ready()) {
            None => (OK, "ok\n".into()),
            Some(reason) => (UNAVAILABLE, reason),
        },
        _ => ("404 Not Found", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(health: &Health, path: &str, now: Instant) -> &'static str {
        respond(
            format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes(),
            health,
            now,
        )
        .0
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
            respond(b"POST /readyz HTTP/1.1\r\n\r\n", &health, now).0,
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
        let (code, body) = respond(b"GET /healthz HTTP/1.1\r\n\r\n", &health, later);
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
        let (code, body) = respond(b"GET /readyz HTTP/1.1\r\n\r\n", &health, Instant::now());
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
    }
}
