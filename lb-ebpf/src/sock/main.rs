//! The socket-LB programs, in one object so they share one set of maps.
//! Each exists for IPv4 and IPv6 (`…4`, `…6`):
//!
//! - `cgroup/connect`: TCP and connected UDP connects to a service frontend
//!   go to one backend, chosen at random, before the socket sends anything;
//! - `cgroup/sendmsg`: unconnected UDP datagrams to a frontend go to one
//!   backend chosen by socket cookie, so a socket sticks to its backend;
//! - `cgroup/recvmsg`: datagrams from that backend appear to come from the
//!   frontend (resolvers drop replies from an address they did not ask);
//! - `cgroup/getpeername`: `getpeername()` returns the frontend.
//!
//! - `cgroup/post_bind`: a host-namespace `bind()` that would shadow a
//!   nodePort fails with EADDRINUSE (bind protection; attached unless
//!   `--bind-protection=false`).
//!
//! - `cgroup/sock_release` (one for both families): a closing socket's
//!   record goes, so `LB_SOCK` holds live sockets only.
//!
//! What a socket was translated to lives in its slot of `LB_SOCK`.
#![no_std]
// Atomics on map values (compare-and-swap, add): the BPF target offers no
// `AtomicU64::compare_exchange`, but LLVM emits BPF_ATOMIC instructions.
#![allow(internal_features)]
#![feature(core_intrinsics)]
#![no_main]

mod bind;
mod maps;
mod trace;
mod xlate;

use aya_ebpf::{
    helpers::generated::bpf_set_retval,
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use xlate::{Hook, Verdict};

const ECONNREFUSED: i32 = 111;
const EADDRINUSE: i32 = 98;
/// Verdicts. recvmsg, getpeername and sock_release must always allow.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[inline(always)]
fn verdict(v: Verdict) -> i32 {
    match v {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => {
            // SAFETY: plain helper call; the retval becomes the errno of
            // connect() or sendmsg() (both hooks may set it).
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    verdict(xlate::forward::<false>(&ctx, Hook::Connect))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict(xlate::forward::<false>(&ctx, Hook::Sendmsg))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    xlate::reverse::<false>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    xlate::reverse::<false>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    verdict(xlate::forward::<true>(&ctx, Hook::Connect))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    verdict(xlate::forward::<true>(&ctx, Hook::Sendmsg))
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    xlate::reverse::<true>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    xlate::reverse::<true>(&ctx);
    ALLOW
}

/// Fails a bind that shadows a nodePort with EADDRINUSE (the errno a
/// taken port gives) rather than the EPERM a bare reject would.
#[inline(always)]
fn bind_verdict(shadows: bool) -> i32 {
    if shadows {
        // SAFETY: plain helper call; cgroup sock programs may set the
        // retval (5.18+), which becomes bind()'s errno.
        unsafe { bpf_set_retval(-EADDRINUSE) };
        REJECT
    } else {
        ALLOW
    }
}

#[cgroup_sock(post_bind4)]
pub fn lb_post_bind4(ctx: SockContext) -> i32 {
    bind_verdict(bind::shadows_node_port::<false>(&ctx))
}

#[cgroup_sock(post_bind6)]
pub fn lb_post_bind6(ctx: SockContext) -> i32 {
    bind_verdict(bind::shadows_node_port::<true>(&ctx))
}

#[cgroup_sock(sock_release)]
pub fn lb_sock_release(ctx: SockContext) -> i32 {
    xlate::release(&ctx);
    ALLOW
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
