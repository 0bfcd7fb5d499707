//! The benchmark's client "pod": one thread, one connection at a time
//! (netperf-like), timing `socket()` → `connect()` [→ write 1 byte → read
//! 1 byte] → `close()` with CLOCK_MONOTONIC. Every socket closes with RST
//! (SO_LINGER {1, 0}) so TIME_WAIT never piles up, and has 1 s send and
//! receive timeouts so a lost connect fails fast. Prints one JSON object.
//!
//! Other modes, one sample per iteration as well:
//! - `bulk`: connect, write `--bytes` in 256 KiB writes, shut down the write
//!   side, wait for the sink server's 8-byte count; `gbit_per_s` is the
//!   median stream's goodput;
//! - `udp`: one long-lived unconnected socket, `sendto()` 32 bytes and
//!   `recvfrom()` the echo (every datagram takes the sendmsg/recvmsg hooks);
//! - `udp-conn`: per transaction a new socket, `connect()`, send, receive,
//!   close (a resolver's pattern: the connect hook once per socket);
//! - `miss`: per iteration a new UDP socket, `connect()` to a destination
//!   that is no service, close: the connect hook's miss path, and no
//!   datagram is ever sent (a UDP connect only picks a route).
//!
//! Targets: `--base IP --targets N --port P --pick random|first|last`
//! connects to `base + i` for i in 0..N (a uniformly random i per
//! connection, or the first / last); `--port-span K` spreads the port over
//! P..P+K the same way. It joins `--cgroup` before `--netns`
//! (the cgroup path is only visible from the host mount namespace).
use std::{collections::BTreeMap, io::Write as _, net::Ipv4Addr, path::Path};

use anyhow::{Context as _, bail};
use serde::Serialize;

