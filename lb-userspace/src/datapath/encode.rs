//! Conversions between model types and map bytes (network byte order).
//! IPv4 addresses are stored IPv4-mapped (see `lb_common::Addr`).
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use lb_common::{
    Addr, Backend, META_NAME_LEN, META_PORT_NAME_LEN, SVC_TYPE_CLUSTER_IP, SVC_TYPE_LOAD_BALANCER,
    SVC_TYPE_NODE_PORT, ServiceKey, ServiceMeta,
};

use crate::model::{Frontend, FrontendKind, Proto, ServiceRef, ServiceType};

/// The 16-byte map form of an address: IPv4 as `::ffff:a.b.c.d`.
pub fn ip_be(ip: IpAddr) -> Addr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The model form: an IPv4-mapped address is IPv4 again (the maps never
/// hold an IPv6 service or backend at a mapped address).
pub fn ip_from_be(raw: &Addr) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in raw.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn port_be(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

fn port_from_be(raw: u16) -> u16 {
    u16::from_be_bytes(raw.to_ne_bytes())
}

pub fn frontend_key(fe: &Frontend) -> ServiceKey {
    ServiceKey::new(
        ip_be(fe.addr.ip()),
        port_be(fe.addr.port()),
        fe.proto.number(),
    )
}

/// `None` for a protocol this agent never writes.
pub fn key_frontend(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        addr: SocketAddr::new(ip_from_be(&key.addr), port_from_be(key.port)),
        proto: Proto::from_number(key.proto)?,
    })
}

pub fn encode_backend(addr: SocketAddr, proto: Proto) -> Backend {
    Backend {
        addr: ip_be(addr.ip()),
        port: port_be(addr.port()),
        proto: proto.number(),
        _pad: 0,
    }
}

pub fn backend_addr(b: &Backend) -> SocketAddr {
    SocketAddr::new(ip_from_be(&b.addr), port_from_be(b.port))
}

fn put_str<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    // Kubernetes names are ASCII DNS labels; truncate on a char boundary anyway.
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

fn get_str(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// `_fe`: the frontend is the key of the entry this describes, not repeated.
pub fn encode_meta(_fe: &Frontend, svc: &ServiceRef) -> ServiceMeta {
    ServiceMeta {
        namespace: put_str::<META_NAME_LEN>(&svc.namespace),
        name: put_str::<META_NAME_LEN>(&svc.name),
        port_name: put_str::<META_PORT_NAME_LEN>(&svc.port_name),
        svc_type: match svc.svc_type {
            ServiceType::ClusterIP => SVC_TYPE_CLUSTER_IP,
            ServiceType::NodePort => SVC_TYPE_NODE_PORT,
            ServiceType::LoadBalancer => SVC_TYPE_LOAD_BALANCER,
        } | match svc.frontend {
            FrontendKind::ClusterIP => 0,
            FrontendKind::NodePort => lb_common::SVC_FRONTEND_NODE_PORT,
            FrontendKind::ExternalIP => lb_common::SVC_FRONTEND_EXTERNAL_IP,
            FrontendKind::LoadBalancer => lb_common::SVC_FRONTEND_LOAD_BALANCER,
        },
    }
}

pub fn decode_meta(meta: &ServiceMeta) -> ServiceRef {
    ServiceRef {
        namespace: get_str(&meta.namespace).into(),
        name: get_str(&meta.name).into(),
        port_name: get_str(&meta.port_name).into(),
        svc_type: match meta.svc_type & lb_common::SVC_TYPE_MASK {
            SVC_TYPE_NODE_PORT => ServiceType::NodePort,
            SVC_TYPE_LOAD_BALANCER => ServiceType::LoadBalancer,
            _ => ServiceType::ClusterIP,
        },
        frontend: match meta.svc_type & lb_common::SVC_FRONTEND_MASK {
            lb_common::SVC_FRONTEND_NODE_PORT => FrontendKind::NodePort,
            lb_common::SVC_FRONTEND_EXTERNAL_IP => FrontendKind::ExternalIP,
            lb_common::SVC_FRONTEND_LOAD_BALANCER => FrontendKind::LoadBalancer,
            _ => FrontendKind::ClusterIP,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::frontend;

    #[test]
    fn key_is_network_order_and_round_trips() {
        let fe = frontend(Ipv4Addr::new(10, 96, 0, 10), 80, Proto::Tcp);
        let key = frontend_key(&fe);
        assert_eq!(
            key.addr,
            lb_common::v4_mapped(u32::from_ne_bytes([10, 96, 0, 10]))
        );
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!(key_frontend(&key), Some(fe));
    }

    #[test]
    fn ipv6_key_is_the_sockaddr_in6_layout() {
        let ip: Ipv6Addr = "fd00:96::a".parse().unwrap();
        let fe = frontend(ip, 53, Proto::Udp);
        let key = frontend_key(&fe);
        let bytes: Vec<u8> = key.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, ip.octets());
        assert_eq!(key_frontend(&key), Some(fe));
        let be = encode_backend("[fd00:244::5]:5353".parse().unwrap(), Proto::Udp);
        assert_eq!(backend_addr(&be), "[fd00:244::5]:5353".parse().unwrap());
    }

    #[test]
    fn loopback_frontends_are_recognised_in_map_form() {
        for (ip, loopback) in [
            ("127.0.0.1", true),
            ("127.3.2.1", true),
            ("::1", true),
            ("10.0.0.1", false),
            ("1.0.0.127", false),
            ("128.0.0.1", false),
            ("::2", false),
            ("fd00::1", false),
        ] {
            let addr = ip_be(ip.parse().unwrap());
            assert_eq!(lb_common::is_loopback(&addr), loopback, "{ip}");
        }
    }

    #[test]
    fn meta_round_trips() {
        let fe = frontend(Ipv4Addr::new(10, 96, 0, 10), 53, Proto::Udp);
        let svc = ServiceRef {
            namespace: "kube-system".into(),
            name: "kube-dns".into(),
            port_name: "dns".into(),
            svc_type: ServiceType::NodePort,
            frontend: FrontendKind::ClusterIP,
        };
        assert_eq!(decode_meta(&encode_meta(&fe, &svc)), svc);
        let node = ServiceRef {
            svc_type: ServiceType::LoadBalancer,
            frontend: FrontendKind::NodePort,
            ..svc
        };
        assert_eq!(decode_meta(&encode_meta(&fe, &node)), node);
        for frontend in [FrontendKind::ExternalIP, FrontendKind::LoadBalancer] {
            let external = ServiceRef {
                frontend,
                ..node.clone()
            };
            assert_eq!(decode_meta(&encode_meta(&fe, &external)), external);
        }
        // A record written before frontends had kinds.
        let mut old = encode_meta(&fe, &node);
        old.svc_type = SVC_TYPE_LOAD_BALANCER;
        assert_eq!(decode_meta(&old).frontend, FrontendKind::ClusterIP);
    }
}
