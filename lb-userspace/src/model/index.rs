//! The translation, kept per service and updated object by object: the
//! shape of kubert's `IndexNamespacedResource` and linkerd's policy index
//! (`apply(object)`, `delete(namespace, name)` per kind), with kube-proxy's
//! change tracking (updates that change nothing are dropped; a check-out
//! hands over only the frontends whose desired state changed).
//!
//! Pure: no I/O, no clock. Both sources feed it; [`super::translate`] is a
//! fresh index with everything applied, checked out once.
//!
//! Conflicts are resolved as the API server would have: of two Services
//! claiming one frontend, the one with the older `creationTimestamp` keeps
//! it, then the one seen first. A Service without a timestamp counts as
//! younger than any with one (only hand-written manifests lack it). Across
//! restarts "seen first" is recovered from the maps ([`Index::seed`]).
use std::{
    collections::{BTreeMap, BTreeSet, HashSet, hash_map::Entry},
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use smol_str::SmolStr;

use self::table::{Keyed, Table};
use super::{
    DesiredService, DesiredState, Diagnostic, Frontend, FrontendKind, ServiceRef, ServiceType,
    TranslateOptions,
    input::{ServiceInfo, SliceInfo},
    labels::SERVICE_NAME,
    translate::{diag, port_field, service_frontends},
};

/// (namespace, name).
pub type Key = (String, String);

/// The index's tables hash with foldhash (seeded per process), not SipHash:
/// every apply and every check-out hashes (namespace, name) keys and
/// frontends several times.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The index's own (namespace, name): inline up to 23 bytes (almost every
/// Kubernetes name) and shared when longer, so the several maps keyed by
/// a service or slice cost no allocation per key.
type IKey = (SmolStr, SmolStr);

fn ikey(namespace: &str, name: &str) -> IKey {
    (SmolStr::new(namespace), SmolStr::new(name))
}

fn to_key((namespace, name): &IKey) -> Key {
    names_key((namespace, name))
}

fn names_key((namespace, name): (&str, &str)) -> Key {
    (namespace.to_owned(), name.to_owned())
}

/// kubert's seam: one `apply` and one `delete` per kind.
pub trait IndexNamespaced<T> {
    /// Records the object's current state; `true` if anything changed.
    fn apply(&mut self, obj: T) -> bool;
    /// Forgets the object; `true` if it was known.
    fn delete(&mut self, namespace: &str, name: &str) -> bool;
    /// Every (namespace, name) of this kind it holds.
    fn keys(&self) -> Vec<Key>;

    /// A relist (kubert's `reset`): applies every object and deletes those
    /// of this kind it held but did not see again, computed from its own
    /// keys; `true` if anything changed.
    fn reset(&mut self, objs: Vec<T>) -> bool
    where
        T: Named,
    {
        let seen: HashSet<Key> = objs.iter().map(Named::key).collect();
        let mut changed = false;
        for obj in objs {
            changed |= self.apply(obj);
        }
        for (namespace, name) in self.keys() {
            if !seen.contains(&(namespace.clone(), name.clone())) {
                changed |= self.delete(&namespace, &name);
            }
        }
        changed
    }
}

/// Objects the index files under (namespace, name).
pub trait Named {
    fn key(&self) -> Key;
}

impl Named for ServiceInfo {
    fn key(&self) -> Key {
        (self.namespace.to_string(), self.name.to_string())
    }
}

impl Named for SliceInfo {
    fn key(&self) -> Key {
        (self.namespace.to_string(), self.name.to_string())
    }
}

/// What changed since the last check-out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checkout {
    /// Frontends whose desired state may have changed: `Some` is what should
    /// be served now, `None` means nothing serves it any more.
    pub changes: BTreeMap<Frontend, Option<DesiredService>>,
    /// Every current problem (not only new ones).
    pub diagnostics: Vec<Diagnostic>,
}

