//! The API server's validation, for the fields the agent uses. An object
//! from a file that a real API server would have refused is reported (file,
//! object, field) and skipped whole, as `kubectl apply` would have failed;
//! the translation then only ever sees objects a cluster could hold.
use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

/// `maxEndpoints` and `maxPorts` of `discovery.k8s.io/v1` validation.
pub const MAX_SLICE_ENDPOINTS: usize = 1000;
pub const MAX_SLICE_PORTS: usize = 100;
/// Addresses per endpoint (`maxAddresses`).
pub const MAX_ENDPOINT_ADDRESSES: usize = 100;

/// The first problem found: (field, message).
pub type Invalid = (String, String);

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    (field.into(), message.into())
}

pub fn service(svc: &Service) -> Result<(), Invalid> {
    // Service names are DNS-1035 labels (they become DNS names and env vars).
    name(&svc.metadata, dns1035_label)?;
    let Some(spec) = &svc.spec else {
        return Ok(());
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut seen_names = BTreeSet::new();
    let mut seen_ports = BTreeSet::new();
    let mut seen_node_ports = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let at = |f: &str| format!("spec.ports[{i}]{f}");
        let port_name = p.name.as_deref().unwrap_or_default();
        if ports.len() > 1 && port_name.is_empty() {
            return Err(invalid(
                at(".name"),
                "required when the Service has more than one port",
            ));
        }
        if !port_name.is_empty() {
            dns1123_label(port_name).map_err(|m| invalid(at(".name"), m))?;
            if !seen_names.insert(port_name) {
                return Err(invalid(
                    at(".name"),
                    format!("duplicate port name {port_name:?}"),
                ));
            }
        }
        port_number(p.port).map_err(|m| invalid(at(".port"), m))?;
        let proto = protocol(p.protocol.as_deref()).map_err(|m| invalid(at(".protocol"), m))?;
        if !seen_ports.insert((p.port, proto)) {
            return Err(invalid(
                at(""),
                format!("duplicate port {}/{proto}", p.port),
            ));
        }
        match &p.target_port {
            None | Some(IntOrString::Int(0)) => {}
            Some(IntOrString::Int(n)) => {
                port_number(*n).map_err(|m| invalid(at(".targetPort"), m))?;
            }
            Some(IntOrString::String(s)) => {
                iana_svc_name(s).map_err(|m| invalid(at(".targetPort"), m))?;
            }
        }
        if let Some(n) = p.node_port.filter(|n| *n != 0) {
            port_number(n).map_err(|m| invalid(at(".nodePort"), m))?;
            // One nodePort may serve a TCP and a UDP port, not two of one protocol.
            if !seen_node_ports.insert((n, proto)) {
                return Err(invalid(
                    at(".nodePort"),
                    format!("duplicate nodePort {n}/{proto}"),
                ));
            }
        }
    }
    Ok(())
}

