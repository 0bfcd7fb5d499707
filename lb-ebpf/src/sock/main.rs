//! The socket-LB programs, in one object so they share one set of maps:
//!
//! - `cgroup/connect4`: TCP and connected UDP connects to a service frontend
//!   go to one backend, chosen at random, before the socket sends anything;
//! - `cgroup/sendmsg4`: unconnected UDP datagrams to a frontend go to one
//!   backend chosen by socket cookie, so a socket sticks to its backend;
//! - `cgroup/recvmsg4`: datagrams from that backend appear to come from the
//!   frontend (resolvers drop replies from an address they did not ask);
//! - `cgroup/getpeername4`: `getpeername()` returns the frontend.
#![no_std]
#![no_main]

mod maps;
mod v4;

use aya_ebpf::{
    helpers::generated::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use v4::{Hook, Verdict};

const ECONNREFUSED: i32 = 111;
/// sock_addr verdicts. recvmsg4 and getpeername4 must always allow.
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
    verdict(v4::forward(&ctx, Hook::Connect))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict(v4::forward(&ctx, Hook::Sendmsg))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    v4::reverse(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    v4::reverse(&ctx);
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
