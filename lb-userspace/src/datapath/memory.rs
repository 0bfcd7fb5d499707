//! In-memory datapath for unit tests: same contract as the BPF maps,
//! including size limits, plus a log of every write for ordering checks and
//! injectable failures, so every error path of the reconciler can be driven.
use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use lb_common::{Backend, ServiceKey, ServiceMeta, ServiceValue};

use super::{Datapath, DatapathError, Result, Snapshot};

/// One write, in the order the reconciler issued it (successful ones only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32),
    DeleteBackend(u32),
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    PutMeta(u32),
    DeleteMeta(u32),
}

/// The kinds of [`Datapath`] call a fault can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    Snapshot,
    PutBackend,
    DeleteBackend,
    PutService,
    DeleteService,
    PutMeta,
    DeleteMeta,
}

/// One [`Datapath`] call with its arguments, as a fault predicate sees it.
#[derive(Clone, Copy, Debug)]
pub enum Call<'a> {
    Snapshot,
    PutBackend(u32, &'a Backend),
    DeleteBackend(u32),
    PutService(&'a ServiceKey, &'a ServiceValue),
    DeleteService(&'a ServiceKey),
    PutMeta(u32, &'a ServiceMeta),
    DeleteMeta(u32),
}

impl Call<'_> {
    pub fn kind(&self) -> OpKind {
        match self {
            Call::Snapshot => OpKind::Snapshot,
            Call::PutBackend(..) => OpKind::PutBackend,
            Call::DeleteBackend(_) => OpKind::DeleteBackend,
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
    pub max_backends: usize,
    /// Meta entries (frontends), as `--max-frontends`.
    pub max_frontends: usize,
    pub map_full: u64,
    /// Calls attempted per kind, failed ones included.
    calls: BTreeMap<OpKind, usize>,
    /// `snapshot` takes `&self`, so its calls are counted apart.
    snapshots: SnapshotCount,
    faults: Vec<Trigger>,
    /// Maps that refuse new keys (E2BIG) whatever their size.
    full: Vec<MapKind>,
}

impl Default for MemoryDatapath {
    fn default() -> Self {
        Self {
            state: Snapshot::default(),
            log: Vec::new(),
            max_services: usize::MAX,
            max_backends: usize::MAX,
            max_frontends: usize::MAX,
            map_full: 0,
            calls: BTreeMap::new(),
            snapshots: SnapshotCount::default(),
            faults: Vec::new(),
            full: Vec::new(),
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

    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        let n = self.count(OpKind::PutBackend);
        self.enter(Call::PutBackend(id, backend), n)?;
        self.check_room(
            MapKind::Backends,
            self.state.backends.contains_key(&id),
            self.state.backends.len(),
        )?;
        self.state.backends.insert(id, *backend);
        self.log.push(Op::PutBackend(id));
        Ok(())
    }

    fn delete_backend(&mut self, id: u32) -> Result<()> {
        let n = self.count(OpKind::DeleteBackend);
        self.enter(Call::DeleteBackend(id), n)?;
        self.state.backends.remove(&id);
        self.log.push(Op::DeleteBackend(id));
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

    #[test]
    fn nth_fault_fails_that_call_once_and_changes_nothing() {
        let mut dp = MemoryDatapath::default();
        dp.put_backend(1, &backend(1)).unwrap();
        dp.fail_nth(OpKind::PutBackend, 2);
        dp.put_backend(2, &backend(2)).unwrap();
        let err = dp.put_backend(3, &backend(3)).unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(!dp.state.backends.contains_key(&3));
        dp.put_backend(3, &backend(3)).unwrap();
        assert_eq!(dp.calls(OpKind::PutBackend), 4);
        assert_eq!(dp.log.len(), 3, "a failed call is not logged");
    }

    #[test]
    fn predicate_fault_fails_matching_calls_until_cleared() {
        let mut dp = MemoryDatapath::default();
        dp.put_backend(7, &backend(7)).unwrap();
        dp.fail_when(|c| matches!(c, Call::DeleteBackend(7)));
        dp.fail_nth(OpKind::Snapshot, 1);
        assert!(dp.snapshot().is_err());
        assert!(dp.snapshot().is_ok());
        assert!(dp.delete_backend(7).is_err());
        assert!(dp.delete_backend(7).is_err());
        dp.delete_backend(8).unwrap();
        assert!(dp.state.backends.contains_key(&7));
        dp.clear_faults();
        dp.delete_backend(7).unwrap();
        assert!(dp.state.backends.is_empty());
    }

    #[test]
    fn full_map_refuses_new_keys_only() {
        let mut dp = MemoryDatapath::default();
        dp.put_backend(1, &backend(1)).unwrap();
        dp.set_full(MapKind::Backends, true);
        let err = dp.put_backend(2, &backend(2)).unwrap_err();
        assert!(matches!(
            err,
            DatapathError::MapFull {
                map: lb_common::maps::BACKENDS,
                ..
            }
        ));
        dp.put_backend(1, &backend(9)).unwrap();
        assert_eq!(dp.state.backends[&1], backend(9));
        dp.set_full(MapKind::Backends, false);
        dp.put_backend(2, &backend(2)).unwrap();
    }
}
