//! Sockets left talking to a backend that is gone: after the maps change,
//! the translated sockets whose backend its frontend no longer uses for new
//! sockets are destroyed, so the application sees ECONNABORTED and
//! reconnects (kube-proxy flushes the conntrack entries of removed UDP
//! endpoints for the same reason).
//!
//! Only what the maps say is used: a socket's record in `LB_SOCK` (or the
//! spill hash) names its frontend, service id and backend; the frontend's
//! entry in `LB_SERVICES` and its range of `LB_BACKENDS` say which backends
//! it uses now. So a socket connected straight to a pod (no record), an
//! unconnected UDP socket (no connected peer in its record) and a socket of
//! another frontend of the same backend are never chosen. With `all`, TCP
//! connections go too, except those to an endpoint that is still serving
//! (terminating, or left out by policy): the maps do not hold those, so the
//! sync loop hands the model's list over in [`Spared`].
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::fd::AsFd as _,
    path::Path,
    sync::{Arc, Mutex},
};

use aya::maps::{Array, HashMap as BpfHash, Map, MapData};
use lb_common::{
    Addr, Backend, PROTO_TCP, PROTO_UDP, SLOT_CLAIMING, ServiceKey, ServiceValue, SockReverse,
    SockSlot, maps,
};

use super::{
    DatapathError, Result,
    bpf::{map_err, open_pin},
    sockdiag::{ANY_PROTO, SocketDestroyer, Targets},
    sys,
};

/// `--terminate-sockets`: which translated sockets go when their backend does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Connected UDP sockets (the default).
    Udp,
    /// Connected UDP sockets, and TCP connections whose endpoint is gone
    /// from the Service or no longer serving.
    All,
    /// None.
    None,
}

/// A frontend's backends as the records name them: (address, port), both
/// in network order.
pub type BackendSet = HashSet<(Addr, u16)>;

/// The endpoints whose TCP connections `--terminate-sockets all` spares,
/// per frontend: still serving, but not used for new sockets, so not in
/// the maps. Written by the sync loop from the model, read by the
/// terminator; no TCP connection is judged before the first complete sync.
#[derive(Debug, Default)]
pub struct Spared {
    state: Mutex<SparedState>,
}

#[derive(Debug, Default)]
struct SparedState {
    complete: bool,
    by_frontend: HashMap<ServiceKey, BackendSet>,
}

impl Spared {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Sets `key`'s spared endpoints (none: forgets it); whether that
    /// changed anything.
    pub fn set(&self, key: ServiceKey, backends: BackendSet) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if backends.is_empty() {
            s.by_frontend.remove(&key).is_some()
        } else if s.by_frontend.get(&key) == Some(&backends) {
            false
        } else {
            s.by_frontend.insert(key, backends);
            true
        }
    }

    /// The sources have synced once: the list is whole.
    pub fn set_complete(&self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .complete = true;
    }

    /// A copy of the lists, once they are whole.
    pub fn snapshot(&self) -> Option<HashMap<ServiceKey, BackendSet>> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.complete.then(|| s.by_frontend.clone())
    }
}

/// One translated socket's record: its cookie and what it was sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub cookie: u64,
    pub conn: SockReverse,
}

/// What a frontend's entry says now, as [`stale`] asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Live {
    pub proto: u8,
    pub svc_id: u32,
    /// (address, port in network order) of each backend in its range.
    pub backends: HashSet<(Addr, u16)>,
}