/// Who keeps a contested frontend: the smallest rank.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    /// Without a creation time: younger than any with one.
    untimed: bool,
    created: Option<Time>,
    /// Order first seen (or seeded).
    seen: u64,
}

#[derive(Debug)]
struct ServiceEntry {
    /// Shared (`Arc`): the manifest source keeps the same infos.
    info: Arc<ServiceInfo>,
    seen: u64,
    /// As of the last translation: the rank its claims are filed under,
    /// its frontends (in port, then address order) and its problems.
    claimed: Rank,
    frontends: Vec<(Frontend, Serves)>,
    diags: Vec<Diagnostic>,
}

/// What one frontend of a service serves, as the index keeps it until a
/// sync asks ([`Index::served`] builds the [`DesiredService`]): the
/// service's namespace and name are its key, so they are not copied per
/// frontend, and backends take 8 bytes per IPv4 address, not 32.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Serves {
    port_name: Box<str>,
    svc_type: ServiceType,
    frontend: FrontendKind,
    backends: Backends,
    /// Session affinity timeout in seconds; 0: none.
    affinity: u32,
    /// Serving endpoints not used for new sockets (usually none: no allocation).
    spared: Box<[SocketAddr]>,
}

/// A frontend's backends, all of its family (as translation makes them).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Backends {
    V4(Box<[SocketAddrV4]>),
    V6(Box<[SocketAddrV6]>),
    /// Never made by translation; kept as given rather than dropped.
    Mixed(Box<[SocketAddr]>),
}

impl From<DesiredService> for Serves {
    fn from(d: DesiredService) -> Self {
        let v4: Option<Box<[SocketAddrV4]>> = d
            .backends
            .iter()
            .map(|b| match b {
                SocketAddr::V4(a) => Some(*a),
                SocketAddr::V6(_) => None,
            })
            .collect();
        let v6 = || -> Option<Box<[SocketAddrV6]>> {
            d.backends
                .iter()
                .map(|b| match b {
                    SocketAddr::V6(a) => Some(*a),
                    SocketAddr::V4(_) => None,
                })
                .collect()
        };
        let backends = match (v4, v6()) {
            (Some(v4), _) => Backends::V4(v4),
            (None, Some(v6)) => Backends::V6(v6),
            (None, None) => Backends::Mixed(d.backends.into_boxed_slice()),
        };
        Self {
            port_name: Box::from(d.service.port_name.as_str()),
            svc_type: d.service.svc_type,
            frontend: d.service.frontend,
            backends,
            affinity: d.affinity,
            spared: d.spared.into_boxed_slice(),
        }
    }
}

impl Serves {
    fn desired(&self, (namespace, name): &IKey) -> DesiredService {
        let backends = match &self.backends {
            Backends::V4(b) => b.iter().map(|a| SocketAddr::V4(*a)).collect(),
            Backends::V6(b) => b.iter().map(|a| SocketAddr::V6(*a)).collect(),
            Backends::Mixed(b) => b.to_vec(),
        };
        DesiredService {
            service: ServiceRef {
                namespace: SmolStr::new(namespace),
                name: SmolStr::new(name),
                port_name: SmolStr::new(&self.port_name),
                svc_type: self.svc_type,
                frontend: self.frontend,
            },
            backends,
            affinity: self.affinity,
            spared: self.spared.to_vec(),
        }
    }
}

impl Keyed for Box<ServiceEntry> {
    fn names(&self) -> (&str, &str) {
        (&self.info.namespace, &self.info.name)
    }
}

