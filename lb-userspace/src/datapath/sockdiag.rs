//! Destroying sockets by cookie with netlink `SOCK_DESTROY` (inet_diag),
//! in every network namespace that holds a process of the attached cgroup,
//! and the host's. Behind [`SocketDestroyer`] so another mechanism (a BPF
//! iterator calling `bpf_sock_destroy`, once aya can call kfuncs) can
//! replace it.
//!
//! `SOCK_DESTROY` needs the socket's full id (addresses, ports, interface),
//! not only its cookie, so each namespace's sockets of the protocol are
//! dumped first and those whose cookie is asked for are destroyed with the
//! id the dump gave (the kernel checks the cookie too).
use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{self, ErrorKind},
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use lb_common::{PROTO_TCP, PROTO_UDP};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, AF_INET6},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use nix::{
    sched::{CloneFlags, setns},
    sys::socket::{
        AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send, socket,
    },
};

/// What to destroy: a socket cookie and the IP protocol of its socket
/// ([`ANY_PROTO`]: TCP or UDP, whichever it is).
pub type Targets = HashMap<u64, u8>;

/// A target whose protocol is not known (its frontend is gone): looked
/// for among TCP and UDP sockets (a cookie is unique across both).
pub const ANY_PROTO: u8 = 0;

/// Destroys sockets by cookie; returns the cookies it destroyed.
pub trait SocketDestroyer: Send {
    fn destroy(&mut self, targets: &Targets) -> io::Result<HashSet<u64>>;
}

/// `SOCK_DESTROY` over netlink, namespace by namespace.
#[derive(Clone, Debug)]
pub struct SockDiag {
    cgroup: PathBuf,
}

impl SockDiag {
    /// Checks that the kernel has `SOCK_DESTROY` (`CONFIG_INET_DIAG_DESTROY`):
    /// destroying a socket that does not exist answers ENOENT if it does,
    /// EOPNOTSUPP if not.
    pub fn probe(cgroup: &Path) -> io::Result<Self> {
        let nl = open_sock_diag()?;
        let mut id = SocketId::new_v4();
        id.cookie = [0xfe; 8];
        match destroy_one(&nl, AF_INET, libc::IPPROTO_UDP as u8, id) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        Ok(Self {
            cgroup: cgroup.to_owned(),
        })
    }
}

impl SocketDestroyer for SockDiag {
    fn destroy(&mut self, targets: &Targets) -> io::Result<HashSet<u64>> {
        let mut protocols: Vec<u8> = targets
            .values()
            .flat_map(|&p| match p {
                ANY_PROTO => vec![PROTO_TCP, PROTO_UDP],
                p => vec![p],
            })
            .collect();
        protocols.sort_unstable();
        protocols.dedup();
        let namespaces = namespaces(&self.cgroup);
        // setns() moves the calling thread only: a thread of our own, so
        // no runtime thread ever sits in another namespace.
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut destroyed = HashSet::new();
                for ns in &namespaces {
                    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                    let nl = open_sock_diag()?;
                    for &proto in &protocols {
                        for family in [AF_INET, AF_INET6] {
                            for (cookie, id) in dump(&nl, family, proto)? {
                                if !targets
                                    .get(&cookie)
                                    .is_some_and(|&p| p == proto || p == ANY_PROTO)
                                {
                                    continue;
                                }
                                match destroy_one(&nl, family, proto, id) {
                                    Ok(()) => {
                                        destroyed.insert(cookie);
                                    }
                                    // Closed since the dump.
                                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                                    Err(e) => return Err(e),
                                }
                            }
                        }
                    }
                }
                Ok(destroyed)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("socket destroyer thread panicked")))
        })
    }
}

/// The network namespaces of every process in `cgroup` and below, and the
/// host's (pid 1's), each once.
fn namespaces(cgroup: &Path) -> Vec<OwnedFd> {
    let mut pids = vec![1];
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for pid in pids {
        // A process may exit between the listing and here: skip it.
        let Ok(file) = fs::File::open(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        let Ok(meta) = file.metadata() else {
            continue;
        };
        if seen.insert((meta.dev(), meta.ino())) {
            out.push(OwnedFd::from(file));
        }
    }
    out
}

fn open_sock_diag() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    Ok(fd)
}

fn request(family: u8, protocol: u8, socket_id: SocketId) -> InetRequest {
    InetRequest {
        family,
        protocol,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    }
}

fn send_message<T>(nl: &OwnedFd, mut msg: NetlinkMessage<T>) -> io::Result<()>
where
    T: netlink_packet_core::NetlinkSerializable + std::fmt::Debug,
{
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    send(nl.as_raw_fd(), &buf, nix::sys::socket::MsgFlags::empty())?;
    Ok(())
}

/// Every socket of `family` and `protocol` in the namespace `nl` was
/// opened in: (cookie, id).
fn dump(nl: &OwnedFd, family: u8, protocol: u8) -> io::Result<Vec<(u64, SocketId)>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    send_message(
        nl,
        NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(request(family, protocol, id)).into(),
        ),
    )?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(
            nl.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        )?;
        let mut offset = 0;
        while offset < n {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..n])
                .map_err(|e| io::Error::new(ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let id = r.header.socket_id;
                    out.push((cookie(&id.cookie), id));
                }
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return Err(e.code.map_or_else(
                        || io::Error::other("sock_diag dump error"),
                        |c| io::Error::from_raw_os_error(-c.get()),
                    ));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// `SOCK_DESTROY` of the socket with `id` (cookie included): its owner
/// sees ECONNABORTED on its next call.
fn destroy_one(nl: &OwnedFd, family: u8, protocol: u8, id: SocketId) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let msg = SockDiagDestroy::new(SockDiagMessage::InetRequest(request(family, protocol, id)));
    send_message(nl, NetlinkMessage::new(header, msg.into()))?;
    let mut buf = vec![0u8; 4096];
    let n = recv(
        nl.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::empty(),
    )?;
    let msg = NetlinkMessage::<SockDiagDestroy>::deserialize(&buf[..n])
        .map_err(|e| io::Error::new(ErrorKind::InvalidData, e.to_string()))?;
    match msg.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(c) => Err(io::Error::from_raw_os_error(-c.get())),
        },
        _ => Ok(()),
    }
}

/// The kernel's `idiag_cookie[2]`: low word first, each in host order.
fn cookie(bytes: &[u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let hi = u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    u64::from(lo) | (u64::from(hi) << 32)
}
