//! Map keys and values shared by the socket-LB programs and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides hash and
//! compare identical bytes. Addresses and ports are stored in **network byte
//! order** exactly as the kernel hands them to a `sock_addr` program, so the
//! program never swaps bytes on the hot path.
//!
//! Both families share one set of maps: an address is 16 bytes, laid out as
//! `bpf_sock_addr.user_ip6`, and an IPv4 address is stored IPv4-mapped
//! (`::ffff:a.b.c.d`). A dual-stack socket connecting to `::ffff:10.96.0.10`
//! therefore finds the IPv4 service with no extra lookup, and its backends
//! come back in the mapped form that socket needs.
#![no_std]

/// An IPv6 address, or an IPv4-mapped IPv4 address, as the four 32-bit
/// words of `bpf_sock_addr.user_ip6` (each word in network byte order).
pub type Addr = [u32; 4];

/// Word 2 of an IPv4-mapped address: the bytes `00 00 ff ff`.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `::ffff:a.b.c.d` from `user_ip4` (network byte order).
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// The IPv4 address inside an IPv4-mapped address.
#[inline(always)]
pub const fn as_v4(addr: &Addr) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD {
        Some(addr[3])
    } else {
        None
    }
}

/// Whether a frontend address is loopback (`127.0.0.0/8`, IPv4-mapped, or
/// `::1`): such a frontend (a nodePort on `127.0.0.1`) answers sockets of
/// the host's network namespace only (see [`HOST_NETNS_GLOBAL`]).
#[inline(always)]
pub const fn is_loopback(addr: &Addr) -> bool {
    match as_v4(addr) {
        Some(ip4) => ip4.to_ne_bytes()[0] == 127,
        None => {
            addr[0] == 0
                && addr[1] == 0
                && addr[2] == 0
                && addr[3] == u32::from_ne_bytes([0, 0, 0, 1])
        }
    }
}

/// Read-only global (u64) of the socket programs: the cookie of the host's
/// network namespace (`SO_NETNS_COOKIE` of a socket the agent opens); 0:
/// unknown, so no socket counts as the host's.
pub const HOST_NETNS_GLOBAL: &str = "LB_HOST_NETNS";
/// Read-only global (u32): non-zero: `--host-netns-only`, every frontend
/// answers host-namespace sockets only (pods are left to another datapath).
pub const HOST_NETNS_ONLY_GLOBAL: &str = "LB_HOST_NETNS_ONLY";

