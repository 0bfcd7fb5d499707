//! The bench's own environment: a routed three-namespace topology (client
//! pod → node router → server pod, as in the baseline method; the test
//! fixtures' bridge topology has no node hop where netfilter could run),
//! the backend server, the attached child cgroup, the agent, and BPF and
//! bpftool helpers. Everything is named `lbb<pid>…` (not the fixtures'
//! `lbt` prefix, whose leftover sweep must not meet a running bench) and is
//! removed in `Drop`, also after an error or Ctrl-C.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_tests::sys;

use super::config;

pub const PREFIX: &str = "lbb";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
pub const CLIENT_CPU: usize = 1;

fn ip(args: &[&str]) -> anyhow::Result<String> {
    lb_tests::run(Command::new("ip").args(args))
}

fn sysctl(netns: &str, settings: &[&str]) -> anyhow::Result<()> {
    lb_tests::run(
        Command::new("ip")
            .args(["netns", "exec", netns, "sysctl", "-q", "-w"])
            .args(settings),
    )?;
    Ok(())
}

/// Paths of the release binaries.
#[derive(Clone, Debug)]
pub struct Bins {
    pub agent: PathBuf,
    /// The agent on the C library's malloc, for heaptrack.
    pub heap_agent: PathBuf,
    pub server: PathBuf,
    pub client: PathBuf,
    pub apiserver: PathBuf,
}

/// What the client printed.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ClientResult {
    pub mode: String,
    pub pick: String,
    pub targets: u32,
    pub iters: u64,
    pub failures: u64,
    #[serde(default)]
    pub errors: std::collections::BTreeMap<String, u64>,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    pub conn_per_s: f64,
    pub elapsed_s: f64,
    /// `bulk` mode: bytes per stream and the median stream's Gbit/s.
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub gbit_per_s: f64,
}

pub struct Lab {
    pub bins: Bins,
    pub client: String,
    pub node: String,
    pub server: String,
    pub cgroup: PathBuf,
    server_proc: Option<Child>,
    netns: Vec<String>,
}

impl Lab {
    pub fn new(bins: Bins) -> anyhow::Result<Self> {
        let id = format!("{PREFIX}{}", std::process::id() % 100_000);
        let mut lab = Self {
            bins,
            client: format!("{id}-client"),
            node: format!("{id}-node"),
            server: format!("{id}-server"),
            cgroup: sys::cgroup2_root()?.join(&id),
            server_proc: None,
            netns: Vec::new(),
        };
        fs::create_dir(&lab.cgroup)
            .with_context(|| format!("creating {}", lab.cgroup.display()))?;
        for ns in [lab.client.clone(), lab.server.clone()] {
            ip(&["netns", "add", &ns])?;
            lab.netns.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            sysctl(
                &ns,
                &[
                    "net.ipv4.ip_local_port_range=1024 65535",
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.core.somaxconn=4096",
                ],
            )?;
        }
        lab.fresh_node()?;
        let pods: Vec<String> = (0..config::PODS)
            .map(|k| config::pod(k).to_string())
            .collect();
        let mut child = Command::new(&lab.bins.server)
            .args(["--netns", &lab.server, "--cpu", "0", "--port"])
            .arg(config::POD_PORT.to_string())
            .arg("--sink-port")
            .arg(config::BULK_POD_PORT.to_string())
            .arg("--udp-port")
            .arg(config::UDP_POD_PORT.to_string())
            .arg("--udp-addrs")
            .arg(pods.join(","))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting lb-benchserver")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
        lab.server_proc = Some(child);
        if !line.starts_with("listening") {
            bail!("lb-benchserver did not start: {line:?}");
        }
        Ok(lab)
    }

