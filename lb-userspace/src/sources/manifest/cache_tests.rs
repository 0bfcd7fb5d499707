//! The per-file cache against a fresh load of the same directory.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
};

use proptest::prelude::*;
use tempfile::TempDir;

use super::{Allocator, Change, Delta, DirCache, Manifests, load_dir, read::DEFAULT_MAX_FILE_SIZE};
use crate::model::{ServiceInfo, SliceInfo};

fn alloc() -> Allocator {
    Allocator::new("10.96.0.0/12".parse().unwrap(), [])
}

fn service(name: &str, ip: Option<&str>) -> String {
    let ip = ip.map_or(String::new(), |ip| format!("\n  clusterIP: {ip}"));
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:{ip}\n  selector:\n    app: {name}\n  ports:\n  - port: 80\n    targetPort: 8080\n"
    )
}

fn pod(name: &str, app: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    app: {app}\nspec:\n  containers:\n  - name: c\n    image: x\nstatus:\n  podIP: {ip}\n  conditions:\n  - type: Ready\n    status: \"True\"\n"
    )
}

/// A selectorless Service with its Endpoints (mirrored into a slice).
fn selectorless(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports:\n  - port: 80\n---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: {name}\nsubsets:\n- addresses:\n  - ip: {ip}\n  ports:\n  - port: 8080\n"
    )
}

/// A hand-written EndpointSlice of service `svc` with one endpoint.
fn given_slice(name: &str, svc: &str, ip: &str, ready: bool) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nports:\n- port: 8080\nendpoints:\n- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}}}\n"
    )
}

type Meaning = (Vec<ServiceInfo>, Vec<SliceInfo>, BTreeSet<String>);

/// What a load means to the model: the slim objects and the problems.
fn meaning(m: &Manifests) -> Meaning {
    let mut services = m.service_infos();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut slices = m.slice_infos();
    slices.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let diags = m.diagnostics.iter().map(ToString::to_string).collect();
    (services, slices, diags)
}

/// The same for the cache, after `delta`.
fn cache_meaning(cache: &DirCache, delta: &Delta) -> Meaning {
    let (services, slices) = cache.current();
    let diags = delta.diagnostics.iter().map(ToString::to_string).collect();
    (services, slices, diags)
}

/// What an index fed every delta so far holds.
#[derive(Default)]
struct Fed {
    services: BTreeMap<(String, String), ServiceInfo>,
    slices: BTreeMap<(String, String), SliceInfo>,
}

impl Fed {
    fn apply(&mut self, delta: &Delta) {
        fn one<T: Clone>(
            into: &mut BTreeMap<(String, String), T>,
            changes: &[Change<T>],
            key: impl Fn(&T) -> (String, String),
        ) {
            for c in changes {
                match c {
                    Change::Apply(o) => {
                        into.insert(key(o), T::clone(o));
                    }
                    Change::Delete { namespace, name } => {
                        into.remove(&(namespace.clone(), name.clone()));
                    }
                }
            }
        }
        one(&mut self.services, &delta.services, |s| {
            (s.namespace.to_string(), s.name.to_string())
        });
        one(&mut self.slices, &delta.slices, |s| {
            (s.namespace.to_string(), s.name.to_string())
        });
    }

    fn objects(&self) -> (Vec<ServiceInfo>, Vec<SliceInfo>) {
        (
            self.services.values().cloned().collect(),
            self.slices.values().cloned().collect(),
        )
    }
}

