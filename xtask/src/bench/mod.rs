//! `cargo xtask bench`: the socket-LB against direct pod connects and
//! kube-proxy's iptables (nft-backed and legacy) and nftables datapaths, in
//! one run, interleaved per round (connect, TCP_CRR, a bulk stream, UDP
//! request/response), plus the control plane at scale (cold programming and
//! endpoint changes from the manifest source and from the fake API server,
//! kube-proxy's full and partial ruleset loads, kernel and map memory). Writes
//! `bench/results/{results.json,results.md,connect_p50.svg}` and
//! `BENCHMARKS.md`. Method: `../shared/research/baseline-measurements.md`
//! (routed client → node → server namespaces, node namespace re-created per
//! datapath, pinned CPUs, RST close, ratios to the same round's direct run).
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{cmd, exec};

mod config;
mod lab;
mod report;

use lab::{AgentProc, ApiServerProc, Bins, ClientResult, Lab, MemCgroup, Source};

/// Options of `cargo xtask bench`.
#[derive(Clone, Debug)]
pub struct Opts {
    pub quick: bool,
    /// Rounds (default: 3, quick: 2).
    pub rounds: Option<u32>,
    /// Measured connections per client run (default 20,000, quick 3,000).
    pub iters: Option<u64>,
    /// Largest N loaded with `nft -f` (default 10,000; above 1,000 in round 1 only).
    pub nft_max: Option<u32>,
    /// Service counts instead of the default list.
    pub ns: Option<Vec<u32>>,
    /// Only re-render the reports from `bench/results/results.json`.
    pub report_only: bool,
    /// Only the socket-LB's control plane (cold starts, endpoint changes,
    /// heap profile): no client runs, no other datapath.
    pub control_plane: bool,
    /// Only the socket-LB ablation (no other datapath, no control plane).
    pub ablation_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Dp {
    #[serde(rename = "direct")]
    Direct,
    #[serde(rename = "socket-lb")]
    SocketLb,
    #[serde(rename = "nftables")]
    Nft,
    #[serde(rename = "iptables-nft")]
    IptNft,
    #[serde(rename = "iptables-legacy")]
    IptLegacy,
}

impl Dp {
    pub const ALL: [Dp; 5] = [Dp::Direct, Dp::SocketLb, Dp::Nft, Dp::IptNft, Dp::IptLegacy];
    pub fn label(self) -> &'static str {
        match self {
            Dp::Direct => "direct",
            Dp::SocketLb => "socket-lb",
            Dp::Nft => "nftables",
            Dp::IptNft => "iptables-nft",
            Dp::IptLegacy => "iptables-legacy",
        }
    }
}

/// One client run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub round: u32,
    pub n: u32,
    pub datapath: Dp,
    /// random / first / last (service VIPs) or podIP (pod IPs, random).
    pub variant: String,
    pub mode: String,
    pub result: Option<ClientResult>,
    pub error: Option<String>,
    /// connect4 run_time_ns / run_cnt over this run (socket-LB only).
    pub bpf_ns_per_call: Option<f64>,
    pub bpf_calls: Option<u64>,
    /// sock_release run_time_ns / run_cnt over this run (socket-LB only):
    /// the per-socket cost at close, to add to connect4's for a connection.
    #[serde(default)]
    pub release_ns_per_call: Option<f64>,
}

/// One ablation measurement: the programs loaded with some parts switched
/// off (`lb_common::ablate` bits), one client run, the hook's ns/call.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AblationRecord {
    /// Passes alternate the variants, so drift of the machine spreads
    /// over all of them.
    pub pass: u32,
    pub n: u32,
    pub variant: String,
    pub bits: u32,
    /// random (a translated connect4), podIP (connect4 that is not a
    /// service), udp (sendmsg4 per datagram, long-lived unconnected socket).
    pub case: String,
    pub ns_per_call: Option<f64>,
    pub calls: Option<u64>,
    pub release_ns_per_call: Option<f64>,
    pub error: Option<String>,
}

/// One miss-path measurement ([`miss_slot`]): connect4 to destinations that
/// are no service, with or without node addresses and NodePorts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MissRecord {
    pub round: u32,
    /// Each agent runs twice a round, in ABBA order.
    pub pass: u32,
    pub n: u32,
    /// Whether the agent had node addresses and NodePort Services.
    pub node_addresses: bool,
    /// Node-address frontends (node addresses and localhost × nodePorts).
    pub node_frontends: u64,
    /// Which destinations ([`config::MissSweep::name`]).
    pub sweep: String,
    /// Destinations of the sweep, and how many of them have their filter
    /// bit set (false positives: each pays an `LB_SERVICES` lookup).
    pub destinations: u64,
    pub filter_set: u64,
    pub ns_per_call: Option<f64>,
    pub calls: Option<u64>,
    pub error: Option<String>,
}

/// The ablation's variants: (name, `lb_common::ablate` bits). The first
/// is the program as it serves.
pub const ABLATIONS: &[(&str, u32)] = &[
    ("as built", 0),
    ("no reverse record", lb_common::ablate::NO_REVERSE),
    ("no socket cookie", lb_common::ablate::NO_COOKIE),
    ("no stats bump", lb_common::ablate::NO_STATS),
    ("no frontend filter", lb_common::ablate::NO_FILTER),
    ("sendmsg: no socket cache", lb_common::ablate::NO_SOCK_CACHE),
    ("empty program", lb_common::ablate::EMPTY),
    (
        "session affinity on every service",
        lb_common::ablate::ALL_AFFINITY,
    ),
    ("tracing on (lb-agent trace running)", TRACING),
];

/// Not an `lb_common::ablate` bit (the programs are loaded as built): the
/// variant runs its clients while `lb-agent trace` holds the trace lease,
/// so the row is what a translated connect costs while someone traces.
const TRACING: u32 = 1 << 31;

/// Passes over [`ABLATIONS`] per N.
const ABLATION_PASSES: u32 = 2;

/// One load of a datapath's configuration for N services × 10 endpoints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadRecord {
    pub round: u32,
    pub n: u32,
    pub datapath: Dp,
    /// Loader wall time (process start to exit), or for the agent: spawn to
    /// its initial sync (the time it records in its pinned `LB_AGENT`).
    pub wall_s: f64,
    /// Agent: its own programming time of that first sync (its
    /// `lb_network_programming_duration_seconds` sample: read + parse the
    /// manifests, translate, reconcile, every map write).
    pub sync_ms: Option<u64>,
    pub map_writes: Option<u64>,
    pub agent_vm_hwm_kib: Option<u64>,
    /// Map name → bytes_memlock.
    pub map_bytes: BTreeMap<String, u64>,
    pub map_max_entries: BTreeMap<String, u64>,
    pub error: Option<String>,
    /// Rulesets: kernel memory charged to the loader's memory cgroup after
    /// the load (the rules, chains, sets; the loader itself has exited).
    #[serde(default)]
    pub kernel_bytes: Option<u64>,
}

/// One endpoint change until the map showed it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub round: u32,
    pub n: u32,
    /// `manifests` (a file edit) or `api` (an EndpointSlice update through
    /// the fake API server's watch).
    #[serde(default = "manifests")]
    pub source: String,
    /// The change (atomic rename of the edited file, or the `apply` written
    /// to the fake API server) → master entry's count changed.
    pub e2e_ms: f64,
    /// Manifests: the agent's programming time of that change (its
    /// `lb_network_programming_duration_seconds` sample: re-read and parse
    /// of the edited file, translate, reconcile, map writes); API: `sync_us`
    /// in ms.
    pub sync_ms: u64,
    /// API source: the agent's sync time for that change
    /// (`lb_sync_duration_seconds_sum`'s growth).
    #[serde(default)]
    pub sync_us: Option<u64>,
    pub map_writes: u64,
    /// API source: from the fake server handing the watch event to the
    /// agent's connection (its `sent` stamp) to the map entry's change: the
    /// change as the agent's watch delivers it, without the fake server's
    /// own wake-up on the command and its broadcast.
    #[serde(default)]
    pub event_to_map_ms: Option<f64>,
}

