//! End-to-end: `lb-agent status` and `lb-agent trace` tell the truth about
//! the real programs. `trace` shows exactly the K connects a client made
//! through a ClusterIP, each with the backend the client reached, and
//! refusals as refused; its switch (`LB_TRACE`) is 0 before and after,
//! and the lease of a tracer killed outright runs out.
//! `status` shows the programs attached to the test's cgroup, the maps'
//! fill as `list` reads it, the kernel's features and the running agent,
//! then the pins alone once it stopped. Privileged: run by
//! `cargo xtask test` with `--test-threads=1`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    Bins, Lab, back_end_at, endpoints, find_service, http_echo_slice, pod_ip, pod_ip6, run,
    selector_service, sys,
};

const SYNC: Duration = Duration::from_secs(15);
const PODS: &[(&str, u8)] = &[("back-end-1", 11), ("back-end-2", 12), ("back-end-3", 13)];
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 101, 10);
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 101, 20);

fn bins() -> Bins {
    lb_tests::test_bins!()
}

/// The textbook back-end at a fixed ClusterIP, and `empty`, whose selector
/// matches no pod.
fn manifests() -> String {
    format!(
        "{}\n---\n{}",
        back_end_at(CLUSTER_IP, PODS),
        selector_service("empty", EMPTY_IP, "nobody")
    )
}

/// A lab whose agent serves `back-end` (3 endpoints) and `empty`.
fn lab() -> Lab {
    let mut lab = Lab::running(&bins(), PODS, &manifests()).expect("lab");
    lab.agent
        .wait_for("back-end and empty", SYNC, |d| {
            endpoints(d, "default", "back-end", 80).len() == 3
                && find_service(d, "default", "empty").is_some()
        })
        .unwrap();
    lab
}

/// The trace switch as the programs read it.
fn trace_lease(bpffs: &Path) -> u64 {
    sys::PinnedMap::open(&bpffs.join("LB_TRACE"))
        .expect("LB_TRACE pinned")
        .get::<u32, u64>(&0)
        .expect("LB_TRACE[0]")
}

/// A running `lb-agent trace`, its stdout and stderr in files.
struct Tracer {
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
}

