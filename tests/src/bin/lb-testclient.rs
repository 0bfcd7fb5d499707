//! The client "pod": joins a cgroup (where the socket-LB programs are
//! attached) and a network namespace itself, then talks to a target over
//! and over and reports, as JSON, which backend answered and every errno.
//!
//! It enters the namespace with setns(2) instead of `ip netns exec`, which
//! would remount /sys and hide the cgroup2 mount.
//!
//! Modes:
//! - default: one TCP connect + HTTP GET per attempt;
//! - `--udp`: one connected UDP socket per attempt (with `--reconnect ADDR`,
//!   connected again to ADDR before it sends);
//! - `--udp-unconnected [--sockets N]`: N unbound-peer sockets, each sending
//!   `--count` datagrams with sendto() and reading replies with recvfrom();
//! - `--session`: one unconnected UDP socket for the whole run; every stdin
//!   line is a target `IP:PORT`; prints one JSON line per datagram;
//! - `--exec CMD ARGS...`: runs CMD inside the cgroup and namespace (with
//!   `--resolv FILE` bind-mounted over /etc/resolv.conf in a private mount
//!   namespace), for real resolvers such as dig and getent;
//! - `--probe KIND`: one socket that the programs must leave alone (`ping`:
//!   an ICMP echo socket; `raw-icmp`, `raw-udp`, `raw-tcp`: SOCK_RAW with
//!   that protocol) does sendto(), then connect(), to the target; prints
//!   each call's result (`ok` or the errno name) under `probe`;
//! - `--try-bind ADDR`: a TCP and then a UDP socket of ADDR's family bind()
//!   to ADDR (with IP_FREEBIND / IPV6_FREEBIND, so an address no interface
//!   holds can be bound) and close at once, sending and listening on
//!   nothing; each result (`ok` or the errno name) under `probe`, as
//!   `bind-tcp` and `bind-udp`.
//!
//! The target may be IPv4 or IPv6; the socket has the target's family, so
//! `--target [::ffff:10.96.0.10]:80` uses an AF_INET6 socket with a
//! v4-mapped address, as a Java or Go dual-stack socket does (UDP sockets
//! are bound to `[::]:0` or `0.0.0.0:0` to match; `--bind ADDR` overrides).
//!
//! Besides `ClientReport`'s fields the JSON holds `peers` (getpeername() of
//! TCP and connected UDP sockets), `sources` (recvfrom() addresses) and
//! `perSocket` (backends each unconnected socket reached). With
//! `--sock-slots PIN` (the agent's pinned `LB_SOCK`), `stored` counts what
//! each TCP or connected UDP socket's record held once connected
//! (`FRONTEND -> BACKEND`, with ` (spilled)` if it was in `LB_SOCK_SPILL`
//! because another socket held its slot, or `none`). `--hold` keeps every
//! TCP or connected UDP socket open until the client exits.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::{fd::OwnedFd, unix::process::CommandExt as _},
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
    /// `--probe`: call (`socket`, `sendto`, `connect`) → `ok` or errno name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    probe: BTreeMap<String, String>,
    /// `--sock-slots`: a connected socket's record → count.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    stored: BTreeMap<String, u64>,
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
    let mut bind: Option<SocketAddr> = None;
    let mut probe_kind: Option<String> = None;
    let mut try_bind: Option<SocketAddr> = None;
    let mut storage: Option<String> = None;
    let mut hold = false;
    let mut reconnect: Option<SocketAddr> = None;
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
            "--bind" => bind = Some(args.next().context("--bind ADDR")?.parse()?),
            "--sock-slots" => storage = args.next(),
            "--hold" => hold = true,
            "--reconnect" => {
                reconnect = Some(args.next().context("--reconnect ADDR")?.parse()?);
            }
            "--probe" => probe_kind = Some(args.next().context("--probe KIND")?),
            "--try-bind" => try_bind = Some(args.next().context("--try-bind ADDR")?.parse()?),
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
        return run_session(bind.unwrap_or_else(|| "0.0.0.0:0".parse().expect("an address")));
    }
    if let Some(addr) = try_bind {
        let report = Report {
            probe: try_binds(addr),
            ..Report::default()
        };
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let target = target.context("--target ADDR is required")?;
    let bind = bind.unwrap_or_else(|| unspecified(target));
    let storage = storage
        .map(|p| SockRecords::open(Path::new(&p)))
        .transpose()?;
    let mut held = Vec::new();
    let mut report = Report::default();
    let start = Instant::now();
    if let Some(kind) = probe_kind {
        report.probe = probe(&kind, target)?;
    } else if mode == Mode::UdpUnconnected {
        run_unconnected(&mut report, target, bind, sockets, count.unwrap_or(1))?;
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
                Mode::Tcp => request(target, storage.as_ref()),
                _ => request_udp(target, reconnect, bind, storage.as_ref()),
            };
            match answer {
                Ok((name, peer, stored, socket)) => {
                    if hold {
                        held.push(socket);
                    }
                    if let Some(s) = stored {
                        *report.stored.entry(s).or_default() += 1;
                    }
                    *report.base.backends.entry(name).or_default() += 1;
                    *report.peers.entry(peer.to_string()).or_default() += 1;
                }
                Err(e) => count_error(&mut report.base, &e),
            }
        }
    }
    report.base.elapsed_ms = start.elapsed().as_millis() as u64;
    drop(held);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The wildcard address of the target's family, port 0.
