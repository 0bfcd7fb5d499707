//! The client "pod": joins a cgroup (where the socket-LB programs are
//! attached) and a network namespace itself, then talks to a target over
//! and over and reports, as JSON, which backend answered and every errno.
//!
//! It enters the namespace with setns(2) instead of `ip netns exec`, which
//! would remount /sys and hide the cgroup2 mount.
//!
//! Modes:
//! - default: one TCP connect + HTTP GET per attempt;
//! - `--udp`: one connected UDP socket per attempt;
//! - `--udp-unconnected [--sockets N]`: N unbound-peer sockets, each sending
//!   `--count` datagrams with sendto() and reading replies with recvfrom();
//! - `--session`: one unconnected UDP socket for the whole run; every stdin
//!   line is a target `IP:PORT`; prints one JSON line per datagram;
//! - `--exec CMD ARGS...`: runs CMD inside the cgroup and namespace (with
//!   `--resolv FILE` bind-mounted over /etc/resolv.conf in a private mount
//!   namespace), for real resolvers such as dig and getent.
//!
//! Besides `ClientReport`'s fields the JSON holds `peers` (getpeername() of
//! TCP and connected UDP sockets), `sources` (recvfrom() addresses) and
//! `perSocket` (backends each unconnected socket reached).
use std::{
    collections::BTreeMap,
    io::{BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{ClientReport, sys};
use serde::Serialize;

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    #[serde(flatten)]
    base: ClientReport,
    /// getpeername() → count.
    peers: BTreeMap<String, u64>,
    /// recvfrom() source → count.
    sources: BTreeMap<String, u64>,
    /// Unconnected mode: backend name → replies, per socket.
    per_socket: Vec<BTreeMap<String, u64>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Tcp,
    Udp,
    UdpUnconnected,
}

fn main() -> anyhow::Result<()> {
    let mut netns = None;
    let mut cgroup = None;
    let mut target: Option<SocketAddr> = None;
    let mut count: Option<u64> = None;
    let mut duration = None;
    let mut mode = Mode::Tcp;
    let mut sockets = 1u64;
    let mut session = false;
    let mut resolv = None;
    let mut exec: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--netns" => netns = args.next(),
            "--cgroup" => cgroup = args.next(),
            "--target" => target = Some(args.next().context("--target ADDR")?.parse()?),
            "--count" => count = Some(args.next().context("--count N")?.parse()?),
            "--duration-ms" => {
                duration = Some(Duration::from_millis(
                    args.next().context("--duration-ms MS")?.parse()?,
                ));
            }
            "--udp" => mode = Mode::Udp,
            "--udp-unconnected" => mode = Mode::UdpUnconnected,
            "--sockets" => sockets = args.next().context("--sockets N")?.parse()?,
            "--session" => session = true,
            "--resolv" => resolv = args.next(),
            "--exec" => {
                exec = args.by_ref().collect();
                anyhow::ensure!(!exec.is_empty(), "--exec CMD [ARGS...]");
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    // Cgroup first: its path is only visible in our own mount namespace view.
    if let Some(cg) = cgroup {
        sys::join_cgroup(Path::new(&cg))?;
    }
    if let Some(ns) = netns {
        sys::enter_netns(&ns)?;
    }
    if !exec.is_empty() {
        if let Some(file) = resolv {
            private_resolv_conf(Path::new(&file))?;
        }
        let err = std::process::Command::new(&exec[0]).args(&exec[1..]).exec();
        return Err(err).with_context(|| format!("exec {}", exec[0]));
    }
    if session {
        return run_session();
    }
    let target = target.context("--target ADDR is required")?;
    let mut report = Report::default();
    let start = Instant::now();
    if mode == Mode::UdpUnconnected {
        run_unconnected(&mut report, target, sockets, count.unwrap_or(1))?;
    } else {
        loop {
            if let Some(n) = count {
                if report.base.attempts >= n {
                    break;
                }
            } else if let Some(d) = duration {
                if start.elapsed() >= d {
                    break;
                }
            } else if report.base.attempts >= 1 {
                break;
            }
            report.base.attempts += 1;
            let answer = match mode {
                Mode::Tcp => request(target),
                _ => request_udp(target),
            };
            match answer {
                Ok((name, peer)) => {
                    *report.base.backends.entry(name).or_default() += 1;
                    *report.peers.entry(peer.to_string()).or_default() += 1;
                }
                Err(e) => count_error(&mut report.base, &e),
            }
        }
    }
    report.base.elapsed_ms = start.elapsed().as_millis() as u64;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn count_error(report: &mut ClientReport, e: &std::io::Error) {
    let errno = e
        .raw_os_error()
        .map_or_else(|| e.kind().to_string(), sys::errno_name);
    *report.errors.entry(errno).or_default() += 1;
}

/// One connect + HTTP GET; the backend's name is the response body.
fn request(target: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
    let peer = s.peer_addr()?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    if body.is_empty() {
        return Err(std::io::Error::other("empty response"));
    }
    Ok((body.to_owned(), peer))
}

/// One connected UDP socket: connect (where connect4 rewrites), one datagram
/// out, the backend's name back.
fn request_udp(target: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(target)?;
    let peer = s.peer_addr()?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.send(b"ping")?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf)?;
    let name = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
    if name.is_empty() {
        return Err(std::io::Error::other("empty reply"));
    }
    Ok((name, peer))
}

/// One datagram with sendto() on an unconnected socket, its reply with
/// recvfrom(): the backend's name and the address the kernel reported.
fn exchange(s: &UdpSocket, target: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    s.send_to(b"ping", target)?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf)?;
    let name = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
    if name.is_empty() {
        return Err(std::io::Error::other("empty reply"));
    }
    Ok((name, from))
}

fn run_unconnected(
    report: &mut Report,
    target: SocketAddr,
    sockets: u64,
    count: u64,
) -> anyhow::Result<()> {
    for _ in 0..sockets {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut mine = BTreeMap::new();
        for _ in 0..count {
            report.base.attempts += 1;
            match exchange(&s, target) {
                Ok((name, from)) => {
                    *report.base.backends.entry(name.clone()).or_default() += 1;
                    *report.sources.entry(from.to_string()).or_default() += 1;
                    *mine.entry(name).or_default() += 1;
                }
                Err(e) => count_error(&mut report.base, &e),
            }
        }
        report.per_socket.push(mine);
    }
    Ok(())
}

/// One socket for the whole run, driven from stdin: a test can change the
/// services between datagrams of the same socket.
fn run_session() -> anyhow::Result<()> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let target: SocketAddr = line.trim().parse().with_context(|| format!("{line:?}"))?;
        let out = match exchange(&s, target) {
            Ok((name, from)) => serde_json::json!({"name": name, "from": from.to_string()}),
            Err(e) => serde_json::json!({
                "error": e.raw_os_error().map_or_else(|| e.kind().to_string(), sys::errno_name)
            }),
        };
        let mut out_lock = stdout.lock();
        writeln!(out_lock, "{out}")?;
        out_lock.flush()?;
    }
    Ok(())
}

/// A private mount namespace in which `file` is /etc/resolv.conf, as
/// `ip netns exec` does with /etc/netns/NAME/resolv.conf.
fn private_resolv_conf(file: &Path) -> anyhow::Result<()> {
    use std::ffi::CString;
    let os = |what: &str| std::io::Error::last_os_error().to_string() + " (" + what + ")";
    // SAFETY: plain syscalls with valid NUL-terminated strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            anyhow::bail!(os("unshare"));
        }
        let root = CString::new("/")?;
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            anyhow::bail!(os("make / private"));
        }
        let src = CString::new(file.as_os_str().as_encoded_bytes())?;
        let dst = CString::new("/etc/resolv.conf")?;
        if libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            anyhow::bail!(os("bind resolv.conf"));
        }
    }
    Ok(())
}
