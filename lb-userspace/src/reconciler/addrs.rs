//! A frontend's backend addresses as the reconciler records them: one
//! record per installed frontend, kept for the agent's lifetime, so they
//! are stored by family (6 bytes an IPv4 address and port, 28 an IPv6 one)
//! rather than as `SocketAddr`s (32 bytes each).
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

/// Addresses in slot order. Translation gives a frontend addresses of its
/// own family only; a mix (read back from maps another writer filled) is
/// kept as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addrs {
    V4(Box<[SocketAddrV4]>),
    V6(Box<[SocketAddrV6]>),
    Mixed(Box<[SocketAddr]>),
}

impl Default for Addrs {
    fn default() -> Self {
        Addrs::V4(Box::default())
    }
}

impl Addrs {
    pub fn len(&self) -> usize {
        match self {
            Addrs::V4(a) => a.len(),
            Addrs::V6(a) => a.len(),
            Addrs::Mixed(a) => a.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The addresses, in slot order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = SocketAddr> + '_ {
        let (v4, v6, mixed): (&[SocketAddrV4], &[SocketAddrV6], &[SocketAddr]) = match self {
            Addrs::V4(a) => (a, &[], &[]),
            Addrs::V6(a) => (&[], a, &[]),
            Addrs::Mixed(a) => (&[], &[], a),
        };
        Iter { v4, v6, mixed }
    }

    pub fn to_vec(&self) -> Vec<SocketAddr> {
        self.iter().collect()
    }

    pub fn clear(&mut self) {
        *self = Addrs::default();
    }
}

/// One of the three slices is non-empty; chained by hand so the iterator
/// knows its exact length.
struct Iter<'a> {
    v4: &'a [SocketAddrV4],
    v6: &'a [SocketAddrV6],
    mixed: &'a [SocketAddr],
}

impl Iterator for Iter<'_> {
    type Item = SocketAddr;

    fn next(&mut self) -> Option<SocketAddr> {
        if let Some((a, rest)) = self.v4.split_first() {
            self.v4 = rest;
            return Some(SocketAddr::V4(*a));
        }
        if let Some((a, rest)) = self.v6.split_first() {
            self.v6 = rest;
            return Some(SocketAddr::V6(*a));
        }
        let (a, rest) = self.mixed.split_first()?;
        self.mixed = rest;
        Some(*a)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.v4.len() + self.v6.len() + self.mixed.len();
        (n, Some(n))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl From<Vec<SocketAddr>> for Addrs {
    fn from(addrs: Vec<SocketAddr>) -> Self {
        Self::from(addrs.as_slice())
    }
}

impl From<&[SocketAddr]> for Addrs {
    fn from(addrs: &[SocketAddr]) -> Self {
        let v4: Option<Box<[SocketAddrV4]>> = addrs
            .iter()
            .map(|a| match a {
                SocketAddr::V4(a) => Some(*a),
                SocketAddr::V6(_) => None,
            })
            .collect();
        if let Some(v4) = v4 {
            return Addrs::V4(v4);
        }
        let v6: Option<Box<[SocketAddrV6]>> = addrs
            .iter()
            .map(|a| match a {
                SocketAddr::V6(a) => Some(*a),
                SocketAddr::V4(_) => None,
            })
            .collect();
        match v6 {
            Some(v6) => Addrs::V6(v6),
            None => Addrs::Mixed(addrs.into()),
        }
    }
}

impl PartialEq<[SocketAddr]> for Addrs {
    fn eq(&self, other: &[SocketAddr]) -> bool {
        self.len() == other.len() && self.iter().zip(other).all(|(a, b)| a == *b)
    }
}

impl PartialEq<Vec<SocketAddr>> for Addrs {
    fn eq(&self, other: &Vec<SocketAddr>) -> bool {
        *self == **other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn keeps_every_address_in_order_whatever_the_families() {
        let v4 = vec![addr("10.0.0.1:80"), addr("10.0.0.2:81")];
        let v6 = vec![addr("[fd00::1]:80"), addr("[fd00::2]:80")];
        let mixed = vec![addr("10.0.0.1:80"), addr("[fd00::1]:80")];
        for (addrs, family) in [(&v4, "V4"), (&v6, "V6"), (&mixed, "Mixed")] {
            let a = Addrs::from(addrs.clone());
            assert!(format!("{a:?}").starts_with(family), "{a:?}");
            assert_eq!(a.len(), addrs.len());
            assert_eq!(a.to_vec(), *addrs);
            assert_eq!(a, *addrs);
            assert_eq!(a.iter().len(), addrs.len());
        }
        assert_ne!(Addrs::from(v4.clone()), v4[..1].to_vec());
        assert_ne!(Addrs::from(v4), v6);
    }

    #[test]
    fn empty_and_cleared_are_equal() {
        let mut a = Addrs::from(vec![addr("[fd00::1]:80")]);
        a.clear();
        assert!(a.is_empty());
        assert_eq!(a, Addrs::from(Vec::new()));
        assert_eq!(a, Vec::<SocketAddr>::new());
    }

    #[test]
    fn an_ipv4_address_takes_six_bytes() {
        assert_eq!(std::mem::size_of::<SocketAddrV4>(), 6);
        assert_eq!(std::mem::size_of::<Addrs>(), 24);
    }
}
