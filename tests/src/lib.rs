//! Fixtures for the privileged end-to-end suites and `cargo xtask demo`.
//!
//! Everything here creates its own network namespaces and child cgroup, never
//! touches the host namespace's routes or the root cgroup, and tears down in
//! `Drop`, so a failing test leaves nothing behind.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

pub mod dns;
pub mod image;
pub mod sys;

/// Prefix of every namespace, cgroup and pin the fixtures create, so a
/// crashed run's leftovers can be found and removed (`cleanup_leftovers`).
pub const PREFIX: &str = "lbt";

/// What `lb-testclient` prints.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientReport {
    pub attempts: u64,
    /// Backend name → connects it answered.
    pub backends: BTreeMap<String, u64>,
    /// Errno name (`ECONNREFUSED`) → count.
    pub errors: BTreeMap<String, u64>,
    pub elapsed_ms: u64,
}

impl ClientReport {
    pub fn ok(&self) -> u64 {
        self.backends.values().sum()
    }
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Paths of the programs the fixtures run.
#[derive(Clone, Debug)]
pub struct Bins {
    pub agent: PathBuf,
    pub server: PathBuf,
    pub client: PathBuf,
}

impl Bins {
    /// Binaries next to `dir` (a cargo target profile directory).
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            agent: dir.join("lb-agent"),
            server: dir.join("lb-testserver"),
            client: dir.join("lb-testclient"),
        }
    }

    /// For this crate's integration tests: the test programs cargo built for
    /// them, and the agent xtask built into the same profile directory
    /// (`target/<profile>/deps/..`), or `$LB_AGENT_BIN`. Use [`test_bins!`].
    pub fn for_test(server: &str, client: &str) -> Self {
        let profile_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent()?.parent().map(PathBuf::from))
            .expect("test executable path");
        Self {
            agent: std::env::var_os("LB_AGENT_BIN")
                .map_or_else(|| profile_dir.join("lb-agent"), PathBuf::from),
            server: server.into(),
            client: client.into(),
        }
    }

    pub fn check(&self) -> anyhow::Result<()> {
        for p in [&self.agent, &self.server, &self.client] {
            if !p.exists() {
                bail!(
                    "{} not found: build it first (cargo xtask test does)",
                    p.display()
                );
            }
        }
        Ok(())
    }
}

/// [`Bins`] for an integration test of this crate (the `env!`s must expand there).
#[macro_export]
macro_rules! test_bins {
    () => {
        $crate::Bins::for_test(
            env!("CARGO_BIN_EXE_lb-testserver"),
            env!("CARGO_BIN_EXE_lb-testclient"),
        )
    };
}

/// A short name unique to this process and call: `lbt<pid><n>`.
pub fn unique_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{PREFIX}{}{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `cmd`, failing with its stderr if it does not succeed.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

/// The pod subnet of every topology: nothing else is routed anywhere.
pub const POD_PREFIX: [u8; 3] = [10, 244, 1];
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
/// The IPv6 pod subnet (ULA), on the same bridge: `fd00:244:1::/64`.
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x1);
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x100);

/// A pod's IPv4 address from the last octet: `10.244.1.<octet>`.
pub fn pod_ip(octet: u8) -> Ipv4Addr {
    Ipv4Addr::new(POD_PREFIX[0], POD_PREFIX[1], POD_PREFIX[2], octet)
}

/// A pod's IPv6 address from the same octet, written with the same digits:
/// `fd00:244:1::<octet>` (10.244.1.11 is fd00:244:1::11).
pub fn pod_ip6(octet: u8) -> Ipv6Addr {
    format!("fd00:244:1::{octet}")
        .parse()
        .expect("an IPv6 address")
}

/// A backend pod of a topology, with one address of each family.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

/// A node namespace with a bridge, one namespace per pod and one client
/// namespace, all on 10.244.1.0/24 and fd00:244:1::/64 (addresses added
/// `nodad`, so they are usable at once). No namespace has a default route,
/// for either family, so a connect to a ClusterIP that was not rewritten
/// fails with ENETUNREACH instead of going anywhere.
pub struct Topology {
    pub node: String,
    pub client: String,
    pub pods: Vec<Pod>,
    servers: Vec<Child>,
    created: Vec<String>,
}

impl Topology {
    /// `pods`: (pod name, last octet of its IP in 10.244.1.0/24).
    pub fn new(prefix: &str, pods: &[(&str, u8)]) -> anyhow::Result<Self> {
        let mut t = Self {
            node: format!("{prefix}-node"),
            client: format!("{prefix}-client"),
            pods: Vec::new(),
            servers: Vec::new(),
            created: Vec::new(),
        };
        t.add_netns(&t.node.clone())?;
        let node = t.node.clone();
        ip(&["-n", &node, "link", "set", "lo", "up"])?;
        ip(&["-n", &node, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "br0",
        ])?;
        add_addr6(&node, "br0", NODE_IP6)?;
        ip(&["-n", &node, "link", "set", "br0", "up"])?;
        t.add_netns(&t.client.clone())?;
        t.plug(&t.client.clone(), "vc", CLIENT_IP, CLIENT_IP6)?;
        for (i, (name, octet)) in pods.iter().enumerate() {
            let netns = format!("{prefix}-p{i}");
            t.add_netns(&netns)?;
            let (addr, addr6) = (pod_ip(*octet), pod_ip6(*octet));
            t.plug(&netns, &format!("vp{i}"), addr, addr6)?;
            t.pods.push(Pod {
                name: (*name).to_owned(),
                netns,
                ip: addr,
                ip6: addr6,
            });
        }
        Ok(t)
    }

