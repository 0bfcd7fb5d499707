//! `lb-agent trace`: one event per translated or refused forward call,
//! into `LB_TRACE_RING`, while a tracer holds the lease in `LB_TRACE`.
//! While no one traces, a call pays the one read of the lease.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_ktime_get_coarse_ns, bpf_ktime_get_ns,
    },
    programs::SockAddrContext,
};
pub use lb_common::trace::{REFUSED, REFUSED_NO_SLOT, TRANSLATED};
use lb_common::{Backend, ServiceKey, TraceEvent, trace};

use crate::{maps, xlate::Hook};

/// Emits the outcome of one forward call if tracing is on: `backend` is
/// where it went (`None`: refused, `outcome` says why).
#[inline(always)]
pub fn emit<const V6: bool>(
    ctx: &SockAddrContext,
    hook: Hook,
    key: &ServiceKey,
    svc_id: u32,
    backend: Option<&Backend>,
    outcome: u8,
) {
    let lease = maps::trace_lease();
    if lease == 0 {
        return;
    }
    // SAFETY: the helper has no preconditions.
    if unsafe { bpf_ktime_get_coarse_ns() } > lease {
        return;
    }
    let ptr = ctx.as_ptr();
    // SAFETY: a sock_addr context is a valid argument for these helpers;
    // the others have no preconditions.
    let event = unsafe {
        TraceEvent {
            time_ns: bpf_ktime_get_ns(),
            cookie: bpf_get_socket_cookie(ptr),
            cgroup_id: bpf_get_current_cgroup_id(),
            netns: bpf_get_netns_cookie(ptr),
            frontend: key.addr,
            backend: backend.map_or([0; 4], |b| b.addr),
            frontend_port: key.port,
            backend_port: backend.map_or(0, |b| b.port),
            svc_id,
            hook: match (hook, V6) {
                (Hook::Connect, false) => trace::HOOK_CONNECT4,
                (Hook::Connect, true) => trace::HOOK_CONNECT6,
                (Hook::Sendmsg, false) => trace::HOOK_SENDMSG4,
                (Hook::Sendmsg, true) => trace::HOOK_SENDMSG6,
            },
            proto: key.proto,
            outcome,
            _pad: [0; 5],
        }
    };
    // No wakeup per event (an irq_work and a reader's wakeup cost the
    // call several hundred ns): the tracer drains every `trace::DRAIN_MS`
    // and is woken only when half the ring is taken. A full ring (no
    // reader keeping up) drops the event.
    let flags = if maps::TRACE_RING.query(u64::from(BPF_RB_AVAIL_DATA))
        >= u64::from(trace::RING_BYTES / 2)
    {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    let _ = maps::TRACE_RING.output::<TraceEvent>(&event, u64::from(flags));
}
