//! IPv4 translation: forward (connect4, sendmsg4) and reverse (recvmsg4,
//! getpeername4). An IPv6 twin will share the selection logic and use its
//! own frontend and reverse maps.
use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_prandom_u32, generated::bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    Backend, PROTO_TCP, PROTO_UDP, ReverseKey4, ReverseValue4, SOCK_DGRAM, SOCK_STREAM, ServiceKey,
    stats,
};

use crate::maps::{self, bump};

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
    match (sa.type_, sa.protocol) {
        (SOCK_STREAM, p) if p == u32::from(PROTO_TCP) => Some(PROTO_TCP),
        (SOCK_DGRAM, p) if p == u32::from(PROTO_UDP) => Some(PROTO_UDP),
        _ => None,
    }
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: a sock_addr context is a valid argument for this helper.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Rewrites a destination that is a service frontend to one of its backends
/// and records the translation in the reverse map.
pub fn forward(ctx: &SockAddrContext, hook: Hook) -> Verdict {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = handled_proto(sa) else {
        return Verdict::Pass;
    };
    let (addr, port) = (sa.user_ip4, sa.user_port as u16);
    let Some(master) = maps::service(ServiceKey::new(addr, port, proto, 0)) else {
        return Verdict::Pass;
    };
    if master.count == 0 {
        bump(stats::NO_BACKEND);
        return Verdict::Refuse;
    }
    let cookie = socket_cookie(ctx);
    let pick = match hook {
        // SAFETY: the helper has no preconditions.
        Hook::Connect => (unsafe { bpf_get_prandom_u32() }) % master.count,
        Hook::Sendmsg => (cookie % u64::from(master.count)) as u32,
    };
    let Some(backend) = pick_backend(addr, port, proto, pick as u16 + 1) else {
        bump(stats::NO_BACKEND);
        return Verdict::Refuse;
    };
    maps::remember4(
        ReverseKey4::new(cookie, backend.addr, backend.port),
        ReverseValue4 {
            addr,
            port,
            _pad: 0,
            svc_id: master.svc_id,
        },
    );
    if maps::debug_enabled() {
        let what = match hook {
            Hook::Connect => "connect4",
            Hook::Sendmsg => "sendmsg4",
        };
        debug!(
            ctx,
            target: "lb_ebpf",
            "{} {:i}:{} -> {:i}:{} (svc {})",
            what,
            u32::from_be(addr),
            u16::from_be(port),
            u32::from_be(backend.addr),
            u16::from_be(backend.port),
            master.svc_id
        );
    }
    sa.user_ip4 = backend.addr;
    sa.user_port = u32::from(backend.port);
    bump(match hook {
        Hook::Connect => stats::TRANSLATED,
        Hook::Sendmsg => stats::SENDMSG_TRANSLATED,
    });
    Verdict::Pass
}

/// Rewrites a backend address (a datagram's source for recvmsg4, the peer
/// for getpeername4) back to the frontend this socket asked for, if the
/// socket was translated to that backend and the service is still the one
/// it was translated for. A stale entry is deleted and the address left.
pub fn reverse(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = handled_proto(sa) else {
        return;
    };
    let key = ReverseKey4::new(socket_cookie(ctx), sa.user_ip4, sa.user_port as u16);
    let Some(front) = maps::reverse4(key) else {
        return;
    };
    let live = maps::service(ServiceKey::new(front.addr, front.port, proto, 0))
        .is_some_and(|m| m.svc_id == front.svc_id && m.count > 0);
    if !live {
        maps::forget4(key);
        bump(stats::REVERSE_STALE);
        return;
    }
    sa.user_ip4 = front.addr;
    sa.user_port = u32::from(front.port);
    bump(stats::REVERSE_TRANSLATED);
}

/// The chosen slot, or — if a concurrent shrink removed it or its backend —
/// slot 1, which exists whenever the count is non-zero in a make-before-break
/// update sequence.
#[inline(always)]
fn pick_backend(addr: u32, port: u16, proto: u8, slot: u16) -> Option<Backend> {
    if let Some(b) = slot_backend(addr, port, proto, slot) {
        return Some(b);
    }
    bump(stats::SLOT_FALLBACK);
    if slot != 1 {
        return slot_backend(addr, port, proto, 1);
    }
    None
}

#[inline(always)]
fn slot_backend(addr: u32, port: u16, proto: u8, slot: u16) -> Option<Backend> {
    let entry = maps::service(ServiceKey::new(addr, port, proto, slot))?;
    maps::backend(entry.backend_id)
}
