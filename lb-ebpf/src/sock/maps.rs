//! The maps every socket-LB program shares, and small typed accessors. All
//! programs live in one object, so the agent creates (or re-opens) each map
//! once and every program's relocation points at the same pinned map.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    Backend, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FRONTENDS, DEFAULT_MAX_REVERSE,
    DEFAULT_MAX_SERVICES, ReverseKey, ReverseValue, ServiceKey, ServiceMeta, ServiceValue, stats,
};

/// Master and slot entries of every frontend. NO_PREALLOC: updates swap in a
/// fresh element under RCU, so a concurrent reader never sees a recycled one.
#[map(name = "LB_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(DEFAULT_MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "LB_BACKENDS")]
static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(DEFAULT_MAX_BACKENDS, BPF_F_NO_PREALLOC);

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

/// (socket cookie, backend) → frontend, for recvmsg and getpeername. LRU,
/// so a full map evicts instead of refusing; `sock_release` deletes a
/// connected socket's entry when it closes, so the map holds live sockets
/// (and unconnected UDP sockets' entries, which have no single peer to
/// delete by). LRU maps are always preallocated (NO_PREALLOC is refused).
#[map(name = "LB_REVERSE")]
static REVERSE: LruHashMap<ReverseKey, ReverseValue> = LruHashMap::pinned(DEFAULT_MAX_REVERSE, 0);

#[inline(always)]
pub fn service(key: &ServiceKey) -> Option<ServiceValue> {
    let ptr = SERVICES.get_ptr(key)?;
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    Some(unsafe { *ptr })
}

#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    let ptr = BACKENDS.get_ptr(id)?;
    // SAFETY: as above.
    Some(unsafe { *ptr })
}

#[inline(always)]
pub fn reverse(key: &ReverseKey) -> Option<ReverseValue> {
    let ptr = REVERSE.get_ptr(key)?;
    // SAFETY: as above.
    Some(unsafe { *ptr })
}

/// Records a translation. `fresh`: the socket cannot have an entry yet (a
/// connect), so no lookup first; otherwise (sendmsg, every datagram) the
/// entry is written only if it differs, since a lookup is cheaper than an
/// LRU update (which pops a node from the LRU lists and takes a bucket
/// lock). After a write, one lookup sets the new element's reference bit,
/// so a full map does not evict it first (Cilium does the same).
#[inline(always)]
pub fn remember(key: &ReverseKey, value: &ReverseValue, fresh: bool) {
    if !fresh && reverse(key).is_some_and(|v| v == *value) {
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
