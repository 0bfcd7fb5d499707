//! In-memory datapath for unit tests: same contract as the BPF maps,
//! including size limits, plus a log of every write for ordering checks and
//! injectable failures, so every error path of the reconciler can be driven.
//! It also plays the concurrent reader: a backend slot that any master has
//! reached since the last grace period may be held by a running program,
//! and a write to it fails with [`DatapathError::LiveSlot`].
use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use lb_common::{AffinityKey, AffinityValue, Backend, ServiceKey, ServiceMeta, ServiceValue};

use super::{Datapath, DatapathError, Result, Snapshot};

/// One write, in the order the reconciler issued it (successful ones only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A range of backend slots: (base, count).
    PutBackends(u32, u32),
    Grace,
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    PutMeta(u32),
    DeleteMeta(u32),
}

/// The kinds of [`Datapath`] call a fault can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    Snapshot,
    PutBackends,
    Grace,
    PutService,
    DeleteService,
    PutMeta,
    DeleteMeta,
}

/// One [`Datapath`] call with its arguments, as a fault predicate sees it.
#[derive(Clone, Copy, Debug)]
pub enum Call<'a> {
    Snapshot,
    PutBackends(u32, &'a [Backend]),
    Grace,
    PutService(&'a ServiceKey, &'a ServiceValue),
    DeleteService(&'a ServiceKey),
    PutMeta(u32, &'a ServiceMeta),
    DeleteMeta(u32),
}

impl Call<'_> {
    pub fn kind(&self) -> OpKind {
        match self {
            Call::Snapshot => OpKind::Snapshot,
            Call::PutBackends(..) => OpKind::PutBackends,
            Call::Grace => OpKind::Grace,
            Call::PutService(..) => OpKind::PutService,
            Call::DeleteService(_) => OpKind::DeleteService,
            Call::PutMeta(..) => OpKind::PutMeta,
            Call::DeleteMeta(_) => OpKind::DeleteMeta,
        }
    }
}

/// The maps the datapath holds, for [`MemoryDatapath::set_full`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapKind {
    Services,
    Backends,
    Meta,
}

impl MapKind {
    /// What the BPF datapath reports for a full map of this kind.
    fn full_error(self) -> DatapathError {
        let (map, flag) = match self {
            MapKind::Services => (lb_common::maps::SERVICES, "max-services"),
            MapKind::Backends => (lb_common::maps::BACKENDS, "max-backends"),
            MapKind::Meta => (lb_common::maps::SERVICE_META, "max-frontends"),
        };
        DatapathError::MapFull { map, flag }
    }
}

type Predicate = Arc<dyn Fn(&Call<'_>) -> bool + Send + Sync>;

/// When an injected fault fires.
#[derive(Clone)]
enum Trigger {
    /// The call of this kind whose 1-based number (counted over the
    /// datapath's life, see [`MemoryDatapath::calls`]) is this.
    Nth(OpKind, usize),
    /// Every call the predicate accepts, until cleared.
    Matching(Predicate),
}

impl fmt::Debug for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Nth(kind, n) => write!(f, "Nth({kind:?}, {n})"),
            Trigger::Matching(_) => f.write_str("Matching(..)"),
        }
    }
}

/// A call counter that `&self` can bump.
#[derive(Debug, Default)]
struct SnapshotCount(AtomicUsize);

impl Clone for SnapshotCount {
    fn clone(&self) -> Self {
        Self(AtomicUsize::new(self.0.load(Ordering::Relaxed)))
    }
}