/// Map names, shared so the agent finds the pins the program declares.
pub mod maps {
    pub const SERVICES: &str = "LB_SERVICES";
    pub const BACKENDS: &str = "LB_BACKENDS";
    pub const SERVICE_META: &str = "LB_SVC_META";
    pub const STATS: &str = "LB_STATS";
    /// The debug-log switch of earlier versions (now a read-only global of
    /// the programs, fixed at load); removed on install.
    pub const LEGACY_CONFIG: &str = "LB_CONFIG";
    /// LRU reverse map of both families for unconnected UDP (sendmsg):
    /// [`ReverseKey`] → [`ReverseValue`].
    pub const REVERSE: &str = "LB_REVERSE";
    /// The connected-socket reverse hash of earlier versions (socket cookie
    /// → [`SockReverse`], deleted by a `sock_release` program); removed on
    /// install, its link `link_sock_release` after the new links are in.
    pub const LEGACY_SOCK_REVERSE: &str = "LB_REVERSE_SOCK";
    /// The frontend filter: an array of [`FILTER_WORDS`] 64-bit words, the
    /// bits of [`filter_probe`] set for every key in `LB_SERVICES`.
    pub const FILTER: &str = "LB_FILTER2";
    /// The one-bit frontend filter of earlier versions (another hash, so
    /// another map: the previous programs keep reading theirs until the
    /// new links are in); removed on install.
    pub const LEGACY_FILTER: &str = "LB_FILTER";
    /// Translated sockets' records: an array of [`SockSlot`], slot
    /// `cookie & mask` (see [`SOCK_MASK_GLOBAL`]), released by the
    /// `sock_release` program. Socket-local storage
    /// (`BPF_MAP_TYPE_SK_STORAGE`) of the same name in earlier versions; a
    /// pin of that type is replaced.
    pub const SOCK: &str = "LB_SOCK";
    /// Connected sockets whose [`SOCK`] slot another live socket holds:
    /// socket cookie → [`SockReverse`], deleted by `sock_release`.
    pub const SOCK_SPILL: &str = "LB_SOCK_SPILL";
    /// Sockets the agent destroyed because their backend left their
    /// frontend (`--terminate-sockets`): service id → count. Written and
    /// read by userspace only; pinned so `lb-agent list` can show it.
    pub const TERMINATED: &str = "LB_TERMINATED";
    /// Session affinity (`sessionAffinity: ClientIP`): (client network
    /// namespace, service id) → [`AffinityValue`], an LRU.
    pub const AFFINITY: &str = "LB_AFFINITY";
    /// Per-service datapath counters: a per-CPU array of [`SvcStats`]
    /// indexed by service id (ids are `1..max_entries`), read by
    /// `/metrics`. A slot is zeroed by the agent before its id is reused.
    pub const SVC_STATS: &str = "LB_SVC_STATS";
    /// The IPv4-only reverse map of earlier versions; removed on install.
    pub const LEGACY_REVERSE4: &str = "LB_REVERSE4";
    /// `lb-agent trace`'s switch: a one-entry array holding the tracers'
    /// lease (see [`trace`](super::trace)); 0 while no one traces.
    pub const TRACE: &str = "LB_TRACE";
    /// The ring buffer of [`TraceEvent`](super::TraceEvent)s, written
    /// only while [`TRACE`] holds a live lease.
    pub const TRACE_RING: &str = "LB_TRACE_RING";
    /// The running agent's [`AgentState`](super::AgentState), one entry,
    /// for `lb-agent status`; written and read by userspace only.
    pub const AGENT: &str = "LB_AGENT";
    /// Bind protection's NodePorts: an array of [`NODE_PORT_WORDS`]
    /// 64-bit words, bit [`node_port_bit`] set for every (protocol,
    /// nodePort) some entry of `LB_SERVICES` flagged
    /// [`SVC_FLAG_NODE_PORT`](super::SVC_FLAG_NODE_PORT) serves.
    pub const NODE_PORTS: &str = "LB_NODE_PORTS";
}

/// IANA protocol numbers, as found in `bpf_sock_addr.protocol`.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Socket types, as found in `bpf_sock_addr.type`.
pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;

/// Default map sizes; the agent can override them at load time. The hash
/// maps are `BPF_F_NO_PREALLOC`: an element costs memory only once written;
/// what an empty node pays up front is the bucket array (16 B per entry of
/// `max_entries` rounded up to a power of two), so the defaults are powers
/// of two.
///
/// Frontends in `LB_SERVICES` (one per service port and ClusterIP family):
/// 512 KiB of buckets on an empty node.
pub const DEFAULT_MAX_SERVICES: u32 = 32_768;
/// Slots of the backend array `LB_BACKENDS`: one per endpoint of each
/// frontend, plus room for the new range of a frontend that is being
/// changed (make-before-break). An array is preallocated: 131,072 slots of
/// 24 B are 3 MiB, less than the two 2 MiB bucket arrays the slot and
/// backend hashes it replaces cost an empty node, and they hold 10,000
/// services of 10 endpoints with 31,072 slots to spare.
pub const DEFAULT_MAX_BACKENDS: u32 = 131_072;
/// Frontends (service ports) whose names `lb-agent list` shows: entries of
/// `LB_SVC_META`, one per frontend.
pub const DEFAULT_MAX_FRONTENDS: u32 = 32_768;
/// Entries of the LRU reverse map of unconnected UDP sockets: one per
/// (socket, backend) sendmsg translated. LRU maps are preallocated: 256 Ki
/// entries cost about 30 MiB of kernel memory (Cilium's default for its
/// `lb4_reverse_sk` is the same count).
pub const DEFAULT_MAX_REVERSE: u32 = 262_144;
/// Slots of `LB_SOCK`, one per translated socket open at a time (a power
/// of two: a socket's slot is its cookie masked). Preallocated: 65,536
/// slots of 96 B are 6 MiB. A socket whose slot a live socket holds goes
/// to `LB_SOCK_SPILL` (a hash of as many entries, at least 4,096,
/// allocated on use), so collisions cost speed, not correctness.
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;

/// Entries of the LRU `LB_AFFINITY`: one per (client network namespace,
/// frontend with session affinity) seen within the timeout. LRU maps are
/// preallocated: 16,384 entries are about 1.6 MiB; a full map evicts the
/// least recently used client, which then picks anew.
pub const DEFAULT_MAX_AFFINITY: u32 = 16_384;

