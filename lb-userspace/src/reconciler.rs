//! Diffs the desired state against what the maps hold and writes the
//! difference in make-before-break order, so a concurrent connect() always
//! finds a master whose slots and backends exist:
//!
//! 1. new backends; 2. changed slots 1..=n; 3. meta, then the master with the
//!    new count; 4. trailing slots past the new count;
//! 5. removed frontends: master first, then slots and meta;
//! 6. entries no frontend reaches (see `adopt`), then backends no slot
//!    references any more (always last).
//!
//! IDs are re-adopted from the maps at start and handed out with
//! wrap-around (never 0, never one in use), and a backend id is never
//! repointed at another address while anything may still read it.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
};

use lb_common::{MAX_SLOTS, ServiceKey, ServiceValue};

use crate::{
    datapath::{
        Datapath, DatapathError, backend_addr, decode_meta, encode_backend, encode_meta,
        frontend_key, key_frontend,
    },
    model::{DesiredService, DesiredState, Frontend, Proto, ServiceRef},
};

/// Whether frontends and backends absent from the desired state may be removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prune {
    /// Sources have fully synced: the desired state is complete.
    Yes,
    /// Sources are still syncing: add and grow, never remove or shrink.
    No,
}

/// A frontend as installed in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub svc_id: u32,
    pub service: ServiceRef,
    /// Backend id per slot; `slots[0]` is slot 1. May be longer than `count`
    /// after an adoption of a half-shrunk service.
    pub slots: Vec<u32>,
    /// The master's count (at most `MAX_SLOTS`).
    pub count: u16,
    /// Meta and master are in the maps. False for a new frontend whose
    /// first write failed before its master, and from the moment a removal
    /// has deleted the master until it has finished (a failed removal
    /// keeps the record, so the next apply resumes it).
    pub complete: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("service {namespace}/{name} ({frontend}): {source}")]
pub struct ReconcileError {
    pub namespace: String,
    pub name: String,
    pub frontend: Frontend,
    #[source]
    pub source: DatapathError,
}

/// What one `apply` did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub writes: usize,
    pub deletes: usize,
    /// Per-frontend failures; that frontend keeps its previous state.
    pub errors: Vec<ReconcileError>,
    /// Global failure (e.g. deleting an orphan) that is not tied to one frontend.
    pub other_errors: Vec<DatapathError>,
}

impl ApplyReport {
    pub fn map_full(&self) -> usize {
        self.errors
            .iter()
            .filter(|e| matches!(e.source, DatapathError::MapFull { .. }))
            .count()
    }
}

pub struct Reconciler<D> {
    dp: D,
    installed: BTreeMap<Frontend, Installed>,
    backend_ids: HashMap<(SocketAddr, Proto), u32>,
    backends: HashMap<u32, (SocketAddr, Proto)>,
    /// How many installed slots (active or not yet trimmed) name each backend.
    refs: HashMap<u32, u32>,
    /// Backends whose count dropped to zero (or never rose): the only
    /// candidates for deletion, so a sync does not walk every slot.
    unreferenced: BTreeSet<u32>,
    /// Service-map entries of no installed frontend, with the backend id
    /// each names (counted in `refs`): slots a crash left without their
    /// master, slots past a gap, keys of unknown protocols. Unreachable, so
    /// deleting them is always safe; the next pruning apply does.
    strays: BTreeMap<ServiceKey, u32>,
    /// Meta entries of no installed frontend; their ids are not reused
    /// until they are deleted (with the strays).
    stray_meta: BTreeSet<u32>,
    /// Service ids of `installed`, so allocation skips them in O(1).
    svc_ids: HashSet<u32>,
    svc_id_alloc: IdAllocator,
    backend_id_alloc: IdAllocator,
}

