//! `fake-apiserver [--listen ADDR] [--bookmark-interval-ms N] [--event-log-capacity N]
//! [--kubeconfig PATH] [FILE.yaml|FILE.json ...]`
//!
//! Serves the fake API for manual cross-checks with kubectl or other clients. Control commands
//! arrive one per line on stdin, so a driving script needs no extra HTTP surface:
//! `apply <json>`, `delete <resource> <namespace|-> <name>`, `compact`, `sever`, `down`, `up`,
//! `rv`, `watches`, `sent` (CLOCK_MONOTONIC ns when a watch event last left for its
//! connection, 0 before the first). Each answers one line on stdout: `ok <value>` or `err <message>`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use lb_fake_apiserver::{Config, FakeApiServer, kubeconfig, resource_for_kind};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

fn usage(msg: &str) -> ExitCode {
    eprintln!("fake-apiserver: {msg}");
    eprintln!(
        "usage: fake-apiserver [--listen ADDR] [--bookmark-interval-ms N] \
         [--event-log-capacity N] [--kubeconfig PATH] [FILE...]"
    );
    ExitCode::from(2)
}

/// Flattens `kind: List` / `*List` documents into their items.
fn objects_in(doc: Value, out: &mut Vec<Value>) {
    let is_list = doc
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k.ends_with("List"));
    match (is_list, doc.get("items")) {
        (true, Some(Value::Array(items))) => out.extend(items.iter().cloned()),
        _ if doc.is_null() => {}
        _ => out.push(doc),
    }
}

fn load(path: &str) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut out = Vec::new();
    if path.ends_with(".json") {
        let doc = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
        objects_in(doc, &mut out);
    } else {
        for de in serde_yaml::Deserializer::from_str(&text) {
            let doc = Value::deserialize(de).map_err(|e| format!("{path}: {e}"))?;
            objects_in(doc, &mut out);
        }
    }
    Ok(out)
}

fn apply(server: &FakeApiServer, obj: Value) -> Result<u64, String> {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    let res = resource_for_kind(kind).ok_or_else(|| format!("unsupported kind {kind:?}"))?;
    server.apply(res, obj).map_err(|e| e.to_string())
}

async fn command(server: &FakeApiServer, line: &str) -> Result<String, String> {
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    match (cmd, rest.split_whitespace().collect::<Vec<_>>().as_slice()) {
        ("apply", _) => {
            let obj = serde_json::from_str(rest).map_err(|e| e.to_string())?;
            apply(server, obj).map(|rv| rv.to_string())
        }
        ("delete", [res, ns, name]) => {
            let ns = if *ns == "-" { "" } else { ns };
            server
                .delete(res, ns, name)
                .map(|rv| rv.to_string())
                .map_err(|e| e.to_string())
        }
        ("compact", []) => {
            server.compact();
            Ok(server.resource_version().to_string())
        }
        ("sever", []) => {
            server.sever_watches();
            Ok(String::new())
        }
        ("down" | "up", []) => {
            server
                .set_available(cmd == "up")
                .await
                .map_err(|e| e.to_string())?;
            Ok(String::new())
        }
        ("rv", []) => Ok(server.resource_version().to_string()),
        ("watches", []) => Ok(server.open_watches().to_string()),
        ("sent", []) => Ok(server.event_sent_ns().to_string()),
        _ => Err(format!("unknown command {line:?}")),
    }
}

/// The control commands' input: stdin read on the server's own thread
/// when it is a pipe (as scripts and the bench give it), so a command wakes
/// no other thread (bench changes at 10,000 Services over 1 ms: 6-17 of 300
/// through tokio's stdin, 0 of 900 this way); tokio's stdin (a blocking
/// read on a thread of its own) otherwise, e.g. a terminal.
fn commands() -> Box<dyn tokio::io::AsyncRead + Unpin + Send> {
    use std::os::fd::AsFd;
    let pipe = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .and_then(tokio::net::unix::pipe::Receiver::from_owned_fd);
    match pipe {
        Ok(pipe) => Box::new(pipe),
        Err(_) => Box::new(tokio::io::stdin()),
    }
}

/// One thread serves every connection, watch and command: a change then
/// reaches its watchers' sockets without waking other threads. The bench
/// times each change from this server's stdin to the agent's maps, and on a
/// 2-vCPU VM each extra wake-up of an idle vCPU was a large share of that
/// (18-30 % of the changes took over 1 ms with worker threads, 2-3 %
/// without, the agent unchanged: 300 changes at 10,000 Services).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut config = Config::default();
    let (mut files, mut kubeconfig_path) = (Vec::new(), None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let parsed: Result<(), String> = match arg.as_str() {
            "--listen" => value("--listen").and_then(|v| {
                listen = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
                Ok(())
            }),
            "--bookmark-interval-ms" => value(&arg).and_then(|v| {
                let ms = v.parse().map_err(|e| format!("{arg} {v}: {e}"))?;
                config.bookmark_interval = Duration::from_millis(ms);
                Ok(())
            }),
            "--event-log-capacity" => value(&arg).and_then(|v| {
                config.event_log_capacity = v.parse().map_err(|e| format!("{arg} {v}: {e}"))?;
                Ok(())
            }),
            "--kubeconfig" => value(&arg).map(|v| kubeconfig_path = Some(v)),
            "-h" | "--help" => return usage("help"),
            f if !f.starts_with('-') => {
                files.push(f.to_string());
                Ok(())
            }
            other => Err(format!("unknown flag {other}")),
        };
        if let Err(e) = parsed {
            return usage(&e);
        }
    }
    if !listen.ip().is_loopback() {
        return usage("only loopback addresses are allowed");
    }
    let server = match FakeApiServer::start_with(config, listen).await {
        Ok(s) => s,
        Err(e) => return usage(&e.to_string()),
    };
    for f in &files {
        let objs = match load(f) {
            Ok(o) => o,
            Err(e) => return usage(&e),
        };
        for obj in objs {
            if let Err(e) = apply(&server, obj) {
                return usage(&format!("{f}: {e}"));
            }
        }
    }
    if let Some(path) = kubeconfig_path
        && let Err(e) = std::fs::write(&path, kubeconfig(&server.url()))
    {
        return usage(&format!("{path}: {e}"));
    }
    println!("listening {}", server.url());
    let mut lines = BufReader::new(commands()).lines();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            line = lines.next_line() => match line {
                // EOF on stdin: keep serving until interrupted.
                Ok(None) | Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return ExitCode::SUCCESS;
                }
                Ok(Some(l)) if l.trim().is_empty() => {}
                Ok(Some(l)) => match command(&server, l.trim()).await {
                    Ok(v) => println!("ok {v}"),
                    Err(e) => println!("err {e}"),
                },
            },
        }
    }
}
