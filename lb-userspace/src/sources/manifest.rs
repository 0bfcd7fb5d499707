//! The manifest-directory source: ordinary Kubernetes YAML stands in for an
//! API server and for the controllers a cluster would run (endpoints from
//! Pods, mirroring of Endpoints, ClusterIP allocation), for IPv4, IPv6 and
//! dual-stack Services.
use std::{
    collections::BTreeMap,
    fmt, fs,
    hash::BuildHasher,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Instant, SystemTime},
};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use smol_str::SmolStr;

use self::{
    by_name::{ByName, Named},
    claims::Holders,
};
use crate::{
    model::{Diagnostic, IndexNamespaced, SOURCE_ANNOTATION, ServiceInfo, SliceInfo},
    sync::Input,
};

mod alloc;
mod by_name;
#[cfg(test)]
mod cache_tests;
mod claims;
mod controllers;
#[cfg(test)]
mod node_port_tests;
mod node_ports;
mod parse;
pub mod read;
mod slim;
#[cfg(test)]
mod tests;
mod validate;

/// Everything one read of the directory produced.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// Services with `spec.clusterIP`, `clusterIPs`, `ipFamilies` and
    /// `ipFamilyPolicy` filled in as the API server would; invalid ones left out.
    pub services: Vec<Service>,
    /// EndpointSlices derived from Pods and mirrored from Endpoints, as the
    /// controllers would write them.
    pub slices: Vec<EndpointSlice>,
    /// Hand-written EndpointSlices, in the model's slim form.
    pub given: Vec<Arc<SliceInfo>>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Manifests {
    /// The Services as the model takes them.
    pub fn service_infos(&self) -> Vec<ServiceInfo> {
        self.services.iter().map(ServiceInfo::from).collect()
    }

    /// Every slice, given and derived, as the model takes them.
    pub fn slice_infos(&self) -> Vec<SliceInfo> {
        self.given
            .iter()
            .map(|s| SliceInfo::clone(s))
            .chain(self.slices.iter().map(SliceInfo::from))
            .collect()
    }
}

/// An address family, named as Kubernetes names it (`IPv4`, `IPv6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// The family of `ip`; a v4-mapped IPv6 address counts as IPv6 (callers
    /// reject those before asking).
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// `spec.ipFamilies` / `addressType` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }

    fn other(self) -> Self {
        match self {
            IpFamily::V4 => IpFamily::V6,
            IpFamily::V6 => IpFamily::V4,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// At most one address per family: a service's allocated ClusterIPs, a
/// Pod's IPs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilyIps {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl FamilyIps {
    pub fn get(&self, family: IpFamily) -> Option<IpAddr> {
        match family {
            IpFamily::V4 => self.v4.map(IpAddr::V4),
            IpFamily::V6 => self.v6.map(IpAddr::V6),
        }
    }

    /// Sets the slot of `ip`'s family, replacing what was there.
    pub fn set(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => self.v4 = Some(v4),
            IpAddr::V6(v6) => self.v6 = Some(v6),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

/// One family's range for ClusterIPs, such as `10.96.0.0/12` or
/// `fd00:10:96::/108`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrRange {
    network: IpAddr,
    prefix_len: u8,
}

impl CidrRange {
    pub fn network(self) -> IpAddr {
        self.network
    }

    pub fn prefix_len(self) -> u8 {
        self.prefix_len
    }

    pub fn family(self) -> IpFamily {
        IpFamily::of(self.network)
    }
}

impl std::str::FromStr for CidrRange {
    type Err = ServiceCidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        alloc::parse_range(s)
    }
}

impl fmt::Display for CidrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// `--service-cidr`: one range, or one per family, the first being the
/// primary family (kube-apiserver's `--service-cluster-ip-range`). Services
/// that ask for no family get the primary one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceCidr {
    primary: CidrRange,
    secondary: Option<CidrRange>,
}

/// The default `--service-cidr`: IPv4 primary, so single-stack services stay
/// IPv4, with an IPv6 ULA range so dual-stack manifests work as they are.
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12,fd00:10:96::/108";

impl ServiceCidr {
    pub fn primary(&self) -> CidrRange {
        self.primary
    }

    pub fn secondary(&self) -> Option<CidrRange> {
        self.secondary
    }

