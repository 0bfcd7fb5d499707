//! `lb-agent trace`: the programs' translation events, read from the
//! pinned ring buffer while this process holds the trace lease
//! (`lb_common::trace`). The lease, not a count of tracers, switches
//! tracing on: renewed every [`RENEW`] while a tracer runs and cleared
//! when it stops, it also expires on its own when a tracer is killed
//! outright, so no crashed tracer leaves the programs paying for events.
//!
//! One tracer at a time: a ring buffer has one consumer position, so two
//! readers would each see part of the events. The tracer holds an
//! exclusive `flock` on a directory in the pin directory
//! ([`bpf::TRACE_LOCK`]) for its whole life, taken before it touches the
//! lease: of two tracers started at the same instant exactly one gets it
//! (a read-then-write of the lease could let both in), and the kernel
//! drops it when a tracer dies, however it dies. The lease a tracer killed
//! outright leaves runs out on its own, or the next tracer takes it over.
use std::{
    fs,
    io::ErrorKind,
    net::SocketAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use aya::maps::{Array, HashMap, MapData, RingBuf};
use lb_common::{PROTO_TCP, ServiceMeta, TraceEvent, maps, trace};
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
    time::{ClockId, clock_gettime},
};
use serde::Serialize;

use crate::datapath::{DatapathError, bpf, decode_meta, ip_from_be};

/// How often a running tracer renews its lease (well inside
/// `trace::LEASE_NS`).
pub const RENEW: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(
        "{dir}: no {map} pin (an installation made before `trace` existed: restart the agent to add it)"
    )]
    NoTraceMaps { dir: String, map: &'static str },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("{op} {map}: {source}")]
    Map {
        op: &'static str,
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("reading the monotonic clock: {0}")]
    Clock(nix::Error),
    #[error(
        "another lb-agent trace{} is reading {dir} (one tracer at a time: the events would be split between them)",
        pid.map_or_else(String::new, |p| format!(" (pid {p})"))
    )]
    Busy { dir: String, pid: Option<u32> },
    #[error("{path}: {message}")]
    Lock { path: String, message: String },
}

pub type Result<T, E = TraceError> = std::result::Result<T, E>;

fn map_err(op: &'static str, map: &'static str) -> impl Fn(aya::maps::MapError) -> TraceError {
    move |source| TraceError::Map { op, map, source }
}

/// Which events to show; every event if empty. Matching is done here,
/// not in the programs: while tracing, each translation is an event.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// (namespace, name) of a Service.
    pub service: Option<(String, String)>,
    /// A frontend address and port.
    pub frontend: Option<SocketAddr>,
}

impl Filter {
    pub fn matches(&self, event: &Event) -> bool {
        let service = self.service.as_ref().is_none_or(|(ns, name)| {
            event
                .service
                .as_ref()
                .is_some_and(|s| s.namespace == *ns && s.name == *name)
        });
        let frontend = self.frontend.is_none_or(|f| f == event.frontend);
        service && frontend
    }
}

/// One decoded event, as printed (`-o json`: one object a line).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Unix time, seconds.
    pub time: f64,
    pub hook: &'static str,
    pub protocol: &'static str,
    pub cookie: u64,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub frontend: SocketAddr,
    /// `None` when refused.
    pub backend: Option<SocketAddr>,
    /// `translated`, `refused` (no endpoint) or `refused-no-slot`.
    pub outcome: &'static str,
    pub svc_id: u32,
    /// From `LB_SVC_META` when the event is read; `None` if the id has no
    /// name (any more).
    pub service: Option<ServiceName>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
    /// The port's name; empty for an unnamed port.
    pub port: String,
}

impl Event {
    /// Decodes `raw`; `clock_offset_ns` turns the event's monotonic time
    /// into Unix time.
    pub fn decode(raw: &TraceEvent, clock_offset_ns: i128, service: Option<ServiceName>) -> Self {
        let addr =
            |a: &lb_common::Addr, port: u16| SocketAddr::new(ip_from_be(a), u16::from_be(port));
        let unix_ns = i128::from(raw.time_ns) + clock_offset_ns;
        Self {
            time: unix_ns as f64 / 1e9,
            hook: match raw.hook {
                trace::HOOK_CONNECT4 => "connect4",
                trace::HOOK_CONNECT6 => "connect6",
                trace::HOOK_SENDMSG4 => "sendmsg4",
                trace::HOOK_SENDMSG6 => "sendmsg6",
                _ => "unknown",
            },
            protocol: if raw.proto == PROTO_TCP { "TCP" } else { "UDP" },
            cookie: raw.cookie,
            cgroup_id: raw.cgroup_id,
            netns_cookie: raw.netns,
            frontend: addr(&raw.frontend, raw.frontend_port),
            backend: (raw.outcome == trace::TRANSLATED)
                .then(|| addr(&raw.backend, raw.backend_port)),
            outcome: match raw.outcome {
                trace::TRANSLATED => "translated",
                trace::REFUSED => "refused",
                _ => "refused-no-slot",
            },
            svc_id: raw.svc_id,
            service,
        }
    }