    /// Deletes the node namespace (its veths, rules and conntrack go with
    /// it), waits until the kernel has really removed the old veth peers,
    /// and builds a new, empty one.
    pub fn fresh_node(&mut self) -> anyhow::Result<()> {
        if self.netns.contains(&self.node) {
            ip(&["netns", "del", &self.node])?;
            self.netns.retain(|n| n != &self.node);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while ip(&["-n", &self.client, "link", "show", "c0"]).is_ok()
            || ip(&["-n", &self.server, "link", "show", "s0"]).is_ok()
        {
            if Instant::now() > deadline {
                bail!("the old node namespace's veths did not go away in 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (node, client, server) = (
            &self.node.clone(),
            &self.client.clone(),
            &self.server.clone(),
        );
        ip(&["netns", "add", node])?;
        self.netns.push(node.clone());
        ip(&["-n", node, "link", "set", "lo", "up"])?;
        sysctl(node, &["net.ipv4.ip_forward=1"])?;
        ip(&[
            "-n", node, "link", "add", "n0", "type", "veth", "peer", "name", "c0", "netns", client,
        ])?;
        ip(&[
            "-n", node, "link", "add", "n1", "type", "veth", "peer", "name", "s0", "netns", server,
        ])?;
        ip(&["-n", node, "addr", "add", "10.244.0.1/24", "dev", "n0"])?;
        ip(&["-n", node, "addr", "add", "10.244.1.1/24", "dev", "n1"])?;
        ip(&["-n", node, "link", "set", "n0", "up"])?;
        ip(&["-n", node, "link", "set", "n1", "up"])?;
        ip(&[
            "-n",
            client,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "c0",
        ])?;
        ip(&["-n", client, "link", "set", "c0", "up"])?;
        ip(&["-n", client, "route", "add", "default", "via", "10.244.0.1"])?;
        for k in 0..config::PODS {
            ip(&[
                "-n",
                server,
                "addr",
                "add",
                &format!("{}/24", config::pod(k)),
                "dev",
                "s0",
            ])?;
        }
        ip(&["-n", server, "link", "set", "s0", "up"])?;
        ip(&["-n", server, "route", "add", "default", "via", "10.244.1.1"])?;
        Ok(())
    }

    /// Re-pins the (single-threaded) server.
    pub fn server_cpu(&self, cpu: usize) -> anyhow::Result<()> {
        let pid = self.server_proc.as_ref().context("no server")?.id();
        pin_pid(pid as i32, cpu)
    }

    /// Runs `iptables-restore` / `nft -f` style `loader` on `file` inside
    /// the node namespace (and inside `memcg`, so the kernel memory the
    /// ruleset takes is charged there); returns the wall time including
    /// process start.
    pub fn load_rules(
        &self,
        loader: &[&str],
        file: &Path,
        memcg: Option<&MemCgroup>,
    ) -> anyhow::Result<Duration> {
        let f = fs::File::open(file)?;
        let mut c = Command::new("sh");
        c.arg("-c");
        match memcg {
            // The shell moves itself, then becomes the loader.
            Some(m) => c.arg(format!(
                "echo $$ > '{}' && exec ip netns exec \"$0\" \"$@\"",
                m.dir.join("cgroup.procs").display()
            )),
            None => c.arg("exec ip netns exec \"$0\" \"$@\""),
        };
        c.arg(&self.node).args(loader);
        let started = Instant::now();
        let out = c
            .stdin(f)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}",
                loader.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        Ok(took)
    }

    /// One client run from the client namespace (inside the attached cgroup
    /// if `in_cgroup`). A client that aborts still yields its report.
    #[allow(clippy::too_many_arguments)]
    pub fn client(
        &self,
        in_cgroup: bool,
        mode: &str,
        base: Ipv4Addr,
        targets: u32,
        port: u16,
        pick: &str,
        warmup: u64,
        iters: u64,
        extra: &[String],
    ) -> anyhow::Result<ClientResult> {
        let mut c = Command::new(&self.bins.client);
        c.args(["--netns", &self.client]);
        if in_cgroup {
            c.arg("--cgroup").arg(&self.cgroup);
        }
        c.args([
            "--cpu",
            &CLIENT_CPU.to_string(),
            "--mode",
            mode,
            "--pick",
            pick,
        ])
        .args([
            "--base",
            &base.to_string(),
            "--targets",
            &targets.to_string(),
        ])
        .args(["--port", &port.to_string()])
        .args([
            "--warmup",
            &warmup.to_string(),
            "--iters",
            &iters.to_string(),
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
        let out = c.output().context("running lb-benchclient")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let r: ClientResult = serde_json::from_str(text.trim()).with_context(|| {
            format!(
                "lb-benchclient ({}) printed {text:?}; stderr {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        Ok(r)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut s) = self.server_proc.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in self.netns.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        sys::remove_cgroup(&self.cgroup);
    }
}

pub fn pin_pid(pid: i32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity({pid}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Removes what a killed bench left: `lbb*` namespaces, cgroups and pins.
pub fn cleanup_leftovers() {
    if let Ok(out) = lb_tests::run(Command::new("ip").args(["netns", "list"])) {
        for line in out.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(PREFIX) {
                let _ = lb_tests::run(Command::new("ip").args(["netns", "del", name]));
            }
        }
    }
    // Unpinning drops the links (detaching the programs) and the maps.
    for dir in sys::children_with_prefix(Path::new(lb_tests::BPFFS), PREFIX) {
        let _ = fs::remove_dir_all(dir);
    }
    if let Ok(root) = sys::cgroup2_root() {
        for dir in sys::children_with_prefix(&root, PREFIX) {
            sys::remove_cgroup(&dir);
        }
    }
    if let Some(root) = memcg_root() {
        for dir in sys::children_with_prefix(&root, PREFIX) {
            sys::remove_cgroup(&dir);
        }
    }
}

/// Where memory cgroups can be made: the cgroup2 root if it delegates the
/// memory controller to its children, else the cgroup v1 memory hierarchy.
fn memcg_root() -> Option<PathBuf> {
    let v2 = sys::cgroup2_root().ok()?;
    if fs::read_to_string(v2.join("cgroup.subtree_control"))
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
    {
        return Some(v2);
    }
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "memory"))
            .then(|| PathBuf::from(f[1]))
    })
}

/// A child memory cgroup of our own, to read the kernel memory charged to
/// what ran in it (netfilter allocates rules with `GFP_KERNEL_ACCOUNT`, so
/// a ruleset is charged to the cgroup of the process that loaded it).
pub struct MemCgroup {
    pub dir: PathBuf,
    v2: bool,
}

impl MemCgroup {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let root = memcg_root().context("no memory cgroup controller available")?;
        let v2 = sys::cgroup2_root().is_ok_and(|r| r == root);
        let dir = root.join(format!(
            "{PREFIX}{}-mem-{name}",
            std::process::id() % 100_000
        ));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir, v2 })
    }

    /// Kernel memory charged to the cgroup: `kernel` of memory.stat
    /// (cgroup v2) or memory.kmem.usage_in_bytes (v1).
    pub fn kernel_bytes(&self) -> Option<u64> {
        if self.v2 {
            fs::read_to_string(self.dir.join("memory.stat"))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("kernel "))?
                .trim()
                .parse()
                .ok()
        } else {
            fs::read_to_string(self.dir.join("memory.kmem.usage_in_bytes"))
                .ok()?
                .trim()
                .parse()
                .ok()
        }
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        sys::remove_cgroup(&self.dir);
    }
}