fn manifests() -> String {
    "manifests".into()
}

/// A cold start of the agent against the fake API server already holding
/// N services × 10 endpoints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ApiLoadRecord {
    pub round: u32,
    pub n: u32,
    /// fake-apiserver start until it served every object (not the agent's).
    pub server_load_s: f64,
    /// Agent spawn → its initial sync (connect, list both kinds page by
    /// page over HTTP, decode, translate, every map write), as recorded in
    /// its pinned `LB_AGENT`.
    pub wall_s: f64,
    /// Its syncs' own time until then (`lb_sync_duration_seconds_sum`:
    /// translate + map writes, over the syncs made while the lists arrived).
    pub sync_ms: u64,
    pub map_writes: u64,
    pub frontends: u64,
    pub agent_vm_hwm_kib: Option<u64>,
    /// `/proc/PID/status` right after the initial sync: pages of the
    /// binary and libraries, and anonymous memory (heap, stacks, slack).
    #[serde(default)]
    pub agent_rss_file_kib: Option<u64>,
    #[serde(default)]
    pub agent_rss_anon_kib: Option<u64>,
    /// The agent's own event → map-write latency over this slot's changes:
    /// (events, p50 µs, p99 µs, max µs), from the growth of its
    /// `lb_network_programming_duration_seconds` histogram (quantiles
    /// interpolated inside buckets ten a decade; max: the upper bound of
    /// the highest bucket reached).
    pub agent_latency: Option<(u64, u64, u64, u64)>,
    pub error: Option<String>,
}

/// One more cold start at N, under heaptrack: where the agent's heap goes
/// at its peak.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HeapProfileRecord {
    pub n: u32,
    /// `manifests`, or `api` (empty in older results).
    #[serde(default)]
    pub source: String,
    pub profile: lab::HeapProfile,
}

/// One kube-proxy-style partial update (one endpoint removed or restored).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IncrementalRecord {
    pub round: u32,
    pub n: u32,
    pub datapath: Dp,
    pub remove: bool,
    pub wall_s: f64,
    pub error: Option<String>,
}

/// `bpftool prog profile` of connect4 while a random-service client ran.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProfileRecord {
    pub n: u32,
    pub prog_id: u64,
    pub output: String,
    pub bpf_ns_per_call: Option<f64>,
    pub client: Option<ClientResult>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    pub command: String,
    pub quick: bool,
    pub started_unix: u64,
    pub duration_s: f64,
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_gib: f64,
    pub os: String,
    pub tools: BTreeMap<String, String>,
    pub rounds: u32,
    pub warmup: u64,
    pub iters: u64,
    pub ns: Vec<u32>,
    pub git_head: String,
    /// Fraction of 2-second samples during the run in which other
    /// compilers (rustc, cc1, ld) were running, and mean CPU busy %.
    pub busy_samples: u64,
    pub busy_with_compilers: u64,
    pub mean_cpu_busy_pct: f64,
    /// Share of CPU time the host took from the VM's vCPUs during the run
    /// (/proc/stat steal): the noise no sampler inside the VM can see.
    #[serde(default)]
    pub steal_pct: Option<f64>,
    pub loadavg_start: String,
    pub loadavg_end: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub runs: Vec<RunRecord>,
    pub loads: Vec<LoadRecord>,
    pub changes: Vec<ChangeRecord>,
    #[serde(default)]
    pub api_loads: Vec<ApiLoadRecord>,
    #[serde(default)]
    pub incrementals: Vec<IncrementalRecord>,
    #[serde(default)]
    pub profiles: Vec<ProfileRecord>,
    #[serde(default)]
    pub heap_profiles: Vec<HeapProfileRecord>,
    #[serde(default)]
    pub ablations: Vec<AblationRecord>,
    #[serde(default)]
    pub misses: Vec<MissRecord>,
    /// (N, kind) → size of the generated configuration.
    pub rulesets: Vec<(u32, String, config::RulesetSize)>,
    pub skipped: Vec<String>,
    pub notes: Vec<String>,
}

/// Largest N whose nftables ruleset is loaded in every round.
const NFT_EVERY_ROUND: u32 = 1000;

struct Plan {
    ns: Vec<u32>,
    rounds: u32,
    warmup: u64,
    iters: u64,
    changes: u32,
    nft_max: u32,
    ipt_max: u32,
    lb_max: u32,
    /// Bulk streams per run and bytes per stream.
    bulk_streams: u64,
    bulk_bytes: u64,
    /// UDP transactions per run.
    udp_iters: u64,
    /// Endpoint changes through the API watch per slot.
    api_changes: u32,
    /// Connects per miss-path run (a UDP connect and close take about 3 µs).
    miss_iters: u64,
    /// Partial ruleset updates per ruleset slot (alternately remove, add).
    incr_changes: u32,
    /// N at which connect4 is profiled (round 1).
    profile_n: Option<u32>,
    /// See [`Opts::control_plane`].
    control_plane: bool,
    /// Only the ablation.
    ablation_only: bool,
}

pub fn run(opts: Opts) -> anyhow::Result<()> {
    if opts.report_only {
        let path = Path::new("bench/results/results.json");
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let results: Results = serde_json::from_str(&text)?;
        return report::write_all(Path::new("."), &results);
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // Children (client, agent) get the SIGINT too; xtask survives it to
        // tear everything down.
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let mut missing = Vec::new();
    for (bin, pkg) in [
        ("iptables-nft-restore", "iptables"),
        ("nft", "nftables"),
        ("bpftool", "bpftool"),
        ("heaptrack", "heaptrack"),
    ] {
        if crate::setup::which(bin).is_none() && !missing.contains(&pkg.to_owned()) {
            missing.push(pkg.to_owned());
        }
    }
    crate::setup::apt_install(&missing)?;

    let target =
        std::env::var("CARGO_TARGET_DIR").map_or_else(|_| PathBuf::from("target"), PathBuf::from);
    exec(cmd("cargo").args([
        "build",
        "--release",
        "--package",
        "lb-userspace",
        "--bin",
        "lb-agent",
        "--package",
        "lb-tests",
        "--bins",
        "--package",
        "lb-fake-apiserver",
        "--bin",
        "fake-apiserver",
    ]))?;
    // The agent allocates with jemalloc, which heaptrack cannot see: the
    // heap profiles run a build on the C library's malloc, in a target
    // directory of its own (the same features in one directory would
    // rebuild the agent each time). Live bytes per component are the
    // same under either allocator.
    let heap_target = target.join("heap-profile");
    let dir = target.join("release");
    let other = std::env::var_os("LB_BENCH_AGENT").map(PathBuf::from);
    if other.is_none() {
        exec(
            cmd("cargo")
                .args(["build", "--release", "--package", "lb-userspace"])
                .args(["--bin", "lb-agent", "--no-default-features", "--target-dir"])
                .arg(&heap_target),
        )?;
    }
    let bins = Bins {
        // Another build of the agent, to compare against (a "before").
        agent: other.clone().unwrap_or_else(|| dir.join("lb-agent")),
        heap_agent: other.unwrap_or_else(|| heap_target.join("release/lb-agent")),
        server: dir.join("lb-benchserver"),
        client: dir.join("lb-benchclient"),
        apiserver: dir.join("fake-apiserver"),
    };
    let plan = if opts.quick {
        Plan {
            ns: opts.ns.clone().unwrap_or_else(|| vec![1, 1000]),
            rounds: opts.rounds.unwrap_or(2),
            warmup: 500,
            iters: opts.iters.unwrap_or(5000),
            changes: 3,
            nft_max: opts.nft_max.unwrap_or(1000),
            ipt_max: 10_000,
            lb_max: 100_000,
            bulk_streams: 1,
            bulk_bytes: 512 << 20,
            udp_iters: 3000,
            api_changes: 20,
            miss_iters: 50_000,
            incr_changes: 2,
            profile_n: None,
            control_plane: opts.control_plane,
            ablation_only: opts.ablation_only,
        }
    } else {
        Plan {
            ns: opts
                .ns
                .clone()
                .unwrap_or_else(|| vec![1, 1000, 10_000, 100_000]),
            rounds: opts.rounds.unwrap_or(3),
            warmup: 2000,
            iters: opts.iters.unwrap_or(20_000),
            changes: 7,
            nft_max: opts.nft_max.unwrap_or(10_000),
            ipt_max: 10_000,
            lb_max: 100_000,
            bulk_streams: 1,
            bulk_bytes: 1 << 30,
            udp_iters: 5000,
            api_changes: 30,
            miss_iters: 50_000,
            incr_changes: 4,
            profile_n: None,
            control_plane: opts.control_plane,
            ablation_only: opts.ablation_only,
        }
    };
    // connect4 is profiled at the largest N up to 10,000 (the N).
    let mut plan = plan;
    plan.profile_n = plan.ns.iter().copied().filter(|&n| n <= 10_000).max();
    if plan.control_plane {
        plan.profile_n = None;
    }

    let _lock = lb_tests::PrivilegedLock::acquire()?;
    lab::cleanup_leftovers();
    let stats = BpfStatsGuard::enable()?;
    let sampler = report::BusySampler::start();
    let started = Instant::now();
    let mut results = Results {
        meta: report::machine_meta(&opts, plan.rounds, plan.warmup, plan.iters, &plan.ns),
        ..Results::default()
    };
    let outcome = bench(&bins, &plan, &mut results, &interrupted);
    drop(stats);
    lab::cleanup_leftovers();
    sampler.finish(&mut results.meta);
    results.meta.duration_s = started.elapsed().as_secs_f64();
    results.meta.loadavg_end = fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned();
    if let Err(e) = &outcome {
        results.notes.push(format!("the run stopped early: {e:#}"));
    }
    if !results.runs.is_empty() || !results.loads.is_empty() {
        report::write_all(Path::new("."), &results)?;
    } else if !results.ablations.is_empty() {
        // Only the ablation ran: printed, BENCHMARKS.md left as it is.
        println!("\n{}", report::ablation_table(&results));
    }
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted; partial results written, everything the bench created was removed");
    }
    outcome
}