fn unspecified(target: SocketAddr) -> SocketAddr {
    match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

fn count_error(report: &mut ClientReport, e: &std::io::Error) {
    let errno = e
        .raw_os_error()
        .map_or_else(|| e.kind().to_string(), sys::errno_name);
    *report.errors.entry(errno).or_default() += 1;
}

/// The backend's name, getpeername(), what the socket's record held, and
/// the socket (closed when dropped).
type Answer = (String, SocketAddr, Option<String>, OwnedFd);

/// The agent's pinned `LB_SOCK` (slot `cookie & (size - 1)`) and
/// `LB_SOCK_SPILL` (by cookie).
struct SockRecords {
    slots: sys::PinnedMap,
    mask: u64,
    spill: sys::PinnedMap,
}

impl SockRecords {
    fn open(pin: &Path) -> anyhow::Result<Self> {
        let slots = sys::PinnedMap::open(pin)?;
        let mask = u64::from(slots.max_entries()?) - 1;
        let spill = sys::PinnedMap::open(&pin.with_file_name("LB_SOCK_SPILL"))?;
        Ok(Self { slots, mask, spill })
    }

    /// `FRONTEND -> BACKEND` from a socket's record (`SockReverse`:
    /// backend address, backend port, frontend port, svc id, frontend
    /// address; addresses 16 bytes, IPv4 ones v4-mapped; ports in network
    /// order), found by the socket's cookie.
    fn stored(&self, fd: i32) -> String {
        let Ok(cookie) = sys::socket_cookie(fd) else {
            return "no cookie".into();
        };
        let slot = self
            .slots
            .lookup::<u32, 96>(&((cookie & self.mask) as u32))
            .filter(|v| u64::from_ne_bytes(v[0..8].try_into().expect("8 bytes")) == cookie);
        let (v, suffix) = match (slot, self.spill.lookup::<u64, 40>(&cookie)) {
            (Some(v), _) => (v[16..56].to_vec(), ""),
            (None, Some(v)) => (v.to_vec(), " (spilled)"),
            (None, None) => return "none".into(),
        };
        let addr = |b: &[u8]| -> std::net::IpAddr {
            let a = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes"));
            a.to_ipv4_mapped().map_or(a.into(), Into::into)
        };
        let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
        let backend = SocketAddr::new(addr(&v[0..16]), port(&v[16..18]));
        let frontend = SocketAddr::new(addr(&v[24..40]), port(&v[18..20]));
        format!("{frontend} -> {backend}{suffix}")
    }
}

/// One connect + HTTP GET; the backend's name is the response body.
fn request(target: SocketAddr, storage: Option<&SockRecords>) -> std::io::Result<Answer> {
    use std::os::fd::AsRawFd as _;
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
    let peer = s.peer_addr()?;
    let record = storage.map(|r| r.stored(s.as_raw_fd()));
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    if body.is_empty() {
        return Err(std::io::Error::other("empty response"));
    }
    Ok((body.to_owned(), peer, record, s.into()))
}

/// One connected UDP socket: connect (where connect4 rewrites), one datagram
/// out, the backend's name back.
fn request_udp(
    target: SocketAddr,
    reconnect: Option<SocketAddr>,
    bind: SocketAddr,
    storage: Option<&SockRecords>,
) -> std::io::Result<Answer> {
    use std::os::fd::AsRawFd as _;
    let s = UdpSocket::bind(bind)?;
    s.connect(target)?;
    if let Some(again) = reconnect {
        s.connect(again)?;
    }
    let peer = s.peer_addr()?;
    let record = storage.map(|r| r.stored(s.as_raw_fd()));
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.send(b"ping")?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf)?;
    let name = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
    if name.is_empty() {
        return Err(std::io::Error::other("empty reply"));
    }
    Ok((name, peer, record, s.into()))
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
    bind: SocketAddr,
    sockets: u64,
    count: u64,
) -> anyhow::Result<()> {
    for _ in 0..sockets {
        let s = UdpSocket::bind(bind)?;
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
fn run_session(bind: SocketAddr) -> anyhow::Result<()> {
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut named: BTreeMap<String, Named> = BTreeMap::new();
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let out = match words.as_slice() {
            [target] => {
                let target: SocketAddr = target.parse().with_context(|| format!("{line:?}"))?;
                reply(exchange(&s, target).map(
                    |(name, from)| serde_json::json!({"name": name, "from": from.to_string()}),
                ))
            }
            ["udp", name, target] => reply(open_named(false, target, bind).map(|n| {
                let peer = n.peer();
                named.insert((*name).to_owned(), n);
                serde_json::json!({"peer": peer})
            })),
            ["tcp", name, target] => reply(open_named(true, target, bind).map(|n| {
                let peer = n.peer();
                let local = n.local();
                named.insert((*name).to_owned(), n);
                serde_json::json!({"peer": peer, "local": local})
            })),
            ["send", name] => match named.get_mut(*name) {
                Some(n) => reply(n.request().map(|name| serde_json::json!({"name": name}))),
                None => anyhow::bail!("no socket {name}"),
            },
            _ => anyhow::bail!("unknown session command {line:?}"),
        };
        let mut out_lock = stdout.lock();
        writeln!(out_lock, "{out}")?;
        out_lock.flush()?;
    }
    Ok(())
}

/// A session's named socket: a connected UDP socket or a TCP connection.
enum Named {
    Udp(UdpSocket),
    Tcp(TcpStream),
}

fn open_named(tcp: bool, target: &str, bind: SocketAddr) -> std::io::Result<Named> {
    let target: SocketAddr = target
        .parse()
        .map_err(|e| std::io::Error::other(format!("{target}: {e}")))?;
    if tcp {
        let s = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Named::Tcp(s))
    } else {
        let s = UdpSocket::bind(bind)?;
        s.connect(target)?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(Named::Udp(s))
    }
}

