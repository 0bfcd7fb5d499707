//! The real datapath: pinned BPF maps, and the pinned cgroup links that keep
//! the socket-LB programs (connect, sendmsg, recvmsg, getpeername and
//! post_bind, each for IPv4 and IPv6, and sock_release) attached while no
//! agent runs.
use std::{
    collections::HashSet,
    fs,
    io::ErrorKind,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
    sys::statfs,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap as _, MapData, MapError, MapType, PerCpuArray, PerCpuValues,
    },
    programs::{
        CgroupAttachMode, Program,
        links::{FdLink, PinnedLink},
    },
    sys::SyscallError,
};
use lb_common::{
    ABLATE_GLOBAL, AffinityKey, AffinityValue, AgentState, Backend, DEBUG_LOG_GLOBAL, FILTER_WORDS,
    HOST_NETNS_GLOBAL, HOST_NETNS_ONLY_GLOBAL, ReverseKey, ReverseValue, SOCK_MASK_GLOBAL,
    ServiceKey, ServiceMeta, ServiceValue, SockReverse, SockSlot, SvcStats, filter_probe, maps,
    stats,
};

use super::{
    Datapath, DatapathError, Failures, Result, Snapshot, backends_full,
    node_ports::{self, NodePortBits},
    resume, sys,
};

/// The object with every socket-LB program, built by `build.rs`.
static SOCK_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-sock"));

/// Pin of the connect4 cgroup link, inside the bpffs directory.
pub const LINK_PIN: &str = "link_connect4";

/// A directory in the bpffs directory that `lb-agent trace` holds an
/// exclusive `flock` on while it runs (one tracer at a time; the agent's
/// own lock is on the pin directory itself).
pub const TRACE_LOCK: &str = "trace_lock";

/// Every program of the object and the pin of its cgroup link. Attached in
/// this order: the reverse hooks first, so replies of a socket are already
/// translated back when the forward hooks start translating it.
pub const PROGRAMS: &[(&str, &str)] = &[
    ("lb_recvmsg4", "link_recvmsg4"),
    ("lb_getpeername4", "link_getpeername4"),
    ("lb_recvmsg6", "link_recvmsg6"),
    ("lb_getpeername6", "link_getpeername6"),
    ("lb_sendmsg4", "link_sendmsg4"),
    ("lb_sendmsg6", "link_sendmsg6"),
    ("lb_connect6", "link_connect6"),
    ("lb_connect4", LINK_PIN),
    // Bind protection (left out with `--bind-protection=false`).
    ("lb_post_bind4", "link_post_bind4"),
    ("lb_post_bind6", "link_post_bind6"),
    // Last: a socket translated by the new programs is released by them.
    ("lb_sock_release", "link_sock_release"),
];

/// The bind-protection programs of [`PROGRAMS`]: attached only with
/// [`ProgramOptions::bind_protection`]; without it, a link a previous
/// agent left is detached.
pub const BIND_PROGRAMS: &[&str] = &["lb_post_bind4", "lb_post_bind6"];

/// Every map the object declares, with the type, key and value sizes this
/// build expects. A pin of another layout (left by an older agent) is
/// replaced on install rather than reused: the old programs keep their own
/// reference to it until their links are swapped out.
pub const MAP_LAYOUTS: &[(&str, MapType, usize, usize)] = &[
    (
        maps::SERVICES,
        MapType::Hash,
        size_of::<ServiceKey>(),
        size_of::<ServiceValue>(),
    ),
    (
        maps::BACKENDS,
        MapType::Array,
        size_of::<u32>(),
        size_of::<Backend>(),
    ),
    (
        maps::SERVICE_META,
        MapType::Hash,
        size_of::<u32>(),
        size_of::<ServiceMeta>(),
    ),
    (
        maps::STATS,
        MapType::PerCpuArray,
        size_of::<u32>(),
        size_of::<u64>(),
    ),
    (
        maps::REVERSE,
        MapType::LruHash,
        size_of::<ReverseKey>(),
        size_of::<ReverseValue>(),
    ),
    (
        maps::FILTER,
        MapType::Array,
        size_of::<u32>(),
        size_of::<u64>(),
    ),
    (
        maps::SOCK,
        MapType::Array,
        size_of::<u32>(),
        size_of::<SockSlot>(),
    ),
    (
        maps::SOCK_SPILL,
        MapType::Hash,
        size_of::<u64>(),
        size_of::<SockReverse>(),
    ),
    (
        maps::TERMINATED,
        MapType::Hash,
        size_of::<u32>(),
        size_of::<u64>(),
    ),
    (
        maps::AFFINITY,
        MapType::LruHash,
        size_of::<AffinityKey>(),
        size_of::<AffinityValue>(),
    ),
    (
        maps::SVC_STATS,
        MapType::PerCpuArray,
        size_of::<u32>(),
        size_of::<SvcStats>(),
    ),
    (
        maps::TRACE,
        MapType::Array,
        size_of::<u32>(),
        size_of::<u64>(),
    ),
    // A ring buffer has no keys or values: its size is in max_entries.
    (maps::TRACE_RING, MapType::RingBuf, 0, 0),
    (
        maps::AGENT,
        MapType::Array,
        size_of::<u32>(),
        size_of::<AgentState>(),
    ),
    (
        maps::NODE_PORTS,
        MapType::Array,
        size_of::<u32>(),
        size_of::<u64>(),
    ),
];
/// Pins of maps earlier versions created and this one no longer uses:
/// removed once the new programs are attached (the old programs hold their
/// own references until their links go).
const LEGACY_MAPS: &[&str] = &[
    maps::LEGACY_REVERSE4,
    maps::LEGACY_CONFIG,
    maps::LEGACY_SOCK_REVERSE,
    maps::LEGACY_FILTER,
];
/// Link pins of programs earlier versions attached and this one does not
/// have: detached when the new links are swapped in (until then the old
/// programs work as a set).
const LEGACY_LINKS: &[&str] = &[];

/// Suffix of a link's staging pin (bpffs rejects '.' in names).
const STAGING_SUFFIX: &str = "_new";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "lb-agent was built without its eBPF object (LB_EBPF_STUB); rebuild without it to run the datapath"
    )]
    Stub,
    #[error("{path}: {message}")]
    Path { path: PathBuf, message: String },
    #[error("loading eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("eBPF program {op}: {source}")]
    Program {
        op: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning cgroup link at {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// A flag or the system is not what `run` needs; says what to do.
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{} is held by a running lb-agent ({holder}); one agent per pin directory: stop that one first, or use another --bpffs",
        dir.display()
    )]
    Locked { dir: PathBuf, holder: String },
}

/// What the programs are loaded with (read-only globals).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgramOptions {
    /// Log every translated connect (aya-log, debug level).
    pub bpf_log: bool,
    /// `--host-netns-only`: translate sockets of the host's network
    /// namespace only.
    pub host_netns_only: bool,
    /// `--bind-protection`: attach the post_bind programs, which fail a
    /// host-namespace `bind()` that would shadow a nodePort.
    pub bind_protection: bool,
}

/// The cookie of the network namespace the agent runs in (the host's, for
/// the DaemonSet): loopback frontends, and with `--host-netns-only` every
/// frontend, answer sockets of that namespace only. Unknown (0) means no
/// socket matches, which `--host-netns-only` refuses, as it would then
/// translate nothing.
fn host_netns_cookie(required: bool) -> Result<u64, LoadError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let cookie = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(std::io::Error::from)
    .and_then(|fd| {
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: `fd` is an open socket; the kernel writes at most `len`
        // bytes into `cookie`.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &raw mut len,
            )
        };
        if rc == 0 {
            Ok(cookie)
        } else {
            Err(std::io::Error::last_os_error())
        }
    });
    match cookie {
        Ok(c) => Ok(c),
        Err(e) if required => Err(LoadError::Invalid(format!(
            "--host-netns-only: cannot read this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+): {e}"
        ))),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the network namespace cookie (SO_NETNS_COOKIE); 127.0.0.1:nodePort is not translated and bind protection is off");
            Ok(0)
        }
    }
}

/// Sizes of the maps created on first install (pinned maps keep theirs).
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Entries of `LB_SERVICES`: one per frontend (service port and family).
    pub max_services: u32,
    /// Slots of the `LB_BACKENDS` array: one per endpoint of each frontend,
    /// plus room for the new range of a frontend being changed. Preallocated.
    pub max_backends: u32,
    /// Entries of `LB_SVC_META`: one per frontend (service port).
    pub max_frontends: u32,
    /// Entries of the LRU reverse map (`LB_REVERSE`) of unconnected UDP
    /// sockets: (socket, backend) pairs. Preallocated.
    pub max_reverse: u32,
    /// Slots of `LB_SOCK` (translated sockets open at once), rounded up to
    /// a power of two; also the entries of its spill hash (at least
    /// 4,096). The slots are preallocated.
    pub max_sockets: u32,
    /// Entries of the LRU `LB_AFFINITY`: (client network namespace,
    /// frontend with session affinity) pairs. Preallocated.
    pub max_affinity: u32,
}

