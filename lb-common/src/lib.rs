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
    /// Reverse map of connected sockets (connect): socket cookie →
    /// [`SockReverse`]; deleted by `sock_release`.
    pub const SOCK_REVERSE: &str = "LB_REVERSE_SOCK";
    /// The IPv4-only reverse map of earlier versions; removed on install.
    pub const LEGACY_REVERSE4: &str = "LB_REVERSE4";
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
/// Service-map entries: one per frontend plus one per backend slot, so
/// 131,072 hold 11,915 one-port services of 10 endpoints (2 MiB of buckets).
pub const DEFAULT_MAX_SERVICES: u32 = 131_072;
/// Distinct backends (address, port, protocol): 10,000 services of 10
/// endpoints each of their own need 100,000.
pub const DEFAULT_MAX_BACKENDS: u32 = 131_072;
/// Frontends (service ports) whose names `lb-agent list` shows: entries of
/// `LB_SVC_META`, one per frontend (not per slot).
pub const DEFAULT_MAX_FRONTENDS: u32 = 32_768;
/// Entries of the LRU reverse map of unconnected UDP sockets: one per
/// (socket, backend) sendmsg translated. LRU maps are preallocated: 256 Ki
/// entries cost about 30 MiB of kernel memory (Cilium's default for its
/// `lb4_reverse_sk` is the same count).
pub const DEFAULT_MAX_REVERSE: u32 = 262_144;
/// Entries of the connected-socket reverse map: live TCP and connected UDP
/// sockets translated to a service (`sock_release` deletes each at close).
/// Not preallocated: 4 MiB of buckets on an empty node.
pub const DEFAULT_MAX_SOCKETS: u32 = 262_144;

/// Backends one frontend can balance over: `slot` is 16 bits wide and slot 0
/// is the master. The model caps a service's endpoints here (with a
/// diagnostic) so no slot is ever written that the master cannot count.
pub const MAX_SLOTS: u16 = u16::MAX;

/// Key of the service map. `slot == 0` is the master entry of a frontend;
/// slots `1..=count` point at backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend address (IPv4-mapped for IPv4), network byte order.
    pub addr: Addr,
    /// Frontend port, network byte order.
    pub port: u16,
    /// 0 = master, 1..=count = backend slots.
    pub slot: u16,
    /// IP protocol (`PROTO_TCP` / `PROTO_UDP`).
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl ServiceKey {
    pub const fn new(addr: Addr, port: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr,
            port,
            slot,
            proto,
            _pad: [0; 3],
        }
    }
}

/// Value of the service map. The master entry uses `count` and `svc_id`;
/// slot entries use `backend_id` (and carry `svc_id` for consistency checks).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Slot entries: the backend id (never 0). Master: 0.
    pub backend_id: u32,
    /// Master: number of active slots, at most [`MAX_SLOTS`]; 0 means
    /// "refuse connects". As wide as [`ServiceKey::slot`], so a master can
    /// never count a slot that cannot exist. It sits where a `u32` count
    /// was: little-endian, a pin of that layout reads the same.
    pub count: u16,
    pub _pad: u16,
    /// Service (frontend) id, stable across agent restarts.
    pub svc_id: u32,
    pub flags: u32,
}

impl ServiceValue {
    /// The master entry (slot 0) of frontend `svc_id` with `count` slots.
    pub const fn master(count: u16, svc_id: u32) -> Self {
        Self {
            backend_id: 0,
            count,
            _pad: 0,
            svc_id,
            flags: 0,
        }
    }

    /// A slot entry of frontend `svc_id` naming `backend_id`.
    pub const fn slot(backend_id: u32, svc_id: u32) -> Self {
        Self {
            backend_id,
            count: 0,
            _pad: 0,
            svc_id,
            flags: 0,
        }
    }
}

/// A backend address. Key of the backend map is the backend id (u32, never 0).
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

/// Value of the connected-socket reverse map, keyed by socket cookie: a
/// connected socket has one peer, so the cookie alone is the key, and
/// `sock_release` deletes it without reading the peer (a failed connect has
/// already cleared the peer's port by then). Written by connect4/6, read by
/// recvmsg4/6 and getpeername4/6, which use it only while the peer is still
/// `backend` and the frontend is live with the same `svc_id`.
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

