//! HTTP side: routing, discovery, LIST, GET and WATCH.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc};

use crate::selector::{FieldSelector, LabelSelector};
use crate::state::{Event, Filter, RESOURCES, ResourceDef};
use crate::{RequestRecord, Shared};

type Body = BoxBody<Bytes, io::Error>;
type Chunk = Result<Frame<Bytes>, io::Error>;

/// Serves one connection until the client leaves or an outage is simulated.
pub(crate) async fn serve_conn(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut down = shared.conns.subscribe();
    let svc = service_fn(move |req| {
        let resp = handle(&shared, req);
        async move { Ok::<_, Infallible>(resp) }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        _ = conn => {}
        _ = down.changed() => {}
    }
}

fn full(code: StatusCode, body: Vec<u8>) -> Response<Body> {
    let body = Full::new(Bytes::from(body)).map_err(|never| match never {});
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.boxed())
        .unwrap_or_default()
}

fn ok_json(v: &Value) -> Response<Body> {
    full(StatusCode::OK, serde_json::to_vec(v).unwrap_or_default())
}

pub(crate) fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let sc = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    full(
        sc,
        serde_json::to_vec(&status_object(code, reason, message)).unwrap_or_default(),
    )
}

fn bad_request(message: &str) -> Response<Body> {
    status(400, "BadRequest", message)
}

struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }

    /// Errors are a BadRequest message.
    fn number(&self, k: &str) -> Result<Option<u64>, String> {
        match self.get(k).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("invalid {k}: {v:?}")),
        }
    }
}

fn handle(sh: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = Query(
        req.uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default(),
    );
    sh.log_request(RequestRecord {
        method: req.method().to_string(),
        path: path.clone(),
        query: query.0.clone(),
    });
    if req.method() != Method::GET {
        let msg = format!("the fake apiserver only serves GET, not {}", req.method());
        return status(405, "MethodNotAllowed", &msg);
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["version"] => ok_json(&json!({
            "major": "1", "minor": "34", "gitVersion": "v1.34.0-fake", "gitCommit": "fake",
            "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24",
            "compiler": "gc", "platform": "linux/amd64",
        })),
        ["api"] => ok_json(&json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
        })),
        ["apis"] => ok_json(&json!({
            "kind": "APIGroupList", "apiVersion": "v1", "groups": [api_group("discovery.k8s.io")],
        })),
        ["apis", "discovery.k8s.io"] => {
            let mut g = api_group("discovery.k8s.io");
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            ok_json(&g)
        }
        ["api", "v1"] => resource_list("", "v1"),
        ["apis", group, "v1"] if RESOURCES.iter().any(|r| r.group == *group) => {
            resource_list(group, "v1")
        }
        _ => match parse_resource_path(&segs) {
            Some((def, ns, Some(name))) => get(sh, def, ns.unwrap_or(""), name),
            Some((def, ns, None)) => {
                let filter = match build_filter(def, ns, &query) {
                    Ok(f) => f,
                    Err(msg) => return bad_request(&msg),
                };
                if query.flag("watch") {
                    watch(sh, filter, &query)
                } else {
                    list(sh, &filter, &query)
                }
            }
            None => status(
                404,
                "NotFound",
                &format!("the server could not find the requested resource ({path})"),
            ),
        },
    }
}

fn api_group(name: &str) -> Value {
    let gv = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
    json!({"name": name, "versions": [gv], "preferredVersion": gv})
}

fn resource_list(group: &str, version: &str) -> Response<Body> {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(|r| {
            json!({
                "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                "kind": r.kind, "verbs": ["get", "list", "watch"], "shortNames": r.short_names,
            })
        })
        .collect();
    let gv = RESOURCES
        .iter()
        .find(|r| r.group == group)
        .map_or_else(|| version.to_string(), ResourceDef::api_version);
    ok_json(&json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources,
    }))
}

type ResourcePath<'a> = (&'static ResourceDef, Option<&'a str>, Option<&'a str>);

fn parse_resource_path<'a>(segs: &[&'a str]) -> Option<ResourcePath<'a>> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (ns, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    let def = RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)?;
    (ns.is_none() || def.namespaced).then_some((def, ns, name))
}