    /// One line: `HH:MM:SS.ffffff hook cookie=… cgroup=… netns=…
    /// ns/name[:port] proto frontend -> backend` (or `refused`), in UTC.
    pub fn line(&self) -> String {
        let time = jiff::Timestamp::from_nanosecond((self.time * 1e9) as i128).map_or_else(
            |_| self.time.to_string(),
            |t| t.strftime("%H:%M:%S%.6f").to_string(),
        );
        let service = self.service.as_ref().map_or_else(
            || format!("svc#{}", self.svc_id),
            |s| {
                if s.port.is_empty() {
                    format!("{}/{}", s.namespace, s.name)
                } else {
                    format!("{}/{}:{}", s.namespace, s.name, s.port)
                }
            },
        );
        let to = match self.backend {
            Some(b) => format!("-> {b}"),
            None => self.outcome.to_owned(),
        };
        format!(
            "{time} {} cookie={} cgroup={} netns={} {service} {} {} {to}",
            self.hook, self.cookie, self.cgroup_id, self.netns_cookie, self.protocol, self.frontend
        )
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the programs' `bpf_ktime_get_*ns`.
fn monotonic_ns() -> Result<u64> {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).map_err(TraceError::Clock)?;
    Ok(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// An open tracer: its claim on the installation, the lease it holds,
/// the ring it reads, the names.
pub struct Tracer {
    /// Held from [`Tracer::open`] until the tracer is dropped.
    _claim: Flock<fs::File>,
    lease: Array<MapData, u64>,
    /// The last lease this tracer wrote (0: none).
    written: u64,
    ring: Option<RingBuf<MapData>>,
    meta: HashMap<MapData, u32, ServiceMeta>,
    /// Unix time minus monotonic time, in nanoseconds.
    clock_offset_ns: i128,
}

fn open_pin(dir: &Path, map: &'static str) -> Result<MapData> {
    MapData::from_pin(dir.join(map)).map_err(|_| TraceError::NoTraceMaps {
        dir: dir.display().to_string(),
        map,
    })
}

/// The lease value in `LB_TRACE` (0: tracing is off).
pub fn lease(dir: &Path) -> Result<u64> {
    let map: Array<MapData, u64> =
        Array::try_from(aya::maps::Map::Array(open_pin(dir, maps::TRACE)?))
            .map_err(map_err("open", maps::TRACE))?;
    map.get(&0, 0).map_err(map_err("read", maps::TRACE))
}

/// Whether a lease value turns tracing on now.
pub fn lease_live(lease: u64) -> Result<bool> {
    Ok(lease != 0 && monotonic_ns()? <= lease)
}

/// The tracer's claim on the installation in `dir`: the exclusive lock on
/// its [`bpf::TRACE_LOCK`] directory (made on first use), or `Busy`.
fn claim(dir: &Path) -> Result<Flock<fs::File>> {
    let path = dir.join(bpf::TRACE_LOCK);
    let fail = |message: String| TraceError::Lock {
        path: path.display().to_string(),
        message,
    };
    match fs::create_dir(&path) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => {
            return Err(fail(format!("creating the tracers' lock: {e}")));
        }
        _ => {}
    }
    let file =
        fs::File::open(&path).map_err(|e| fail(format!("opening the tracers' lock: {e}")))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, Errno::EWOULDBLOCK)) => Err(TraceError::Busy {
            dir: dir.display().to_string(),
            pid: bpf::lock_holder(&path),
        }),
        Err((_, e)) => Err(fail(format!("locking the tracers' lock: {e}"))),
    }
}

/// The pid of the running tracer of the installation in `dir`, if any.
pub fn tracer_pid(dir: &Path) -> Option<u32> {
    bpf::lock_holder(&dir.join(bpf::TRACE_LOCK))
}

impl Tracer {
    /// Claims the installation in `dir` for this tracer (`Busy` if another
    /// one has it) and opens its pins; tracing is still off.
    pub fn open(dir: &Path) -> Result<Self> {
        // The pins first: an installation without them gets no lock dir.
        open_pin(dir, maps::TRACE)?;
        let claim = claim(dir)?;
        let lease = Array::try_from(aya::maps::Map::Array(open_pin(dir, maps::TRACE)?))
            .map_err(map_err("open", maps::TRACE))?;
        let ring = RingBuf::try_from(aya::maps::Map::RingBuf(open_pin(dir, maps::TRACE_RING)?))
            .map_err(map_err("open", maps::TRACE_RING))?;
        let meta = HashMap::try_from(aya::maps::Map::HashMap(open_pin(dir, maps::SERVICE_META)?))
            .map_err(map_err("open", maps::SERVICE_META))?;
        let unix = crate::datapath::bpf::unix_ns(SystemTime::now());
        let clock_offset_ns = i128::from(unix) - i128::from(monotonic_ns()?);
        Ok(Self {
            _claim: claim,
            lease,
            written: 0,
            ring: Some(ring),
            meta,
            clock_offset_ns,
        })
    }

