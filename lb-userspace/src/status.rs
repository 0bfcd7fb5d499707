//! `lb-agent status`: what is installed in a pin directory and how it is
//! doing, read from the pins and the kernel alone (with or without a
//! running agent). The running agent is the process holding the pin
//! directory's `flock` (the kernel drops it when the process dies, so a
//! crashed agent never shows as running); its start and last sync are in
//! the pinned `LB_AGENT`, which it rewrites after every sync: no port or
//! address to agree on, and readable while `--health-addr none`. The
//! record also says where it serves `/metrics` (the bound address).
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapType};
use serde::Serialize;

use crate::{
    datapath::{
        Datapath as _,
        bpf::{self, BpfDatapath, MAP_LAYOUTS, PROGRAMS},
        ip_from_be,
        sockdiag::SockDiag,
        sys,
    },
    trace,
};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub bpffs: PathBuf,
    /// The directory exists and holds the connect4 link's pin.
    pub installed: bool,
    pub agent: AgentStatus,
    pub programs: Vec<ProgramStatus>,
    pub maps: Vec<MapStatus>,
    pub features: Features,
    /// A tracer holds a live lease (`lb-agent trace` is running).
    pub tracing: bool,
    /// The running tracer (the holder of the tracers' lock).
    pub tracer_pid: Option<u32>,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub running: bool,
    /// The running agent (the pin directory's lock holder).
    pub pid: Option<u32>,
    /// Unix seconds, from `LB_AGENT` (the last agent's if none runs).
    pub started: Option<f64>,
    pub last_sync: Option<f64>,
    pub syncs: Option<u64>,
    /// Unix seconds when the first sync with every source complete was
    /// written (`None`: not yet).
    pub initial_sync: Option<f64>,
    /// Where it serves `/metrics` and the probes (the bound address, so
    /// the port `--health-addr HOST:0` was given); `None`: not serving.
    pub health_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgramStatus {
    pub program: &'static str,
    /// The link's pin in the directory.
    pub pin: &'static str,
    pub pinned: bool,
    /// The pinned link is attached to a cgroup.
    pub attached: bool,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
    pub cgroup_id: Option<u64>,
    /// The cgroup's directory, found by its id under the cgroup2 mount.
    pub cgroup: Option<PathBuf>,
    /// The cgroup is the host's cgroup2 root: every process is translated.
    pub host_root: Option<bool>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MapStatus {
    pub map: &'static str,
    pub pinned: bool,
    #[serde(rename = "type")]
    pub map_type: Option<String>,
    /// In use, for maps whose entries come and go (as `list -o json`'s
    /// `maps`); `None` for fixed arrays (always full) and the ring buffer.
    pub entries: Option<u64>,
    /// `max_entries` (bytes for the ring buffer; for `LB_SVC_STATS` the
    /// ids it counts, as `/metrics` reports it).
    pub capacity: Option<u64>,
}

/// Kernel features the datapath uses, probed by loading (not attaching) a
/// minimal program, or by asking for what is missing.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Features {
    /// `cgroup/getpeername4` (5.8): `getpeername()` shows the frontend.
    pub getpeername_hooks: Probe,
    /// `bpf_get_netns_cookie` in sock_addr programs (5.7): session affinity.
    pub netns_cookies: Probe,
    /// `SOCK_DESTROY` over sock_diag (`CONFIG_INET_DIAG_DESTROY`): socket
    /// termination.
    pub sock_destroy: Probe,
    /// BPF ring buffers (5.8): `trace`.
    pub ring_buffer: Probe,
}

/// `yes`, `no`, or why the probe could not tell.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    Yes,
    No,
    Unknown(String),
}

impl Serialize for Probe {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Yes => f.write_str("yes"),
            Self::No => f.write_str("no"),
            Self::Unknown(why) => write!(f, "unknown ({why})"),
        }
    }
}

impl<E: std::fmt::Display> From<Result<bool, E>> for Probe {
    fn from(r: Result<bool, E>) -> Self {
        match r {
            Ok(true) => Self::Yes,
            Ok(false) => Self::No,
            Err(e) => Self::Unknown(e.to_string()),
        }
    }
}

