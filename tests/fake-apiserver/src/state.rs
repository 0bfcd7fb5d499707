//! The object store, the global resourceVersion and the bounded event log.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::Error;
use crate::selector::{FieldSelector, LabelSelector};

/// A served resource kind: enough to route, list and write discovery documents.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ResourceDef {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
}

impl ResourceDef {
    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

pub(crate) static RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
    },
    ResourceDef {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
    },
];

pub(crate) fn resource(plural: &str) -> Result<&'static ResourceDef, Error> {
    RESOURCES
        .iter()
        .find(|r| r.plural == plural)
        .ok_or_else(|| Error::UnknownResource(plural.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    Added,
    Modified,
    Deleted,
}

/// One write, as the log and the live broadcast carry it.
#[derive(Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub resource: &'static ResourceDef,
    pub namespace: String,
    pub kind: EventKind,
    /// The new state; for deletes the last state with the delete's RV.
    pub object: Arc<Value>,
    /// The state before, needed to turn selector transitions into ADDED/DELETED.
    pub prev: Option<Arc<Value>>,
}

/// What one list or watch request selects.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub resource: &'static ResourceDef,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The event this watch sees, if any, the way the apiserver's cacher converts it.
    pub(crate) fn translate(&self, ev: &Event) -> Option<(&'static str, Arc<Value>)> {
        if ev.resource != self.resource
            || self
                .namespace
                .as_ref()
                .is_some_and(|ns| *ns != ev.namespace)
        {
            return None;
        }
        let now = self.matches(&ev.object);
        match ev.kind {
            EventKind::Added => now.then(|| ("ADDED", ev.object.clone())),
            EventKind::Deleted => now.then(|| ("DELETED", ev.object.clone())),
            EventKind::Modified => {
                let before = ev.prev.as_deref().is_some_and(|p| self.matches(p));
                match (before, now) {
                    (true, true) => Some(("MODIFIED", ev.object.clone())),
                    (false, true) => Some(("ADDED", ev.object.clone())),
                    (true, false) => {
                        // The old content under the event's RV, as kube-apiserver sends it.
                        let mut old = ev.prev.as_deref().cloned().unwrap_or(Value::Null);
                        set_rv(&mut old, ev.rv);
                        Some(("DELETED", Arc::new(old)))
                    }
                    (false, false) => None,
                }
            }
        }
    }
}

fn set_rv(obj: &mut Value, rv: u64) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

/// A paged LIST's items, kept so later pages come from the same snapshot.
pub(crate) struct Snapshot {
    pub id: u64,
    pub rv: u64,
    pub items: Arc<Vec<Arc<Value>>>,
}

const MAX_SNAPSHOTS: usize = 32;

pub(crate) type Key = (String, String);

#[derive(Default)]
pub(crate) struct State {
    pub rv: u64,
    /// Every event with an RV above this is still in `log`.
    pub log_floor: u64,
    pub log: VecDeque<Arc<Event>>,
    pub objects: HashMap<&'static str, BTreeMap<Key, Arc<Value>>>,
    pub snapshots: VecDeque<Snapshot>,
    next_snapshot: u64,
}

impl State {
    fn record(&mut self, ev: Event, cap: usize, tx: &tokio::sync::broadcast::Sender<Arc<Event>>) {
        let ev = Arc::new(ev);
        self.log.push_back(ev.clone());
        while self.log.len() > cap.max(1) {
            if let Some(old) = self.log.pop_front() {
                self.log_floor = old.rv;
            }
        }
        // Sent under the state lock, so every receiver sees events in RV order.
        let _ = tx.send(ev);
    }