    /// Another client namespace on the bridge (`<prefix>-client<n>`,
    /// 10.244.1.<100 + n>), for tests that need clients in two namespaces.
    pub fn add_client(&mut self, n: u8) -> anyhow::Result<String> {
        let netns = format!("{}{n}", self.client);
        self.add_netns(&netns)?;
        let octet = 100 + n;
        self.plug(&netns, &format!("vc{n}"), pod_ip(octet), pod_ip6(octet))?;
        Ok(netns)
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.created.push(name.to_owned());
        Ok(())
    }

    /// A veth from the node's bridge into `netns`, created inside the node
    /// namespace so nothing ever appears in the host's.
    fn plug(&self, netns: &str, port: &str, addr: Ipv4Addr, addr6: Ipv6Addr) -> anyhow::Result<()> {
        let node = &self.node;
        ip(&[
            "-n", node, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ])?;
        ip(&["-n", node, "link", "set", port, "master", "br0", "up"])?;
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        add_addr6(netns, "eth0", addr6)?;
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Starts an HTTP (and UDP) server named after its pod on every pod's
    /// `ip:port` and `[ip6]:port`.
    pub fn start_servers(&mut self, server: &Path, port: u16) -> anyhow::Result<()> {
        for pod in self.pods.clone() {
            self.start_server(server, &pod, port)?;
        }
        Ok(())
    }

    pub fn start_server(&mut self, server: &Path, pod: &Pod, port: u16) -> anyhow::Result<()> {
        use std::io::BufRead as _;
        let mut child = Command::new(server)
            .args(["--netns", &pod.netns, "--name", &pod.name, "--listen"])
            .arg(format!("{}:{port}", pod.ip))
            .arg("--listen")
            .arg(format!("[{}]:{port}", pod.ip6))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", server.display()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        self.servers.push(child);
        if !line.starts_with("listening") {
            bail!("server for {} did not start: {line:?}", pod.name);
        }
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }
}

/// An on-link /64 without duplicate address detection: usable at once,
/// and (like the IPv4 /24) no route beyond the pod subnet.
fn add_addr6(netns: &str, dev: &str, addr: Ipv6Addr) -> anyhow::Result<()> {
    ip(&[
        "-n",
        netns,
        "-6",
        "addr",
        "add",
        &format!("{addr}/64"),
        "dev",
        dev,
        "nodad",
    ])?;
    Ok(())
}

impl Drop for Topology {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        // Deleting a namespace deletes its veth ends and the bridge with it.
        for ns in self.created.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A child cgroup of the cgroup v2 mount, removed on drop (after killing
/// anything still in it).
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let root = sys::cgroup2_root()?;
        let path = root.join(name);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        sys::remove_cgroup(&self.path);
    }
}

/// The real `lb-agent` binary, run on a manifest directory (or, with
/// `kubeconfig` set, against an API server), with its own bpffs directory and
/// attached to a test cgroup.
pub struct Agent {
    pub bin: PathBuf,
    pub bpffs: PathBuf,
    pub cgroup: PathBuf,
    pub manifests: PathBuf,
    /// `Some`: run against the API server in this kubeconfig instead of `manifests`.
    pub kubeconfig: Option<PathBuf>,
    pub log: PathBuf,
    pub extra_args: Vec<String>,
    child: Option<Child>,
    /// Length of the log when the current process started.
    log_offset: usize,
    /// Unix time just before the current process was spawned: its
    /// `LB_AGENT` record starts later, an older one earlier.
    spawned: std::time::SystemTime,
}

/// bpffs mount point the fixtures pin under (mounted by the agent if absent).
pub const BPFFS: &str = "/sys/fs/bpf";

impl Agent {
    pub fn new(bin: &Path, name: &str, cgroup: &Path, manifests: &Path, log: &Path) -> Self {
        Self {
            bin: bin.to_owned(),
            bpffs: Path::new(BPFFS).join(name),
            cgroup: cgroup.to_owned(),
            manifests: manifests.to_owned(),
            kubeconfig: None,
            log: log.to_owned(),
            extra_args: Vec::new(),
            child: None,
            log_offset: 0,
            spawned: std::time::SystemTime::UNIX_EPOCH,
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("agent already running");
        }
        self.log_offset = self.log_text().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run");
        match &self.kubeconfig {
            Some(kc) => cmd.arg("--kubeconfig").arg(kc),
            None => cmd.arg("--manifests").arg(&self.manifests),
        };
        // An ephemeral port unless the test picks one: several agents (and
        // other users' test runs) may share the host's network namespace.
        if !self
            .extra_args
            .iter()
            .any(|a| a.starts_with("--health-addr"))
        {
            cmd.args(["--health-addr", "127.0.0.1:0"]);
        }
        self.spawned = std::time::SystemTime::now();
        let child = cmd
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(&self.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGTERM and wait: the way an operator or kubelet stops it.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        sys::terminate(&mut child, Duration::from_secs(10))
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `lb-agent list` with this agent's pins; `extra` e.g. `["-o", "json"]`.
    pub fn list(&self, extra: &[&str]) -> anyhow::Result<String> {
        run(Command::new(&self.bin)
            .arg("list")
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(extra)
            .env("NO_COLOR", "1"))
    }

    pub fn list_json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.list(&["-o", "json"])?)?)
    }

