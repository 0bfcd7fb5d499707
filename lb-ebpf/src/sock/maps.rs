//! The maps every socket-LB program shares, and small typed accessors. All
//! programs live in one object, so the agent creates (or re-opens) each map
//! once and every program's relocation points at the same pinned map.
use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg, atomic_xsub};

use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    AffinityKey, AffinityValue, AgentState, Backend, DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_FRONTENDS, DEFAULT_MAX_REVERSE, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SOCKETS,
    FILTER_WORDS, NODE_PORT_WORDS, ReverseKey, ReverseValue, SLOT_CLAIMING, ServiceKey,
    ServiceMeta, ServiceValue, SockReverse, SockSlot, SockState, SvcStats, filter_probe,
    node_port_bit, stats,
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

/// The frontend filter: the bits of `filter_probe(key)` are set for every
/// key of `SERVICES` (the agent sets them before inserting the key, in one
/// word write, and clears each only after the last key on it is deleted),
/// so a clear one proves the destination is no frontend. An array: the
/// verifier inlines its lookup, and a word read costs no hashing.
#[map(name = "LB_FILTER2")]
static FILTER: Array<u64> = Array::pinned(FILTER_WORDS, 0);

/// Read only by the agent (names for `lb-agent list` and ID re-adoption); it
/// lives here so it is created and pinned with the maps it describes. One
/// entry per frontend, so sized in frontends (`--max-frontends`).
#[map(name = "LB_SVC_META")]
static SVC_META: HashMap<u32, ServiceMeta> =
    HashMap::pinned(DEFAULT_MAX_FRONTENDS, BPF_F_NO_PREALLOC);

#[map(name = "LB_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

/// Per-service counters, indexed by service id (the agent hands out ids
/// below `max_entries`, sized by `--max-frontends`). Per-CPU: an add with
/// no atomic and no shared cache line.
#[map(name = "LB_SVC_STATS")]
static SVC_STATS: PerCpuArray<SvcStats> = PerCpuArray::pinned(DEFAULT_MAX_FRONTENDS + 1, 0);

/// Non-zero: emit aya-log debug records. A read-only global the agent sets
/// at load (`lb_common::DEBUG_LOG_GLOBAL`): the verifier knows its value, so
/// a program loaded without logging carries no logging code and no lookup.
#[unsafe(no_mangle)]
static LB_DEBUG_LOG: u32 = 0;

/// (socket cookie, backend) → frontend of unconnected UDP sockets
/// (sendmsg), for recvmsg. Such a socket may send to many backends and has
/// no peer to delete by at close, so this is an LRU: a full map evicts
/// instead of refusing. LRU maps are always preallocated (NO_PREALLOC is
/// refused). The socket's `LB_SOCK` slot holds its last pair too, so a
/// datagram to the same pair as the one before costs no lookup here.
#[map(name = "LB_REVERSE")]
static REVERSE: LruHashMap<ReverseKey, ReverseValue> = LruHashMap::pinned(DEFAULT_MAX_REVERSE, 0);

/// Translated sockets' records, slot `cookie & LB_SOCK_MASK`: written by
/// connect and sendmsg, read by recvmsg and getpeername, released by
/// `sock_release`. An array, so recording a socket is an inlined address
/// computation and a compare-and-swap on a slot: no hashing, no allocation,
/// no lock (socket-local storage allocated and charged memory per socket,
/// about 1.4 µs a connect; a hash insert and delete about 0.45 µs each).
/// Cookies come from one counter, so live sockets' slots rarely collide; a
/// socket whose slot another one holds goes to `SOCK_SPILL`.
#[map(name = "LB_SOCK")]
static SOCK: Array<SockSlot> = Array::pinned(DEFAULT_MAX_SOCKETS, 0);

