//! Small Linux helpers: namespaces, cgroups, signals.
use std::{
    fs,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Moves the calling thread into the named network namespace (`ip netns add`
/// names live in /run/netns). Call it while the process is single-threaded.
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    let path = Path::new("/run/netns").join(name);
    let f = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: a valid namespace fd and a constant flag.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("setns {name}"));
    }
    Ok(())
}

/// Moves this process into `cgroup` (a cgroup v2 directory).
pub fn join_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("writing {}", procs.display()))
}

/// The cgroup v2 mount, from /proc/mounts (hybrid hosts have it at
/// /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        if let (Some(_), Some(dir), Some("cgroup2")) = (f.next(), f.next(), f.next()) {
            return Ok(PathBuf::from(dir));
        }
    }
    bail!("no cgroup2 mount in /proc/mounts")
}

/// Kills what is left in a cgroup and removes it, retrying while the kernel
/// finishes reaping.
pub fn remove_cgroup(path: &Path) {
    for _ in 0..50 {
        if let Ok(procs) = fs::read_to_string(path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        match fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

pub fn children_with_prefix(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect()
}

/// SIGTERM, then SIGKILL after `grace`.
pub fn terminate(child: &mut Child, grace: Duration) -> anyhow::Result<()> {
    let pid = i32::try_from(child.id())?;
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("process {pid} exited with {status}");
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    child.wait()?;
    bail!("process {pid} ignored SIGTERM for {grace:?}")
}

/// `ECONNREFUSED` for 111, and so on for the errnos a connect can see.
pub fn errno_name(errno: i32) -> String {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNRESET => "ECONNRESET",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EAGAIN => "EAGAIN",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EDESTADDRREQ => "EDESTADDRREQ",
        _ => return format!("errno {errno}"),
    }
    .to_owned()
}

/// A pinned BPF map, opened with bpf(2) directly (the tests' binaries do
/// not link aya).
pub struct PinnedMap(i32);

impl PinnedMap {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::ffi::OsStrExt as _;
        const BPF_OBJ_GET: libc::c_long = 7;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
        #[repr(C)]
        struct ObjGet {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        let attr = ObjGet {
            pathname: c.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        };
        // SAFETY: attr is a valid BPF_OBJ_GET attribute for the call's duration.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET,
                &raw const attr,
                size_of::<ObjGet>() as u32,
            )
        };
        if fd < 0 {
            bail!(
                "BPF_OBJ_GET {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Self(fd as i32))
    }

    /// The map's `max_entries` (BPF_OBJ_GET_INFO_BY_FD).
    pub fn max_entries(&self) -> anyhow::Result<u32> {
        const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
        #[repr(C)]
        struct GetInfo {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        // struct bpf_map_info starts: type, id, key_size, value_size,
        // max_entries (u32 each); the kernel fills as much as we give.
        let mut info = [0u32; 22];
        let attr = GetInfo {
            bpf_fd: self.0 as u32,
            info_len: size_of_val(&info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        // SAFETY: attr points at a buffer of info_len bytes for the call's duration.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                &raw const attr,
                size_of::<GetInfo>() as u32,
            )
        };
        if rc < 0 {
            bail!(
                "BPF_OBJ_GET_INFO_BY_FD: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(info[4])
    }

    /// The value under `key` (of the map's value size `N`), `None` if absent.
    pub fn lookup<K, const N: usize>(&self, key: &K) -> Option<[u8; N]> {
        let mut value = [0u8; N];
        self.lookup_into(key, &mut value).then_some(value)
    }

    /// The value under `key` as a `V` (the map's value layout), `None` if
    /// absent.
    pub fn get<K, V: Default>(&self, key: &K) -> Option<V> {
        let mut value = V::default();
        self.lookup_into(key, &mut value).then_some(value)
    }

    fn lookup_into<K, V>(&self, key: &K, value: &mut V) -> bool {
        const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
        #[repr(C)]
        struct Lookup {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let attr = Lookup {
            map_fd: self.0 as u32,
            _pad: 0,
            key: (key as *const K) as u64,
            value: (value as *mut V) as u64,
            flags: 0,
        };
        // SAFETY: key and value point at objects of the map's key and value sizes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                &raw const attr,
                size_of::<Lookup>() as u32,
            )
        };
        rc == 0
    }
}

/// A socket's cookie (`SO_COOKIE`): the key the programs record it by.
pub fn socket_cookie(fd: i32) -> std::io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for the call; the kernel writes 8 bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

impl Drop for PinnedMap {
    fn drop(&mut self) {
        // SAFETY: our own fd.
        unsafe { libc::close(self.0) };
    }
}