/// Slots of a frontend's range a connect looks through for its client's
/// backend when that backend is no longer at the slot the entry remembers
/// (the range was rewritten). Past it, a client of a bigger frontend whose
/// backend moved picks anew.
pub const AFFINITY_SCAN: u32 = 256;

/// Name of the programs' read-only global holding `LB_SOCK`'s size minus
/// one (its size is a power of two): a socket's slot is `cookie & mask`.
/// Set by the agent at load from the pinned map's size, or from
/// `--max-sockets` for a new one.
pub const SOCK_MASK_GLOBAL: &str = "LB_SOCK_MASK";

/// [`SockSlot::cookie`] of a slot a program is filling: no socket has this
/// cookie, so readers skip the slot until the owner's cookie is stored.
pub const SLOT_CLAIMING: u64 = u64::MAX;

/// log2 of the frontend filter's bits: 2^20 bits (128 KiB, fixed whatever
/// the number of services). A destination whose bits are not all set is
/// not a frontend, and connect returns without hashing the 20-byte key and
/// walking a bucket of `LB_SERVICES`.
pub const FILTER_BITS_LOG2: u32 = 20;
/// 64-bit words of [`maps::FILTER`].
pub const FILTER_WORDS: u32 = 1 << (FILTER_BITS_LOG2 - 6);

/// A frontend's place in the filter: one word, and the mask of the
/// [`FILTER_HASHES`] bits it sets there (a blocked Bloom filter). One word
/// is still one read per destination, and three bits make a false positive
/// (a destination that pays the `LB_SERVICES` lookup anyway) rare enough
/// that node addresses, which multiply frontends by NodePorts × addresses,
/// barely change the cost of connecting elsewhere. The hash is murmur3's
/// finaliser over address, port and protocol (every address word counts):
/// a bare multiplicative hash maps the regular runs a cluster allocates
/// (consecutive ClusterIPs, a nodePort range on a few node addresses, the
/// same port in the other protocol) onto regular runs of bits, which
/// collide far more often than chance. Both sides compute it from the same
/// bytes: the program from the destination, the agent from the key.
#[inline(always)]
pub const fn filter_probe(key: &ServiceKey) -> (u32, u64) {
    let lo = key.addr[3] as u64 | ((key.port as u64) << 32) | ((key.proto as u64) << 48);
    let hi = (key.addr[0] ^ key.addr[1] ^ key.addr[2]) as u64;
    let mut x = lo ^ hi.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    let word = (x >> (64 - (FILTER_BITS_LOG2 - 6))) as u32;
    let mask = (1u64 << (x & 63)) | (1u64 << ((x >> 6) & 63)) | (1u64 << ((x >> 12) & 63));
    (word, mask)
}

/// Bits a frontend sets in its filter word (fewer when two coincide).
pub const FILTER_HASHES: u32 = 3;

/// Backends one frontend can balance over (the master's count is 16 bits).
/// The model caps a service's endpoints here (with a diagnostic).
pub const MAX_SLOTS: u16 = u16::MAX;

