//! Files → typed objects: the API server's decoding and validation, as far as
//! the agent needs it. Every failure is a diagnostic for one object.
use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::Path,
};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_yaml::Value;
use smol_str::SmolStr;

use super::{Sourced, diag, read::read_manifest, slim, validate};
use crate::model::{Diagnostic, SliceInfo};

/// What the directory (or one file) holds, in file order, each object at
/// most once.
#[derive(Clone, Default)]
pub(super) struct Objects {
    pub services: Vec<Sourced<slim::SlimService>>,
    pub pods: Vec<Sourced<Pod>>,
    pub endpoints: Vec<Sourced<Endpoints>>,
    /// Hand-written EndpointSlices, slim from the start (with their source):
    /// nothing but translation reads them, and they are most of the bytes.
    pub slices: Vec<std::sync::Arc<SliceInfo>>,
    /// (kind, namespace, name) → source of the definition that won.
    seen: HashMap<(&'static str, SmolStr, SmolStr), SmolStr>,
    /// (kind, file) of objects of kinds the agent does not read: an ordinary
    /// application directory is full of them, so they are not problems.
    ignored: BTreeSet<(String, String)>,
}

/// Reads every manifest file of `dir`, each through [`read_manifest`] with
/// `max_file_size`.
pub(super) fn read_dir(dir: &Path, max_file_size: u64, diags: &mut Vec<Diagnostic>) -> Objects {
    let mut objects = Objects::default();
    let Some(files) = list_files(dir, diags) else {
        return objects;
    };
    for (name, path) in files {
        match read_manifest(&path, max_file_size) {
            Ok(text) => objects.add_file(&name, &text, diags),
            Err(e) => diags.push(diag(path.display().to_string(), "", "", e.to_string())),
        }
    }
    objects.log_ignored();
    objects
}

/// The manifest files of `dir`, sorted by name; `None` (with a diagnostic)
/// when the directory cannot be read.
pub(super) fn list_files(
    dir: &Path,
    diags: &mut Vec<Diagnostic>,
) -> Option<Vec<(String, std::path::PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            diags.push(diag(
                dir.display().to_string(),
                "",
                "",
                format!("cannot read the manifest directory: {e}"),
            ));
            return None;
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                diags.push(diag(
                    dir.display().to_string(),
                    "",
                    "",
                    format!("cannot list the manifest directory: {e}"),
                ));
                continue;
            }
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        // Dot files are editor temporaries and ConfigMap volume internals (`..data`).
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        files.push((name, entry.path()));
    }
    files.sort();
    Some(files)
}

impl Objects {
    pub(super) fn log_ignored(&mut self) {
        for (kind, file) in std::mem::take(&mut self.ignored) {
            tracing::debug!(kind, file, "kind not used by lb-agent; ignored");
        }
    }

