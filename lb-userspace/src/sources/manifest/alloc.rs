//! ClusterIP allocation and IP-family defaulting, the API server's job when
//! there is no API server. The rules are kube-apiserver's
//! (`pkg/registry/core/service/storage/alloc.go` `initIPFamilyFields` and
//! `ValidateServiceClusterIPsRelatedFields`), with two leniencies kept from
//! before dual-stack: `clusterIPs` without `clusterIP` is accepted (the
//! first becomes `clusterIP`), and a given address outside `--service-cidr`
//! is used as written (manifests copied from a cluster with another range).
use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::slim::{SlimService, SlimServiceSpec};

use super::{
    CidrRange, ClusterIpAllocator, FamilyIps, IpFamily, ServiceCidr, ServiceCidrError, Sourced,
    claims::{Round, holder_id},
    diag, fnv1a, name_of, namespace_of,
};
use crate::model::Diagnostic;

/// One `--service-cidr` value: one range, or two of different families.
pub(super) fn parse_cidrs(s: &str) -> Result<ServiceCidr, ServiceCidrError> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    match parts.as_slice() {
        [""] => Err(ServiceCidrError::Empty),
        [one] => Ok(ServiceCidr {
            primary: parse_range(one)?,
            secondary: None,
        }),
        [first, second] => {
            let (primary, secondary) = (parse_range(first)?, parse_range(second)?);
            if primary.family() == secondary.family() {
                return Err(ServiceCidrError::SameFamily {
                    first: primary.to_string(),
                    second: secondary.to_string(),
                    family: primary.family(),
                });
            }
            Ok(ServiceCidr {
                primary,
                secondary: Some(secondary),
            })
        }
        _ => Err(ServiceCidrError::TooMany(s.trim().to_owned())),
    }
}

/// One family's range. IPv4: /8 to /30 (the network, the first host and the
/// broadcast address are never handed out by hash). IPv6: /64 to /126 (the
/// network address and the first host are not).
pub(super) fn parse_range(s: &str) -> Result<CidrRange, ServiceCidrError> {
    let s = s.trim();
    let Some((addr, len)) = s.split_once('/') else {
        return Err(ServiceCidrError::NoPrefix(s.to_owned()));
    };
    let network: IpAddr = addr.parse().map_err(|_| ServiceCidrError::BadAddress {
        cidr: s.to_owned(),
        addr: addr.to_owned(),
    })?;
    if let IpAddr::V6(v6) = network
        && v6.to_ipv4_mapped().is_some()
    {
        return Err(ServiceCidrError::Mapped(s.to_owned()));
    }
    let prefix_len: u8 = len.parse().map_err(|_| ServiceCidrError::BadPrefix {
        cidr: s.to_owned(),
        len: len.to_owned(),
    })?;
    let family = IpFamily::of(network);
    let (min, max) = match family {
        IpFamily::V4 => (8, 30),
        IpFamily::V6 => (64, 126),
    };
    if !(min..=max).contains(&prefix_len) {
        return Err(ServiceCidrError::PrefixRange {
            cidr: s.to_owned(),
            family,
            min,
            max,
            why: if prefix_len > max {
                " (a longer one leaves no address to allocate)"
            } else {
                ""
            },
        });
    }
    let range = CidrRange {
        network,
        prefix_len,
    };
    let bits = to_bits(network);
    let base = bits & !(range.size() - 1);
    if base != bits {
        let suggestion = CidrRange {
            network: range.nth(base).unwrap_or(network),
            prefix_len,
        };
        return Err(ServiceCidrError::HostBits {
            cidr: s.to_owned(),
            suggestion: suggestion.to_string(),
        });
    }
    Ok(range)
}