/// The sockets to destroy (cookie → protocol): connected UDP sockets whose
/// frontend is gone, belongs to another service now (same address, new
/// id), or no longer has the socket's backend; with `tcp` (`--terminate-sockets
/// all`, the spared lists once whole), TCP connections of a frontend that
/// is gone, or whose backend it neither uses nor spares.
/// `live(addr, port, svc_id)` finds the frontend the record names.
pub fn stale(
    records: &[Record],
    mut live: impl FnMut(&Addr, u16, u32) -> Option<Live>,
    tcp: Option<&HashMap<ServiceKey, BackendSet>>,
) -> Targets {
    let mut frontends: HashMap<(Addr, u16, u32), Option<Live>> = HashMap::new();
    let mut targets = Targets::new();
    for r in records {
        let c = &r.conn;
        let backend = (c.backend, c.backend_port);
        let found = frontends
            .entry((c.addr, c.port, c.svc_id))
            .or_insert_with(|| live(&c.addr, c.port, c.svc_id));
        let proto = match (found, tcp) {
            (Some(l), None) if l.proto == PROTO_TCP => continue,
            (Some(l), Some(spared)) if l.proto == PROTO_TCP => {
                let key = ServiceKey::new(c.addr, c.port, PROTO_TCP);
                if l.backends.contains(&backend)
                    || spared.get(&key).is_some_and(|s| s.contains(&backend))
                {
                    continue;
                }
                PROTO_TCP
            }
            (Some(l), _) if l.backends.contains(&backend) => continue,
            (Some(_), _) => PROTO_UDP,
            // No frontend with this address and id: deleted or replaced.
            // The record does not say its protocol.
            (None, None) => PROTO_UDP,
            (None, Some(_)) => ANY_PROTO,
        };
        targets.insert(r.cookie, proto);
    }
    targets
}

/// The maps the terminator reads, opened by pin next to the reconciler's
/// own handles, and the destroyer.
pub struct Terminator<D> {
    services: BpfHash<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, Backend>,
    backend_slots: u32,
    slots: MapData,
    slot_count: u32,
    spill: Option<BpfHash<MapData, u64, SockReverse>>,
    /// `LB_TERMINATED`: sockets destroyed per service id.
    counts: BpfHash<MapData, u32, u64>,
    destroyer: D,
    /// `--terminate-sockets all`: what TCP connections are spared.
    spared: Option<Arc<Spared>>,
}

impl<D: SocketDestroyer> Terminator<D> {
    /// `spared`: `Some` for `--terminate-sockets all` (TCP too).
    pub fn open(dir: &Path, destroyer: D, spared: Option<Arc<Spared>>) -> Result<Self> {
        let services = BpfHash::try_from(Map::HashMap(open_pin(dir, maps::SERVICES)?))
            .map_err(|e| map_err("open", maps::SERVICES, e))?;
        let backends = open_pin(dir, maps::BACKENDS)?;
        let backend_slots = backends
            .info()
            .map_err(|e| map_err("info", maps::BACKENDS, e))?
            .max_entries();
        let backends = Array::try_from(Map::Array(backends))
            .map_err(|e| map_err("open", maps::BACKENDS, e))?;
        let slots = open_pin(dir, maps::SOCK)?;
        let slot_count = slots
            .info()
            .map_err(|e| map_err("info", maps::SOCK, e))?
            .max_entries();
        let spill = MapData::from_pin(dir.join(maps::SOCK_SPILL))
            .ok()
            .and_then(|m| BpfHash::try_from(Map::HashMap(m)).ok());
        Ok(Self {
            services,
            backends,
            backend_slots,
            slots,
            slot_count,
            spill,
            counts: BpfHash::try_from(Map::HashMap(open_pin(dir, maps::TERMINATED)?))
                .map_err(|e| map_err("open", maps::TERMINATED, e))?,
            destroyer,
            spared,
        })
    }