    /// The range of `family`, if the cluster has one.
    pub fn range(&self, family: IpFamily) -> Option<CidrRange> {
        [Some(self.primary), self.secondary]
            .into_iter()
            .flatten()
            .find(|r| r.family() == family)
    }

    pub fn is_dual_stack(&self) -> bool {
        self.secondary.is_some()
    }
}

/// Why a `--service-cidr` value was refused. The flag parser names the flag.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServiceCidrError {
    #[error(
        "expected one CIDR, or an IPv4 and an IPv6 one separated by a comma, such as {DEFAULT_SERVICE_CIDR}"
    )]
    Empty,
    #[error("{0:?}: expected a CIDR such as 10.96.0.0/12 or fd00:10:96::/108")]
    NoPrefix(String),
    #[error("{cidr}: {addr:?} is not an IP address")]
    BadAddress { cidr: String, addr: String },
    #[error("{cidr}: prefix length {len:?} is not a number")]
    BadPrefix { cidr: String, len: String },
    #[error("{cidr}: an {family} prefix length must be between {min} and {max}{why}")]
    PrefixRange {
        cidr: String,
        family: IpFamily,
        min: u8,
        max: u8,
        /// Why, when the prefix is too long.
        why: &'static str,
    },
    #[error("{cidr}: host bits set; did you mean {suggestion}?")]
    HostBits { cidr: String, suggestion: String },
    #[error("{0}: an IPv4-mapped IPv6 range; give the IPv4 range instead")]
    Mapped(String),
    #[error("{first} and {second} are both {family}; give at most one range per family")]
    SameFamily {
        first: String,
        second: String,
        family: IpFamily,
    },
    #[error("{0}: at most two ranges (one IPv4, one IPv6)")]
    TooMany(String),
}

impl std::str::FromStr for ServiceCidr {
    type Err = ServiceCidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        alloc::parse_cidrs(s)
    }
}

impl fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.primary)?;
        if let Some(secondary) = self.secondary {
            write!(f, ",{secondary}")?;
        }
        Ok(())
    }
}

/// Hands out ClusterIPs for Services that have none, per family, stable
/// across edits and (seeded with what the maps hold) across agent restarts.
#[derive(Clone, Debug)]
pub struct ClusterIpAllocator {
    pub cidr: ServiceCidr,
    /// (namespace, name) → the addresses this allocator handed out (not
    /// the ones a manifest set itself).
    pub assigned: BTreeMap<(String, String), FamilyIps>,
    /// Which service held each ClusterIP after the last allocation (seeded
    /// from the maps): of two manifests naming one address, the holder
    /// keeps it, as the API server refuses the second Service (see
    /// [`claims`]).
    holders: Holders<IpAddr>,
}

impl ClusterIpAllocator {
    /// `previous`: a previous agent's ClusterIPs per service, read back from
    /// the maps (any family, IPv4 possibly v4-mapped). Per service and
    /// family the first address inside `cidr`'s range of that family is
    /// kept; the others cannot have been allocated and are ignored.
    pub fn new(
        cidr: ServiceCidr,
        previous: impl IntoIterator<Item = ((String, String), IpAddr)>,
    ) -> Self {
        let mut assigned: BTreeMap<(String, String), FamilyIps> = BTreeMap::new();
        let mut holders = Holders::default();
        for (key, ip) in previous {
            let ip = ip.to_canonical();
            holders.seed(ip, &key.0, &key.1);
            let family = IpFamily::of(ip);
            let usable = cidr.range(family).is_some_and(|r| r.is_usable(ip));
            let slot = assigned.entry(key).or_default();
            if usable && slot.get(family).is_none() {
                slot.set(ip);
            }
        }
        assigned.retain(|_, ips| !ips.is_empty());
        Self {
            cidr,
            assigned,
            holders,
        }
    }
}

pub use node_ports::{
    DEFAULT_NODE_PORT_RANGE, NodePortAllocator, NodePortRange, NodePortRangeError, PortKey,
};

/// What the API server allocates for Services, done here: ClusterIPs and
/// nodePorts, each stable across edits and (seeded from the maps) across
/// restarts, by one first-come rule ([`claims`]).
#[derive(Clone, Debug)]
pub struct Allocator {
    pub cluster_ips: ClusterIpAllocator,
    pub node_ports: NodePortAllocator,
}