impl Tracer {
    /// Starts it and waits until it says it traces (the switch is on).
    fn start(lab: &Lab, tag: &str, args: &[&str]) -> Self {
        let out = lab.work.path().join(format!("trace-{tag}.out"));
        let err = lab.work.path().join(format!("trace-{tag}.err"));
        let child = Command::new(&lab.bins.agent)
            .arg("trace")
            .arg("--bpffs")
            .arg(&lab.agent.bpffs)
            .args(["-o", "json"])
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .expect("starting lb-agent trace");
        let mut t = Self {
            child: Some(child),
            out,
            err,
        };
        let deadline = Instant::now() + SYNC;
        while !fs::read_to_string(&t.err)
            .unwrap_or_default()
            .contains("tracing translations")
        {
            let exited = t.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "lb-agent trace did not start: {}",
                fs::read_to_string(&t.err).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    /// SIGTERM, as Ctrl-C or kill would; returns the events it printed.
    fn stop(mut self) -> Vec<serde_json::Value> {
        let mut child = self.child.take().unwrap();
        sys::terminate(&mut child, Duration::from_secs(10)).expect("trace exits on SIGTERM");
        let mut text = String::new();
        fs::File::open(&self.out)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }
}

impl Tracer {
    /// Starts `lb-agent trace -o json` behind a gate: a shell blocked
    /// reading the FIFO `gate` until [`open_gate`] writes a line to it per
    /// tracer, so tracers gated together exec at the same instant. Does
    /// not wait for it to trace.
    fn spawn_gated(lab: &Lab, tag: &str, gate: &Path) -> Self {
        let out = lab.work.path().join(format!("trace-{tag}.out"));
        let err = lab.work.path().join(format!("trace-{tag}.err"));
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"read _ < "$0"; exec "$@""#)
            .arg(gate)
            .arg(&lab.bins.agent)
            .arg("trace")
            .arg("--bpffs")
            .arg(&lab.agent.bpffs)
            .args(["-o", "json"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .expect("starting a gated lb-agent trace");
        Self {
            child: Some(child),
            out,
            err,
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// `None` while it runs, else whether it exited successfully.
    fn exited(&mut self) -> Option<bool> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        Some(status.success())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no chance to clear the lease.
    fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn trace_shows_each_translation_and_refusal_while_on_and_nothing_after() {
    let lab = lab();
    let bpffs = lab.agent.bpffs.clone();
    assert_eq!(
        trace_lease(&bpffs),
        0,
        "tracing is off until someone traces"
    );

    let all = Tracer::start(&lab, "all", &[]);
    assert_ne!(trace_lease(&bpffs), 0, "on while the tracer runs");
    // The ring has one reader: a second tracer is refused, and says why.
    let second = Command::new(&lab.bins.agent)
        .arg("trace")
        .arg("--bpffs")
        .arg(&bpffs)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another lb-agent trace"),
        "{second:?}"
    );

    const K: u64 = 25;
    let report = lab.connects_ok(&format!("{CLUSTER_IP}:80"), K);
    const R: u64 = 4;
    lab.connects_refused(&format!("{EMPTY_IP}:80"), R);
    let events = all.stop();
    assert_eq!(trace_lease(&bpffs), 0, "off once the tracer stopped");

    let cgroup_id = fs::metadata(&lab.cgroup.path).unwrap().ino();
    let translated: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["outcome"] == "translated")
        .collect();
    assert_eq!(translated.len() as u64, K, "{events:#?}");
    // Each event is one connect of the client: its own socket, from the
    // client's cgroup and namespace, to the frontend, and to the backend
    // the client then reached.
    let mut per_pod: BTreeMap<String, u64> = BTreeMap::new();
    let mut cookies = BTreeSet::new();
    let mut netns = BTreeSet::new();
    for e in &translated {
        assert_eq!(e["hook"], "connect4", "{e}");
        assert_eq!(e["protocol"], "TCP", "{e}");
        assert_eq!(e["frontend"], format!("{CLUSTER_IP}:80"), "{e}");
        assert_eq!(e["cgroupId"], cgroup_id, "{e}");
        assert_eq!(e["service"]["namespace"], "default", "{e}");
        assert_eq!(e["service"]["name"], "back-end", "{e}");
        let backend = e["backend"].as_str().unwrap();
        let pod = PODS
            .iter()
            .find(|(_, octet)| backend == format!("{}:80", pod_ip(*octet)))
            .unwrap_or_else(|| panic!("backend {backend} is no pod"));
        *per_pod.entry(pod.0.to_owned()).or_default() += 1;
        cookies.insert(e["cookie"].as_u64().unwrap());
        netns.insert(e["netnsCookie"].as_u64().unwrap());
    }
    assert_eq!(per_pod, report.backends, "the backends the client reached");
    assert_eq!(cookies.len() as u64, K, "one socket per connect");
    assert_eq!(netns.len(), 1, "one client namespace: {netns:?}");
    assert!(!netns.contains(&0));
    let refusals: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["outcome"] == "refused")
        .collect();
    assert_eq!(refusals.len() as u64, R, "{events:#?}");
    assert_eq!(events.len() as u64, K + R, "nothing else: {events:#?}");
    assert_refused(&refusals);

    // --service: only that Service's events.
    let empty = Tracer::start(&lab, "empty", &["--service", "default/empty"]);
    lab.connects_ok(&format!("{CLUSTER_IP}:80"), 5);
    lab.connects_refused(&format!("{EMPTY_IP}:80"), 3);
    let only_empty = empty.stop();
    assert_eq!(only_empty.len(), 3, "{only_empty:#?}");
    assert_refused(&only_empty.iter().collect::<Vec<_>>());
    assert_eq!(trace_lease(&bpffs), 0);

    // Tracing off: connects are translated, and nothing is traced.
    lab.connects_ok(&format!("{CLUSTER_IP}:80"), 5);
    let after = Tracer::start(&lab, "after", &["--frontend", &format!("{CLUSTER_IP}:80")]);
    assert!(
        after.stop().is_empty(),
        "connects made while off are not traced"
    );
    assert_eq!(trace_lease(&bpffs), 0);

    // A tracer killed outright leaves its lease, which runs out on its
    // own; the next tracer clears it on exit.
    let killed = Tracer::start(&lab, "killed", &[]);
    assert_eq!(status(&lab)["tracing"], true);
    killed.kill();
    assert_ne!(trace_lease(&bpffs), 0, "nobody cleared it");
    let deadline = Instant::now() + SYNC;
    while status(&lab)["tracing"] == true {
        assert!(Instant::now() < deadline, "the lease never ran out");
        std::thread::sleep(Duration::from_millis(100));
    }
    let next = Tracer::start(&lab, "next", &[]);
    assert!(next.stop().is_empty());
    assert_eq!(trace_lease(&bpffs), 0, "cleared by the next tracer");
}

/// Refusals of `empty`: its frontend, no backend.
fn assert_refused(events: &[&serde_json::Value]) {
    for e in events {
        assert_eq!(e["frontend"], format!("{EMPTY_IP}:80"), "{e}");
        assert_eq!(e["backend"], serde_json::Value::Null, "{e}");
        assert_eq!(e["outcome"], "refused", "{e}");
        assert_eq!(e["service"]["name"], "empty", "{e}");
    }
}

fn status(lab: &Lab) -> serde_json::Value {
    lab.agent.status_json().unwrap()
}

fn by_name<'a>(list: &'a serde_json::Value, key: &str, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|m| m[key] == name)
        .unwrap_or_else(|| panic!("no {name} in {list:#}"))
}

#[test]
fn status_shows_attachments_maps_features_and_the_agent() {
    let mut lab = lab();
    let doc = status(&lab);
    assert_eq!(doc["installed"], true, "{doc:#}");
    assert_eq!(doc["tracing"], false, "{doc:#}");
    let agent = &doc["agent"];
    assert_eq!(agent["running"], true, "{doc:#}");
    assert_eq!(agent["pid"], lab.agent.pid().unwrap(), "{doc:#}");
    assert!(agent["syncs"].as_u64().unwrap() >= 1, "{doc:#}");
    let (started, synced) = (
        agent["started"].as_f64().unwrap(),
        agent["lastSync"].as_f64().unwrap(),
    );
    assert!(started > 1.7e9 && synced >= started, "{doc:#}");

    // Every program attached to the test's cgroup, which is not the root.
    let cgroup_id = fs::metadata(&lab.cgroup.path).unwrap().ino();
    let programs = doc["programs"].as_array().unwrap();
    assert_eq!(programs.len(), 11, "{doc:#}");
    for p in programs {
        assert_eq!(p["attached"], true, "{p}");
        assert_eq!(p["cgroupId"], cgroup_id, "{p}");
        assert_eq!(p["cgroup"], lab.cgroup.path.to_str().unwrap(), "{p}");
        assert_eq!(p["hostRoot"], false, "{p}");
    }
    let connect4 = by_name(&doc["programs"], "program", "lb_connect4");
    assert_eq!(connect4["pin"], "link_connect4");

    // The maps' fill is what `list` reads; every map is pinned.
    let list = lab.agent.list_json().unwrap();
    for m in list["maps"].as_array().unwrap() {
        let s = by_name(&doc["maps"], "map", m["map"].as_str().unwrap());
        assert_eq!(
            (&s["entries"], &s["capacity"]),
            (&m["entries"], &m["capacity"])
        );
    }
    let services = by_name(&doc["maps"], "map", "LB_SERVICES");
    assert_eq!(services["entries"], 2, "back-end and empty: {services}");
    for m in doc["maps"].as_array().unwrap() {
        assert_eq!(m["pinned"], true, "{m}");
    }
    assert_eq!(
        by_name(&doc["maps"], "map", "LB_TRACE_RING")["type"],
        "RingBuf"
    );

    // This machine's kernel (6.x) has them all.
    let f = &doc["features"];
    for feature in [
        "getpeernameHooks",
        "netnsCookies",
        "ringBuffer",
        "sockDestroy",
    ] {
        assert_eq!(f[feature], "yes", "{feature}: {f}");
    }

    // The text form says the same.
    let text = run(Command::new(&lab.bins.agent)
        .arg("status")
        .arg("--bpffs")
        .arg(&lab.agent.bpffs))
    .unwrap();
    assert!(
        text.contains(&format!("agent: running, pid {}", lab.agent.pid().unwrap())),
        "{text}"
    );
    assert!(
        text.contains(&format!("attached to {}", lab.cgroup.path.display())),
        "{text}"
    );

    // Stopped: the pins keep serving, the last agent's sync stays known.
    lab.agent.stop().unwrap();
    let doc = status(&lab);
    assert_eq!(doc["agent"]["running"], false, "{doc:#}");
    assert_eq!(doc["agent"]["pid"], serde_json::Value::Null, "{doc:#}");
    assert!(doc["agent"]["lastSync"].as_f64() >= Some(synced), "{doc:#}");
    assert_eq!(
        by_name(&doc["programs"], "program", "lb_connect4")["attached"],
        true
    );

    // Uninstalled: nothing pinned, nothing attached.
    lab.agent.uninstall().unwrap();
    let doc = status(&lab);
    assert_eq!(doc["installed"], false, "{doc:#}");
    for p in doc["programs"].as_array().unwrap() {
        assert_eq!(
            (&p["pinned"], &p["attached"]),
            (&false.into(), &false.into()),
            "{p}"
        );
    }
}

/// Releases every tracer waiting on `gate` at once: one line each, in a
/// single write (the FIFO is held open by `writer`, so nothing written is
/// lost whoever reads first).
fn open_gate(writer: &mut fs::File, tracers: usize) {
    use std::io::Write as _;
    writer.write_all(&b"\n".repeat(tracers)).unwrap();
}

/// Two `lb-agent trace` processes released at the same instant, again and
/// again: each time exactly one traces (it holds the tracers' lock, the
/// status names it, and it sees the connects) and the other exits at once,
/// saying another tracer reads the ring.
#[test]
fn of_two_tracers_started_at_once_exactly_one_traces() {
    const ROUNDS: usize = 10;
    let mut lab = lab();
    let bpffs = lab.agent.bpffs.clone();
    let gate = lab.work.path().join("gate");
    run(Command::new("mkfifo").arg(&gate)).unwrap();
    // Read and write: opening it never blocks, and keeps the FIFO's
    // buffer alive between the two readers.
    let mut writer = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&gate)
        .unwrap();
    for round in 0..ROUNDS {
        let mut pair = [
            Tracer::spawn_gated(&lab, &format!("{round}a"), &gate),
            Tracer::spawn_gated(&lab, &format!("{round}b"), &gate),
        ];
        // Both shells reach their read of the gate meanwhile (a late one
        // still finds its line: this only makes a tie likelier).
        std::thread::sleep(Duration::from_millis(200));
        open_gate(&mut writer, pair.len());
        // The loser exits by itself; the winner announces it traces.
        let deadline = Instant::now() + SYNC;
        let (winner, loser) = loop {
            let states = [pair[0].exited(), pair[1].exited()];
            let tracing = |t: &Tracer| t.stderr().contains("tracing translations");
            match states {
                [None, Some(_)] if tracing(&pair[0]) => break (0, 1),
                [Some(_), None] if tracing(&pair[1]) => break (1, 0),
                [Some(_), Some(_)] => panic!(
                    "round {round}: both exited: {:?} / {:?}",
                    pair[0].stderr(),
                    pair[1].stderr()
                ),
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no single tracer: {states:?} {:?} / {:?}",
                pair[0].stderr(),
                pair[1].stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(pair[loser].exited(), Some(false), "round {round}");
        let refusal = pair[loser].stderr();
        assert!(
            refusal.contains(&format!(
                "another lb-agent trace (pid {}) is reading",
                pair[winner].pid()
            )),
            "round {round}: {refusal}"
        );
        let doc = status(&lab);
        assert_eq!(doc["tracing"], true, "round {round}: {doc:#}");
        assert_eq!(
            doc["tracerPid"],
            pair[winner].pid(),
            "round {round}: {doc:#}"
        );
        // The one left sees every connect.
        lab.connects_ok(&format!("{CLUSTER_IP}:80"), 3);
        let [a, b] = pair;
        let (won, lost) = if winner == 0 { (a, b) } else { (b, a) };
        drop(lost);
        let events = won.stop();
        assert_eq!(events.len(), 3, "round {round}: {events:#?}");
        assert_eq!(trace_lease(&bpffs), 0, "round {round}: off again");
    }

    // The lock decides, not the lease: while another process holds it, a
    // tracer is refused although nothing traces.
    // Its own process group, so that flock(1) and its sleep go together.
    let mut holder = Command::new("flock")
        .arg(bpffs.join("trace_lock"))
        .args(["sleep", "60"])
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + SYNC;
    while status(&lab)["tracerPid"] != holder.id() {
        assert!(Instant::now() < deadline, "flock(1) never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(trace_lease(&bpffs), 0);
    let refused = Command::new(&lab.bins.agent)
        .arg("trace")
        .arg("--bpffs")
        .arg(&bpffs)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(&format!(
            "another lb-agent trace (pid {}) is reading",
            holder.id()
        )),
        "{refused:?}"
    );
    assert_eq!(trace_lease(&bpffs), 0, "the refused tracer wrote nothing");
    // SAFETY: kill(2) of the process group this test started.
    unsafe { libc::kill(-i32::try_from(holder.id()).unwrap(), libc::SIGKILL) };
    holder.wait().unwrap();
    assert!(Tracer::start(&lab, "after-flock", &[]).stop().is_empty());

    // `uninstall` takes the tracers' lock directory with the pins.
    assert!(bpffs.join("trace_lock").is_dir());
    lab.agent.stop().unwrap();
    let out = lab.agent.uninstall().unwrap();
    assert!(!bpffs.exists(), "{out}");
}

/// An IPv6 ClusterIP: connect6 and sendmsg6 events name the IPv6
/// frontend and the pod's IPv6 address each connect or datagram went to.
#[test]
fn trace_shows_ipv6_translations_frontend_to_backend() {
    const WEB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0x101, 0x10);
    const ECHO: u16 = 5300;
    let service = format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web6
spec:
  clusterIP: \"{WEB6}\"
  clusterIPs: [\"{WEB6}\"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports:
    - name: http
      port: 80
      protocol: TCP
      targetPort: 80
    - name: echo
      port: {ECHO}
      protocol: UDP
      targetPort: 80
"
    );
    let addrs: Vec<IpAddr> = PODS.iter().map(|(_, o)| pod_ip6(*o).into()).collect();
    let slice = http_echo_slice("web6-1", "web6", &addrs, 80);
    let mut lab = Lab::running(&bins(), PODS, &format!("{service}{slice}")).expect("lab");
    lab.agent
        .wait_for("web6", SYNC, |d| {
            endpoints(d, "default", "web6", 80).len() == 3
                && endpoints(d, "default", "web6", ECHO).len() == 3
        })
        .unwrap();
    let pod_of = |backend: &str| -> String {
        PODS.iter()
            .find(|(_, octet)| backend == format!("[{}]:80", pod_ip6(*octet)))
            .unwrap_or_else(|| panic!("backend {backend} is no pod's IPv6 address"))
            .0
            .to_owned()
    };

    let tracer = Tracer::start(&lab, "ipv6", &[]);
    const K: u64 = 12;
    let tcp = format!("[{WEB6}]:80");
    let report = lab.connects_ok(&tcp, K);
    // Unconnected UDP: three sockets, four datagrams each.
    let udp = format!("[{WEB6}]:{ECHO}");
    let datagrams = lab
        .client_json(
            &udp,
            &["--udp-unconnected", "--sockets", "3", "--count", "4"],
        )
        .unwrap();
    let events = tracer.stop();

    let cgroup_id = fs::metadata(&lab.cgroup.path).unwrap().ino();
    let of_hook = |hook: &str| -> Vec<&serde_json::Value> {
        events.iter().filter(|e| e["hook"] == hook).collect()
    };
    let connects = of_hook("connect6");
    assert_eq!(connects.len() as u64, K, "{events:#?}");
    let mut per_pod: BTreeMap<String, u64> = BTreeMap::new();
    for e in &connects {
        assert_eq!(e["protocol"], "TCP", "{e}");
        assert_eq!(e["outcome"], "translated", "{e}");
        assert_eq!(e["frontend"], tcp.as_str(), "{e}");
        assert_eq!(e["cgroupId"], cgroup_id, "{e}");
        assert_eq!(e["service"]["name"], "web6", "{e}");
        assert_eq!(e["service"]["port"], "http", "{e}");
        *per_pod
            .entry(pod_of(e["backend"].as_str().unwrap()))
            .or_default() += 1;
    }
    assert_eq!(per_pod, report.backends, "the backends the client reached");

    let sends = of_hook("sendmsg6");
    assert_eq!(sends.len(), 12, "{events:#?}");
    let mut per_pod: BTreeMap<String, u64> = BTreeMap::new();
    let mut per_socket: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for e in &sends {
        assert_eq!(e["protocol"], "UDP", "{e}");
        assert_eq!(e["frontend"], udp.as_str(), "{e}");
        assert_eq!(e["service"]["port"], "echo", "{e}");
        let pod = pod_of(e["backend"].as_str().unwrap());
        *per_pod.entry(pod.clone()).or_default() += 1;
        per_socket
            .entry(e["cookie"].as_u64().unwrap())
            .or_default()
            .insert(pod);
    }
    assert_eq!(
        per_pod.into_iter().collect::<Vec<_>>(),
        lb_tests::counts(&datagrams["backends"]),
        "the backends that answered: {datagrams}"
    );
    assert_eq!(per_socket.len(), 3, "three sockets: {per_socket:?}");
    assert!(
        per_socket.values().all(|pods| pods.len() == 1),
        "each socket sticks to one backend: {per_socket:?}"
    );
    assert_eq!(events.len(), 24, "nothing else: {events:#?}");
}
