//! nodePort allocation, the API server's job when there is no API server
//! (`pkg/registry/core/service/storage/alloc.go` `initNodePorts`,
//! `pkg/registry/core/service/portallocator`): a NodePort Service, or a
//! LoadBalancer one unless `allocateLoadBalancerNodePorts: false`, gets a
//! nodePort from `--node-port-range` for every port that names none. Who
//! keeps a port is the rule the ClusterIPs follow ([`super::claims`]); what
//! differs is the pool (one range of port numbers, whatever the protocol,
//! as the API server's allocator) and the unit (a service port, known
//! across edits by its name, as the API server patches nodePorts back by
//! port name).
use std::{
    collections::{BTreeMap, HashSet},
    fmt,
};

use k8s_openapi::api::core::v1::ServicePort;

use super::{
    Sourced,
    alloc::Filled,
    claims::{Holders, Who, holder_id},
    diag, fnv1a, name_of, namespace_of,
    slim::SlimService,
};
use crate::model::Diagnostic;

/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: &str = "30000-32767";

/// `--node-port-range`: the ports nodePorts are handed out from, and the
/// only ones a Service may name (the API server refuses others).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodePortRange {
    first: u16,
    last: u16,
}

impl NodePortRange {
    pub fn contains(self, port: i32) -> bool {
        (i32::from(self.first)..=i32::from(self.last)).contains(&port)
    }

    /// Ports in the range.
    fn size(self) -> u128 {
        u128::from(self.last - self.first) + 1
    }
}

impl Default for NodePortRange {
    fn default() -> Self {
        Self {
            first: 30000,
            last: 32767,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?}: expected a port range such as {DEFAULT_NODE_PORT_RANGE} (first-last, within 1-65535)"
)]
pub struct NodePortRangeError(String);

impl std::str::FromStr for NodePortRange {
    type Err = NodePortRangeError;

    /// `first-last`, or `first+count` as kube-apiserver also takes it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NodePortRangeError(s.to_owned());
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p != 0);
        let (first, last) = if let Some((a, b)) = s.split_once('-') {
            (port(a).ok_or_else(bad)?, port(b).ok_or_else(bad)?)
        } else if let Some((a, n)) = s.split_once('+') {
            let first = port(a).ok_or_else(bad)?;
            let n: u16 = n.trim().parse().map_err(|_| bad())?;
            (first, first.checked_add(n).ok_or_else(bad)?)
        } else {
            return Err(bad());
        };
        if first > last {
            return Err(bad());
        }
        Ok(Self { first, last })
    }
}

impl fmt::Display for NodePortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// A service port: (namespace, name, port name).
pub type PortKey = (String, String, String);

/// Hands out nodePorts for service ports that name none, stable across
/// edits and (seeded with what the maps hold) across agent restarts.
#[derive(Clone, Debug, Default)]
pub struct NodePortAllocator {
    pub range: NodePortRange,
    /// Service port → the nodePort this allocator handed out (not the ones
    /// a manifest set itself).
    pub assigned: BTreeMap<PortKey, u16>,
    /// Which Service held each nodePort after the last allocation.
    holders: Holders<u16>,
}

/// A Service that takes part: kept by the ClusterIP allocator, of type
/// NodePort or LoadBalancer.
struct Taking<'a> {
    index: usize,
    who: Who<'a>,
    ports: &'a [ServicePort],
    /// Ports without a nodePort get one.
    allocates: bool,
}

/// Ports of one Service with the same number and no nodePort: they share
/// one (as the API server gives TCP 53 and UDP 53 one nodePort).
struct Group {
    /// Its Service, in `taking`.
    taker: usize,
    /// (position in `spec.ports`, port name), in spec order.
    ports: Vec<(usize, String)>,
    found: Option<u16>,
}

fn node_port(p: &ServicePort) -> i32 {
    p.node_port.unwrap_or_default()
}

impl NodePortAllocator {
    /// `previous`: a previous agent's nodePorts per service port, read back
    /// from the maps. Those inside `range` are kept for their port.
    pub fn new(range: NodePortRange, previous: impl IntoIterator<Item = (PortKey, u16)>) -> Self {
        let mut assigned = BTreeMap::new();
        let mut holders = Holders::default();
        for (key, port) in previous {
            holders.seed(port, &key.0, &key.1);
            if range.contains(i32::from(port)) {
                assigned.entry(key).or_insert(port);
            }
        }
        Self {
            range,
            assigned,
            holders,
        }
    }