/// The first cgroup2 mount in `/proc/mounts`: the host's cgroup v2 root.
pub fn cgroup2_root() -> std::io::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no cgroup2 mount in /proc/mounts"))
}

fn is_bpffs(path: &Path) -> bool {
    fs_type(path) == Some(statfs::BPF_FS_MAGIC)
}

fn fs_type(path: &Path) -> Option<statfs::FsType> {
    statfs::statfs(path).ok().map(|s| s.filesystem_type())
}

/// Upper bound of every `--max-*` map size: far above any node's needs, low
/// enough that a typo is refused before the kernel is asked for gigabytes.
pub const MAX_MAP_ENTRIES: u32 = 1 << 24;

impl MapSizes {
    /// Each size is a number of entries between 1 and [`MAX_MAP_ENTRIES`].
    pub fn validate(&self) -> Result<(), LoadError> {
        for (flag, value) in [
            ("--max-services", self.max_services),
            ("--max-backends", self.max_backends),
            ("--max-frontends", self.max_frontends),
            ("--max-reverse", self.max_reverse),
            ("--max-sockets", self.max_sockets),
            ("--max-affinity", self.max_affinity),
        ] {
            if !(1..=MAX_MAP_ENTRIES).contains(&value) {
                return Err(LoadError::Invalid(format!(
                    "{flag} {value}: must be between 1 and {MAX_MAP_ENTRIES} entries"
                )));
            }
        }
        Ok(())
    }
}

/// Everything `run` checks before it creates anything, so a mistake in a
/// flag leaves no pin, link or directory behind: the cgroup is a cgroup v2
/// directory, the pin directory is (or will be) on a bpffs and holds nothing
/// but this agent's pins (unless `allow_foreign`), and the sizes are sane.
pub fn preflight(
    bpffs: &Path,
    cgroup: &Path,
    sizes: &MapSizes,
    allow_foreign: bool,
) -> Result<(), LoadError> {
    sizes.validate()?;
    check_cgroup2(cgroup)?;
    check_bpffs_dir(bpffs)?;
    if !allow_foreign {
        let foreign = foreign_entries(bpffs);
        if !foreign.is_empty() {
            return Err(LoadError::Invalid(format!(
                "{} holds entries lb-agent did not create ({}); give lb-agent a directory of its own, such as /sys/fs/bpf/lb, or pass --allow-foreign-pins to share this one",
                bpffs.display(),
                list_names(&foreign)
            )));
        }
    }
    Ok(())
}

fn check_cgroup2(cgroup: &Path) -> Result<(), LoadError> {
    let hint = || {
        match cgroup2_root() {
        Ok(root) => format!(
            "pass a cgroup v2 directory, e.g. the cgroup2 mount {} (from /proc/mounts) or a directory below it",
            root.display()
        ),
        Err(_) => "pass a cgroup v2 directory (this host has no cgroup2 mount in /proc/mounts: mount -t cgroup2 none <dir>)".to_owned(),
    }
    };
    let invalid = |what: String| LoadError::Invalid(format!("{what}; {}", hint()));
    match fs::metadata(cgroup) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(invalid(format!(
                "--cgroup {}: no such directory",
                cgroup.display()
            )));
        }
        Err(e) => return Err(invalid(format!("--cgroup {}: {e}", cgroup.display()))),
        Ok(m) if !m.is_dir() => {
            return Err(invalid(format!(
                "--cgroup {}: not a directory",
                cgroup.display()
            )));
        }
        Ok(_) => {}
    }
    match fs_type(cgroup) {
        Some(statfs::CGROUP2_SUPER_MAGIC) => Ok(()),
        Some(statfs::CGROUP_SUPER_MAGIC) => Err(invalid(format!(
            "{} is a cgroup v1 directory",
            cgroup.display()
        ))),
        _ => Err(invalid(format!(
            "{} is not a cgroup directory",
            cgroup.display()
        ))),
    }
}

/// The pin directory exists on a bpffs, or will be created on one: its
/// parent is a bpffs, or it is below /sys/fs/bpf, where `run` mounts one.
fn check_bpffs_dir(dir: &Path) -> Result<(), LoadError> {
    let invalid = |why: &str| {
        LoadError::Invalid(format!(
            "--bpffs {}: {why}; pass a directory on a bpffs, such as /sys/fs/bpf/lb (mount one with: mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        ))
    };
    let sys_bpf = Path::new(SYS_BPF);
    if dir.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
        // `run` mounts it there.
        return Ok(());
    }
    if dir.exists() {
        if !dir.is_dir() {
            return Err(invalid("not a directory"));
        }
        if !is_bpffs(dir) {
            return Err(invalid("not on a bpffs"));
        }
        return Ok(());
    }
    match dir.parent() {
        Some(parent) if is_bpffs(parent) => Ok(()),
        Some(parent) if parent.exists() => Err(invalid("its parent is not on a bpffs")),
        _ => Err(invalid("neither it nor its parent exists")),
    }
}

const SYS_BPF: &str = "/sys/fs/bpf";

/// Whether `name` is a pin `run` creates: a map, a link, or a link's
/// staging pin during an upgrade.
fn known_pin(name: &str) -> bool {
    name == TRACE_LOCK
        || MAP_LAYOUTS.iter().any(|(map, ..)| *map == name)
        || LEGACY_MAPS.contains(&name)
        || LEGACY_LINKS
            .iter()
            .any(|pin| name == *pin || name.strip_suffix(STAGING_SUFFIX) == Some(*pin))
        || PROGRAMS
            .iter()
            .any(|(_, pin)| name == *pin || name.strip_suffix(STAGING_SUFFIX) == Some(*pin))
}

/// Entries of `dir` that are not [`known_pin`]s, sorted (none if `dir` is missing).
fn foreign_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !known_pin(n))
        .collect();
    names.sort();
    names
}

/// At most a few names, then a count.
fn list_names(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut out = names
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        out.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    out
}

/// An exclusive `flock` on the pin directory, held for the agent's life: a
/// second agent on the same directory would fight the first over every map
/// entry and link. Released by the kernel when the process exits, however.
#[derive(Debug)]
pub struct DirLock {
    _lock: Flock<fs::File>,
}

/// Takes the directory's lock, or says which process holds it.
pub fn lock_dir(dir: &Path) -> Result<DirLock, LoadError> {
    let file = fs::File::open(dir).map_err(|e| LoadError::Path {
        path: dir.to_owned(),
        message: format!("opening the pin directory to lock it: {e}"),
    })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(DirLock { _lock: lock }),
        Err((_, Errno::EWOULDBLOCK)) => Err(LoadError::Locked {
            dir: dir.to_owned(),
            holder: lock_holder(dir)
                .map_or_else(|| "another process".to_owned(), |pid| format!("pid {pid}")),
        }),
        Err((_, e)) => Err(LoadError::Path {
            path: dir.to_owned(),
            message: format!("locking the pin directory: {e}"),
        }),
    }
}

/// The pid holding a `flock` on `dir`, from /proc/locks
/// (`1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF`): the
/// running agent of an installation (the kernel drops the lock when the
/// process dies, however it dies).
pub fn lock_holder(dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(dir).ok()?;
    let dev = meta.dev();
    let wanted = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    fs::read_to_string("/proc/locks")
        .ok()?
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (kind, pid, id) = (fields.get(1)?, fields.get(4)?, fields.get(5)?);
            (*kind == "FLOCK" && *id == wanted).then(|| pid.parse().ok())?
        })
}

/// Makes sure `dir` exists on a bpffs, mounting one at /sys/fs/bpf if the
/// directory belongs there and nothing is mounted yet.
pub fn ensure_bpffs_dir(dir: &Path) -> Result<(), LoadError> {
    let err = |message: String| LoadError::Path {
        path: dir.to_owned(),
        message,
    };
    if dir.starts_with(SYS_BPF) {
        mount_sys_bpffs()?;
    }
    let parent = dir.parent().unwrap_or(dir);
    if !is_bpffs(dir) && !is_bpffs(parent) {
        return Err(err("not on a bpffs (mount -t bpf bpf <dir>)".into()));
    }
    fs::create_dir_all(dir).map_err(|e| err(e.to_string()))
}

/// Mounts a bpffs at /sys/fs/bpf unless one is there; true if it mounted.
/// With mount(2) itself, not mount(8): the agent's image has no other file.
/// Needs CAP_SYS_ADMIN (only the DaemonSet's init container has it).
pub fn mount_sys_bpffs() -> Result<bool, LoadError> {
    let sys_bpf = Path::new(SYS_BPF);
    if is_bpffs(sys_bpf) {
        return Ok(false);
    }
    let err = |message: String| LoadError::Path {
        path: sys_bpf.to_owned(),
        message,
    };
    fs::create_dir_all(sys_bpf).map_err(|e| err(e.to_string()))?;
    nix::mount::mount(
        Some("bpf"),
        sys_bpf,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| err(format!("mount -t bpf bpf /sys/fs/bpf: {e}")))?;
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(true)
}