    /// Polls `list -o json` until `pred` holds; returns the matching document.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.is_some() && !self.is_running() {
                bail!(
                    "the agent exited while waiting for {what}; its log:\n{}",
                    self.log_text()
                );
            }
            let last = match self.list_json() {
                Ok(doc) if pred(&doc) => return Ok(doc),
                Ok(doc) => doc.to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; last list: {last}\nagent log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the running process has attached and written its
    /// initial sync (every source complete) to the maps, as its
    /// `/metrics` says (`lb_initial_sync_complete`). The pinned maps
    /// cannot tell: they outlive the process.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let (bin, bpffs, since) = (self.bin.clone(), self.bpffs.clone(), self.spawned);
        wait_initial_sync(&bin, &bpffs, since, timeout, || self.is_running())
            .map(|_| ())
            .with_context(|| format!("the agent's log:\n{}", self.current_log()))
    }

    /// `lb-agent status -o json` of this agent's pins.
    pub fn status_json(&self) -> anyhow::Result<serde_json::Value> {
        status_json(&self.bin, &self.bpffs)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log of the current (or last) process only.
    pub fn current_log(&self) -> String {
        let log = self.log_text();
        log.get(self.log_offset..).unwrap_or_default().to_owned()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where the current process serves `/metrics` and the probes: the
    /// bound address it records in its pins (`lb-agent status`), once
    /// the record is this process's.
    pub fn wait_health_addr(&mut self, timeout: Duration) -> anyhow::Result<std::net::SocketAddr> {
        let (bin, bpffs, since) = (self.bin.clone(), self.bpffs.clone(), self.spawned);
        wait_health_addr(&bin, &bpffs, since, timeout, || self.is_running())
            .with_context(|| format!("the agent's log:\n{}", self.current_log()))
    }

    pub fn uninstall(&self) -> anyhow::Result<String> {
        run(Command::new(&self.bin)
            .arg("uninstall")
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--cgroup")
            .arg(&self.cgroup))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.uninstall();
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

/// The HTTP status of `GET path` on `addr` (the agent's health endpoints).
pub fn http_status(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<u16> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP response {out:?}"))
}

/// A service's (first) IPv4 ClusterIP as `lb-agent list -o json` shows it.
pub fn service_ip(doc: &serde_json::Value, namespace: &str, name: &str) -> Option<Ipv4Addr> {
    service_ips(doc, namespace, name)
        .into_iter()
        .find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
}

/// Every ClusterIP of a service in `lb-agent list -o json`, both families,
/// in the order listed.
pub fn service_ips(doc: &serde_json::Value, namespace: &str, name: &str) -> Vec<IpAddr> {
    find_service(doc, namespace, name)
        .and_then(|s| s["clusterIps"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.as_str()?.parse().ok())
        .collect()
}

pub fn find_service<'a>(
    doc: &'a serde_json::Value,
    namespace: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    doc["items"]
        .as_array()?
        .iter()
        .find(|s| s["namespace"] == namespace && s["name"] == name)
}

/// The node-address frontends of a service in `list -o json`
/// (`IP:PORT/PROTO`, the port being the nodePort), sorted.
pub fn node_frontends(doc: &serde_json::Value, namespace: &str, name: &str) -> Vec<String> {
    let mut out: Vec<String> = find_service(doc, namespace, name)
        .and_then(|s| s["ports"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(format!(
                "{}:{}/{}",
                p["nodeIp"].as_str()?,
                p["port"],
                p["protocol"].as_str()?
            ))
        })
        .collect();
    out.sort();
    out
}

/// Endpoints of one service port in `list -o json`, sorted.
pub fn endpoints(doc: &serde_json::Value, namespace: &str, name: &str, port: u16) -> Vec<String> {
    let mut eps: Vec<String> = find_service(doc, namespace, name)
        .and_then(|s| s["ports"].as_array())
        .into_iter()
        .flatten()
        .filter(|p| p["port"] == port)
        .flat_map(|p| p["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e.as_str().map(str::to_owned))
        .collect();
    eps.sort();
    eps
}

/// The health address the agent of the pins in `bpffs` records, once its
/// record is newer than `since` (its spawn): polls `lb-agent status`
/// (with the binary `bin`) while `alive`.
pub fn wait_health_addr(
    bin: &Path,
    bpffs: &Path,
    since: std::time::SystemTime,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
) -> anyhow::Result<std::net::SocketAddr> {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive() {
            bail!("the agent is not running");
        }
        let last = match status_json(bin, bpffs) {
            Ok(doc) => match recorded_health_addr(&doc, since) {
                Some(addr) => return Ok(addr),
                None => doc["agent"].to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!("no health address recorded after {timeout:?} (status: {last})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`wait_health_addr`], then until that agent's `/metrics` says its
/// initial sync is written (`lb_initial_sync_complete 1`); returns the
/// address.
pub fn wait_initial_sync(
    bin: &Path,
    bpffs: &Path,
    since: std::time::SystemTime,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
) -> anyhow::Result<std::net::SocketAddr> {
    let deadline = Instant::now() + timeout;
    let addr = wait_health_addr(bin, bpffs, since, timeout, &mut alive)?;
    loop {
        if !alive() {
            bail!("the agent is not running");
        }
        let last = match scrape_control_plane(addr) {
            Ok(s) => {
                let done = metric(&s, "lb_initial_sync_complete", &[]);
                if done == Some(1.0) {
                    return Ok(addr);
                }
                format!("{done:?}")
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!("no initial sync after {timeout:?} (lb_initial_sync_complete {last})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `lb-agent status -o json` (with the binary `bin`) of the pins in `bpffs`.
pub fn status_json(bin: &Path, bpffs: &Path) -> anyhow::Result<serde_json::Value> {
    let out = run(Command::new(bin)
        .arg("status")
        .arg("--bpffs")
        .arg(bpffs)
        .args(["-o", "json"]))?;
    serde_json::from_str(&out).with_context(|| format!("status -o json: {out}"))
}

/// The health address in a `status -o json` document, if its agent record
/// was started after `since` (an older record is another process's).
pub fn recorded_health_addr(
    status: &serde_json::Value,
    since: std::time::SystemTime,
) -> Option<std::net::SocketAddr> {
    let since = since
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    let agent = &status["agent"];
    (agent["started"].as_f64()? >= since)
        .then(|| agent["healthAddr"].as_str()?.parse().ok())
        .flatten()
}

/// A Service `web` of type `ty` at `cluster_ip` selecting [`web_pods`]:
/// TCP (`http`) and UDP (`echo`) on port 8080 to the pods' port 80, each
/// with `nodePort` when given (a nodePort is per protocol). `tail`
/// follows the ports: more `spec` lines, a `status`.
pub fn web_service(ty: &str, cluster_ip: &str, node_port: Option<u16>, tail: &str) -> String {
    let np = node_port.map_or_else(String::new, |p| format!("\n      nodePort: {p}"));
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: {ty}
  clusterIP: {cluster_ip}
  selector:
    app: web
  ports:
    - name: http
      port: 8080
      protocol: TCP
      targetPort: 80{np}
    - name: echo
      port: 8080
      protocol: UDP
      targetPort: 80{np}
{tail}"
    )
}

/// Pods `web-<name>` of the lab's pods, labelled `app: web`, each
/// declaring TCP port 80 (named `web`) and UDP port 80: what the lab's
/// servers answer on.
pub fn web_pods(pods: &[(&str, u8)]) -> String {
    pods.iter()
        .map(|(name, octet)| {
            pod_manifest(
                &format!("web-{name}"),
                "default",
                &[("app", "web")],
                "    - name: server
      ports:
        - name: web
          containerPort: 80
        - containerPort: 80
          protocol: UDP
",
                pod_ip(*octet),
                true,
            )
        })
        .collect()
}

/// The textbook `back-end` Service and its Pods, with status.podIP added
/// (the only change a cluster-less run needs). `ready`: per pod.
pub fn back_end_manifest(pods: &[(&str, Ipv4Addr, bool)]) -> String {
    let mut y = String::from(
        "apiVersion: v1
kind: Service
metadata:
  name: back-end
spec:
  selector:
    app: myapp
    type: back-end
  ports:
    - port: 80
      targetPort: 80
",
    );
    for (name, ip, ready) in pods {
        y.push_str(&pod_manifest(
            name,
            "default",
            &[("app", "myapp"), ("type", "back-end")],
            "    - name: nginx-container\n      image: nginx\n      ports:\n        - containerPort: 80\n",
            *ip,
            *ready,
        ));
    }
    y
}

/// [`back_end_manifest`] of ready `pods` (name, last octet of
/// [`pod_ip`]) at a fixed ClusterIP.
pub fn back_end_at(cluster_ip: Ipv4Addr, pods: &[(&str, u8)]) -> String {
    let pods: Vec<(&str, Ipv4Addr, bool)> = pods
        .iter()
        .map(|(name, octet)| (*name, pod_ip(*octet), true))
        .collect();
    back_end_manifest(&pods).replacen("spec:\n", &format!("spec:\n  clusterIP: {cluster_ip}\n"), 1)
}

/// A Service `name` at ClusterIP `ip`, port 80 to 80, selecting pods
/// labelled `app: <app>`.
pub fn selector_service(name: &str, ip: Ipv4Addr, app: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  clusterIP: {ip}
  selector: {{app: {app}}}
  ports: [{{port: 80, targetPort: 80}}]
"
    )
}

/// A hand-written EndpointSlice (a `---` document) of `service`, its
/// `addressType` from the addresses' family, with every address a ready
/// endpoint on two ports: `http` (TCP) and `echo` (UDP), both to `port`.
pub fn http_echo_slice(name: &str, service: &str, addrs: &[IpAddr], port: u16) -> String {
    let family = if addrs[0].is_ipv6() { "IPv6" } else { "IPv4" };
    let endpoints: Vec<(IpAddr, Option<&str>)> = addrs.iter().map(|a| (*a, None)).collect();
    slice_doc(
        name,
        service,
        family,
        &format!(
            "  - name: http\n    port: {port}\n    protocol: TCP\n  - name: echo\n    port: {port}\n    protocol: UDP\n"
        ),
        &endpoints,
    )
}

/// A hand-written IPv4 EndpointSlice (a `---` document) of `service` with
/// one TCP port, `http`, to `port`, and `endpoints` (address, `nodeName`
/// if any), all ready.
pub fn http_slice(
    name: &str,
    service: &str,
    port: u16,
    endpoints: &[(Ipv4Addr, Option<&str>)],
) -> String {
    let endpoints: Vec<(IpAddr, Option<&str>)> =
        endpoints.iter().map(|(a, n)| ((*a).into(), *n)).collect();
    slice_doc(
        name,
        service,
        "IPv4",
        &format!("  - name: http\n    port: {port}\n    protocol: TCP\n"),
        &endpoints,
    )
}

/// An EndpointSlice document: `ports` the YAML list under `ports:`, every
/// endpoint ready.
fn slice_doc(
    name: &str,
    service: &str,
    family: &str,
    ports: &str,
    endpoints: &[(IpAddr, Option<&str>)],
) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(a, node)| {
            let node = node
                .map(|n| format!("    nodeName: {n}\n"))
                .unwrap_or_default();
            format!("  - addresses: [\"{a}\"]\n{node}    conditions:\n      ready: true\n")
        })
        .collect();
    format!(
        "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  labels:
    kubernetes.io/service-name: {service}
addressType: {family}
ports:
{ports}endpoints:
{endpoints}"
    )
}

/// One running Pod as the manifest source reads it (a `---` document):
/// `containers` is the YAML list under `spec.containers`, indented by four;
/// the status carries `podIP` and the Ready condition, which a cluster's
/// kubelet would set.
pub fn pod_manifest(
    name: &str,
    namespace: &str,
    labels: &[(&str, &str)],
    containers: &str,
    ip: Ipv4Addr,
    ready: bool,
) -> String {
    pod_manifest_ips(name, namespace, labels, containers, &[ip.into()], ready)
}

/// [`pod_manifest`] for a pod with several addresses (a dual-stack pod):
/// `status.podIP` is the first and `status.podIPs` lists them all, as the
/// kubelet reports them.
pub fn pod_manifest_ips(
    name: &str,
    namespace: &str,
    labels: &[(&str, &str)],
    containers: &str,
    ips: &[IpAddr],
    ready: bool,
) -> String {
    let ip = ips.first().expect("a pod has an address");
    let pod_ips: String = ips
        .iter()
        .map(|ip| format!("    - ip: \"{ip}\"\n"))
        .collect();
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("    {k}: {v}\n"))
        .collect();
    let status = if ready { "True" } else { "False" };
    format!(
        "---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  labels:
{labels}spec:
  containers:
{containers}status:
  phase: Running
  podIP: \"{ip}\"
  podIPs:
{pod_ips}  conditions:
    - type: Ready
      status: \"{status}\"
"
    )
}

/// One privileged run at a time on a machine: the suites, the demo and the
/// benchmark share the kernel, and each one's leftover cleanup would remove
/// another's namespaces. Held (an exclusive `flock` on [`E2E_LOCK`]) until
/// dropped; released by the kernel if the process dies.
pub struct PrivilegedLock {
    _file: std::fs::File,
}

/// The lock file; `flock /tmp/lb-e2e.lock cargo test -p lb-tests ...` takes
/// the same lock from a shell.
pub const E2E_LOCK: &str = "/tmp/lb-e2e.lock";

impl PrivilegedLock {
    /// Waits for any other privileged run to finish.
    pub fn acquire() -> anyhow::Result<Self> {
        use std::os::fd::AsRawFd as _;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(E2E_LOCK)
            .with_context(|| format!("opening {E2E_LOCK}"))?;
        if held_by_an_ancestor(&file) {
            // `flock /tmp/lb-e2e.lock cargo xtask ...`: the caller holds it.
            return Ok(Self { _file: file });
        }
        // SAFETY: a valid open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            println!("waiting for another privileged run to finish ({E2E_LOCK})");
            // SAFETY: as above.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                bail!("locking {E2E_LOCK}: {}", std::io::Error::last_os_error());
            }
        }
        Ok(Self { _file: file })
    }
}

/// Whether a process this one descends from holds a `flock` on `file`
/// (from /proc/locks: `1: FLOCK  ADVISORY  WRITE <pid> <maj>:<min>:<inode> 0 EOF`).
fn held_by_an_ancestor(file: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = file.metadata() else {
        return false;
    };
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    let holders: Vec<u32> = std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Waiters are listed with "->" before the type.
            (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str()))
                .then(|| f.get(4)?.parse().ok())?
        })
        .collect();
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the parenthesised command: state, then the parent's pid.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let mut pid = std::process::id();
    while let Some(p) = parent(pid).filter(|p| *p > 1) {
        if holders.contains(&p) {
            return true;
        }
        pid = p;
    }
    false
}

/// Removes namespaces, cgroups and pins left by a run that was killed
/// before its `Drop`s ran.
pub fn cleanup_leftovers() {
    // First: a leftover agent container would keep its pins and programs.
    image::cleanup_leftovers();
    if let Ok(out) = run(Command::new("ip").args(["netns", "list"])) {
        for line in out.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(PREFIX) {
                let _ = run(Command::new("ip").args(["netns", "del", name]));
            }
        }
    }
    if let Ok(root) = sys::cgroup2_root() {
        for dir in sys::children_with_prefix(&root, PREFIX) {
            sys::remove_cgroup(&dir);
        }
    }
    for dir in sys::children_with_prefix(Path::new(BPFFS), PREFIX) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// One complete isolated environment: backend pods serving HTTP, a client
/// namespace, a child cgroup, a manifest directory and an agent (not yet
/// started). Fields drop in order: the agent (unpinned) before its cgroup,
/// the cgroup before the namespaces.
pub struct Lab {
    pub agent: Agent,
    pub cgroup: TestCgroup,
    pub topo: Topology,
    pub bins: Bins,
    pub name: String,
    pub manifests: PathBuf,
    pub work: tempfile::TempDir,
}

impl Lab {
    /// `pods`: (pod name, last octet in 10.244.1.0/24); each serves HTTP on `port`.
    pub fn new(bins: &Bins, pods: &[(&str, u8)], port: u16) -> anyhow::Result<Self> {
        bins.check()?;
        let name = unique_name();
        let work = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()?;
        let manifests = work.path().join("manifests");
        std::fs::create_dir(&manifests)?;
        let mut topo = Topology::new(&name, pods)?;
        topo.start_servers(&bins.server, port)?;
        let cgroup = TestCgroup::new(&name)?;
        let agent = Agent::new(
            &bins.agent,
            &name,
            &cgroup.path,
            &manifests,
            &work.path().join("agent.log"),
        );
        Ok(Self {
            agent,
            cgroup,
            topo,
            bins: bins.clone(),
            name,
            manifests,
            work,
        })
    }

    /// [`Lab::new`] whose agent runs with `--node-ip` (the addresses, comma-joined) before
    /// `args`: the node addresses exist only in the agent's maps, as the tests give them.
    pub fn with_node_ips(
        bins: &Bins,
        pods: &[(&str, u8)],
        port: u16,
        node_ips: &[&str],
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut lab = Self::new(bins, pods, port)?;
        lab.agent.extra_args = ["--node-ip".to_owned(), node_ips.join(",")]
            .into_iter()
            .chain(args.iter().map(|a| (*a).to_owned()))
            .collect();
        Ok(lab)
    }

    /// [`Self::new`] with pods serving port 80, `yaml` written as
    /// `services.yaml`, the agent started.
    pub fn running(bins: &Bins, pods: &[(&str, u8)], yaml: &str) -> anyhow::Result<Self> {
        let mut lab = Self::new(bins, pods, 80)?;
        lab.write_manifest("services.yaml", yaml)?;
        lab.agent.start()?;
        Ok(lab)
    }

    /// Writes `file` in the manifest directory atomically (rename), as a
    /// careful operator or a ConfigMap update would.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.work.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.manifests.join(file))?;
        Ok(())
    }

    pub fn remove_manifest(&self, file: &str) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.manifests.join(file))?)
    }

    /// Connects from the client namespace inside the attached cgroup.
    pub fn client(&self, target: &str, args: &[&str]) -> anyhow::Result<ClientReport> {
        parse_report(&run(self
            .client_command(true)
            .arg("--target")
            .arg(target)
            .args(args))?)
    }

    /// `k` connects to `target` from the client namespace in the cgroup,
    /// every one answered; the report says by which backends.
    pub fn connects_ok(&self, target: &str, k: u64) -> ClientReport {
        let report = self
            .client(target, &["--count", &k.to_string()])
            .expect("client");
        assert_eq!((report.ok(), report.failed()), (k, 0), "{report:?}");
        report
    }

    /// `r` connects to `target`, every one refused with ECONNREFUSED.
    pub fn connects_refused(&self, target: &str, r: u64) {
        let report = self
            .client(target, &["--count", &r.to_string()])
            .expect("client");
        assert_eq!(
            report.errors.get("ECONNREFUSED").copied(),
            Some(r),
            "{report:?}"
        );
    }

    /// The same, but from outside the attached cgroup: the program must not apply.
    pub fn client_outside_cgroup(
        &self,
        target: &str,
        args: &[&str],
    ) -> anyhow::Result<ClientReport> {
        parse_report(&run(self
            .client_command(false)
            .arg("--target")
            .arg(target)
            .args(args))?)
    }

    /// Starts a client run in the background (for connects during a restart).
    pub fn spawn_client(&self, target: &str, args: &[&str]) -> anyhow::Result<Child> {
        self.client_command(true)
            .arg("--target")
            .arg(target)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting lb-testclient")
    }

    /// `lb-testclient` in the client namespace and, with `in_cgroup`, in the
    /// attached cgroup; callers add the mode (`--target …`, `--exec …`).
    /// `lb-testclient --target` in the client namespace and cgroup; its full
    /// JSON report (the `ClientReport` fields plus `peers`, `sources`,
    /// `perSocket`, `probe`), for suites that assert on more than counts.
    pub fn client_json(&self, target: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = run(self
            .client_command(true)
            .arg("--target")
            .arg(target)
            .args(args))?;
        serde_json::from_str(out.trim()).with_context(|| format!("client output {out:?}"))
    }

    /// [`Self::client_json`] from another client namespace (see
    /// [`Topology::add_client`]), in the attached cgroup.
    pub fn client_json_in(
        &self,
        netns: &str,
        target: &str,
        args: &[&str],
    ) -> anyhow::Result<serde_json::Value> {
        let out = run(Command::new(&self.bins.client)
            .arg("--netns")
            .arg(netns)
            .arg("--cgroup")
            .arg(&self.cgroup.path)
            .arg("--target")
            .arg(target)
            .args(args))?;
        serde_json::from_str(out.trim()).with_context(|| format!("client output {out:?}"))
    }

    pub fn client_command(&self, in_cgroup: bool) -> Command {
        let mut c = Command::new(&self.bins.client);
        c.arg("--netns").arg(&self.topo.client);
        if in_cgroup {
            c.arg("--cgroup").arg(&self.cgroup.path);
        }
        c
    }
}