/// `kernel.bpf_stats_enabled=1` for the run, restored afterwards.
struct BpfStatsGuard(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStatsGuard {
    fn enable() -> anyhow::Result<Self> {
        let old = fs::read_to_string(BPF_STATS)?.trim().to_owned();
        fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self(old))
    }
}

impl Drop for BpfStatsGuard {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, &self.0);
    }
}

fn bench(
    bins: &Bins,
    plan: &Plan,
    results: &mut Results,
    interrupted: &AtomicBool,
) -> anyhow::Result<()> {
    let work = tempfile::Builder::new().prefix("lbb-bench-").tempdir()?;
    let check = || -> anyhow::Result<()> {
        if interrupted.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    };
    let have_legacy = crate::setup::which("iptables-legacy-restore").is_some();
    let have_iptnft = crate::setup::which("iptables-nft-restore").is_some();
    // Generate every configuration once; each round loads the same files.
    for &n in &plan.ns {
        let t = Instant::now();
        let mdir = work.path().join(format!("manifests-{n}"));
        let bytes = config::write_manifests(&mdir, n)?;
        results.rulesets.push((
            n,
            "manifests".into(),
            config::RulesetSize {
                rules: u64::from(n) * 2,
                chains: 0,
                bytes,
            },
        ));
        let bytes = config::write_api_objects(&work.path().join(format!("api-{n}.json")), n)?;
        results.rulesets.push((
            n,
            "api-objects".into(),
            config::RulesetSize {
                rules: u64::from(n) * 2,
                chains: 0,
                bytes,
            },
        ));
        if n <= plan.ipt_max && !plan.control_plane {
            let s = config::write_iptables(&work.path().join(format!("ipt-{n}.rules")), n)?;
            results.rulesets.push((n, "iptables".into(), s));
            for remove in [true, false] {
                config::write_iptables_change(&ipt_change_file(work.path(), n, remove), n, remove)?;
            }
        }
        if n <= plan.nft_max && !plan.control_plane {
            let s = config::write_nft(&work.path().join(format!("nft-{n}.nft")), n)?;
            results.rulesets.push((n, "nftables".into(), s));
        }
        println!(
            "bench: generated configurations for N={n} in {:.1?}",
            t.elapsed()
        );
    }
    for &n in &plan.ns {
        if n > plan.nft_max {
            results.skipped.push(format!(
                "nftables at N={n}: not loaded. One `nft -f` transaction of the kube-proxy-shaped ruleset took 0.9 s at 1,000, 3.8 s at 3,000 and 78 s at 10,000 services on this machine (super-linear, almost all kernel time; the baseline saw 228 s at 10,000), so {n} would take far longer than the whole run's budget; pass --nft-max {n} to try"
            ));
        } else if n > NFT_EVERY_ROUND && plan.rounds > 1 {
            results.skipped.push(format!(
                "nftables at N={n}: loaded and measured in round 1 only (its ratios use round 1's direct run), because one `nft -f` of it takes over a minute here"
            ));
        }
        if n > plan.ipt_max {
            results.skipped.push(format!(
                "iptables (both backends) at N={n}: not loaded. iptables-restore of kube-proxy-shaped rulesets grows super-linearly here (12-18 s at 10,000 and 42-66 s at 20,000 in the baseline), so 100,000 would take many minutes per round"
            ));
        }
    }
    for remove in [true, false] {
        config::write_nft_change(&nft_change_file(work.path(), remove), remove)?;
    }
    if !have_legacy {
        results
            .skipped
            .push("iptables-legacy: iptables-legacy-restore is not installed".into());
    }
    let mut lab = Lab::new(bins.clone())?;
    let mut rng = report::Rng::new();
    let t_run = Instant::now();
    if plan.ablation_only {
        for &n in &plan.ns {
            lab.fresh_node()?;
            ablation(&lab, plan, results, work.path(), n, &check)?;
        }
        return Ok(());
    }
    for round in 1..=plan.rounds {
        for &n in &plan.ns {
            for dp in Dp::ALL {
                check()?;
                let enabled = match dp {
                    _ if plan.control_plane && dp != Dp::SocketLb => false,
                    Dp::Direct => true,
                    Dp::SocketLb => n <= plan.lb_max,
                    // One `nft -f` of more than 1,000 services takes a minute
                    // or more here: those load in the first round only.
                    Dp::Nft => n <= plan.nft_max && (n <= NFT_EVERY_ROUND || round == 1),
                    Dp::IptNft => n <= plan.ipt_max && have_iptnft,
                    Dp::IptLegacy => n <= plan.ipt_max && have_legacy,
                };
                if !enabled {
                    continue;
                }
                println!(
                    "bench: [{:>4.0} s] round {round}/{} N={n} {}",
                    t_run.elapsed().as_secs_f64(),
                    plan.rounds,
                    dp.label()
                );
                lab.fresh_node()?;
                let r = datapath_slot(
                    &lab,
                    plan,
                    results,
                    work.path(),
                    round,
                    n,
                    dp,
                    &mut rng,
                    &check,
                );
                if let Err(e) = r {
                    if interrupted.load(Ordering::SeqCst) {
                        return Err(e);
                    }
                    println!("bench: {} at N={n} failed: {e:#}", dp.label());
                    results
                        .notes
                        .push(format!("round {round}, N={n}, {}: {e:#}", dp.label()));
                }
            }
            // The ablation once per N, on the node the rulesets left clean.
            if round == 1 && n <= plan.lb_max && ablated_n(plan, n) && !plan.control_plane {
                check()?;
                println!(
                    "bench: [{:>4.0} s] N={n} socket-lb ablation",
                    t_run.elapsed().as_secs_f64()
                );
                lab.fresh_node()?;
                if let Err(e) = ablation(&lab, plan, results, work.path(), n, &check) {
                    if interrupted.load(Ordering::SeqCst) {
                        return Err(e);
                    }
                    println!("bench: the ablation at N={n} failed: {e:#}");
                    results.notes.push(format!("ablation, N={n}: {e:#}"));
                }
            }
            if n <= plan.lb_max && n >= 1000 && !plan.control_plane {
                check()?;
                println!(
                    "bench: [{:>4.0} s] round {round}/{} N={n} socket-lb miss path with node addresses",
                    t_run.elapsed().as_secs_f64(),
                    plan.rounds,
                );
                lab.fresh_node()?;
                if let Err(e) = miss_slot(&lab, plan, results, work.path(), round, n, &check) {
                    if interrupted.load(Ordering::SeqCst) {
                        return Err(e);
                    }
                    println!("bench: the miss-path slot at N={n} failed: {e:#}");
                    results
                        .notes
                        .push(format!("round {round}, N={n}, miss path: {e:#}"));
                }
            }
            check()?;
            if n <= plan.lb_max {
                println!(
                    "bench: [{:>4.0} s] round {round}/{} N={n} socket-lb from the fake API server",
                    t_run.elapsed().as_secs_f64(),
                    plan.rounds,
                );
                if let Err(e) =
                    api_slot(&lab, plan, results, work.path(), round, n, &mut rng, &check)
                {
                    if interrupted.load(Ordering::SeqCst) {
                        return Err(e);
                    }
                    println!("bench: the API source at N={n} failed: {e:#}");
                    results
                        .notes
                        .push(format!("round {round}, N={n}, socket-lb (API): {e:#}"));
                }
            }
        }
    }
    Ok(())
}