/// The loaded, attached and pinned programs.
pub struct Installation {
    pub ebpf: Ebpf,
    /// The connect4 link's pin.
    pub link_pin: PathBuf,
    /// Every link pin, in [`PROGRAMS`] order.
    pub link_pins: Vec<PathBuf>,
    /// (staging pin, link pin) of links not yet swapped in: maps were
    /// replaced (an upgrade), so the previous programs, still reading their
    /// old maps, stay attached until [`swap_links`] after the first
    /// complete sync. Empty when the links were swapped at once.
    pub deferred: Vec<(PathBuf, PathBuf)>,
    /// Held for as long as the agent runs.
    pub lock: DirLock,
}

/// Loads the programs with their maps pinned under `dir` (re-using maps
/// already pinned there), attaches each to `cgroup`, and pins each link over
/// the link a previous agent left: old and new programs are attached side by
/// side until the pins are swapped (a second connect4 or recvmsg4 finds no
/// frontend or reverse entry in an address the first already translated),
/// so no connect or datagram goes untranslated during an upgrade or restart.
///
/// Everything is checked first ([`preflight`]) and the directory is locked
/// before anything in it changes; if a fresh installation fails half-way,
/// what it created is removed again.
pub fn install(
    dir: &Path,
    cgroup: &Path,
    sizes: MapSizes,
    programs: ProgramOptions,
    allow_foreign: bool,
) -> Result<Installation, LoadError> {
    if SOCK_OBJ.is_empty() {
        return Err(LoadError::Stub);
    }
    preflight(dir, cgroup, &sizes, allow_foreign)?;
    let created = !dir.exists();
    ensure_bpffs_dir(dir)?;
    let lock = match lock_dir(dir) {
        Ok(lock) => lock,
        Err(e) => {
            if created {
                let _ = fs::remove_dir(dir);
            }
            return Err(e);
        }
    };
    // Under the lock, so no other agent is half-way through its own start.
    let fresh = fs::read_dir(dir).into_iter().flatten().flatten().all(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name == TRACE_LOCK || !known_pin(&name)
    });
    match load_and_attach(dir, cgroup, sizes, programs) {
        Ok((ebpf, link_pins, deferred)) => Ok(Installation {
            ebpf,
            link_pin: dir.join(LINK_PIN),
            link_pins,
            deferred,
            lock,
        }),
        Err(e) => {
            // Nothing left behind by a failed first start; an existing
            // installation keeps serving from its pins.
            if fresh {
                let _ = remove_known_pins(dir);
                if created {
                    let _ = fs::remove_dir(dir);
                }
            }
            Err(e)
        }
    }
}

/// The links pinned over the previous ones, and those left staged.
type Attached = (Ebpf, Vec<PathBuf>, Vec<(PathBuf, PathBuf)>);

fn load_and_attach(
    dir: &Path,
    cgroup: &Path,
    sizes: MapSizes,
    programs: ProgramOptions,
) -> Result<Attached, LoadError> {
    let ProgramOptions {
        bpf_log,
        host_netns_only,
        bind_protection,
    } = programs;
    let host_netns = host_netns_cookie(host_netns_only)?;
    // A previous agent stopped before its deferred swap: its maps may not
    // be filled yet, so the programs before it stay attached here too.
    let unfinished = PROGRAMS
        .iter()
        .any(|(_, pin)| dir.join(format!("{pin}{STAGING_SUFFIX}")).exists());
    // A filter created now over services pinned already (an upgrade from a
    // version without it) is empty until the agent fills it: the new
    // programs would pass every service by. Deferred like a replaced map.
    let new_filter = !dir.join(maps::FILTER).exists() && dir.join(maps::SERVICES).exists();
    let replaced = drop_incompatible_pins(dir)? || unfinished || new_filter;
    // The programs mask cookies by the slot array's size: a pinned array
    // keeps its size whatever the flag says now.
    let sock_slots =
        pinned_entries(dir, maps::SOCK).unwrap_or_else(|| sizes.max_sockets.next_power_of_two());
    // One counter slot per service id, and ids go up to the frontends the
    // name map holds (a pinned one keeps its size); slot 0 is never used.
    let svc_ids = pinned_entries(dir, maps::SERVICE_META).unwrap_or(sizes.max_frontends);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .map_max_entries(maps::SERVICES, sizes.max_services)
        .map_max_entries(maps::SERVICE_META, sizes.max_frontends)
        .map_max_entries(maps::BACKENDS, sizes.max_backends)
        .map_max_entries(maps::REVERSE, sizes.max_reverse)
        .map_max_entries(maps::TERMINATED, sizes.max_frontends)
        .map_max_entries(maps::AFFINITY, sizes.max_affinity)
        .map_max_entries(maps::SVC_STATS, svc_ids.saturating_add(1))
        .map_max_entries(maps::SOCK, sock_slots)
        .map_max_entries(maps::SOCK_SPILL, sock_slots.max(MIN_SOCK_SPILL))
        .override_global(SOCK_MASK_GLOBAL, &(sock_slots - 1), true)
        .override_global(DEBUG_LOG_GLOBAL, &u32::from(bpf_log), true)
        .override_global(ABLATE_GLOBAL, &ablation(), true)
        .override_global(HOST_NETNS_GLOBAL, &host_netns, true)
        .override_global(HOST_NETNS_ONLY_GLOBAL, &u32::from(host_netns_only), true)
        .load(SOCK_OBJ)?;
    if bpf_log {
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_bpf_logger(logger),
            Err(e) => tracing::warn!(error = %e, "eBPF logging unavailable"),
        }
    }
    let cgroup_file = fs::File::open(cgroup).map_err(|e| LoadError::Path {
        path: cgroup.to_owned(),
        message: format!("opening cgroup: {e}"),
    })?;
    // Attach everything under staging pins first; only when all programs
    // are attached are the pins swapped. On an error the staging pins go,
    // and with them the new links: the old ones were never touched.
    let mut staged = Vec::new();
    let mut left_out = Vec::new();
    for (program, pin) in PROGRAMS {
        if !bind_protection && BIND_PROGRAMS.contains(program) {
            left_out.push(*pin);
            continue;
        }
        match attach_staged(&mut ebpf, program, dir, pin, &cgroup_file) {
            Ok(paths) => staged.push(paths),
            Err(e) => {
                for (staging, _) in &staged {
                    let _ = fs::remove_file(staging);
                }
                return Err(e);
            }
        }
    }
    for legacy in LEGACY_MAPS {
        let _ = fs::remove_file(dir.join(legacy));
    }
    // Turned off: a previous agent's bind links go at once (they translate
    // nothing, so there is nothing to hand over).
    for pin in left_out {
        for path in [dir.join(pin), dir.join(format!("{pin}{STAGING_SUFFIX}"))] {
            if path.exists() {
                let _ = sys::detach_pinned_link(&path);
                let _ = fs::remove_file(&path);
                tracing::info!(link = pin, "bind protection off: detached");
            }
        }
    }
    let link_pins = staged.iter().map(|(_, pin)| pin.clone()).collect();
    if replaced && staged.iter().any(|(_, pin)| pin.exists()) {
        // The new maps are empty: the previous programs keep translating
        // from their own (now unpinned) maps until these are filled.
        tracing::info!(
            "new maps (an upgrade): the previous programs stay attached until the first complete sync"
        );
        return Ok((ebpf, link_pins, staged));
    }
    swap_links(&staged)?;
    Ok((ebpf, link_pins, Vec::new()))
}

/// Environment variable of `cargo xtask bench`'s ablation: `lb_common::ablate`
/// bits to load the programs with. A variant does not serve correctly (it
/// skips what it measures), so this is for the bench's own cgroup only.
pub const ABLATE_ENV: &str = "LB_BENCH_ABLATE";