/// One UDP socket of `lb-testclient --session` in the attached cgroup, kept
/// for a whole test and driven line by line: a target in, the reply's
/// sender and body (JSON) out.
pub struct UdpSession {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl UdpSession {
    /// `args`: extra client flags, e.g. `["--bind", "[::]:0"]` for an IPv6 socket.
    pub fn start(lab: &Lab, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_in(lab, &lab.topo.client, args)
    }

    /// [`Self::start`] in the client namespace `netns` (see
    /// [`Topology::add_client`]), in the attached cgroup.
    pub fn start_in(lab: &Lab, netns: &str, args: &[&str]) -> anyhow::Result<Self> {
        let mut cgroup = vec!["--cgroup".as_ref(), lab.cgroup.path.as_os_str()];
        cgroup.extend(args.iter().map(std::ffi::OsStr::new));
        Self::spawn(lab, netns, &cgroup)
    }

    /// A session in `netns` but outside the attached cgroup: the programs
    /// never see its sockets.
    pub fn start_outside_cgroup(lab: &Lab, netns: &str) -> anyhow::Result<Self> {
        Self::spawn(lab, netns, &[])
    }

    fn spawn(lab: &Lab, netns: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<Self> {
        let mut child = Command::new(&lab.bins.client)
            .arg("--netns")
            .arg(netns)
            .arg("--session")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("lb-testclient --session")?;
        let stdin = child.stdin.take().context("session stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("session stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// Sends one datagram to `target`; the reply's sender and body.
    pub fn send(&mut self, target: &str) -> anyhow::Result<serde_json::Value> {
        self.command(target)
    }

    /// One line of the session protocol: `TARGET` (a datagram from the
    /// unconnected socket), `udp NAME TARGET` or `tcp NAME TARGET` (a new
    /// connected socket; `{"peer"}`, TCP also `{"local"}`), `send NAME` (one exchange on it;
    /// `{"name"}`); `{"error": ERRNO}` if the call failed.
    pub fn command(&mut self, line: &str) -> anyhow::Result<serde_json::Value> {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        let mut reply = String::new();
        self.stdout.read_line(&mut reply)?;
        serde_json::from_str(&reply).with_context(|| format!("session reply {reply:?} to {line:?}"))
    }
}

impl Drop for UdpSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_report(out: &str) -> anyhow::Result<ClientReport> {
    serde_json::from_str(out.trim()).with_context(|| format!("client output {out:?}"))
}

/// Collects a background client's report.
pub fn wait_client(child: Child) -> anyhow::Result<ClientReport> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("lb-testclient failed: {}", out.status);
    }
    parse_report(&String::from_utf8_lossy(&out.stdout))
}

/// A JSON object of counts (`{"pod-1": 3}`) as sorted (key, count) pairs.
pub fn counts(v: &serde_json::Value) -> Vec<(String, u64)> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// `GET path` on `addr`: the status and body (at most 16 MiB read; the
/// agent closes the connection after one response).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(16 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("bad HTTP response {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP status line {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// One sample of a Prometheus / OpenMetrics text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of a text exposition (comments skipped). Enough for what
/// the agent writes: label values without escaped quotes, no timestamps.
pub fn parse_metrics(text: &str) -> anyhow::Result<Vec<Sample>> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value in {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest
                    .strip_suffix('}')
                    .with_context(|| format!("unclosed labels in {line:?}"))?;
                let mut labels = BTreeMap::new();
                for pair in rest.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .with_context(|| format!("bad label in {line:?}"))?;
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name, labels)
            }
        };
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// The value of the one sample named `name` whose labels include `labels`.
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = samples.iter().filter(|s| {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    });
    let first = found.next()?;
    // Ambiguous label sets are a test bug, not a value.
    found.next().is_none().then_some(first.value)
}