/// Where the agent reads its objects from.
pub enum Source<'a> {
    Manifests(&'a Path),
    /// The fake API server's URL.
    Api(&'a str),
}

/// The real `lb-agent run`, with its own bpffs directory.
pub struct AgentProc {
    pub bin: PathBuf,
    pub bpffs: PathBuf,
    pub cgroup: PathBuf,
    pub log: PathBuf,
    pub spawned: Instant,
    /// Unix nanoseconds just before the spawn: the agent's record in its
    /// pins (`LB_AGENT`) starts later, a previous agent's earlier.
    spawned_unix_ns: u64,
    child: Option<Child>,
}

/// The agent's own figures, from `/metrics?collect[]=control-plane` (no
/// map is read for them, so a scrape costs the agent next to nothing at
/// any N). Counters and histogram sums since the agent started.
#[derive(Clone, Debug)]
pub struct Figures {
    /// Syncs (`lb_sync_duration_seconds_count`) and their time in all
    /// (`_sum`, seconds).
    pub syncs: f64,
    pub sync_s: f64,
    /// `lb_network_programming_duration_seconds`: a sample per
    /// EndpointSlice event (API source), or per sync from the first change
    /// it picked up (manifest source).
    pub programming: lb_tests::Histogram,
    /// `lb_map_writes_total`.
    pub writes: f64,
    /// `lb_frontends{state="programmed"}` and `{state="failed"}`.
    pub programmed: f64,
    pub failed: f64,
}

/// (events, p50 µs, p99 µs, max µs) of programming-latency samples: the
/// quantiles interpolated inside `lb_network_programming_duration_seconds`'
/// buckets (ten a decade, so within a third of a bucket's lower bound), the
/// max the upper bound of the highest bucket holding one.
pub fn latency_summary(h: &lb_tests::Histogram) -> Option<(u64, u64, u64, u64)> {
    let us = |s: f64| (s * 1e6).round() as u64;
    Some((
        h.count as u64,
        us(h.quantile(0.5)?),
        us(h.quantile(0.99)?),
        us(h.max_bound()?),
    ))
}

impl AgentProc {
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        bin: &Path,
        source: Source<'_>,
        bpffs: &Path,
        cgroup: &Path,
        log: &Path,
        max_services: u32,
        max_backends: u32,
        max_frontends: u32,
    ) -> anyhow::Result<Self> {
        Self::start_under(
            &[],
            &[],
            &[],
            bin,
            source,
            bpffs,
            cgroup,
            log,
            max_services,
            max_backends,
            max_frontends,
        )
    }

    /// [`AgentProc::start`] with the agent's command line after `wrapper`
    /// (a profiler), then [`AgentProc::agent_pid`] is the agent's own pid,
    /// with `env` added to its environment and `args` to its `run`.
    #[allow(clippy::too_many_arguments)]
    pub fn start_under(
        wrapper: &[&str],
        env: &[(&str, String)],
        args: &[String],
        bin: &Path,
        source: Source<'_>,
        bpffs: &Path,
        cgroup: &Path,
        log: &Path,
        max_services: u32,
        max_backends: u32,
        max_frontends: u32,
    ) -> anyhow::Result<Self> {
        let logf = fs::File::create(log)?;
        let mut c = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        c.arg("run");
        match source {
            Source::Manifests(dir) => {
                c.arg("--manifests").arg(dir).env("RUST_LOG", "info");
            }
            Source::Api(url) => {
                // No Node object exists: the zone lookup ends at once.
                c.args(["--api-server", url, "--node-name", "bench-node"])
                    .env("RUST_LOG", "info,lb_userspace::sync=debug");
            }
        }
        // For allocator experiments (`LD_PRELOAD=...`, `GLIBC_TUNABLES=...`):
        // `LB_BENCH_AGENT_ENV="K=V K2=V2"` reaches the agent only, and not
        // under heaptrack, which preloads its own.
        if wrapper.is_empty()
            && let Ok(extra) = std::env::var("LB_BENCH_AGENT_ENV")
        {
            for (k, v) in extra.split_whitespace().filter_map(|kv| kv.split_once('=')) {
                c.env(k, v);
            }
        }
        let spawned = Instant::now();
        let spawned_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let child = c
            .arg("--bpffs")
            .arg(bpffs)
            .arg("--cgroup")
            .arg(cgroup)
            .args(["--max-services", &max_services.to_string()])
            .args(["--max-backends", &max_backends.to_string()])
            .args(["--max-frontends", &max_frontends.to_string()])
            // An ephemeral port on loopback: the agent records the one it
            // got in its pins, where `figures` finds it.
            .args(["--health-addr", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            bin: bin.to_owned(),
            bpffs: bpffs.to_owned(),
            cgroup: cgroup.to_owned(),
            log: log.to_owned(),
            spawned,
            spawned_unix_ns,
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// This agent's record in its pins (`LB_AGENT`), once it wrote it.
    pub fn record(&self) -> Option<lb_common::AgentState> {
        let map = sys::PinnedMap::open(&self.bpffs.join(lb_common::maps::AGENT)).ok()?;
        let state: lb_common::AgentState = map.get(&0u32)?;
        (state.started_ns >= self.spawned_unix_ns).then_some(state)
    }

    /// Waits until the agent has written its initial sync (every source
    /// complete: the manifest directory's first read, or both lists) to
    /// the maps, polling its record every 2 ms (one bpf(2) lookup: nothing
    /// the agent serves); returns the wall time since `since`.
    pub fn wait_initial_sync(
        &mut self,
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.record().is_some_and(|r| r.initial_sync_ns != 0) {
                return Ok(since.elapsed());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "lb-agent exited ({status}); its log:\n{}",
                    tail(&self.log_text())
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "lb-agent did not finish its initial sync within {timeout:?}; its log:\n{}",
                    tail(&self.log_text())
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The agent's control-plane figures now.
    pub fn figures(&self) -> anyhow::Result<Figures> {
        let state = self
            .record()
            .context("the agent has no record in its pins")?;
        let port = u16::from_be(state.health_port);
        if port == 0 {
            bail!("the agent records no health address");
        }
        let samples = lb_tests::scrape_control_plane((Ipv4Addr::LOCALHOST, port).into())?;
        let one = |name: &str, labels: &[(&str, &str)]| {
            lb_tests::metric(&samples, name, labels)
                .with_context(|| format!("no {name} {labels:?}"))
        };
        Ok(Figures {
            syncs: one("lb_sync_duration_seconds_count", &[])?,
            sync_s: one("lb_sync_duration_seconds_sum", &[])?,
            programming: lb_tests::Histogram::from_samples(
                &samples,
                "lb_network_programming_duration_seconds",
            )
            .context("no lb_network_programming_duration_seconds")?,
            writes: one("lb_map_writes_total", &[])?,
            programmed: one("lb_frontends", &[("state", "programmed")])?,
            failed: one("lb_frontends", &[("state", "failed")])?,
        })
    }

    /// Figures newer than `before`: at least one more sync and, with
    /// `events`, that many more programming samples. A sync's figures
    /// follow its map writes, so the bench may see the map change first.
    pub fn figures_after(
        &self,
        before: &Figures,
        events: f64,
        timeout: Duration,
    ) -> anyhow::Result<Figures> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.figures()?;
            if now.syncs > before.syncs
                && now.programming.count >= before.programming.count + events
            {
                return Ok(now);
            }
            if Instant::now() > deadline {
                bail!(
                    "no sync counted within {timeout:?} (syncs {} -> {}, programming samples {} -> {})",
                    before.syncs,
                    now.syncs,
                    before.programming.count,
                    now.programming.count
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn vm_hwm_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM:")
    }

    /// A `/proc/PID/status` figure in KiB (`RssFile:`: the binary's and
    /// libraries' pages; `RssAnon:`: heap, stacks, allocator slack).
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// The `lb-agent` process itself: the child, or under a wrapper the
    /// first descendant of that name.
    pub fn agent_pid(&self) -> Option<u32> {
        let mut todo = vec![self.pid()?];
        while let Some(pid) = todo.pop() {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            // comm is the file name cut to 15 bytes (LB_BENCH_AGENT may
            // name another build).
            let name = self.bin.file_name().map(|n| n.to_string_lossy());
            let want = name.as_deref().unwrap_or("lb-agent");
            if comm.trim() == want.get(..15).unwrap_or(want) {
                return Some(pid);
            }
            let children =
                fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        None
    }

    /// SIGTERM to the agent (under a wrapper too), then waits up to `grace`
    /// for the child (the wrapper writing its output) to exit.
    pub fn terminate_and_wait(&mut self, grace: Duration) -> anyhow::Result<()> {
        let agent = self.agent_pid().context("the agent is not running")?;
        // SAFETY: kill(2) on a process this bench started.
        unsafe { libc::kill(i32::try_from(agent)?, libc::SIGTERM) };
        let child = self.child.as_mut().context("no child")?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                self.child = None;
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the agent's wrapper did not exit within {grace:?}")
    }

    /// SIGTERM, wait, then `lb-agent uninstall` and remove the pins.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = sys::terminate(&mut c, Duration::from_secs(10));
        }
        let _ = Command::new(&self.bin)
            .arg("uninstall")
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.bpffs);
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
            self.child = None;
        }
        self.stop();
    }
}

/// The last lines of a log, for error messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `fake-apiserver` (tests/fake-apiserver) on a loopback port, holding the
/// objects of one JSON file, driven through its stdin command protocol.
pub struct ApiServerProc {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
    pub url: String,
    /// Process start until it listened with every object loaded.
    pub load_time: Duration,
}

impl ApiServerProc {
    pub fn start(bin: &Path, objects: &Path) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0"])
            .arg(objects)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdin = child.stdin.take().context("fake-apiserver stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("fake-apiserver stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let Some(url) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("fake-apiserver did not start: {line:?}");
        };
        if !url.starts_with("http://127.") {
            bail!("fake-apiserver listens on {url}, not on loopback");
        }
        Ok(Self {
            url: url.to_owned(),
            child,
            stdin,
            stdout,
            load_time: started.elapsed(),
        })
    }

    /// Sends `apply <json>`; returns when the line is written (the answer
    /// is read by [`Self::answer`], so a caller can time the change first).
    pub fn send_apply(&mut self, obj: &serde_json::Value) -> anyhow::Result<()> {
        use std::io::Write as _;
        let line = format!("apply {obj}\n");
        self.stdin.write_all(line.as_bytes())?;
        self.stdin.flush()?;
        Ok(())
    }

    /// When the server last handed a watch event to a connection
    /// (CLOCK_MONOTONIC ns, as [`monotonic_ns`]).
    pub fn event_sent_ns(&mut self) -> anyhow::Result<u64> {
        use std::io::Write as _;
        self.stdin.write_all(b"sent\n")?;
        self.stdin.flush()?;
        let v = self.answer()?;
        v.parse()
            .with_context(|| format!("fake-apiserver's sent stamp {v:?}"))
    }

    /// The answer to the last command: `ok <rv>` or an error.
    pub fn answer(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        match line.trim().strip_prefix("ok") {
            Some(v) => Ok(v.trim().to_owned()),
            None => bail!("fake-apiserver: {}", line.trim()),
        }
    }
}

impl Drop for ApiServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CLOCK_MONOTONIC in ns: the clock the fake API server stamps events with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer for the call's duration.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `bpftool prog profile` of one program for `secs` seconds; its output, or
/// why there is none (a VM without a PMU has no hardware counters).
pub fn prog_profile(id: u64, secs: u32) -> String {
    let pmu = Path::new("/sys/bus/event_source/devices/cpu").exists()
        || Path::new("/sys/bus/event_source/devices/cpu_core").exists();
    let note = if pmu {
        String::new()
    } else {
        "This machine has no CPU PMU (no /sys/bus/event_source/devices/cpu: the VM exposes no hardware counters), so cycles, instructions and LLC misses cannot be counted here whatever bpftool does; bpf_stats' ns/call is the only per-call figure. ".to_owned()
    };
    let out = Command::new("bpftool")
        .args(["prog", "profile", "id", &id.to_string(), "duration"])
        .arg(secs.to_string())
        .args(["cycles", "instructions", "llc_misses"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) => {
            let mut text = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            let err = String::from_utf8_lossy(&o.stderr).trim().to_owned();
            if !err.is_empty() {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&err);
            }
            if !o.status.success() {
                text = format!("bpftool prog profile failed ({}): {text}", o.status);
            }
            format!("{note}{text}")
        }
        Err(e) => format!("{note}bpftool prog profile could not run: {e}"),
    }
}

// ---- BPF: bpftool queries (pinned maps are read with `lb_tests::sys::PinnedMap`) ----

pub fn bpftool_json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = lb_tests::run(Command::new("bpftool").args(args).arg("-j"))?;
    Ok(serde_json::from_str(&out)?)
}

