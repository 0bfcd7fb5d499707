//! `cgroup/connect4`: rewrite a connect() to a service frontend into a connect()
//! to one of its backends, before the socket sends anything.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{bpf_get_prandom_u32, generated::bpf_set_retval},
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    Backend, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, PROTO_TCP, PROTO_UDP, ServiceKey,
    ServiceMeta, ServiceValue, config, stats,
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

const ECONNREFUSED: i32 = 111;
/// sock_addr verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => {
            // SAFETY: plain helper call; the retval becomes connect()'s errno.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
    }
}

enum Verdict {
    Pass,
    Refuse,
}

fn try_connect4(ctx: &SockAddrContext) -> Verdict {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Verdict::Pass;
    }
    let (addr, port) = (sa.user_ip4, sa.user_port as u16);
    let Some(master) = lookup_service(ServiceKey::new(addr, port, proto, 0)) else {
        return Verdict::Pass;
    };
    if master.count == 0 {
        bump(stats::NO_BACKEND);
        return Verdict::Refuse;
    }
    // SAFETY: the helper has no preconditions.
    let pick = unsafe { bpf_get_prandom_u32() } % master.count;
    let Some(backend) = pick_backend(addr, port, proto, pick as u16 + 1) else {
        bump(stats::NO_BACKEND);
        return Verdict::Refuse;
    };
    if debug_enabled() {
        debug!(
            ctx,
            target: "lb_ebpf",
            "connect4 {:i}:{} -> {:i}:{} (svc {})",
            u32::from_be(addr),
            u16::from_be(port),
            u32::from_be(backend.addr),
            u16::from_be(backend.port),
            master.svc_id
        );
    }
    sa.user_ip4 = backend.addr;
    sa.user_port = u32::from(backend.port);
    bump(stats::TRANSLATED);
    Verdict::Pass
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
    let entry = lookup_service(ServiceKey::new(addr, port, proto, slot))?;
    let ptr = BACKENDS.get_ptr(entry.backend_id)?;
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    Some(unsafe { *ptr })
}

#[inline(always)]
fn lookup_service(key: ServiceKey) -> Option<ServiceValue> {
    let ptr = SERVICES.get_ptr(key)?;
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    Some(unsafe { *ptr })
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn debug_enabled() -> bool {
    CONFIG.get(config::DEBUG_LOG).is_some_and(|v| *v != 0)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