/// The ablation bits of [`ABLATE_ENV`] (0, everything on, if unset or not a number).
fn ablation() -> u32 {
    let bits = std::env::var(ABLATE_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if bits != 0 {
        tracing::warn!(
            bits,
            "{ABLATE_ENV} set: programs loaded with parts switched off, for benchmarking only"
        );
    }
    bits
}

/// Nanoseconds since the Unix epoch (0 before it).
pub fn unix_ns(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Least entries of `LB_SOCK_SPILL` (allocated on use, so only its bucket
/// array, 16 B an entry, is paid up front): a small slot array spills often.
const MIN_SOCK_SPILL: u32 = 4_096;

/// `max_entries` of a pinned map, if there is one.
pub fn pinned_entries(dir: &Path, name: &str) -> Option<u32> {
    let data = MapData::from_pin(dir.join(name)).ok()?;
    data.info().ok().map(|i| i.max_entries())
}

/// Renames each staging pin over its link pin. rename(2) replaces the old
/// pin atomically; the old link detaches when its last reference (the old
/// pin) goes, and the new program is attached already.
/// Then detaches the links of programs this version no longer has.
pub fn swap_links(staged: &[(PathBuf, PathBuf)]) -> Result<(), LoadError> {
    for (staging, link_pin) in staged {
        fs::rename(staging, link_pin).map_err(|e| LoadError::Pin {
            path: link_pin.clone(),
            source: e.into(),
        })?;
    }
    if let Some(dir) = staged.first().and_then(|(_, pin)| pin.parent()) {
        for legacy in LEGACY_LINKS {
            let path = dir.join(legacy);
            if path.exists() {
                let _ = sys::detach_pinned_link(&path);
                let _ = fs::remove_file(&path);
                tracing::info!(
                    link = legacy,
                    "detached a program this version no longer has"
                );
            }
        }
    }
    Ok(())
}

/// Unpins every map whose pinned type, key or value size differs from this
/// build's, so the loader creates it afresh instead of reusing bytes it would
/// misread. Returns whether any was replaced (the new maps are empty until
/// the first complete sync).
fn drop_incompatible_pins(dir: &Path) -> Result<bool, LoadError> {
    let mut stale: Vec<&'static str> = Vec::new();
    for &(name, map_type, key_size, value_size) in MAP_LAYOUTS {
        let path = dir.join(name);
        let Ok(data) = MapData::from_pin(&path) else {
            continue;
        };
        let info = data
            .info()
            .map_err(|source| map_err("info", name, source))?;
        let pinned = (info.key_size() as usize, info.value_size() as usize);
        let same_type = info.map_type().is_ok_and(|t| t == map_type);
        if pinned != (key_size, value_size) || !same_type {
            tracing::warn!(
                map = name,
                pinned_type = ?info.map_type().ok(),
                pinned_key = pinned.0,
                pinned_value = pinned.1,
                key = key_size,
                value = value_size,
                "pinned map has another layout (an older agent's); replacing it, services are re-written from the sources"
            );
            stale.push(name);
        }
    }
    // The service entries index into the backend array: one of them
    // replaced, the other would point into (or be pointed at from) a map
    // it was not written with.
    if stale.contains(&maps::SERVICES) != stale.contains(&maps::BACKENDS) {
        stale.push(if stale.contains(&maps::SERVICES) {
            maps::BACKENDS
        } else {
            maps::SERVICES
        });
    }
    // The filter describes the service entries: kept while they are
    // replaced, the new agent would rewrite it from its new, still empty
    // map under the previous programs, which read it too.
    if stale.contains(&maps::SERVICES) && !stale.contains(&maps::FILTER) {
        stale.push(maps::FILTER);
    }
    for name in &stale {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(LoadError::Path {
                    path,
                    message: format!("removing incompatible pin: {e}"),
                });
            }
            _ => {}
        }
    }
    Ok(!stale.is_empty())
}

/// Loads `program`, attaches it to the cgroup and pins its link at
/// `<pin>_new`; returns (staging pin, final pin).
fn attach_staged(
    ebpf: &mut Ebpf,
    name: &str,
    dir: &Path,
    pin: &str,
    cgroup: &fs::File,
) -> Result<(PathBuf, PathBuf), LoadError> {
    let link_pin = dir.join(pin);
    let fd_link = match ebpf.program_mut(name) {
        Some(Program::CgroupSockAddr(program)) => {
            program.load().map_err(program_err("load"))?;
            // A cgroup bpf_link always coexists with other links (multi
            // semantics); the kernel rejects any explicit attach flag on
            // link_create.
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_err("attach"))?;
            let link = program.take_link(id).map_err(program_err("take link"))?;
            FdLink::try_from(link).map_err(|e| pin_err(&link_pin, e))?
        }
        Some(Program::CgroupSock(program)) => {
            program.load().map_err(program_err("load"))?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_err("attach"))?;
            let link = program.take_link(id).map_err(program_err("take link"))?;
            FdLink::try_from(link).map_err(|e| pin_err(&link_pin, e))?
        }
        Some(_) => {
            return Err(LoadError::Path {
                path: dir.to_owned(),
                message: format!("program {name} is not a cgroup sock or sock_addr program"),
            });
        }
        None => {
            return Err(LoadError::Path {
                path: dir.to_owned(),
                message: format!("program {name} missing from object"),
            });
        }
    };
    // bpffs rejects '.' in names, hence the underscore.
    let staging = dir.join(format!("{pin}{STAGING_SUFFIX}"));
    let _ = fs::remove_file(&staging);
    let pinned = fd_link.pin(&staging).map_err(|e| LoadError::Pin {
        path: staging.clone(),
        source: e.into(),
    })?;
    drop(pinned);
    Ok((staging, link_pin))
}

fn program_err(op: &'static str) -> impl Fn(aya::programs::ProgramError) -> LoadError {
    move |source| LoadError::Program { op, source }
}

fn pin_err(path: &Path, e: aya::programs::links::LinkError) -> LoadError {
    LoadError::Pin {
        path: path.to_owned(),
        source: e.into(),
    }
}