/// One histogram of a scrape: cumulative bucket counts by upper bound
/// (`+Inf` last), sum and count.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// The unlabelled histogram `name` (without `_bucket`) of a scrape.
    pub fn from_samples(samples: &[Sample], name: &str) -> Option<Self> {
        let bucket = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.name == bucket)
            .filter_map(|s| {
                let le = s.labels.get("le")?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, s.value))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(Self {
            buckets,
            sum: metric(samples, &format!("{name}_sum"), &[])?,
            count: metric(samples, &format!("{name}_count"), &[])?,
        })
    }

    /// What was observed after `earlier` (a scrape of the same process).
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, n)| {
                    let before = earlier
                        .buckets
                        .iter()
                        .find(|b| b.0 == le)
                        .map_or(0.0, |b| b.1);
                    (le, n - before)
                })
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The `q` quantile as Prometheus' `histogram_quantile` estimates it:
    /// linear inside the bucket it falls in (from 0 for the first); the
    /// largest finite bound if it falls in `+Inf`. `None` if empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, n) in &self.buckets {
            if n >= rank {
                if le.is_infinite() {
                    return Some(lower);
                }
                let inside = n - below;
                return Some(if inside > 0.0 {
                    lower + (le - lower) * (rank - below) / inside
                } else {
                    le
                });
            }
            (lower, below) = (le, n);
        }
        Some(lower)
    }

    /// The upper bound of the highest bucket holding an observation: the
    /// largest one is at most this.
    pub fn max_bound(&self) -> Option<f64> {
        let mut below = 0.0;
        let mut max = None;
        for &(le, n) in &self.buckets {
            if n > below {
                max = Some(le);
            }
            below = n;
        }
        max
    }
}