fn build_filter(def: &'static ResourceDef, ns: Option<&str>, q: &Query) -> Result<Filter, String> {
    let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))
        .map_err(|e| format!("unable to parse requirement: {e}"))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").unwrap_or(""))?;
    Ok(Filter {
        resource: def,
        namespace: ns.map(str::to_string),
        labels,
        fields,
    })
}

fn not_found(def: &ResourceDef, name: &str) -> Response<Body> {
    let what = if def.group.is_empty() {
        def.plural.to_string()
    } else {
        format!("{}.{}", def.plural, def.group)
    };
    status(404, "NotFound", &format!("{what} \"{name}\" not found"))
}

fn get(sh: &Shared, def: &'static ResourceDef, ns: &str, name: &str) -> Response<Body> {
    let st = sh.lock_state();
    let key = (ns.to_string(), name.to_string());
    match st.objects.get(def.plural).and_then(|m| m.get(&key)) {
        Some(obj) => ok_json(obj),
        None => not_found(def, name),
    }
}

/// Continue tokens are `<snapshot rv>.<snapshot id>.<offset>`: opaque to clients, like the real ones.
fn parse_continue(tok: &str) -> Option<(u64, u64, usize)> {
    let mut it = tok.split('.');
    let t = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    it.next().is_none().then_some(t)
}

fn list(sh: &Shared, f: &Filter, q: &Query) -> Response<Body> {
    let limit = match q.number("limit") {
        Ok(l) => l.filter(|l| *l > 0).map(|l| l as usize),
        Err(msg) => return bad_request(&msg),
    };
    if let Err(msg) = q.number("resourceVersion") {
        return bad_request(&msg);
    }
    let mut st = sh.lock_state();
    let (rv, id, items, offset) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(tok) => {
            let Some((rv, id, offset)) = parse_continue(tok) else {
                return bad_request("invalid continue token");
            };
            let Some(snap) = st.snapshots.iter().find(|s| s.id == id && s.rv == rv) else {
                let msg = "The provided continue parameter is too old to display a consistent \
                           list result. You can start a new list without the continue parameter.";
                return status(410, "Expired", msg);
            };
            (rv, Some(id), snap.items.clone(), offset)
        }
        None => (st.rv, None, Arc::new(st.select(f)), 0),
    };
    let offset = offset.min(items.len());
    let end = limit.map_or(items.len(), |l| (offset + l).min(items.len()));
    let mut meta = json!({"resourceVersion": rv.to_string(), "continue": ""});
    if end < items.len() {
        let id = id.unwrap_or_else(|| st.keep_snapshot(items.clone()));
        meta["continue"] = json!(format!("{rv}.{id}.{end}"));
        meta["remainingItemCount"] = json!(items.len() - end);
    }
    drop(st);
    let head = json!({
        "kind": format!("{}List", f.resource.kind),
        "apiVersion": f.resource.api_version(),
        "metadata": meta,
    });
    // Written by hand so a big list is not cloned into one Value first.
    let mut out = serde_json::to_vec(&head).unwrap_or_default();
    out.pop();
    out.extend_from_slice(b",\"items\":[");
    for (i, item) in items[offset..end].iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut out, &**item);
    }
    out.extend_from_slice(b"]}");
    full(StatusCode::OK, out)
}

