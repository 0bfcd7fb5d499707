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
//! another frontend of the same backend are never chosen.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::fd::AsFd as _,
    path::Path,
};

use aya::maps::{Array, HashMap as BpfHash, Map, MapData};
use lb_common::{
    Addr, Backend, PROTO_TCP, PROTO_UDP, SLOT_CLAIMING, ServiceKey, ServiceValue, SockReverse,
    SockSlot, maps,
};

use super::{
    DatapathError, Result,
    bpf::{map_err, open_pin},
    sockdiag::{SocketDestroyer, Targets},
    sys,
};

/// `--terminate-sockets`: which translated sockets go when their backend does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Connected UDP sockets (the default).
    Udp,
    /// None.
    None,
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
/// id), or no longer has the socket's backend. `live(addr, port, svc_id)`
/// finds the frontend the record names.
pub fn stale(records: &[Record], mut live: impl FnMut(&Addr, u16, u32) -> Option<Live>) -> Targets {
    let mut frontends: HashMap<(Addr, u16, u32), Option<Live>> = HashMap::new();
    let mut targets = Targets::new();
    for r in records {
        let c = &r.conn;
        let found = frontends
            .entry((c.addr, c.port, c.svc_id))
            .or_insert_with(|| live(&c.addr, c.port, c.svc_id));
        let gone = match found {
            // A TCP socket: not ours to destroy in this mode.
            Some(l) if l.proto == PROTO_TCP => continue,
            Some(l) => !l.backends.contains(&(c.backend, c.backend_port)),
            // No frontend with this address and id: deleted or replaced.
            None => true,
        };
        if gone {
            targets.insert(r.cookie, PROTO_UDP);
        }
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
}

impl<D: SocketDestroyer> Terminator<D> {
    pub fn open(dir: &Path, destroyer: D) -> Result<Self> {
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
        })
    }

    /// Every connected socket's record (slots and spill hash).
    pub fn records(&self) -> Result<Vec<Record>> {
        let slots: Vec<SockSlot> = sys::array_lookup_all(self.slots.fd().as_fd(), self.slot_count)
            .map_err(|e| DatapathError::Other(format!("reading {}: {e}", maps::SOCK)))?;
        let mut out: Vec<Record> = slots
            .iter()
            .filter(|s| s.cookie != 0 && s.cookie != SLOT_CLAIMING)
            .map(|s| Record {
                cookie: s.cookie,
                conn: s.state.conn,
            })
            .collect();
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
        let targets = stale(&records, |a, p, id| self.live(a, p, id));
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
        let targets = stale(&records, live);
        let mut cookies: Vec<u64> = targets.keys().copied().collect();
        cookies.sort_unstable();
        assert_eq!(cookies, [101, 103, 104]);
        assert!(targets.values().all(|&p| p == PROTO_UDP));
    }

    #[test]
    fn a_frontend_is_looked_up_once_per_pass() {
        let records: Vec<Record> = (0..50).map(|c| record(c, 1, 1, 12)).collect();
        let mut lookups = 0;
        let targets = stale(&records, |a, p, id| {
            lookups += 1;
            live(a, p, id)
        });
        assert_eq!(lookups, 1);
        assert_eq!(targets.len(), 50);
    }
}