/// Key of the service map: one entry per frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend address (IPv4-mapped for IPv4), network byte order.
    pub addr: Addr,
    /// Frontend port, network byte order.
    pub port: u16,
    /// IP protocol (`PROTO_TCP` / `PROTO_UDP`).
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey {
    pub const fn new(addr: Addr, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// [`ServiceValue::flags`]: the frontend is a node address (or loopback) on
/// a Service's nodePort. Only bind protection reads it (a host-namespace
/// `bind()` to that address and port is refused); connects ignore flags.
pub const SVC_FLAG_NODE_PORT: u16 = 1;

/// 64-bit words of `LB_NODE_PORTS`: one bit per TCP port and one per UDP
/// port (16 KiB, fixed).
pub const NODE_PORT_WORDS: u32 = 2 * 65_536 / 64;

/// The `LB_NODE_PORTS` bit of a (protocol, port); the port in host byte
/// order, as `bpf_sock.src_port` holds it. `None` for other protocols.
#[inline(always)]
pub const fn node_port_bit(proto: u8, port: u16) -> Option<u32> {
    match proto {
        PROTO_TCP => Some(port as u32),
        PROTO_UDP => Some(65_536 + port as u32),
        _ => None,
    }
}

/// Value of the service map: where the frontend's backends are in the
/// backend array. The agent never rewrites a range a master points at: a
/// change writes a new range, then replaces this value (one atomic hash
/// update), and reuses the old range only after an RCU grace period, so a
/// reader that loaded this value finds `count` complete backends at `base`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// First slot of the frontend's range in `LB_BACKENDS`.
    pub base: u32,
    /// Backends in the range, at most [`MAX_SLOTS`]; 0 means "refuse connects".
    pub count: u16,
    /// `SVC_FLAG_*` bits: what kind of frontend this is, for programs
    /// other than connect's.
    pub flags: u16,
    /// Service (frontend) id, stable across agent restarts.
    pub svc_id: u32,
    /// Session affinity timeout in seconds (`sessionAffinity: ClientIP`);
    /// 0: none, every connect picks at random.
    pub affinity: u32,
}

impl ServiceValue {
    /// Frontend `svc_id` balancing over the `count` backends at `base`.
    pub const fn new(base: u32, count: u16, svc_id: u32) -> Self {
        Self {
            base,
            count,
            flags: 0,
            svc_id,
            affinity: 0,
        }
    }

    /// The same, with a session affinity timeout in seconds (0: none).
    pub const fn with_affinity(self, affinity: u32) -> Self {
        Self { affinity, ..self }
    }

    /// The same, with `SVC_FLAG_*` bits.
    pub const fn with_flags(self, flags: u16) -> Self {
        Self { flags, ..self }
    }
}

/// Key of `LB_AFFINITY`: one client of one frontend. The client is the
/// socket's network namespace (`bpf_get_netns_cookie`): the source address
/// is not chosen yet at `connect()`, and one pod is one namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    pub netns: u64,
    pub svc_id: u32,
    pub _pad: u32,
}

impl AffinityKey {
    pub const fn new(netns: u64, svc_id: u32) -> Self {
        Self {
            netns,
            svc_id,
            _pad: 0,
        }
    }
}

/// Value of `LB_AFFINITY`: the client's backend. Used only while that
/// backend is in the frontend's live range (checked at `slot`, else looked
/// for in the first [`AFFINITY_SCAN`] slots) and `last_used` is younger
/// than the frontend's timeout; refreshed on every use.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    /// Backend address (IPv4-mapped for IPv4), network byte order.
    pub backend: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    pub _pad: u16,
    /// Where in the frontend's range the backend was last found.
    pub slot: u32,
    /// `bpf_ktime_get_coarse_ns` of the last use.
    pub last_used: u64,
}

/// A backend address: one slot of the backend array `LB_BACKENDS`. A slot
/// whose `proto` is 0 was never written.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    /// Backend address (IPv4-mapped for IPv4), network byte order.
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Key of the reverse map: a socket the programs translated and the
/// backend they sent it to. Written by connect4/6 (TCP and connected UDP)
/// and sendmsg4/6 (unconnected UDP); read by recvmsg4/6 and getpeername4/6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReverseKey {
    /// `bpf_get_socket_cookie`: unique per socket for the kernel's uptime.
    pub cookie: u64,
    /// Backend address (IPv4-mapped for IPv4), network byte order.
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    pub _pad: [u16; 3],
}

impl ReverseKey {
    pub const fn new(cookie: u64, addr: Addr, port: u16) -> Self {
        Self {
            cookie,
            addr,
            port,
            _pad: [0; 3],
        }
    }
}

/// Value of the reverse map: the frontend the socket asked for. The
/// entry is honoured only while the frontend's master entry exists with the
/// same `svc_id` and a non-zero count, so a service deleted and recreated
/// under the same address never revives a stale translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReverseValue {
    /// Frontend address (IPv4-mapped for IPv4), network byte order.
    pub addr: Addr,
    /// Frontend port, network byte order.
    pub port: u16,
    pub _pad: u16,
    /// Service (frontend) id of the master entry at translation time.
    pub svc_id: u32,
}

/// One translation a socket's storage remembers: which backend a frontend
/// went to. Read by recvmsg4/6 and getpeername4/6, which use it only while
/// the peer is still `backend` and the frontend is live with the same
/// `svc_id`. Empty (all zero, `backend_port` 0: no backend has port 0)
/// until written.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockReverse {
    /// The backend the socket was sent to (IPv4-mapped for IPv4).
    pub backend: Addr,
    /// Backend port, network byte order.
    pub backend_port: u16,
    /// Frontend port, network byte order.
    pub port: u16,
    /// Service (frontend) id of the master entry at translation time.
    pub svc_id: u32,
    /// Frontend address (IPv4-mapped for IPv4), network byte order.
    pub addr: Addr,
}

