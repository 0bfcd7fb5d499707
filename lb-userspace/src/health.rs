//! `/healthz` (the process serves requests) and `/readyz` (the programs are
//! attached and every source has completed its initial sync) over plain
//! HTTP/1.1, for kubelet probes. Deliberately tiny: one request per
//! connection, no keep-alive, bounded reads.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, error, info};

/// Default `--health-addr`. kube-proxy serves its healthz on 10256; we run
/// alongside it (README), so we take a port no Kubernetes component uses
/// (10248-10259 are kubelet, kube-proxy, controller-manager, cloud-controller
/// and scheduler ports). All addresses, like kube-proxy, so kubelet's default
/// probe (the pod IP, which is the node IP under hostNetwork) reaches it.
pub const DEFAULT_ADDR: &str = "0.0.0.0:10266";

/// How long a probe may take to send its request line and headers.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Retry interval when the address is taken (the agent keeps working meanwhile).
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Readiness as the probes see it.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set_ready(&self) {
        if !self.ready.swap(true, Ordering::SeqCst) {
            info!("ready");
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
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
    let (status, body) = respond(&buf, health.is_ready());
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Status line and body for a raw request.
fn respond(request: &[u8], ready: bool) -> (&'static str, &'static str) {
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next(), parts.next());
    if !matches!(method, Some("GET" | "HEAD")) {
        return ("405 Method Not Allowed", "method not allowed\n");
    }
    let path = target.unwrap_or("/").split('?').next().unwrap_or("/");
    match path {
        "/healthz" | "/livez" => ("200 OK", "ok\n"),
        "/readyz" if ready => ("200 OK", "ok\n"),
        "/readyz" => (
            "503 Service Unavailable",
            "not ready: waiting for the initial sync\n",
        ),
        _ => ("404 Not Found", "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(respond(b"GET /healthz HTTP/1.1\r\n\r\n", false).0, "200 OK");
        assert_eq!(
            respond(b"GET /readyz HTTP/1.1\r\n\r\n", false).0,
            "503 Service Unavailable"
        );
        assert_eq!(
            respond(b"GET /readyz?verbose HTTP/1.1\r\n\r\n", true).0,
            "200 OK"
        );
        assert_eq!(respond(b"GET /x HTTP/1.1\r\n\r\n", true).0, "404 Not Found");
        assert_eq!(
            respond(b"POST /readyz HTTP/1.1\r\n\r\n", true).0,
            "405 Method Not Allowed"
        );
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new();
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
