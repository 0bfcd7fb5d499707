//! The API server's first-come rule for a pool of values Services name or
//! are handed (ClusterIPs, nodePorts), without an API server: one rule,
//! shared by the ClusterIP and the nodePort allocators, each of which
//! decides only what its values are and where a fresh one may come from.
//!
//! 1. A value named by several Services goes to the one that held it after
//!    the last allocation (across a restart: seeded from the maps), else to
//!    the first in file order; the others are refused, as the API server
//!    refuses a Service whose value is taken.
//! 2. A value this allocator handed to a Service that still asks for one
//!    stays with it: a newcomer naming it is refused.
//! 3. Values named (and kept) are taken first, then previous allocations
//!    are kept, then new ones handed out, so a newcomer whose hash lands on
//!    a value in use probes past it.
//! 4. A new value comes from a hash of its owner's name with linear
//!    probing: a fresh agent computes the same values for the same
//!    manifests.
use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher as _, Hash},
};

/// A Service: (namespace, name).
pub(super) type Who<'a> = (&'a str, &'a str);

/// A Service's identity in [`Holders`]: the same for the same (namespace,
/// name) in every run and build (fixed seed). Two Services are mistaken
/// for each other only if their hashes collide while they name the same
/// value (a chance of 2^-64).
pub(super) fn holder_id(namespace: &str, name: &str) -> u64 {
    foldhash::quality::FixedState::with_seed(0).hash_one((namespace, name))
}

/// Which Service held each value after the last allocation (rule 1). By
/// [`holder_id`], not by name: a name per address took 9 MiB at 100,000
/// Services, and a holder is only compared with the few Services that
/// name a value twice.
#[derive(Clone, Debug)]
pub(super) struct Holders<V> {
    ids: HashMap<V, u64>,
}

impl<V> Default for Holders<V> {
    fn default() -> Self {
        Self {
            ids: HashMap::new(),
        }
    }
}

impl<V: Copy + Eq + Hash> Holders<V> {
    /// A previous agent's holder of `value` (the first one seen keeps it).
    pub fn seed(&mut self, value: V, namespace: &str, name: &str) {
        self.ids
            .entry(value)
            .or_insert_with(|| holder_id(namespace, name));
    }

    /// An allocation round; `held` are the values this allocator handed
    /// out before to Services that still ask for one (rule 2).
    pub fn round<'a>(&'a self, held: impl IntoIterator<Item = (V, Who<'a>)>) -> Round<'a, V> {
        Round {
            holders: &self.ids,
            held: held.into_iter().collect(),
            named_by: HashMap::new(),
            taken: HashSet::new(),
        }
    }

    /// After a round: the values every kept Service holds now, named or
    /// handed out.
    pub fn record(&mut self, kept: impl IntoIterator<Item = (V, u64)>) {
        self.ids.clear();
        self.ids.extend(kept);
    }
}

/// One allocation over every Service of the directory, in file order.
pub(super) struct Round<'a, V> {
    holders: &'a HashMap<V, u64>,
    held: HashMap<V, Who<'a>>,
    /// Value → the Service (its index, who) that keeps it, of those naming it.
    named_by: HashMap<V, (usize, Who<'a>)>,
    taken: HashSet<V>,
}

impl<'a, V: Copy + Eq + Hash> Round<'a, V> {
    /// Service number `index` (in file order) names `value` itself. Call
    /// for every value of every Service before asking [`Self::holder`].
    pub fn name(&mut self, index: usize, who: Who<'a>, value: V) {
        let holds = self.holders.get(&value) == Some(&holder_id(who.0, who.1));
        self.named_by
            .entry(value)
            .and_modify(|first| {
                if holds {
                    *first = (index, who);
                }
            })
            .or_insert((index, who));
    }

    /// The Service that keeps `value` if it is not Service `index`: one it
    /// was handed to (rule 2), or the one of those naming it that keeps it
    /// (rule 1). `None`: `index` may have it.
    pub fn holder(&self, index: usize, who: Who<'a>, value: V) -> Option<Who<'a>> {
        self.held
            .get(&value)
            .copied()
            .filter(|h| *h != who)
            .or_else(|| {
                self.named_by
                    .get(&value)
                    .filter(|(first, _)| *first != index)
                    .map(|(_, h)| *h)
            })
    }

    /// Marks `value` in use; `false` if it was already.
    pub fn take(&mut self, value: V) -> bool {
        self.taken.insert(value)
    }

    /// Gives `value` back (an all-or-nothing allocation that failed).
    pub fn release(&mut self, value: V) -> bool {
        self.taken.remove(&value)
    }

    /// A new value (rule 4): the first free one of `count` candidates from
    /// `start` on, wrapping around; `nth(k)` is candidate `k`. `None`: all
    /// are taken.
    pub fn probe(
        &mut self,
        start: u128,
        count: u128,
        nth: impl Fn(u128) -> Option<V>,
    ) -> Option<V> {
        // Ends at the first free value: within `taken.len() + 1` steps unless full.
        (0..count)
            .filter_map(|k| nth((start + k) % count))
            .find(|v| self.taken.insert(*v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Of two Services naming one value, the previous holder keeps it
    /// wherever it is in file order; without one, the first does. A value
    /// handed out to a Service still asking is its own.
    #[test]
    fn the_holder_keeps_a_value_else_the_first() {
        let (a, b, c) = (("ns", "a"), ("ns", "b"), ("ns", "c"));
        let mut holders: Holders<u16> = Holders::default();
        holders.seed(7, b.0, b.1);
        let mut round = holders.round([(9, c)]);
        for v in [7, 8, 9] {
            round.name(0, a, v);
            round.name(1, b, v);
        }
        assert_eq!(round.holder(0, a, 7), Some(b), "b held 7");
        assert_eq!(round.holder(1, b, 7), None);
        assert_eq!(round.holder(0, a, 8), None, "a named 8 first");
        assert_eq!(round.holder(1, b, 8), Some(a));
        assert_eq!(round.holder(0, a, 9), Some(c), "9 was handed to c");
        assert_eq!(round.holder(1, b, 9), Some(c));
        assert!(round.take(8));
        assert!(!round.take(8));
        assert_eq!(round.probe(8, 3, |k| Some(k as u16 + 7)), Some(9));
        assert_eq!(round.probe(0, 3, |k| Some(k as u16 + 7)), Some(7));
        assert_eq!(round.probe(0, 3, |k| Some(k as u16 + 7)), None, "full");
        assert!(round.release(9));
        drop(round);
        holders.record([(8, holder_id(a.0, a.1))]);
        let round = holders.round([]);
        assert_eq!(round.holder(1, b, 8), None, "only named ones conflict");
        let mut round = round;
        round.name(1, b, 8);
        round.name(0, a, 8);
        assert_eq!(round.holder(1, b, 8), Some(a), "a holds 8 now");
    }
}