impl<D: Datapath> Reconciler<D> {
    /// Re-adopts whatever the maps already hold (a previous agent's state),
    /// without changing anything. Entries no frontend can reach are noted
    /// as strays and deleted by the first pruning apply.
    pub fn adopt(dp: D) -> Result<Self, DatapathError> {
        let snap = dp.snapshot()?;
        let mut backend_ids = HashMap::new();
        let mut backends = HashMap::new();
        // Entries of a protocol this agent never writes: deleted once
        // nothing names them.
        let mut foreign_backends = Vec::new();
        for (&id, b) in &snap.backends {
            let Some(proto) = Proto::from_number(b.proto) else {
                foreign_backends.push(id);
                continue;
            };
            let addr = backend_addr(b);
            backend_ids.insert((addr, proto), id);
            backends.insert(id, (addr, proto));
        }
        let mut installed = BTreeMap::new();
        for (key, value) in snap.services.iter().filter(|(k, _)| k.slot == 0) {
            let Some(fe) = key_frontend(key) else {
                continue;
            };
            let mut slots = Vec::new();
            for slot in 1..=MAX_SLOTS {
                match snap.services.get(&ServiceKey { slot, ..*key }) {
                    Some(v) => slots.push(v.backend_id),
                    None => break,
                }
            }
            let service = snap
                .meta
                .get(&value.svc_id)
                .map_or_else(unknown_service, decode_meta);
            installed.insert(
                fe,
                Installed {
                    svc_id: value.svc_id,
                    service,
                    slots,
                    count: value.count,
                    complete: true,
                },
            );
        }
        let strays: BTreeMap<ServiceKey, u32> = snap
            .services
            .iter()
            .filter(|(key, _)| {
                !key_frontend(key)
                    .and_then(|fe| installed.get(&fe))
                    .is_some_and(|inst: &Installed| {
                        key.slot == 0 || usize::from(key.slot) <= inst.slots.len()
                    })
            })
            .map(|(key, value)| (*key, value.backend_id))
            .collect();
        let svc_ids: HashSet<u32> = installed.values().map(|i| i.svc_id).collect();
        let stray_meta: BTreeSet<u32> = snap
            .meta
            .keys()
            .filter(|id| !svc_ids.contains(id))
            .copied()
            .collect();
        let max_svc_id = svc_ids
            .iter()
            .chain(&stray_meta)
            .max()
            .copied()
            .unwrap_or(0);
        let mut refs: HashMap<u32, u32> = HashMap::new();
        let named = installed
            .values()
            .flat_map(|i| i.slots.iter())
            .chain(strays.values().filter(|&&id| id != 0));
        for id in named {
            *refs.entry(*id).or_default() += 1;
        }
        // New ids start past every id in use, also ids a slot names without
        // a backend entry (those are never reused: a slot would point at
        // another pod).
        let max_backend_id = snap
            .backends
            .keys()
            .chain(refs.keys())
            .max()
            .copied()
            .unwrap_or(0);
        let unreferenced = backends
            .keys()
            .chain(&foreign_backends)
            .filter(|id| !refs.contains_key(id))
            .copied()
            .collect();
        Ok(Self {
            dp,
            installed,
            backend_ids,
            backends,
            refs,
            unreferenced,
            strays,
            stray_meta,
            svc_ids,
            svc_id_alloc: IdAllocator::after(max_svc_id),
            backend_id_alloc: IdAllocator::after(max_backend_id),
        })
    }

    /// Caps both id ranges at `max`, so tests can exhaust them.
    #[cfg(test)]
    fn limit_ids(&mut self, max: u32) {
        let clamp = |a: &IdAllocator| IdAllocator::after_up_to(a.next.saturating_sub(1), max);
        self.svc_id_alloc = clamp(&self.svc_id_alloc);
        self.backend_id_alloc = clamp(&self.backend_id_alloc);
    }

    pub fn installed(&self) -> &BTreeMap<Frontend, Installed> {
        &self.installed
    }

    pub fn datapath(&self) -> &D {
        &self.dp
    }

    pub fn datapath_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    /// Applies changes to some frontends only: `Some` is the frontend's new
    /// desired state, `None` means it is gone (removed only with
    /// [`Prune::Yes`]). Everything not named is left as it is, so a sync
    /// costs what changed, not what is installed.
    pub fn apply_changes(
        &mut self,
        changes: &BTreeMap<Frontend, Option<DesiredService>>,
        prune: Prune,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();
        for (fe, want) in changes {
            match want {
                Some(want) => self.apply_with_report(fe, want, prune, &mut report),
                None if prune == Prune::Yes && self.installed.contains_key(fe) => {
                    self.remove_with_report(fe, &mut report);
                }
                None => {}
            }
        }
        if prune == Prune::Yes {
            self.delete_orphans(&mut report);
        }
        report
    }

    /// One frontend to `want` unless the maps already hold it; a failure is
    /// recorded and that frontend keeps what it had.
    fn apply_with_report(
        &mut self,
        fe: &Frontend,
        want: &DesiredService,
        prune: Prune,
        report: &mut ApplyReport,
    ) {
        if self.up_to_date(fe, want) {
            return;
        }
        if let Err(source) = self.apply_frontend(fe, want, prune, report) {
            report.errors.push(ReconcileError {
                namespace: want.service.namespace.clone(),
                name: want.service.name.clone(),
                frontend: *fe,
                source,
            });
        }
    }

