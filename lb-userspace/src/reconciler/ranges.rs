//! Space in the backend array: free extents, and extents released since
//! the last grace period (which a program that read an old master may still
//! be reading, so they are not handed out until [`Ranges::reclaim`]).
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default)]
pub(super) struct Ranges {
    /// Start → length, coalesced: no two extents touch.
    free: BTreeMap<u32, u32>,
    /// Released since the last grace period.
    released: Vec<(u32, u32)>,
}

impl Ranges {
    /// `capacity` slots of which `used` are taken; the rest counts as
    /// released (a previous agent may have let it go an instant ago).
    pub(super) fn adopted(capacity: u32, used: &[(u32, u32)]) -> Self {
        let mut used: Vec<(u32, u32)> = used.iter().copied().filter(|&(_, n)| n > 0).collect();
        used.sort_unstable();
        let mut out = Self::default();
        let mut at = 0u32;
        for (base, n) in used {
            if base > at {
                out.released.push((at, base - at));
            }
            at = at.max(base.saturating_add(n));
        }
        if capacity > at {
            out.released.push((at, capacity - at));
        }
        out
    }

    /// First fit of `n` slots (`n > 0`) among the free extents.
    pub(super) fn allocate(&mut self, n: u32) -> Option<u32> {
        let (&start, &len) = self.free.iter().find(|&(_, &len)| len >= n)?;
        self.free.remove(&start);
        if len > n {
            self.free.insert(start + n, len - n);
        }
        Some(start)
    }

    /// A range a master no longer reaches: free after the next grace period.
    pub(super) fn release(&mut self, base: u32, n: u32) {
        if n > 0 {
            self.released.push((base, n));
        }
    }

    pub(super) fn has_released(&self) -> bool {
        !self.released.is_empty()
    }

    /// After a grace period: everything released is free.
    pub(super) fn reclaim(&mut self) {
        for (base, n) in std::mem::take(&mut self.released) {
            self.free(base, n);
        }
    }

    /// A range no reader can hold (never reached by a master, or released
    /// before a grace period that has passed).
    pub(super) fn free(&mut self, base: u32, n: u32) {
        if n == 0 {
            return;
        }
        let (mut start, mut len) = (base, n);
        if let Some((&prev, &plen)) = self.free.range(..start).next_back()
            && prev + plen == start
        {
            self.free.remove(&prev);
            start = prev;
            len += plen;
        }
        if let Some(next) = self.free.remove(&(start + len)) {
            len += next;
        }
        self.free.insert(start, len);
    }

    /// Free slots and released ones, for tests.
    #[cfg(test)]
    pub(super) fn counts(&self) -> (u64, u64) {
        let sum = |it: &mut dyn Iterator<Item = u32>| it.map(u64::from).sum();
        (
            sum(&mut self.free.values().copied()),
            sum(&mut self.released.iter().map(|r| r.1)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopted_space_is_released_not_free() {
        let mut r = Ranges::adopted(100, &[(10, 5), (50, 10)]);
        assert_eq!(r.counts(), (0, 85));
        assert_eq!(r.allocate(1), None);
        r.reclaim();
        assert_eq!(r.counts(), (85, 0));
        assert_eq!(r.allocate(10), Some(0));
        assert_eq!(r.allocate(30), Some(15));
        assert_eq!(r.allocate(41), None);
        assert_eq!(r.allocate(40), Some(60));
    }

    #[test]
    fn freed_neighbours_coalesce() {
        let mut r = Ranges::adopted(30, &[]);
        r.reclaim();
        let (a, b, c) = (
            r.allocate(10).unwrap(),
            r.allocate(10).unwrap(),
            r.allocate(10).unwrap(),
        );
        assert_eq!((a, b, c), (0, 10, 20));
        r.free(a, 10);
        r.free(c, 10);
        assert_eq!(r.allocate(20), None);
        r.release(b, 10);
        assert_eq!(r.allocate(20), None, "released is not free yet");
        r.reclaim();
        assert_eq!(r.allocate(30), Some(0));
    }
}