    /// Every connected socket's record (slots and spill hash).
    pub fn records(&self) -> Result<Vec<Record>> {
        let mut out: Vec<Record> = Vec::new();
        sys::array_lookup_each(
            self.slots.fd().as_fd(),
            self.slot_count,
            |chunk: &[SockSlot]| {
                out.extend(
                    chunk
                        .iter()
                        .filter(|s| s.cookie != 0 && s.cookie != SLOT_CLAIMING)
                        .map(|s| Record {
                            cookie: s.cookie,
                            conn: s.state.conn,
                        }),
                );
            },
        )
        .map_err(|e| DatapathError::Other(format!("reading {}: {e}", maps::SOCK)))?;
        if let Some(spill) = &self.spill {
            out.extend(
                spill
                    .iter()
                    .filter_map(std::result::Result::ok)
                    .map(|(cookie, conn)| Record { cookie, conn }),
            );
        }
        out.retain(|r| r.conn.backend_port != 0);
        Ok(out)
    }

    /// The frontend `addr:port` with `svc_id`, if its entry has that id now:
    /// its protocol and backends.
    fn live(&self, addr: &Addr, port: u16, svc_id: u32) -> Option<Live> {
        for proto in [PROTO_UDP, PROTO_TCP] {
            let key = ServiceKey::new(*addr, port, proto);
            // The range of the entry read before and after it, so a range
            // the reconciler moved meanwhile is never taken for the new one.
            for _ in 0..3 {
                let Ok(before) = self.services.get(&key, 0) else {
                    break;
                };
                if before.svc_id != svc_id {
                    break;
                }
                let backends = self.range(&before)?;
                if self.services.get(&key, 0).ok() == Some(before) {
                    return Some(Live {
                        proto,
                        svc_id,
                        backends,
                    });
                }
            }
        }
        None
    }

    fn range(&self, v: &ServiceValue) -> Option<HashSet<(Addr, u16)>> {
        let end = v.base.checked_add(u32::from(v.count))?;
        if end > self.backend_slots {
            return None;
        }
        let mut out = HashSet::new();
        for i in v.base..end {
            let b = self.backends.get(&i, 0).ok()?;
            out.insert((b.addr, b.port));
        }
        Some(out)
    }

    /// One pass: reads the records, decides, destroys, counts. Returns
    /// how many sockets were destroyed.
    pub fn pass(&mut self) -> Result<u64> {
        let records = self.records()?;
        let spared = self.spared.as_ref().and_then(|s| s.snapshot());
        let targets = stale(&records, |a, p, id| self.live(a, p, id), spared.as_ref());
        let mut n = 0;
        if !targets.is_empty() {
            let destroyed = self
                .destroyer
                .destroy(&targets)
                .map_err(|e| DatapathError::Other(format!("destroying sockets: {e}")))?;
            let mut per_service: BTreeMap<u32, u64> = BTreeMap::new();
            for r in records.iter().filter(|r| destroyed.contains(&r.cookie)) {
                *per_service.entry(r.conn.svc_id).or_default() += 1;
            }
            for (id, add) in per_service {
                let now = self.counts.get(&id, 0).unwrap_or(0);
                self.counts
                    .insert(id, now + add, 0)
                    .map_err(|e| map_err("write", maps::TERMINATED, e))?;
            }
            n = destroyed.len() as u64;
        }
        self.prune_counts()?;
        Ok(n)
    }

