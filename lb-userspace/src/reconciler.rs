//! Diffs the desired state against what the maps hold and writes the
//! difference in make-before-break order, so a concurrent connect() always
//! finds a master whose backends are all there:
//!
//! 1. a frontend whose backends change gets a **new** range of the backend
//!    array, written in full (one batch) while no master reaches it;
//! 2. meta, then the master (one atomic hash update) switches readers to it;
//! 3. the old range is released, but reused only after an RCU grace period
//!    ([`Datapath::grace`]): a program that read the old master may still
//!    be reading the old range until then;
//! 4. removed frontends: master first, then meta; their range as in 3;
//! 5. entries no frontend reaches (see `adopt`), deleted by a pruning apply.
//!
//! A live range is never written in place: an array update is a plain
//! copy, so a reader could see half of an address.
//!
//! Service ids are re-adopted from the maps at start and handed out with
//! wrap-around (never 0, never one in use).
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::SocketAddr,
};

use lb_common::{Backend, MAX_SLOTS, ServiceKey, ServiceValue};

use crate::{
    datapath::{
        Datapath, DatapathError, Failures, backend_addr, backends_full, decode_meta,
        encode_backend, encode_meta, frontend_key, key_frontend,
    },
    model::{DesiredService, DesiredState, Frontend, ServiceRef},
};

mod addrs;
mod ranges;

pub use addrs::Addrs;
use ranges::Ranges;

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
    /// First backend-array slot of its range (0 when it has none).
    pub base: u32,
    /// The master's count (at most `MAX_SLOTS`): its range is
    /// `base..base + count`.
    pub count: u16,
    /// The master's `SVC_FLAG_*` bits (see [`flags_of`]).
    pub flags: u16,
    /// What the slots hold, in slot order (sorted by address).
    pub backends: Addrs,
    /// The master's session affinity timeout in seconds (0: none).
    pub affinity: u32,
    /// Meta and master are in the maps. False for a new frontend whose
    /// first write failed before its master, and from the moment a removal
    /// has deleted the master until it has finished (a failed removal
    /// keeps the record, so the next apply resumes it). An incomplete
    /// frontend owns no range.
    pub complete: bool,
}

impl Installed {
    /// The backend-array slots of its range, in order.
    pub fn slots(&self) -> std::ops::Range<u32> {
        self.base..self.base + u32::from(self.count)
    }

    fn master(&self) -> ServiceValue {
        ServiceValue::new(self.base, self.count, self.svc_id)
            .with_affinity(self.affinity)
            .with_flags(self.flags)
    }
}

/// The master's flags for a frontend of `service`: a node-address frontend
/// is marked for bind protection.
pub fn flags_of(service: &ServiceRef) -> u16 {
    match service.frontend {
        crate::model::FrontendKind::NodePort => lb_common::SVC_FLAG_NODE_PORT,
        _ => 0,
    }
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
    /// How many of `installed` are complete, kept as they change: read
    /// after every sync, and a count over 100,000 records took 3 ms.
    programmed: usize,
    /// `installed.len()` when it was last packed ([`pack`]).
    packed_len: usize,
    /// Free and recently released ranges of the backend array.
    ranges: Ranges,
    /// Masters of no installed frontend (keys of a protocol this agent
    /// never writes), with the range each reaches. Deleted by the next
    /// pruning apply; their ranges are released then.
    strays: BTreeMap<ServiceKey, (u32, u32)>,
    /// Meta entries of no installed frontend; their ids are not reused
    /// until they are deleted (with the strays).
    stray_meta: BTreeSet<u32>,
    /// Service ids of `installed`, so allocation skips them in O(1).
    svc_ids: HashSet<u32>,
    svc_id_alloc: IdAllocator,
    /// `LB_AFFINITY` may hold entries of a service id that is gone or
    /// lost its affinity: swept by the next pruning apply. Set on adoption
    /// (a previous agent may have stopped before its sweep).
    affinity_dirty: bool,
}