/// What a translated socket's record holds, in its [`SockSlot`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockState {
    /// connect4/6: the socket's one peer (TCP or connected UDP); a
    /// reconnect overwrites it.
    pub conn: SockReverse,
    /// sendmsg4/6: the last (frontend, backend) an unconnected datagram
    /// went to, also recorded in `LB_REVERSE`: the next datagram to the
    /// same pair needs no LRU lookup, and replies from it are found here.
    pub dgram: SockReverse,
}

/// One slot of `LB_SOCK`. A program claims a free slot (`cookie` 0) with a
/// compare-and-swap to [`SLOT_CLAIMING`], fills `state`, then stores its
/// socket's cookie; `sock_release` stores 0 again. Readers use `state` only
/// under their own cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockSlot {
    /// The owning socket's cookie; 0 when free.
    pub cookie: u64,
    /// Sockets of this slot's cookies recorded in `LB_SOCK_SPILL` instead,
    /// because the slot was held: while 0, no reader or release looks there.
    pub spill: u64,
    pub state: SockState,
}

/// Longest namespace or name kept in the metadata map (DNS labels are ≤ 63).
pub const META_NAME_LEN: usize = 64;
/// Longest service port name (IANA_SVC_NAME is ≤ 15; the field needs no
/// terminator).
pub const META_PORT_NAME_LEN: usize = 15;

/// Service type codes stored in [`ServiceMeta::svc_type`].
pub const SVC_TYPE_CLUSTER_IP: u8 = 0;
pub const SVC_TYPE_NODE_PORT: u8 = 1;
pub const SVC_TYPE_LOAD_BALANCER: u8 = 2;
/// `ServiceMeta::svc_type` holds the Service type in its low four bits and
/// which of its addresses the frontend is in the high four (0: a ClusterIP,
/// so records written before NodePorts existed read as they were meant).
pub const SVC_TYPE_MASK: u8 = 0x0f;
/// The frontend is a node address on the Service's nodePort.
pub const SVC_FRONTEND_NODE_PORT: u8 = 0x10;
/// The frontend is one of the Service's `spec.externalIPs` on a service port.
pub const SVC_FRONTEND_EXTERNAL_IP: u8 = 0x20;
/// The frontend is a LoadBalancer ingress IP on a service port.
pub const SVC_FRONTEND_LOAD_BALANCER: u8 = 0x30;
/// Which address kind, in the high four bits of `ServiceMeta::svc_type`.
pub const SVC_FRONTEND_MASK: u8 = 0xf0;

/// Human-facing description of a frontend, keyed by `svc_id`. Only userspace
/// reads it: it lets `lb-agent list` and a restarted agent name what the
/// maps hold without the sources that wrote them. The frontend itself is
/// the key of the `LB_SERVICES` entry with this `svc_id`, not repeated:
/// 144 bytes, a multiple of 8, so the hash element wastes nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceMeta {
    /// NUL-padded UTF-8.
    pub namespace: [u8; META_NAME_LEN],
    /// NUL-padded UTF-8.
    pub name: [u8; META_NAME_LEN],
    /// NUL-padded UTF-8; empty for an unnamed port.
    pub port_name: [u8; META_PORT_NAME_LEN],
    pub svc_type: u8,
}

/// One service id's slot of the per-CPU `LB_SVC_STATS` array: what the
/// programs did for that frontend. One slot per id, so a translated or
/// refused call pays one per-CPU array lookup and one add.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcStats {
    /// connect()s (TCP and connected UDP) rewritten to a backend.
    pub connect: u64,
    /// Unconnected UDP datagrams (sendmsg) rewritten to a backend.
    pub sendmsg: u64,
    /// connect()s and datagrams refused with ECONNREFUSED: no endpoint.
    pub refused: u64,
}