pub fn probe_features() -> Features {
    let netns = sys::probe_sock_addr(
        sys::BPF_CGROUP_INET4_CONNECT,
        Some(sys::HELPER_GET_NETNS_COOKIE),
    );
    let destroy = match SockDiag::probe(Path::new("/")) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
        Err(e) => Err(e),
    };
    Features {
        getpeername_hooks: sys::probe_sock_addr(sys::BPF_CGROUP_INET4_GETPEERNAME, None).into(),
        netns_cookies: netns.into(),
        sock_destroy: destroy.into(),
        ring_buffer: aya::sys::is_map_supported(MapType::RingBuf).into(),
    }
}

/// Everything `status` shows about the installation in `dir`.
pub fn status(dir: &Path) -> Status {
    let root = bpf::cgroup2_root().ok();
    let programs: Vec<ProgramStatus> = PROGRAMS
        .iter()
        .map(|&(program, pin)| program_status(dir, program, pin, root.as_deref()))
        .collect();
    Status {
        bpffs: dir.to_owned(),
        installed: dir.join(bpf::LINK_PIN).exists(),
        agent: agent_status(dir),
        maps: map_status(dir),
        programs,
        features: probe_features(),
        tracing: trace::lease(dir)
            .and_then(trace::lease_live)
            .unwrap_or(false),
        tracer_pid: trace::tracer_pid(dir),
    }
}

fn agent_status(dir: &Path) -> AgentStatus {
    let pid = dir.exists().then(|| bpf::lock_holder(dir)).flatten();
    let state = BpfDatapath::open(dir)
        .ok()
        .and_then(|dp| dp.agent_state().ok().flatten());
    let secs = |ns: u64| (ns != 0).then(|| ns as f64 / 1e9);
    AgentStatus {
        running: pid.is_some(),
        pid,
        started: state.and_then(|s| secs(s.started_ns)),
        last_sync: state.and_then(|s| secs(s.last_sync_ns)),
        syncs: state.map(|s| s.syncs),
        initial_sync: state.and_then(|s| secs(s.initial_sync_ns)),
        health_addr: state.and_then(|s| {
            (s.health_port != 0).then(|| {
                std::net::SocketAddr::new(ip_from_be(&s.health_addr), u16::from_be(s.health_port))
            })
        }),
    }
}

fn program_status(
    dir: &Path,
    program: &'static str,
    pin: &'static str,
    root: Option<&Path>,
) -> ProgramStatus {
    let path = dir.join(pin);
    let info = sys::cgroup_link_info(&path).ok();
    let cgroup_id = info.map(|i| i.cgroup_id).filter(|&id| id != 0);
    let cgroup = cgroup_id
        .zip(root)
        .and_then(|(id, root)| cgroup_path(root, id));
    let host_root = cgroup_id
        .zip(root)
        .and_then(|(id, root)| fs::metadata(root).ok().map(|m| m.ino() == id));
    ProgramStatus {
        program,
        pin,
        pinned: path.exists(),
        attached: cgroup_id.is_some(),
        link_id: info.map(|i| i.link_id),
        program_id: info.map(|i| i.program_id),
        cgroup_id,
        cgroup,
        host_root,
    }
}

/// The directory under the cgroup2 mount `root` whose inode is `id` (a
/// cgroup v2 id is its directory's inode number); breadth first, the
/// attach point is usually near the top.
fn cgroup_path(root: &Path, id: u64) -> Option<PathBuf> {
    let mut queue = std::collections::VecDeque::from([root.to_owned()]);
    while let Some(dir) = queue.pop_front() {
        if fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(entry.path());
            }
        }
    }
    None
}

fn map_status(dir: &Path) -> Vec<MapStatus> {
    // Entries of the maps whose fill `list` and `/metrics` report.
    let fill = BpfDatapath::open(dir)
        .ok()
        .and_then(|dp| {
            let snap = dp.snapshot().ok()?;
            bpf::map_fill(dir, &dp, &snap).ok()
        })
        .unwrap_or_default();
    MAP_LAYOUTS
        .iter()
        .map(|&(map, ..)| {
            let info = MapData::from_pin(dir.join(map))
                .ok()
                .and_then(|d| d.info().ok());
            let filled = fill.iter().find(|f| f.map == map);
            MapStatus {
                map,
                pinned: info.is_some(),
                map_type: info
                    .as_ref()
                    .and_then(|i| i.map_type().ok())
                    .map(|t| format!("{t:?}")),
                entries: filled.map(|f| f.entries),
                capacity: filled
                    .map(|f| f.capacity)
                    .or_else(|| info.map(|i| u64::from(i.max_entries()))),
            }
        })
        .collect()
}