pub fn endpoint_slice(slice: &EndpointSlice) -> Result<(), Invalid> {
    name(&slice.metadata, dns1123_subdomain)?;
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(false),
        "IPv6" => Some(true),
        "FQDN" => None,
        other => {
            return Err(invalid(
                "addressType",
                format!("{other:?} is not one of IPv4, IPv6, FQDN"),
            ));
        }
    };
    if slice.endpoints.len() > MAX_SLICE_ENDPOINTS {
        return Err(invalid(
            "endpoints",
            format!(
                "{} endpoints; an EndpointSlice holds at most {MAX_SLICE_ENDPOINTS} (split them over several slices)",
                slice.endpoints.len()
            ),
        ));
    }
    for (i, ep) in slice.endpoints.iter().enumerate() {
        // Named only when reported: slices are most of a directory's objects.
        let field = || format!("endpoints[{i}].addresses");
        if ep.addresses.is_empty() || ep.addresses.len() > MAX_ENDPOINT_ADDRESSES {
            return Err(invalid(
                field(),
                format!(
                    "{} addresses; an endpoint has 1 to {MAX_ENDPOINT_ADDRESSES}",
                    ep.addresses.len()
                ),
            ));
        }
        let Some(v6) = family else { continue };
        for (j, a) in ep.addresses.iter().enumerate() {
            let ok = match a.parse::<IpAddr>() {
                Ok(IpAddr::V4(_)) => !v6,
                Ok(IpAddr::V6(ip)) => v6 && ip.to_ipv4_mapped().is_none(),
                Err(_) => false,
            };
            if !ok {
                return Err(invalid(
                    format!("{}[{j}]", field()),
                    format!("{a:?} is not an {} address", slice.address_type.as_str()),
                ));
            }
        }
    }
    let ports = slice.ports.as_deref().unwrap_or_default();
    if ports.len() > MAX_SLICE_PORTS {
        return Err(invalid(
            "ports",
            format!(
                "{} ports; an EndpointSlice holds at most {MAX_SLICE_PORTS}",
                ports.len()
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let at = |f: &str| format!("ports[{i}]{f}");
        let port_name = p.name.as_deref().unwrap_or_default();
        if !port_name.is_empty() {
            dns1123_label(port_name).map_err(|m| invalid(at(".name"), m))?;
        }
        if !seen.insert(port_name) {
            return Err(invalid(
                at(".name"),
                format!("duplicate port name {port_name:?}"),
            ));
        }
        if let Some(n) = p.port {
            port_number(n).map_err(|m| invalid(at(".port"), m))?;
        }
        protocol(p.protocol.as_deref()).map_err(|m| invalid(at(".protocol"), m))?;
    }
    Ok(())
}

pub fn endpoints(ep: &Endpoints) -> Result<(), Invalid> {
    name(&ep.metadata, dns1123_subdomain)?;
    for (i, subset) in ep.subsets.iter().flatten().enumerate() {
        for (j, p) in subset.ports.iter().flatten().enumerate() {
            let at = |f: &str| format!("subsets[{i}].ports[{j}]{f}");
            port_number(p.port).map_err(|m| invalid(at(".port"), m))?;
            protocol(p.protocol.as_deref()).map_err(|m| invalid(at(".protocol"), m))?;
        }
    }
    Ok(())
}

pub fn pod(pod: &Pod) -> Result<(), Invalid> {
    name(&pod.metadata, dns1123_subdomain)?;
    let Some(spec) = &pod.spec else {
        return Ok(());
    };
    let containers = spec.containers.iter().map(|c| ("containers", c)).chain(
        spec.init_containers
            .iter()
            .flatten()
            .map(|c| ("initContainers", c)),
    );
    let mut counters = std::collections::BTreeMap::<&str, usize>::new();
    for (list, c) in containers {
        let i = counters.entry(list).or_default();
        for (j, p) in c.ports.iter().flatten().enumerate() {
            let at = |f: &str| format!("spec.{list}[{i}].ports[{j}]{f}");
            port_number(p.container_port).map_err(|m| invalid(at(".containerPort"), m))?;
            if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
                iana_svc_name(n).map_err(|m| invalid(at(".name"), m))?;
            }
            protocol(p.protocol.as_deref()).map_err(|m| invalid(at(".protocol"), m))?;
        }
        *i += 1;
    }
    Ok(())
}

fn name(meta: &ObjectMeta, check: fn(&str) -> Result<(), String>) -> Result<(), Invalid> {
    if let Some(ns) = meta.namespace.as_deref().filter(|n| !n.is_empty()) {
        dns1123_label(ns).map_err(|m| invalid("metadata.namespace", m))?;
    }
    if let Some(n) = meta.name.as_deref().filter(|n| !n.is_empty()) {
        check(n).map_err(|m| invalid("metadata.name", m))?;
    }
    Ok(())
}

fn port_number(n: i32) -> Result<(), String> {
    if (1..=65535).contains(&n) {
        Ok(())
    } else {
        Err(format!("{n} is not between 1 and 65535"))
    }
}

fn protocol(p: Option<&str>) -> Result<&str, String> {
    match p.unwrap_or("TCP") {
        p @ ("TCP" | "UDP" | "SCTP") => Ok(p),
        other => Err(format!("{other:?} is not one of TCP, UDP, SCTP")),
    }
}

fn is_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// RFC 1123 label: lower-case alphanumerics and '-', alphanumeric at both
/// ends, at most 63 characters.
fn dns1123_label(s: &str) -> Result<(), String> {
    let ok = s.len() <= 63
        && s.chars().all(|c| is_alnum(c) || c == '-')
        && s.starts_with(is_alnum)
        && s.ends_with(is_alnum);
    ok.then_some(()).ok_or_else(|| {
        format!("{s:?} is not a DNS-1123 label (lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)")
    })
}

/// RFC 1035 label: a DNS-1123 label that starts with a letter.
fn dns1035_label(s: &str) -> Result<(), String> {
    let ok = dns1123_label(s).is_ok() && s.starts_with(|c: char| c.is_ascii_lowercase());
    ok.then_some(()).ok_or_else(|| {
        format!("{s:?} is not a DNS-1035 label (lower-case letters, digits and '-', starting with a letter, ending with a letter or digit, at most 63 characters)")
    })
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
fn dns1123_subdomain(s: &str) -> Result<(), String> {
    let ok = s.len() <= 253 && s.split('.').all(|l| dns1123_label(l).is_ok());
    ok.then_some(()).ok_or_else(|| {
        format!("{s:?} is not a DNS-1123 subdomain (dot-separated DNS-1123 labels, at most 253 characters)")
    })
}

/// IANA service name (a named port): at most 15 lower-case alphanumerics
/// and '-', at least one letter, no '-' at either end or twice in a row.
fn iana_svc_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.chars().all(|c| is_alnum(c) || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    ok.then_some(()).ok_or_else(|| {
        format!("{s:?} is not a valid port name (at most 15 lower-case letters, digits and '-', with at least one letter)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_formats() {
        assert!(dns1123_label("web-1").is_ok());
        assert!(dns1123_label("Web").is_err());
        assert!(dns1123_label("-web").is_err());
        assert!(dns1123_label(&"a".repeat(64)).is_err());
        assert!(dns1035_label("1web").is_err());
        assert!(dns1035_label("web1").is_ok());
        assert!(dns1123_subdomain("a.b-c.d").is_ok());
        assert!(dns1123_subdomain("a..b").is_err());
        assert!(iana_svc_name("http").is_ok());
        assert!(iana_svc_name("8080").is_err());
        assert!(iana_svc_name("a--b").is_err());
        assert!(iana_svc_name("sixteen-chars-xx").is_err());
    }
}