/// Indexes into the per-CPU `LB_STATS` array.
pub mod stats {
    /// connect()s rewritten to a backend.
    pub const TRANSLATED: u32 = 0;
    /// connect()s and unconnected datagrams refused because the service had no usable backend.
    pub const NO_BACKEND: u32 = 1;
    /// A master pointed past the end of the backend array (never written
    /// by the agent; the connect is refused).
    pub const SLOT_FALLBACK: u32 = 2;
    /// Map writes the agent could not make because a map was full.
    pub const MAP_FULL: u32 = 3;
    /// Unconnected UDP datagrams (sendmsg4/6) rewritten to a backend.
    pub const SENDMSG_TRANSLATED: u32 = 4;
    /// recvmsg/getpeername addresses rewritten back to the frontend.
    pub const REVERSE_TRANSLATED: u32 = 5;
    /// Reverse entries dropped on read because their service was gone,
    /// had changed id or had no backend left.
    pub const REVERSE_STALE: u32 = 6;
    /// Reverse-map writes that failed; the forward translation still happened,
    /// but that socket's replies and getpeername show the backend.
    pub const REVERSE_WRITE_FAILED: u32 = 7;
    /// Connected sockets recorded in `LB_SOCK_SPILL` because their
    /// `LB_SOCK` slot was held by another live socket (many: raise
    /// `--max-sockets`).
    pub const SOCK_SPILLED: u32 = 8;
    pub const COUNT: u32 = 9;
}

/// Name of the programs' read-only global that turns aya-log debug records
/// on (non-zero). Fixed when the agent loads the programs, so the verifier
/// drops the logging code of a program loaded without it.
pub const DEBUG_LOG_GLOBAL: &str = "LB_DEBUG_LOG";

/// Name of the programs' read-only global of [`ablate`] bits: parts of the
/// translation a benchmark switches off to measure what each costs. Zero
/// (everything on) unless the agent is started with `LB_BENCH_ABLATE`.
pub const ABLATE_GLOBAL: &str = "LB_ABLATE";

/// Bits of [`ABLATE_GLOBAL`]. Fixed at load, so the verifier drops the code
/// a bit switches off and a variant costs what a build without it would.
/// A variant translates without recording (or with a stand-in socket key),
/// so it is for measuring only, never for serving.
pub mod ablate {
    /// connect and sendmsg record nothing (no socket slot, no LRU entry).
    pub const NO_REVERSE: u32 = 1;
    /// No socket cookie: sendmsg picks at random and keys its LRU entry
    /// by 0 (connect keys its record by the cookie whatever this says).
    pub const NO_COOKIE: u32 = 2;
    /// No stats bump (global or per service) on a translation.
    pub const NO_STATS: u32 = 4;
    /// sendmsg ignores the socket's slot: the LRU lookup on every
    /// datagram, as before the slot remembered the last pair.
    pub const NO_SOCK_CACHE: u32 = 8;
    /// connect, sendmsg and sock_release return at once: the floor every
    /// call pays (program dispatch and bpf_stats' own clock reads).
    pub const EMPTY: u32 = 16;
    /// No frontend filter: every destination goes to the `LB_SERVICES`
    /// lookup.
    pub const NO_FILTER: u32 = 32;
    /// Not a part switched off but one switched on: every frontend is
    /// served as with `sessionAffinity: ClientIP` (timeout 10800 s), so the
    /// benchmark measures what affinity costs a connect.
    pub const ALL_AFFINITY: u32 = 64;
}

/// `lb-agent trace`: the switch and the events. Off (the switch 0) costs a
/// translated or refused call one inlined array read; other destinations
/// never reach it. A tracer holds the switch at a lease, a
/// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC) deadline it renews while it
/// runs and clears when it stops: a tracer killed with SIGKILL stops the
/// events within [`trace::LEASE_NS`] all the same (until a tracer clears
/// the expired lease, a call pays one coarse clock read more). A live
/// lease also keeps a second tracer out: the ring has one reader.
pub mod trace {
    /// How long a tracer's lease lasts past its last renewal.
    pub const LEASE_NS: u64 = 2_000_000_000;
    /// Bytes of the event ring buffer (a power of two, a multiple of the
    /// page size): about 3,000 events between two reads of a tracer.
    pub const RING_BYTES: u32 = 256 * 1024;
    /// How often a tracer drains the ring: the programs wake it only once
    /// half the ring is taken, so an event waits at most this long.
    pub const DRAIN_MS: u64 = 100;

    /// [`super::TraceEvent::hook`] values.
    pub const HOOK_CONNECT4: u8 = 1;
    pub const HOOK_CONNECT6: u8 = 2;
    pub const HOOK_SENDMSG4: u8 = 3;
    pub const HOOK_SENDMSG6: u8 = 4;