impl Allocator {
    /// ClusterIPs from `cidr`, seeded as [`ClusterIpAllocator::new`];
    /// nodePorts from the default range, unseeded.
    pub fn new(
        cidr: ServiceCidr,
        previous: impl IntoIterator<Item = ((String, String), IpAddr)>,
    ) -> Self {
        Self {
            cluster_ips: ClusterIpAllocator::new(cidr, previous),
            node_ports: NodePortAllocator::default(),
        }
    }

    /// The same, with nodePorts from `range`, seeded as
    /// [`NodePortAllocator::new`].
    pub fn with_node_ports(
        self,
        range: NodePortRange,
        previous: impl IntoIterator<Item = (PortKey, u16)>,
    ) -> Self {
        Self {
            node_ports: NodePortAllocator::new(range, previous),
            ..self
        }
    }
}

/// Reads every `*.yaml`/`*.yml` in `dir` (not recursive) that is a regular
/// file of at most `max_file_size` bytes. Never fails: an unreadable
/// directory, file or object is a diagnostic.
pub fn load_dir(dir: &Path, alloc: &mut Allocator, max_file_size: u64) -> Manifests {
    let mut diagnostics = Vec::new();
    let objects = parse::read_dir(dir, max_file_size, &mut diagnostics);
    build(objects, alloc, diagnostics).into()
}

/// What the API server and the controllers would make of the objects.
fn build(
    objects: parse::Objects,
    alloc: &mut Allocator,
    mut diagnostics: Vec<Diagnostic>,
) -> Built {
    let parse::Objects {
        services,
        pods,
        endpoints,
        slices: given,
        ..
    } = objects;

    let mut outcome = alloc.cluster_ips.allocate(&services, &mut diagnostics);
    alloc
        .node_ports
        .allocate(&services, &mut outcome, &mut diagnostics);
    let services: Vec<Allocated> = services
        .into_iter()
        .zip(outcome)
        .filter_map(|(svc, kept)| kept.map(|filled| Allocated { svc, filled }))
        .collect();

    let slices = controllers::derive_slices(
        &services,
        &pods,
        &endpoints,
        given
            .iter()
            .map(|s| (s.namespace.as_str(), s.name.as_str())),
        &mut diagnostics,
    );

    Built {
        services,
        slices,
        given,
        diagnostics,
    }
}

/// What [`build`] made: [`Manifests`] with the Services as the cache keeps
/// them.
struct Built {
    services: Vec<Allocated>,
    slices: Vec<EndpointSlice>,
    given: Vec<Arc<SliceInfo>>,
    diagnostics: Vec<Diagnostic>,
}

impl From<Built> for Manifests {
    fn from(b: Built) -> Self {
        Manifests {
            services: b
                .services
                .into_iter()
                .map(|a| {
                    let mut svc = std::sync::Arc::unwrap_or_clone(a.svc.obj).into_service();
                    if let (Some(spec), Some(filled)) = (svc.spec.as_mut(), a.filled) {
                        spec.ip_family_policy = Some(filled.policy.to_owned());
                        spec.ip_families = Some(
                            filled
                                .families
                                .iter()
                                .map(|f| f.as_str().to_owned())
                                .collect(),
                        );
                        spec.cluster_ip = filled.cluster_ips.first().cloned();
                        spec.cluster_ips = Some(filled.cluster_ips);
                        for (i, node_port) in filled.node_ports {
                            if let Some(p) = spec.ports.as_mut().and_then(|p| p.get_mut(i)) {
                                p.node_port = (node_port != 0).then_some(node_port);
                            }
                        }
                    }
                    set_source(&mut svc.metadata, &a.svc.source);
                    svc
                })
                .collect(),
            slices: b.slices,
            given: b.given,
            diagnostics: b.diagnostics,
        }
    }
}

/// The manifest directory, read file by file: a file is parsed again only
/// when its size, mtime or content changed, so an edit costs its own file's
/// parse, not the directory's. What changed reaches the index as a
/// [`Delta`]; an edit that changes only hand-written EndpointSlices (the
/// common case: readiness, scaling) skips the allocator and the controllers,
/// which depend on Services, Pods and Endpoints alone.
///
/// Of two files defining the same object, the one seen first keeps it (the
/// other is reported), whatever their names: a new file never takes an
/// object from a file already read, and files first read in the same load
/// (all of them, at start) rank by modification time, then name, so across
/// a restart the definition that was there first still wins.
#[derive(Debug)]
pub struct DirCache {
    dir: PathBuf,
    max_file_size: u64,
    files: BTreeMap<String, CachedFile>,
    next_seen: u64,
    parses: u64,
    builds: u64,
    /// What the index was given, to send it only differences; `None` until
    /// the first load.
    fed: Option<Fed>,
}

