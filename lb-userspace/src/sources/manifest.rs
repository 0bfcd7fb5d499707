//! The manifest-directory source: ordinary Kubernetes YAML stands in for an
//! API server and for the controllers a cluster would run (endpoints from
//! Pods, mirroring of Endpoints, ClusterIP allocation), for IPv4, IPv6 and
//! dual-stack Services.
use std::{
    collections::BTreeMap,
    fmt, fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Instant, SystemTime},
};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    model::{Diagnostic, IndexNamespaced as _, SOURCE_ANNOTATION, ServiceInfo, SliceInfo},
    sync::Input,
};

mod alloc;
#[cfg(test)]
mod cache_tests;
mod controllers;
mod parse;
pub mod read;
#[cfg(test)]
mod tests;
mod validate;

/// Everything one read of the directory produced.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// Services with `spec.clusterIP`, `clusterIPs`, `ipFamilies` and
    /// `ipFamilyPolicy` filled in as the API server would; invalid ones left out.
    pub services: Vec<Service>,
    /// Given EndpointSlices plus those derived from Pods and Endpoints.
    pub slices: Vec<EndpointSlice>,
    pub diagnostics: Vec<Diagnostic>,
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
        for (key, ip) in previous {
            let ip = ip.to_canonical();
            let family = IpFamily::of(ip);
            let usable = cidr.range(family).is_some_and(|r| r.is_usable(ip));
            let slot = assigned.entry(key).or_default();
            if usable && slot.get(family).is_none() {
                slot.set(ip);
            }
        }
        assigned.retain(|_, ips| !ips.is_empty());
        Self { cidr, assigned }
    }
}

/// Reads every `*.yaml`/`*.yml` in `dir` (not recursive) that is a regular
/// file of at most `max_file_size` bytes. Never fails: an unreadable
/// directory, file or object is a diagnostic.
pub fn load_dir(dir: &Path, alloc: &mut ClusterIpAllocator, max_file_size: u64) -> Manifests {
    let mut diagnostics = Vec::new();
    let objects = parse::read_dir(dir, max_file_size, &mut diagnostics);
    build(objects, alloc, diagnostics)
}

/// What the API server and the controllers would make of the objects.
fn build(
    objects: parse::Objects,
    alloc: &mut ClusterIpAllocator,
    mut diagnostics: Vec<Diagnostic>,
) -> Manifests {
    let parse::Objects {
        mut services,
        pods,
        endpoints,
        slices: given,
        ..
    } = objects;

    let keep = alloc.allocate(&mut services, &mut diagnostics);
    let services: Vec<Sourced<Service>> = services
        .into_iter()
        .zip(keep)
        .filter_map(|(s, keep)| keep.then_some(s))
        .collect();

    let mut slices: Vec<EndpointSlice> = Vec::with_capacity(given.len() + services.len());
    slices.extend(given.into_iter().map(Sourced::annotated));
    let derived =
        controllers::derive_slices(&services, &pods, &endpoints, &slices, &mut diagnostics);
    slices.extend(derived);

    Manifests {
        services: services.into_iter().map(Sourced::annotated).collect(),
        slices,
        diagnostics,
    }
}

/// The manifest directory, read file by file: a file is parsed again only
/// when its size, mtime or content changed, so an edit costs its own file's
/// parse, not the directory's.
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
        }
    }

    /// Files parsed so far (each parse of each file counts once).
    pub fn parses(&self) -> u64 {
        self.parses
    }

    /// Reads what changed since the last load and returns the whole
    /// directory. An unreadable directory keeps the last good state.
    pub fn load(&mut self, alloc: &mut ClusterIpAllocator) -> Manifests {
        let mut diags = Vec::new();
        if let Some(files) = parse::list_files(&self.dir, &mut diags) {
            let generation = self.next_seen;
            self.next_seen += 1;
            let mut current = BTreeMap::new();
            for (name, path) in files {
                let cached = self.files.remove(&name);
                current.insert(name.clone(), self.refresh(&name, &path, cached, generation));
            }
            self.files = current;
        }
        let mut order: Vec<(&String, &CachedFile)> = self.files.iter().collect();
        order.sort_by_key(|(name, f)| (f.seen, f.first_mtime, *name));
        let mut objects = parse::Objects::default();
        for file in self.files.values() {
            diags.extend(file.diags.iter().cloned());
        }
        for (_, file) in order {
            objects.merge(&file.objects, &mut diags);
        }
        objects.log_ignored();
        build(objects, alloc, diags)
    }

    /// The file's entry, parsed again only if it changed.
    fn refresh(
        &mut self,
        name: &str,
        path: &Path,
        mut cached: Option<CachedFile>,
        generation: u64,
    ) -> CachedFile {
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
            return c;
        }
        let (seen, first_mtime) = cached
            .as_ref()
            .map_or((generation, mtime), |c| (c.seen, c.first_mtime));
        let text = match read::read_manifest(path, self.max_file_size) {
            Ok(text) => text,
            Err(e) => {
                return CachedFile {
                    size,
                    mtime,
                    hash: 0,
                    seen,
                    first_mtime,
                    objects: parse::Objects::default(),
                    diags: vec![diag(path.display().to_string(), "", "", e.to_string())],
                };
            }
        };
        let hash = fnv1a(text.as_bytes());
        if let Some(c) = cached
            && c.hash == hash
        {
            // Touched, not changed.
            return CachedFile { size, mtime, ..c };
        }
        self.parses += 1;
        let mut objects = parse::Objects::default();
        let mut diags = Vec::new();
        objects.add_file(name, &text, &mut diags);
        CachedFile {
            size,
            mtime,
            hash,
            seen,
            first_mtime,
            objects,
            diags,
        }
    }
}

/// Puts one read of the directory into the index as a relist would:
/// everything applied, what vanished deleted; the problems found while
/// reading are reported with the index's.
pub fn feed(input: &Input, loaded: Manifests, arrived: Instant) {
    let services: Vec<ServiceInfo> = loaded.services.iter().map(ServiceInfo::from).collect();
    let slices: Vec<SliceInfo> = loaded.slices.iter().map(SliceInfo::from).collect();
    input.update(arrived, false, |index| {
        let services = index.reset(services);
        let slices = index.reset(slices);
        services || slices
    });
    input.set_source_diagnostics(loaded.diagnostics);
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
    source: String,
}

/// Objects that carry `metadata`, so the source annotation can be set generically.
trait HasMeta {
    fn meta(&self) -> &ObjectMeta;
    fn meta_mut(&mut self) -> &mut ObjectMeta;
}

macro_rules! has_meta {
    ($($t:ty),*) => {$(
        impl HasMeta for $t {
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    )*};
}

has_meta!(Service, EndpointSlice, Pod, Endpoints);

impl<T: HasMeta + Clone> Sourced<T> {
    /// The object with its source recorded, so diagnostics computed later
    /// (in the model) can still point at the file.
    fn annotated(self) -> T {
        let mut obj = std::sync::Arc::unwrap_or_clone(self.obj);
        set_source(obj.meta_mut(), self.source);
        obj
    }
}

fn set_source(meta: &mut ObjectMeta, source: String) {
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(SOURCE_ANNOTATION.to_owned(), source);
}

/// `metadata.namespace` after defaulting (always set by the parser).
fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// `metadata.name` (the parser rejects objects without one).
fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
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