    fn remove_with_report(&mut self, fe: &Frontend, report: &mut ApplyReport) {
        let Some(service) = self.installed.get(fe).map(|i| i.service.clone()) else {
            return;
        };
        if let Err(source) = self.remove_frontend(fe, report) {
            report.errors.push(ReconcileError {
                namespace: service.namespace,
                name: service.name,
                frontend: *fe,
                source,
            });
        }
    }

    /// Brings the maps to `desired`, in make-before-break order.
    pub fn apply(&mut self, desired: &DesiredState, prune: Prune) -> ApplyReport {
        let mut report = ApplyReport::default();
        for (fe, want) in desired {
            self.apply_with_report(fe, want, prune, &mut report);
        }
        if prune == Prune::Yes {
            let gone: Vec<Frontend> = self
                .installed
                .keys()
                .filter(|fe| !desired.contains_key(fe))
                .copied()
                .collect();
            for fe in gone {
                self.remove_with_report(&fe, &mut report);
            }
            self.delete_orphans(&mut report);
        }
        report
    }

    /// The maps already hold exactly `want` for `fe`: nothing to write, in
    /// either prune mode. Lets a sync that touches one service out of
    /// thousands skip the rest without allocating.
    fn up_to_date(&self, fe: &Frontend, want: &DesiredService) -> bool {
        /// Past this, the quadratic membership check costs more than the
        /// full path it would save.
        const MAX_CHECKED: usize = 64;
        let Some(inst) = self.installed.get(fe) else {
            return false;
        };
        let active = &inst.slots[..(inst.count as usize).min(inst.slots.len())];
        inst.complete
            && inst.slots.len() == active.len()
            && active.len() == want.backends.len()
            && want.backends.len() <= MAX_CHECKED
            && inst.service == want.service
            && want.backends.iter().all(|addr| {
                self.backend_ids
                    .get(&(*addr, fe.proto))
                    .is_some_and(|id| active.contains(id))
            })
    }

    fn apply_frontend(
        &mut self,
        fe: &Frontend,
        want: &DesiredService,
        prune: Prune,
        report: &mut ApplyReport,
    ) -> Result<(), DatapathError> {
        // Refused whole, before anything is written: a master cannot count
        // past MAX_SLOTS, so the rest would be written and never reachable.
        check_slots(want.backends.len())?;
        // 1. Backends first: ids for every desired address, writing new ones.
        let mut wanted_ids = Vec::with_capacity(want.backends.len());
        for &addr in &want.backends {
            wanted_ids.push(self.backend_id(addr, fe.proto, report)?);
        }
        let old = self.installed.get(fe).cloned();
        let old_active: &[u32] = old
            .as_ref()
            .map_or(&[], |o| &o.slots[..(o.count as usize).min(o.slots.len())]);
        if prune == Prune::No {
            // Never shrink before the sources are complete: keep what is there.
            // (A set: a linear `contains` per slot is quadratic in big services.)
            let mut seen: HashSet<u32> = wanted_ids.iter().copied().collect();
            for &id in old_active {
                if seen.insert(id) {
                    wanted_ids.push(id);
                }
            }
        }
        // Kept ones on top of the wanted ones may overflow too (the new
        // backends are unreferenced and go with the next pruning apply).
        check_slots(wanted_ids.len())?;
        let layout = slot_layout(old_active, &wanted_ids);
        let svc_id = match &old {
            Some(o) => o.svc_id,
            None => {
                let (svc_ids, stray_meta) = (&self.svc_ids, &self.stray_meta);
                let id = self
                    .svc_id_alloc
                    .allocate(svc_ids.len() + stray_meta.len(), |id| {
                        svc_ids.contains(&id) || stray_meta.contains(&id)
                    })
                    .ok_or(DatapathError::IdsExhausted { kind: "service" })?;
                self.svc_ids.insert(id);
                id
            }
        };
        let mut inst = old.clone().unwrap_or(Installed {
            svc_id,
            service: want.service.clone(),
            slots: Vec::new(),
            count: 0,
            complete: false,
        });
        let result = self.write_slots_and_master(fe, want, &layout, &mut inst, report);
        // Record what was written even on failure: the count in the map still
        // covers only valid slots, and the next apply resumes from here.
        self.installed.insert(*fe, inst);
        result?;
        // 4. Trailing slots, now unreachable.
        self.trim_slots(fe, layout.len(), report)
    }