    /// Drops the counts of service ids no frontend has any more (an id is
    /// reused by a later service, which must not inherit them).
    fn prune_counts(&mut self) -> Result<()> {
        let ids: Vec<u32> = self
            .counts
            .keys()
            .filter_map(std::result::Result::ok)
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let live: HashSet<u32> = self
            .services
            .iter()
            .filter_map(std::result::Result::ok)
            .map(|(_, v)| v.svc_id)
            .collect();
        for id in ids.into_iter().filter(|id| !live.contains(id)) {
            let _ = self.counts.remove(&id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use lb_common::v4_mapped;

    use super::*;

    fn addr(last: u8) -> Addr {
        v4_mapped(u32::from_ne_bytes([10, 0, 0, last]))
    }

    fn record(cookie: u64, frontend: u8, svc_id: u32, backend: u8) -> Record {
        Record {
            cookie,
            conn: SockReverse {
                backend: addr(backend),
                backend_port: 80u16.to_be(),
                port: 53u16.to_be(),
                svc_id,
                addr: addr(frontend),
            },
        }
    }

    /// Frontend .1 (UDP, id 1) keeps backend .11 and lost .12; frontend .2
    /// (TCP, id 2) lost .12 too; frontend .3 is gone; frontend .4 exists
    /// under another id now.
    fn live(a: &Addr, _port: u16, svc_id: u32) -> Option<Live> {
        let backends = |b: &[u8]| b.iter().map(|&o| (addr(o), 80u16.to_be())).collect();
        match (a, svc_id) {
            (a, 1) if *a == addr(1) => Some(Live {
                proto: PROTO_UDP,
                svc_id,
                backends: backends(&[11]),
            }),
            (a, 2) if *a == addr(2) => Some(Live {
                proto: PROTO_TCP,
                svc_id,
                backends: backends(&[11]),
            }),
            _ => None,
        }
    }

    #[test]
    fn only_connected_udp_sockets_of_a_backend_their_frontend_lost() {
        let records = [
            record(100, 1, 1, 11),
            record(101, 1, 1, 12),
            record(102, 2, 2, 12),
            record(103, 3, 3, 11),
            record(104, 4, 9, 11),
        ];
        let targets = stale(&records, live, None);
        let mut cookies: Vec<u64> = targets.keys().copied().collect();
        cookies.sort_unstable();
        assert_eq!(cookies, [101, 103, 104]);
        assert!(targets.values().all(|&p| p == PROTO_UDP));
    }

    #[test]
    fn a_frontend_is_looked_up_once_per_pass() {
        let records: Vec<Record> = (0..50).map(|c| record(c, 1, 1, 12)).collect();
        let mut lookups = 0;
        let targets = stale(
            &records,
            |a, p, id| {
                lookups += 1;
                live(a, p, id)
            },
            None,
        );
        assert_eq!(lookups, 1);
        assert_eq!(targets.len(), 50);
    }

    /// `all`: a TCP connection goes when its frontend is gone or its
    /// backend is neither used nor spared; one to a spared (terminating
    /// but serving) backend stays. UDP is judged as before.
    #[test]
    fn all_destroys_tcp_connections_unless_their_endpoint_still_serves() {
        let records = [
            record(200, 2, 2, 11),
            record(201, 2, 2, 12),
            record(202, 2, 2, 13),
            record(203, 3, 3, 11),
            record(204, 1, 1, 12),
        ];
        let mut spared = HashMap::new();
        spared.insert(
            ServiceKey::new(addr(2), 53u16.to_be(), PROTO_TCP),
            [(addr(13), 80u16.to_be())]
                .into_iter()
                .collect::<BackendSet>(),
        );
        let targets = stale(&records, live, Some(&spared));
        let mut got: Vec<(u64, u8)> = targets.into_iter().collect();
        got.sort_unstable();
        // .12 of the TCP frontend: gone; .13: spared; frontend .3: gone
        // (protocol unknown); the UDP socket on .12: as in `udp`.
        assert_eq!(got, [(201, PROTO_TCP), (203, ANY_PROTO), (204, PROTO_UDP)]);
    }

    /// Before the first complete sync the spared lists are not whole: no
    /// TCP connection is judged.
    #[test]
    fn spared_lists_count_only_once_whole() {
        let s = Spared::new();
        let key = ServiceKey::new(addr(2), 53u16.to_be(), PROTO_TCP);
        let set: BackendSet = [(addr(13), 80u16.to_be())].into_iter().collect();
        assert!(s.set(key, set.clone()));
        assert!(
            !s.set(key, set.clone()),
            "the same list again changes nothing"
        );
        assert!(s.snapshot().is_none());
        s.set_complete();
        assert_eq!(s.snapshot().unwrap()[&key], set);
        assert!(s.set(key, BackendSet::new()));
        assert!(s.snapshot().unwrap().is_empty());
    }
}
