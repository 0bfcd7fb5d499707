//! The map contents the connect4 program reads, behind a trait so the
//! reconciler is tested against an in-memory copy and run against BPF maps.
use std::collections::BTreeMap;

use lb_common::{Backend, ServiceKey, ServiceMeta, ServiceValue};

pub mod bpf;
pub mod memory;

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
    /// Every id of a kind is in use (ids are 32 bits: in practice, never).
    #[error("no free {kind} id")]
    IdsExhausted { kind: &'static str },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// Everything the maps hold, as read at one point in time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub meta: BTreeMap<u32, ServiceMeta>,
}

/// Element-wise map access. Each call is one atomic map operation; ordering
/// across calls is the reconciler's job.
pub trait Datapath {
    fn snapshot(&self) -> Result<Snapshot>;
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()>;
    fn delete_backend(&mut self, id: u32) -> Result<()>;
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn put_meta(&mut self, svc_id: u32, meta: &ServiceMeta) -> Result<()>;
    fn delete_meta(&mut self, svc_id: u32) -> Result<()>;
    /// Records writes refused because a map was full, where `list` shows them.
    fn count_map_full(&mut self, n: u64) -> Result<()>;
}

mod encode;

pub use encode::{
    backend_addr, decode_meta, encode_backend, encode_meta, frontend_key, key_frontend,
};