/// Connected sockets whose slot was held: cookie → record, deleted by
/// `sock_release`. Looked at only while the slot's `spill` count is non-zero.
#[map(name = "LB_SOCK_SPILL")]
static SOCK_SPILL: HashMap<u64, SockReverse> =
    HashMap::pinned(DEFAULT_MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Sockets the agent destroyed, per service id: written and read by the
/// agent only (`lb-agent list` shows it); here so it is created and pinned
/// with the maps it counts for.
#[map(name = "LB_TERMINATED")]
static TERMINATED: HashMap<u32, u64> = HashMap::pinned(DEFAULT_MAX_FRONTENDS, BPF_F_NO_PREALLOC);

/// Session affinity: (client network namespace, service id) → the
/// client's backend. An LRU: a full map evicts the least recently used
/// client, which then picks anew; the agent deletes the entries of a
/// service id that is gone or lost its affinity.
#[map(name = "LB_AFFINITY")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(DEFAULT_MAX_AFFINITY, 0);

/// `lb-agent trace`'s lease (`lb_common::trace`): 0, or the
/// CLOCK_MONOTONIC deadline until which translations are traced.
#[map(name = "LB_TRACE")]
static TRACE: Array<u64> = Array::pinned(1, 0);

/// Trace events (`lb_common::TraceEvent`), read by `lb-agent trace`.
#[map(name = "LB_TRACE_RING")]
pub static TRACE_RING: RingBuf = RingBuf::pinned(lb_common::trace::RING_BYTES, 0);

/// The agent's pid and last sync for `lb-agent status`: written and read
/// by the agent only; here so it is created and pinned with the maps.
#[map(name = "LB_AGENT")]
static AGENT: Array<AgentState> = Array::pinned(1, 0);

/// Bind protection: bit `node_port_bit(proto, port)` set while some
/// frontend flagged `SVC_FLAG_NODE_PORT` serves that nodePort (the agent
/// keeps it from the service entries it writes, as the filter). An array
/// of 16 KiB: one inlined read answers "is this a NodePort", whatever the
/// number of Services or node addresses, so a bind to any other port costs
/// that one read and no hashing.
#[map(name = "LB_NODE_PORTS")]
static NODE_PORTS: Array<u64> = Array::pinned(NODE_PORT_WORDS, 0);

/// Whether some frontend serves `port` (host byte order) as a nodePort of
/// `proto`.
#[inline(always)]
pub fn is_node_port(proto: u8, port: u16) -> bool {
    let Some(bit) = node_port_bit(proto, port) else {
        return false;
    };
    match NODE_PORTS.get_ptr(bit >> 6) {
        // SAFETY: as for `service`.
        Some(word) => (unsafe { *word } >> (bit & 63)) & 1 != 0,
        None => false,
    }
}

/// The trace lease, read once (0: off).
#[inline(always)]
pub fn trace_lease() -> u64 {
    match TRACE.get_ptr(0) {
        // SAFETY: as for `service`.
        Some(lease) => unsafe { core::ptr::read_volatile(lease) },
        None => 0,
    }
}

/// `LB_SOCK`'s size minus one, set by the agent at load (a read-only global).
#[unsafe(no_mangle)]
static LB_SOCK_MASK: u32 = DEFAULT_MAX_SOCKETS - 1;

/// The slot of the socket with `cookie`.
#[inline(always)]
pub fn sock_slot(cookie: u64) -> Option<*mut SockSlot> {
    // SAFETY: a plain read of a read-only global (volatile: see `debug_enabled`).
    let mask = unsafe { core::ptr::read_volatile(&LB_SOCK_MASK) };
    SOCK.get_ptr_mut(cookie as u32 & mask)
}

/// The slot's owner, read once.
#[inline(always)]
pub fn slot_owner(slot: *mut SockSlot) -> u64 {
    // SAFETY: a map value pointer is valid for this program run.
    unsafe { core::ptr::read_volatile(&(*slot).cookie) }
}

/// Claims a free slot for `cookie` and fills it with `state`; `false` if
/// another socket holds it (or claimed it first).
#[inline(always)]
pub fn claim_slot(slot: *mut SockSlot, cookie: u64, state: &SockState) -> bool {
    // SAFETY: an aligned u64 inside a map value, valid for this program
    // run; other programs change it only with atomics (BPF_CMPXCHG,
    // BPF_STX stores of a whole word).
    let owner = unsafe { &raw mut (*slot).cookie };
    let (_, claimed) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            owner,
            0,
            SLOT_CLAIMING,
        )
    };
    if !claimed {
        return false;
    }
    // SAFETY: as above; the slot is ours until its cookie is stored.
    unsafe {
        (*slot).state = *state;
        // An exchange, not a store-release (BPF has that only from cpu v4):
        // fully ordered, so the state is written before the cookie shows.
        atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(owner, cookie);
    }
    true
}