    /// Fills in (or refuses) nodePorts in `filled`, the ClusterIP
    /// allocator's outcome for `services` (`None`: dropped; `Some(None)`:
    /// nothing filled in). A nodePort outside the range, or held by another
    /// Service, is refused with a diagnostic naming the newcomer's file and
    /// field; that port is then not served on node addresses (its
    /// ClusterIP still is).
    pub(super) fn allocate(
        &mut self,
        services: &[Sourced<SlimService>],
        filled: &mut [Option<Option<Filled>>],
        diags: &mut Vec<Diagnostic>,
    ) {
        let range = self.range;
        let taking: Vec<Taking<'_>> = services
            .iter()
            .enumerate()
            .filter_map(|(index, svc)| {
                filled.get(index)?.as_ref()?.as_ref()?;
                let spec = svc.obj.spec.as_ref()?;
                let allocates = match spec.type_.as_deref() {
                    Some("NodePort") => true,
                    Some("LoadBalancer") => spec.allocate_load_balancer_node_ports() != Some(false),
                    _ => return None,
                };
                Some(Taking {
                    index,
                    who: (namespace_of(&svc.obj.metadata), name_of(&svc.obj.metadata)),
                    ports: spec.ports.as_deref().unwrap_or_default(),
                    allocates,
                })
            })
            .collect();
        // Ports still asking keep what they were handed.
        let asking: HashSet<(&str, &str, &str)> = taking
            .iter()
            .filter(|t| t.allocates)
            .flat_map(|t| {
                t.ports
                    .iter()
                    .filter(|p| node_port(p) == 0)
                    .map(|p| (t.who.0, t.who.1, p.name.as_deref().unwrap_or_default()))
            })
            .collect();
        let held = self
            .assigned
            .iter()
            .filter(|(k, _)| asking.contains(&(k.0.as_str(), k.1.as_str(), k.2.as_str())))
            .map(|(k, port)| (*port, (k.0.as_str(), k.1.as_str())));
        let mut round = self.holders.round(held);
        let mut changes: Vec<(usize, usize, i32)> = Vec::new();
        let refuse = |diags: &mut Vec<Diagnostic>, t: &Taking<'_>, j: usize, message: String| {
            diags.push(diag(
                services[t.index].source.clone(),
                format!("Service {}/{}", t.who.0, t.who.1),
                format!("spec.ports[{j}].nodePort"),
                format!("{message}; not served on node addresses"),
            ));
        };
        for t in &taking {
            for p in t.ports.iter().map(node_port).filter(|n| range.contains(*n)) {
                round.name(t.index, t.who, p as u16);
            }
        }
        // The nodePorts each Service named and keeps, by service port number.
        let mut kept: Vec<Vec<(i32, u16)>> = vec![Vec::new(); taking.len()];
        for (k, t) in taking.iter().enumerate() {
            for (j, p) in t.ports.iter().enumerate() {
                let n = node_port(p);
                if n == 0 {
                    continue;
                }
                if !range.contains(n) {
                    refuse(
                        diags,
                        t,
                        j,
                        format!(
                            "provided port {n} is not in the valid range. The range of valid ports is {range}"
                        ),
                    );
                    changes.push((t.index, j, 0));
                } else if let Some(h) = round.holder(t.index, t.who, n as u16) {
                    refuse(
                        diags,
                        t,
                        j,
                        format!(
                            "provided port {n} is already allocated to Service {}/{}",
                            h.0, h.1
                        ),
                    );
                    changes.push((t.index, j, 0));
                } else {
                    round.take(n as u16);
                    kept[k].push((p.port, n as u16));
                }
            }
        }
        // Sorted, so new ports are placed in an order independent of files.
        let mut groups: BTreeMap<(&str, &str, i32), Group> = BTreeMap::new();
        for (k, t) in taking.iter().enumerate().filter(|(_, t)| t.allocates) {
            for (j, p) in t.ports.iter().enumerate() {
                if node_port(p) != 0 {
                    continue;
                }
                // The nodePort another port of the same number names.
                if let Some((_, n)) = kept[k].iter().find(|(port, _)| *port == p.port) {
                    changes.push((t.index, j, i32::from(*n)));
                    continue;
                }
                groups
                    .entry((t.who.0, t.who.1, p.port))
                    .or_insert_with(|| Group {
                        taker: k,
                        ports: Vec::new(),
                        found: None,
                    })
                    .ports
                    .push((j, p.name.clone().unwrap_or_default()));
            }
        }
        // Previous allocations first, so they survive new ports that hash
        // onto them.
        for ((ns, name, _), group) in &mut groups {
            group.found = group.ports.iter().find_map(|(_, port_name)| {
                let key = ((*ns).to_owned(), (*name).to_owned(), port_name.clone());
                self.assigned
                    .get(&key)
                    .copied()
                    .filter(|p| range.contains(i32::from(*p)) && round.take(*p))
            });
        }
        let mut assigned = BTreeMap::new();
        let mut full = false;
        for ((ns, name, _), mut group) in groups {
            if group.found.is_none() && !full {
                let first = &group.ports[0].1;
                let start = u128::from(fnv1a(format!("{ns}/{name}/{first}").as_bytes()));
                group.found = round.probe(start % range.size(), range.size(), |k| {
                    u16::try_from(u128::from(range.first) + k).ok()
                });
                full = group.found.is_none();
            }
            let t = &taking[group.taker];
            for (j, port_name) in &group.ports {
                match group.found {
                    Some(p) => {
                        changes.push((t.index, *j, i32::from(p)));
                        assigned
                            .insert(((*ns).to_owned(), (*name).to_owned(), port_name.clone()), p);
                    }
                    None => {
                        refuse(diags, t, *j, format!("range {range} has no free port"));
                        changes.push((t.index, *j, 0));
                    }
                }
            }
        }
        drop(round);
        // Who holds what now: every port named and kept, or handed out.
        let held_now: Vec<(u16, u64)> = taking
            .iter()
            .zip(&kept)
            .flat_map(|(t, kept)| {
                let id = holder_id(t.who.0, t.who.1);
                kept.iter().map(move |(_, p)| (*p, id))
            })
            .chain(
                assigned
                    .iter()
                    .map(|((ns, name, _), p)| (*p, holder_id(ns, name))),
            )
            .collect();
        self.holders.record(held_now);
        self.assigned = assigned;
        for (index, j, port) in changes {
            if let Some(Some(Some(f))) = filled.get_mut(index) {
                f.node_ports.push((j, port));
            }
        }
    }
}