fn spawn_bpf_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring-buffer fd for as long as the AsyncFd
    // owns the logger, and always reports that same fd.
    let Ok(fd) = (unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }) else {
        tracing::warn!("eBPF log ring not pollable");
        return;
    };
    tokio::spawn(async move {
        let mut fd = fd;
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// What `uninstall` did.
#[derive(Debug, Default)]
pub struct Uninstalled {
    /// Pins removed.
    pub removed: usize,
    /// Entries of the directory lb-agent did not create, left as they were.
    pub left: Vec<String>,
    /// The directory itself was removed (it was empty afterwards).
    pub dir_removed: bool,
}

/// Detaches (by removing the link pins) and removes exactly the pins `run`
/// creates, then the directory if nothing else is in it. Refused while an
/// agent runs on `dir`. `None`: nothing is installed there.
pub fn uninstall(dir: &Path) -> Result<Option<Uninstalled>, LoadError> {
    if !dir.exists() {
        return Ok(None);
    }
    let lock = lock_dir(dir)?;
    let removed = remove_known_pins(dir).map_err(|e| LoadError::Path {
        path: dir.to_owned(),
        message: format!("removing pins: {e}"),
    })?;
    let left = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    drop(lock);
    let dir_removed = left.is_empty() && fs::remove_dir(dir).is_ok();
    let mut left = left;
    left.sort();
    Ok(Some(Uninstalled {
        removed,
        left,
        dir_removed,
    }))
}

/// Removes every [`known_pin`] of `dir`; returns how many there were.
fn remove_known_pins(dir: &Path) -> std::io::Result<usize> {
    // The links first, forward hooks before reverse ones, so nothing runs
    // against maps being removed and no socket is translated without its
    // replies being translated back.
    let links = PROGRAMS
        .iter()
        .rev()
        .map(|(_, pin)| *pin)
        .chain(LEGACY_LINKS.iter().copied())
        .flat_map(|pin| [pin.to_string(), format!("{pin}{STAGING_SUFFIX}")]);
    let maps = MAP_LAYOUTS
        .iter()
        .map(|(name, ..)| *name)
        .chain(LEGACY_MAPS.iter().copied())
        .map(str::to_owned);
    let mut removed = 0;
    let mut remove = |path: PathBuf| match fs::remove_file(path) {
        Ok(()) => {
            removed += 1;
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    for name in links {
        let path = dir.join(&name);
        // Detached now, not when the kernel gets round to freeing the pin.
        let _ = sys::detach_pinned_link(&path);
        remove(path)?;
    }
    for name in maps {
        remove(dir.join(name))?;
    }
    // The tracers' lock directory (a tracer still running keeps its lock
    // on the unlinked directory, harmlessly).
    match fs::remove_dir(dir.join(TRACE_LOCK)) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    Ok(removed)
}

/// The program id behind the pinned link, if the link is still attached.
pub fn attached_program(dir: &Path) -> Option<u32> {
    let link = PinnedLink::from_pin(dir.join(LINK_PIN)).ok()?;
    let fd: FdLink = link.into();
    fd.info().ok().map(|i| i.program_id())
}

pub(super) fn open_pin(dir: &Path, name: &'static str) -> Result<MapData, DatapathError> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|source| map_err("open pin", name, source))
}

pub(super) fn map_err(op: &'static str, map: &'static str, source: MapError) -> DatapathError {
    if let MapError::SyscallError(SyscallError { io_error, .. }) = &source
        && io_error.raw_os_error() == Some(libc::E2BIG)
    {
        return DatapathError::MapFull {
            map,
            flag: size_flag(map),
        };
    }
    DatapathError::Map { op, map, source }
}

/// The `run` flag that sizes `map` (without the dashes): `--max-services`
/// frontends, `--max-backends` backend slots, `--max-frontends` names.
fn size_flag(map: &str) -> &'static str {
    match map {
        maps::BACKENDS => "max-backends",
        maps::SERVICE_META => "max-frontends",
        maps::REVERSE => "max-reverse",
        maps::SOCK | maps::SOCK_SPILL => "max-sockets",
        maps::TERMINATED | maps::SVC_STATS => "max-frontends",
        maps::AFFINITY => "max-affinity",
        _ => "max-services",
    }
}

fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(SyscallError { io_error, .. }) => {
            io_error.raw_os_error() == Some(libc::ENOENT)
        }
        _ => false,
    }
}

/// The pinned maps of one installation, opened by path so `run` and `list`
/// (with or without a running agent) share one code path.
pub struct BpfDatapath {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// The backend array, written and read in batches (raw bpf(2)).
    backends: MapData,
    backend_capacity: u32,
    /// Created on the first grace period asked for.
    grace: Option<sys::GraceMaps>,
    meta: HashMap<MapData, u32, ServiceMeta>,
    stats: PerCpuArray<MapData, u64>,
    /// Absent in pins made before the reverse map existed.
    reverse: Option<WithMax<ReverseKey, ReverseValue>>,
    /// Sockets destroyed per service id; absent in older pins.
    terminated: Option<HashMap<MapData, u32, u64>>,
    /// Session affinity entries; absent in older pins.
    affinity: Option<WithMax<AffinityKey, AffinityValue>>,
    /// Absent in pins made before the frontend filter existed.
    filter: Option<Filter>,
    /// Per-service counters and their slots; absent in older pins.
    svc_stats: Option<(PerCpuArray<MapData, SvcStats>, u32)>,
    /// Who runs the installation, for `status`; absent in older pins.
    agent: Option<Array<MapData, AgentState>>,
    /// Bind protection's bitmap; absent in older pins.
    node_ports: Option<NodePorts>,
}

/// `LB_NODE_PORTS` and what the agent knows of it: counted from the
/// services map on first use.
struct NodePorts {
    map: MapData,
    bits: Option<NodePortBits>,
}

/// The agent's side of the frontend filter: which keys it wrote to
/// `LB_SERVICES` and how many sit on each bit, so a bit is cleared only
/// when its last key is gone. Built from the services map on first use.
struct Filter {
    map: MapData,
    state: Option<FilterState>,
}

struct FilterState {
    keys: HashSet<ServiceKey>,
    /// Keys on each bit, one byte a bit (1 MiB, less than a hash of the
    /// used bits at 100,000 frontends). A count that reaches 255 stays
    /// there and its bit stays set for good: a false positive, never a
    /// frontend passed by (three bits a key over 2^20 put well under one
    /// key on a bit at 100,000 frontends).
    counts: Vec<u8>,
    words: Vec<u64>,
}

impl Filter {
    /// Recounts from `keys` (the services map's) and writes every word:
    /// bits of keys no longer present (an agent stopped between a delete
    /// and the clear) go, and a filter created empty is filled.
    fn rebuild(&mut self, keys: HashSet<ServiceKey>) -> Result<()> {
        let mut counts = vec![0u8; FILTER_WORDS as usize * 64];
        let mut words = vec![0u64; FILTER_WORDS as usize];
        for key in &keys {
            let (index, mask) = filter_probe(key);
            count_key(&mut counts, index, mask);
            words[index as usize] |= mask;
        }
        sys::array_update_batch(self.map.fd().as_fd(), 0, &words).map_err(|(done, e)| {
            DatapathError::Other(format!("writing {}: {e} after {done} words", maps::FILTER))
        })?;
        self.state = Some(FilterState {
            keys,
            counts,
            words,
        });
        Ok(())
    }

    /// Writes word `index` as the state has it (one 8-byte element: a
    /// program reads the old word or the new one).
    fn write_word(&self, state: &FilterState, index: usize) -> Result<()> {
        let value = state.words[index];
        sys::array_update_batch(self.map.fd().as_fd(), index as u32, &[value]).map_err(|(_, e)| {
            DatapathError::Other(format!("writing {} word {index}: {e}", maps::FILTER))
        })
    }
}

/// One more key on each of a probe's bits (a count at 255 stays there).
fn count_key(counts: &mut [u8], index: u32, mask: u64) {
    for bit in filter_bits(index, mask) {
        let c = &mut counts[bit as usize];
        *c = c.saturating_add(1);
    }
}

/// The filter's bit numbers (word × 64 + bit) of a probe's mask: what the
/// agent counts keys on.
fn filter_bits(index: u32, mask: u64) -> impl Iterator<Item = u32> {
    let mut rest = mask;
    std::iter::from_fn(move || {
        let bit = rest.trailing_zeros();
        rest &= rest.wrapping_sub(1);
        (bit < 64).then_some(index * 64 + bit)
    })
}

/// A hash map and its `max_entries`.
type WithMax<K, V> = (HashMap<MapData, K, V>, u32);

/// How full a reverse map is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseOccupancy {
    pub entries: u64,
    pub max_entries: u32,
}

