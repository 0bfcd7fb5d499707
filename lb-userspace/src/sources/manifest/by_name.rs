//! The objects last given to the index, found by (namespace, name) without
//! a copy of the key beside each: a slot is the object's pointer (9 bytes
//! with its control byte, where a map from key to pointer takes 57), for
//! every Service and EndpointSlice of the directory.
use std::{hash::BuildHasher, sync::Arc};

use hashbrown::{HashTable, hash_table::Entry};

use crate::model::{ServiceInfo, SliceInfo};

/// Objects filed under their own (namespace, name).
pub(super) trait Named {
    fn names(&self) -> (&str, &str);
}

impl Named for ServiceInfo {
    fn names(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl Named for SliceInfo {
    fn names(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

pub(super) struct ByName<T> {
    table: HashTable<Arc<T>>,
    hasher: foldhash::fast::RandomState,
}

impl<T> Default for ByName<T> {
    fn default() -> Self {
        Self {
            table: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl<T> std::fmt::Debug for ByName<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByName")
            .field("len", &self.table.len())
            .finish_non_exhaustive()
    }
}

impl<T: Named> ByName<T> {
    pub fn get(&self, namespace: &str, name: &str) -> Option<&Arc<T>> {
        let hash = self.hasher.hash_one((namespace, name));
        self.table.find(hash, |o| o.names() == (namespace, name))
    }

    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        self.get(namespace, name).is_some()
    }

    /// Files `obj` under its names; returns what was filed there before.
    pub fn insert(&mut self, obj: Arc<T>) -> Option<Arc<T>> {
        let Self { table, hasher } = self;
        let (namespace, name) = obj.names();
        let hash = hasher.hash_one((namespace, name));
        let entry = table.entry(
            hash,
            |o| o.names() == (namespace, name),
            |o| hasher.hash_one(o.names()),
        );
        match entry {
            Entry::Occupied(mut e) => Some(std::mem::replace(e.get_mut(), obj)),
            Entry::Vacant(e) => {
                e.insert(obj);
                None
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<T>> {
        self.table.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(namespace: &str, name: &str, source: &str) -> Arc<ServiceInfo> {
        Arc::new(ServiceInfo {
            namespace: namespace.into(),
            name: name.into(),
            source: source.into(),
            created: None,
            headless_label: false,
            proxy_name: None,
            spec: None,
        })
    }

    #[test]
    fn finds_replaces_and_lists_by_names() {
        let mut set = ByName::default();
        assert!(set.insert(svc("a", "web", "1")).is_none());
        assert!(set.insert(svc("b", "web", "2")).is_none());
        // (namespace, name) is the key, not the concatenation.
        assert!(set.insert(svc("a", "webb", "3")).is_none());
        assert!(!set.contains("aw", "eb"));
        let old = set.insert(svc("a", "web", "4")).expect("replaced");
        assert_eq!(old.source, "1");
        assert_eq!(set.get("a", "web").map(|s| s.source.as_str()), Some("4"));
        assert_eq!(set.get("b", "web").map(|s| s.source.as_str()), Some("2"));
        assert!(set.get("c", "web").is_none());
        let mut all: Vec<&str> = set.iter().map(|s| s.source.as_str()).collect();
        all.sort_unstable();
        assert_eq!(all, ["2", "3", "4"]);
    }
}