#[derive(Clone, Debug)]
pub struct MemoryDatapath {
    pub state: Snapshot,
    pub log: Vec<Op>,
    pub max_services: usize,
    /// Slots of the backend array.
    pub max_backends: usize,
    /// Meta entries (frontends), as `--max-frontends`.
    pub max_frontends: usize,
    pub map_full: u64,
    /// `LB_AFFINITY` (the programs write it; tests stand in for them).
    pub affinity: BTreeMap<AffinityKey, AffinityValue>,
    /// Calls attempted per kind, failed ones included.
    calls: BTreeMap<OpKind, usize>,
    /// `snapshot` takes `&self`, so its calls are counted apart.
    snapshots: SnapshotCount,
    faults: Vec<Trigger>,
    /// Maps that refuse new keys (E2BIG) whatever their size.
    full: Vec<MapKind>,
    /// Backend ranges (base, count) some master reached since the last
    /// grace period: a program may still be reading them.
    held: Vec<(u32, u32)>,
    /// Writes refused because a reader may hold the slot: always a bug.
    pub live_slot_writes: usize,
    /// `LB_SVC_STATS` by id (the programs count; tests stand in for them).
    pub svc_stats: BTreeMap<u32, lb_common::SvcStats>,
    /// The highest id `LB_SVC_STATS` has a slot for.
    pub max_svc_id: u32,
}

/// Backend slots of a test datapath without limits.
const DEFAULT_CAPACITY: usize = 1 << 20;

impl Default for MemoryDatapath {
    fn default() -> Self {
        Self {
            state: Snapshot::default(),
            log: Vec::new(),
            max_services: usize::MAX,
            max_backends: DEFAULT_CAPACITY,
            max_frontends: usize::MAX,
            map_full: 0,
            affinity: BTreeMap::new(),
            calls: BTreeMap::new(),
            snapshots: SnapshotCount::default(),
            faults: Vec::new(),
            full: Vec::new(),
            held: Vec::new(),
            live_slot_writes: 0,
            svc_stats: BTreeMap::new(),
            max_svc_id: u32::MAX,
        }
    }
}

impl MemoryDatapath {
    pub fn with_limits(max_services: usize, max_backends: usize) -> Self {
        Self {
            max_services,
            max_backends,
            ..Self::default()
        }
    }

    /// Fails the `nth` call of `kind` from now on (1 = the next one), once.
    pub fn fail_nth(&mut self, kind: OpKind, nth: usize) {
        let at = self.calls(kind) + nth.max(1);
        self.faults.push(Trigger::Nth(kind, at));
    }

    /// Fails every call `pred` accepts until [`Self::clear_faults`].
    pub fn fail_when(&mut self, pred: impl Fn(&Call<'_>) -> bool + Send + Sync + 'static) {
        self.faults.push(Trigger::Matching(Arc::new(pred)));
    }

    /// Fails every call of `kind` until [`Self::clear_faults`].
    pub fn fail_all(&mut self, kind: OpKind) {
        self.fail_when(move |c| c.kind() == kind);
    }

    /// Removes every injected fault (full maps stay full).
    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// `map` refuses new keys with [`DatapathError::MapFull`] (updates of
    /// existing keys still succeed, as with E2BIG), or stops doing so.
    pub fn set_full(&mut self, map: MapKind, full: bool) {
        self.full.retain(|m| *m != map);
        if full {
            self.full.push(map);
        }
    }

    /// Calls of `kind` attempted so far, failed ones included.
    pub fn calls(&self, kind: OpKind) -> usize {
        match kind {
            OpKind::Snapshot => self.snapshots.0.load(Ordering::Relaxed),
            _ => self.calls.get(&kind).copied().unwrap_or(0),
        }
    }

    /// Counts one call of `kind`; returns its 1-based number.
    fn count(&mut self, kind: OpKind) -> usize {
        let n = self.calls.entry(kind).or_default();
        *n += 1;
        *n
    }

    /// Fails call number `n` if a fault says so.
    fn enter(&self, call: Call<'_>, n: usize) -> Result<()> {
        let kind = call.kind();
        let hit = self.faults.iter().any(|t| match t {
            Trigger::Nth(k, at) => *k == kind && *at == n,
            Trigger::Matching(pred) => pred(&call),
        });
        if hit {
            return Err(DatapathError::Other(format!(
                "injected failure of {kind:?} call {n}"
            )));
        }
        Ok(())
    }

    /// E2BIG for a new key in a full map.
    fn check_room(&self, map: MapKind, exists: bool, len: usize) -> Result<()> {
        let max = match map {
            MapKind::Services => self.max_services,
            MapKind::Backends => self.max_backends,
            MapKind::Meta => self.max_frontends,
        };
        if !exists && (len >= max || self.full.contains(&map)) {
            return Err(map.full_error());
        }
        Ok(())
    }
}

impl Datapath for MemoryDatapath {
    fn snapshot(&self) -> Result<Snapshot> {
        let n = self.snapshots.0.fetch_add(1, Ordering::Relaxed) + 1;
        self.enter(Call::Snapshot, n)?;
        Ok(self.state.clone())
    }