impl BpfDatapath {
    pub fn open(dir: &Path) -> Result<Self> {
        let hash =
            |name| -> Result<aya::maps::Map> { Ok(aya::maps::Map::HashMap(open_pin(dir, name)?)) };
        let backends = open_pin(dir, maps::BACKENDS)?;
        let info = backends
            .info()
            .map_err(|e| map_err("info", maps::BACKENDS, e))?;
        if !info.map_type().is_ok_and(|t| t == MapType::Array) {
            return Err(DatapathError::Other(format!(
                "{}: pinned {} is not an array (a layout of an older agent; `run` replaces it)",
                dir.display(),
                maps::BACKENDS
            )));
        }
        Ok(Self {
            services: HashMap::try_from(hash(maps::SERVICES)?)
                .map_err(|e| map_err("open", maps::SERVICES, e))?,
            backend_capacity: info.max_entries(),
            backends,
            grace: None,
            meta: HashMap::try_from(hash(maps::SERVICE_META)?)
                .map_err(|e| map_err("open", maps::SERVICE_META, e))?,
            stats: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open_pin(dir, maps::STATS)?))
                .map_err(|e| map_err("open", maps::STATS, e))?,
            reverse: open_optional(dir, maps::REVERSE, aya::maps::Map::LruHashMap)?,
            terminated: open_optional(dir, maps::TERMINATED, aya::maps::Map::HashMap)?
                .map(|(m, _)| m),
            affinity: open_optional(dir, maps::AFFINITY, aya::maps::Map::LruHashMap)?,
            filter: MapData::from_pin(dir.join(maps::FILTER))
                .ok()
                .map(|map| Filter { map, state: None }),
            svc_stats: open_svc_stats(dir)?,
            agent: MapData::from_pin(dir.join(maps::AGENT))
                .ok()
                .and_then(|m| Array::try_from(aya::maps::Map::Array(m)).ok()),
            node_ports: MapData::from_pin(dir.join(maps::NODE_PORTS))
                .ok()
                .map(|map| NodePorts { map, bits: None }),
        })
    }

    /// What `LB_AGENT` holds (`None`: an older installation without it).
    pub fn agent_state(&self) -> Result<Option<AgentState>> {
        let Some(map) = &self.agent else {
            return Ok(None);
        };
        map.get(&0, 0)
            .map(Some)
            .map_err(|e| map_err("read", maps::AGENT, e))
    }

    /// Records this process as the installation's agent, started now (a
    /// fresh record: the previous agent's sync and address go).
    pub fn note_started(&mut self, now: std::time::SystemTime) -> Result<()> {
        let Some(map) = &mut self.agent else {
            return Ok(());
        };
        let _one = lock_agent_record();
        let state = AgentState {
            pid: std::process::id(),
            started_ns: unix_ns(now),
            ..AgentState::default()
        };
        map.set(0, state, 0)
            .map_err(|e| map_err("write", maps::AGENT, e))
    }

    /// Service `svc_id`'s counters summed over CPUs (`None`: no slot for it).
    pub fn service_stats(&self, svc_id: u32) -> Result<Option<SvcStats>> {
        let Some((map, _)) = &self.svc_stats else {
            return Ok(None);
        };
        match map.get(&svc_id, 0) {
            Ok(per_cpu) => Ok(Some(per_cpu.iter().fold(SvcStats::default(), |a, s| {
                SvcStats {
                    connect: a.connect + s.connect,
                    sendmsg: a.sendmsg + s.sendmsg,
                    refused: a.refused + s.refused,
                }
            }))),
            Err(MapError::OutOfBounds { .. }) => Ok(None),
            Err(e) => Err(map_err("read", maps::SVC_STATS, e)),
        }
    }

    /// Counts the frontend filter's bits from the services map and writes
    /// it whole. `run` calls it before the first sync (a filter created by
    /// an upgrade is empty; the new links wait for that sync); put and
    /// delete call it on first use otherwise.
    pub fn rebuild_filter(&mut self) -> Result<()> {
        if self.filter.is_none() {
            return Ok(());
        }
        let mut keys = HashSet::new();
        for key in self.services.keys() {
            keys.insert(key.map_err(|e| map_err("iterate", maps::SERVICES, e))?);
        }
        match &mut self.filter {
            Some(f) => f.rebuild(keys),
            None => Ok(()),
        }
    }

    fn filter_ready(&mut self) -> Result<()> {
        if self.filter.as_ref().is_some_and(|f| f.state.is_none()) {
            self.rebuild_filter()?;
        }
        Ok(())
    }

    /// Sets `key`'s bit if it is new (before the key goes in: a program
    /// never finds a frontend's bit clear).
    fn filter_add(&mut self, key: &ServiceKey) -> Result<()> {
        self.filter_add_all(std::iter::once(key))
    }

    /// [`Self::filter_add`] of many keys: the words that change are
    /// written in one batch.
    fn filter_add_all<'k>(&mut self, keys: impl Iterator<Item = &'k ServiceKey>) -> Result<()> {
        self.filter_ready()?;
        let Some(f) = &mut self.filter else {
            return Ok(());
        };
        let Some(state) = f.state.as_mut() else {
            return Ok(());
        };
        let mut changed: Vec<u32> = Vec::new();
        for key in keys {
            if !state.keys.insert(*key) {
                continue;
            }
            let (index, mask) = filter_probe(key);
            count_key(&mut state.counts, index, mask);
            if state.words[index as usize] & mask != mask {
                // All of a key's bits sit in one word: one write sets them.
                state.words[index as usize] |= mask;
                changed.push(index);
            }
        }
        changed.sort_unstable();
        changed.dedup();
        let words: Vec<u64> = changed.iter().map(|&i| state.words[i as usize]).collect();
        sys::update_batch(f.map.fd().as_fd(), &changed, &words).map_err(|(done, e)| {
            // The state is ahead of the map: recounted from the services
            // map and written whole on next use.
            f.state = None;
            DatapathError::Other(format!("writing {}: {e} after {done} words", maps::FILTER))
        })
    }

    /// Clears each of `key`'s bits once no other key sits on it (after the
    /// key is gone).
    fn filter_remove(&mut self, key: &ServiceKey) -> Result<()> {
        self.filter_ready()?;
        let Some(f) = &mut self.filter else {
            return Ok(());
        };
        let Some(state) = f.state.as_mut() else {
            return Ok(());
        };
        if !state.keys.remove(key) {
            return Ok(());
        }
        let (index, mask) = filter_probe(key);
        let mut cleared = 0u64;
        for bit in filter_bits(index, mask) {
            let count = &mut state.counts[bit as usize];
            // 0: counted before this key was (cannot happen); 255: sticky.
            if matches!(*count, 0 | u8::MAX) {
                continue;
            }
            *count -= 1;
            if *count == 0 {
                cleared |= 1 << (bit & 63);
            }
        }
        if cleared != 0 {
            state.words[index as usize] &= !cleared;
            let state = f.state.as_ref().expect("just set");
            f.write_word(state, index as usize)?;
        }
        Ok(())
    }

    /// Bind protection's bits, counted from the services map (and the
    /// map written whole) the first time they are needed: the bits of
    /// entries no longer there (an agent stopped between a delete and the
    /// clear) go, and a map created empty is filled.
    fn node_ports_ready(&mut self) -> Result<()> {
        if self.node_ports.as_ref().is_none_or(|n| n.bits.is_some()) {
            return Ok(());
        }
        let mut entries = Vec::new();
        for item in self.services.iter() {
            entries.push(item.map_err(|e| map_err("iterate", maps::SERVICES, e))?);
        }
        let bits = NodePortBits::from_services(entries.iter().map(|(k, v)| (k, v)));
        if let Some(n) = &mut self.node_ports {
            sys::array_update_batch(n.map.fd().as_fd(), 0, bits.words()).map_err(|(done, e)| {
                DatapathError::Other(format!(
                    "writing {}: {e} after {done} words",
                    maps::NODE_PORTS
                ))
            })?;
            n.bits = Some(bits);
        }
        Ok(())
    }

    /// Updates bind protection's bits for `entries` about to be written
    /// (`before`: set the bits of flagged ones, so a node port is
    /// protected before it is served) or just written (clear the bits of
    /// entries that lost the flag), and writes the words that changed.
    fn node_ports_update<'k>(
        &mut self,
        entries: impl Iterator<Item = (&'k ServiceKey, Option<&'k ServiceValue>)>,
        before: bool,
    ) -> Result<()> {
        self.node_ports_ready()?;
        let Some(n) = &mut self.node_ports else {
            return Ok(());
        };
        let Some(bits) = n.bits.as_mut() else {
            return Ok(());
        };
        let mut changed = Vec::new();
        for (key, value) in entries {
            match (value.is_some_and(node_ports::flagged), before) {
                (true, true) => bits.add(key, &mut changed),
                (false, false) => bits.remove(key, &mut changed),
                _ => {}
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        changed.sort_unstable();
        changed.dedup();
        let words: Vec<u64> = changed.iter().map(|&i| bits.word(i)).collect();
        sys::update_batch(n.map.fd().as_fd(), &changed, &words).map_err(|(done, e)| {
            // Ahead of the map: counted again and written whole on next use.
            n.bits = None;
            DatapathError::Other(format!(
                "writing {}: {e} after {done} words",
                maps::NODE_PORTS
            ))
        })
    }

    /// Entries in the LRU reverse map of unconnected UDP sockets (a key
    /// walk: at most `max_entries` syscalls, about 0.3 s for a full 256 Ki
    /// map), or `None` if the installation has none.
    /// How full `LB_AFFINITY` is (`None` in older pins).
    pub fn affinity_occupancy(&self) -> Option<ReverseOccupancy> {
        self.affinity
            .as_ref()
            .map(|(map, max)| occupancy(map, *max))
    }

    pub fn reverse_occupancy(&self) -> Result<Option<ReverseOccupancy>> {
        Ok(self.reverse.as_ref().map(|(map, max)| occupancy(map, *max)))
    }

    /// Per-counter sums over CPUs, indexed by `lb_common::stats`. A counter
    /// beyond a stats map pinned by an older version reads 0.
    pub fn stats(&self) -> Result<Vec<u64>> {
        (0..stats::COUNT)
            .map(|i| match self.stats.get(&i, 0) {
                Ok(v) => Ok(v.iter().sum()),
                Err(MapError::OutOfBounds { .. }) => Ok(0),
                Err(e) => Err(map_err("read", maps::STATS, e)),
            })
            .collect()
    }
}

/// Serialises this process's read-modify-writes of `LB_AGENT`: the sync
/// loop counts syncs in it while the health server records its address.
static AGENT_RECORD: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lock_agent_record() -> std::sync::MutexGuard<'static, ()> {
    AGENT_RECORD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn update_record(
    map: &mut Array<MapData, AgentState>,
    f: impl FnOnce(&mut AgentState),
) -> Result<()> {
    let _one = lock_agent_record();
    let mut state = map
        .get(&0, 0)
        .map_err(|e| map_err("read", maps::AGENT, e))?;
    f(&mut state);
    map.set(0, state, 0)
        .map_err(|e| map_err("write", maps::AGENT, e))
}

/// Changes the running agent's record in the installation at `dir`
/// (`LB_AGENT`; nothing if its pins predate it). For this process's own
/// record only: after [`BpfDatapath::note_started`].
pub fn update_agent_record(dir: &Path, f: impl FnOnce(&mut AgentState)) -> Result<()> {
    let Ok(data) = MapData::from_pin(dir.join(maps::AGENT)) else {
        return Ok(());
    };
    let mut map = Array::try_from(aya::maps::Map::Array(data))
        .map_err(|e| map_err("open", maps::AGENT, e))?;
    update_record(&mut map, f)
}

/// What `LB_SOCK` and its spill hash hold: the translated sockets open now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOccupancy {
    /// Slots held by a socket (or being filled).
    pub slots: u64,
    pub max_slots: u32,
    /// Connected sockets in the spill hash (their slot was held).
    pub spilled: u64,
}

/// Reads every slot of `LB_SOCK` (batch lookups of 8,192 slots) and walks
/// the spill hash, or `None` if the
/// installation has no slot array (an older version's pins).
pub fn socket_occupancy(dir: &Path) -> Result<Option<SocketOccupancy>> {
    let Ok(data) = MapData::from_pin(dir.join(maps::SOCK)) else {
        return Ok(None);
    };
    let info = data.info().map_err(|e| map_err("info", maps::SOCK, e))?;
    if !info.map_type().is_ok_and(|t| t == MapType::Array) {
        return Ok(None);
    }
    let mut held = 0u64;
    sys::array_lookup_each(
        data.fd().as_fd(),
        info.max_entries(),
        |chunk: &[SockSlot]| {
            held += chunk.iter().filter(|s| s.cookie != 0).count() as u64;
        },
    )
    .map_err(|e| DatapathError::Other(format!("reading {}: {e}", maps::SOCK)))?;
    let spilled =
        match open_optional::<u64, SockReverse>(dir, maps::SOCK_SPILL, aya::maps::Map::HashMap)? {
            Some((map, max)) => occupancy(&map, max).entries,
            None => 0,
        };
    Ok(Some(SocketOccupancy {
        slots: held,
        max_slots: info.max_entries(),
        spilled,
    }))
}