#[derive(Serialize)]
struct Report {
    mode: String,
    pick: String,
    targets: u32,
    warmup: u64,
    iters: u64,
    failures: u64,
    errors: BTreeMap<String, u64>,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    mean_us: f64,
    /// One serial client's rate: 10^6 / mean µs.
    conn_per_s: f64,
    elapsed_s: f64,
    /// `bulk`: bytes per stream and the median stream's Gbit/s.
    bytes: u64,
    gbit_per_s: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Connect,
    Crr,
    Bulk,
    Udp,
    UdpConn,
    Miss,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Connect => "connect",
            Mode::Crr => "crr",
            Mode::Bulk => "bulk",
            Mode::Udp => "udp",
            Mode::UdpConn => "udp-conn",
            Mode::Miss => "miss",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Pick {
    Random,
    First,
    Last,
}

fn main() -> anyhow::Result<()> {
    let mut netns = None;
    let mut cgroup = None;
    let mut cpu: Option<usize> = None;
    let mut mode = Mode::Connect;
    let mut pick = Pick::Random;
    let mut base: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
    let mut targets: u32 = 1;
    let mut port: u16 = 8080;
    let mut port_span: u32 = 1;
    let mut warmup: u64 = 2000;
    let mut iters: u64 = 20_000;
    let mut max_failures: u64 = 20;
    let mut bytes: u64 = 1 << 30;
    let mut seconds: Option<f64> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--netns" => netns = Some(val()?),
            "--cgroup" => cgroup = Some(val()?),
            "--cpu" => cpu = Some(val()?.parse()?),
            "--mode" => {
                let m = val()?;
                mode = [
                    Mode::Connect,
                    Mode::Crr,
                    Mode::Bulk,
                    Mode::Udp,
                    Mode::UdpConn,
                    Mode::Miss,
                ]
                .into_iter()
                .find(|x| x.name() == m)
                .with_context(|| format!("unknown mode {m}"))?;
            }
            "--pick" => {
                pick = match val()?.as_str() {
                    "random" => Pick::Random,
                    "first" => Pick::First,
                    "last" => Pick::Last,
                    p => bail!("unknown pick {p}"),
                }
            }
            "--base" => base = val()?.parse()?,
            "--targets" => targets = val()?.parse()?,
            "--port" => port = val()?.parse()?,
            "--port-span" => port_span = val()?.parse()?,
            "--warmup" => warmup = val()?.parse()?,
            "--iters" => iters = val()?.parse()?,
            "--max-failures" => max_failures = val()?.parse()?,
            "--bytes" => bytes = val()?.parse()?,
            // Stop measuring after this long (while a profiler watches).
            "--seconds" => seconds = Some(val()?.parse()?),
            other => bail!("unknown argument {other}"),
        }
    }
    if targets == 0 {
        bail!("--targets must be at least 1");
    }
    if port_span == 0 || u32::from(port) + port_span > 65_536 {
        bail!("--port-span must be at least 1 and keep the ports below 65536");
    }
    if let Some(cg) = cgroup {
        lb_tests::sys::join_cgroup(Path::new(&cg))?;
    }
    if let Some(ns) = netns {
        lb_tests::sys::enter_netns(&ns)?;
    }
    if let Some(cpu) = cpu {
        // SAFETY: a zeroed cpu_set_t is valid; cpu < 1024.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
            }
        }
    }
    let base = u32::from(base);
    let mut rng = (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15 ^ now_ns();
    let mut next = |of: u32| -> u32 {
        match pick {
            Pick::First => 0,
            Pick::Last => of - 1,
            Pick::Random => {
                // xorshift64*
                rng ^= rng >> 12;
                rng ^= rng << 25;
                rng ^= rng >> 27;
                ((rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % u64::from(of)) as u32
            }
        }
    };
    let mut next_target = || -> (u32, u16) {
        let ip = base + next(targets);
        let port = if port_span > 1 {
            port + next(port_span) as u16
        } else {
            port
        };
        (ip, port)
    };
    let mut samples: Vec<u64> = Vec::with_capacity(iters.min(1 << 24) as usize);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures = 0u64;
    let started = now_ns();
    let mut done = 0u64;
    let mut bulk_buf = Vec::new();
    if mode == Mode::Bulk {
        bulk_buf = vec![0x5a_u8; 256 << 10];
    }
    // The long-lived socket of `udp` mode.
    let udp_fd = if mode == Mode::Udp {
        udp_socket().map_err(|e| anyhow::anyhow!("udp socket: errno {e}"))?
    } else {
        -1
    };
    let mut measure_start = None;
    while done < warmup + iters {
        if done == warmup && measure_start.is_none() {
            measure_start = Some(now_ns());
        }
        if let (Some(s), Some(limit)) = (measure_start, seconds)
            && (now_ns() - s) as f64 / 1e9 >= limit
        {
            break;
        }
        let (ip, port) = next_target();
        let t0 = now_ns();
        let r = match mode {
            Mode::Connect | Mode::Crr | Mode::UdpConn | Mode::Miss => once(ip, port, mode),
            Mode::Bulk => bulk(ip, port, &bulk_buf, bytes),
            Mode::Udp => udp_once(udp_fd, ip, port),
        };
        let t1 = now_ns();
        match r {
            Ok(()) => {
                if done >= warmup {
                    samples.push(t1 - t0);
                }
                done += 1;
            }
            Err(errno) => {
                failures += 1;
                *errors.entry(lb_tests::sys::errno_name(errno)).or_default() += 1;
                if failures > max_failures {
                    break;
                }
            }
        }
    }
    let elapsed_s = (now_ns() - started) as f64 / 1e9;
    samples.sort_unstable();
    let q = |p: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let i = (p * (samples.len() - 1) as f64).round() as usize;
        samples[i] as f64 / 1000.0
    };
    let mean_us = if samples.is_empty() {
        0.0
    } else {
        samples.iter().sum::<u64>() as f64 / samples.len() as f64 / 1000.0
    };
    let gbit_per_s = if mode == Mode::Bulk && !samples.is_empty() {
        bytes as f64 * 8.0 / samples[samples.len() / 2] as f64
    } else {
        0.0
    };
    let report = Report {
        mode: mode.name().into(),
        pick: match pick {
            Pick::Random => "random",
            Pick::First => "first",
            Pick::Last => "last",
        }
        .into(),
        targets,
        warmup,
        iters: samples.len() as u64,
        failures,
        errors,
        p50_us: q(0.50),
        p90_us: q(0.90),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: samples.last().map_or(0.0, |&m| m as f64 / 1000.0),
        mean_us,
        conn_per_s: if mean_us > 0.0 { 1e6 / mean_us } else { 0.0 },
        elapsed_s,
        bytes: if mode == Mode::Bulk { bytes } else { 0 },
        gbit_per_s,
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &report)?;
    writeln!(out)?;
    if failures > max_failures {
        bail!(
            "more than {max_failures} failed connects: {:?}",
            report.errors
        );
    }
    Ok(())
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One timed iteration; the errno on failure.
fn once(ip: u32, port: u16, mode: Mode) -> Result<(), i32> {
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    // SAFETY: plain socket calls on an fd owned by this function, closed on
    // every path.
    unsafe {
        let ty = if matches!(mode, Mode::UdpConn | Mode::Miss) {
            libc::SOCK_DGRAM
        } else {
            libc::SOCK_STREAM
        };
        let fd = libc::socket(libc::AF_INET, ty | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(errno());
        }
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as u32,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        );
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: ip.to_be() },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        let mut result = if rc == 0 { Ok(()) } else { Err(errno()) };
        if result.is_ok() && mode == Mode::Crr {
            let b = [b'x'];
            let mut r = [0u8; 1];
            if libc::write(fd, b.as_ptr().cast(), 1) != 1 {
                result = Err(errno());
            } else {
                let n = libc::read(fd, r.as_mut_ptr().cast(), 1);
                if n != 1 {
                    result = Err(if n == 0 { libc::ECONNRESET } else { errno() });
                }
            }
        }
        if result.is_ok() && mode == Mode::UdpConn {
            let b = [b'q'; UDP_PAYLOAD];
            let mut r = [0u8; 64];
            if libc::send(fd, b.as_ptr().cast(), b.len(), 0) != b.len() as isize {
                result = Err(errno());
            } else {
                let n = libc::recv(fd, r.as_mut_ptr().cast(), r.len(), 0);
                if n != b.len() as isize {
                    result = Err(if n >= 0 { libc::EMSGSIZE } else { errno() });
                }
            }
        }
        libc::close(fd);
        result
    }
}

