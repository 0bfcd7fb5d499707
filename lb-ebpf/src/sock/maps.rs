//! The maps every socket-LB program shares, and small typed accessors. All
//! programs live in one object, so the agent creates (or re-opens) each map
//! once and every program's relocation points at the same pinned map.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE, bpf_map_type, bpf_sock},
    helpers::generated::bpf_sk_storage_get,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    Backend, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FRONTENDS, DEFAULT_MAX_REVERSE,
    DEFAULT_MAX_SERVICES, FILTER_WORDS, ReverseKey, ReverseValue, ServiceKey, ServiceMeta,
    ServiceValue, SockState, filter_bit, stats,
};

/// One entry per frontend: its backends' range in `BACKENDS`. NO_PREALLOC:
/// an update swaps in a fresh element under RCU, so a concurrent reader sees
/// the old value or the new one, never a mix.
#[map(name = "LB_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(DEFAULT_MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Every frontend's backends, each frontend a contiguous range. An array:
/// the verifier inlines its lookup (a bounds check and an address
/// computation, no hashing), and a slot costs 24 B.
#[map(name = "LB_BACKENDS")]
static BACKENDS: Array<Backend> = Array::pinned(DEFAULT_MAX_BACKENDS, 0);

/// The frontend filter: bit `filter_bit(key)` is set for every key of
/// `SERVICES` (the agent sets it before inserting the key and clears it
/// only after the last key on it is deleted), so a clear bit proves the
/// destination is no frontend. An array: the verifier inlines its lookup,
/// and a word read costs no hashing.
#[map(name = "LB_FILTER")]
static FILTER: Array<u64> = Array::pinned(FILTER_WORDS, 0);

/// Read only by the agent (names for `lb-agent list` and ID re-adoption); it
/// lives here so it is created and pinned with the maps it describes. One
/// entry per frontend, so sized in frontends (`--max-frontends`).
#[map(name = "LB_SVC_META")]
static SVC_META: HashMap<u32, ServiceMeta> =
    HashMap::pinned(DEFAULT_MAX_FRONTENDS, BPF_F_NO_PREALLOC);

#[map(name = "LB_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

/// Non-zero: emit aya-log debug records. A read-only global the agent sets
/// at load (`lb_common::DEBUG_LOG_GLOBAL`): the verifier knows its value, so
/// a program loaded without logging carries no logging code and no lookup.
#[unsafe(no_mangle)]
static LB_DEBUG_LOG: u32 = 0;

/// (socket cookie, backend) → frontend of unconnected UDP sockets
/// (sendmsg), for recvmsg. Such a socket may send to many backends and has
/// no peer to delete by at close, so this is an LRU: a full map evicts
/// instead of refusing. LRU maps are always preallocated (NO_PREALLOC is
/// refused). The socket's storage holds its last pair too, so a datagram
/// to the same pair as the one before costs no lookup here.
#[map(name = "LB_REVERSE")]
static REVERSE: LruHashMap<ReverseKey, ReverseValue> = LruHashMap::pinned(DEFAULT_MAX_REVERSE, 0);

/// A BTF map definition of socket-local storage, pinned by name. aya-ebpf's
/// `btf_maps::SkStorage` has no `pinning` member, and the agent must find
/// the same map again after a restart or upgrade (sockets translated before
/// keep their storage in it); aya-obj reads `pinning` as libbpf does. Every
/// member is a pointer whose pointee's type encodes the value (BTF only).
#[repr(C)]
pub struct SkStorageDef<V> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const V,
    /// Socket storage has no size of its own: 0.
    max_entries: *const [i32; 0],
    /// Required by the kernel for socket storage.
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    /// `LIBBPF_PIN_BY_NAME`.
    pinning: *const [i32; 1],
}

// SAFETY: never dereferenced; the loader reads its BTF and relocates uses.
unsafe impl<V> Sync for SkStorageDef<V> {}

impl<V> SkStorageDef<V> {
    const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    #[inline(always)]
    fn as_ptr(&self) -> *mut c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }
}