    /// [`super::TraceEvent::outcome`] values.
    pub const TRANSLATED: u8 = 0;
    /// ECONNREFUSED: the frontend has no endpoint.
    pub const REFUSED: u8 = 1;
    /// ECONNREFUSED: the frontend's range was unreadable (a bug or a
    /// map changed under the program).
    pub const REFUSED_NO_SLOT: u8 = 2;
}

/// One translation or refusal, as `lb-agent trace` shows it. Written to
/// `LB_TRACE_RING` by connect4/6 and sendmsg4/6 while tracing is on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub time_ns: u64,
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    /// The calling task's cgroup v2 id (its directory's inode number).
    pub cgroup_id: u64,
    /// `bpf_get_netns_cookie` of the socket's network namespace.
    pub netns: u64,
    /// Frontend (IPv4-mapped for IPv4), network byte order.
    pub frontend: Addr,
    /// Backend (IPv4-mapped for IPv4), network byte order; zero if refused.
    pub backend: Addr,
    /// Frontend port, network byte order.
    pub frontend_port: u16,
    /// Backend port, network byte order; 0 if refused.
    pub backend_port: u16,
    pub svc_id: u32,
    /// `trace::HOOK_*`.
    pub hook: u8,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `trace::TRANSLATED` or a `trace::REFUSED*`.
    pub outcome: u8,
    pub _pad: [u8; 5],
}