/// Bytes of a UDP request (and of its echo).
const UDP_PAYLOAD: usize = 32;

/// Sets the 1 s send and receive timeouts of the module doc.
unsafe fn timeouts(fd: i32) {
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    for opt in [libc::SO_SNDTIMEO, libc::SO_RCVTIMEO] {
        // SAFETY: tv is a valid timeval for the call's duration.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as u32,
            );
        }
    }
}

fn sockaddr(ip: u32, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: ip.to_be() },
        sin_zero: [0; 8],
    }
}

/// The long-lived socket of `udp` mode.
fn udp_socket() -> Result<i32, i32> {
    // SAFETY: plain socket call; the fd lives until the process exits.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        timeouts(fd);
        Ok(fd)
    }
}

/// One unconnected request/response on `fd`. A stale echo (from a request
/// that timed out earlier) is skipped by its sequence number.
fn udp_once(fd: i32, ip: u32, port: u16) -> Result<(), i32> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut b = [b'u'; UDP_PAYLOAD];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    let addr = sockaddr(ip, port);
    // SAFETY: buffers and addresses outlive the calls.
    unsafe {
        let sent = libc::sendto(
            fd,
            b.as_ptr().cast(),
            b.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        if sent != b.len() as isize {
            return Err(errno());
        }
        let mut r = [0u8; 64];
        loop {
            let n = libc::recvfrom(
                fd,
                r.as_mut_ptr().cast(),
                r.len(),
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            if n < 0 {
                return Err(errno());
            }
            if n as usize == UDP_PAYLOAD && r[..8] == b[..8] {
                return Ok(());
            }
        }
    }
}

/// One bulk stream: connect, write `total` bytes, half-close, and wait for
/// the sink's count of what arrived.
fn bulk(ip: u32, port: u16, buf: &[u8], total: u64) -> Result<(), i32> {
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    // SAFETY: plain socket calls on an fd owned by this function, closed on
    // every path.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(errno());
        }
        timeouts(fd);
        let addr = sockaddr(ip, port);
        let run = || -> Result<(), i32> {
            if libc::connect(
                fd,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            ) != 0
            {
                return Err(errno());
            }
            let mut left = total;
            while left > 0 {
                let len = (buf.len() as u64).min(left) as usize;
                let n = libc::write(fd, buf.as_ptr().cast(), len);
                if n <= 0 {
                    return Err(errno());
                }
                left -= n as u64;
            }
            libc::shutdown(fd, libc::SHUT_WR);
            let mut got = [0u8; 8];
            let mut have = 0;
            while have < got.len() {
                let n = libc::read(fd, got[have..].as_mut_ptr().cast(), got.len() - have);
                if n <= 0 {
                    return Err(if n == 0 { libc::ECONNRESET } else { errno() });
                }
                have += n as usize;
            }
            if u64::from_le_bytes(got) != total {
                return Err(libc::EIO);
            }
            Ok(())
        };
        let r = run();
        libc::close(fd);
        r
    }
}