    /// Steps 2 and 3 for one frontend, keeping `inst` equal to the maps.
    fn write_slots_and_master(
        &mut self,
        fe: &Frontend,
        want: &DesiredService,
        layout: &[u32],
        inst: &mut Installed,
        report: &mut ApplyReport,
    ) -> Result<(), DatapathError> {
        let svc_id = inst.svc_id;
        // 2. Slots 1..=n, only where they differ. Past the old count they are
        // invisible until the master grows.
        for (i, &id) in layout.iter().enumerate() {
            if inst.slots.get(i) == Some(&id) {
                continue;
            }
            let key = frontend_key(fe, slot_number(i)?);
            self.dp.put_service(&key, &ServiceValue::slot(id, svc_id))?;
            report.writes += 1;
            // A stray under this key is overwritten: it no longer names its backend.
            if !self.strays.is_empty()
                && let Some(old) = self.strays.remove(&key)
            {
                release(&mut self.refs, &mut self.unreferenced, old);
            }
            if i < inst.slots.len() {
                let old = std::mem::replace(&mut inst.slots[i], id);
                release(&mut self.refs, &mut self.unreferenced, old);
            } else {
                inst.slots.push(id);
            }
            *self.refs.entry(id).or_default() += 1;
            self.unreferenced.remove(&id);
        }
        // 3. Meta, then the master: the count switches readers to the new slots.
        if !inst.complete || inst.service != want.service {
            self.dp.put_meta(svc_id, &encode_meta(fe, &want.service))?;
            inst.service = want.service.clone();
            report.writes += 1;
        }
        let count = check_slots(layout.len())?;
        if !inst.complete || inst.count != count {
            let master = ServiceValue::master(count, svc_id);
            self.dp.put_service(&frontend_key(fe, 0), &master)?;
            inst.count = count;
            inst.complete = true;
            report.writes += 1;
        }
        Ok(())
    }

    fn trim_slots(
        &mut self,
        fe: &Frontend,
        keep: usize,
        report: &mut ApplyReport,
    ) -> Result<(), DatapathError> {
        let Some(inst) = self.installed.get_mut(fe) else {
            return Ok(());
        };
        while inst.slots.len() > keep {
            let slot = slot_number(inst.slots.len() - 1)?;
            self.dp.delete_service(&frontend_key(fe, slot))?;
            if let Some(id) = inst.slots.pop() {
                release(&mut self.refs, &mut self.unreferenced, id);
            }
            report.deletes += 1;
        }
        Ok(())
    }

    /// Master, then slots, then meta. The record goes only once all of them
    /// are gone: after a failed step the frontend is still installed (and
    /// incomplete), so the next apply that finds it gone resumes the removal.
    fn remove_frontend(
        &mut self,
        fe: &Frontend,
        report: &mut ApplyReport,
    ) -> Result<(), DatapathError> {
        // Master first: new connects stop matching before anything they read goes.
        self.dp.delete_service(&frontend_key(fe, 0))?;
        report.deletes += 1;
        let Some(inst) = self.installed.get_mut(fe) else {
            return Ok(());
        };
        // No master any more: if a later step fails and the frontend
        // comes back, its master must be written again.
        inst.count = 0;
        inst.complete = false;
        let svc_id = inst.svc_id;
        self.trim_slots(fe, 0, report)?;
        self.dp.delete_meta(svc_id)?;
        report.deletes += 1;
        self.installed.remove(fe);
        self.svc_ids.remove(&svc_id);
        Ok(())
    }

    fn backend_id(
        &mut self,
        addr: SocketAddr,
        proto: Proto,
        report: &mut ApplyReport,
    ) -> Result<u32, DatapathError> {
        if let Some(&id) = self.backend_ids.get(&(addr, proto)) {
            return Ok(id);
        }
        let (backends, refs) = (&self.backends, &self.refs);
        let id = self
            .backend_id_alloc
            .allocate(backends.len() + refs.len(), |id| {
                backends.contains_key(&id) || refs.contains_key(&id)
            })
            .ok_or(DatapathError::IdsExhausted { kind: "backend" })?;
        self.dp.put_backend(id, &encode_backend(addr, proto))?;
        self.backend_ids.insert((addr, proto), id);
        self.backends.insert(id, (addr, proto));
        // Until a slot names it: a failed apply must not leak it.
        self.unreferenced.insert(id);
        report.writes += 1;
        Ok(id)
    }