/// The value of `LB_AGENT`: who runs the installation, when it last
/// synced and where it serves `/metrics`, for `lb-agent status` and for
/// scripts and tests that need no log line to find it. Times are Unix
/// nanoseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AgentState {
    /// In the agent's own pid namespace.
    pub pid: u32,
    pub _pad: u32,
    pub started_ns: u64,
    /// 0 before the first sync.
    pub last_sync_ns: u64,
    pub syncs: u64,
    /// When the first sync with every source complete (the initial list,
    /// or the first read of the manifest directory) finished; 0 before.
    pub initial_sync_ns: u64,
    /// The address `/metrics` and the probes are bound to (IPv4-mapped for
    /// IPv4), network byte order.
    pub health_addr: Addr,
    /// Its port, network byte order; 0: not serving (yet, or `none`).
    pub health_port: u16,
    pub _pad2: [u8; 6],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `repr(C)` structs of integers with explicit padding.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for ServiceMeta {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for ReverseKey {}
    unsafe impl aya::Pod for ReverseValue {}
    unsafe impl aya::Pod for SockReverse {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for SockSlot {}
    unsafe impl aya::Pod for SvcStats {}
    unsafe impl aya::Pod for TraceEvent {}
    unsafe impl aya::Pod for AgentState {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use core::mem::{offset_of, size_of};
    use std::vec;

    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> Addr {
        v4_mapped(u32::from_ne_bytes([a, b, c, d]))
    }

    fn key(addr: Addr, port: u16, proto: u8) -> ServiceKey {
        ServiceKey::new(addr, port.to_be(), proto)
    }

    /// Each probe is one word of the array and one to three bits in it.
    #[test]
    fn a_probe_is_one_word_and_up_to_three_bits() {
        for i in 0..10_000u32 {
            let [_, _, c, d] = i.to_be_bytes();
            let (word, mask) = filter_probe(&key(v4(10, 96, c, d), 80, PROTO_TCP));
            assert!(word < FILTER_WORDS);
            assert!(
                (1..=FILTER_HASHES).contains(&mask.count_ones()),
                "{mask:#x}"
            );
        }
    }

    /// The regular runs a cluster allocates (10,000 consecutive ClusterIPs
    /// on port 80, 2,000 nodePorts on four node addresses and localhost)
    /// leave few false positives for other regular runs (a /16 of other
    /// addresses; the node addresses over the nodePort range in the other
    /// protocol). A multiplicative one-bit hash gave 0.96 % and 4.5 % here.
    #[test]
    fn regular_frontends_leave_few_false_positives() {
        let mut words = vec![0u64; FILTER_WORDS as usize];
        let mut add = |k: ServiceKey| {
            let (w, m) = filter_probe(&k);
            words[w as usize] |= m;
        };
        for i in 0..10_000u32 {
            let [_, _, c, d] = (0x0100 + i).to_be_bytes();
            add(key(v4(10, 96, c, d), 80, PROTO_TCP));
        }
        for p in 30_000..32_000u16 {
            for host in [
                v4(10, 250, 0, 1),
                v4(10, 250, 0, 2),
                v4(10, 250, 0, 3),
                v4(10, 250, 0, 4),
                v4(127, 0, 0, 1),
            ] {
                add(key(host, p, PROTO_TCP));
            }
        }
        let hit = |k: ServiceKey| {
            let (w, m) = filter_probe(&k);
            words[w as usize] & m == m
        };
        let foreign = (0..65_536u32)
            .filter(|i| {
                let [_, _, c, d] = i.to_be_bytes();
                hit(key(v4(10, 200, c, d), 8080, PROTO_UDP))
            })
            .count();
        let node = (1..=4u8)
            .flat_map(|h| (30_000..32_768u16).map(move |p| (h, p)))
            .filter(|&(h, p)| hit(key(v4(10, 250, 0, h), p, PROTO_UDP)))
            .count();
        // Below 0.5 % of each sweep (65,536 and 11,072 destinations).
        assert!(foreign < 328, "{foreign} of 65,536");
        assert!(node < 56, "{node} of 11,072");
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(offset_of!(ServiceKey, port), 16);
        assert_eq!(offset_of!(ServiceKey, proto), 18);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(offset_of!(ServiceValue, base), 0);
        assert_eq!(offset_of!(ServiceValue, count), 4);
        assert_eq!(offset_of!(ServiceValue, svc_id), 8);
        assert_eq!(offset_of!(ServiceValue, affinity), 12);
        assert_eq!(size_of::<AffinityKey>(), 16);
        assert_eq!(size_of::<AffinityValue>(), 32);
        assert_eq!(offset_of!(AffinityValue, slot), 20);
        assert_eq!(offset_of!(AffinityValue, last_used), 24);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<ReverseKey>(), 32);
        assert_eq!(offset_of!(ReverseKey, addr), 8);
        assert_eq!(offset_of!(ReverseKey, port), 24);
        assert_eq!(size_of::<ReverseValue>(), 24);
        assert_eq!(offset_of!(ReverseValue, svc_id), 20);
        assert_eq!(size_of::<SockReverse>(), 40);
        assert_eq!(size_of::<SockState>(), 80);
        assert_eq!(size_of::<SockSlot>(), 96);
        assert_eq!(offset_of!(SockSlot, spill), 8);
        assert_eq!(offset_of!(SockSlot, state), 16);
        assert_eq!(offset_of!(SockReverse, svc_id), 20);
        assert_eq!(offset_of!(SockReverse, addr), 24);
        assert_eq!(
            size_of::<ServiceMeta>(),
            2 * META_NAME_LEN + META_PORT_NAME_LEN + 1
        );
        assert_eq!(size_of::<ServiceMeta>(), 144);
        assert_eq!(size_of::<SvcStats>(), 24);
        assert_eq!(size_of::<TraceEvent>(), 80);
        assert_eq!(offset_of!(TraceEvent, frontend), 32);
        assert_eq!(offset_of!(TraceEvent, frontend_port), 64);
        assert_eq!(offset_of!(TraceEvent, svc_id), 68);
        assert_eq!(offset_of!(TraceEvent, hook), 72);
        assert_eq!(size_of::<AgentState>(), 64);
        assert_eq!(offset_of!(AgentState, initial_sync_ns), 32);
        assert_eq!(offset_of!(AgentState, health_addr), 40);
        assert_eq!(offset_of!(AgentState, health_port), 56);
    }

    #[test]
    fn v4_mapped_is_the_ipv6_layout() {
        let ip4 = u32::from_ne_bytes([10, 96, 0, 10]);
        let words = v4_mapped(ip4);
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10]
        );
        assert_eq!(as_v4(&words), Some(ip4));
        assert_eq!(as_v4(&[0, 0, 0, ip4]), None);
    }

    #[test]
    fn node_port_bits_cover_both_protocols_in_the_array() {
        assert_eq!(node_port_bit(PROTO_TCP, 0), Some(0));
        assert_eq!(node_port_bit(PROTO_TCP, 30080), Some(30080));
        assert_eq!(node_port_bit(PROTO_UDP, 30080), Some(65_536 + 30080));
        assert_eq!(node_port_bit(1, 30080), None);
        let last = node_port_bit(PROTO_UDP, u16::MAX).unwrap();
        assert_eq!(last >> 6, NODE_PORT_WORDS - 1);
    }
}