impl Named {
    /// The socket's own address (for matching it in `ss`, which shows the
    /// real peer where getpeername() shows the frontend).
    fn local(&self) -> String {
        match self {
            Self::Udp(s) => s.local_addr(),
            Self::Tcp(s) => s.local_addr(),
        }
        .map_or_else(|e| e.to_string(), |a| a.to_string())
    }

    fn peer(&self) -> String {
        match self {
            Self::Udp(s) => s.peer_addr(),
            Self::Tcp(s) => s.peer_addr(),
        }
        .map_or_else(|e| e.to_string(), |a| a.to_string())
    }

    /// One exchange on the socket: a datagram and its reply, or (TCP) one
    /// HTTP request whose response the server sends before it closes.
    fn request(&mut self) -> std::io::Result<String> {
        let name = match self {
            Self::Udp(s) => {
                s.send(b"ping")?;
                let mut buf = [0u8; 512];
                let n = s.recv(&mut buf)?;
                String::from_utf8_lossy(&buf[..n]).trim().to_owned()
            }
            Self::Tcp(s) => {
                s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                let mut resp = String::new();
                s.read_to_string(&mut resp)?;
                resp.split("\r\n\r\n")
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            }
        };
        if name.is_empty() {
            return Err(std::io::Error::other("empty reply"));
        }
        Ok(name)
    }
}

/// A session reply: the value, or `{"error": ERRNO}`.
fn reply(r: std::io::Result<serde_json::Value>) -> serde_json::Value {
    r.unwrap_or_else(|e| {
        serde_json::json!({
            "error": e.raw_os_error().map_or_else(|| e.kind().to_string(), sys::errno_name)
        })
    })
}