    /// Strays, then stray meta, then backends nothing names any more.
    fn delete_orphans(&mut self, report: &mut ApplyReport) {
        let strays: Vec<(ServiceKey, u32)> = self.strays.iter().map(|(k, id)| (*k, *id)).collect();
        for (key, id) in strays {
            match self.dp.delete_service(&key) {
                Ok(()) => {
                    report.deletes += 1;
                    self.strays.remove(&key);
                    release(&mut self.refs, &mut self.unreferenced, id);
                }
                Err(e) => report.other_errors.push(e),
            }
        }
        let stray_meta: Vec<u32> = self.stray_meta.iter().copied().collect();
        for svc_id in stray_meta {
            match self.dp.delete_meta(svc_id) {
                Ok(()) => {
                    report.deletes += 1;
                    self.stray_meta.remove(&svc_id);
                }
                Err(e) => report.other_errors.push(e),
            }
        }
        let candidates = std::mem::take(&mut self.unreferenced);
        for id in candidates {
            if self.refs.contains_key(&id) {
                continue;
            }
            match self.dp.delete_backend(id) {
                Ok(()) => {
                    report.deletes += 1;
                    if let Some(key) = self.backends.remove(&id) {
                        self.backend_ids.remove(&key);
                    }
                }
                Err(e) => {
                    self.unreferenced.insert(id);
                    report.other_errors.push(e);
                }
            }
        }
    }
}

/// The name of a frontend whose meta entry is missing.
fn unknown_service() -> ServiceRef {
    ServiceRef {
        namespace: String::new(),
        name: String::new(),
        port_name: String::new(),
        svc_type: crate::model::ServiceType::ClusterIP,
    }
}

/// Hands out ids `1..=max` in order, wrapping around and skipping ids in
/// use, like Cilium's `id_allocator`: 0 stays reserved, and a freed id is
/// reused as late as possible (a stale reverse-map entry names its
/// service id). One probe per allocation unless ids around `next` are taken.
#[derive(Clone, Debug)]
struct IdAllocator {
    next: u32,
    max: u32,
}

impl IdAllocator {
    /// Starts past `last`, the highest id in use (0 for none).
    fn after(last: u32) -> Self {
        Self::after_up_to(last, u32::MAX)
    }

    fn after_up_to(last: u32, max: u32) -> Self {
        let max = max.max(1);
        let next = match last.checked_add(1) {
            Some(n) if n <= max => n,
            _ => 1,
        };
        Self { next, max }
    }

    /// The next free id, or `None` if all are taken. `used` bounds how many
    /// ids `in_use` accepts: of any `used + 1` ids one is free, so that many
    /// probes always suffice (and none when the whole range is in use).
    fn allocate(&mut self, used: usize, in_use: impl Fn(u32) -> bool) -> Option<u32> {
        let range = usize::try_from(self.max).unwrap_or(usize::MAX);
        let probes = used.saturating_add(1).min(range);
        for _ in 0..probes {
            let id = self.next;
            self.next = if id >= self.max { 1 } else { id + 1 };
            if !in_use(id) {
                return Some(id);
            }
        }
        None
    }
}

/// `n` backends as a slot count, or the error refusing them.
fn check_slots(n: usize) -> Result<u16, DatapathError> {
    match u16::try_from(n) {
        Ok(count) if n <= usize::from(MAX_SLOTS) => Ok(count),
        _ => Err(DatapathError::TooManyBackends {
            backends: n,
            max: MAX_SLOTS,
        }),
    }
}

/// The slot number of `slots[i]`.
fn slot_number(i: usize) -> Result<u16, DatapathError> {
    check_slots(i + 1)
}

/// One slot stopped naming `id`.
fn release(refs: &mut HashMap<u32, u32>, unreferenced: &mut BTreeSet<u32>, id: u32) {
    if let Some(n) = refs.get_mut(&id) {
        *n -= 1;
        if *n == 0 {
            refs.remove(&id);
            unreferenced.insert(id);
        }
    }
}

/// New slot contents: backends that stay keep their slot, so a change
/// rewrites only the slots that really change.
fn slot_layout(old: &[u32], wanted: &[u32]) -> Vec<u32> {
    let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
    let mut layout: Vec<Option<u32>> = old
        .iter()
        .take(wanted.len())
        .map(|id| wanted_set.contains(id).then_some(*id))
        .collect();
    let placed: BTreeSet<u32> = layout.iter().flatten().copied().collect();
    let mut pending = wanted.iter().filter(|id| !placed.contains(id)).copied();
    for hole in layout.iter_mut().filter(|s| s.is_none()) {
        *hole = pending.next();
    }
    let mut out: Vec<u32> = layout.into_iter().flatten().collect();
    out.extend(pending);
    out
}

#[cfg(test)]
mod error_tests;
#[cfg(test)]
mod prop_tests;
mod repair;
#[cfg(test)]
mod repair_tests;

pub use repair::{RepairError, RepairReport};

#[cfg(test)]
mod tests;