/// The N of the figures ablated in a full run: the smallest N
/// run (1 by default) and 10,000 (about 5 minutes each).
fn ablated_n(plan: &Plan, n: u32) -> bool {
    plan.ns.iter().min() == Some(&n) || n == 10_000
}

/// Each [`ABLATIONS`] variant in turn, [`ABLATION_PASSES`] times: the agent
/// loaded with its bits (`LB_BENCH_ABLATE`) in a bpffs of its own, the
/// random-service, pod-IP and unconnected-UDP clients, the hook's ns/call
/// from bpf_stats. Same node, cgroup and client as the main runs, so only
/// the program differs between variants.
fn ablation(
    lab: &Lab,
    plan: &Plan,
    results: &mut Results,
    work: &Path,
    n: u32,
    check: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mdir = work.join(format!("manifests-{n}"));
    for pass in 1..=ABLATION_PASSES {
        for &(variant, bits) in ABLATIONS {
            check()?;
            println!("bench:   ablation pass {pass}, N={n}: {variant}");
            let bpffs = lb_bpffs(&format!("ab{bits}-"), pass, n);
            let mut a = AgentProc::start_under(
                &[],
                &[(lb_userspace_ablate_env(), (bits & !TRACING).to_string())],
                &[],
                &lab.bins.agent,
                Source::Manifests(&mdir),
                &bpffs,
                &lab.cgroup,
                &work.join(format!("agent-ablate{bits}-p{pass}-n{n}.log")),
                max_services(n),
                max_backends(n),
                max_frontends(n),
            )?;
            let timeout = Duration::from_secs(30 + u64::from(n) / 500);
            a.wait_initial_sync(a.spawned, timeout)?;
            let progs = lab::pinned_programs(&bpffs);
            let tracer = if bits & TRACING != 0 {
                Some(start_tracer(&lab.bins.agent, &bpffs)?)
            } else {
                None
            };
            for (case, target, mode) in [
                ("random", "random", "connect"),
                ("podIP", "podIP", "connect"),
                ("udp", "first", "udp"),
            ] {
                // An empty program translates nothing: only destinations
                // that are no service are reachable, and they are its floor.
                if bits == lb_common::ablate::EMPTY && case != "podIP" {
                    continue;
                }
                check()?;
                let r = client_run(lab, plan, pass, n, Dp::SocketLb, target, mode, &progs, None);
                results.ablations.push(AblationRecord {
                    pass,
                    n,
                    variant: variant.to_owned(),
                    bits,
                    case: case.to_owned(),
                    ns_per_call: r.bpf_ns_per_call,
                    calls: r.bpf_calls,
                    release_ns_per_call: r.release_ns_per_call,
                    error: r.error,
                });
            }
            if let Some(mut t) = tracer {
                // SIGTERM: the tracer clears the lease on its way out.
                let _ = cmd("kill").arg(t.id().to_string()).status();
                let _ = t.wait();
            }
            a.stop();
        }
    }
    Ok(())
}

/// The miss path with node addresses (issue 13: a destination that is no
/// service costs the same whatever the number of node addresses). The same
/// N services served twice each, in ABBA order (BAAB in even rounds), so
/// the machine's drift falls on both alike: as they are, and with [`config::node_port_services`] of them NodePorts served on
/// [`config::NODE_IPS`] node addresses (`--node-ip`) and on localhost.
/// For each, connect4's ns/call over each [`config::MissSweep`], and the
/// share of the sweep whose filter bit is set: the node frontends add bits,
/// and each destination on one pays the `LB_SERVICES` lookup the filter
/// exists to avoid. Every destination is checked to be no frontend.
#[allow(clippy::too_many_arguments)]
fn miss_slot(
    lab: &Lab,
    plan: &Plan,
    results: &mut Results,
    work: &Path,
    round: u32,
    n: u32,
    check: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let k = config::node_port_services(n);
    let npdir = work.join(format!("manifests-{n}-nodeports"));
    if !npdir.exists() {
        config::write_manifests_with(&npdir, n, k)?;
    }
    // Each NodePort on every node address and on 127.0.0.1.
    let room = k * (config::NODE_IPS + 1);
    let mut order = [false, true, true, false];
    if round.is_multiple_of(2) {
        order = [true, false, false, true];
    }
    for (pass, node_addresses) in (1..).zip(order) {
        check()?;
        let (dir, args, tag) = if node_addresses {
            (
                npdir.clone(),
                vec!["--node-ip".to_owned(), config::node_ips()],
                "node",
            )
        } else {
            (work.join(format!("manifests-{n}")), Vec::new(), "plain")
        };
        println!("bench:   miss path, N={n}, {tag}, pass {pass}");
        let bpffs = lb_bpffs(&format!("miss-{tag}{pass}-"), round, n);
        let mut a = AgentProc::start_under(
            &[],
            &[],
            &args,
            &lab.bins.agent,
            Source::Manifests(&dir),
            &bpffs,
            &lab.cgroup,
            &work.join(format!("agent-miss-{tag}{pass}-r{round}-n{n}.log")),
            max_services(n) + room,
            // Each frontend has a backend range of its own.
            max_backends(n) + room * config::PODS,
            max_frontends(n) + room,
        )?;
        let r = (|| -> anyhow::Result<()> {
            a.wait_initial_sync(a.spawned, Duration::from_secs(30 + u64::from(n) / 500))?;
            let f = a.figures()?;
            let node_frontends = (f.programmed as u64).saturating_sub(config::frontends(n));
            let least = if node_addresses {
                u64::from(k * config::NODE_IPS)
            } else {
                0
            };
            if f.failed != 0.0 || node_frontends < least {
                bail!(
                    "agent programmed {} frontends with {} failing, expected at least {} and 0",
                    f.programmed,
                    f.failed,
                    config::frontends(n) + least
                );
            }
            let progs = lab::pinned_programs(&bpffs);
            let mut shares = Vec::new();
            for sweep in [config::MISS_FOREIGN, config::MISS_NODE] {
                let (destinations, filter_set) = filter_share(&bpffs, &sweep)?;
                println!(
                    "bench:     {}: {filter_set} of {destinations} destinations on a set filter bit",
                    sweep.name
                );
                shares.push((destinations, filter_set));
            }
            // Short runs, many of them, the sweeps interleaved: one run's
            // ns/call jumps between two levels (about 70 and 100 ns here,
            // whatever the agent), and the median of many runs does not.
            for _ in 0..MISS_RUNS {
                for (sweep, &(destinations, filter_set)) in
                    [config::MISS_FOREIGN, config::MISS_NODE]
                        .iter()
                        .zip(&shares)
                {
                    check()?;
                    let r = client_run(
                        lab,
                        plan,
                        round,
                        n,
                        Dp::SocketLb,
                        sweep.name,
                        "miss",
                        &progs,
                        None,
                    );
                    results.misses.push(MissRecord {
                        round,
                        pass,
                        n,
                        node_addresses,
                        node_frontends,
                        sweep: sweep.name.to_owned(),
                        destinations,
                        filter_set,
                        ns_per_call: r.bpf_ns_per_call,
                        calls: r.bpf_calls,
                        error: r.error,
                    });
                }
            }
            Ok(())
        })();
        a.stop();
        r?;
    }
    Ok(())
}