impl Keyed for Arc<SliceInfo> {
    fn names(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl ServiceEntry {
    fn rank(&self) -> Rank {
        Rank {
            untimed: self.info.created.is_none(),
            created: self.info.created.clone(),
            seen: self.seen,
        }
    }

    fn wants(&self, fe: &Frontend) -> Option<&Serves> {
        self.frontends
            .iter()
            .find(|(f, _)| f == fe)
            .map(|(_, want)| want)
    }
}

#[derive(Debug, Default)]
pub struct Index {
    opts: TranslateOptions,
    /// Boxed, so the tables hold pointers: half-empty buckets and a resize
    /// (old and new table at once) cost little. Filed under the names of
    /// its info.
    services: Table<Box<ServiceEntry>>,
    /// Shared (`Arc`): the manifest source's cache holds the same slices.
    slices: Table<Arc<SliceInfo>>,
    /// (namespace, service) → names of the slices labelled for it, sorted
    /// (the order endpoints are deduplicated in).
    by_service: HashMap<IKey, SortedVec<SmolStr>>,
    /// Slices without the service-name label (each is a diagnostic).
    unlabeled: BTreeSet<IKey>,
    /// Frontend → the services claiming it, the owner first.
    claims: HashMap<Frontend, SortedVec<(Rank, IKey)>>,
    /// Frontends with more than one claim.
    contested: BTreeSet<Frontend>,
    /// Services whose translation reported problems.
    with_diags: BTreeSet<IKey>,
    /// Services to translate again at the next check-out.
    dirty: BTreeSet<IKey>,
    /// Frontends to hand out at the next check-out.
    touched: BTreeSet<Frontend>,
    /// A slice's missing label came or went since the last check-out.
    unlabeled_changed: bool,
    next_seen: u64,
    /// Services that held frontends before a restart, oldest first.
    seeds: HashMap<IKey, u64>,
}

impl Index {
    pub fn new(opts: TranslateOptions) -> Self {
        Self {
            opts,
            ..Self::default()
        }
    }

    pub fn options(&self) -> &TranslateOptions {
        &self.opts
    }

    /// New node inputs (a zone learned late): every service is translated
    /// again at the next check-out.
    pub fn set_options(&mut self, opts: TranslateOptions) {
        if opts != self.opts {
            self.opts = opts;
            self.dirty
                .extend(self.services.iter().map(|e| ikey(e.names().0, e.names().1)));
        }
    }

    /// Services that served frontends before a restart, oldest first (the
    /// maps' service ids are handed out in that order): they count as seen
    /// before anything applied later. Call before the first apply.
    pub fn seed(&mut self, oldest_first: impl IntoIterator<Item = Key>) {
        for key in oldest_first {
            if let Entry::Vacant(e) = self.seeds.entry(ikey(&key.0, &key.1)) {
                e.insert(self.next_seen);
                self.next_seen += 1;
            }
        }
    }

    /// The sources are complete: a seeded service not seen by now is gone,
    /// and if it comes back it is a newcomer.
    pub fn end_seeding(&mut self) {
        self.seeds = HashMap::default();
    }

    /// Takes a service (or one shared with its source: `Arc<ServiceInfo>`).
    pub fn apply_service(&mut self, info: impl Into<Arc<ServiceInfo>>) -> bool {
        let info: Arc<ServiceInfo> = info.into();
        let key = ikey(&info.namespace, &info.name);
        if let Some(e) = self.services.get_mut(&key.0, &key.1) {
            if Arc::ptr_eq(&e.info, &info) || *e.info == *info {
                return false;
            }
            e.info = info;
            self.dirty.insert(key);
            return true;
        }
        let seen = self.seeds.get(&key).copied().unwrap_or_else(|| {
            self.next_seen += 1;
            self.next_seen - 1
        });
        self.dirty.insert(key);
        self.services.insert(Box::new(ServiceEntry {
            claimed: Rank {
                untimed: info.created.is_none(),
                created: info.created.clone(),
                seen,
            },
            info,
            seen,
            frontends: Vec::new(),
            diags: Vec::new(),
        }));
        true
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) -> bool {
        let key = ikey(namespace, name);
        let Some(old) = self.services.remove(namespace, name) else {
            return false;
        };
        self.dirty.remove(&key);
        self.with_diags.remove(&key);
        for (fe, _) in &old.frontends {
            self.unclaim(fe, &old.claimed, &key);
            self.touched.insert(*fe);
        }
        true
    }

    /// Takes a slice (or one shared with its source: `Arc<SliceInfo>`).
    pub fn apply_slice(&mut self, info: impl Into<Arc<SliceInfo>>) -> bool {
        let info: Arc<SliceInfo> = info.into();
        let key = ikey(&info.namespace, &info.name);
        if self
            .slices
            .get(&key.0, &key.1)
            .is_some_and(|old| Arc::ptr_eq(old, &info) || **old == *info)
        {
            return false;
        }
        let owner = info.service.clone();
        let old = self.slices.insert(info);
        let old_owner = old.and_then(|o| o.service.clone());
        if old_owner != owner {
            if let Some(o) = &old_owner {
                self.unlink(&key, o);
            }
            if let Some(svc) = &owner {
                self.by_service
                    .entry((key.0.clone(), SmolStr::new(svc)))
                    .or_default()
                    .insert(key.1.clone());
            }
        }
        self.unlabeled_changed |= if owner.is_some() {
            self.unlabeled.remove(&key)
        } else {
            self.unlabeled.insert(key.clone())
        };
        for svc in [old_owner, owner].into_iter().flatten() {
            self.mark((key.0.clone(), SmolStr::new(svc)));
        }
        true
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) -> bool {
        let key = ikey(namespace, name);
        let Some(old) = self.slices.remove(namespace, name) else {
            return false;
        };
        self.unlabeled_changed |= self.unlabeled.remove(&key);
        if let Some(svc) = old.service.clone() {
            self.unlink(&key, &svc);
            self.mark((key.0, SmolStr::new(svc)));
        }
        true
    }

    /// Translates what changed and hands over the frontends whose desired
    /// state may differ from the last check-out.
    pub fn checkout(&mut self) -> Checkout {
        let changes = self
            .translate_dirty()
            .into_iter()
            .map(|fe| (fe, self.served(&fe)))
            .collect();
        Checkout {
            changes,
            diagnostics: self.diagnostics(),
        }
    }

    /// A check-out for a full pass: translates what changed and forgets
    /// which frontends that touched, copying nothing out; every current
    /// problem. The caller reads [`Index::served`] for [`Index::frontends`]
    /// a part at a time, so no second copy of the whole desired state is
    /// ever built (at a cold start every frontend changed).
    pub fn checkout_full(&mut self) -> Vec<Diagnostic> {
        self.translate_dirty();
        self.diagnostics()
    }

    /// A check-out that copies nothing out: the frontends whose desired
    /// state may differ from the last check-out, in order (the caller
    /// reads [`Index::served`] a part at a time, so a large change, such as
    /// the first list arriving, is never copied out whole), and every
    /// current problem.
    pub fn checkout_frontends(&mut self) -> (Vec<Frontend>, Vec<Diagnostic>) {
        let touched = self.translate_dirty().into_iter().collect();
        (touched, self.diagnostics())
    }

    /// Every frontend served as of the last check-out, in order.
    pub fn frontends(&self) -> Vec<Frontend> {
        let mut out: Vec<Frontend> = self.claims.keys().copied().collect();
        out.sort_unstable();
        out
    }

    /// Translates the services marked dirty; the frontends touched since
    /// the last check-out.
    fn translate_dirty(&mut self) -> BTreeSet<Frontend> {
        for key in std::mem::take(&mut self.dirty) {
            self.retranslate(key);
        }
        self.unlabeled_changed = false;
        std::mem::take(&mut self.touched)
    }

    /// Changes are waiting for a check-out.
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty() || !self.touched.is_empty() || self.unlabeled_changed
    }

    /// What `fe` should serve as of the last check-out: the claim of its
    /// owner.
    pub fn served(&self, fe: &Frontend) -> Option<DesiredService> {
        let (_, owner) = self.claims.get(fe)?.first()?;
        Some(
            self.services
                .get(&owner.0, &owner.1)?
                .wants(fe)?
                .desired(owner),
        )
    }

    /// Whether anything serves `fe` (as of the last check-out).
    pub fn is_served(&self, fe: &Frontend) -> bool {
        self.claims.contains_key(fe)
    }

    /// Everything, as of the last check-out.
    pub fn desired(&self) -> DesiredState {
        self.claims
            .keys()
            .filter_map(|fe| Some((*fe, self.served(fe)?)))
            .collect()
    }

    /// Every current problem: unlabeled slices first, then per service in
    /// (namespace, name) order its own problems and the frontends it lost.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        let (mut out, per_service) = self.diagnostics_grouped();
        for (_, group) in per_service {
            out.extend(group);
        }
        out
    }

