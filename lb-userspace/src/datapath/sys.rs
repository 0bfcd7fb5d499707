//! The few bpf(2) commands aya 0.14 has no API for: batch update and batch
//! lookup of an array, a batched count of a hash, and an RCU grace period
//! (an update of a map-in-map); and the background thread's priority.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// `union bpf_attr`, as far as these commands read it (the kernel takes a
/// shorter attr and treats the rest as zero).
#[repr(C, align(8))]
#[derive(Default)]
struct Attr([u32; 32]);

impl Attr {
    fn u32(&mut self, word: usize, v: u32) -> &mut Self {
        self.0[word] = v;
        self
    }

    fn u64(&mut self, word: usize, v: u64) -> &mut Self {
        self.0[word] = v as u32;
        self.0[word + 1] = (v >> 32) as u32;
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised bpf_attr of the given size,
    // and every pointer in it points into memory the caller keeps alive.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Writes `values` to array slots `base..` in one syscall. Returns how many
/// were written with the error if not all were.
pub fn array_update_batch<V>(
    map: BorrowedFd<'_>,
    base: u32,
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    let keys: Vec<u32> = (0..values.len() as u32).map(|i| base + i).collect();
    update_batch(map, &keys, values)
}

/// `BPF_MAP_UPDATE_BATCH` (any map type; each element is its own update,
/// in order, as `BPF_MAP_UPDATE_ELEM` with `BPF_ANY` would do it). `K` and
/// `V` must be the map's key and value layouts. Returns how many were
/// written with the error if not all were.
pub fn update_batch<K, V>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    debug_assert_eq!(keys.len(), values.len());
    let count = keys.len().min(values.len());
    if count == 0 {
        return Ok(());
    }
    let mut attr = Attr::default();
    // struct batch: in_batch, out_batch, keys, values (u64 each), count,
    // map_fd (u32 each), elem_flags, flags (u64 each).
    attr.u64(4, keys.as_ptr() as u64)
        .u64(6, values.as_ptr() as u64)
        .u32(8, count as u32)
        .u32(9, map.as_raw_fd() as u32);
    match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(_) => Ok(()),
        Err(e) => Err((attr.0[8] as usize, e)),
    }
}

/// Every slot of an array of `len` slots, in chunks of one syscall each.
pub fn array_lookup_all<V: Copy + Default>(map: BorrowedFd<'_>, len: u32) -> io::Result<Vec<V>> {
    let mut out: Vec<V> = Vec::with_capacity(len as usize);
    array_lookup_each(map, len, |chunk| out.extend_from_slice(chunk))?;
    Ok(out)
}

/// Every slot of an array of `len` slots, handed to `each` one chunk (one
/// syscall) at a time: a caller that keeps a few slots of a large array
/// (the socket records: 6 MiB at 65,536 slots) never holds it all.
pub fn array_lookup_each<V: Copy + Default>(
    map: BorrowedFd<'_>,
    len: u32,
    mut each: impl FnMut(&[V]),
) -> io::Result<()> {
    const CHUNK: u32 = 8192;
    let chunk = CHUNK.min(len.max(1));
    let mut keys = vec![0u32; chunk as usize];
    let mut values = vec![V::default(); chunk as usize];
    let values_ptr: *mut V = values.as_mut_ptr();
    let mut seen = 0usize;
    lookup_batch(
        map,
        keys.as_mut_ptr().cast(),
        values_ptr.cast(),
        chunk,
        |got| {
            let got = got.min(chunk as usize);
            // SAFETY: `values` holds `chunk` initialised values, the call just
            // wrote the first `got`, and no call runs while this slice lives.
            each(unsafe { std::slice::from_raw_parts(values_ptr, got) });
            seen += got;
            seen < len as usize
        },
    )
}

/// The elements of a hash map (plain or LRU, not per-CPU) whose keys and
/// values are `key_size` and `value_size` bytes, counted with
/// `BPF_MAP_LOOKUP_BATCH` in chunks of up to 8,192 (a few syscalls for a
/// map a key-by-key walk would take two per element for). A snapshot:
/// elements added or removed meanwhile may or may not count.
pub fn hash_count(map: BorrowedFd<'_>, key_size: usize, value_size: usize) -> io::Result<u64> {
    const CHUNK: usize = 8192;
    let mut keys = vec![0u8; CHUNK * key_size.max(1)];
    let mut values = vec![0u8; CHUNK * value_size.max(1)];
    let mut total = 0u64;
    lookup_batch(
        map,
        keys.as_mut_ptr(),
        values.as_mut_ptr(),
        CHUNK as u32,
        |got| {
            total += got as u64;
            true
        },
    )?;
    Ok(total)
}

/// `BPF_MAP_LOOKUP_BATCH` from the start of `map` into `keys` and `values`
/// (room for `chunk` elements each), one syscall a chunk; `each` gets how
/// many elements a call copied and says whether to go on. Ends when the
/// kernel has no element left (ENOENT, after handing over the last ones).
/// The batch position is a u32 for arrays (an index) and hashes (a bucket).
fn lookup_batch(
    map: BorrowedFd<'_>,
    keys: *mut u8,
    values: *mut u8,
    chunk: u32,
    mut each: impl FnMut(usize) -> bool,
) -> io::Result<()> {
    let (mut in_batch, mut out_batch) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = Attr::default();
        attr.u64(
            0,
            if first {
                0
            } else {
                &mut in_batch as *mut u32 as u64
            },
        )
        .u64(2, &mut out_batch as *mut u32 as u64)
        .u64(4, keys as u64)
        .u64(6, values as u64)
        .u32(8, chunk)
        .u32(9, map.as_raw_fd() as u32);
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        // On ENOENT (nothing left) count still says what this call copied.
        let more = each(attr.0[8] as usize);
        match result {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
        if !more {
            return Ok(());
        }
        in_batch = out_batch;
        first = false;
    }
}

