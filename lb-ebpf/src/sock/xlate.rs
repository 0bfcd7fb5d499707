//! Translation for both families: forward (connect, sendmsg) and reverse
//! (recvmsg, getpeername). One code path serves the IPv4 and IPv6 hooks;
//! the const parameter `V6` picks which `bpf_sock_addr` fields a hook may
//! touch (the verifier refuses `user_ip6` in an IPv4 program and vice
//! versa), and the dead branch is compiled out.
//!
//! Addresses are 16 bytes everywhere in the maps, IPv4 ones IPv4-mapped, so
//! an IPv6 hook handed `::ffff:a.b.c.d` by a dual-stack socket finds the
//! IPv4 service directly and writes back a mapped backend.
use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_get_prandom_u32,
        generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns},
    },
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::debug;
use lb_common::{
    AFFINITY_SCAN, Addr, AffinityKey, AffinityValue, Backend, PROTO_TCP, PROTO_UDP, ReverseKey,
    ReverseValue, SOCK_DGRAM, SOCK_STREAM, ServiceKey, ServiceValue, SockReverse, SockState,
    ablate, as_v4, is_loopback, stats, v4_mapped,
};

use crate::{
    maps::{self, SvcCounter, ablated, bump, bump_service},
    trace,
};

/// What the calling hook should return.
pub enum Verdict {
    /// Allow, with or without a rewritten address.
    Pass,
    /// The service has no usable backend: fail the call with ECONNREFUSED.
    Refuse,
}

/// Which forward hook runs: it decides how the backend is chosen.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// TCP or connected UDP: once per socket, uniformly at random.
    Connect,
    /// Unconnected UDP: every datagram; by socket cookie, so one socket's
    /// datagrams to one frontend all reach the same backend.
    Sendmsg,
}

/// The L4 protocol of a socket we handle: TCP stream and UDP datagram
/// sockets only. Raw sockets (even with `IPPROTO_UDP`), ICMP ping sockets,
/// UDP-Lite and SCTP pass untouched.
#[inline(always)]
fn handled_proto(sa: &bpf_sock_addr) -> Option<u8> {
    handled(sa.type_, sa.protocol)
}

#[inline(always)]
pub fn handled(type_: u32, protocol: u32) -> Option<u8> {
    match (type_, protocol) {
        (SOCK_STREAM, p) if p == u32::from(PROTO_TCP) => Some(PROTO_TCP),
        (SOCK_DGRAM, p) if p == u32::from(PROTO_UDP) => Some(PROTO_UDP),
        _ => None,
    }
}