    /// [`Index::diagnostics`]: the slices' problems, and each service's.
    pub(super) fn diagnostics_grouped(&self) -> (Vec<Diagnostic>, BTreeMap<Key, Vec<Diagnostic>>) {
        let slices = self
            .unlabeled
            .iter()
            .map(|key| {
                let source = self
                    .slices
                    .get(&key.0, &key.1)
                    .map_or("", |s| s.source.as_str());
                diag(
                    "EndpointSlice",
                    &key.0,
                    &key.1,
                    source,
                    "metadata.labels",
                    format!("missing label {SERVICE_NAME}; the slice is ignored"),
                )
            })
            .collect();
        let losers: BTreeSet<&IKey> = self
            .contested
            .iter()
            .flat_map(|fe| self.claims[fe].iter().skip(1).map(|(_, key)| key))
            .collect();
        let mut per_service: BTreeMap<Key, Vec<Diagnostic>> = BTreeMap::new();
        for key in self.with_diags.iter().chain(losers) {
            let k = to_key(key);
            if per_service.contains_key(&k) {
                continue;
            }
            let Some(entry) = self.services.get(&key.0, &key.1) else {
                continue;
            };
            let mut group = entry.diags.clone();
            for (fe, _) in &entry.frontends {
                let Some((_, owner)) = self.claims.get(fe).and_then(SortedVec::first) else {
                    continue;
                };
                if owner != key {
                    group.push(diag(
                        "Service",
                        &key.0,
                        &key.1,
                        &entry.info.source,
                        &port_field(&entry.info, fe),
                        format!(
                            "frontend {fe} is already served by Service {}/{}; skipped",
                            owner.0, owner.1
                        ),
                    ));
                }
            }
            per_service.insert(k, group);
        }
        (slices, per_service)
    }