/// The directory's meaning as last given to the index.
#[derive(Debug, Default)]
struct Fed {
    services: ByName<ServiceInfo>,
    slices: ByName<SliceInfo>,
    /// What merging, allocation and the controllers reported.
    build_diags: Vec<Diagnostic>,
}

/// One change for the index. Shared with the cache: a cold start's delta
/// is every object, and copying them all at once would double the peak.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<T> {
    Apply(Arc<T>),
    Delete { namespace: String, name: String },
}

/// What one load changed, and every problem the directory has now.
#[derive(Clone, Debug, Default)]
pub struct Delta {
    pub services: Vec<Change<ServiceInfo>>,
    pub slices: Vec<Change<SliceInfo>>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty()
    }
}

struct CachedFile {
    size: u64,
    mtime: Option<SystemTime>,
    hash: u64,
    /// The load that first read the file, then its mtime at that time:
    /// decide duplicates across files.
    seen: u64,
    first_mtime: Option<SystemTime>,
    objects: parse::Objects,
    diags: Vec<Diagnostic>,
}

impl fmt::Debug for CachedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedFile")
            .field("size", &self.size)
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

/// How a load changed a file.
enum Refreshed {
    Same,
    /// Only the contents of its hand-written EndpointSlices changed (same
    /// names, same places in the file).
    SlicesOnly,
    Other,
}

/// Younger mtimes are not trusted to show every write.
const RACY: std::time::Duration = std::time::Duration::from_secs(2);

