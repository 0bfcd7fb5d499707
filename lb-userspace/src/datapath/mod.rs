//! The map contents the connect4 program reads, behind a trait so the
//! reconciler is tested against an in-memory copy and run against BPF maps.
use std::collections::BTreeMap;

use lb_common::{Backend, ServiceKey, ServiceMeta, ServiceValue};

pub mod bpf;
pub mod memory;
mod node_ports;
pub mod sockdiag;
pub(crate) mod sys;
pub mod terminate;

pub use memory::MemoryDatapath;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The kernel refused a new entry because the map is at `max_entries`.
    #[error("map {map} is full (raise its size with --{flag})")]
    MapFull {
        map: &'static str,
        flag: &'static str,
    },
    #[error("{op} on map {map}: {source}")]
    Map {
        op: &'static str,
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// More backends than a frontend has slots: nothing of it is written.
    #[error("{backends} backends, more than the {max} slots a frontend can hold")]
    TooManyBackends { backends: usize, max: u16 },
    /// A write to a backend slot a reader may still hold: a bug in the
    /// caller (the in-memory datapath checks it; the kernel cannot).
    #[error("backend slot {slot} written while a reader may hold it")]
    LiveSlot { slot: u32 },
    /// Every id of a kind is in use (one per frontend, up to the slots of
    /// the per-service counters, sized by `--max-frontends`).
    #[error("no free {kind} id (raise --max-frontends)")]
    IdsExhausted { kind: &'static str },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// Everything the maps hold, as read at one point in time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Slots of the backend array that were ever written (a slot of all
    /// zeroes is left out), by index.
    pub backends: BTreeMap<u32, Backend>,
    pub meta: BTreeMap<u32, ServiceMeta>,
    /// Sockets the agent destroyed per service id (`--terminate-sockets`).
    pub terminated: BTreeMap<u32, u64>,
}

/// Map access. Each call but [`Datapath::put_backends`] is one atomic map
/// operation; ordering across calls is the reconciler's job.
pub trait Datapath {
    fn snapshot(&self) -> Result<Snapshot>;
    /// Slots in the backend array (its `max_entries`).
    fn backend_capacity(&self) -> u32;
    /// Writes `backends` to the slots from `base` on (one batch). Not
    /// atomic as a whole, nor per slot for a concurrent reader: only ever
    /// called on slots no master reaches, and none reached since the last
    /// [`Datapath::grace`].
    fn put_backends(&mut self, base: u32, backends: &[Backend]) -> Result<()>;
    /// Returns once every program run that started before the call has
    /// finished (an RCU grace period): a range no master reaches any more
    /// can then be written again.
    fn grace(&mut self) -> Result<()>;
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn put_meta(&mut self, svc_id: u32, meta: &ServiceMeta) -> Result<()>;
    fn delete_meta(&mut self, svc_id: u32) -> Result<()>;
    /// The highest service id the per-service counters have a slot for:
    /// the reconciler hands out ids `1..=max_svc_id()`.
    fn max_svc_id(&self) -> u32 {
        u32::MAX
    }
    /// Zeroes the per-service counters of `svc_id` (about to be given to a
    /// new frontend), so it does not inherit a removed service's counts.
    fn reset_svc_stats(&mut self, _svc_id: u32) -> Result<()> {
        Ok(())
    }
    /// Records writes refused because a map was full, where `list` shows them.
    fn count_map_full(&mut self, n: u64) -> Result<()>;
    /// Records a finished sync where `lb-agent status` finds it.
    fn note_synced(&mut self, _at: std::time::SystemTime) -> Result<()> {
        Ok(())
    }
    /// Deletes every session affinity entry whose service id is not in
    /// `keep`; returns how many went.
    fn retain_affinity(&mut self, keep: &std::collections::HashSet<u32>) -> Result<usize>;

    /// Several [`Datapath::put_backends`] at once (the BPF maps take them
    /// in a few batched syscalls). Every range is tried; returns the ones
    /// that failed (index in `ranges`, error), which may be written in part.
    fn put_backend_ranges(&mut self, ranges: &[(u32, &[Backend])]) -> Failures {
        resume(ranges, |rest| {
            for (i, (base, backends)) in rest.iter().enumerate() {
                self.put_backends(*base, backends).map_err(|e| (i, e))?;
            }
            Ok(())
        })
    }

    /// Several [`Datapath::put_meta`] at once, each atomic; failures as
    /// [`Datapath::put_backend_ranges`].
    fn put_metas(&mut self, entries: &[(u32, ServiceMeta)]) -> Failures {
        resume(entries, |rest| {
            for (i, (svc_id, meta)) in rest.iter().enumerate() {
                self.put_meta(*svc_id, meta).map_err(|e| (i, e))?;
            }
            Ok(())
        })
    }

    /// Several [`Datapath::put_service`] at once, each atomic, in order;
    /// failures as [`Datapath::put_backend_ranges`].
    fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Failures {
        resume(entries, |rest| {
            for (i, (key, value)) in rest.iter().enumerate() {
                self.put_service(key, value).map_err(|e| (i, e))?;
            }
            Ok(())
        })
    }
}

/// The entries of a batch that failed: (index in the batch, error).
pub type Failures = Vec<(usize, DatapathError)>;

/// Runs `write` over `items`, which stops at the first entry that fails
/// (`Err((index in what it was given, error))`, as `BPF_MAP_UPDATE_BATCH`
/// does), and resumes after that entry until every entry was tried.
pub fn resume<T>(
    items: &[T],
    mut write: impl FnMut(&[T]) -> std::result::Result<(), (usize, DatapathError)>,
) -> Failures {
    let mut failed = Vec::new();
    let mut start = 0;
    while start < items.len() {
        match write(&items[start..]) {
            Ok(()) => break,
            Err((i, e)) => {
                failed.push((start + i, e));
                start += i + 1;
            }
        }
    }
    failed
}

mod encode;

pub use encode::{
    backend_addr, decode_meta, encode_backend, encode_meta, frontend_key, ip_be, ip_from_be,
    key_frontend,
};

/// The error for a backend array without `n` free slots in a row.
pub fn backends_full() -> DatapathError {
    DatapathError::MapFull {
        map: lb_common::maps::BACKENDS,
        flag: "max-backends",
    }
}