/// `LB_SVC_STATS` and its slots, if the installation has it.
fn open_svc_stats(dir: &Path) -> Result<Option<(PerCpuArray<MapData, SvcStats>, u32)>> {
    let Ok(data) = MapData::from_pin(dir.join(maps::SVC_STATS)) else {
        return Ok(None);
    };
    let slots = data
        .info()
        .map_err(|e| map_err("info", maps::SVC_STATS, e))?
        .max_entries();
    let map = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
        .map_err(|e| map_err("open", maps::SVC_STATS, e))?;
    Ok(Some((map, slots)))
}

/// A pinned map that older installations may lack, with its `max_entries`.
fn open_optional<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
    kind: fn(MapData) -> aya::maps::Map,
) -> Result<Option<WithMax<K, V>>> {
    let Ok(data) = MapData::from_pin(dir.join(name)) else {
        return Ok(None);
    };
    let max_entries = data
        .info()
        .map_err(|e| map_err("info", name, e))?
        .max_entries();
    let map = HashMap::try_from(kind(data)).map_err(|e| map_err("open", name, e))?;
    Ok(Some((map, max_entries)))
}

/// Elements of a hash map: batched lookups (a handful of syscalls even for
/// a full `LB_REVERSE`, which a scrape reads), or a key-by-key walk where
/// the kernel has no batch lookup for the map.
fn occupancy<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    max_entries: u32,
) -> ReverseOccupancy {
    let fd = map.map().fd().as_fd();
    let entries = sys::hash_count(fd, size_of::<K>(), size_of::<V>()).unwrap_or_else(|_| {
        // A key deleted during the walk ends it early; the count is a
        // snapshot either way.
        map.keys().take_while(Result::is_ok).count() as u64
    });
    ReverseOccupancy {
        entries,
        max_entries,
    }
}

/// Elements per batched syscall: enough that the syscall's own cost
/// vanishes, few enough that the copies stay small (192 KiB of slots).
const BATCH: usize = 8192;

/// `entries` in [`BATCH`]-sized `BPF_MAP_UPDATE_BATCH` calls, up to the
/// first that fails (its index and error).
fn hash_update_batch<K: Copy, V: Copy>(
    fd: std::os::fd::BorrowedFd<'_>,
    map: &'static str,
    entries: &[(K, V)],
) -> std::result::Result<(), (usize, DatapathError)> {
    let mut written = 0;
    for chunk in entries.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|e| e.0).collect();
        let values: Vec<V> = chunk.iter().map(|e| e.1).collect();
        sys::update_batch(fd, &keys, &values).map_err(|(done, io_error)| {
            let source = MapError::SyscallError(SyscallError {
                call: "bpf_map_update_batch",
                io_error,
            });
            (written + done, map_err("batch update", map, source))
        })?;
        written += chunk.len();
    }
    Ok(())
}

/// `ranges` in [`BATCH`]-slot `BPF_MAP_UPDATE_BATCH` calls of the
/// backend array, up to the first range that fails (its index and error).
fn write_ranges(
    fd: std::os::fd::BorrowedFd<'_>,
    capacity: u32,
    ranges: &[(u32, &[Backend])],
) -> std::result::Result<(), (usize, DatapathError)> {
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    // The ranges in the chunk being built: (index in `ranges`, offset of
    // its first slot in the chunk).
    let mut starts: Vec<(usize, usize)> = Vec::new();
    let flush = |keys: &mut Vec<u32>, values: &mut Vec<Backend>, starts: &mut Vec<_>| {
        let result = sys::update_batch(fd, keys, values).map_err(|(done, e)| {
            // The range holding the slot that failed.
            let failed = starts
                .iter()
                .rev()
                .find(|&&(_, offset)| offset <= done)
                .map_or(0, |&(i, _)| i);
            let base = ranges[failed].0;
            (
                failed,
                DatapathError::Other(format!("writing {} slots {base}..: {e}", maps::BACKENDS)),
            )
        });
        keys.clear();
        values.clear();
        starts.clear();
        result
    };
    for (i, (base, backends)) in ranges.iter().enumerate() {
        if u64::from(*base) + backends.len() as u64 > u64::from(capacity) {
            flush(&mut keys, &mut values, &mut starts)?;
            return Err((i, backends_full()));
        }
        if !keys.is_empty() && keys.len() + backends.len() > BATCH {
            flush(&mut keys, &mut values, &mut starts)?;
        }
        starts.push((i, keys.len()));
        keys.extend((0..backends.len() as u32).map(|k| base + k));
        values.extend_from_slice(backends);
    }
    flush(&mut keys, &mut values, &mut starts)
}

impl Datapath for BpfDatapath {
    fn snapshot(&self) -> Result<Snapshot> {
        let mut snap = Snapshot::default();
        for item in self.services.iter() {
            let (k, v) = item.map_err(|e| map_err("iterate", maps::SERVICES, e))?;
            snap.services.insert(k, v);
        }
        let slots: Vec<Backend> =
            sys::array_lookup_all(self.backends.fd().as_fd(), self.backend_capacity)
                .map_err(|e| DatapathError::Other(format!("reading {}: {e}", maps::BACKENDS)))?;
        for (i, b) in slots.into_iter().enumerate() {
            if b != Backend::default() {
                snap.backends.insert(i as u32, b);
            }
        }
        for item in self.meta.iter() {
            let (k, v) = item.map_err(|e| map_err("iterate", maps::SERVICE_META, e))?;
            snap.meta.insert(k, v);
        }
        if let Some(t) = &self.terminated {
            snap.terminated = t.iter().filter_map(std::result::Result::ok).collect();
        }
        Ok(snap)
    }

    fn backend_capacity(&self) -> u32 {
        self.backend_capacity
    }

    fn put_backends(&mut self, base: u32, backends: &[Backend]) -> Result<()> {
        if u64::from(base) + backends.len() as u64 > u64::from(self.backend_capacity) {
            return Err(backends_full());
        }
        sys::array_update_batch(self.backends.fd().as_fd(), base, backends).map_err(|(done, e)| {
            DatapathError::Other(format!(
                "writing {} slots {base}..: {e} after {done}",
                maps::BACKENDS
            ))
        })
    }

