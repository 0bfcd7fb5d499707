//! In-memory datapath for unit tests: same contract as the BPF maps,
//! including size limits, plus a log of every write for ordering checks.
use lb_common::{Backend, ServiceKey, ServiceMeta, ServiceValue};

use super::{Datapath, DatapathError, Result, Snapshot};

/// One write, in the order the reconciler issued it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32),
    DeleteBackend(u32),
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    PutMeta(u32),
    DeleteMeta(u32),
}

#[derive(Clone, Debug)]
pub struct MemoryDatapath {
    pub state: Snapshot,
    pub log: Vec<Op>,
    pub max_services: usize,
    pub max_backends: usize,
    pub map_full: u64,
}

impl Default for MemoryDatapath {
    fn default() -> Self {
        Self {
            state: Snapshot::default(),
            log: Vec::new(),
            max_services: usize::MAX,
            max_backends: usize::MAX,
            map_full: 0,
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
}

impl Datapath for MemoryDatapath {
    fn snapshot(&self) -> Result<Snapshot> {
        Ok(self.state.clone())
    }

    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        if !self.state.backends.contains_key(&id) && self.state.backends.len() >= self.max_backends
        {
            return Err(DatapathError::MapFull {
                map: lb_common::maps::BACKENDS,
                flag: "max-backends",
            });
        }
        self.state.backends.insert(id, *backend);
        self.log.push(Op::PutBackend(id));
        Ok(())
    }

    fn delete_backend(&mut self, id: u32) -> Result<()> {
        self.state.backends.remove(&id);
        self.log.push(Op::DeleteBackend(id));
        Ok(())
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        if !self.state.services.contains_key(key) && self.state.services.len() >= self.max_services
        {
            return Err(DatapathError::MapFull {
                map: lb_common::maps::SERVICES,
                flag: "max-services",
            });
        }
        self.state.services.insert(*key, *value);
        self.log.push(Op::PutService(*key, *value));
        Ok(())
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.state.services.remove(key);
        self.log.push(Op::DeleteService(*key));
        Ok(())
    }

    fn put_meta(&mut self, svc_id: u32, meta: &ServiceMeta) -> Result<()> {
        self.state.meta.insert(svc_id, *meta);
        self.log.push(Op::PutMeta(svc_id));
        Ok(())
    }

    fn delete_meta(&mut self, svc_id: u32) -> Result<()> {
        self.state.meta.remove(&svc_id);
        self.log.push(Op::DeleteMeta(svc_id));
        Ok(())
    }

    fn count_map_full(&mut self, n: u64) -> Result<()> {
        self.map_full += n;
        Ok(())
    }
}