#[inline(always)]
fn socket_cookie(ctx: &impl EbpfContext) -> u64 {
    // SAFETY: a sock_addr or sock context is a valid argument for this
    // helper (the kernel picks the variant by program type).
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The destination (forward hooks) or peer (reverse hooks) address, in the
/// maps' 16-byte form. Word by word: the verifier allows only 4-byte loads
/// of `user_ip6`.
#[inline(always)]
fn read_addr<const V6: bool>(sa: &bpf_sock_addr) -> Addr {
    if V6 {
        let mut out = [0u32; 4];
        for (i, word) in out.iter_mut().enumerate() {
            // SAFETY: in-bounds field of the context.
            *word = unsafe { core::ptr::read_volatile(&sa.user_ip6[i]) };
        }
        out
    } else {
        v4_mapped(sa.user_ip4)
    }
}

/// Rewrites the context's address and port. `false` (and nothing written)
/// if an IPv4 hook is handed an address that is not IPv4-mapped: that
/// cannot come from maps the agent writes (a frontend's backends are of the
/// frontend's family), so the caller treats it as a missing backend.
#[inline(always)]
fn write_addr<const V6: bool>(sa: &mut bpf_sock_addr, addr: &Addr, port: u16) -> bool {
    if V6 {
        for (i, word) in addr.iter().enumerate() {
            // SAFETY: in-bounds field of the context; 4-byte stores only.
            unsafe { core::ptr::write_volatile(&mut sa.user_ip6[i], *word) };
        }
    } else {
        let Some(ip4) = as_v4(addr) else {
            return false;
        };
        sa.user_ip4 = ip4;
    }
    sa.user_port = u32::from(port);
    true
}

/// Rewrites a destination that is a service frontend to one of its backends
/// and records the translation in the reverse map.
#[inline(always)]
pub fn forward<const V6: bool>(ctx: &SockAddrContext, hook: Hook) -> Verdict {
    if ablated(ablate::EMPTY) {
        return Verdict::Pass;
    }
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = handled_proto(sa) else {
        return Verdict::Pass;
    };
    let addr = read_addr::<V6>(sa);
    let port = sa.user_port as u16;
    let key = ServiceKey::new(addr, port, proto);
    if !ablated(ablate::NO_FILTER) && !maps::maybe_service(&key) {
        return Verdict::Pass;
    }
    let Some(master) = maps::service(&key) else {
        return Verdict::Pass;
    };
    // After the hit, so a destination that is no service pays nothing.
    if (maps::host_netns_only() || is_loopback(&addr)) && !in_host_netns(ctx) {
        return Verdict::Pass;
    }
    if master.count == 0 {
        bump(stats::NO_BACKEND);
        bump_service(master.svc_id, SvcCounter::Refused);
        trace::emit::<V6>(ctx, hook, &key, master.svc_id, None, trace::REFUSED);
        return Verdict::Refuse;
    }
    let mut master = master;
    if ablated(ablate::ALL_AFFINITY) {
        master.affinity = 10_800;
    }
    let chosen = if master.affinity != 0 {
        affine_backend(ctx, &master)
    } else {
        let pick = match hook {
            Hook::Connect => random_slot(&master),
            Hook::Sendmsg if ablated(ablate::NO_COOKIE) => random_slot(&master),
            Hook::Sendmsg => (socket_cookie(ctx) % u64::from(master.count)) as u32,
        };
        // The range is complete for as long as this program runs (the
        // agent reuses a range only after an RCU grace period), so one
        // lookup.
        maps::backend(master.base.wrapping_add(pick))
    };
    let Some(backend) = chosen else {
        bump(stats::SLOT_FALLBACK);
        trace::emit::<V6>(ctx, hook, &key, master.svc_id, None, trace::REFUSED_NO_SLOT);
        return Verdict::Refuse;
    };
    if !write_addr::<V6>(sa, &backend.addr, backend.port) {
        bump(stats::NO_BACKEND);
        trace::emit::<V6>(ctx, hook, &key, master.svc_id, None, trace::REFUSED_NO_SLOT);
        return Verdict::Refuse;
    }
    if !ablated(ablate::NO_REVERSE) {
        let record = SockReverse {
            backend: backend.addr,
            backend_port: backend.port,
            port,
            svc_id: master.svc_id,
            addr,
        };
        match hook {
            Hook::Connect => remember_conn(socket_cookie(ctx), &record),
            Hook::Sendmsg => remember_dgram(ctx, &record),
        }
    }
    if maps::debug_enabled() {
        log_forward::<V6>(ctx, hook, &addr, port, &backend, master.svc_id);
    }
    trace::emit::<V6>(
        ctx,
        hook,
        &key,
        master.svc_id,
        Some(&backend),
        trace::TRANSLATED,
    );
    if !ablated(ablate::NO_STATS) {
        bump(match hook {
            Hook::Connect => stats::TRANSLATED,
            Hook::Sendmsg => stats::SENDMSG_TRANSLATED,
        });
        bump_service(
            master.svc_id,
            match hook {
                Hook::Connect => SvcCounter::Connect,
                Hook::Sendmsg => SvcCounter::Sendmsg,
            },
        );
    }
    Verdict::Pass
}

/// Whether the socket belongs to the host's network namespace: loopback
/// frontends (`127.0.0.1:nodePort`) and, with `--host-netns-only`, every
/// frontend answer only those.
#[inline(always)]
fn in_host_netns(ctx: &SockAddrContext) -> bool {
    // SAFETY: a sock_addr context is a valid argument for this helper.
    (unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }) == maps::host_netns()
}

#[inline(always)]
fn random_slot(master: &ServiceValue) -> u32 {
    // SAFETY: the helper has no preconditions.
    (unsafe { bpf_get_prandom_u32() }) % u32::from(master.count)
}

/// Session affinity (connect and unconnected sendmsg alike): the backend
/// the client's entry names, while that backend is in the frontend's live
/// range and the entry was used within the timeout (the use refreshes it);
/// otherwise one at random, which the entry then names. The client is the
/// socket's network namespace. `None` only if the range is not readable.
#[inline(always)]
fn affine_backend(ctx: &SockAddrContext, master: &ServiceValue) -> Option<Backend> {
    // SAFETY: a sock_addr context is a valid argument for these helpers.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: no preconditions. Coarse (jiffies): timeouts are seconds.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let key = AffinityKey::new(netns, master.svc_id);
    if let Some(entry) = maps::affinity(&key) {
        // SAFETY: a map value pointer is valid for this program run. Two
        // connects of one client may refresh it at once: either write is
        // a valid entry.
        let entry = unsafe { &mut *entry };
        let timeout_ns = u64::from(master.affinity) * 1_000_000_000;
        if now.saturating_sub(entry.last_used) <= timeout_ns
            && let Some((slot, backend)) = find_in_range(master, entry)
        {
            entry.slot = slot;
            entry.last_used = now;
            return Some(backend);
        }
    }
    let slot = random_slot(master);
    let backend = maps::backend(master.base.wrapping_add(slot))?;
    maps::set_affinity(
        &key,
        &AffinityValue {
            backend: backend.addr,
            port: backend.port,
            _pad: 0,
            slot,
            last_used: now,
        },
    );
    Some(backend)
}