impl DirCache {
    pub fn new(dir: &Path, max_file_size: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            max_file_size,
            files: BTreeMap::new(),
            next_seen: 0,
            parses: 0,
            builds: 0,
            fed: None,
        }
    }

    /// Files parsed so far (each parse of each file counts once).
    pub fn parses(&self) -> u64 {
        self.parses
    }

    /// Loads that ran the allocator and the controllers over the whole
    /// directory (the others applied only edited EndpointSlices).
    pub fn builds(&self) -> u64 {
        self.builds
    }

    /// Parses the directory's files into the cache without building
    /// anything, so the agent can read its manifests on one CPU while it
    /// loads its programs (the verifier's work) on another; the next
    /// [`load`](Self::load) finds them parsed. Problems are reported by
    /// that load.
    pub fn prefetch(&mut self) {
        let Some(files) = parse::list_files(&self.dir, &mut Vec::new()) else {
            return;
        };
        for (name, file, _) in self.refresh_files(files) {
            self.files.insert(name, file);
        }
    }

    /// Each of `files` against its cached entry (taken out of the cache),
    /// re-read and re-parsed only if it changed; the parses are counted.
    fn refresh_files(
        &mut self,
        files: Vec<(String, PathBuf)>,
    ) -> Vec<(String, CachedFile, Refreshed)> {
        let generation = self.next_seen;
        self.next_seen += 1;
        let jobs: Vec<Job> = files
            .into_iter()
            .map(|(name, path)| {
                let cached = self.files.remove(&name);
                (name, path, cached)
            })
            .collect();
        refresh_all(jobs, generation, self.max_file_size)
            .into_iter()
            .map(|(name, file, how, parsed)| {
                self.parses += u64::from(parsed);
                (name, file, how)
            })
            .collect()
    }

    /// Reads what changed since the last load. An unreadable directory
    /// keeps the last good state.
    pub fn load(&mut self, alloc: &mut Allocator) -> Delta {
        let mut diags = Vec::new();
        // Files whose EndpointSlices alone changed; `None`: something else did.
        let mut slice_edits: Option<Vec<String>> = Some(Vec::new());
        if let Some(files) = parse::list_files(&self.dir, &mut diags) {
            let mut current = BTreeMap::new();
            for (name, file, how) in self.refresh_files(files) {
                match how {
                    Refreshed::Same => {}
                    Refreshed::SlicesOnly => {
                        if let Some(edits) = &mut slice_edits {
                            edits.push(name.clone());
                        }
                    }
                    Refreshed::Other => slice_edits = None,
                }
                current.insert(name, file);
            }
            if !self.files.is_empty() {
                // Files that vanished.
                slice_edits = None;
            }
            self.files = current;
        }
        for file in self.files.values() {
            diags.extend(file.diags.iter().cloned());
        }
        let mut delta = match (&mut self.fed, slice_edits) {
            (Some(fed), Some(edits)) => Self::apply_slice_edits(fed, &self.files, &edits),
            _ => self.build(alloc),
        };
        diags.extend(self.fed.iter().flat_map(|f| f.build_diags.iter().cloned()));
        delta.diagnostics = diags;
        delta
    }

    /// The hand-written slices of `edited` files that their file defines
    /// (not a duplicate of another file's), straight to the index.
    fn apply_slice_edits(
        fed: &mut Fed,
        files: &BTreeMap<String, CachedFile>,
        edited: &[String],
    ) -> Delta {
        let mut delta = Delta::default();
        for name in edited {
            for slice in &files[name].objects.slices {
                // The definition that won is the one the index was given
                // (a derived slice never takes a hand-written one's name).
                let defined_here = fed
                    .slices
                    .get(&slice.namespace, &slice.name)
                    .is_some_and(|s| file_of(&s.source) == name.as_str());
                if !defined_here {
                    continue;
                }
                let old = fed.slices.insert(slice.clone());
                if old.is_none_or(|old| *old != **slice) {
                    delta.slices.push(Change::Apply(slice.clone()));
                }
            }
        }
        delta
    }

    /// The whole directory through the allocator and the controllers,
    /// compared with what the index was given.
    fn build(&mut self, alloc: &mut Allocator) -> Delta {
        self.builds += 1;
        let mut order: Vec<(&String, &CachedFile)> = self.files.iter().collect();
        order.sort_by_key(|(name, f)| (f.seen, f.first_mtime, *name));
        let mut objects = parse::Objects::default();
        let mut merge_diags = Vec::new();
        for (_, file) in order {
            objects.merge(&file.objects, &mut merge_diags);
        }
        objects.log_ignored();
        // The merge's record of who defined what (a source string per
        // object) is not needed by the build, which holds its objects.
        objects.shrink();
        let built = build(objects, alloc, merge_diags);
        let mut next = Fed {
            build_diags: built.diagnostics,
            ..Fed::default()
        };
        // Each full object goes as soon as its slim info is taken.
        for svc in built.services {
            let info = svc
                .svc
                .obj
                .info(svc.svc.source.clone(), svc.filled.as_ref());
            drop(svc);
            next.services.insert(Arc::new(info));
        }
        for slice in built.given {
            next.slices.insert(slice);
        }
        for slice in built.slices {
            let info = SliceInfo::from(&slice);
            drop(slice);
            next.slices.insert(Arc::new(info));
        }
        let previous = self.fed.take().unwrap_or_default();
        let delta = Delta {
            services: diff(&previous.services, &next.services),
            slices: diff(&previous.slices, &next.slices),
            diagnostics: Vec::new(),
        };
        self.fed = Some(next);
        delta
    }

    /// Everything the index was given, sorted by key (for tests).
    #[cfg(test)]
    pub fn current(&self) -> (Vec<ServiceInfo>, Vec<SliceInfo>) {
        let Some(fed) = &self.fed else {
            return Default::default();
        };
        let mut services: Vec<ServiceInfo> =
            fed.services.iter().map(|s| ServiceInfo::clone(s)).collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut slices: Vec<SliceInfo> = fed.slices.iter().map(|s| SliceInfo::clone(s)).collect();
        slices.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        (services, slices)
    }
}