/// Client runs of each miss sweep per agent pass.
pub const MISS_RUNS: u32 = 5;

/// (destinations, those whose filter bit is set) for `sweep` (UDP) against
/// the installation in `bpffs`; an error if any of them is a frontend.
fn filter_share(bpffs: &Path, sweep: &config::MissSweep) -> anyhow::Result<(u64, u64)> {
    use lb_common::{PROTO_TCP, PROTO_UDP, ServiceKey, filter_probe, maps, v4_mapped};
    let filter = lb_tests::sys::PinnedMap::open(&bpffs.join(maps::FILTER))?;
    let services = lb_tests::sys::PinnedMap::open(&bpffs.join(maps::SERVICES))?;
    let key = |ip: std::net::Ipv4Addr, port: u16, proto| {
        ServiceKey::new(
            v4_mapped(u32::from_ne_bytes(ip.octets())),
            port.to_be(),
            proto,
        )
    };
    // The filter is read as the program reads it: service 0's frontend's
    // bits must be set.
    let (svc0, mask) = filter_probe(&key(config::VIP_BASE, config::SVC_PORT, PROTO_TCP));
    if filter.get::<u32, u64>(&svc0).unwrap_or(0) & mask != mask {
        bail!(
            "{} in {} lacks service 0's bits",
            maps::FILTER,
            bpffs.display()
        );
    }
    let mut words = std::collections::HashMap::new();
    let (mut total, mut set) = (0u64, 0u64);
    for (ip, port) in sweep.destinations() {
        let key = key(ip, port, PROTO_UDP);
        let (index, mask) = filter_probe(&key);
        let word = *words
            .entry(index)
            .or_insert_with(|| filter.get::<u32, u64>(&index).unwrap_or(0));
        total += 1;
        if word & mask == mask {
            set += 1;
            if services
                .lookup::<ServiceKey, { size_of::<lb_common::ServiceValue>() }>(&key)
                .is_some()
            {
                bail!(
                    "{ip}:{port}/UDP, a destination of the {} sweep, is a frontend",
                    sweep.name
                );
            }
        }
    }
    Ok((total, set))
}

/// `lb-agent trace` on the installation in `bpffs`, its events printed to
/// nowhere, once it says it traces (the lease is held).
fn start_tracer(agent: &Path, bpffs: &Path) -> anyhow::Result<std::process::Child> {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(agent)
        .arg("trace")
        .arg("--bpffs")
        .arg(bpffs)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting lb-agent trace")?;
    let mut line = String::new();
    if let Some(err) = child.stderr.take() {
        let mut err = std::io::BufReader::new(err);
        err.read_line(&mut line)?;
        // The rest (its goodbye) to nowhere, so its stderr stays open.
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    }
    if !line.contains("tracing translations") {
        let _ = child.kill();
        let _ = child.wait();
        bail!("lb-agent trace did not start: {line}");
    }
    Ok(child)
}

/// The agent's ablation variable (`lb_userspace::datapath::bpf::ABLATE_ENV`;
/// xtask does not link the agent's crate).
fn lb_userspace_ablate_env() -> &'static str {
    "LB_BENCH_ABLATE"
}

fn ipt_change_file(work: &Path, n: u32, remove: bool) -> PathBuf {
    work.join(format!(
        "ipt-{n}-{}.rules",
        if remove { "remove" } else { "add" }
    ))
}

fn nft_change_file(work: &Path, remove: bool) -> PathBuf {
    work.join(format!(
        "nft-change-{}.nft",
        if remove { "remove" } else { "add" }
    ))
}

fn lb_bpffs(tag: &str, round: u32, n: u32) -> PathBuf {
    Path::new(lb_tests::BPFFS).join(format!(
        "{}{}-{tag}r{round}-n{n}",
        lab::PREFIX,
        std::process::id() % 100_000
    ))
}

/// `LB_SERVICES` entries for N one-port services: a frontend each, with headroom.
fn max_services(n: u32) -> u32 {
    (n + 1024).max(4096)
}

/// Backend-array slots for N services of 10 endpoints, with room for new
/// ranges while old ones wait out their grace period.
fn max_backends(n: u32) -> u32 {
    (n * 10 + 1024).max(4096)
}

/// Frontend (service port) entries for N services, with headroom.
fn max_frontends(n: u32) -> u32 {
    (n + 1024).max(4096)
}

/// The control plane from the fake API server: the server is started with
/// every object of N services already stored, then the agent starts cold
/// (fresh bpffs directory) and is timed to its "initial sync complete"; then
/// service 0's EndpointSlice is updated `api_changes` times through the
/// server, each timed to the map write.
#[allow(clippy::too_many_arguments)]
fn api_slot(
    lab: &Lab,
    plan: &Plan,
    results: &mut Results,
    work: &Path,
    round: u32,
    n: u32,
    rng: &mut report::Rng,
    check: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut api = ApiServerProc::start(&lab.bins.apiserver, &work.join(format!("api-{n}.json")))?;
    let bpffs = lb_bpffs("api-", round, n);
    let mut a = AgentProc::start(
        &lab.bins.agent,
        Source::Api(&api.url),
        &bpffs,
        &lab.cgroup,
        &work.join(format!("agent-api-r{round}-n{n}.log")),
        max_services(n),
        max_backends(n),
        max_frontends(n),
    )?;
    let spawned = a.spawned;
    let timeout = Duration::from_secs(60 + u64::from(n) / 500);
    let mut rec = ApiLoadRecord {
        round,
        n,
        server_load_s: api.load_time.as_secs_f64(),
        ..ApiLoadRecord::default()
    };
    // The programming-latency histogram after the initial sync: the
    // slot's changes are what it gains from here.
    let mut initial: Option<lab::Figures> = None;
    let r = (|| -> anyhow::Result<()> {
        let wall = a.wait_initial_sync(spawned, timeout)?;
        rec.wall_s = wall.as_secs_f64();
        rec.agent_vm_hwm_kib = a.vm_hwm_kib();
        rec.agent_rss_file_kib = a.status_kib("RssFile:");
        rec.agent_rss_anon_kib = a.status_kib("RssAnon:");
        let f = a.figures()?;
        // The programming may be spread over the syncs made while the
        // lists arrived (grow-only until both are complete): count them all.
        rec.sync_ms = (f.sync_s * 1000.0) as u64;
        rec.map_writes = f.writes as u64;
        rec.frontends = f.programmed as u64;
        println!(
            "bench:   API cold start {:.3} s (server held {n} services; syncs until complete {} ms, {} writes)",
            rec.wall_s, rec.sync_ms, rec.map_writes
        );
        if f.programmed as u64 != config::frontends(n) || f.failed != 0.0 {
            bail!(
                "agent programmed {} frontends with {} failing, expected {} and 0",
                f.programmed,
                f.failed,
                config::frontends(n)
            );
        }
        initial = Some(f);
        let changes = plan.api_changes;
        endpoint_changes(
            &mut a,
            Some(&mut api),
            work,
            round,
            n,
            changes,
            rng,
            results,
            check,
        )
    })();
    rec.agent_vm_hwm_kib = a.vm_hwm_kib().or(rec.agent_vm_hwm_kib);
    println!(
        "bench:   API slot VmHWM {:.1} MiB (after the initial sync: RssFile {:.1}, RssAnon {:.1} MiB)",
        rec.agent_vm_hwm_kib.unwrap_or(0) as f64 / 1024.0,
        rec.agent_rss_file_kib.unwrap_or(0) as f64 / 1024.0,
        rec.agent_rss_anon_kib.unwrap_or(0) as f64 / 1024.0
    );
    // The agent's own event → map-write latency over the slot's changes.
    if let (Some(before), Ok(after)) = (&initial, a.figures()) {
        rec.agent_latency = lab::latency_summary(&after.programming.since(&before.programming));
    }
    a.stop();
    rec.error = r.as_ref().err().map(|e| format!("{e:#}"));
    results.api_loads.push(rec);
    drop(api);
    r?;
    if round == 1 && n > 1 && !allocator_experiment() {
        check()?;
        match heap_profile(lab, work, n, false) {
            Ok(profile) => {
                println!(
                    "bench:   API cold start under heaptrack: heap peak {:.1} MiB",
                    profile.peak_bytes as f64 / 1_048_576.0
                );
                results.heap_profiles.push(HeapProfileRecord {
                    n,
                    source: "api".into(),
                    profile,
                });
            }
            Err(e) => results
                .notes
                .push(format!("N={n}, heap profile of the API source: {e:#}")),
        }
    }
    Ok(())
}