fn to_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl CidrRange {
    fn width(self) -> u32 {
        match self.family() {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }

    /// Addresses in the range; at most 2^64 (an IPv6 /64), so it fits.
    fn size(self) -> u128 {
        1u128 << (self.width() - u32::from(self.prefix_len))
    }

    /// The first address handed out by hash and how many there are: not
    /// the network address, not the first host (Kubernetes gives it to
    /// `default/kubernetes`), and for IPv4 not the broadcast address. The
    /// prefix limits leave at least one.
    fn usable(self) -> (u128, u128) {
        let reserved = match self.family() {
            IpFamily::V4 => 3,
            IpFamily::V6 => 2,
        };
        (to_bits(self.network) + 2, self.size() - reserved)
    }

    fn first_host(self) -> u128 {
        to_bits(self.network) + 1
    }

    /// `bits` as an address of this range's family; `None` if it does not
    /// fit (never for bits computed inside the range).
    fn nth(self, bits: u128) -> Option<IpAddr> {
        match self.family() {
            IpFamily::V4 => u32::try_from(bits).ok().map(|b| Ipv4Addr::from(b).into()),
            IpFamily::V6 => Some(Ipv6Addr::from(bits).into()),
        }
    }

    /// Whether the hash could have handed out `ip`.
    pub(super) fn is_usable(self, ip: IpAddr) -> bool {
        if IpFamily::of(ip) != self.family() {
            return false;
        }
        let (first, count) = self.usable();
        to_bits(ip)
            .checked_sub(first)
            .is_some_and(|off| off < count)
    }
}

/// `spec.ipFamilyPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Single,
    PreferDual,
    RequireDual,
}

impl Policy {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "SingleStack" => Some(Policy::Single),
            "PreferDualStack" => Some(Policy::PreferDual),
            "RequireDualStack" => Some(Policy::RequireDual),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Policy::Single => "SingleStack",
            Policy::PreferDual => "PreferDualStack",
            Policy::RequireDual => "RequireDualStack",
        }
    }
}

/// What the API server fills in on a created Service (not ExternalName):
/// kept beside the cached Service, which is shared, not copied to hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Filled {
    /// `spec.ipFamilyPolicy`.
    pub policy: &'static str,
    /// `spec.ipFamilies`, primary first.
    pub families: Vec<IpFamily>,
    /// `spec.clusterIPs` (`["None"]` for a headless Service), as written
    /// where given; `spec.clusterIP` is the first.
    pub cluster_ips: Vec<String>,
    /// `spec.ports[i].nodePort` where the nodePort allocator changed it:
    /// (i, the port it handed out, or 0 where it refused the one written).
    pub node_ports: Vec<(usize, i32)>,
}

/// What the API server decided for one service.
#[derive(Debug)]
struct Plan {
    policy: Policy,
    /// Primary first.
    families: Vec<IpFamily>,
    /// The given ClusterIPs, one per family in `families` order; the rest
    /// are allocated. Always empty for headless services.
    given: Vec<(IpAddr, String)>,
    headless: bool,
}

/// A rejected field: (path, message).
type Problem = (String, String);

fn problem(field: impl Into<String>, message: impl Into<String>) -> Problem {
    (field.into(), message.into())
}

