//! The maps every socket-LB program shares, and small typed accessors. All
//! programs live in one object, so the agent creates (or re-opens) each map
//! once and every program's relocation points at the same pinned map.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    Backend, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_REVERSE, DEFAULT_MAX_SERVICES, ReverseKey,
    ReverseValue, ServiceKey, ServiceMeta, ServiceValue, config, stats,
};

/// Master and slot entries of every frontend. NO_PREALLOC: updates swap in a
/// fresh element under RCU, so a concurrent reader never sees a recycled one.
#[map(name = "LB_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(DEFAULT_MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "LB_BACKENDS")]
static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(DEFAULT_MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// Read only by the agent (names for `lb-agent list` and ID re-adoption); it
/// lives here so it is created and pinned with the maps it describes.
#[map(name = "LB_SVC_META")]
static SVC_META: HashMap<u32, ServiceMeta> =
    HashMap::pinned(DEFAULT_MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "LB_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

#[map(name = "LB_CONFIG")]
static CONFIG: Array<u32> = Array::pinned(config::COUNT, 0);

/// (socket cookie, backend) → frontend, for recvmsg and getpeername. LRU:
/// a socket that closes leaves its entries behind until they are evicted;
/// an evicted entry of a live socket means its replies show the backend.
/// LRU maps are always preallocated (NO_PREALLOC is refused for them).
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

/// Writes the entry unless it already holds `value`: the common case on the
/// sendmsg path is an unchanged entry, and a lookup is cheaper than an LRU
/// update (which pops a node from the LRU lists and takes a bucket lock).
#[inline(always)]
pub fn remember(key: &ReverseKey, value: &ReverseValue) {
    if reverse(key).is_some_and(|v| v == *value) {
        return;
    }
    if REVERSE.insert(key, value, 0).is_err() {
        bump(stats::REVERSE_WRITE_FAILED);
    }
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
    CONFIG.get(config::DEBUG_LOG).is_some_and(|v| *v != 0)
}