/// A one-slot array of maps: an update of it returns only after an RCU
/// grace period (`maybe_wait_bpf_programs()` in kernel/bpf/syscall.c calls
/// `synchronize_rcu()` after every successful update of a
/// `BPF_MAP_TYPE_{HASH,ARRAY}_OF_MAPS`), so after it every program run that
/// started before it has finished. cgroup sock_addr programs are not
/// sleepable and run inside `rcu_read_lock()`.
pub struct GraceMaps {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl GraceMaps {
    pub fn new() -> io::Result<Self> {
        let inner = create_map(BPF_MAP_TYPE_ARRAY, 1, None)?;
        let outer = create_map(BPF_MAP_TYPE_ARRAY_OF_MAPS, 1, Some(inner.as_raw_fd()))?;
        Ok(Self { outer, inner })
    }

    /// Waits for an RCU grace period.
    pub fn wait(&self) -> io::Result<()> {
        let key = 0u32;
        let value = self.inner.as_raw_fd() as u32;
        let mut attr = Attr::default();
        // struct elem: map_fd (u32, padded), key, value, flags (u64 each).
        attr.u32(0, self.outer.as_raw_fd() as u32)
            .u64(2, &key as *const u32 as u64)
            .u64(4, &value as *const u32 as u64);
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
    }
}

fn create_map(map_type: u32, max_entries: u32, inner: Option<i32>) -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    // map_type, key_size, value_size, max_entries, map_flags, inner_map_fd.
    attr.u32(0, map_type)
        .u32(1, 4)
        .u32(2, 4)
        .u32(3, max_entries)
        .u32(5, inner.unwrap_or(0) as u32);
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches the link pinned at `path` at once (`BPF_LINK_DETACH`).
/// Removing the pin alone detaches only when the kernel frees the pin's
/// inode, after an RCU grace period: a connect right after `uninstall`
/// could still be translated.
pub fn detach_pinned_link(path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = Attr::default();
    // struct obj: pathname (u64), bpf_fd, file_flags.
    attr.u64(0, path.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = Attr::default();
    // struct link_detach: link_fd.
    attr.u32(0, link.as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `enum bpf_attach_type` values `status` probes.
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
/// `BPF_FUNC_get_netns_cookie`.
pub const HELPER_GET_NETNS_COOKIE: i32 = 122;

/// Whether the kernel loads a minimal `cgroup/sock_addr` program for
/// `attach_type` (calling `helper` first, if given): an attach type or
/// helper it does not know is refused with EINVAL. Other errors (EPERM:
/// no CAP_BPF) are returned, since they say nothing about the kernel.
pub fn probe_sock_addr(attach_type: u32, helper: Option<i32>) -> io::Result<bool> {
    // struct bpf_insn as u64: code | regs << 8 | off << 16 | imm << 32.
    let insn = |code: u8, imm: i32| u64::from(code) | (u64::from(imm as u32) << 32);
    let mut insns = Vec::new();
    if let Some(helper) = helper {
        insns.push(insn(0x85, helper)); // call helper (r1 is the context)
    }
    insns.push(insn(0xb7, 1)); // r0 = 1
    insns.push(insn(0x95, 0)); // exit
    let license = c"GPL";
    let mut attr = Attr::default();
    // prog_type, insn_cnt, insns, license, …, expected_attach_type (word 17).
    attr.u32(0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR)
        .u32(1, insns.len() as u32)
        .u64(2, insns.as_ptr() as u64)
        .u64(4, license.as_ptr() as u64)
        .u32(17, attach_type);
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => {
            // SAFETY: the kernel returned a new file descriptor we own.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// What a pinned cgroup link is: `bpf_link_info` with its cgroup part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_id: u32,
    pub program_id: u32,
    /// 0 once the link is detached (its cgroup was removed).
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// [`CgroupLinkInfo`] of the link pinned at `path` (aya 0.14's `LinkInfo`
/// has no cgroup id).
pub fn cgroup_link_info(path: &Path) -> io::Result<CgroupLinkInfo> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = Attr::default();
    attr.u64(0, path.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // type, id, prog_id, padding, then the union: cgroup_id, attach_type.
    let mut info = [0u32; 8];
    let mut attr = Attr::default();
    attr.u32(0, link.as_raw_fd() as u32)
        .u32(1, size_of_val(&info) as u32)
        .u64(2, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(CgroupLinkInfo {
        link_id: info[1],
        program_id: info[2],
        cgroup_id: u64::from(info[4]) | (u64::from(info[5]) << 32),
        attach_type: info[6],
    })
}

/// Gives the calling thread (not the process: Linux keeps a nice value per
/// thread) the lowest priority, nice 19, for background work that may
/// wait while anything else wants the CPU.
pub fn lower_thread_priority() -> io::Result<()> {
    // SAFETY: setpriority(2) reads no memory; `who` 0 is the caller.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