    fn backend_capacity(&self) -> u32 {
        u32::try_from(self.max_backends).unwrap_or(u32::MAX)
    }

    fn put_backends(&mut self, base: u32, backends: &[Backend]) -> Result<()> {
        let n = self.count(OpKind::PutBackends);
        self.enter(Call::PutBackends(base, backends), n)?;
        let len = u32::try_from(backends.len()).unwrap_or(u32::MAX);
        let end = u64::from(base) + u64::from(len);
        if end > self.max_backends as u64 || self.full.contains(&MapKind::Backends) {
            return Err(MapKind::Backends.full_error());
        }
        if let Some(&(b, _)) = self
            .held
            .iter()
            .find(|&&(b, c)| u64::from(b) < end && base < b + c)
        {
            self.live_slot_writes += 1;
            return Err(DatapathError::LiveSlot { slot: b.max(base) });
        }
        for (i, backend) in backends.iter().enumerate() {
            self.state.backends.insert(base + i as u32, *backend);
        }
        self.log.push(Op::PutBackends(base, len));
        Ok(())
    }

    fn grace(&mut self) -> Result<()> {
        let n = self.count(OpKind::Grace);
        self.enter(Call::Grace, n)?;
        self.held = self
            .state
            .services
            .values()
            .filter(|v| v.count > 0)
            .map(|v| (v.base, u32::from(v.count)))
            .collect();
        self.log.push(Op::Grace);
        Ok(())
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        let n = self.count(OpKind::PutService);
        self.enter(Call::PutService(key, value), n)?;
        self.check_room(
            MapKind::Services,
            self.state.services.contains_key(key),
            self.state.services.len(),
        )?;
        self.state.services.insert(*key, *value);
        if value.count > 0 {
            self.held.push((value.base, u32::from(value.count)));
        }
        self.log.push(Op::PutService(*key, *value));
        Ok(())
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<()> {
        let n = self.count(OpKind::DeleteService);
        self.enter(Call::DeleteService(key), n)?;
        self.state.services.remove(key);
        self.log.push(Op::DeleteService(*key));
        Ok(())
    }

    fn put_meta(&mut self, svc_id: u32, meta: &ServiceMeta) -> Result<()> {
        let n = self.count(OpKind::PutMeta);
        self.enter(Call::PutMeta(svc_id, meta), n)?;
        self.check_room(
            MapKind::Meta,
            self.state.meta.contains_key(&svc_id),
            self.state.meta.len(),
        )?;
        self.state.meta.insert(svc_id, *meta);
        self.log.push(Op::PutMeta(svc_id));
        Ok(())
    }

    fn delete_meta(&mut self, svc_id: u32) -> Result<()> {
        let n = self.count(OpKind::DeleteMeta);
        self.enter(Call::DeleteMeta(svc_id), n)?;
        self.state.meta.remove(&svc_id);
        self.log.push(Op::DeleteMeta(svc_id));
        Ok(())
    }

    fn count_map_full(&mut self, n: u64) -> Result<()> {
        self.map_full += n;
        Ok(())
    }

    fn max_svc_id(&self) -> u32 {
        self.max_svc_id
    }

    fn reset_svc_stats(&mut self, svc_id: u32) -> Result<()> {
        self.svc_stats.remove(&svc_id);
        self.state.terminated.remove(&svc_id);
        Ok(())
    }

    fn retain_affinity(&mut self, keep: &std::collections::HashSet<u32>) -> Result<usize> {
        let before = self.affinity.len();
        self.affinity.retain(|k, _| keep.contains(&k.svc_id));
        Ok(before - self.affinity.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(last: u8) -> Backend {
        Backend {
            addr: lb_common::v4_mapped(u32::from_ne_bytes([10, 244, 0, last])),
            port: 80u16.to_be(),
            proto: lb_common::PROTO_TCP,
            _pad: 0,
        }
    }

    fn key(last: u8) -> ServiceKey {
        ServiceKey::new(
            lb_common::v4_mapped(u32::from_ne_bytes([10, 96, 0, last])),
            80u16.to_be(),
            lb_common::PROTO_TCP,
        )
    }

    #[test]
    fn nth_fault_fails_that_call_once_and_changes_nothing() {
        let mut dp = MemoryDatapath::default();
        dp.put_backends(0, &[backend(1)]).unwrap();
        dp.fail_nth(OpKind::PutBackends, 2);
        dp.put_backends(1, &[backend(2)]).unwrap();
        let err = dp.put_backends(2, &[backend(3)]).unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(!dp.state.backends.contains_key(&2));
        dp.put_backends(2, &[backend(3)]).unwrap();
        assert_eq!(dp.calls(OpKind::PutBackends), 4);
        assert_eq!(dp.log.len(), 3, "a failed call is not logged");
    }

    #[test]
    fn predicate_fault_fails_matching_calls_until_cleared() {
        let mut dp = MemoryDatapath::default();
        dp.put_service(&key(7), &ServiceValue::new(0, 0, 7))
            .unwrap();
        dp.fail_when(move |c| matches!(c, Call::DeleteService(k) if **k == key(7)));
        dp.fail_nth(OpKind::Snapshot, 1);
        assert!(dp.snapshot().is_err());
        assert!(dp.snapshot().is_ok());
        assert!(dp.delete_service(&key(7)).is_err());
        assert!(dp.delete_service(&key(7)).is_err());
        dp.delete_service(&key(8)).unwrap();
        assert!(dp.state.services.contains_key(&key(7)));
        dp.clear_faults();
        dp.delete_service(&key(7)).unwrap();
        assert!(dp.state.services.is_empty());
    }

    #[test]
    fn full_array_refuses_writes_past_its_end() {
        let mut dp = MemoryDatapath::with_limits(8, 4);
        dp.put_backends(0, &[backend(1), backend(2), backend(3)])
            .unwrap();
        let err = dp.put_backends(3, &[backend(4), backend(5)]).unwrap_err();
        assert!(matches!(
            err,
            DatapathError::MapFull {
                map: lb_common::maps::BACKENDS,
                flag: "max-backends",
            }
        ));
        dp.put_backends(3, &[backend(4)]).unwrap();
    }

    /// A range a master reached is off limits until a grace period has
    /// passed since no master reaches it.
    #[test]
    fn a_range_a_reader_may_hold_is_not_writable_until_a_grace_period() {
        let mut dp = MemoryDatapath::default();
        dp.put_backends(0, &[backend(1), backend(2)]).unwrap();
        dp.put_service(&key(1), &ServiceValue::new(0, 2, 1))
            .unwrap();
        dp.put_backends(2, &[backend(3)]).unwrap();
        dp.put_service(&key(1), &ServiceValue::new(2, 1, 1))
            .unwrap();
        assert!(matches!(
            dp.put_backends(1, &[backend(9)]),
            Err(DatapathError::LiveSlot { slot: 1 })
        ));
        dp.grace().unwrap();
        dp.put_backends(0, &[backend(9), backend(9)]).unwrap();
        assert!(matches!(
            dp.put_backends(2, &[backend(9)]),
            Err(DatapathError::LiveSlot { slot: 2 })
        ));
    }
}
