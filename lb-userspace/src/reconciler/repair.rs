//! Periodic resync: puts back what the reconciler installed when the maps
//! drifted from it (an entry deleted or changed behind the agent's back) and
//! deletes entries no installed frontend owns, in make-before-break order.
use std::{collections::HashSet, fmt};

use lb_common::{ServiceKey, ServiceValue};

use super::{Installed, Reconciler, release, slot_number};
use crate::{
    datapath::{
        Datapath, DatapathError, Snapshot, encode_backend, encode_meta, frontend_key, key_frontend,
    },
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
    /// Backend entries missing or changed, rewritten.
    pub backends: usize,
    /// Slot entries missing or changed, rewritten.
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
    /// back: backends, then slots, then meta, then masters are rewritten
    /// where missing or different; then entries no installed frontend owns
    /// are deleted (masters before slots, slots before the backends they
    /// name). Safe between any two applies: everything in the maps at
    /// adoption was adopted, so whatever no frontend owns now is drift.
    /// A frontend whose rewrite fails keeps its extra entries until the
    /// next repair.
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
        self.repair_backends(&snap, &mut report);
        let mut failed = HashSet::new();
        for (fe, inst) in &self.installed {
            if let Err(source) = repair_frontend(&mut self.dp, fe, inst, &snap, &mut report) {
                failed.insert(*fe);
                report.errors.push(RepairError {
                    entry: describe(fe, inst),
                    source,
                });
            }
        }
        let kept = self.delete_stray_services(&snap, &failed, &mut report);
        self.delete_stray_meta(&snap, &mut report);
        self.delete_stray_backends(&snap, &kept, &mut report);
        report.sum();
        report
    }

    /// Backends some slot names, as they were written.
    fn repair_backends(&mut self, snap: &Snapshot, report: &mut RepairReport) {
        for (&id, &(addr, proto)) in &self.backends {
            if !self.refs.contains_key(&id) {
                continue; // an orphan the next pruning apply deletes
            }
            let want = encode_backend(addr, proto);
            if snap.backends.get(&id) == Some(&want) {
                continue;
            }
            match self.dp.put_backend(id, &want) {
                Ok(()) => report.backends += 1,
                Err(source) => report.errors.push(RepairError {
                    entry: format!("backend {id} ({addr}/{proto})"),
                    source,
                }),
            }
        }
    }

    /// Service entries of no installed frontend, or past an installed
    /// frontend's slots: unreachable once its master is right. Masters
    /// first. Returns the backend ids named by entries left in place.
    fn delete_stray_services(
        &mut self,
        snap: &Snapshot,
        failed: &HashSet<Frontend>,
        report: &mut RepairReport,
    ) -> HashSet<u32> {
        let mut kept = HashSet::new();
        let mut stray: Vec<(&ServiceKey, &ServiceValue)> = Vec::new();
        for (key, value) in &snap.services {
            let owner = key_frontend(key).and_then(|fe| Some((fe, self.installed.get(&fe)?)));
            match owner {
                Some((fe, _)) if failed.contains(&fe) => {
                    kept.insert(value.backend_id);
                }
                Some((_, inst)) if key.slot == 0 || usize::from(key.slot) <= inst.slots.len() => {}
                _ => stray.push((key, value)),
            }
        }
        stray.sort_by_key(|(k, _)| k.slot != 0);
        for (key, value) in stray {
            match self.dp.delete_service(key) {
                Ok(()) => {
                    report.deleted += 1;
                    if let Some(id) = self.strays.remove(key) {
                        release(&mut self.refs, &mut self.unreferenced, id);
                    }
                }
                Err(source) => {
                    kept.insert(value.backend_id);
                    report.errors.push(RepairError {
                        entry: format!("stray service entry {key:?}"),
                        source,
                    });
                }
            }
        }
        kept
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

    /// Backend entries this reconciler did not write and nothing names.
    fn delete_stray_backends(
        &mut self,
        snap: &Snapshot,
        kept: &HashSet<u32>,
        report: &mut RepairReport,
    ) {
        for &id in snap.backends.keys() {
            if self.backends.contains_key(&id) || self.refs.contains_key(&id) || kept.contains(&id)
            {
                continue;
            }
            match self.dp.delete_backend(id) {
                Ok(()) => {
                    report.deleted += 1;
                    self.unreferenced.remove(&id);
                }
                Err(source) => report.errors.push(RepairError {
                    entry: format!("stray backend {id}"),
                    source,
                }),
            }
        }
    }
}

/// Slots, then meta, then the master of one frontend, where they differ
/// from what was installed; stops at the first failure.
fn repair_frontend<D: Datapath>(
    dp: &mut D,
    fe: &Frontend,
    inst: &Installed,
    snap: &Snapshot,
    report: &mut RepairReport,
) -> Result<(), DatapathError> {
    for (i, &id) in inst.slots.iter().enumerate() {
        let key = frontend_key(fe, slot_number(i)?);
        let want = ServiceValue::slot(id, inst.svc_id);
        if snap.services.get(&key) != Some(&want) {
            dp.put_service(&key, &want)?;
            report.slots += 1;
        }
    }
    let master = frontend_key(fe, 0);
    if !inst.complete {
        // Its master was never written or is being removed: one there now
        // is drift, and its count may reach slots that are not there.
        if snap.services.contains_key(&master) {
            dp.delete_service(&master)?;
            report.deleted += 1;
        }
        return Ok(());
    }
    // Adopted without meta: nothing to write it from until an apply names it.
    if !inst.service.name.is_empty() {
        let want = encode_meta(fe, &inst.service);
        if snap.meta.get(&inst.svc_id) != Some(&want) {
            dp.put_meta(inst.svc_id, &want)?;
            report.meta += 1;
        }
    }
    let want = ServiceValue::master(inst.count, inst.svc_id);
    if snap.services.get(&master) != Some(&want) {
        dp.put_service(&master, &want)?;
        report.masters += 1;
    }
    Ok(())
}

fn describe(fe: &Frontend, inst: &Installed) -> String {
    format!(
        "service {}/{} ({fe})",
        inst.service.namespace, inst.service.name
    )
}