#[test]
fn an_edit_parses_only_its_own_file_again() {
    let dir = TempDir::new().unwrap();
    for i in 0..5 {
        let text = service(&format!("s{i}"), None)
            + "---\n"
            + &pod(
                &format!("p{i}"),
                &format!("s{i}"),
                &format!("10.244.0.{}", i + 1),
            );
        fs::write(dir.path().join(format!("f{i}.yaml")), text).unwrap();
    }
    let mut cache = DirCache::new(dir.path(), DEFAULT_MAX_FILE_SIZE);
    let mut a = alloc();
    let first = cache.load(&mut a);
    assert_eq!(cache.parses(), 5);
    assert_eq!(first.services.len(), 5);
    assert_eq!(first.slices.len(), 5, "a slice per service, from its pod");
    assert_eq!(cache.builds(), 1);
    // Nothing changed: nothing parsed.
    cache.load(&mut a);
    assert_eq!(cache.parses(), 5);
    // One file edited: that file only.
    let edited = service("s2", None) + "---\n" + &pod("p2", "s2", "10.244.0.99");
    fs::write(dir.path().join("f2.yaml"), edited).unwrap();
    let after = cache.load(&mut a);
    assert_eq!(cache.parses(), 6);
    assert_eq!(
        cache_meaning(&cache, &after),
        meaning(&load_dir(dir.path(), &mut alloc(), DEFAULT_MAX_FILE_SIZE))
    );
    // Rewritten with the same text: read and hashed, not parsed.
    fs::write(
        dir.path().join("f3.yaml"),
        fs::read(dir.path().join("f3.yaml")).unwrap(),
    )
    .unwrap();
    cache.load(&mut a);
    assert_eq!(cache.parses(), 6);
    // Removed: its objects go.
    fs::remove_file(dir.path().join("f0.yaml")).unwrap();
    let removed = cache.load(&mut a);
    assert_eq!(
        removed.services,
        vec![Change::Delete {
            namespace: "default".into(),
            name: "s0".into()
        }]
    );
    assert_eq!(cache.current().0.len(), 4);
    assert_eq!(cache.parses(), 6);
}

/// An edit that changes only a hand-written EndpointSlice goes straight to
/// the index: one slice changed, no allocator or controller run.
#[test]
fn an_endpoint_slice_edit_skips_the_controllers() {
    let dir = TempDir::new().unwrap();
    let file =
        |ready| service("web", None) + "---\n" + &given_slice("web-1", "web", "10.244.0.7", ready);
    fs::write(dir.path().join("web.yaml"), file(true)).unwrap();
    fs::write(dir.path().join("other.yaml"), service("other", None)).unwrap();
    let mut cache = DirCache::new(dir.path(), DEFAULT_MAX_FILE_SIZE);
    let mut a = alloc();
    cache.load(&mut a);
    assert_eq!(cache.builds(), 1);
    fs::write(dir.path().join("web.yaml"), file(false)).unwrap();
    let delta = cache.load(&mut a);
    assert_eq!(cache.builds(), 1, "no full build for a slice edit");
    assert!(delta.services.is_empty());
    let [Change::Apply(slice)] = &delta.slices[..] else {
        panic!("one slice applied: {:?}", delta.slices);
    };
    assert_eq!(slice.name, "web-1");
    assert!(!slice.endpoints[0].ready);
    // A later file defining the same slice is reported, and its edits change
    // nothing.
    let copy = |ip| given_slice("web-1", "web", ip, true);
    fs::write(dir.path().join("copy.yaml"), copy("10.244.0.8")).unwrap();
    let delta = cache.load(&mut a);
    assert!(delta.is_empty(), "{delta:?}");
    assert!(delta.diagnostics.iter().any(|d| d.source == "copy.yaml#1"));
    let builds = cache.builds();
    fs::write(dir.path().join("copy.yaml"), copy("10.244.0.9")).unwrap();
    let delta = cache.load(&mut a);
    assert_eq!(cache.builds(), builds, "a slice edit");
    assert!(delta.is_empty(), "{delta:?}");
    assert_eq!(cache.current().1[0].source, "web.yaml#2");
    // A Service edit takes the full path again.
    fs::write(
        dir.path().join("web.yaml"),
        service("web", Some("10.96.0.99"))
            + "---\n"
            + &given_slice("web-1", "web", "10.244.0.7", false),
    )
    .unwrap();
    let delta = cache.load(&mut a);
    assert_eq!(cache.builds(), builds + 1);
    assert_eq!(delta.services.len(), 1);
    assert!(delta.slices.is_empty());
}

/// Of two files defining one Service, the one read first keeps it, even
/// when the newcomer's name sorts first.
#[test]
fn a_newcomer_file_never_takes_a_service_from_a_running_one() {
    let dir = TempDir::new().unwrap();
    fs::write(
        dir.path().join("b.yaml"),
        service("web", Some("10.96.0.10")),
    )
    .unwrap();
    let mut cache = DirCache::new(dir.path(), DEFAULT_MAX_FILE_SIZE);
    let mut a = alloc();
    cache.load(&mut a);
    fs::write(
        dir.path().join("a.yaml"),
        service("web", Some("10.96.0.20")),
    )
    .unwrap();
    let m = cache.load(&mut a);
    assert!(m.services.is_empty(), "nothing changes: {:?}", m.services);
    let (services, _) = cache.current();
    assert_eq!(services.len(), 1);
    let spec = services[0].spec.as_ref().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    let d = m
        .diagnostics
        .iter()
        .find(|d| d.object == "Service default/web")
        .expect("the newcomer is reported");
    assert!(d.source.starts_with("a.yaml"), "{d}");
    assert!(d.message.contains("already defined in b.yaml"), "{d}");
}