    /// The ring buffer, to poll: taken once, then handed to [`Self::drain`].
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    /// Turns tracing on, or keeps it on: the lease runs until
    /// `trace::LEASE_NS` from now. The claim makes this tracer the only
    /// writer: a lease found live is one a killed tracer left, taken over.
    pub fn renew(&mut self) -> Result<()> {
        let until = monotonic_ns()? + trace::LEASE_NS;
        self.lease
            .set(0, until, 0)
            .map_err(map_err("write", maps::TRACE))?;
        self.written = until;
        Ok(())
    }

    /// Turns tracing off (this tracer still holds the claim, so the
    /// lease is its own).
    pub fn stop(&mut self) -> Result<()> {
        self.lease
            .set(0, 0, 0)
            .map_err(map_err("write", maps::TRACE))?;
        self.written = 0;
        Ok(())
    }

    /// Every event waiting in `ring`, decoded and named, that `filter`
    /// lets through.
    pub fn drain(&self, ring: &mut RingBuf<MapData>, filter: &Filter) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() < size_of::<TraceEvent>() {
                continue;
            }
            // SAFETY: the programs write whole `TraceEvent`s (checked
            // length); read unaligned, the ring's alignment is 8 anyway.
            let raw: TraceEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let service = self.meta.get(&raw.svc_id, 0).ok().map(|m| {
                let s = decode_meta(&m);
                ServiceName {
                    namespace: s.namespace.to_string(),
                    name: s.name.to_string(),
                    port: s.port_name.to_string(),
                }
            });
            let event = Event::decode(&raw, self.clock_offset_ns, service);
            if filter.matches(&event) {
                out.push(event);
            }
        }
        out
    }
}

impl Drop for Tracer {
    /// Off on every exit path that unwinds (errors, panics); Ctrl-C and
    /// SIGTERM end the read loop and get here too.
    fn drop(&mut self) {
        if self.written != 0 {
            let _ = self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::{PROTO_UDP, v4_mapped};

    use super::*;

    fn raw(outcome: u8) -> TraceEvent {
        let ip = |a, b, c, d| u32::from_ne_bytes([a, b, c, d]);
        TraceEvent {
            time_ns: 1_500_000_000,
            cookie: 7,
            cgroup_id: 42,
            netns: 9,
            frontend: v4_mapped(ip(10, 96, 0, 10)),
            backend: v4_mapped(ip(10, 244, 1, 11)),
            frontend_port: 80u16.to_be(),
            backend_port: 8080u16.to_be(),
            svc_id: 3,
            hook: trace::HOOK_CONNECT4,
            proto: PROTO_TCP,
            outcome,
            _pad: [0; 5],
        }
    }

    fn web() -> Option<ServiceName> {
        Some(ServiceName {
            namespace: "default".into(),
            name: "web".into(),
            port: String::new(),
        })
    }

    #[test]
    fn decodes_a_translation_with_unix_time_and_ipv4_addresses() {
        let e = Event::decode(&raw(trace::TRANSLATED), 3_600_000_000_000, web());
        assert_eq!(
            e.frontend,
            SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10), 80))
        );
        assert_eq!(
            e.backend,
            Some(SocketAddr::from((Ipv4Addr::new(10, 244, 1, 11), 8080)))
        );
        assert_eq!(
            (e.hook, e.protocol, e.outcome),
            ("connect4", "TCP", "translated")
        );
        assert!((e.time - 3601.5).abs() < 1e-6);
        assert_eq!(
            e.line(),
            "01:00:01.500000 connect4 cookie=7 cgroup=42 netns=9 default/web TCP 10.96.0.10:80 -> 10.244.1.11:8080"
        );
    }

    #[test]
    fn a_refusal_has_no_backend() {
        let mut r = raw(trace::REFUSED);
        r.proto = PROTO_UDP;
        r.hook = trace::HOOK_SENDMSG4;
        let e = Event::decode(&r, 0, None);
        assert_eq!((e.backend, e.outcome), (None, "refused"));
        assert!(
            e.line().ends_with("svc#3 UDP 10.96.0.10:80 refused"),
            "{}",
            e.line()
        );
    }

    #[test]
    fn filters_by_service_and_frontend() {
        let e = Event::decode(&raw(trace::TRANSLATED), 0, web());
        let svc = |ns: &str, n: &str| Some((ns.to_owned(), n.to_owned()));
        assert!(Filter::default().matches(&e));
        assert!(
            Filter {
                service: svc("default", "web"),
                frontend: None
            }
            .matches(&e)
        );
        assert!(
            !Filter {
                service: svc("other", "web"),
                frontend: None
            }
            .matches(&e)
        );
        assert!(
            Filter {
                service: None,
                frontend: Some(e.frontend)
            }
            .matches(&e)
        );
        let other = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10), 81));
        assert!(
            !Filter {
                service: None,
                frontend: Some(other)
            }
            .matches(&e)
        );
        let unnamed = Event::decode(&raw(trace::TRANSLATED), 0, None);
        assert!(
            !Filter {
                service: svc("default", "web"),
                frontend: None
            }
            .matches(&unnamed)
        );
    }
}