/// Where the entry's backend is in the frontend's live range: at the slot
/// it was last found at (the range is unchanged), else among the first
/// [`AFFINITY_SCAN`] slots (the range was rewritten: a backend came or
/// went). Only a backend read from the live range is ever used, so an
/// entry never sends a client to a backend that left the frontend.
#[inline(always)]
fn find_in_range(master: &ServiceValue, entry: &AffinityValue) -> Option<(u32, Backend)> {
    let is_it = |b: &Backend| b.port == entry.port && b.addr == entry.backend;
    let count = u32::from(master.count);
    if entry.slot < count
        && let Some(b) = maps::backend(master.base.wrapping_add(entry.slot))
        && is_it(&b)
    {
        return Some((entry.slot, b));
    }
    let mut i = 0;
    while i < AFFINITY_SCAN && i < count {
        if let Some(b) = maps::backend(master.base.wrapping_add(i))
            && is_it(&b)
        {
            return Some((i, b));
        }
        i += 1;
    }
    None
}

/// A connected socket's one translation, in its slot: overwritten on a
/// reconnect, claimed if free, else in the spill hash.
#[inline(always)]
fn remember_conn(cookie: u64, record: &SockReverse) {
    let Some(slot) = maps::sock_slot(cookie) else {
        return;
    };
    if maps::slot_owner(slot) == cookie {
        // SAFETY: a map value pointer is valid for this program run, and
        // the slot is this socket's.
        unsafe { (*slot).state.conn = *record };
        return;
    }
    let state = SockState {
        conn: *record,
        dgram: SockReverse::default(),
    };
    if !maps::claim_slot(slot, cookie, &state) {
        maps::spill(slot, cookie, record);
    }
}

/// An unconnected datagram's translation: in the LRU (recvmsg finds a reply
/// from any backend the socket sent to), unless the socket's slot says its
/// last datagram went to the same pair, which is then recorded already.
/// Replies from that last pair are found in the slot even if the LRU has
/// evicted it since. A socket whose slot another holds just has no cache.
#[inline(always)]
fn remember_dgram(ctx: &SockAddrContext, record: &SockReverse) {
    let cookie = if ablated(ablate::NO_COOKIE) {
        0
    } else {
        socket_cookie(ctx)
    };
    // Cookie 0 (the no-cookie variant) would match every free slot.
    let slot = if ablated(ablate::NO_SOCK_CACHE) || ablated(ablate::NO_COOKIE) {
        None
    } else {
        maps::sock_slot(cookie)
    };
    let owned = slot.filter(|s| maps::slot_owner(*s) == cookie);
    // SAFETY: a map value pointer is valid for this program run.
    if owned.is_some_and(|s| unsafe { (*s).state.dgram } == *record) {
        return;
    }
    maps::remember(
        &ReverseKey::new(cookie, record.backend, record.backend_port),
        &ReverseValue {
            addr: record.addr,
            port: record.port,
            _pad: 0,
            svc_id: record.svc_id,
        },
    );
    match (slot, owned) {
        // SAFETY: as above; the slot is this socket's.
        (_, Some(s)) => unsafe { (*s).state.dgram = *record },
        (Some(s), None) => {
            let _ = maps::claim_slot(
                s,
                cookie,
                &SockState {
                    conn: SockReverse::default(),
                    dgram: *record,
                },
            );
        }
        (None, None) => {}
    }
}

/// A closing socket's record goes: its slot is freed, or its spilled entry
/// deleted. One slot read for a socket that was never translated.
#[inline(always)]
pub fn release(ctx: &SockContext) {
    if ablated(ablate::EMPTY) {
        return;
    }
    // SAFETY: the kernel hands every sock program a valid context.
    let sk: &bpf_sock = unsafe { &*ctx.sock };
    if handled(sk.type_, sk.protocol).is_none() {
        return;
    }
    let cookie = socket_cookie(ctx);
    let Some(slot) = maps::sock_slot(cookie) else {
        return;
    };
    if maps::slot_owner(slot) == cookie {
        maps::release_slot(slot);
    }
    // A socket spilled once may own its slot after a reconnect: look in the
    // spill hash whenever the slot has spilled sockets.
    if maps::slot_spilled(slot) {
        maps::unspill(slot, cookie);
    }
}

