//! The client "pod": joins a cgroup (where the connect4 program is attached)
//! and a network namespace itself, then connects to a target over and over
//! and reports, as JSON, which backend answered each connect and every errno.
//!
//! It enters the namespace with setns(2) instead of `ip netns exec`, which
//! would remount /sys and hide the cgroup2 mount.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{ClientReport, sys};

fn main() -> anyhow::Result<()> {
    let mut netns = None;
    let mut cgroup = None;
    let mut target: Option<SocketAddr> = None;
    let mut count: Option<u64> = None;
    let mut duration = None;
    let mut udp = false;
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
            "--udp" => udp = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    // Cgroup first: its path is only visible in our own mount namespace view.
    if let Some(cg) = cgroup {
        sys::join_cgroup(std::path::Path::new(&cg))?;
    }
    if let Some(ns) = netns {
        sys::enter_netns(&ns)?;
    }
    let target = target.context("--target ADDR is required")?;
    let mut report = ClientReport::default();
    let start = Instant::now();
    loop {
        if let Some(n) = count {
            if report.attempts >= n {
                break;
            }
        } else if let Some(d) = duration {
            if start.elapsed() >= d {
                break;
            }
        } else if report.attempts >= 1 {
            break;
        }
        report.attempts += 1;
        let answer = if udp {
            request_udp(target)
        } else {
            request(target)
        };
        match answer {
            Ok(name) => *report.backends.entry(name).or_default() += 1,
            Err(e) => {
                let errno = e
                    .raw_os_error()
                    .map_or_else(|| e.kind().to_string(), sys::errno_name);
                *report.errors.entry(errno).or_default() += 1;
            }
        }
    }
    report.elapsed_ms = start.elapsed().as_millis() as u64;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// One connect + HTTP GET; the backend's name is the response body.
fn request(target: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    if body.is_empty() {
        return Err(std::io::Error::other("empty response"));
    }
    Ok(body.to_owned())
}

/// One connected UDP socket: connect (where connect4 rewrites), one datagram
/// out, the backend's name back.
fn request_udp(target: SocketAddr) -> std::io::Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(target)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.send(b"ping")?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf)?;
    let name = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
    if name.is_empty() {
        return Err(std::io::Error::other("empty reply"));
    }
    Ok(name)
}