/// Program ids behind the links pinned in `bpffs`, with their names.
pub fn pinned_programs(bpffs: &Path) -> Vec<(u64, String)> {
    let mut progs = Vec::new();
    let Ok(entries) = fs::read_dir(bpffs) else {
        return progs;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("link") {
            continue;
        }
        let Ok(link) = bpftool_json(&["link", "show", "pinned", &e.path().to_string_lossy()])
        else {
            continue;
        };
        let Some(id) = link["prog_id"].as_u64() else {
            continue;
        };
        let pname = bpftool_json(&["prog", "show", "id", &id.to_string()])
            .ok()
            .and_then(|p| p["name"].as_str().map(str::to_owned))
            .unwrap_or_default();
        progs.push((id, pname));
    }
    progs.sort();
    progs
}

/// (run_time_ns, run_cnt) of a program (zeros unless bpf_stats are on).
pub fn prog_stats(id: u64) -> (u64, u64) {
    bpftool_json(&["prog", "show", "id", &id.to_string()])
        .map(|p| {
            (
                p["run_time_ns"].as_u64().unwrap_or(0),
                p["run_cnt"].as_u64().unwrap_or(0),
            )
        })
        .unwrap_or((0, 0))
}

/// Map name → (bytes_memlock, max_entries) of every map the programs use
/// and every map pinned in `bpffs` (LB_SVC_META is read by userspace only).
pub fn map_memory(bpffs: &Path, progs: &[u64]) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut ids = std::collections::BTreeSet::new();
    for e in fs::read_dir(bpffs).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("link") {
            continue;
        }
        if let Ok(m) = bpftool_json(&["map", "show", "pinned", &e.path().to_string_lossy()])
            && let Some(id) = m["id"].as_u64()
        {
            ids.insert(id);
        }
    }
    for id in progs {
        if let Ok(p) = bpftool_json(&["prog", "show", "id", &id.to_string()]) {
            for m in p["map_ids"].as_array().into_iter().flatten() {
                if let Some(m) = m.as_u64() {
                    ids.insert(m);
                }
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for m in ids {
        if let Ok(map) = bpftool_json(&["map", "show", "id", &m.to_string()]) {
            let name = map["name"].as_str().unwrap_or("?").to_owned();
            let bytes = map["bytes_memlock"]
                .as_u64()
                .or_else(|| map["bytes_memlock"].as_str().and_then(|s| s.parse().ok()))
                .unwrap_or(0);
            out.insert(name, (bytes, map["max_entries"].as_u64().unwrap_or(0)));
        }
    }
    out
}

/// The agent's heap at its peak, from heaptrack: the total and the bytes
/// of each component, attributed by the call sites that allocated them.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct HeapProfile {
    /// heaptrack's "peak heap memory consumption".
    pub peak_bytes: u64,
    /// Component → bytes (each call site's contribution at its peak).
    pub components: BTreeMap<String, u64>,
}

/// Components of the agent's heap, in report order.
pub const HEAP_COMPONENTS: [&str; 6] = [
    "index",
    "sync",
    "reconciler",
    "decode",
    "manifest source",
    "other",
];

/// Which component a call site's allocations belong to, from its
/// backtrace (innermost frame first; a frame is `name`, or `name @ path`
/// when heaptrack has its source line, as it has for every frame inlined
/// into another): the first frame of the agent's own code decides; the
/// slim objects the watch decodes are kept by the index, everything else
/// the watch allocates (HTTP bodies, pages of items, per-object scratch)
/// is a decode buffer; what the index builds for the sync to write is the
/// sync's copy.
pub fn heap_component(frames: &[String]) -> &'static str {
    for f in frames {
        let (name, path) = f.split_once(" @ ").unwrap_or((f.as_str(), ""));
        let name = name.replace("..", "::");
        if !name.contains("lb_userspace::") && !path.starts_with("lb-userspace/src/") {
            continue;
        }
        // A derived `Clone` of a model type is charged to whoever cloned.
        if name.contains("core::clone::Clone")
            || (path.starts_with("lb-userspace/src/model/") && name == "clone")
        {
            continue;
        }
        let is = |module: &str, file: &str| {
            name.contains(&format!("lb_userspace::{module}"))
                || path.starts_with(&format!("lb-userspace/src/{file}"))
        };
        let copy_out = name.contains("lb_userspace::model::index::Index::desired")
            || name.contains("lb_userspace::model::index::Index::served")
            || (path.starts_with("lb-userspace/src/model/index")
                && matches!(name.as_str(), "desired" | "served" | "checkout"));
        return if is("reconciler", "reconciler") || is("datapath", "datapath") {
            "reconciler"
        } else if (name.contains("lb_userspace::sources::kube::wire")
            && name.contains("convert::From"))
            || path.starts_with("lb-userspace/src/sources/kube/wire")
        {
            "index"
        } else if copy_out || is("sync", "sync") {
            "sync"
        } else if is("model", "model") {
            "index"
        } else if is("sources::kube", "sources/kube") {
            "decode"
        } else if is("sources::manifest", "sources/manifest")
            || is("sources::dir_watch", "sources/dir_watch")
        {
            "manifest source"
        } else {
            "other"
        };
    }
    let http = [
        "kube_client",
        "kube_runtime",
        "hyper",
        "serde_json",
        "bytes::",
    ];
    if frames.iter().any(|f| http.iter().any(|h| f.contains(h))) {
        "decode"
    } else {
        "other"
    }
}