/// Frees the slot of `cookie`'s socket (release-time).
#[inline(always)]
pub fn release_slot(slot: *mut SockSlot) {
    // SAFETY: as in `claim_slot`.
    unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(&raw mut (*slot).cookie, 0) };
}

/// Whether sockets of this slot's cookies may be in `SOCK_SPILL`.
#[inline(always)]
pub fn slot_spilled(slot: *mut SockSlot) -> bool {
    // SAFETY: as in `slot_owner`.
    unsafe { core::ptr::read_volatile(&(*slot).spill) != 0 }
}

/// Records a connected socket whose slot another socket holds.
#[inline(always)]
pub fn spill(slot: *mut SockSlot, cookie: u64, record: &SockReverse) {
    if SOCK_SPILL
        .insert(cookie, record, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        // SAFETY: as in `claim_slot`.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*slot).spill, 1) };
        bump(stats::SOCK_SPILLED);
    } else if SOCK_SPILL
        .insert(cookie, record, u64::from(BPF_EXIST))
        .is_err()
    {
        bump(stats::REVERSE_WRITE_FAILED);
    }
}

/// A spilled socket's record.
#[inline(always)]
pub fn spilled(cookie: u64) -> Option<SockReverse> {
    let ptr = SOCK_SPILL.get_ptr(cookie)?;
    // SAFETY: as for `service`.
    Some(unsafe { *ptr })
}

/// Deletes a spilled socket's record (release-time).
#[inline(always)]
pub fn unspill(slot: *mut SockSlot, cookie: u64) {
    if SOCK_SPILL.remove(cookie).is_ok() {
        // SAFETY: as in `claim_slot`.
        unsafe { atomic_xsub::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*slot).spill, 1) };
    }
}

/// `lb_common::HOST_NETNS_GLOBAL`: the host's network namespace cookie.
#[unsafe(no_mangle)]
static LB_HOST_NETNS: u64 = 0;

/// `lb_common::HOST_NETNS_ONLY_GLOBAL`: non-zero with `--host-netns-only`.
#[unsafe(no_mangle)]
static LB_HOST_NETNS_ONLY: u32 = 0;

/// The host's network namespace cookie; 0 if the agent could not tell.
#[inline(always)]
pub fn host_netns() -> u64 {
    // SAFETY: as for `debug_enabled`.
    unsafe { core::ptr::read_volatile(&LB_HOST_NETNS) }
}

/// Whether only host-namespace sockets are translated.
#[inline(always)]
pub fn host_netns_only() -> bool {
    // SAFETY: as for `debug_enabled`.
    unsafe { core::ptr::read_volatile(&LB_HOST_NETNS_ONLY) != 0 }
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
    let (index, mask) = filter_probe(key);
    match FILTER.get_ptr(index) {
        // SAFETY: as for `service`.
        Some(word) => (unsafe { *word } & mask) == mask,
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

/// The client's affinity entry, to read and refresh in place.
#[inline(always)]
pub fn affinity(key: &AffinityKey) -> Option<*mut AffinityValue> {
    AFFINITY.get_ptr_mut(key)
}

/// Records the client's backend. A failed write leaves the client without
/// affinity until its next connect; nothing else depends on it.
#[inline(always)]
pub fn set_affinity(key: &AffinityKey, value: &AffinityValue) {
    let _ = AFFINITY.insert(key, value, 0);
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

/// Which of a service's counters [`bump_service`] adds to.
#[derive(Clone, Copy)]
pub enum SvcCounter {
    Connect,
    Sendmsg,
    Refused,
}

/// Adds one to service `svc_id`'s counter: one per-CPU array lookup. An
/// id past the array (adopted from an installation sized larger) counts
/// nothing.
#[inline(always)]
pub fn bump_service(svc_id: u32, counter: SvcCounter) {
    if let Some(s) = SVC_STATS.get_ptr_mut(svc_id) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            match counter {
                SvcCounter::Connect => (*s).connect += 1,
                SvcCounter::Sendmsg => (*s).sendmsg += 1,
                SvcCounter::Refused => (*s).refused += 1,
            }
        }
    }
}

#[inline(always)]
pub fn debug_enabled() -> bool {
    // SAFETY: a plain read of a global; volatile so the compiler does not
    // fold the load-time value into the 0 it was compiled with.
    unsafe { core::ptr::read_volatile(&LB_DEBUG_LOG) != 0 }
}
