//! This node's addresses when `--node-ip` is not given: where NodePorts are
//! served and which external IPs a Service may claim. The manifest source
//! takes the host network namespace's interface addresses once at start;
//! the API source watches this node's Node object
//! ([`crate::sources::kube::watch_node_addresses`]).
use std::net::IpAddr;

use k8s_openapi::api::core::v1::NodeAddress;

/// Whether clients can reach the node at `ip` from another network
/// namespace: not loopback (`127.0.0.1:nodePort` is another matter), not
/// link-local (the same on every node and interface), not unspecified or
/// multicast.
pub fn usable(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        })
}

/// The usable addresses of `found`, in canonical form (a v4-mapped address
/// would alias an IPv4 frontend in the maps), each once, in the order found.
pub fn choose<T>(found: impl IntoIterator<Item = (T, IpAddr)>) -> Vec<(T, IpAddr)> {
    let mut out: Vec<(T, IpAddr)> = Vec::new();
    for (what, ip) in found {
        let ip = ip.to_canonical();
        if usable(ip) && !out.iter().any(|(_, a)| *a == ip) {
            out.push((what, ip));
        }
    }
    out
}

/// The usable addresses of this network namespace's interfaces, with the
/// interface each is on.
pub fn from_interfaces() -> nix::Result<Vec<(String, IpAddr)>> {
    let found = nix::ifaddrs::getifaddrs()?.filter_map(|a| {
        let addr = a.address?;
        let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (None, Some(v6)) => IpAddr::V6(v6.ip()),
            (None, None) => return None,
        };
        Some((a.interface_name, ip))
    });
    Ok(choose(found))
}

/// What a Node's `status.addresses` give: the `InternalIP` and `ExternalIP`
/// entries that are usable addresses (with their type), and the text of
/// those that are not addresses at all, for a warning.
pub fn from_node_status(addresses: &[NodeAddress]) -> (Vec<(String, IpAddr)>, Vec<String>) {
    let mut bad = Vec::new();
    let found = addresses
        .iter()
        .filter(|a| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"))
        .filter_map(|a| match a.address.parse::<IpAddr>() {
            Ok(ip) => Some((a.type_.clone(), ip)),
            Err(_) => {
                bad.push(a.address.clone());
                None
            }
        });
    (choose(found), bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_link_local_and_duplicates_are_left_out() {
        let found = [
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("eth0", "192.168.0.10"),
            ("eth0", "fe80::1"),
            ("eth0", "2001:db8::10"),
            ("eth1", "169.254.3.4"),
            ("eth1", "::ffff:10.0.0.5"),
            ("br0", "10.0.0.5"),
            ("dummy", "0.0.0.0"),
        ]
        .map(|(i, a)| (i, ip(a)));
        assert_eq!(
            choose(found),
            [
                ("eth0", ip("192.168.0.10")),
                ("eth0", ip("2001:db8::10")),
                ("eth1", ip("10.0.0.5")),
            ]
        );
    }

    #[test]
    fn a_node_gives_its_internal_and_external_ips() {
        let addr = |t: &str, a: &str| NodeAddress {
            type_: t.into(),
            address: a.into(),
        };
        let (ips, bad) = from_node_status(&[
            addr("Hostname", "node-a"),
            addr("InternalIP", "10.0.0.5"),
            addr("InternalIP", "fd00::5"),
            addr("ExternalIP", "203.0.113.5"),
            addr("ExternalIP", "not-an-ip"),
            addr("InternalDNS", "node-a.internal"),
            addr("ExternalIP", "10.0.0.5"),
        ]);
        assert_eq!(
            ips,
            [
                ("InternalIP".to_owned(), ip("10.0.0.5")),
                ("InternalIP".to_owned(), ip("fd00::5")),
                ("ExternalIP".to_owned(), ip("203.0.113.5")),
            ]
        );
        assert_eq!(bad, ["not-an-ip"]);
    }
}