/// heaptrack's sizes: `59.34M`, `835.58K`, `12B` (decimal units).
fn heaptrack_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'B' => (&s[..s.len() - 1], 1.0),
        'K' => (&s[..s.len() - 1], 1e3),
        'M' => (&s[..s.len() - 1], 1e6),
        'G' => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    Some((num.parse::<f64>().ok()? * mult) as u64)
}

/// Reads a heaptrack recording (`heaptrack_print`'s peak consumers).
pub fn heap_profile(recording: &Path) -> anyhow::Result<HeapProfile> {
    let out = Command::new("heaptrack_print")
        .arg("-f")
        .arg(recording)
        .args([
            "--print-peaks",
            "1",
            "--print-allocators",
            "0",
            "--print-temporary",
            "0",
            "--print-leaks",
            "0",
            "--merge-backtraces",
            "0",
            "-n",
            "100000",
        ])
        .stderr(Stdio::null())
        .output()
        .context("running heaptrack_print")?;
    parse_heap_profile(&String::from_utf8_lossy(&out.stdout))
}

fn parse_heap_profile(text: &str) -> anyhow::Result<HeapProfile> {
    let mut profile = HeapProfile::default();
    let mut site: Option<(u64, Vec<String>)> = None;
    let mut in_peaks = false;
    let flush = |site: &mut Option<(u64, Vec<String>)>, profile: &mut HeapProfile| {
        if let Some((bytes, frames)) = site.take() {
            *profile
                .components
                .entry(heap_component(&frames).to_owned())
                .or_default() += bytes;
        }
    };
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("peak heap memory consumption:") {
            profile.peak_bytes = heaptrack_bytes(v).unwrap_or(0);
        }
        if line.starts_with("PEAK MEMORY CONSUMERS") {
            in_peaks = true;
            continue;
        }
        if !in_peaks {
            continue;
        }
        if let Some((size, _)) = line.split_once(" peak memory consumed over ") {
            flush(&mut site, &mut profile);
            site = heaptrack_bytes(size).map(|b| (b, Vec::new()));
        } else if line.starts_with(|c: char| c.is_ascii_uppercase()) {
            // The next section.
            flush(&mut site, &mut profile);
            in_peaks = false;
        } else if let Some((_, frames)) = &mut site {
            let f = line.trim();
            if let Some(at) = f.strip_prefix("at ") {
                // The source line of the frame above (`path:line`).
                let path = at.rsplit_once(':').map_or(at, |(p, _)| p);
                if let Some(last) = frames.last_mut()
                    && !last.contains(" @ ")
                {
                    last.push_str(" @ ");
                    last.push_str(path);
                }
            } else if !f.is_empty() && !f.starts_with("in ") {
                frames.push(f.to_owned());
            }
        }
    }
    flush(&mut site, &mut profile);
    if profile.peak_bytes == 0 {
        bail!("heaptrack_print reported no peak");
    }
    Ok(profile)
}

