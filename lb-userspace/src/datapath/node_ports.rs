//! The agent's side of `LB_NODE_PORTS`, bind protection's bitmap: which
//! (protocol, nodePort) some service entry flagged `SVC_FLAG_NODE_PORT`
//! serves, with how many such entries sit on each bit, so a bit is cleared
//! only when its last entry is gone or loses the flag. Kept from the
//! entries the datapath writes, as the frontend filter is, so it always
//! describes `LB_SERVICES`, whoever wrote it (an adopted map is counted
//! once, on first use).
use std::collections::{HashMap, HashSet};

use lb_common::{NODE_PORT_WORDS, SVC_FLAG_NODE_PORT, ServiceKey, ServiceValue, node_port_bit};

#[derive(Debug)]
pub struct NodePortBits {
    /// Entries of `LB_SERVICES` flagged as node-address frontends.
    keys: HashSet<ServiceKey>,
    /// Bit → how many of `keys` are on it.
    counts: HashMap<u32, u32>,
    words: Vec<u64>,
}

/// The bit of a service entry's (protocol, port).
fn bit(key: &ServiceKey) -> Option<u32> {
    node_port_bit(key.proto, u16::from_be(key.port))
}

/// Whether a service entry is a node-address frontend.
pub fn flagged(value: &ServiceValue) -> bool {
    value.flags & SVC_FLAG_NODE_PORT != 0
}

impl NodePortBits {
    /// Counted from the whole of `LB_SERVICES`.
    pub fn from_services<'a>(
        entries: impl IntoIterator<Item = (&'a ServiceKey, &'a ServiceValue)>,
    ) -> Self {
        let mut bits = Self {
            keys: HashSet::new(),
            counts: HashMap::new(),
            words: vec![0; NODE_PORT_WORDS as usize],
        };
        let mut changed = Vec::new();
        for (key, value) in entries {
            if flagged(value) {
                bits.add(key, &mut changed);
            }
        }
        bits
    }

    /// Every word, indexed as the map.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Word `index`.
    pub fn word(&self, index: u32) -> u64 {
        self.words[index as usize]
    }

    /// Records `key` as a flagged entry; the word whose bit it sets first
    /// is pushed on `changed`.
    pub fn add(&mut self, key: &ServiceKey, changed: &mut Vec<u32>) {
        let Some(bit) = bit(key) else {
            return;
        };
        if !self.keys.insert(*key) {
            return;
        }
        let count = self.counts.entry(bit).or_default();
        *count += 1;
        if *count == 1 {
            self.words[(bit >> 6) as usize] |= 1 << (bit & 63);
            changed.push(bit >> 6);
        }
    }

    /// `key` is no (longer a) flagged entry; the word whose bit it held
    /// last is pushed on `changed`.
    pub fn remove(&mut self, key: &ServiceKey, changed: &mut Vec<u32>) {
        if !self.keys.remove(key) {
            return;
        }
        let Some(bit) = bit(key) else {
            return;
        };
        let Some(count) = self.counts.get_mut(&bit) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.counts.remove(&bit);
            self.words[(bit >> 6) as usize] &= !(1 << (bit & 63));
            changed.push(bit >> 6);
        }
    }

    /// Whether the bitmap says (protocol, port) is a nodePort.
    #[cfg(test)]
    pub fn is_set(&self, proto: u8, port: u16) -> bool {
        node_port_bit(proto, port)
            .is_some_and(|b| (self.words[(b >> 6) as usize] >> (b & 63)) & 1 != 0)
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{PROTO_TCP, PROTO_UDP, v4_mapped};

    use super::*;

    fn key(ip: u8, port: u16, proto: u8) -> ServiceKey {
        ServiceKey::new(
            v4_mapped(u32::from_ne_bytes([10, 250, 0, ip])),
            port.to_be(),
            proto,
        )
    }

    fn node_port() -> ServiceValue {
        ServiceValue::new(0, 1, 1).with_flags(SVC_FLAG_NODE_PORT)
    }

    /// A bit stays set while any node address serves the port, and only
    /// flagged entries count: a ClusterIP on the same port sets nothing.
    #[test]
    fn a_bit_is_set_while_any_node_address_serves_the_port() {
        let plain = ServiceValue::new(0, 1, 2);
        let (a, b, cluster) = (
            key(1, 30080, PROTO_TCP),
            key(2, 30080, PROTO_TCP),
            key(9, 30081, PROTO_TCP),
        );
        let mut bits = NodePortBits::from_services([(&a, &node_port()), (&cluster, &plain)]);
        assert!(bits.is_set(PROTO_TCP, 30080));
        assert!(!bits.is_set(PROTO_UDP, 30080), "per protocol");
        assert!(!bits.is_set(PROTO_TCP, 30081), "a ClusterIP is no nodePort");
        let mut changed = Vec::new();
        bits.add(&b, &mut changed);
        assert!(changed.is_empty(), "the bit was set already");
        bits.add(&b, &mut changed);
        bits.remove(&a, &mut changed);
        assert!(bits.is_set(PROTO_TCP, 30080), "b still serves it");
        assert!(changed.is_empty());
        bits.remove(&b, &mut changed);
        assert!(!bits.is_set(PROTO_TCP, 30080));
        assert_eq!(changed, [30080 >> 6]);
        // Removing what is not there changes nothing.
        bits.remove(&cluster, &mut changed);
        assert_eq!(changed, [30080 >> 6]);
        let mut changed = Vec::new();
        bits.add(&key(1, 53, PROTO_UDP), &mut changed);
        assert!(bits.is_set(PROTO_UDP, 53));
        assert_eq!(changed, [(65_536 + 53) >> 6]);
        assert_eq!(bits.words().iter().filter(|w| **w != 0).count(), 1);
    }
}