    /// Whether `other` differs from this only in the contents of its
    /// EndpointSlices: the same objects of every other kind, and the same
    /// slices (names and sources) in the same order.
    pub(super) fn same_but_slice_contents(&self, other: &Objects) -> bool {
        fn same<T: PartialEq>(a: &[Sourced<T>], b: &[Sourced<T>]) -> bool {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| x.source == y.source && x.obj == y.obj)
        }
        same(&self.services, &other.services)
            && same(&self.pods, &other.pods)
            && same(&self.endpoints, &other.endpoints)
            && self.slices.len() == other.slices.len()
            && self.slices.iter().zip(&other.slices).all(|(x, y)| {
                x.namespace == y.namespace && x.name == y.name && x.source == y.source
            })
    }

    /// Adds another file's objects after this one's: an object already
    /// defined here is reported and skipped, as within one file.
    pub(super) fn merge(&mut self, other: &Objects, diags: &mut Vec<Diagnostic>) {
        fn add<T: Clone + super::HasMeta>(
            seen: &mut HashMap<(&'static str, SmolStr, SmolStr), SmolStr>,
            into: &mut Vec<Sourced<T>>,
            from: &[Sourced<T>],
            kind: &'static str,
            diags: &mut Vec<Diagnostic>,
        ) {
            for o in from {
                let meta = o.obj.names();
                let namespace = meta.namespace().to_owned();
                let name = meta.name().to_owned();
                let object = object_label(kind, &namespace, &name);
                let key = (kind, SmolStr::from(namespace), SmolStr::from(name));
                if let Some(first) = seen.get(&key) {
                    diags.push(diag(
                        o.source.clone(),
                        object.clone(),
                        "metadata.name",
                        format!(
                            "{object} is already defined in {first}; this definition is ignored"
                        ),
                    ));
                    continue;
                }
                seen.insert(key, o.source.clone());
                into.push(o.clone());
            }
        }
        add(
            &mut self.seen,
            &mut self.services,
            &other.services,
            "Service",
            diags,
        );
        add(&mut self.seen, &mut self.pods, &other.pods, "Pod", diags);
        add(
            &mut self.seen,
            &mut self.endpoints,
            &other.endpoints,
            "Endpoints",
            diags,
        );
        for slice in &other.slices {
            let object = object_label("EndpointSlice", &slice.namespace, &slice.name);
            let key = ("EndpointSlice", slice.namespace.clone(), slice.name.clone());
            if let Some(first) = self.seen.get(&key) {
                diags.push(diag(
                    slice.source.clone(),
                    object.clone(),
                    "metadata.name",
                    format!("{object} is already defined in {first}; this definition is ignored"),
                ));
                continue;
            }
            self.seen.insert(key, slice.source.clone());
            self.slices.push(slice.clone());
        }
        self.ignored.extend(other.ignored.iter().cloned());
    }

    /// Parses one multi-document file; `file` names it in sources.
    pub(super) fn add_file(&mut self, file: &str, text: &str, diags: &mut Vec<Diagnostic>) {
        for (i, doc) in split_documents(text).into_iter().enumerate() {
            self.add_document(&doc, format!("{file}#{}", i + 1), diags);
        }
    }

    /// Drops what only parsing and merging need, for a file kept in the
    /// cache (merging starts from an empty `Objects`).
    pub(super) fn shrink(&mut self) {
        self.seen = HashMap::new();
        self.services.shrink_to_fit();
        self.pods.shrink_to_fit();
        self.endpoints.shrink_to_fit();
        self.slices.shrink_to_fit();
    }

    fn add_document(&mut self, doc: &Doc<'_>, source: String, diags: &mut Vec<Diagnostic>) {
        // Fast path: decoding straight from the text halves the load time of
        // big directories. Anything unusual, including every error, takes the
        // slow path, which knows enough of the object to report it well.
        if let Some(known) = quick_kind(doc.text)
            && let Ok(obj) = decode_fast(known, serde_yaml::Deserializer::from_str(doc.text))
        {
            self.accept(obj, source, diags);
            return;
        }
        let value = match serde_yaml::from_str::<Value>(doc.text) {
            Ok(value) => value,
            Err(_) => {
                // Parse again at the document's place in the file, so the
                // error's line numbers are the file's. Errors are rare;
                // padding every document would be quadratic.
                let padded = format!("{}{}", "\n".repeat(doc.line - 1), doc.text);
                let message = match serde_yaml::from_str::<Value>(&padded) {
                    Err(e) => format!("invalid YAML: {e}"),
                    Ok(_) => "invalid YAML".to_owned(),
                };
                diags.push(diag(source, "", "", message));
                return;
            }
        };
        if !value.is_null() {
            self.add_value(value, source, true, diags);
        }
    }

    fn add_value(
        &mut self,
        value: Value,
        source: String,
        list_ok: bool,
        diags: &mut Vec<Diagnostic>,
    ) {
        let Value::Mapping(map) = &value else {
            diags.push(diag(
                source,
                "",
                "",
                "not a Kubernetes object (expected a mapping with apiVersion and kind)",
            ));
            return;
        };
        let str_at = |key: &str| map.get(key).and_then(Value::as_str).unwrap_or_default();
        let api_version = str_at("apiVersion").to_owned();
        let kind = str_at("kind").to_owned();
        let meta = map.get("metadata");
        let meta_str = |key: &str| {
            meta.and_then(|m| m.get(key))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let name = meta_str("name").unwrap_or_default();
        let namespace = meta_str("namespace").unwrap_or("default");
        let object = object_label(&kind, namespace, name);
        if kind.is_empty() {
            diags.push(diag(
                source,
                object,
                "kind",
                "missing kind; the object is ignored",
            ));
            return;
        }
        if api_version.is_empty() {
            diags.push(diag(
                source,
                object,
                "apiVersion",
                "missing apiVersion; the object is ignored",
            ));
            return;
        }
        let (known, expected) = match Known::from_kind(&kind) {
            Some(known) => (Some(known), known.api_version()),
            None if kind == "List" => (None, "v1"),
            None => {
                let file = super::file_of(&source).to_owned();
                self.ignored.insert((kind, file));
                return;
            }
        };
        if api_version != expected {
            diags.push(diag(
                source,
                object,
                "apiVersion",
                format!(
                    "apiVersion {api_version} is not supported for {kind} (expected {expected}); the object is ignored"
                ),
            ));
            return;
        }
        let Some(known) = known else {
            self.add_list(value, source, list_ok, diags);
            return;
        };
        match decode(known, value) {
            Ok(obj) => self.accept(obj, source, diags),
            Err(e) => {
                let path = e.path().to_string();
                let field = if path == "." { String::new() } else { path };
                diags.push(diag(
                    source,
                    object,
                    field,
                    format!("{}; the object is ignored", e.inner()),
                ));
            }
        }
    }

    fn add_list(
        &mut self,
        value: Value,
        source: String,
        list_ok: bool,
        diags: &mut Vec<Diagnostic>,
    ) {
        if !list_ok {
            diags.push(diag(
                source,
                "List",
                "",
                "a List inside a List is not supported; ignored",
            ));
            return;
        }
        let Value::Mapping(mut map) = value else {
            return;
        };
        match map.remove("items") {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    if !item.is_null() {
                        self.add_value(item, format!("{source}.items[{i}]"), false, diags);
                    }
                }
            }
            Some(_) => diags.push(diag(
                source,
                "List",
                "items",
                "items must be a list of objects",
            )),
        }
    }

    /// Stores a decoded object under its (defaulted) namespace, unless it has
    /// no name or an earlier file already defined it.
    fn accept(&mut self, mut obj: Decoded, source: String, diags: &mut Vec<Diagnostic>) {
        let kind = obj.kind().name();
        let meta = obj.meta_mut();
        let namespace = meta
            .namespace
            .clone()
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        meta.namespace = Some(namespace.clone());
        let name = meta.name.clone().unwrap_or_default();
        let object = object_label(kind, &namespace, &name);
        if name.is_empty() {
            diags.push(diag(
                source,
                object,
                "metadata.name",
                "missing metadata.name; the object is ignored",
            ));
            return;
        }
        let checked = match &obj {
            Decoded::Service(o) => validate::service(o),
            Decoded::Pod(o) => validate::pod(o),
            Decoded::Endpoints(o) => validate::endpoints(o),
            Decoded::EndpointSlice(o) => validate::endpoint_slice(o),
        };
        if let Err((field, message)) = checked {
            diags.push(diag(
                source,
                object,
                field,
                format!("{message}; the object is ignored, as the API server would refuse it"),
            ));
            return;
        }
        let key = (kind, SmolStr::from(namespace), SmolStr::from(name));
        if let Some(first) = self.seen.get(&key) {
            diags.push(diag(
                source,
                object.clone(),
                "metadata.name",
                format!("{object} is already defined in {first}; this definition is ignored"),
            ));
            return;
        }
        // Shared by the object, the index's info of it and this record.
        let source = SmolStr::from(source);
        self.seen.insert(key, source.clone());
        match obj {
            Decoded::Service(obj) => self.services.push(Sourced {
                obj: std::sync::Arc::new(slim::service(*obj)),
                source,
            }),
            Decoded::Pod(obj) => self.pods.push(Sourced {
                obj: std::sync::Arc::new(slim::pod(*obj)),
                source,
            }),
            Decoded::Endpoints(obj) => self.endpoints.push(Sourced {
                obj: std::sync::Arc::new(slim::endpoints(*obj)),
                source,
            }),
            Decoded::EndpointSlice(obj) => {
                let mut info = SliceInfo::from(&*obj);
                info.source = source;
                self.slices.push(std::sync::Arc::new(info));
            }
        }
    }
}