/// The file's entry, parsed again only if it changed (then `true`).
fn refresh(
    max_file_size: u64,
    name: &str,
    path: &Path,
    mut cached: Option<CachedFile>,
    generation: u64,
) -> (CachedFile, Refreshed, bool) {
    let meta = fs::metadata(path).ok();
    let size = meta.as_ref().map_or(0, fs::Metadata::len);
    let mtime = meta.and_then(|m| m.modified().ok());
    // An mtime a moment old may hide a second write within the same
    // tick (as in git's "racy" check): such a file is read and hashed.
    let settled = mtime.is_some_and(|m| {
        SystemTime::now()
            .duration_since(m)
            .is_ok_and(|age| age > RACY)
    });
    if let Some(c) = cached.take_if(|c| settled && c.size == size && c.mtime == mtime) {
        return (c, Refreshed::Same, false);
    }
    let (seen, first_mtime) = cached
        .as_ref()
        .map_or((generation, mtime), |c| (c.seen, c.first_mtime));
    let text = match read::read_manifest(path, max_file_size) {
        Ok(text) => text,
        Err(e) => {
            let file = CachedFile {
                size,
                mtime,
                hash: 0,
                seen,
                first_mtime,
                objects: parse::Objects::default(),
                diags: vec![diag(path.display().to_string(), "", "", e.to_string())],
            };
            return (file, Refreshed::Other, false);
        }
    };
    // Compared only within this process: any fast hash will do (FNV-1a
    // reads a byte at a time; a cold start hashes the directory twice).
    let hash = foldhash::quality::FixedState::with_seed(0).hash_one(text.as_bytes());
    if let Some(c) = cached.take_if(|c| c.hash == hash) {
        // Touched, not changed.
        return (CachedFile { size, mtime, ..c }, Refreshed::Same, false);
    }
    let mut objects = parse::Objects::default();
    let mut diags = Vec::new();
    objects.add_file(name, &text, &mut diags);
    objects.shrink();
    let how = match &cached {
        Some(old) if old.objects.same_but_slice_contents(&objects) => Refreshed::SlicesOnly,
        _ => Refreshed::Other,
    };
    let file = CachedFile {
        size,
        mtime,
        hash,
        seen,
        first_mtime,
        objects,
        diags,
    };
    (file, how, true)
}

/// A file to look at: its name, path and what the cache holds for it.
type Job = (String, PathBuf, Option<CachedFile>);