    pub fn service_keys(&self) -> Vec<Key> {
        self.services.iter().map(|e| names_key(e.names())).collect()
    }

    pub fn slice_keys(&self) -> Vec<Key> {
        self.slices.iter().map(|e| names_key(e.names())).collect()
    }

    /// How many services and slices it holds.
    pub fn len(&self) -> (usize, usize) {
        (self.services.len(), self.slices.len())
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty()
    }

    fn mark(&mut self, service: IKey) {
        if self.services.contains(&service.0, &service.1) {
            self.dirty.insert(service);
        }
    }

    fn unlink(&mut self, slice: &IKey, service: &str) {
        let owner = (slice.0.clone(), SmolStr::new(service));
        if let Some(set) = self.by_service.get_mut(&owner) {
            set.remove(&slice.1);
            if set.is_empty() {
                self.by_service.remove(&owner);
            }
        }
    }

    fn unclaim(&mut self, fe: &Frontend, rank: &Rank, key: &IKey) {
        if let Some(set) = self.claims.get_mut(fe) {
            set.remove(&(rank.clone(), key.clone()));
            match set.len() {
                0 => {
                    self.claims.remove(fe);
                    self.contested.remove(fe);
                }
                1 => {
                    self.contested.remove(fe);
                }
                _ => {}
            }
        }
    }