/// `Kind namespace/name`, as diagnostics name objects; just the kind when
/// the name is missing.
fn object_label(kind: &str, namespace: &str, name: &str) -> String {
    match (kind.is_empty(), name.is_empty()) {
        (_, true) => kind.to_owned(),
        (true, false) => format!("{namespace}/{name}"),
        (false, false) => format!("{kind} {namespace}/{name}"),
    }
}

/// The kinds the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    Service,
    Pod,
    Endpoints,
    EndpointSlice,
}

impl Known {
    fn from_kind(kind: &str) -> Option<Self> {
        Some(match kind {
            "Service" => Known::Service,
            "Pod" => Known::Pod,
            "Endpoints" => Known::Endpoints,
            "EndpointSlice" => Known::EndpointSlice,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Known::Service => "Service",
            Known::Pod => "Pod",
            Known::Endpoints => "Endpoints",
            Known::EndpointSlice => "EndpointSlice",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Known::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
}

enum Decoded {
    // Boxed: the kinds differ in size by kilobytes.
    Service(Box<Service>),
    Pod(Box<Pod>),
    Endpoints(Box<Endpoints>),
    EndpointSlice(Box<EndpointSlice>),
}

impl Decoded {
    fn kind(&self) -> Known {
        match self {
            Decoded::Service(_) => Known::Service,
            Decoded::Pod(_) => Known::Pod,
            Decoded::Endpoints(_) => Known::Endpoints,
            Decoded::EndpointSlice(_) => Known::EndpointSlice,
        }
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Decoded::Service(o) => &mut o.metadata,
            Decoded::Pod(o) => &mut o.metadata,
            Decoded::Endpoints(o) => &mut o.metadata,
            Decoded::EndpointSlice(o) => &mut o.metadata,
        }
    }
}

/// Decodes with the failing field's path, e.g. `spec.ports[0].port`.
fn decode<'de, D: serde::Deserializer<'de>>(
    known: Known,
    de: D,
) -> Result<Decoded, serde_path_to_error::Error<D::Error>> {
    Ok(match known {
        Known::Service => Decoded::Service(Box::new(serde_path_to_error::deserialize(de)?)),
        Known::Pod => Decoded::Pod(Box::new(serde_path_to_error::deserialize(de)?)),
        Known::Endpoints => Decoded::Endpoints(Box::new(serde_path_to_error::deserialize(de)?)),
        Known::EndpointSlice => {
            Decoded::EndpointSlice(Box::new(serde_path_to_error::deserialize(de)?))
        }
    })
}

/// [`decode`] without the path tracking, which the fast path never reports.
fn decode_fast<'de, D: serde::Deserializer<'de>>(known: Known, de: D) -> Result<Decoded, D::Error> {
    use serde::Deserialize;
    Ok(match known {
        Known::Service => Decoded::Service(Box::new(Service::deserialize(de)?)),
        Known::Pod => Decoded::Pod(Box::new(Pod::deserialize(de)?)),
        Known::Endpoints => Decoded::Endpoints(Box::new(Endpoints::deserialize(de)?)),
        Known::EndpointSlice => Decoded::EndpointSlice(Box::new(EndpointSlice::deserialize(de)?)),
    })
}

/// The kind of a plainly written object (`kind:` and `apiVersion:` as
/// top-level block keys), without parsing it. `None` for anything else.
fn quick_kind(text: &str) -> Option<Known> {
    let (mut kind, mut api_version) = (None, None);
    for line in text.lines() {
        let slot = if let Some(rest) = line.strip_prefix("kind:") {
            (&mut kind, rest)
        } else if let Some(rest) = line.strip_prefix("apiVersion:") {
            (&mut api_version, rest)
        } else {
            continue;
        };
        let (target, rest) = slot;
        if target.is_some() {
            return None;
        }
        let value = rest.split(" #").next().unwrap_or_default().trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        *target = Some(value);
    }
    let known = Known::from_kind(kind?)?;
    (api_version? == known.api_version()).then_some(known)
}

/// One YAML document of a file.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Doc<'a> {
    pub text: &'a str,
    /// 1-based line of the file where `text` starts.
    pub line: usize,
}

/// Splits at document markers ourselves, instead of letting serde_yaml
/// iterate, so a syntax error in one document does not lose the documents
/// after it. Counting follows serde_yaml: content before the first `---` is a
/// document only if it holds more than comments.
pub(super) fn split_documents(text: &str) -> Vec<Doc<'_>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut explicit = false;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let content = line.trim_end_matches(['\n', '\r']);
        if is_marker(content, "---") {
            push_doc(&mut docs, &text[start..offset], start_line, explicit);
            // Content may follow the marker on the same line (`--- |`).
            start = offset + 3;
            start_line = i + 1;
            explicit = true;
        } else if is_marker(content, "...") {
            push_doc(&mut docs, &text[start..offset], start_line, explicit);
            start = offset + line.len();
            start_line = i + 2;
            explicit = false;
        }
        offset += line.len();
    }
    push_doc(&mut docs, &text[start..], start_line, explicit);
    docs
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

fn push_doc<'a>(docs: &mut Vec<Doc<'a>>, text: &'a str, line: usize, explicit: bool) {
    let blank = text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l.starts_with('%')
    });
    if explicit || !blank {
        docs.push(Doc { text, line });
    }
}