/// The text form of [`Status`].
pub fn text(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let when = |t: Option<f64>| t.map_or_else(|| "never".to_owned(), unix_time);
    let _ = writeln!(out, "installation: {}", s.bpffs.display());
    if !s.installed {
        let _ = writeln!(out, "  not installed (no {} pin)", bpf::LINK_PIN);
    }
    let a = &s.agent;
    match a.pid {
        Some(pid) => {
            let _ = writeln!(out, "agent: running, pid {pid}");
        }
        None => {
            let _ = writeln!(out, "agent: not running");
        }
    }
    let _ = writeln!(
        out,
        "  started {}, initial sync {}, last sync {} ({} syncs)",
        when(a.started),
        when(a.initial_sync),
        when(a.last_sync),
        a.syncs.unwrap_or(0)
    );
    if let (Some(addr), true) = (a.health_addr, a.running) {
        let _ = writeln!(out, "  /metrics and probes on {addr}");
    }
    let _ = writeln!(out, "programs:");
    for p in &s.programs {
        let state = match (&p.cgroup, p.cgroup_id, p.pinned) {
            (Some(c), _, _) => format!(
                "attached to {}{}",
                c.display(),
                if p.host_root == Some(true) {
                    " (the host's cgroup2 root)"
                } else {
                    ""
                }
            ),
            (None, Some(id), _) => format!("attached to cgroup id {id}"),
            (None, None, true) => "pinned, detached".to_owned(),
            (None, None, false) => "not pinned".to_owned(),
        };
        let ids = match (p.link_id, p.program_id) {
            (Some(l), Some(pr)) => format!(" [link {l}, prog {pr}]"),
            _ => String::new(),
        };
        let _ = writeln!(out, "  {:<16} {:<18} {state}{ids}", p.program, p.pin);
    }
    let _ = writeln!(out, "maps:");
    for m in &s.maps {
        let fill = match (m.entries, m.capacity) {
            _ if !m.pinned => "not pinned".to_owned(),
            (Some(e), Some(c)) if c > 0 => {
                format!("{e} / {c} ({:.1} %)", e as f64 * 100.0 / c as f64)
            }
            (None, Some(c)) => format!("fixed, {c}"),
            _ => "?".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {:<14} {:<12} {fill}",
            m.map,
            m.map_type.as_deref().unwrap_or("")
        );
    }
    let f = &s.features;
    let _ = writeln!(out, "kernel features:");
    for (name, probe) in [
        ("getpeername hooks", &f.getpeername_hooks),
        ("netns cookies", &f.netns_cookies),
        ("SOCK_DESTROY", &f.sock_destroy),
        ("ring buffer", &f.ring_buffer),
    ] {
        let _ = writeln!(out, "  {name:<18} {probe}");
    }
    let _ = match (s.tracing, s.tracer_pid) {
        (true, Some(pid)) => writeln!(out, "tracing: on, pid {pid}"),
        (true, None) => writeln!(out, "tracing: on"),
        (false, _) => writeln!(out, "tracing: off"),
    };
    out
}

/// Unix seconds as RFC 3339 (UTC), to the second.
fn unix_time(secs: f64) -> String {
    jiff::Timestamp::from_second(secs as i64)
        .map_or_else(|_| format!("{secs} s"), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_time_is_a_utc_date() {
        assert_eq!(unix_time(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(unix_time(951_825_599.2), "2000-02-29T11:59:59Z");
    }

    #[test]
    fn probes_print_as_yes_no_or_why() {
        assert_eq!(Probe::from(Ok::<_, String>(true)).to_string(), "yes");
        assert_eq!(Probe::from(Ok::<_, String>(false)).to_string(), "no");
        assert_eq!(
            Probe::from(Err::<bool, _>("EPERM")).to_string(),
            "unknown (EPERM)"
        );
    }
}