    pub(crate) fn apply(
        &mut self,
        def: &'static ResourceDef,
        mut obj: Value,
        cap: usize,
        tx: &tokio::sync::broadcast::Sender<Arc<Event>>,
    ) -> Result<u64, Error> {
        let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
            return Err(Error::InvalidObject("metadata must be an object".into()));
        };
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => return Err(Error::InvalidObject("metadata.name is required".into())),
        };
        let namespace = if def.namespaced {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default");
            let ns = if ns.is_empty() { "default" } else { ns }.to_string();
            meta.insert("namespace".into(), Value::String(ns.clone()));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        self.rv += 1;
        let rv = self.rv;
        let key = (namespace.clone(), name);
        let prev = self
            .objects
            .entry(def.plural)
            .or_default()
            .get(&key)
            .cloned();
        let prev_meta = prev.as_deref().and_then(|p| p.get("metadata"));
        let uid = prev_meta
            .and_then(|m| m.get("uid"))
            .or_else(|| meta.get("uid"))
            .cloned()
            .unwrap_or_else(|| json!(format!("00000000-0000-4000-8000-{rv:012x}")));
        let created = prev_meta
            .and_then(|m| m.get("creationTimestamp"))
            .cloned()
            .unwrap_or_else(|| json!(now_rfc3339()));
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("uid".into(), uid);
        meta.entry("creationTimestamp").or_insert(created);
        obj["apiVersion"] = json!(def.api_version());
        obj["kind"] = json!(def.kind);
        let object = Arc::new(obj);
        let map = self.objects.entry(def.plural).or_default();
        map.insert(key, object.clone());
        let kind = if prev.is_some() {
            EventKind::Modified
        } else {
            EventKind::Added
        };
        let ev = Event {
            rv,
            resource: def,
            namespace,
            kind,
            object,
            prev,
        };
        self.record(ev, cap, tx);
        Ok(rv)
    }

    pub(crate) fn delete(
        &mut self,
        def: &'static ResourceDef,
        namespace: &str,
        name: &str,
        cap: usize,
        tx: &tokio::sync::broadcast::Sender<Arc<Event>>,
    ) -> Result<u64, Error> {
        let namespace = if def.namespaced { namespace } else { "" };
        let key = (namespace.to_string(), name.to_string());
        let prev = self
            .objects
            .get_mut(def.plural)
            .and_then(|m| m.remove(&key))
            .ok_or_else(|| Error::NotFound(format!("{} {namespace}/{name}", def.plural)))?;
        self.rv += 1;
        let mut last = (*prev).clone();
        set_rv(&mut last, self.rv);
        let ev = Event {
            rv: self.rv,
            resource: def,
            namespace: key.0,
            kind: EventKind::Deleted,
            object: Arc::new(last),
            prev: Some(prev),
        };
        self.record(ev, cap, tx);
        Ok(self.rv)
    }

    /// Like etcd compaction: bumps the RV so watches from any older RV get 410.
    pub(crate) fn compact(&mut self) {
        self.rv += 1;
        self.log.clear();
        self.log_floor = self.rv;
        self.snapshots.clear();
    }

    /// Current matching objects, in (namespace, name) order.
    pub(crate) fn select(&self, f: &Filter) -> Vec<Arc<Value>> {
        let Some(map) = self.objects.get(f.resource.plural) else {
            return Vec::new();
        };
        let matching = |v: &&Arc<Value>| f.matches(v);
        match &f.namespace {
            Some(ns) => {
                let lo = (ns.clone(), String::new());
                map.range(lo..)
                    .take_while(|((n, _), _)| n == ns)
                    .map(|(_, v)| v)
                    .filter(matching)
                    .cloned()
                    .collect()
            }
            None => map.values().filter(matching).cloned().collect(),
        }
    }

    pub(crate) fn keep_snapshot(&mut self, items: Arc<Vec<Arc<Value>>>) -> u64 {
        self.next_snapshot += 1;
        let (id, rv) = (self.next_snapshot, self.rv);
        self.snapshots.push_back(Snapshot { id, rv, items });
        if self.snapshots.len() > MAX_SNAPSHOTS {
            self.snapshots.pop_front();
        }
        id
    }

    /// Logged events after `rv`, or `None` when the log no longer reaches back that far.
    pub(crate) fn events_since(&self, rv: u64) -> Option<Vec<Arc<Event>>> {
        if rv < self.log_floor {
            return None;
        }
        let start = self.log.partition_point(|e| e.rv <= rv);
        Some(self.log.range(start..).cloned().collect())
    }
}

/// RFC 3339 UTC without a date crate (civil-from-days, Howard Hinnant).
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}