/// Longest namespace or name kept in the metadata map (DNS labels are ≤ 63).
pub const META_NAME_LEN: usize = 64;
/// Longest service port name (IANA_SVC_NAME is ≤ 15).
pub const META_PORT_NAME_LEN: usize = 16;

/// Service type codes stored in [`ServiceMeta::svc_type`].
pub const SVC_TYPE_CLUSTER_IP: u8 = 0;
pub const SVC_TYPE_NODE_PORT: u8 = 1;
pub const SVC_TYPE_LOAD_BALANCER: u8 = 2;

/// Human-facing description of a frontend, keyed by `svc_id`. Only userspace
/// reads it: it lets `lb-agent list` and a restarted agent name what the
/// maps hold without the sources that wrote them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceMeta {
    /// NUL-padded UTF-8.
    pub namespace: [u8; META_NAME_LEN],
    /// NUL-padded UTF-8.
    pub name: [u8; META_NAME_LEN],
    /// NUL-padded UTF-8; empty for an unnamed port.
    pub port_name: [u8; META_PORT_NAME_LEN],
    /// Frontend, same encoding as [`ServiceKey`].
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    pub svc_type: u8,
}

/// Indexes into the per-CPU `LB_STATS` array.
pub mod stats {
    /// connect()s rewritten to a backend.
    pub const TRANSLATED: u32 = 0;
    /// connect()s and unconnected datagrams refused because the service had no usable backend.
    pub const NO_BACKEND: u32 = 1;
    /// A slot or backend was missing (concurrent update) and another slot was used.
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
    pub const COUNT: u32 = 8;
}

/// Name of the programs' read-only global that turns aya-log debug records
/// on (non-zero). Fixed when the agent loads the programs, so the verifier
/// drops the logging code of a program loaded without it.
pub const DEBUG_LOG_GLOBAL: &str = "LB_DEBUG_LOG";

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `repr(C)` structs of integers with explicit padding.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for ServiceMeta {}
    unsafe impl aya::Pod for ReverseKey {}
    unsafe impl aya::Pod for ReverseValue {}
    unsafe impl aya::Pod for SockReverse {}
}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 24);
        assert_eq!(offset_of!(ServiceKey, port), 16);
        assert_eq!(offset_of!(ServiceKey, slot), 18);
        assert_eq!(offset_of!(ServiceKey, proto), 20);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(offset_of!(ServiceValue, backend_id), 0);
        assert_eq!(offset_of!(ServiceValue, count), 4);
        assert_eq!(offset_of!(ServiceValue, svc_id), 8);
        assert_eq!(offset_of!(ServiceValue, flags), 12);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<ReverseKey>(), 32);
        assert_eq!(offset_of!(ReverseKey, addr), 8);
        assert_eq!(offset_of!(ReverseKey, port), 24);
        assert_eq!(size_of::<ReverseValue>(), 24);
        assert_eq!(offset_of!(ReverseValue, svc_id), 20);
        assert_eq!(size_of::<SockReverse>(), 40);
        assert_eq!(offset_of!(SockReverse, svc_id), 20);
        assert_eq!(offset_of!(SockReverse, addr), 24);
        assert_eq!(
            size_of::<ServiceMeta>(),
            2 * META_NAME_LEN + META_PORT_NAME_LEN + 20
        );
    }

    /// A master written with the old `u32` count reads the same count.
    #[test]
    fn old_u32_count_reads_the_same() {
        let mut old = [0u8; 16];
        old[4..8].copy_from_slice(&65_535u32.to_le_bytes());
        old[8..12].copy_from_slice(&7u32.to_le_bytes());
        let count = u16::from_le_bytes([old[4], old[5]]);
        let pad = u16::from_le_bytes([old[6], old[7]]);
        assert_eq!((count, pad), (MAX_SLOTS, 0));
        let new = ServiceValue::master(MAX_SLOTS, 7);
        let bytes: [u8; 16] = {
            let mut b = [0u8; 16];
            b[0..4].copy_from_slice(&new.backend_id.to_le_bytes());
            b[4..6].copy_from_slice(&new.count.to_le_bytes());
            b[6..8].copy_from_slice(&new._pad.to_le_bytes());
            b[8..12].copy_from_slice(&new.svc_id.to_le_bytes());
            b[12..16].copy_from_slice(&new.flags.to_le_bytes());
            b
        };
        assert_eq!(bytes, old);
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
}