/// Scrapes `/metrics` on `addr` and parses it.
pub fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<Vec<Sample>> {
    scrape_path(addr, "/metrics")
}

/// The agent's own figures only (`/metrics?collect[]=control-plane`): no
/// map is read, so it is cheap with any number of services.
pub fn scrape_control_plane(addr: std::net::SocketAddr) -> anyhow::Result<Vec<Sample>> {
    scrape_path(addr, "/metrics?collect[]=control-plane")
}

fn scrape_path(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<Vec<Sample>> {
    let (status, body) = http_get(addr, path)?;
    if status != 200 {
        bail!("/metrics answered {status}: {body}");
    }
    if !body.ends_with("# EOF\n") {
        bail!("/metrics is cut short:\n{body}");
    }
    parse_metrics(&body)
}

#[cfg(test)]
mod metrics_parser_tests {
    use super::*;

    #[test]
    fn histogram_quantiles_interpolate_inside_a_bucket() {
        let text = "h_bucket{le=\"0.001\"} 0\nh_bucket{le=\"0.002\"} 4\nh_bucket{le=\"0.004\"} 5\nh_bucket{le=\"+Inf\"} 6\nh_sum 0.1\nh_count 6\n";
        let h = Histogram::from_samples(&parse_metrics(text).unwrap(), "h").unwrap();
        // Rank 3 of 6: three quarters into (1 ms, 2 ms].
        assert_eq!(h.quantile(0.5), Some(0.00175));
        // Rank 5: the top of (2 ms, 4 ms].
        assert_eq!(h.quantile(5.0 / 6.0), Some(0.004));
        // In +Inf: the largest finite bound.
        assert_eq!(h.quantile(0.99), Some(0.004));
        assert_eq!(h.max_bound(), Some(f64::INFINITY));
        let empty = h.since(&h);
        assert_eq!((empty.count, empty.quantile(0.5)), (0.0, None));
        let earlier = Histogram::from_samples(
            &parse_metrics("h_bucket{le=\"0.001\"} 0\nh_bucket{le=\"0.002\"} 4\nh_bucket{le=\"0.004\"} 4\nh_bucket{le=\"+Inf\"} 4\nh_sum 0.05\nh_count 4\n").unwrap(),
            "h",
        )
        .unwrap();
        let d = h.since(&earlier);
        assert_eq!(d.count, 2.0);
        assert_eq!(d.max_bound(), Some(f64::INFINITY));
        assert_eq!(d.quantile(0.5), Some(0.004));
    }

    #[test]
    fn parses_labels_and_values() {
        let text = "# TYPE a counter\na_total{x=\"1\",y=\"b c\"} 5\nb 2.5\n# EOF\n";
        let s = parse_metrics(text).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(metric(&s, "a_total", &[("y", "b c")]), Some(5.0));
        assert_eq!(metric(&s, "a_total", &[("y", "d")]), None);
        assert_eq!(metric(&s, "b", &[]), Some(2.5));
        assert!(parse_metrics("c{x=\"1\" 3\n").is_err());
    }
}