/// `--try-bind`: `bind-tcp` and `bind-udp`, each `ok` or the errno name.
fn try_binds(addr: SocketAddr) -> BTreeMap<String, String> {
    [
        ("bind-tcp", libc::SOCK_STREAM),
        ("bind-udp", libc::SOCK_DGRAM),
    ]
    .into_iter()
    .map(|(name, ty)| {
        let result = try_bind(addr, ty).map_or_else(
            |e| {
                e.raw_os_error()
                    .map_or_else(|| e.to_string(), sys::errno_name)
            },
            |()| "ok".to_owned(),
        );
        (name.to_owned(), result)
    })
    .collect()
}

/// One socket of type `ty` binds `addr`, then closes.
fn try_bind(addr: SocketAddr, ty: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let (domain, level, freebind) = if addr.is_ipv6() {
        (libc::AF_INET6, libc::IPPROTO_IPV6, libc::IPV6_FREEBIND)
    } else {
        (libc::AF_INET, libc::IPPROTO_IP, libc::IP_FREEBIND)
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a socket we just opened and own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let on: libc::c_int = 1;
    // SAFETY: an int option of the stated length.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            freebind,
            std::ptr::from_ref(&on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (sa, len) = sockaddr(addr);
    // SAFETY: a valid sockaddr of the stated length.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&sa).cast(), len) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `--probe`: a socket no program may touch (not a TCP stream or UDP
/// datagram socket) sends one packet to `target` with sendto(), then
/// connect()s to it. In the test namespaces, which have no route off the
/// pod subnet, both fail with ENETUNREACH for a ClusterIP unless a program
/// rewrote the address to a pod.
fn probe(kind: &str, target: SocketAddr) -> anyhow::Result<BTreeMap<String, String>> {
    let v6 = target.is_ipv6();
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let icmp = if v6 {
        libc::IPPROTO_ICMPV6
    } else {
        libc::IPPROTO_ICMP
    };
    let (ty, proto) = match kind {
        "ping" => (libc::SOCK_DGRAM, icmp),
        "raw-icmp" => (libc::SOCK_RAW, icmp),
        "raw-udp" => (libc::SOCK_RAW, libc::IPPROTO_UDP),
        "raw-tcp" => (libc::SOCK_RAW, libc::IPPROTO_TCP),
        other => anyhow::bail!("unknown probe {other} (ping, raw-icmp, raw-udp, raw-tcp)"),
    };
    // An echo request (the kernel fills in a ping socket's id and
    // checksum), or a UDP or TCP header to the target port: what a buggy
    // program could mistake for its own traffic.
    let port = target.port().to_be_bytes();
    let payload: Vec<u8> = match proto {
        libc::IPPROTO_UDP => [&[0, 0][..], &port, &[0, 12, 0, 0], b"ping"].concat(),
        libc::IPPROTO_TCP => {
            let mut h = vec![0u8; 20];
            h[2..4].copy_from_slice(&port);
            h[12] = 5 << 4;
            h[13] = 0x02; // SYN
            h
        }
        _ => vec![
            if v6 { 128 } else { 8 },
            0,
            0,
            0,
            0,
            0,
            0,
            1,
            b'p',
            b'i',
            b'n',
            b'g',
        ],
    };
    let mut out = BTreeMap::new();
    let result = |rc: libc::c_int| {
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            e.raw_os_error()
                .map_or_else(|| e.to_string(), sys::errno_name)
        } else {
            "ok".to_owned()
        }
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    out.insert("socket".to_owned(), result(fd));
    if fd < 0 {
        return Ok(out);
    }
    // An IPv6 raw socket takes no port but 0 or its own protocol in sendto().
    let send_to = if v6 && ty == libc::SOCK_RAW {
        SocketAddr::new(target.ip(), 0)
    } else {
        target
    };
    let (addr, len) = sockaddr(send_to);
    // SAFETY: a valid buffer and sockaddr of the stated lengths.
    let rc = unsafe {
        libc::sendto(
            fd,
            payload.as_ptr().cast(),
            payload.len(),
            libc::MSG_DONTWAIT,
            std::ptr::from_ref(&addr).cast(),
            len,
        )
    };
    out.insert("sendto".to_owned(), result(rc as libc::c_int));
    let (addr, len) = sockaddr(target);
    // SAFETY: a valid sockaddr of the stated length.
    let rc = unsafe { libc::connect(fd, std::ptr::from_ref(&addr).cast(), len) };
    out.insert("connect".to_owned(), result(rc));
    // SAFETY: our own fd, closed once.
    unsafe { libc::close(fd) };
    Ok(out)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
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