/// `LB_BENCH_AGENT_ENV` is set: heaptrack would replace the allocator
/// under test, so its profile would be the default allocator's again.
fn allocator_experiment() -> bool {
    std::env::var_os("LB_BENCH_AGENT_ENV").is_some()
}

/// A slot's cold start once more (the API source's, or the manifest
/// source's), under heaptrack (no changes): the heap at its peak by
/// component, for the memory breakdown.
fn heap_profile(
    lab: &Lab,
    work: &Path,
    n: u32,
    manifests: bool,
) -> anyhow::Result<lab::HeapProfile> {
    let tag = if manifests { "manifests" } else { "api" };
    let api = if manifests {
        None
    } else {
        Some(ApiServerProc::start(
            &lab.bins.apiserver,
            &work.join(format!("api-{n}.json")),
        )?)
    };
    let mdir = work.join(format!("manifests-{n}"));
    let source = match &api {
        Some(api) => Source::Api(&api.url),
        None => Source::Manifests(&mdir),
    };
    let bpffs = lb_bpffs(&format!("heap-{tag}-"), 1, n);
    let out = work.join(format!("heaptrack-{tag}-{n}"));
    let out_arg = out.to_string_lossy().into_owned();
    let mut a = AgentProc::start_under(
        &["heaptrack", "-o", &out_arg],
        &[],
        &[],
        &lab.bins.heap_agent,
        source,
        &bpffs,
        &lab.cgroup,
        &work.join(format!("agent-{tag}-heap-n{n}.log")),
        max_services(n),
        // Both sources' agents get the slot's map sizes.
        max_backends(n),
        max_frontends(n),
    )?;
    // Allocation tracking slows the agent down a few times over.
    let timeout = Duration::from_secs(180 + u64::from(n) / 100);
    a.wait_initial_sync(a.spawned, timeout)?;
    a.terminate_and_wait(Duration::from_secs(120))?;
    a.stop();
    let recording = fs::read_dir(work)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&format!("heaptrack-{tag}-{n}.")))
        })
        .context("heaptrack wrote no recording")?;
    let profile = lab::heap_profile(&recording);
    let _ = fs::remove_file(&recording);
    profile
}

/// Loads `dp` into the fresh node (or starts the agent), runs its client
/// variants, and for the socket-LB measures the control plane too.
#[allow(clippy::too_many_arguments)]
fn datapath_slot(
    lab: &Lab,
    plan: &Plan,
    results: &mut Results,
    work: &Path,
    round: u32,
    n: u32,
    dp: Dp,
    rng: &mut report::Rng,
    check: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut agent = None;
    // Every attached program (id, name): connect4 for TCP and connected
    // UDP, sendmsg4 for unconnected UDP.
    let mut progs: Vec<(u64, String)> = Vec::new();
    match dp {
        Dp::Direct => {}
        Dp::SocketLb => {
            let bpffs = lb_bpffs("", round, n);
            let mdir = work.join(format!("manifests-{n}"));
            let mut a = AgentProc::start(
                &lab.bins.agent,
                Source::Manifests(&mdir),
                &bpffs,
                &lab.cgroup,
                &work.join(format!("agent-r{round}-n{n}.log")),
                max_services(n),
                max_backends(n),
                max_frontends(n),
            )?;
            let spawned = a.spawned;
            let timeout = Duration::from_secs(30 + u64::from(n) / 500);
            let wall = a.wait_initial_sync(spawned, timeout)?;
            // Before the scrape, which allocates (a little) in the agent.
            let vm_hwm = a.vm_hwm_kib();
            let f = a.figures()?;
            let mut rec = LoadRecord {
                round,
                n,
                datapath: dp,
                wall_s: wall.as_secs_f64(),
                // Its one programming sample: from the directory's first
                // read to the end of the map writes.
                sync_ms: Some((f.programming.sum * 1000.0) as u64),
                map_writes: Some(f.writes as u64),
                agent_vm_hwm_kib: vm_hwm,
                map_bytes: BTreeMap::new(),
                map_max_entries: BTreeMap::new(),
                error: None,
                kernel_bytes: None,
            };
            if f.programmed as u64 != config::frontends(n) || f.failed != 0.0 {
                rec.error = Some(format!(
                    "agent programmed {} frontends with {} failing, expected {} and 0",
                    f.programmed,
                    f.failed,
                    config::frontends(n)
                ));
            }
            let pinned = lab::pinned_programs(&bpffs);
            let all: Vec<u64> = pinned.iter().map(|(id, _)| *id).collect();
            progs = pinned;
            for (name, (bytes, max)) in lab::map_memory(&bpffs, &all) {
                rec.map_bytes.insert(name.clone(), bytes);
                rec.map_max_entries.insert(name, max);
            }
            println!(
                "bench:   manifest cold start {:.3} s, VmHWM {:.1} MiB",
                rec.wall_s,
                rec.agent_vm_hwm_kib.unwrap_or(0) as f64 / 1024.0
            );
            let bad = rec.error.clone();
            results.loads.push(rec);
            if let Some(e) = bad {
                bail!("{e}");
            }
            if !progs.iter().any(|(_, name)| name.contains("connect4")) {
                bail!(
                    "no connect4 program found behind the links pinned in {}",
                    bpffs.display()
                );
            }
            agent = Some(a);
        }
        Dp::Nft | Dp::IptNft | Dp::IptLegacy => {
            let (loader, file): (&[&str], PathBuf) = match dp {
                Dp::Nft => (&["nft", "-f", "-"], work.join(format!("nft-{n}.nft"))),
                Dp::IptNft => (
                    &["iptables-nft-restore"],
                    work.join(format!("ipt-{n}.rules")),
                ),
                _ => (
                    &["iptables-legacy-restore"],
                    work.join(format!("ipt-{n}.rules")),
                ),
            };
            // A memory cgroup of its own per load: what stays charged after
            // the loader exits is the ruleset's kernel memory.
            let memcg = MemCgroup::new(&format!("{}-r{round}-n{n}", dp.label()));
            if let Err(e) = &memcg {
                println!("bench:   no kernel-memory figure: {e:#}");
            }
            let memcg = memcg.ok();
            let took = lab.load_rules(loader, &file, memcg.as_ref());
            let kernel_bytes = memcg.as_ref().and_then(MemCgroup::kernel_bytes);
            if let (Ok(t), Some(k)) = (&took, kernel_bytes) {
                println!(
                    "bench:   loaded in {:.3} s; kernel memory {:.1} MiB ({:.0} B per service)",
                    t.as_secs_f64(),
                    k as f64 / 1048576.0,
                    k as f64 / f64::from(n)
                );
            }
            let rec = LoadRecord {
                round,
                n,
                datapath: dp,
                wall_s: took.as_ref().map_or(0.0, Duration::as_secs_f64),
                sync_ms: None,
                map_writes: None,
                agent_vm_hwm_kib: None,
                map_bytes: BTreeMap::new(),
                map_max_entries: BTreeMap::new(),
                error: took.as_ref().err().map(|e| format!("{e:#}")),
                kernel_bytes,
            };
            results.loads.push(rec);
            took?;
        }
    }
    // Client variants: (variant, mode). Direct has only pod IPs. The bulk
    // stream and UDP go to service 0's extra ports (`first`).
    let variants: &[(&str, &str)] = if dp == Dp::Direct {
        &[
            ("podIP", "connect"),
            ("podIP", "crr"),
            ("podIP", "bulk"),
            ("podIP", "udp"),
            ("podIP", "udp-conn"),
        ]
    } else {
        &[
            ("random", "connect"),
            ("first", "connect"),
            ("last", "connect"),
            ("podIP", "connect"),
            ("random", "crr"),
            ("first", "bulk"),
            ("podIP", "bulk"),
            ("first", "udp"),
            ("first", "udp-conn"),
        ]
    };
    let variants = if plan.control_plane { &[] } else { variants };
    for &(variant, mode) in variants {
        check()?;
        let rec = client_run(lab, plan, round, n, dp, variant, mode, &progs, None);
        results.runs.push(rec);
    }
    if dp == Dp::SocketLb
        && round == 1
        && plan.profile_n == Some(n)
        && let Some((prog, _)) = progs.iter().find(|(_, name)| name.contains("connect4"))
    {
        check()?;
        results.profiles.push(profile(lab, plan, round, n, *prog));
    }
    if matches!(dp, Dp::Nft | Dp::IptNft | Dp::IptLegacy) {
        incremental(lab, plan, results, work, round, n, dp, check)?;
    }
    if let Some(mut a) = agent {
        let changes = if n >= 100_000 {
            plan.changes.min(3)
        } else {
            plan.changes
        };
        let r = endpoint_changes(&mut a, None, work, round, n, changes, rng, results, check);
        if let Some(rec) = results
            .loads
            .iter_mut()
            .rev()
            .find(|l| l.datapath == Dp::SocketLb)
        {
            rec.agent_vm_hwm_kib = a.vm_hwm_kib().or(rec.agent_vm_hwm_kib);
            println!(
                "bench:   manifest slot VmHWM {:.1} MiB",
                rec.agent_vm_hwm_kib.unwrap_or(0) as f64 / 1024.0
            );
        }
        a.stop();
        // Leave service 0 as generated for the next round's cold start.
        fs::write(
            work.join(format!("manifests-{n}")).join("svc-0.yaml"),
            config::service_yaml(0, 0),
        )?;
        r?;
        if round == 1 && n > 1 && !allocator_experiment() {
            check()?;
            match heap_profile(lab, work, n, true) {
                Ok(profile) => {
                    println!(
                        "bench:   manifest cold start under heaptrack: heap peak {:.1} MiB",
                        profile.peak_bytes as f64 / 1_048_576.0
                    );
                    results.heap_profiles.push(HeapProfileRecord {
                        n,
                        source: "manifests".into(),
                        profile,
                    });
                }
                Err(e) => results
                    .notes
                    .push(format!("N={n}, heap profile of the manifest source: {e:#}")),
            }
        }
    }
    Ok(())
}

