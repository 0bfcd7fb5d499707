//! Periodic resync: puts back what the reconciler installed when the maps
//! drifted from it (an entry deleted or changed behind the agent's back) and
//! deletes entries no installed frontend owns, in make-before-break order.
//! A frontend whose backend slots changed gets a new range (a live range is
//! never rewritten in place).
use std::{collections::HashSet, fmt};

use lb_common::Backend;

use super::{Installed, Reconciler};
use crate::{
    datapath::{Datapath, DatapathError, Snapshot, encode_backend, encode_meta, frontend_key},
    model::Frontend,
};

/// One entry `repair` could not put right.
#[derive(Debug, thiserror::Error)]
#[error("repair of {entry}: {source}")]
pub struct RepairError {
    /// What it was repairing, e.g. `service default/web (10.96.0.10:80/TCP)`.
    pub entry: String,
    #[source]
    pub source: DatapathError,
}

/// What one [`Reconciler::repair`] did.
#[derive(Debug, Default)]
pub struct RepairReport {
    /// Entries rewritten or deleted: the sum of the counts below.
    pub repaired: usize,
    /// Backend slots missing or changed, rewritten to a new range.
    pub backends: usize,
    /// Frontends whose range was replaced because a slot drifted.
    pub slots: usize,
    /// Meta entries missing or changed, rewritten.
    pub meta: usize,
    /// Master entries missing or changed, rewritten.
    pub masters: usize,
    /// Entries no installed frontend owns (or a master of a frontend whose
    /// master is meant to be absent), deleted.
    pub deleted: usize,
    /// What could not be repaired; the next repair tries again.
    pub errors: Vec<RepairError>,
}

impl RepairReport {
    /// The maps matched what the reconciler installed, and were read.
    pub fn is_clean(&self) -> bool {
        self.repaired == 0 && self.errors.is_empty()
    }

    fn sum(&mut self) {
        self.repaired = self.backends + self.slots + self.meta + self.masters + self.deleted;
    }
}

impl fmt::Display for RepairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.repaired == 0 {
            f.write_str("maps match")?;
        } else {
            write!(
                f,
                "repaired {} entries ({} backends, {} slots, {} meta, {} masters rewritten; {} deleted)",
                self.repaired, self.backends, self.slots, self.meta, self.masters, self.deleted
            )?;
        }
        if !self.errors.is_empty() {
            write!(f, ", {} errors", self.errors.len())?;
        }
        Ok(())
    }
}

impl<D: Datapath> Reconciler<D> {
    /// Compares the maps with what this reconciler installed and puts them
    /// back: a frontend whose backend slots differ gets a new range and
    /// its master is switched to it; meta and masters are rewritten where
    /// missing or different; then entries no installed frontend owns are
    /// deleted. Safe between any two applies: everything in the maps at
    /// adoption was adopted, so whatever no frontend owns now is drift.
    pub fn repair(&mut self) -> RepairReport {
        let mut report = RepairReport::default();
        let snap = match self.dp.snapshot() {
            Ok(snap) => snap,
            Err(source) => {
                report.errors.push(RepairError {
                    entry: "the maps (snapshot)".into(),
                    source,
                });
                return report;
            }
        };
        let frontends: Vec<Frontend> = self.installed.keys().copied().collect();
        for fe in frontends {
            if let Err(source) = self.repair_frontend(&fe, &snap, &mut report) {
                let inst = &self.installed[&fe];
                report.errors.push(RepairError {
                    entry: describe(&fe, inst),
                    source,
                });
            }
        }
        self.delete_stray_services(&snap, &mut report);
        self.delete_stray_meta(&snap, &mut report);
        report.sum();
        report
    }

    /// The range (a new one if a slot drifted), then meta, then the master
    /// of one frontend; stops at the first failure.
    fn repair_frontend(
        &mut self,
        fe: &Frontend,
        snap: &Snapshot,
        report: &mut RepairReport,
    ) -> Result<(), DatapathError> {
        let inst = self.installed[fe].clone();
        let key = frontend_key(fe);
        if !inst.complete {
            // Its master was never written or is being removed: one there now
            // is drift.
            if snap.services.contains_key(&key) {
                self.dp.delete_service(&key)?;
                report.deleted += 1;
            }
            return Ok(());
        }
        let want: Vec<Backend> = inst
            .backends
            .iter()
            .map(|a| encode_backend(a, fe.proto))
            .collect();
        let drifted = inst
            .slots()
            .zip(&want)
            .filter(|(slot, b)| snap.backends.get(slot) != Some(*b))
            .count();
        // Adopted without meta: nothing to write it from until an apply names it.
        if !inst.service.name.is_empty() {
            let meta = encode_meta(fe, &inst.service);
            if snap.meta.get(&inst.svc_id) != Some(&meta) {
                self.dp.put_meta(inst.svc_id, &meta)?;
                report.meta += 1;
            }
        }
        if drifted > 0 {
            let base = self.write_range(&want)?;
            let count = inst.count;
            let master = lb_common::ServiceValue::new(base, count, inst.svc_id)
                .with_affinity(inst.affinity)
                .with_flags(inst.flags);
            if let Err(e) = self.dp.put_service(&key, &master) {
                self.ranges.free(base, u32::from(count));
                return Err(e);
            }
            self.ranges.release(inst.base, u32::from(count));
            if let Some(i) = self.installed.get_mut(fe) {
                i.base = base;
            }
            report.backends += drifted;
            report.slots += 1;
            report.masters += 1;
            return Ok(());
        }
        if snap.services.get(&key) != Some(&inst.master()) {
            self.dp.put_service(&key, &inst.master())?;
            report.masters += 1;
        }
        Ok(())
    }

    /// Masters of no installed frontend.
    fn delete_stray_services(&mut self, snap: &Snapshot, report: &mut RepairReport) {
        let owned: HashSet<_> = self.installed.keys().map(frontend_key).collect();
        for key in snap.services.keys() {
            if owned.contains(key) {
                continue;
            }
            match self.dp.delete_service(key) {
                Ok(()) => {
                    report.deleted += 1;
                    if let Some((base, n)) = self.strays.remove(key) {
                        self.ranges.release(base, n);
                    }
                }
                Err(source) => report.errors.push(RepairError {
                    entry: format!("stray service entry {key:?}"),
                    source,
                }),
            }
        }
    }

    fn delete_stray_meta(&mut self, snap: &Snapshot, report: &mut RepairReport) {
        for &svc_id in snap.meta.keys() {
            if self.svc_ids.contains(&svc_id) {
                continue;
            }
            match self.dp.delete_meta(svc_id) {
                Ok(()) => {
                    report.deleted += 1;
                    self.stray_meta.remove(&svc_id);
                }
                Err(source) => report.errors.push(RepairError {
                    entry: format!("stray meta entry {svc_id}"),
                    source,
                }),
            }
        }
    }
}

fn describe(fe: &Frontend, inst: &Installed) -> String {
    format!(
        "service {}/{} ({fe})",
        inst.service.namespace, inst.service.name
    )
}
