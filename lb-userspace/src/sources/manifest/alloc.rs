//! ClusterIP allocation, the API server's job when there is no API server.
use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::core::v1::Service;

use super::{ClusterIpAllocator, ServiceCidr, Sourced, diag, fnv1a, name_of, namespace_of};
use crate::model::Diagnostic;

pub(super) fn parse_cidr(s: &str) -> Result<ServiceCidr, String> {
    let s = s.trim();
    let Some((addr, len)) = s.split_once('/') else {
        return Err(format!("{s:?}: expected an IPv4 CIDR such as 10.96.0.0/12"));
    };
    let network: Ipv4Addr = match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip,
        Ok(IpAddr::V6(_)) => {
            return Err(format!("{s}: only IPv4 service CIDRs are supported"));
        }
        Err(_) => return Err(format!("{s}: {addr:?} is not an IPv4 address")),
    };
    let prefix_len: u8 = len
        .parse()
        .map_err(|_| format!("{s}: prefix length {len:?} is not a number"))?;
    if !(8..=30).contains(&prefix_len) {
        return Err(format!(
            "{s}: prefix length must be between 8 and 30 (a /31 or /32 leaves no address to allocate)"
        ));
    }
    let mask = u32::MAX << (32 - u32::from(prefix_len));
    let bits = u32::from(network);
    if bits & !mask != 0 {
        return Err(format!(
            "{s}: host bits set; did you mean {}/{prefix_len}?",
            Ipv4Addr::from(bits & mask)
        ));
    }
    Ok(ServiceCidr {
        network,
        prefix_len,
    })
}

impl ServiceCidr {
    /// The network address, the broadcast address and the first host (which
    /// Kubernetes gives `default/kubernetes`) are never handed out by hash.
    fn usable(self) -> (u32, u32) {
        let base = u32::from(self.network);
        let size = 1u64 << (32 - u32::from(self.prefix_len));
        // prefix_len ≤ 30, so size ≥ 4 and at least one address is usable.
        let count = u32::try_from(size - 3).unwrap_or(u32::MAX);
        (base.wrapping_add(2), count)
    }

    fn first_host(self) -> u32 {
        u32::from(self.network).wrapping_add(1)
    }

    fn is_usable(self, ip: u32) -> bool {
        let (first, count) = self.usable();
        ip.wrapping_sub(first) < count
    }
}

impl ClusterIpAllocator {
    /// Fills in missing ClusterIPs. Returns, per service, whether to keep it
    /// (false only when the CIDR is full).
    pub(super) fn allocate(
        &mut self,
        services: &mut [Sourced<Service>],
        diags: &mut Vec<Diagnostic>,
    ) -> Vec<bool> {
        let mut keep = vec![true; services.len()];
        let mut taken: HashSet<u32> = HashSet::new();
        // Sorted, so new services are placed in an order independent of files.
        let mut needing: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (i, svc) in services.iter_mut().enumerate() {
            let key = (
                namespace_of(&svc.obj.metadata).to_owned(),
                name_of(&svc.obj.metadata).to_owned(),
            );
            let Some(spec) = svc.obj.spec.as_mut() else {
                continue;
            };
            if spec.type_.as_deref() == Some("ExternalName") {
                continue;
            }
            let ip = spec.cluster_ip.as_deref().unwrap_or_default();
            let ips = spec.cluster_ips.as_deref().unwrap_or_default();
            if ip == "None" {
                continue;
            }
            if ip.is_empty() && ips.is_empty() {
                needing.insert(key, i);
                continue;
            }
            // API server defaulting: clusterIP and clusterIPs[0] agree.
            if ip.is_empty() {
                spec.cluster_ip = ips.first().cloned();
            } else if ips.is_empty() {
                spec.cluster_ips = Some(vec![ip.to_owned()]);
            }
            let explicit = spec
                .cluster_ip
                .iter()
                .chain(spec.cluster_ips.iter().flatten());
            for ip in explicit {
                if let Ok(ip) = ip.parse::<Ipv4Addr>() {
                    taken.insert(u32::from(ip));
                }
            }
        }

        let mut assigned = BTreeMap::new();
        let mut fresh = Vec::new();
        for (key, i) in needing {
            match self.assigned.get(&key) {
                Some(&prev)
                    if self.cidr.is_usable(u32::from(prev)) && taken.insert(u32::from(prev)) =>
                {
                    assigned.insert(key, (prev, i));
                }
                _ => fresh.push((key, i)),
            }
        }

        let (first, count) = self.cidr.usable();
        let mut full = false;
        for (key, i) in fresh {
            let (ns, name) = &key;
            let mut found = None;
            if ns == "default" && name == "kubernetes" && taken.insert(self.cidr.first_host()) {
                found = Some(self.cidr.first_host());
            }
            if found.is_none() && !full {
                let start = fnv1a(format!("{ns}/{name}").as_bytes()) % u64::from(count);
                // `start < count`, so it fits.
                let start = u32::try_from(start).unwrap_or(0);
                found = (0..count)
                    .map(|k| first.wrapping_add((start.wrapping_add(k)) % count))
                    .find(|&ip| taken.insert(ip));
                full = found.is_none();
            }
            match found {
                Some(ip) => {
                    assigned.insert(key, (Ipv4Addr::from(ip), i));
                }
                None => {
                    keep[i] = false;
                    diags.push(diag(
                        services[i].source.clone(),
                        format!("Service {ns}/{name}"),
                        "spec.clusterIP",
                        format!(
                            "service CIDR {} has no free address; the service is ignored",
                            self.cidr
                        ),
                    ));
                }
            }
        }

        self.assigned = BTreeMap::new();
        for (key, (ip, i)) in assigned {
            if let Some(spec) = services[i].obj.spec.as_mut() {
                spec.cluster_ip = Some(ip.to_string());
                spec.cluster_ips = Some(vec![ip.to_string()]);
            }
            self.assigned.insert(key, ip);
        }
        keep
    }
}