impl<D: Datapath> Reconciler<D> {
    /// Re-adopts whatever the maps already hold (a previous agent's state),
    /// without changing anything. Masters no frontend can own are noted as
    /// strays and deleted by the first pruning apply. Space no master
    /// reaches is reused only after a grace period: the previous agent may
    /// have released it just before it stopped.
    pub fn adopt(dp: D) -> Result<Self, DatapathError> {
        let snap = dp.snapshot()?;
        let capacity = dp.backend_capacity();
        let mut installed = BTreeMap::new();
        let mut strays = BTreeMap::new();
        let mut used: Vec<(u32, u32)> = Vec::new();
        for (key, value) in &snap.services {
            let count = u32::from(value.count);
            // A range past the array's end, or overlapping one already
            // adopted, is not this agent's writing: the frontend is adopted
            // without it, and the next apply gives it a range of its own.
            let fits = count == 0
                || (u64::from(value.base) + u64::from(count) <= u64::from(capacity)
                    && !used
                        .iter()
                        .any(|&(b, c)| b < value.base + count && value.base < b + c));
            if fits && count > 0 {
                used.push((value.base, count));
            }
            let Some(fe) = key_frontend(key) else {
                strays.insert(*key, if fits { (value.base, count) } else { (0, 0) });
                continue;
            };
            let (base, backends): (u32, Vec<SocketAddr>) = if fits {
                let backends = (value.base..value.base + count)
                    .map(|i| {
                        snap.backends
                            .get(&i)
                            .map_or_else(unset_backend, backend_addr)
                    })
                    .collect();
                (value.base, backends)
            } else {
                (0, Vec::new())
            };
            let service = snap
                .meta
                .get(&value.svc_id)
                .map_or_else(unknown_service, decode_meta);
            installed.insert(
                fe,
                Installed {
                    svc_id: value.svc_id,
                    service,
                    base,
                    count: backends.len() as u16,
                    flags: value.flags,
                    backends: Addrs::from(backends),
                    affinity: value.affinity,
                    complete: true,
                },
            );
        }
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
        let max_svc_id_slot = dp.max_svc_id();
        pack(&mut installed);
        Ok(Self {
            dp,
            packed_len: installed.len(),
            programmed: installed.values().filter(|i| i.complete).count(),
            installed,
            ranges: Ranges::adopted(capacity, &used),
            strays,
            stray_meta,
            svc_ids,
            svc_id_alloc: IdAllocator::after_up_to(max_svc_id, max_svc_id_slot),
            affinity_dirty: true,
        })
    }

    /// Caps the service id range at `max`, so tests can exhaust it.
    #[cfg(test)]
    fn limit_ids(&mut self, max: u32) {
        let a = &self.svc_id_alloc;
        self.svc_id_alloc = IdAllocator::after_up_to(a.next.saturating_sub(1), max);
    }

    pub fn installed(&self) -> &BTreeMap<Frontend, Installed> {
        &self.installed
    }

    /// How many installed frontends are complete (serving from the maps).
    pub fn programmed(&self) -> usize {
        self.programmed
    }

    /// Records `inst` for `fe`, keeping [`Self::programmed`].
    fn record(&mut self, fe: Frontend, inst: Installed) {
        let now = usize::from(inst.complete);
        let before = self
            .installed
            .insert(fe, inst)
            .map_or(0, |old| usize::from(old.complete));
        self.programmed = self.programmed + now - before;
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
        if prune == Prune::Yes {
            let gone: Vec<Frontend> = changes
                .iter()
                .filter(|(fe, want)| want.is_none() && self.installed.contains_key(fe))
                .map(|(fe, _)| *fe)
                .collect();
            self.remove_all(&gone, &mut report);
        }
        let wants = changes
            .iter()
            .filter_map(|(fe, want)| want.as_ref().map(|w| (*fe, w)));
        self.write_all(wants, prune, &mut report);
        if prune == Prune::Yes {
            self.delete_orphans(&mut report);
            self.sweep_affinity(&mut report);
        }
        report
    }