    fn retranslate(&mut self, key: IKey) {
        let Some(entry) = self.services.get(&key.0, &key.1) else {
            return;
        };
        let own: Vec<&SliceInfo> = self
            .by_service
            .get(&key)
            .into_iter()
            .flatten()
            .filter_map(|name| self.slices.get(&key.0, name))
            .map(AsRef::as_ref)
            .collect();
        let mut diags = Vec::new();
        let mut frontends: Vec<(Frontend, Serves)> =
            service_frontends(&entry.info, &own, &self.opts, &mut diags)
                .into_iter()
                .map(|(fe, want)| (fe, Serves::from(want)))
                .collect();
        // Kept until the next change: no growth slack (a one-port service
        // would hold room for four).
        frontends.shrink_to_fit();
        let rank = entry.rank();
        if diags.is_empty() {
            self.with_diags.remove(&key);
        } else {
            self.with_diags.insert(key.clone());
        }
        let Some(entry) = self.services.get_mut(&key.0, &key.1) else {
            return;
        };
        entry.diags = diags;
        if frontends == entry.frontends && rank == entry.claimed {
            // Nothing this service serves changed: no sync for it.
            return;
        }
        let old = std::mem::replace(&mut entry.frontends, frontends);
        let old_rank = std::mem::replace(&mut entry.claimed, rank.clone());
        let rank_moved = old_rank != rank;
        let Some(entry) = self.services.get(&key.0, &key.1) else {
            return;
        };
        let mut touched = Vec::new();
        for (fe, want) in &old {
            if rank_moved || entry.wants(fe) != Some(want) {
                touched.push(*fe);
            }
        }
        for (fe, want) in &entry.frontends {
            if rank_moved || old.iter().find(|(f, _)| f == fe).map(|(_, w)| w) != Some(want) {
                touched.push(*fe);
            }
        }
        let new: Vec<Frontend> = entry.frontends.iter().map(|(fe, _)| *fe).collect();
        for (fe, _) in &old {
            self.unclaim(fe, &old_rank, &key);
        }
        for fe in new {
            let set = self.claims.entry(fe).or_default();
            set.insert((rank.clone(), key.clone()));
            if set.len() > 1 {
                self.contested.insert(fe);
            }
        }
        self.touched.extend(touched);
    }
}

impl IndexNamespaced<ServiceInfo> for Index {
    fn apply(&mut self, obj: ServiceInfo) -> bool {
        self.apply_service(obj)
    }

    fn delete(&mut self, namespace: &str, name: &str) -> bool {
        self.delete_service(namespace, name)
    }

    fn keys(&self) -> Vec<Key> {
        self.service_keys()
    }
}

impl IndexNamespaced<SliceInfo> for Index {
    fn apply(&mut self, obj: SliceInfo) -> bool {
        self.apply_slice(obj)
    }

    fn delete(&mut self, namespace: &str, name: &str) -> bool {
        self.delete_slice(namespace, name)
    }

    fn keys(&self) -> Vec<Key> {
        self.slice_keys()
    }
}

/// A small ordered set as a sorted `Vec`: the claims on one frontend and
/// the slices of one service are almost always one, and a `BTreeSet`
/// allocates a whole node (eleven elements, about 1 KiB for a claim) for it.
#[derive(Debug)]
struct SortedVec<T>(Vec<T>);

impl<T> Default for SortedVec<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Ord> SortedVec<T> {
    fn insert(&mut self, v: T) -> bool {
        match self.0.binary_search(&v) {
            Ok(_) => false,
            Err(at) => {
                // Exactly as many as held: a Vec's first growth is to four.
                self.0.reserve_exact(1);
                self.0.insert(at, v);
                true
            }
        }
    }

    fn remove<Q: Ord + ?Sized>(&mut self, v: &Q) -> bool
    where
        T: std::borrow::Borrow<Q>,
    {
        match self.0.binary_search_by(|x| x.borrow().cmp(v)) {
            Ok(at) => {
                self.0.remove(at);
                self.0.shrink_to_fit();
                true
            }
            Err(_) => false,
        }
    }

    fn first(&self) -> Option<&T> {
        self.0.first()
    }

    fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a, T> IntoIterator for &'a SortedVec<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

mod table;
#[cfg(test)]
mod tests;
