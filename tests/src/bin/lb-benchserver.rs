//! The benchmark's backend: one epoll thread serving three things, all in
//! its namespace:
//! - `--port` (TCP, `0.0.0.0`): accept, echo one byte per read, close on
//!   EOF or error (netperf TCP_CRR's server side);
//! - `--sink-port` (TCP, `0.0.0.0`): read and discard a bulk stream; on EOF
//!   answer the byte count (8 bytes, little endian) and close, so the
//!   client's clock stops only when every byte has arrived;
//! - `--udp-port` on each of `--udp-addrs`: echo every datagram. One socket
//!   per pod IP, so a reply leaves from the address the request was sent to
//!   (a connected client, and conntrack's reverse NAT, need that).
//!
//! Pinned with `--cpu`; `cargo xtask bench` re-pins it (sched_setaffinity on
//! its pid) between runs.
use std::{collections::HashMap, io::Write as _, net::Ipv4Addr};

use anyhow::{Context as _, bail};

/// What an epoll entry is (high half of its `u64`; the fd is the low half).
const ECHO_LISTEN: u64 = 0;
const SINK_LISTEN: u64 = 1;
const ECHO_CONN: u64 = 2;
const SINK_CONN: u64 = 3;
const UDP: u64 = 4;

fn main() -> anyhow::Result<()> {
    let mut netns = None;
    let mut port: u16 = 8080;
    let mut sink_port: Option<u16> = None;
    let mut udp_port: Option<u16> = None;
    let mut udp_addrs: Vec<Ipv4Addr> = Vec::new();
    let mut cpu: Option<usize> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--netns" => netns = Some(val()?),
            "--port" => port = val()?.parse()?,
            "--sink-port" => sink_port = Some(val()?.parse()?),
            "--udp-port" => udp_port = Some(val()?.parse()?),
            "--udp-addrs" => {
                for s in val()?.split(',') {
                    udp_addrs.push(s.parse().with_context(|| format!("--udp-addrs {s}"))?);
                }
            }
            "--cpu" => cpu = Some(val()?.parse()?),
            other => bail!("unknown argument {other}"),
        }
    }
    if let Some(ns) = netns {
        lb_tests::sys::enter_netns(&ns)?;
    }
    if let Some(cpu) = cpu {
        pin(cpu)?;
    }
    // SAFETY: plain socket calls on fds this function owns; every return
    // value is checked.
    unsafe {
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        check(ep, "epoll_create1")?;
        add(ep, listener(port)?, ECHO_LISTEN)?;
        if let Some(p) = sink_port {
            add(ep, listener(p)?, SINK_LISTEN)?;
        }
        if let Some(p) = udp_port {
            for a in &udp_addrs {
                add(ep, udp_socket(*a, p)?, UDP)?;
            }
        }
        println!("listening on 0.0.0.0:{port}");
        std::io::stdout().flush()?;
        let one: libc::c_int = 1;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut buf = vec![0u8; 256 << 10];
        // Bytes received so far per sink connection.
        let mut sunk: HashMap<i32, u64> = HashMap::new();
        loop {
            let n = libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1);
            if n < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                bail!("epoll_wait: {}", std::io::Error::last_os_error());
            }
            for ev in &events[..n as usize] {
                let fd = (ev.u64 & 0xffff_ffff) as i32;
                let kind = ev.u64 >> 32;
                match kind {
                    ECHO_LISTEN | SINK_LISTEN => loop {
                        let c = libc::accept4(
                            fd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        );
                        if c < 0 {
                            break;
                        }
                        let _ = setopt(c, libc::IPPROTO_TCP, libc::TCP_NODELAY, &one);
                        let conn = if kind == ECHO_LISTEN {
                            ECHO_CONN
                        } else {
                            sunk.insert(c, 0);
                            SINK_CONN
                        };
                        if add(ep, c, conn).is_err() {
                            sunk.remove(&c);
                            libc::close(c);
                        }
                    },
                    UDP => loop {
                        let mut from: libc::sockaddr_in = std::mem::zeroed();
                        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                        let r = libc::recvfrom(
                            fd,
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            0,
                            (&raw mut from).cast(),
                            &mut len,
                        );
                        if r < 0 {
                            break;
                        }
                        libc::sendto(
                            fd,
                            buf.as_ptr().cast(),
                            r as usize,
                            0,
                            (&raw const from).cast(),
                            len,
                        );
                    },
                    _ => loop {
                        let sink = kind == SINK_CONN;
                        let want = if sink { buf.len() } else { 512 };
                        let r = libc::read(fd, buf.as_mut_ptr().cast(), want);
                        if r > 0 {
                            if sink {
                                *sunk.entry(fd).or_default() += r as u64;
                            } else {
                                let _ = libc::write(fd, buf.as_ptr().cast(), 1);
                            }
                            continue;
                        }
                        if r < 0
                            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
                        {
                            break;
                        }
                        if r == 0
                            && sink
                            && let Some(total) = sunk.get(&fd)
                        {
                            // A fresh socket's send buffer takes 8 bytes at once.
                            let b = total.to_le_bytes();
                            let _ = libc::write(fd, b.as_ptr().cast(), b.len());
                        }
                        // EOF, RST or another error: done with this connection
                        // (close also removes it from the epoll set).
                        sunk.remove(&fd);
                        libc::close(fd);
                        break;
                    },
                }
            }
        }
    }
}

/// A non-blocking TCP listener on `0.0.0.0:port`.
unsafe fn listener(port: u16) -> anyhow::Result<i32> {
    // SAFETY: plain socket calls on an fd this function owns.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        check(fd, "socket")?;
        let one: libc::c_int = 1;
        setopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)?;
        bind(fd, Ipv4Addr::UNSPECIFIED, port)?;
        check(libc::listen(fd, 4096), "listen")?;
        Ok(fd)
    }
}

/// A non-blocking UDP socket on `addr:port`. IP_FREEBIND: the bench
/// re-creates the node namespace (and with it these addresses) per datapath;
/// the binding outlives that and matches again once they are back.
unsafe fn udp_socket(addr: Ipv4Addr, port: u16) -> anyhow::Result<i32> {
    // SAFETY: plain socket calls on an fd this function owns.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        check(fd, "socket")?;
        let one: libc::c_int = 1;
        setopt(fd, libc::SOL_IP, libc::IP_FREEBIND, &one)?;
        bind(fd, addr, port)?;
        Ok(fd)
    }
}

unsafe fn bind(fd: i32, ip: Ipv4Addr, port: u16) -> anyhow::Result<()> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: addr is a valid sockaddr_in for the call's duration.
    let rc = unsafe {
        libc::bind(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    check(rc, &format!("bind {ip}:{port}"))
}

fn pin(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays in bounds for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        check(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            "sched_setaffinity",
        )?;
    }
    Ok(())
}

fn check(rc: i32, what: &str) -> anyhow::Result<()> {
    if rc < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

unsafe fn setopt(fd: i32, level: i32, name: i32, v: &libc::c_int) -> anyhow::Result<()> {
    // SAFETY: v points at a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    check(rc, "setsockopt")
}

unsafe fn add(ep: i32, fd: i32, kind: u64) -> anyhow::Result<()> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
        u64: (kind << 32) | fd as u32 as u64,
    };
    // SAFETY: ep and fd are open descriptors; ev lives across the call.
    check(
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) },
        "epoll_ctl",
    )
}
