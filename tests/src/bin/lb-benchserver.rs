//! The benchmark's backend: one epoll thread that accepts, echoes one byte
//! per read and closes on EOF or error (netperf TCP_CRR's server side).
//! Bound to `0.0.0.0:PORT` in its namespace, so it answers on every pod IP
//! of that namespace. Pinned with `--cpu`; `cargo xtask bench` re-pins it
//! (sched_setaffinity on its pid) between `connect` and `crr` runs.
use std::io::Write as _;

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let mut netns = None;
    let mut port: u16 = 8080;
    let mut cpu: Option<usize> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--netns" => netns = args.next(),
            "--port" => port = args.next().context("--port P")?.parse()?,
            "--cpu" => cpu = Some(args.next().context("--cpu N")?.parse()?),
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
        let lfd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        check(lfd, "socket")?;
        let one: libc::c_int = 1;
        setopt(lfd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)?;
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        check(
            libc::bind(
                lfd,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            ),
            "bind",
        )?;
        check(libc::listen(lfd, 4096), "listen")?;
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        check(ep, "epoll_create1")?;
        add(ep, lfd)?;
        println!("listening on 0.0.0.0:{port}");
        std::io::stdout().flush()?;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut buf = [0u8; 512];
        loop {
            let n = libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1);
            if n < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                bail!("epoll_wait: {}", std::io::Error::last_os_error());
            }
            for ev in &events[..n as usize] {
                let fd = ev.u64 as i32;
                if fd == lfd {
                    loop {
                        let c = libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        );
                        if c < 0 {
                            break;
                        }
                        let _ = setopt(c, libc::IPPROTO_TCP, libc::TCP_NODELAY, &one);
                        if add(ep, c).is_err() {
                            libc::close(c);
                        }
                    }
                    continue;
                }
                loop {
                    let r = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                    if r > 0 {
                        let _ = libc::write(fd, buf.as_ptr().cast(), 1);
                        continue;
                    }
                    if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
                    {
                        break;
                    }
                    // EOF, RST or another error: done with this connection
                    // (close also removes it from the epoll set).
                    libc::close(fd);
                    break;
                }
            }
        }
    }
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

unsafe fn add(ep: i32, fd: i32) -> anyhow::Result<()> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
        u64: fd as u64,
    };
    // SAFETY: ep and fd are open descriptors; ev lives across the call.
    check(
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) },
        "epoll_ctl",
    )
}