#[derive(Clone, Debug)]
enum Edit {
    /// File `f`: services `s{f}-{k}` for each k with its own pod (k = 3:
    /// selectorless, with Endpoints), maybe a broken document.
    Write {
        f: usize,
        ks: Vec<u8>,
        broken: bool,
    },
    /// File `g{f}`: hand-written slices `own-{f}` and `more-{f}`, with this
    /// readiness (a second write only changes slices).
    Slices {
        f: usize,
        ready: bool,
    },
    Rewrite(usize),
    /// `f{n}` for n < 4, else `g{n - 4}`.
    Remove(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (0..4usize, prop::collection::vec(0..4u8, 0..3), prop::bool::weighted(0.15))
            .prop_map(|(f, ks, broken)| Edit::Write { f, ks, broken }),
        3 => (0..3usize, any::<bool>()).prop_map(|(f, ready)| Edit::Slices { f, ready }),
        1 => (0..4usize).prop_map(Edit::Rewrite),
        1 => (0..7usize).prop_map(Edit::Remove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// After any sequence of writes, identical rewrites and removals, the
    /// cache's view is exactly a fresh load of the directory.
    #[test]
    fn the_cache_equals_a_fresh_load(edits in prop::collection::vec(edit(), 1..12)) {
        let dir = TempDir::new().unwrap();
        let mut cache = DirCache::new(dir.path(), DEFAULT_MAX_FILE_SIZE);
        let mut a = alloc();
        let mut fed = Fed::default();
        for e in edits {
            match e {
                Edit::Write { f, ks, broken } => {
                    let mut docs = Vec::new();
                    for k in ks {
                        let name = format!("s{f}-{k}");
                        if k == 3 {
                            docs.push(selectorless(&name, &format!("192.168.{f}.1")));
                            continue;
                        }
                        let ip = (k % 2 == 0).then(|| format!("10.96.{f}.{}", k + 1));
                        docs.push(service(&name, ip.as_deref()));
                        docs.push(pod(&format!("p{f}-{k}"), &name, &format!("10.244.{f}.{}", k + 1)));
                    }
                    if broken {
                        docs.push("kind: [unclosed\n".to_owned());
                    }
                    fs::write(dir.path().join(format!("f{f}.yaml")), docs.join("---\n")).unwrap();
                }
                Edit::Slices { f, ready } => {
                    // (A slice contested by two files is not here: which
                    // file keeps it depends on history, which a fresh load
                    // does not have.)
                    let text = given_slice(&format!("own-{f}"), "s0-0", &format!("10.244.9.{f}"), ready)
                        + "---\n"
                        + &given_slice(&format!("more-{f}"), "s1-1", &format!("10.244.8.{f}"), !ready);
                    fs::write(dir.path().join(format!("g{f}.yaml")), text).unwrap();
                }
                Edit::Rewrite(f) => {
                    let path = dir.path().join(format!("f{f}.yaml"));
                    if let Ok(text) = fs::read(&path) {
                        fs::write(&path, text).unwrap();
                    }
                }
                Edit::Remove(f) => {
                    let name = if f < 4 { format!("f{f}.yaml") } else { format!("g{}.yaml", f - 4) };
                    let _ = fs::remove_file(dir.path().join(name));
                }
            }
            // Both start from the same allocations, as a restart would.
            let mut fresh_alloc = a.clone();
            let got = cache.load(&mut a);
            let want = load_dir(dir.path(), &mut fresh_alloc, DEFAULT_MAX_FILE_SIZE);
            let want = meaning(&want);
            prop_assert_eq!(&cache_meaning(&cache, &got), &want);
            fed.apply(&got);
            prop_assert_eq!(fed.objects(), (want.0, want.1));
        }
    }
}