#[inline(always)]
fn log_forward<const V6: bool>(
    ctx: &SockAddrContext,
    hook: Hook,
    addr: &Addr,
    port: u16,
    backend: &Backend,
    svc_id: u32,
) {
    let what = match (hook, V6) {
        (Hook::Connect, false) => "connect4",
        (Hook::Connect, true) => "connect6",
        (Hook::Sendmsg, false) => "sendmsg4",
        (Hook::Sendmsg, true) => "sendmsg6",
    };
    // IPv4 services read as IPv4, whichever hook saw them.
    if let (Some(front), Some(back)) = (as_v4(addr), as_v4(&backend.addr)) {
        debug!(
            ctx,
            target: "lb_ebpf",
            "{} {:i}:{} -> {:i}:{} (svc {})",
            what,
            u32::from_be(front),
            u16::from_be(port),
            u32::from_be(back),
            u16::from_be(backend.port),
            svc_id
        );
    } else {
        debug!(
            ctx,
            target: "lb_ebpf",
            "{} [{:i}]:{} -> [{:i}]:{} (svc {})",
            what,
            to_bytes(addr),
            u16::from_be(port),
            to_bytes(&backend.addr),
            u16::from_be(backend.port),
            svc_id
        );
    }
}

#[inline(always)]
fn to_bytes(addr: &Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = addr[i].to_ne_bytes();
        out[i * 4] = w[0];
        out[i * 4 + 1] = w[1];
        out[i * 4 + 2] = w[2];
        out[i * 4 + 3] = w[3];
        i += 1;
    }
    out
}

/// Where a reverse hook found the frontend.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Found {
    /// The socket's slot, its connected peer.
    Conn,
    /// The socket's slot, its last unconnected pair.
    Dgram,
    /// The spill hash of connected sockets whose slot was held.
    Spill,
    /// The LRU of unconnected datagrams.
    Lru,
}

/// Rewrites a backend address (a datagram's source for recvmsg, the peer
/// for getpeername) back to the frontend this socket asked for, if the
/// socket was translated to that backend and the service is still the one
/// it was translated for. A stale record is cleared and the address left.
/// The socket's slot is read first (connected peer, then last unconnected
/// pair), then the spill hash if the slot has spilled sockets, then the
/// LRU (by cookie and backend).
#[inline(always)]
pub fn reverse<const V6: bool>(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = handled_proto(sa) else {
        return;
    };
    let peer = read_addr::<V6>(sa);
    let peer_port = sa.user_port as u16;
    let cookie = socket_cookie(ctx);
    let Some(slot) = maps::sock_slot(cookie) else {
        return;
    };
    let is_peer = |r: &SockReverse| r.backend_port == peer_port && r.backend == peer;
    let as_front = |r: &SockReverse| ReverseValue {
        addr: r.addr,
        port: r.port,
        _pad: 0,
        svc_id: r.svc_id,
    };
    let owned = maps::slot_owner(slot) == cookie;
    // SAFETY: a map value pointer is valid for this program run.
    let state = unsafe { &mut (*slot).state };
    let spilled = if !owned && maps::slot_spilled(slot) {
        maps::spilled(cookie).filter(is_peer)
    } else {
        None
    };
    let mut key = None;
    let (front, found) = if owned && is_peer(&state.conn) {
        (as_front(&state.conn), Found::Conn)
    } else if owned && is_peer(&state.dgram) {
        (as_front(&state.dgram), Found::Dgram)
    } else if let Some(r) = spilled {
        (as_front(&r), Found::Spill)
    } else {
        let k = ReverseKey::new(cookie, peer, peer_port);
        let Some(front) = maps::reverse(&k) else {
            return;
        };
        key = Some(k);
        (front, Found::Lru)
    };
    let live = maps::service(&ServiceKey::new(front.addr, front.port, proto))
        .is_some_and(|m| m.svc_id == front.svc_id && m.count > 0);
    if !live {
        match found {
            Found::Conn => state.conn = SockReverse::default(),
            Found::Dgram => state.dgram = SockReverse::default(),
            Found::Spill | Found::Lru => {}
        }
        if let Some(k) = &key {
            maps::forget(k);
        }
        bump(stats::REVERSE_STALE);
        return;
    }
    if write_addr::<V6>(sa, &front.addr, front.port) {
        bump(stats::REVERSE_TRANSLATED);
    }
}