#[cfg(test)]
mod heap_tests {
    use super::*;

    #[test]
    fn peak_consumers_are_summed_by_component() {
        let text = "reading file...\n\
PEAK MEMORY CONSUMERS\n\
11.19M peak memory consumed over 4500 calls from\n\
  alloc::raw_vec::finish_grow\n\
    in /x/lb-agent\n\
  _$LT$lb_userspace..sources..kube..wire..SlimSlice$u20$as$u20$core..convert..From$LT$x$GT$$GT$::from::h1\n\
  lb_userspace::sources::kube::pump::h2\n\
2.24M peak memory consumed over 12 calls from\n\
  _$LT$$RF$mut$u20$serde_json..de..Deserializer$GT$::deserialize_seq::h3\n\
  lb_userspace::sources::kube::pump::h2\n\
7.17M peak memory consumed over 1 calls from\n\
  lb_userspace::model::index::Index::desired::h4\n\
  lb_userspace::sync::Driver::sync::h5\n\
3.44M peak memory consumed over 9 calls from\n\
  lb_userspace::reconciler::Reconciler::apply_changes::h6\n\
1.5M peak memory consumed over 3 calls from\n\
  alloc::raw_vec::RawVec::grow_one::h9\n\
    in /x/lb-agent\n\
  clone\n\
    at lb-userspace/src/model/mod.rs:90\n\
  desired\n\
    at lb-userspace/src/model/index.rs:170\n\
  sync\n\
    at lb-userspace/src/sync.rs:650\n\
2.5M peak memory consumed over 3 calls from\n\
  alloc::raw_vec::RawVec::grow_one::h9\n\
  retranslate\n\
    at lb-userspace/src/model/index.rs:600\n\
    in /x/lb-agent\n\
835.58K peak memory consumed over 2 calls from\n\
  bytes::bytes_mut::BytesMut::reserve_inner::h7\n\
  hyper::proto::h1::io::Buffered::poll_read_from_io::h8\n\
10K peak memory consumed over 2 calls from\n\
  tokio::runtime::time::wheel::Wheel::new::h9\n\
\n\
MOST TEMPORARY ALLOCATIONS\n\
calls to allocation functions: 1799355 (316231/s)\n\
peak heap memory consumption: 59.34M\n";
        let p = parse_heap_profile(text).unwrap();
        assert_eq!(p.peak_bytes, 59_340_000);
        assert_eq!(p.components["index"], 11_190_000 + 2_500_000);
        assert_eq!(p.components["decode"], 2_240_000 + 835_580);
        assert_eq!(p.components["sync"], 7_170_000 + 1_500_000);
        assert_eq!(p.components["reconciler"], 3_440_000);
        assert_eq!(p.components["other"], 10_000);
    }
}
