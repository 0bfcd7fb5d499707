//! A hash table of values that carry their own (namespace, name), so the
//! key is not stored a second time: a `HashMap<(SmolStr, SmolStr), _>`
//! spends 48 bytes of every bucket on it, 6 MB a table at 100,000
//! services.
use std::{fmt, hash::BuildHasher};

use hashbrown::{HashTable, hash_table::Entry};

/// A value filed under its own (namespace, name).
pub(super) trait Keyed {
    fn names(&self) -> (&str, &str);
}

pub(super) struct Table<T> {
    table: HashTable<T>,
    /// foldhash, seeded per process (as the index's other tables).
    state: foldhash::fast::RandomState,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self {
            table: HashTable::new(),
            state: foldhash::fast::RandomState::default(),
        }
    }
}

impl<T: Keyed + fmt::Debug> fmt::Debug for Table<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.table.iter()).finish()
    }
}

impl<T: Keyed> Table<T> {
    fn hash(&self, names: (&str, &str)) -> u64 {
        self.state.hash_one(names)
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&T> {
        let hash = self.hash((namespace, name));
        self.table.find(hash, |v| v.names() == (namespace, name))
    }

    pub fn get_mut(&mut self, namespace: &str, name: &str) -> Option<&mut T> {
        let hash = self.hash((namespace, name));
        self.table
            .find_mut(hash, |v| v.names() == (namespace, name))
    }

    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        self.get(namespace, name).is_some()
    }

    /// Files `value`; the value it replaces, if any.
    pub fn insert(&mut self, value: T) -> Option<T> {
        let hash = self.hash(value.names());
        let state = &self.state;
        match self.table.entry(
            hash,
            |v| v.names() == value.names(),
            |v| state.hash_one(v.names()),
        ) {
            Entry::Occupied(mut e) => Some(std::mem::replace(e.get_mut(), value)),
            Entry::Vacant(e) => {
                e.insert(value);
                None
            }
        }
    }

    pub fn remove(&mut self, namespace: &str, name: &str) -> Option<T> {
        let hash = self.hash((namespace, name));
        let e = self
            .table
            .find_entry(hash, |v| v.names() == (namespace, name))
            .ok()?;
        Some(e.remove().0)
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.table.iter()
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Obj(String, String, u32);

    impl Keyed for Obj {
        fn names(&self) -> (&str, &str) {
            (&self.0, &self.1)
        }
    }

    fn obj(ns: &str, name: &str, v: u32) -> Obj {
        Obj(ns.into(), name.into(), v)
    }

    #[test]
    fn files_values_under_their_own_names() {
        let mut t = Table::default();
        assert_eq!(t.insert(obj("a", "x", 1)), None);
        assert_eq!(t.insert(obj("a", "y", 2)), None);
        assert_eq!(t.insert(obj("b", "x", 3)), None);
        assert_eq!(t.insert(obj("a", "x", 4)), Some(obj("a", "x", 1)));
        assert_eq!(t.len(), 3);
        assert_eq!(t.get("a", "x"), Some(&obj("a", "x", 4)));
        assert!(t.contains("b", "x"));
        assert!(!t.contains("b", "y"));
        t.get_mut("a", "y").unwrap().2 = 5;
        assert_eq!(t.remove("a", "y"), Some(obj("a", "y", 5)));
        assert_eq!(t.remove("a", "y"), None);
        let mut left: Vec<u32> = t.iter().map(|o| o.2).collect();
        left.sort();
        assert_eq!(left, [3, 4]);
        // Many, through growth.
        for i in 0..1000 {
            t.insert(obj("n", &i.to_string(), i));
        }
        assert_eq!(t.len(), 1002);
        assert!((0..1000).all(|i| t.get("n", &i.to_string()).is_some_and(|o| o.2 == i)));
    }
}