fn event_line(kind: &str, obj: &Value) -> Bytes {
    let mut out = format!("{{\"type\":\"{kind}\",\"object\":").into_bytes();
    let _ = serde_json::to_writer(&mut out, obj);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

fn bookmark_line(def: &ResourceDef, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let obj = json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": meta});
    event_line("BOOKMARK", &obj)
}

/// What a running watch needs besides its channels.
struct WatchSpec {
    filter: Filter,
    bookmarks: bool,
    timeout: Duration,
    last_rv: u64,
}

fn watch(sh: &Arc<Shared>, filter: Filter, q: &Query) -> Response<Body> {
    let timeout = match q.number("timeoutSeconds") {
        // The real default is a random 30–60 min; a fixed 30 min is close enough.
        Ok(t) => Duration::from_secs(t.unwrap_or(1800)),
        Err(msg) => return bad_request(&msg),
    };
    let start_rv = match q.number("resourceVersion") {
        Ok(rv) => rv.filter(|rv| *rv > 0),
        Err(msg) => return bad_request(&msg),
    };
    let bookmarks = q.flag("allowWatchBookmarks");
    let send_initial = q.flag("sendInitialEvents");
    let st = sh.lock_state();
    // Subscribing under the lock: the receiver sees exactly the events after `st.rv`.
    let events = sh.events.subscribe();
    let mut lines = Vec::new();
    match start_rv.filter(|_| !send_initial) {
        None => {
            // RV unset or "0" (and streaming lists): synthetic ADDED for the current state.
            lines.extend(st.select(&filter).iter().map(|o| event_line("ADDED", o)));
            if send_initial && bookmarks {
                lines.push(bookmark_line(filter.resource, st.rv, true));
            }
        }
        Some(rv) => match st.events_since(rv) {
            Some(evs) => lines.extend(
                evs.iter()
                    .filter_map(|ev| filter.translate(ev))
                    .map(|(kind, obj)| event_line(kind, &obj)),
            ),
            None => {
                let msg = format!("too old resource version: {rv} ({})", st.log_floor + 1);
                let err = event_line("ERROR", &status_object(410, "Expired", &msg));
                return full(StatusCode::OK, err.to_vec());
            }
        },
    }
    let spec = WatchSpec {
        filter,
        bookmarks,
        timeout,
        last_rv: st.rv,
    };
    drop(st);
    let (tx, mut rx) = mpsc::channel::<Chunk>(256);
    tokio::spawn(run_watch(sh.clone(), spec, events, lines, tx));
    let body = StreamBody::new(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(body))
        .unwrap_or_default()
}

/// Keeps `open_watches` exact however the watch task ends.
struct WatchGuard(Arc<Shared>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0
            .open_watches
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

async fn run_watch(
    sh: Arc<Shared>,
    mut spec: WatchSpec,
    mut events: broadcast::Receiver<Arc<Event>>,
    initial: Vec<Bytes>,
    tx: mpsc::Sender<Chunk>,
) {
    let mut severed = sh.sever.subscribe();
    sh.open_watches.send_modify(|n| *n += 1);
    let _guard = WatchGuard(sh.clone());
    for line in initial {
        if tx.send(Ok(Frame::data(line))).await.is_err() {
            return;
        }
    }
    let every = sh.config.bookmark_interval;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let deadline = tokio::time::sleep(spec.timeout);
    tokio::pin!(deadline);
    loop {
        let mut event = false;
        let line = tokio::select! {
            biased;
            _ = severed.changed() => {
                // An error chunk makes hyper drop the connection without the final chunk.
                let _ = tx.send(Err(io::Error::other("watch severed by test control"))).await;
                return;
            }
            _ = tx.closed() => return,
            _ = &mut deadline => {
                if spec.bookmarks {
                    sh.bookmarks_sent.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(Ok(Frame::data(bookmark_line(spec.filter.resource, spec.last_rv, false)))).await;
                }
                return;
            }
            ev = events.recv() => match ev {
                Ok(ev) => {
                    spec.last_rv = ev.rv;
                    match spec.filter.translate(&ev) {
                        Some((kind, obj)) => {
                            event = true;
                            event_line(kind, &obj)
                        }
                        None => continue,
                    }
                }
                // A consumer too slow for the broadcast is dropped, as the apiserver drops slow
                // watchers; the client re-watches from its last RV and the log replays the gap.
                Err(_) => return,
            },
            _ = ticker.tick(), if spec.bookmarks => {
                sh.bookmarks_sent.fetch_add(1, Ordering::Relaxed);
                bookmark_line(spec.filter.resource, spec.last_rv, false)
            }
        };
        if tx.send(Ok(Frame::data(line))).await.is_err() {
            return;
        }
        if event {
            // The connection writes it next, on this same thread.
            let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
                .map_or(0, |t| {
                    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
                });
            sh.event_sent_ns.store(now, Ordering::Relaxed);
        }
    }
}