    /// Brings the maps to `desired`, in make-before-break order.
    pub fn apply(&mut self, desired: &DesiredState, prune: Prune) -> ApplyReport {
        let mut report = ApplyReport::default();
        if prune == Prune::Yes {
            let gone: Vec<Frontend> = self
                .installed
                .keys()
                .filter(|fe| !desired.contains_key(fe))
                .copied()
                .collect();
            self.remove_all(&gone, &mut report);
        }
        self.write_all(desired.iter().map(|(fe, w)| (*fe, w)), prune, &mut report);
        if prune == Prune::Yes {
            self.delete_orphans(&mut report);
            self.sweep_affinity(&mut report);
        }
        report
    }

    /// Removals go first, so the room they free is there for what is
    /// written next.
    fn remove_all(&mut self, gone: &[Frontend], report: &mut ApplyReport) {
        for fe in gone {
            self.remove_with_report(fe, report);
        }
    }

    fn remove_with_report(&mut self, fe: &Frontend, report: &mut ApplyReport) {
        let Some(service) = self.installed.get(fe).map(|i| i.service.clone()) else {
            return;
        };
        if let Err(source) = self.remove_frontend(fe, report) {
            report.errors.push(ReconcileError {
                namespace: service.namespace.to_string(),
                name: service.name.to_string(),
                frontend: *fe,
                source,
            });
        }
    }

    /// The maps already hold exactly `want` for `fe`: nothing to write, in
    /// either prune mode. Lets a sync that touches one service out of
    /// thousands skip the rest without allocating (desired backends come
    /// sorted from the model).
    fn up_to_date(&self, fe: &Frontend, want: &DesiredService) -> bool {
        let Some(inst) = self.installed.get(fe) else {
            return false;
        };
        inst.complete
            && inst.service == want.service
            && inst.affinity == want.affinity
            && inst.flags == flags_of(&want.service)
            && if want.backends.is_sorted_by(|a, b| a < b) {
                inst.backends == want.backends
            } else {
                inst.backends == sorted(want.backends.iter().copied())
            }
    }

    /// Every frontend of `wants` that the maps do not hold yet, written in
    /// make-before-break order for each, and in three batches for all:
    /// every new range, then every meta entry, then every master. A
    /// connect() meanwhile finds each master with its old range (not
    /// released until all masters are written) or its new one (written
    /// before any master). A failure is recorded per frontend, which keeps
    /// what it had; the batch goes on with the next entry.
    fn write_all<'a>(
        &mut self,
        wants: impl Iterator<Item = (Frontend, &'a DesiredService)>,
        prune: Prune,
        report: &mut ApplyReport,
    ) {
        let mut staged: Vec<Staged<'a>> = Vec::new();
        for (fe, want) in wants {
            if self.up_to_date(&fe, want) {
                continue;
            }
            let result = match self.stage(fe, want, prune) {
                // The ranges the staged frontends leave are released only
                // once they are written: when the array is that tight, write
                // them now, and this one may fit after a grace period.
                Err(e) if no_room(&e) && staged.iter().any(Staged::releases) => {
                    self.write_staged(std::mem::take(&mut staged), report);
                    self.stage(fe, want, prune)
                }
                result => result,
            };
            match result {
                Ok(s) => staged.push(s),
                Err(source) => report.errors.push(reconcile_error(fe, want, source)),
            }
        }
        self.write_staged(staged, report);
    }

    /// The three batches of [`Self::write_all`], then each frontend's record.
    fn write_staged(&mut self, mut staged: Vec<Staged<'_>>, report: &mut ApplyReport) {
        if staged.is_empty() {
            return;
        }
        self.write_ranges(&mut staged, report);
        self.write_metas(&mut staged, report);
        self.write_masters(&mut staged, report);
        for s in staged {
            // Recorded even on failure: the next apply resumes from it.
            self.record(s.fe, s.inst);
            if let Some(source) = s.error {
                report.errors.push(reconcile_error(s.fe, s.want, source));
            }
        }
        // Packed each time it has grown by a quarter: amortised O(1) per
        // record, and at most a fifth of the records sit in half-full nodes.
        if self.installed.len() >= self.packed_len + self.packed_len / 4 + 1024 {
            pack(&mut self.installed);
            self.packed_len = self.installed.len();
        }
    }