    fn grace(&mut self) -> Result<()> {
        let err = |e: std::io::Error| DatapathError::Other(format!("RCU grace period: {e}"));
        if self.grace.is_none() {
            self.grace = Some(sys::GraceMaps::new().map_err(err)?);
        }
        match &self.grace {
            Some(g) => g.wait().map_err(err),
            None => Ok(()),
        }
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.filter_add(key)?;
        self.node_ports_update(std::iter::once((key, Some(value))), true)?;
        let r = self
            .services
            .insert(key, value, 0)
            .map_err(|e| map_err("insert", maps::SERVICES, e));
        match self.services.get(key, 0) {
            // Not in the map after all: its bit would only cost a lookup,
            // but the count must match the map.
            Err(_) if r.is_err() => {
                self.filter_remove(key)?;
                self.node_ports_update(std::iter::once((key, None)), false)?;
            }
            // Whatever it holds now (the old value if the write failed).
            Ok(now) => self.node_ports_update(std::iter::once((key, Some(&now))), false)?,
            Err(_) => {}
        }
        r
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<()> {
        match self.services.remove(key) {
            Err(e) if !not_found(&e) => Err(map_err("delete", maps::SERVICES, e)),
            _ => {
                self.filter_remove(key)?;
                self.node_ports_update(std::iter::once((key, None)), false)
            }
        }
    }

    fn put_meta(&mut self, svc_id: u32, meta: &ServiceMeta) -> Result<()> {
        self.meta
            .insert(svc_id, meta, 0)
            .map_err(|e| map_err("insert", maps::SERVICE_META, e))
    }

    fn delete_meta(&mut self, svc_id: u32) -> Result<()> {
        match self.meta.remove(&svc_id) {
            Err(e) if !not_found(&e) => Err(map_err("delete", maps::SERVICE_META, e)),
            _ => Ok(()),
        }
    }

    fn put_backend_ranges(&mut self, ranges: &[(u32, &[Backend])]) -> Failures {
        let (fd, capacity) = (self.backends.fd().as_fd(), self.backend_capacity);
        resume(ranges, |rest| write_ranges(fd, capacity, rest))
    }

    fn put_metas(&mut self, entries: &[(u32, ServiceMeta)]) -> Failures {
        let fd = self.meta.map().fd().as_fd();
        resume(entries, |rest| {
            hash_update_batch(fd, maps::SERVICE_META, rest)
        })
    }

    /// The filter's bits of every new key first (one batch of words), then
    /// the entries; a key that then is not in the map gives its bit back.
    fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Failures {
        let added = self
            .filter_add_all(entries.iter().map(|(k, _)| k))
            .and_then(|()| self.node_ports_update(entries.iter().map(|(k, v)| (k, Some(v))), true));
        if let Err(e) = added {
            let e = e.to_string();
            return (0..entries.len())
                .map(|i| (i, DatapathError::Other(e.clone())))
                .collect();
        }
        let fd = self.services.map().fd().as_fd();
        let mut failed = resume(entries, |rest| hash_update_batch(fd, maps::SERVICES, rest));
        let mut now: Vec<(ServiceKey, Option<ServiceValue>)> = Vec::new();
        for (i, e) in &mut failed {
            let key = &entries[*i].0;
            let value = self.services.get(key, 0).ok();
            if value.is_none()
                && let Err(filter) = self.filter_remove(key)
            {
                *e = filter;
            }
            now.push((*key, value));
        }
        // Entries that lost the flag, and failed ones as they are now.
        let failed_at: HashSet<usize> = failed.iter().map(|(i, _)| *i).collect();
        let written = entries
            .iter()
            .enumerate()
            .filter(|(i, _)| !failed_at.contains(i))
            .map(|(_, (k, v))| (k, Some(v)));
        let cleared = self.node_ports_update(
            written.chain(now.iter().map(|(k, v)| (k, v.as_ref()))),
            false,
        );
        if let Err(e) = cleared {
            // The entries are written; the bits are recounted on next use.
            tracing::warn!(error = %e, "updating the bind-protection bits");
        }
        failed
    }

    fn max_svc_id(&self) -> u32 {
        match &self.svc_stats {
            Some((_, slots)) => slots.saturating_sub(1).max(1),
            None => u32::MAX,
        }
    }

    /// Zeroes the id's counter slot on every CPU and its terminated-socket
    /// count, so a frontend that gets a reused id starts from 0.
    fn reset_svc_stats(&mut self, svc_id: u32) -> Result<()> {
        if let Some(t) = &mut self.terminated {
            match t.remove(&svc_id) {
                Err(e) if !not_found(&e) => return Err(map_err("delete", maps::TERMINATED, e)),
                _ => {}
            }
        }
        let Some((map, slots)) = &mut self.svc_stats else {
            return Ok(());
        };
        if svc_id >= *slots {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| DatapathError::Other(format!("counting CPUs: {e}")))?;
        let zero = PerCpuValues::try_from(vec![SvcStats::default(); cpus])
            .map_err(|e| DatapathError::Other(format!("{}: {e}", maps::SVC_STATS)))?;
        map.set(svc_id, zero, 0)
            .map_err(|e| map_err("write", maps::SVC_STATS, e))
    }

    fn count_map_full(&mut self, n: u64) -> Result<()> {
        let current = self
            .stats
            .get(&stats::MAP_FULL, 0)
            .map_err(|e| map_err("read", maps::STATS, e))?;
        let mut values: Vec<u64> = current.iter().copied().collect();
        if let Some(first) = values.first_mut() {
            *first += n;
        }
        let values = PerCpuValues::try_from(values)
            .map_err(|e| DatapathError::Other(format!("stats: {e}")))?;
        self.stats
            .set(stats::MAP_FULL, values, 0)
            .map_err(|e| map_err("write", maps::STATS, e))
    }

    fn note_synced(&mut self, at: std::time::SystemTime) -> Result<()> {
        let Some(map) = &mut self.agent else {
            return Ok(());
        };
        update_record(map, |state| {
            state.pid = std::process::id();
            state.last_sync_ns = unix_ns(at);
            state.syncs += 1;
        })
    }

    fn retain_affinity(&mut self, keep: &HashSet<u32>) -> Result<usize> {
        let Some((map, _)) = &mut self.affinity else {
            return Ok(0);
        };
        // Keys first, deletes after: deleting during the walk would restart it.
        let mut doomed = Vec::new();
        for key in map.keys() {
            match key {
                Ok(k) if !keep.contains(&k.svc_id) => doomed.push(k),
                Ok(_) => {}
                // The sweep stays due: the next pruning apply retries.
                Err(e) => return Err(map_err("iterate", maps::AFFINITY, e)),
            }
        }
        let mut deleted = 0;
        for key in &doomed {
            match map.remove(key) {
                Ok(()) => deleted += 1,
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(map_err("delete", maps::AFFINITY, e)),
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full map's error names the flag that sizes exactly that map.
    #[test]
    fn each_map_names_its_own_size_flag() {
        assert_eq!(size_flag(maps::SERVICES), "max-services");
        assert_eq!(size_flag(maps::BACKENDS), "max-backends");
        assert_eq!(size_flag(maps::SERVICE_META), "max-frontends");
        assert_eq!(size_flag(maps::REVERSE), "max-reverse");
        assert_eq!(size_flag(maps::SOCK), "max-sockets");
    }

    /// A probe's mask names the bits the agent counts keys on: each set
    /// bit once, numbered within its word.
    #[test]
    fn filter_bits_are_the_mask_bits_of_the_word() {
        let bits: Vec<u32> = filter_bits(2, 1 | 1 << 5 | 1 << 63).collect();
        assert_eq!(bits, [128, 133, 191]);
        assert_eq!(filter_bits(7, 0).count(), 0);
    }

    /// Pins of earlier versions, and every link pin (the release hook's
    /// included), are this agent's: `preflight` and `uninstall` know them.
    #[test]
    fn legacy_and_link_pins_are_known() {
        for name in [
            "LB_CONFIG",
            "LB_REVERSE4",
            "LB_SVC_META",
            "LB_REVERSE_SOCK",
            "LB_FILTER",
            "LB_FILTER2",
            "LB_SOCK",
            "LB_SOCK_SPILL",
            "link_sock_release",
            "link_sock_release_new",
            "link_connect4",
            "link_post_bind4",
            "link_post_bind6_new",
            "LB_NODE_PORTS",
            TRACE_LOCK,
        ] {
            assert!(known_pin(name), "{name}");
        }
        assert!(!known_pin("cilium_lb4_services_v2"));
    }
}

/// How full one pinned map is: what `list -o json` shows under `maps` and
/// `/metrics` exports as `lb_map_entries` and `lb_map_capacity`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapFill {
    pub map: &'static str,
    /// Entries in use: keys of a hash, held slots of an array of records,
    /// slots inside live ranges of the backend array, ids in use of the
    /// per-service counters.
    pub entries: u64,
    /// What it can hold (its `max_entries`; the ids of the counters).
    pub capacity: u64,
}

/// Fill of every map whose entries come and go; the fixed arrays (the
/// frontend filter, the global counters) are always full and left out.
/// `snap` is `dp`'s snapshot. Walks the LRU and spill hashes key by key.
pub fn map_fill(dir: &Path, dp: &BpfDatapath, snap: &Snapshot) -> Result<Vec<MapFill>> {
    let cap = |name| pinned_entries(dir, name).map_or(0, u64::from);
    let mut out = vec![
        MapFill {
            map: maps::SERVICES,
            entries: snap.services.len() as u64,
            capacity: cap(maps::SERVICES),
        },
        MapFill {
            map: maps::BACKENDS,
            entries: snap.services.values().map(|m| u64::from(m.count)).sum(),
            capacity: u64::from(dp.backend_capacity),
        },
        MapFill {
            map: maps::SERVICE_META,
            entries: snap.meta.len() as u64,
            capacity: cap(maps::SERVICE_META),
        },
    ];
    if dp.terminated.is_some() {
        out.push(MapFill {
            map: maps::TERMINATED,
            entries: snap.terminated.len() as u64,
            capacity: cap(maps::TERMINATED),
        });
    }
    if let Some(o) = dp.reverse_occupancy()? {
        out.push(MapFill {
            map: maps::REVERSE,
            entries: o.entries,
            capacity: u64::from(o.max_entries),
        });
    }
    if let Some(o) = dp.affinity_occupancy() {
        out.push(MapFill {
            map: maps::AFFINITY,
            entries: o.entries,
            capacity: u64::from(o.max_entries),
        });
    }
    if let Some(o) = socket_occupancy(dir)? {
        out.push(MapFill {
            map: maps::SOCK,
            entries: o.slots,
            capacity: u64::from(o.max_slots),
        });
        out.push(MapFill {
            map: maps::SOCK_SPILL,
            entries: o.spilled,
            capacity: cap(maps::SOCK_SPILL),
        });
    }
    if let Some((_, slots)) = &dp.svc_stats {
        let ids: HashSet<u32> = snap.services.values().map(|m| m.svc_id).collect();
        out.push(MapFill {
            map: maps::SVC_STATS,
            entries: ids.iter().filter(|&&id| id > 0 && id < *slots).count() as u64,
            capacity: u64::from(slots.saturating_sub(1)),
        });
    }
    Ok(out)
}