/// One client run of `mode` against `variant`'s targets, with the bpf_stats
/// delta over it of the hook that mode takes (connect4, or sendmsg4 for
/// unconnected UDP). `extra`: more client arguments.
#[allow(clippy::too_many_arguments)]
fn client_run(
    lab: &Lab,
    plan: &Plan,
    round: u32,
    n: u32,
    dp: Dp,
    variant: &str,
    mode: &str,
    progs: &[(u64, String)],
    extra: Option<&[String]>,
) -> RunRecord {
    let hook = if mode == "udp" {
        "sendmsg4"
    } else {
        "connect4"
    };
    let ids = |part: &str| -> Vec<u64> {
        progs
            .iter()
            .filter(|(_, name)| name.contains(part))
            .map(|(id, _)| *id)
            .collect()
    };
    let (progs, release) = (ids(hook), ids("sock_release"));
    // The server shares the client's CPU for request/response over one
    // connection each (as netperf TCP_CRR), and has the other one otherwise.
    let _ = lab.server_cpu(if mode == "crr" { lab::CLIENT_CPU } else { 0 });
    let (port, pod_port) = match mode {
        "bulk" => (config::BULK_SVC_PORT, config::BULK_POD_PORT),
        "udp" | "udp-conn" => (config::UDP_SVC_PORT, config::UDP_POD_PORT),
        _ => (config::SVC_PORT, config::POD_PORT),
    };
    let sweep = [config::MISS_FOREIGN, config::MISS_NODE]
        .into_iter()
        .find(|s| mode == "miss" && s.name == variant);
    let (base, targets, port, pick) = if let Some(s) = sweep {
        (s.base, s.addrs, s.port, "random")
    } else if variant == "podIP" {
        (config::POD_BASE, config::PODS, pod_port, "random")
    } else {
        (config::VIP_BASE, n, port, variant)
    };
    let (warmup, iters, mut args) = match mode {
        "bulk" => (
            0,
            plan.bulk_streams,
            vec!["--bytes".to_owned(), plan.bulk_bytes.to_string()],
        ),
        "udp" | "udp-conn" => (plan.warmup.min(1000), plan.udp_iters, Vec::new()),
        "miss" => (plan.warmup, plan.miss_iters, Vec::new()),
        _ => (plan.warmup, plan.iters, Vec::new()),
    };
    if let Some(e) = extra {
        args.extend_from_slice(e);
    }
    if let Some(s) = sweep {
        args.extend(["--port-span".to_owned(), s.ports.to_string()]);
    }
    let before: Vec<(u64, u64)> = progs.iter().map(|&p| lab::prog_stats(p)).collect();
    let release_before: Vec<(u64, u64)> = release.iter().map(|&p| lab::prog_stats(p)).collect();
    let in_cgroup = dp == Dp::SocketLb;
    let r = lab.client(
        in_cgroup, mode, base, targets, port, pick, warmup, iters, &args,
    );
    let after: Vec<(u64, u64)> = progs.iter().map(|&p| lab::prog_stats(p)).collect();
    let release_after: Vec<(u64, u64)> = release.iter().map(|&p| lab::prog_stats(p)).collect();
    let delta = |before: &[(u64, u64)], after: &[(u64, u64)]| {
        let (mut dt, mut dc) = (0u64, 0u64);
        for (b, a) in before.iter().zip(after) {
            dt += a.0.saturating_sub(b.0);
            dc += a.1.saturating_sub(b.1);
        }
        (dt, dc)
    };
    let (dt, dc) = delta(&before, &after);
    let (rt, rc) = delta(&release_before, &release_after);
    let (result, error) = match r {
        Ok(r) => {
            let err = (r.failures > 0)
                .then(|| format!("{} failed iterations: {:?}", r.failures, r.errors));
            (Some(r), err)
        }
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    if let Some(r) = &result {
        let mut bpf = if dc > 0 {
            format!("  {hook} {:.0} ns/call", dt as f64 / dc as f64)
        } else {
            String::new()
        };
        if rc > 0 {
            bpf.push_str(&format!(
                "  sock_release {:.0} ns/call ({rc} calls)",
                rt as f64 / rc as f64
            ));
        }
        if mode == "bulk" {
            println!(
                "bench:   {variant:6} {mode:8} {:6.2} Gbit/s ({} × {} MiB)",
                r.gbit_per_s,
                r.iters,
                r.bytes >> 20
            );
        } else {
            println!(
                "bench:   {variant:6} {mode:8} p50 {:7.1} µs  p99 {:7.1} µs  mean {:7.1} µs{bpf}",
                r.p50_us, r.p99_us, r.mean_us,
            );
        }
    }
    if let Some(e) = &error {
        println!("bench:   {variant} {mode}: {e}");
    }
    RunRecord {
        round,
        n,
        datapath: dp,
        variant: variant.into(),
        mode: mode.into(),
        result,
        error,
        bpf_ns_per_call: (dc > 0).then(|| dt as f64 / dc as f64),
        bpf_calls: (dc > 0).then_some(dc),
        release_ns_per_call: (rc > 0).then(|| rt as f64 / rc as f64),
    }
}

/// Seconds `bpftool prog profile` samples connect4.
pub const PROFILE_SECS: u32 = 5;

/// `bpftool prog profile` of connect4 (cycles, instructions, LLC misses)
/// while the random-service connect client runs; on a VM without a PMU the
/// record says so and bpf_stats' ns/call is all there is.
fn profile(lab: &Lab, plan: &Plan, round: u32, n: u32, prog: u64) -> ProfileRecord {
    println!(
        "bench:   profiling connect4 (prog {prog}) for {PROFILE_SECS} s under the random-service client"
    );
    let secs = f64::from(PROFILE_SECS) + 2.0;
    let handle = std::thread::spawn(move || {
        // Let the client get past its warm-up first.
        std::thread::sleep(Duration::from_millis(700));
        lab::prog_profile(prog, PROFILE_SECS)
    });
    // Bounded by time, not by count (the last --iters wins).
    let extra = [
        "--seconds".to_owned(),
        secs.to_string(),
        "--iters".to_owned(),
        "100000000".to_owned(),
    ];
    let run = client_run(
        lab,
        plan,
        round,
        n,
        Dp::SocketLb,
        "random",
        "connect",
        &[(prog, "connect4".to_owned())],
        Some(&extra),
    );
    let output = handle
        .join()
        .unwrap_or_else(|_| "the profiling thread panicked".into());
    println!(
        "bench:   profile: {}",
        output.lines().next().unwrap_or("(no output)")
    );
    ProfileRecord {
        n,
        prog_id: prog,
        output,
        bpf_ns_per_call: run.bpf_ns_per_call,
        client: run.result,
    }
}

/// kube-proxy's way of applying one endpoint change to a loaded ruleset:
/// `iptables-restore --noflush` of the changed chains plus the rewritten
/// top-level chains, or one small `nft -f` transaction. Alternately removes
/// and restores service 0's last endpoint, `incr_changes` times (an even
/// count leaves the ruleset as loaded).
#[allow(clippy::too_many_arguments)]
fn incremental(
    lab: &Lab,
    plan: &Plan,
    results: &mut Results,
    work: &Path,
    round: u32,
    n: u32,
    dp: Dp,
    check: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut took_all = Vec::new();
    for j in 0..plan.incr_changes {
        check()?;
        let remove = j % 2 == 0;
        let (loader, file): (&[&str], PathBuf) = match dp {
            Dp::Nft => (&["nft", "-f", "-"], nft_change_file(work, remove)),
            Dp::IptNft => (
                &["iptables-nft-restore", "--noflush"],
                ipt_change_file(work, n, remove),
            ),
            _ => (
                &["iptables-legacy-restore", "--noflush"],
                ipt_change_file(work, n, remove),
            ),
        };
        let took = lab.load_rules(loader, &file, None);
        if let Ok(t) = &took {
            took_all.push(t.as_secs_f64());
        }
        let error = took.as_ref().err().map(|e| format!("{e:#}"));
        results.incrementals.push(IncrementalRecord {
            round,
            n,
            datapath: dp,
            remove,
            wall_s: took.as_ref().map_or(0.0, Duration::as_secs_f64),
            error: error.clone(),
        });
        if let Some(e) = error {
            bail!("partial update: {e}");
        }
    }
    if !took_all.is_empty() {
        println!(
            "bench:   one endpoint change as kube-proxy applies it: {}",
            took_all
                .iter()
                .map(|t| format!("{:.3} s", t))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Marks service 0's last endpoint not ready (and ready again), timing each
/// change until the frontend's count in LB_SERVICES changes, polled
/// with bpf(2) every ~20 µs. Without `api` the change is a manifest edit
/// (timed from the file's atomic rename); with it, an EndpointSlice update
/// through the fake API server (timed from writing the `apply` command).
#[allow(clippy::too_many_arguments)]
fn endpoint_changes(
    agent: &mut AgentProc,
    mut api: Option<&mut ApiServerProc>,
    work: &Path,
    round: u32,
    n: u32,
    count: u32,
    rng: &mut report::Rng,
    results: &mut Results,
    check: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mdir = work.join(format!("manifests-{n}"));
    let map = lb_tests::sys::PinnedMap::open(&agent.bpffs.join(lb_common::maps::SERVICES))?;
    let key = lb_common::ServiceKey::new(
        lb_common::v4_mapped(u32::from_ne_bytes(config::vip(0).octets())),
        config::SVC_PORT.to_be(),
        lb_common::PROTO_TCP,
    );
    let timeout = Duration::from_secs(30 + u64::from(n) / 2000);
    for j in 0..count {
        check()?;
        let not_ready = if j % 2 == 0 { 1 } else { 0 };
        let want = config::PODS - not_ready;
        let before = agent.figures()?;
        let mut t0_mono = 0;
        let t0 = if let Some(api) = api.as_deref_mut() {
            // Idle gaps, so every change is a sync of its own.
            std::thread::sleep(Duration::from_millis(20 + rng.below(30)));
            let slice = config::slice_json(0, not_ready);
            let t0 = Instant::now();
            t0_mono = lab::monotonic_ns();
            api.send_apply(&slice)?;
            t0
        } else {
            // A random phase against the agent's 200 ms directory poll.
            std::thread::sleep(Duration::from_millis(50 + rng.below(200)));
            let tmp = work.join("svc-0.yaml.tmp");
            fs::write(&tmp, config::service_yaml(0, not_ready))?;
            let t0 = Instant::now();
            fs::rename(&tmp, mdir.join("svc-0.yaml"))?;
            t0
        };
        let (e2e, seen_mono) = loop {
            let v: Option<lb_common::ServiceValue> = map.get(&key);
            if v.is_some_and(|v| u32::from(v.count) == want) {
                break (t0.elapsed(), lab::monotonic_ns());
            }
            if t0.elapsed() > timeout {
                bail!("the endpoint change did not reach LB_SERVICES within {timeout:?}");
            }
            std::thread::sleep(Duration::from_micros(20));
        };
        let mut event_to_map_ms = None;
        if let Some(api) = api.as_deref_mut() {
            api.answer()?;
            // Its watch event left the server after the command was written
            // and before the map changed; a stamp outside that is another
            // event's (none is expected) and is not used.
            let sent = api.event_sent_ns()?;
            if (t0_mono..=seen_mono).contains(&sent) {
                event_to_map_ms = Some((seen_mono - sent) as f64 / 1e6);
            }
        }
        // The sync that wrote it, and (API) the event's programming sample.
        let events = if api.is_some() { 1.0 } else { 0.0 };
        let after = agent.figures_after(&before, events, timeout)?;
        let sync_us = ((after.sync_s - before.sync_s) * 1e6) as u64;
        // Manifests: its one sample, from the edit's read to the writes.
        let programming_ms = ((after.programming.sum - before.programming.sum) * 1000.0) as u64;
        results.changes.push(ChangeRecord {
            round,
            n,
            source: if api.is_some() { "api" } else { "manifests" }.into(),
            e2e_ms: e2e.as_secs_f64() * 1000.0,
            sync_ms: if api.is_some() {
                sync_us / 1000
            } else {
                programming_ms
            },
            sync_us: api.is_some().then_some(sync_us),
            map_writes: (after.writes - before.writes) as u64,
            event_to_map_ms,
        });
    }
    Ok(())
}