/// Each translated socket's [`SockState`], in the socket itself: written
/// by connect and sendmsg, read by recvmsg and getpeername, freed by the
/// kernel with the socket (no release-time program, no table that fills
/// with dead sockets, no cookie to key it by).
///
/// Issue 12 (terminating sockets of a removed backend) finds the sockets
/// translated through a frontend here: sock_diag dumps each socket's
/// storage of the maps it names (`INET_DIAG_REQ_SK_BPF_STORAGES` with this
/// map's fd; the reply carries `INET_DIAG_BPF_SK_STORAGES` next to the
/// socket's cookie), or a `bpf_iter__bpf_sk_storage_map` program walks
/// it; a socket matches by `conn` (`addr`, `port`, `svc_id`, `backend`).
#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "LB_SOCK")]
static SOCK: SkStorageDef<SockState> = SkStorageDef::new();

/// The socket's storage, created from `init` if `init` is not null.
#[inline(always)]
fn sock_storage(sk: *mut bpf_sock, init: *mut SockState, flags: u64) -> *mut SockState {
    // SAFETY: `sk` is the context's socket (never null in sock_addr
    // programs); `init` is null or a stack value of the map's value size.
    unsafe { bpf_sk_storage_get(SOCK.as_ptr(), sk.cast(), init.cast(), flags) }.cast()
}

/// The socket's storage if it has one (a lookup, no allocation).
#[inline(always)]
pub fn sock_state(sk: *mut bpf_sock) -> *mut SockState {
    sock_storage(sk, core::ptr::null_mut(), 0)
}

/// Creates the socket's storage holding `init`: only after [`sock_state`]
/// missed, so a socket allocates once however often it is translated.
#[inline(always)]
pub fn create_sock_state(sk: *mut bpf_sock, init: &SockState) {
    let mut init = *init;
    if sock_storage(sk, &mut init, u64::from(BPF_SK_STORAGE_GET_F_CREATE)).is_null() {
        bump(stats::REVERSE_WRITE_FAILED);
    }
}

/// Benchmark-only [`lb_common::ablate`] bits; 0 in service.
#[unsafe(no_mangle)]
static LB_ABLATE: u32 = 0;

/// Whether ablation bit `bit` is set (known to the verifier: dead code goes).
#[inline(always)]
pub fn ablated(bit: u32) -> bool {
    // SAFETY: as for `debug_enabled`.
    unsafe { core::ptr::read_volatile(&LB_ABLATE) & bit != 0 }
}

/// Whether `key` may be a frontend (`false`: it is not).
#[inline(always)]
pub fn maybe_service(key: &ServiceKey) -> bool {
    let bit = filter_bit(key);
    match FILTER.get_ptr(bit >> 6) {
        // SAFETY: as for `service`.
        Some(word) => (unsafe { *word } >> (bit & 63)) & 1 != 0,
        None => true,
    }
}

#[inline(always)]
pub fn service(key: &ServiceKey) -> Option<ServiceValue> {
    let ptr = SERVICES.get_ptr(key)?;
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    Some(unsafe { *ptr })
}

/// The backend in slot `index` of the backend array.
#[inline(always)]
pub fn backend(index: u32) -> Option<Backend> {
    let ptr = BACKENDS.get_ptr(index)?;
    // SAFETY: as above.
    Some(unsafe { *ptr })
}

#[inline(always)]
pub fn reverse(key: &ReverseKey) -> Option<ReverseValue> {
    let ptr = REVERSE.get_ptr(key)?;
    // SAFETY: as above.
    Some(unsafe { *ptr })
}

/// Records an unconnected datagram's translation, only if the entry
/// differs (every datagram passes here, and a lookup is cheaper than an LRU
/// update, which pops a node from the LRU lists and takes a bucket lock).
/// After a write, one lookup sets the new element's reference bit, so a
/// full map does not evict it first (Cilium does the same).
#[inline(always)]
pub fn remember(key: &ReverseKey, value: &ReverseValue) {
    if reverse(key).is_some_and(|v| v == *value) {
        return;
    }
    if REVERSE.insert(key, value, 0).is_err() {
        bump(stats::REVERSE_WRITE_FAILED);
        return;
    }
    let _ = REVERSE.get_ptr(key);
}

#[inline(always)]
pub fn forget(key: &ReverseKey) {
    let _ = REVERSE.remove(key);
}

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn debug_enabled() -> bool {
    // SAFETY: a plain read of a global; volatile so the compiler does not
    // fold the load-time value into the 0 it was compiled with.
    unsafe { core::ptr::read_volatile(&LB_DEBUG_LOG) != 0 }
}