/// kube-apiserver's IP-family defaulting and validation for a created
/// Service (not ExternalName). Every problem names its field.
fn plan(spec: &SlimServiceSpec, cidr: &ServiceCidr) -> Result<Plan, Vec<Problem>> {
    let mut problems = Vec::new();
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or_default();
    let listed: &[String] = spec.cluster_ips().unwrap_or_default();
    // The API server copies clusterIP into an empty clusterIPs; errors then
    // name the field the manifest wrote.
    let only_singular = listed.is_empty() && !cluster_ip.is_empty();
    let ips: Vec<&str> = if only_singular {
        vec![cluster_ip]
    } else {
        listed.iter().map(String::as_str).collect()
    };
    let ip_field = |i: usize| {
        if only_singular {
            "spec.clusterIP".to_owned()
        } else {
            format!("spec.clusterIPs[{i}]")
        }
    };
    if !cluster_ip.is_empty()
        && let Some(first) = ips.first()
        && *first != cluster_ip
    {
        problems.push(problem(
            "spec.clusterIPs[0]",
            format!("{first:?} must match spec.clusterIP ({cluster_ip:?})"),
        ));
    }
    let headless = ips.first() == Some(&"None");
    let selectorless = spec.selector.as_ref().is_none_or(BTreeMap::is_empty);

    let policy = match spec.ip_family_policy() {
        None | Some("") if headless && selectorless => Policy::RequireDual,
        None | Some("") => Policy::Single,
        Some(raw) => Policy::parse(raw).unwrap_or_else(|| {
            problems.push(problem(
                "spec.ipFamilyPolicy",
                format!(
                    "unsupported value {raw:?}: supported values are \"SingleStack\", \"PreferDualStack\", \"RequireDualStack\""
                ),
            ));
            Policy::Single
        }),
    };

    let mut families: Vec<IpFamily> = Vec::new();
    for (i, raw) in spec.ip_families().into_iter().flatten().enumerate() {
        let field = format!("spec.ipFamilies[{i}]");
        match IpFamily::parse(raw) {
            None => problems.push(problem(
                field,
                format!("unsupported value {raw:?}: supported values are \"IPv4\", \"IPv6\""),
            )),
            Some(f) if families.contains(&f) => {
                problems.push(problem(field, format!("duplicate value {raw:?}")));
            }
            Some(f) => families.push(f),
        }
    }

    let mut given: Vec<(IpAddr, String)> = Vec::new();
    let mut bad_ip = false;
    for (i, raw) in ips.iter().enumerate() {
        if i == 0 && *raw == "None" {
            if ips.len() > 1 {
                bad_ip = true;
                problems.push(problem(
                    "spec.clusterIPs",
                    "\"None\" must be the first and only value",
                ));
            }
            continue;
        }
        match raw.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => {
                bad_ip = true;
                problems.push(problem(
                    ip_field(i),
                    format!("{raw:?} is an IPv4-mapped IPv6 address; write the IPv4 address"),
                ));
            }
            Ok(ip) => given.push((ip, (*raw).to_owned())),
            Err(_) => {
                bad_ip = true;
                problems.push(problem(
                    ip_field(i),
                    format!("{raw:?} is not a valid IP address"),
                ));
            }
        }
    }
    if ips.len() > 2 {
        problems.push(problem("spec.clusterIPs", "may hold at most 2 values"));
    }
    if bad_ip {
        return Err(problems);
    }
    if let [(a, _), (b, _)] = given.as_slice()
        && IpFamily::of(*a) == IpFamily::of(*b)
    {
        problems.push(problem(
            "spec.clusterIPs",
            "may specify no more than one IP for each IP family",
        ));
    }
    for (i, ((ip, raw), family)) in given.iter().zip(&families).enumerate() {
        if IpFamily::of(*ip) != *family {
            problems.push(problem(
                ip_field(i),
                format!("{raw:?} is not an {family} address, as spec.ipFamilies[{i}] requires"),
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }

    if policy == Policy::Single {
        if given.len() > 1 {
            problems.push(problem(
                "spec.ipFamilyPolicy",
                "must be RequireDualStack or PreferDualStack when two ClusterIPs are given",
            ));
        }
        if families.len() > 1 {
            problems.push(problem(
                "spec.ipFamilyPolicy",
                "must be RequireDualStack or PreferDualStack when two ipFamilies are given",
            ));
        }
    }
    // Families follow the given addresses where ipFamilies says nothing.
    for (i, (ip, _)) in given.iter().enumerate().skip(families.len()) {
        let family = IpFamily::of(*ip);
        if cidr.range(family).is_none() {
            problems.push(problem(
                ip_field(i),
                format!("{family} is not configured on this cluster (--service-cidr {cidr})"),
            ));
        } else {
            families.push(family);
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }

    let other_family = |families: &mut Vec<IpFamily>| {
        if let [only] = families.as_slice() {
            let other = only.other();
            families.push(other);
        }
    };
    // Headless without a selector may name families the cluster lacks: its
    // endpoints are written by hand.
    if headless && selectorless {
        if families.is_empty() {
            families.push(cidr.primary().family());
        }
        if policy != Policy::Single {
            other_family(&mut families);
        }
        return Ok(Plan {
            policy,
            families,
            given: Vec::new(),
            headless,
        });
    }

    if policy == Policy::RequireDual && !cidr.is_dual_stack() {
        problems.push(problem(
            "spec.ipFamilyPolicy",
            format!(
                "RequireDualStack, but this cluster is not configured for dual-stack services (--service-cidr {cidr})"
            ),
        ));
    }
    for (i, family) in families.iter().enumerate() {
        if cidr.range(*family).is_none() {
            problems.push(problem(
                format!("spec.ipFamilies[{i}]"),
                format!("{family} is not configured on this cluster (--service-cidr {cidr})"),
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    if families.is_empty() {
        families.push(cidr.primary().family());
    }
    if policy != Policy::Single && cidr.is_dual_stack() {
        other_family(&mut families);
    }
    Ok(Plan {
        policy,
        families,
        // "None" was never parsed: a headless service has none.
        given,
        headless,
    })
}

/// A service that needs addresses allocated: its index and, per missing
/// position in `families`, the family.
struct Needing {
    index: usize,
    /// (position in clusterIPs, family, address once found).
    slots: Vec<(usize, IpFamily, Option<IpAddr>)>,
}

impl ClusterIpAllocator {
    /// Defaults `ipFamilyPolicy`, `ipFamilies`, `clusterIP` and `clusterIPs`
    /// as the API server would, allocating missing addresses. Returns, per
    /// service, `None` to drop it (invalid family settings, a full range,
    /// an address another Service holds: each with a diagnostic), else what
    /// the API server filled in (`Some(None)`: nothing, an ExternalName
    /// Service). The Services themselves are not changed, so the cache's
    /// copies are shared, never copied.
    pub(super) fn allocate(
        &mut self,
        services: &[Sourced<SlimService>],
        diags: &mut Vec<Diagnostic>,
    ) -> Vec<Option<Option<Filled>>> {
        let mut keep = vec![true; services.len()];
        let mut filled: Vec<Option<Filled>> = vec![None; services.len()];
        // Addresses this allocator handed to services that are still here
        // and still ask for one: as the API server's allocator, a running
        // service keeps its address and a newcomer naming it is refused.
        let asking: HashSet<(&str, &str)> = services
            .iter()
            .filter(|s| {
                s.obj.spec.as_ref().is_some_and(|spec| {
                    spec.cluster_ip.as_deref().is_none_or(str::is_empty)
                        && spec.cluster_ips().is_none_or(<[String]>::is_empty)
                })
            })
            .map(|s| (namespace_of(&s.obj.metadata), name_of(&s.obj.metadata)))
            .collect();
        let held = self
            .assigned
            .iter()
            .filter(|(key, _)| asking.contains(&(key.0.as_str(), key.1.as_str())))
            .flat_map(|(key, ips)| {
                [ips.get(IpFamily::V4), ips.get(IpFamily::V6)]
                    .into_iter()
                    .flatten()
                    .map(|ip| (ip, (key.0.as_str(), key.1.as_str())))
            });
        let mut round = self.holders.round(held);
        // Addresses named by more than one Service: refused whole but for
        // the one that keeps it (`claims`), as the API server refuses to
        // create a Service whose address is taken.
        for (i, svc) in services.iter().enumerate() {
            let key = (namespace_of(&svc.obj.metadata), name_of(&svc.obj.metadata));
            let Some(spec) = svc.obj.spec.as_ref() else {
                continue;
            };
            let Ok(plan) = plan(spec, &self.cidr) else {
                continue;
            };
            for (ip, _) in &plan.given {
                round.name(i, key, *ip);
            }
        }
        // Sorted, so new services are placed in an order independent of files.
        let mut needing: BTreeMap<(String, String), Needing> = BTreeMap::new();
        for (i, svc) in services.iter().enumerate() {
            // Borrowed, as in `named_by`: the services are not changed.
            let key = (namespace_of(&svc.obj.metadata), name_of(&svc.obj.metadata));
            let Some(spec) = svc.obj.spec.as_ref() else {
                continue;
            };
            if spec.type_.as_deref() == Some("ExternalName") {
                continue;
            }
            let plan = match plan(spec, &self.cidr) {
                Ok(plan) => plan,
                Err(problems) => {
                    keep[i] = false;
                    let object = format!("Service {}/{}", key.0, key.1);
                    for (field, message) in problems {
                        diags.push(diag(
                            svc.source.clone(),
                            object.clone(),
                            field,
                            format!("{message}; the service is ignored"),
                        ));
                    }
                    continue;
                }
            };
            // A given address another service holds: allocated to it by
            // this allocator, or named by it first.
            let conflict = plan
                .given
                .iter()
                .enumerate()
                .find_map(|(pos, (ip, _))| Some((pos, ip, round.holder(i, key, *ip)?)));
            if let Some((pos, ip, holder)) = conflict {
                keep[i] = false;
                diags.push(diag(
                    svc.source.clone(),
                    format!("Service {}/{}", key.0, key.1),
                    if pos == 0 {
                        "spec.clusterIP".to_owned()
                    } else {
                        format!("spec.clusterIPs[{pos}]")
                    },
                    format!(
                        "{ip} is already allocated to Service {}/{}; the service is ignored",
                        holder.0, holder.1
                    ),
                ));
                continue;
            }
            let mut fill = Filled {
                policy: plan.policy.as_str(),
                families: plan.families.clone(),
                cluster_ips: Vec::new(),
                node_ports: Vec::new(),
            };
            if plan.headless {
                fill.cluster_ips = vec!["None".to_owned()];
                filled[i] = Some(fill);
                continue;
            }
            fill.cluster_ips = plan.given.iter().map(|(_, raw)| raw.clone()).collect();
            for (ip, _) in &plan.given {
                round.take(*ip);
            }
            filled[i] = Some(fill);
            let slots: Vec<(usize, IpFamily, Option<IpAddr>)> = plan
                .families
                .iter()
                .enumerate()
                .skip(plan.given.len())
                .map(|(pos, family)| (pos, *family, None))
                .collect();
            if !slots.is_empty() {
                needing.insert(
                    (key.0.to_owned(), key.1.to_owned()),
                    Needing { index: i, slots },
                );
            }
        }

        // Previous allocations first, so they survive new services that
        // hash onto them.
        for (key, need) in &mut needing {
            let previous = self.assigned.get(key).copied().unwrap_or_default();
            for (_, family, found) in &mut need.slots {
                if let Some(prev) = previous.get(*family)
                    && self.cidr.range(*family).is_some_and(|r| r.is_usable(prev))
                    && round.take(prev)
                {
                    *found = Some(prev);
                }
            }
        }

        let mut full: HashSet<IpFamily> = HashSet::new();
        let mut assigned = BTreeMap::new();
        for (key, mut need) in needing {
            let (ns, name) = &key;
            let mut failed = None;
            for (pos, family, found) in &mut need.slots {
                if found.is_some() {
                    continue;
                }
                let Some(range) = self.cidr.range(*family) else {
                    // plan() only keeps configured families.
                    failed = Some((*pos, *family));
                    break;
                };
                *found = fresh(range, ns, name, &mut round, &full);
                if found.is_none() {
                    full.insert(*family);
                    failed = Some((*pos, *family));
                    break;
                }
            }
            let i = need.index;
            if let Some((pos, family)) = failed {
                // All or nothing: release what this service got.
                for (_, f, found) in &need.slots {
                    if let Some(ip) = found
                        && round.release(*ip)
                    {
                        full.remove(f);
                    }
                }
                keep[i] = false;
                let range = self
                    .cidr
                    .range(family)
                    .map_or_else(|| family.to_string(), |r| r.to_string());
                diags.push(diag(
                    services[i].source.clone(),
                    format!("Service {ns}/{name}"),
                    if pos == 0 {
                        "spec.clusterIP".to_owned()
                    } else {
                        format!("spec.clusterIPs[{pos}]")
                    },
                    format!("service CIDR {range} has no free address; the service is ignored"),
                ));
                continue;
            }
            let mut ips = FamilyIps::default();
            if let Some(fill) = filled[i].as_mut() {
                for (_, _, found) in &need.slots {
                    if let Some(ip) = found {
                        fill.cluster_ips.push(ip.to_string());
                        ips.set(*ip);
                    }
                }
            }
            assigned.insert(key, ips);
        }
        drop(round);
        // Who holds what now: every kept service's addresses.
        self.holders.record(
            services
                .iter()
                .zip(&keep)
                .zip(&filled)
                .filter_map(|((svc, kept), fill)| Some((svc, fill.as_ref().filter(|_| *kept)?)))
                .flat_map(|(svc, fill)| {
                    let id = holder_id(namespace_of(&svc.obj.metadata), name_of(&svc.obj.metadata));
                    fill.cluster_ips
                        .iter()
                        .filter_map(move |ip| Some((ip.parse::<IpAddr>().ok()?, id)))
                }),
        );
        self.assigned = assigned;
        keep.into_iter()
            .zip(filled)
            .map(|(kept, fill)| kept.then_some(fill))
            .collect()
    }
}

/// A free address of `range` for `ns/name`: the first host for
/// `default/kubernetes`, else by hash with linear probing. `None`: full.
fn fresh(
    range: CidrRange,
    ns: &str,
    name: &str,
    round: &mut Round<'_, IpAddr>,
    full: &HashSet<IpFamily>,
) -> Option<IpAddr> {
    if ns == "default"
        && name == "kubernetes"
        && let Some(ip) = range.nth(range.first_host())
        && round.take(ip)
    {
        return Some(ip);
    }
    if full.contains(&range.family()) {
        return None;
    }
    let (first, count) = range.usable();
    let start = u128::from(fnv1a(format!("{ns}/{name}").as_bytes())) % count;
    round.probe(start, count, |k| range.nth(first + k))
}
