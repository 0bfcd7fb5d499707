//! The benchmark's client "pod": one thread, one connection at a time
//! (netperf-like), timing `socket()` → `connect()` [→ write 1 byte → read
//! 1 byte] → `close()` with CLOCK_MONOTONIC. Every socket closes with RST
//! (SO_LINGER {1, 0}) so TIME_WAIT never piles up, and has 1 s send and
//! receive timeouts so a lost connect fails fast. Prints one JSON object.
//!
//! Targets: `--base IP --targets N --port P --pick random|first|last`
//! connects to `base + i` for i in 0..N (a uniformly random i per
//! connection, or the first / last). It joins `--cgroup` before `--netns`
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
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Connect,
    Crr,
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
    let mut warmup: u64 = 2000;
    let mut iters: u64 = 20_000;
    let mut max_failures: u64 = 20;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--netns" => netns = Some(val()?),
            "--cgroup" => cgroup = Some(val()?),
            "--cpu" => cpu = Some(val()?.parse()?),
            "--mode" => {
                mode = match val()?.as_str() {
                    "connect" => Mode::Connect,
                    "crr" => Mode::Crr,
                    m => bail!("unknown mode {m}"),
                }
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
            "--warmup" => warmup = val()?.parse()?,
            "--iters" => iters = val()?.parse()?,
            "--max-failures" => max_failures = val()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    if targets == 0 {
        bail!("--targets must be at least 1");
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
    let mut next_target = || -> u32 {
        let i = match pick {
            Pick::First => 0,
            Pick::Last => targets - 1,
            Pick::Random => {
                // xorshift64*
                rng ^= rng >> 12;
                rng ^= rng << 25;
                rng ^= rng >> 27;
                ((rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % u64::from(targets)) as u32
            }
        };
        base + i
    };
    let mut samples: Vec<u64> = Vec::with_capacity(iters as usize);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures = 0u64;
    let started = now_ns();
    let mut done = 0u64;
    while done < warmup + iters {
        let ip = next_target();
        let t0 = now_ns();
        let r = once(ip, port, mode);
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
    let report = Report {
        mode: match mode {
            Mode::Connect => "connect",
            Mode::Crr => "crr",
        }
        .into(),
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
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
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
        libc::close(fd);
        result
    }
}
