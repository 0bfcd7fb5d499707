//! Bind protection (`cgroup/post_bind4`, `cgroup/post_bind6`): a socket of
//! the host's network namespace may not bind a nodePort on an address
//! where connects to it are translated, or it would silently serve (or
//! lose) what was meant for the Service: a wildcard address, or a node
//! address (loopback included, with localhost node ports) the Service's
//! nodePort is served on. Pods have their own addresses and are left
//! alone, as is every port no Service uses as a nodePort.
//!
//! The lookups, cheapest first: one inlined read of the `LB_NODE_PORTS`
//! bitmap answers for any port that is no nodePort; then the netns cookie;
//! then, for a specific address only, one `LB_SERVICES` lookup of that
//! address and port, whose `SVC_FLAG_NODE_PORT` says it is a node-address
//! frontend. A separate program: connect and sendmsg pay nothing for it.
use aya_ebpf::{
    EbpfContext, bindings::bpf_sock, helpers::generated::bpf_get_netns_cookie,
    programs::SockContext,
};
use lb_common::{SVC_FLAG_NODE_PORT, ServiceKey, V4_MAPPED_WORD, v4_mapped};

use crate::{maps, xlate::handled};

/// Whether the bind the socket just made shadows a nodePort (the caller
/// then fails it with EADDRINUSE).
#[inline(always)]
pub fn shadows_node_port<const V6: bool>(ctx: &SockContext) -> bool {
    // SAFETY: the kernel hands every sock program a valid context.
    let sk: &bpf_sock = unsafe { &*ctx.sock };
    let Some(proto) = handled(sk.type_, sk.protocol) else {
        return false;
    };
    // Host byte order in `bpf_sock` (unlike `bpf_sock_addr.user_port`).
    let port = sk.src_port as u16;
    if !maps::is_node_port(proto, port) {
        return false;
    }
    // SAFETY: a sock context is a valid argument for this helper.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != maps::host_netns() {
        return false;
    }
    let addr = if V6 {
        let mut out = [0u32; 4];
        for (i, word) in out.iter_mut().enumerate() {
            // SAFETY: in-bounds field of the context; 4-byte loads only.
            *word = unsafe { core::ptr::read_volatile(&sk.src_ip6[i]) };
        }
        out
    } else {
        v4_mapped(sk.src_ip4)
    };
    // `0.0.0.0`, `::`, or `::ffff:0.0.0.0`: every address of the node.
    if addr[0] == 0 && addr[1] == 0 && (addr[2] == 0 || addr[2] == V4_MAPPED_WORD) && addr[3] == 0 {
        return true;
    }
    maps::service(&ServiceKey::new(addr, port.to_be(), proto))
        .is_some_and(|v| v.flags & SVC_FLAG_NODE_PORT != 0)
}