    /// What `fe` needs written, with its new range allocated; nothing is
    /// written yet. A frontend refused here has nothing written.
    fn stage<'a>(
        &mut self,
        fe: Frontend,
        want: &'a DesiredService,
        prune: Prune,
    ) -> Result<Staged<'a>, DatapathError> {
        // Refused whole, before anything is written.
        check_slots(want.backends.len())?;
        let old = self.installed.get(&fe);
        let wanted = match (prune, old) {
            // Never shrink before the sources are complete: keep what is there.
            (Prune::No, Some(o)) if o.complete => {
                sorted(want.backends.iter().copied().chain(o.backends.iter()))
            }
            _ => sorted(want.backends.iter().copied()),
        };
        // Kept ones on top of the wanted ones may overflow too.
        let count = check_slots(wanted.len())?;
        let svc_id = match old {
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
                // Before its master exists: the id's counters start at 0
                // whoever had it before. Only the metrics depend on it.
                if let Err(e) = self.dp.reset_svc_stats(id) {
                    tracing::warn!(svc_id = id, error = %e, "resetting a reused id's counters");
                }
                id
            }
        };
        let inst = old.cloned().unwrap_or(Installed {
            svc_id,
            service: want.service.clone(),
            base: 0,
            count: 0,
            flags: 0,
            backends: Addrs::default(),
            affinity: want.affinity,
            complete: false,
        });
        let range = if inst.complete && inst.backends == wanted {
            None
        } else {
            match self.allocate_range(u32::from(count)) {
                Ok(base) => Some(NewRange {
                    base,
                    count,
                    encoded: wanted
                        .iter()
                        .map(|addr| encode_backend(*addr, fe.proto))
                        .collect(),
                    addrs: wanted,
                }),
                Err(e) => {
                    // Its id stays taken, as for any frontend whose first
                    // write failed.
                    self.record(fe, inst);
                    return Err(e);
                }
            }
        };
        let meta = !inst.complete || inst.service != want.service;
        Ok(Staged {
            fe,
            want,
            inst,
            range,
            meta,
            error: None,
        })
    }

    /// Room for `n` slots; waits for a grace period first if only released
    /// space would fit.
    fn allocate_range(&mut self, n: u32) -> Result<u32, DatapathError> {
        if n == 0 {
            return Ok(0);
        }
        match self.ranges.allocate(n) {
            Some(base) => Ok(base),
            None if self.ranges.has_released() => {
                self.dp.grace()?;
                self.ranges.reclaim();
                tracing::debug!(
                    slots = n,
                    "grace period passed: released backend ranges reused"
                );
                self.ranges.allocate(n).ok_or_else(backends_full)
            }
            None => Err(backends_full()),
        }
    }

    /// Writes `backends` to a fresh range (one batch); returns its base.
    fn write_range(&mut self, backends: &[Backend]) -> Result<u32, DatapathError> {
        let n = backends.len() as u32;
        let base = self.allocate_range(n)?;
        if n > 0
            && let Err(e) = self.dp.put_backends(base, backends)
        {
            // No master reaches it: free at once.
            self.ranges.free(base, n);
            return Err(e);
        }
        Ok(base)
    }

    /// Every new range, while no master reaches it.
    fn write_ranges(&mut self, staged: &mut [Staged<'_>], report: &mut ApplyReport) {
        let todo: Vec<usize> = (0..staged.len())
            .filter(|&i| staged[i].range.as_ref().is_some_and(|r| r.count > 0))
            .collect();
        let batch: Vec<(u32, &[Backend])> = todo
            .iter()
            .filter_map(|&i| staged[i].range.as_ref())
            .map(|r| (r.base, r.encoded.as_slice()))
            .collect();
        let failed = self.dp.put_backend_ranges(&batch);
        drop(batch);
        for &i in &todo {
            if let Some(r) = &staged[i].range {
                report.writes += r.encoded.len();
            }
        }
        for (k, e) in failed {
            let s = &mut staged[todo[k]];
            if let Some(r) = s.range.take() {
                report.writes -= r.encoded.len();
                // No master reaches it: free at once.
                self.ranges.free(r.base, u32::from(r.count));
            }
            s.error = Some(e);
        }
    }

    fn write_metas(&mut self, staged: &mut [Staged<'_>], report: &mut ApplyReport) {
        let written = self.write_batch(
            staged,
            |s| {
                s.meta
                    .then(|| (s.inst.svc_id, encode_meta(&s.fe, &s.want.service)))
            },
            |dp, batch| dp.put_metas(batch),
        );
        for i in written {
            let s = &mut staged[i];
            s.inst.service = s.want.service.clone();
            report.writes += 1;
        }
    }

    /// Each master switched to its new range; the old ranges are released
    /// only after all of them.
    fn write_masters(&mut self, staged: &mut [Staged<'_>], report: &mut ApplyReport) {
        let written = self.write_batch(
            staged,
            |s| {
                let flags = flags_of(&s.want.service);
                let master = match &s.range {
                    Some(r) => ServiceValue::new(r.base, r.count, s.inst.svc_id),
                    // Same backends, another affinity or kind: the same range.
                    None if s.inst.complete
                        && (s.inst.affinity != s.want.affinity || s.inst.flags != flags) =>
                    {
                        s.inst.master()
                    }
                    None => return None,
                };
                Some((
                    frontend_key(&s.fe),
                    master.with_affinity(s.want.affinity).with_flags(flags),
                ))
            },
            |dp, batch| dp.put_services(batch),
        );
        for i in written {
            let s = &mut staged[i];
            report.writes += 1;
            if s.inst.affinity != 0 && s.want.affinity == 0 {
                self.affinity_dirty = true;
            }
            s.inst.affinity = s.want.affinity;
            s.inst.flags = flags_of(&s.want.service);
            let Some(r) = s.range.take() else {
                continue;
            };
            let inst = &mut s.inst;
            if inst.complete {
                self.ranges.release(inst.base, u32::from(inst.count));
            }
            inst.base = r.base;
            inst.count = r.count;
            inst.backends = Addrs::from(r.addrs);
            inst.complete = true;
        }
    }

    /// One batch of the entries `entry` gives for the staged frontends not
    /// failed so far; a frontend whose entry is refused fails. Returns the
    /// indices (in `staged`) of the frontends whose entry was written.
    fn write_batch<T>(
        &mut self,
        staged: &mut [Staged<'_>],
        entry: impl Fn(&Staged<'_>) -> Option<T>,
        write: impl Fn(&mut D, &[T]) -> Failures,
    ) -> Vec<usize> {
        let (todo, batch): (Vec<usize>, Vec<T>) = staged
            .iter()
            .enumerate()
            .filter(|(_, s)| s.error.is_none())
            .filter_map(|(i, s)| Some((i, entry(s)?)))
            .unzip();
        let failed = write(&mut self.dp, &batch);
        let mut ok = vec![true; todo.len()];
        for (k, e) in failed {
            ok[k] = false;
            self.fail(&mut staged[todo[k]], e);
        }
        todo.into_iter()
            .zip(ok)
            .filter_map(|(i, ok)| ok.then_some(i))
            .collect()
    }

    /// A staged frontend whose write failed before its master: its new
    /// range was never reachable, so it is free at once.
    fn fail(&mut self, s: &mut Staged<'_>, e: DatapathError) {
        if let Some(r) = s.range.take() {
            self.ranges.free(r.base, u32::from(r.count));
        }
        s.error = Some(e);
    }

    /// Master, then meta. The record goes only once both are gone: after a
    /// failed step the frontend is still installed (and incomplete), so the
    /// next apply that finds it gone resumes the removal.
    fn remove_frontend(
        &mut self,
        fe: &Frontend,
        report: &mut ApplyReport,
    ) -> Result<(), DatapathError> {
        // Master first: new connects stop matching before anything they read goes.
        self.dp.delete_service(&frontend_key(fe))?;
        report.deletes += 1;
        let Some(inst) = self.installed.get_mut(fe) else {
            return Ok(());
        };
        if inst.complete {
            self.ranges.release(inst.base, u32::from(inst.count));
            self.programmed -= 1;
        }
        // No master any more: if a later step fails and the frontend
        // comes back, its master must be written again.
        inst.base = 0;
        inst.count = 0;
        inst.backends.clear();
        inst.complete = false;
        if inst.affinity != 0 {
            self.affinity_dirty = true;
        }
        let svc_id = inst.svc_id;
        self.dp.delete_meta(svc_id)?;
        report.deletes += 1;
        self.installed.remove(fe);
        self.svc_ids.remove(&svc_id);
        Ok(())
    }

    /// Deletes the affinity entries of every service id that is not an
    /// installed frontend with affinity. A failure is retried by the next
    /// pruning apply.
    fn sweep_affinity(&mut self, report: &mut ApplyReport) {
        if !self.affinity_dirty {
            return;
        }
        let keep: HashSet<u32> = self
            .installed
            .values()
            .filter(|i| i.affinity != 0)
            .map(|i| i.svc_id)
            .collect();
        match self.dp.retain_affinity(&keep) {
            Ok(n) => {
                report.deletes += n;
                self.affinity_dirty = false;
            }
            Err(e) => report.other_errors.push(e),
        }
    }

    /// Stray masters, then stray meta.
    fn delete_orphans(&mut self, report: &mut ApplyReport) {
        let strays: Vec<(ServiceKey, (u32, u32))> =
            self.strays.iter().map(|(k, r)| (*k, *r)).collect();
        for (key, (base, count)) in strays {
            match self.dp.delete_service(&key) {
                Ok(()) => {
                    report.deletes += 1;
                    self.strays.remove(&key);
                    self.ranges.release(base, count);
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
    }
}

/// Rebuilds `map` with full nodes. Records arrive in key order (a full pass
/// and an adoption walk frontends sorted), and a B-tree node that overflows
/// at its end keeps only half of its entries: 27 MB of nodes at 100,000
/// frontends where packed ones take 17. `append` of two non-empty maps
/// rebuilds from the merged entries with full nodes, freeing the old
/// nodes as it goes, so the peak stays that of the old tree.
fn pack<K: Ord + Clone, V>(map: &mut BTreeMap<K, V>) {
    let Some(second) = map.keys().nth(1).cloned() else {
        return;
    };
    let mut rest = map.split_off(&second);
    map.append(&mut rest);
}

/// One frontend's writes, prepared by `Reconciler::stage`.
struct Staged<'a> {
    fe: Frontend,
    want: &'a DesiredService,
    /// Its record, updated as its writes succeed.
    inst: Installed,
    /// The new range its master is to reach (`None`: same backends).
    range: Option<NewRange>,
    /// Its meta entry is missing or names another service.
    meta: bool,
    error: Option<DatapathError>,
}

impl Staged<'_> {
    /// Its master leaves a range, released once the master is written.
    fn releases(&self) -> bool {
        self.inst.complete && self.inst.count > 0 && self.range.is_some()
    }
}

/// The backend array has no room in a row for a range.
fn no_room(e: &DatapathError) -> bool {
    matches!(e, DatapathError::MapFull { map, .. } if *map == lb_common::maps::BACKENDS)
}

struct NewRange {
    base: u32,
    count: u16,
    /// In slot order.
    addrs: Vec<SocketAddr>,
    encoded: Vec<Backend>,
}

fn reconcile_error(fe: Frontend, want: &DesiredService, source: DatapathError) -> ReconcileError {
    ReconcileError {
        namespace: want.service.namespace.to_string(),
        name: want.service.name.to_string(),
        frontend: fe,
        source,
    }
}

/// Deduplicated, in slot order.
fn sorted(addrs: impl Iterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = addrs.collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// What an adopted slot that was never written reads as.
fn unset_backend() -> SocketAddr {
    SocketAddr::from(([0u8; 16], 0))
}

/// The name of a frontend whose meta entry is missing.
fn unknown_service() -> ServiceRef {
    ServiceRef {
        namespace: Default::default(),
        name: Default::default(),
        port_name: Default::default(),
        svc_type: crate::model::ServiceType::ClusterIP,
        frontend: Default::default(),
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
    /// Starts past `last`, the highest id in use (0 for none), and hands
    /// out ids up to `max`.
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