/// [`refresh`] of every job, on as many threads as there are CPUs (the
/// calling one included), each taking the next file when done with one;
/// results in the jobs' order. Parsing YAML is the cold start's longest
/// step: 10,000 Services and their slices take ~0.6 s on one core. The
/// agent has one malloc arena (see `main.rs`), but jemalloc's per-thread
/// caches serve most of the parse's allocations: a cold start of 10,000
/// services took 0.57-0.91 s with two threads against 0.71-1.14 s with
/// one, alternating, faster in 7 of 8 pairs. (A version on rayon measured
/// 1.44 s on two threads against 0.65 s on one, in f2a7129, and was
/// dropped; this one was measured against one thread again.)
fn refresh_all(
    jobs: Vec<Job>,
    generation: u64,
    max_file_size: u64,
) -> Vec<(String, CachedFile, Refreshed, bool)> {
    let run = |(name, path, cached): Job| {
        let (file, how, parsed) = refresh(max_file_size, &name, &path, cached, generation);
        (name, file, how, parsed)
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(jobs.len());
    if threads <= 1 {
        return jobs.into_iter().map(run).collect();
    }
    let count = jobs.len();
    // Each thread takes the next job with its place in the results.
    let queue = std::sync::Mutex::new(jobs.into_iter().enumerate());
    let work = || {
        let mut done = Vec::new();
        loop {
            let next = queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .next();
            let Some((i, job)) = next else {
                return done;
            };
            done.push((i, run(job)));
        }
    };
    let mut out: Vec<Option<(String, CachedFile, Refreshed, bool)>> =
        (0..count).map(|_| None).collect();
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mut finished = vec![work()];
        for h in helpers {
            match h.join() {
                Ok(done) => finished.push(done),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        for (i, r) in finished.into_iter().flatten() {
            out[i] = Some(r);
        }
    });
    out.into_iter().flatten().collect()
}

/// The changes that turn `old` into `new`, in key order.
fn diff<T: PartialEq + Named>(old: &ByName<T>, new: &ByName<T>) -> Vec<Change<T>> {
    let mut changes: Vec<((&str, &str), Change<T>)> = Vec::new();
    for obj in new.iter() {
        let (namespace, name) = obj.names();
        if old
            .get(namespace, name)
            .is_none_or(|o| !Arc::ptr_eq(o, obj) && **o != **obj)
        {
            changes.push(((namespace, name), Change::Apply(obj.clone())));
        }
    }
    for obj in old.iter() {
        let (namespace, name) = obj.names();
        if !new.contains(namespace, name) {
            changes.push((
                (namespace, name),
                Change::Delete {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                },
            ));
        }
    }
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    changes.into_iter().map(|(_, c)| c).collect()
}

/// Applies one load's changes to the index; the problems found while
/// reading are reported with the index's.
pub fn feed(input: &Input, delta: Delta, arrived: Instant) {
    let Delta {
        services,
        slices,
        diagnostics,
    } = delta;
    if !services.is_empty() || !slices.is_empty() {
        input.update(arrived, false, |index| {
            let mut changed = false;
            for change in services {
                changed |= match change {
                    // Shared with the cache, not copied.
                    Change::Apply(s) => index.apply_service(s),
                    Change::Delete { namespace, name } => {
                        IndexNamespaced::<ServiceInfo>::delete(index, &namespace, &name)
                    }
                };
            }
            for change in slices {
                changed |= match change {
                    // Shared with the cache, not copied.
                    Change::Apply(s) => index.apply_slice(s),
                    Change::Delete { namespace, name } => {
                        IndexNamespaced::<SliceInfo>::delete(index, &namespace, &name)
                    }
                };
            }
            changed
        });
    }
    input.set_source_diagnostics(diagnostics);
}

/// An object with where it was read from (`file.yaml#2`).
#[derive(Clone, Debug)]
///
/// Shared (`Arc`), so a load assembles the directory from the per-file
/// cache without copying objects it only reads (Pods, Endpoints); the few
/// it changes (a Service's allocated ClusterIP, the source annotation) are
/// copied on write.
struct Sourced<T> {
    obj: std::sync::Arc<T>,
    source: SmolStr,
}

/// A Service the API server would have created, and what it filled in.
struct Allocated {
    svc: Sourced<slim::SlimService>,
    /// `None`: nothing (an ExternalName Service, or one without a spec).
    filled: Option<alloc::Filled>,
}

impl Allocated {
    /// `spec.clusterIP` after the API server's defaulting.
    fn cluster_ip(&self) -> Option<&str> {
        match &self.filled {
            Some(f) => f.cluster_ips.first().map(String::as_str),
            None => self.svc.obj.spec.as_ref()?.cluster_ip.as_deref(),
        }
    }
}

/// Objects filed under (namespace, name): full objects and the cache's
/// slim Services alike.
trait HasMeta {
    fn names(&self) -> &dyn MetaNames;
}

macro_rules! has_meta {
    ($($t:ty),*) => {$(
        impl HasMeta for $t {
            fn names(&self) -> &dyn MetaNames {
                &self.metadata
            }
        }
    )*};
}

has_meta!(Service, slim::SlimService, EndpointSlice, Pod, Endpoints);

/// `metadata.namespace` and `metadata.name` of a full `ObjectMeta` or of
/// the cache's slim copy.
trait MetaNames {
    /// After defaulting (always set by the parser).
    fn namespace(&self) -> &str;
    /// Empty when missing (the parser rejects objects without one).
    fn name(&self) -> &str;
}

impl MetaNames for ObjectMeta {
    fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }
}

fn set_source(meta: &mut ObjectMeta, source: &str) {
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(SOURCE_ANNOTATION.to_owned(), source.to_owned());
}

/// `metadata.namespace` after defaulting (always set by the parser).
fn namespace_of<M: MetaNames + ?Sized>(meta: &M) -> &str {
    meta.namespace()
}

/// `metadata.name` (the parser rejects objects without one).
fn name_of<M: MetaNames + ?Sized>(meta: &M) -> &str {
    meta.name()
}

/// The file part of a source (`file.yaml` of `file.yaml#2`).
fn file_of(source: &str) -> &str {
    source.split('#').next().unwrap_or_default()
}

/// Deterministic across runs and builds (std's hasher is randomly seeded),
/// so ClusterIPs and slice names do not move when the agent restarts.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn diag(
    source: impl Into<String>,
    object: impl Into<String>,
    field: impl Into<String>,
    message: impl Into<String>,
) -> Diagnostic {
    Diagnostic {
        source: source.into(),
        object: object.into(),
        field: field.into(),
        message: message.into(),
        severity: Default::default(),
    }
}
