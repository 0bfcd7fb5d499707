//! `cargo xtask bench`: the socket-LB against direct pod connects and
//! kube-proxy's iptables (nft-backed and legacy) and nftables datapaths, in
//! one run, interleaved per round, plus the control plane at scale. Writes
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

use lab::{AgentProc, Bins, ClientResult, Lab, PinnedFd};

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
}

/// One load of a datapath's configuration for N services × 10 endpoints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadRecord {
    pub round: u32,
    pub n: u32,
    pub datapath: Dp,
    /// Loader wall time (process start to exit), or for the agent: spawn to
    /// its "synced manifests" log line.
    pub wall_s: f64,
    /// Agent: its own elapsed_ms of that first sync (read + parse the
    /// manifests, translate, reconcile, every map write).
    pub sync_ms: Option<u64>,
    pub map_writes: Option<u64>,
    pub agent_vm_hwm_kib: Option<u64>,
    /// Map name → bytes_memlock.
    pub map_bytes: BTreeMap<String, u64>,
    pub map_max_entries: BTreeMap<String, u64>,
    pub error: Option<String>,
}

/// One endpoint change (a manifest edit) until the map showed it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub round: u32,
    pub n: u32,
    /// Atomic rename of the edited file → master entry's count changed.
    pub e2e_ms: f64,
    /// The agent's elapsed_ms for that sync (re-read and parse of the whole
    /// directory, translate, reconcile, map writes).
    pub sync_ms: u64,
    pub map_writes: u64,
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
    pub loadavg_start: String,
    pub loadavg_end: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub runs: Vec<RunRecord>,
    pub loads: Vec<LoadRecord>,
    pub changes: Vec<ChangeRecord>,
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
    ]))?;
    let dir = target.join("release");
    let bins = Bins {
        agent: dir.join("lb-agent"),
        server: dir.join("lb-benchserver"),
        client: dir.join("lb-benchclient"),
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
        }
    };

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
    if !results.runs.is_empty() {
        report::write_all(Path::new("."), &results)?;
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
        if n <= plan.ipt_max {
            let s = config::write_iptables(&work.path().join(format!("ipt-{n}.rules")), n)?;
            results.rulesets.push((n, "iptables".into(), s));
        }
        if n <= plan.nft_max {
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
    if !have_legacy {
        results
            .skipped
            .push("iptables-legacy: iptables-legacy-restore is not installed".into());
    }
    let mut lab = Lab::new(bins.clone())?;
    let mut rng = report::Rng::new();
    let t_run = Instant::now();
    for round in 1..=plan.rounds {
        for &n in &plan.ns {
            for dp in Dp::ALL {
                check()?;
                let enabled = match dp {
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
        }
    }
    Ok(())
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
    let mut progs: Vec<u64> = Vec::new();
    match dp {
        Dp::Direct => {}
        Dp::SocketLb => {
            let bpffs = Path::new(lb_tests::BPFFS).join(format!(
                "{}{}-r{round}-n{n}",
                lab::PREFIX,
                std::process::id() % 100_000
            ));
            let mdir = work.join(format!("manifests-{n}"));
            let max_services = (n * 11 + 1024).max(4096);
            let mut a = AgentProc::start(
                &lab.bins.agent,
                &mdir,
                &bpffs,
                &lab.cgroup,
                &work.join(format!("agent-r{round}-n{n}.log")),
                max_services,
                1024,
            )?;
            let spawned = a.spawned;
            let timeout = Duration::from_secs(30 + u64::from(n) / 500);
            let (sync, wall) = a.wait_sync(1, spawned, timeout)?;
            let mut rec = LoadRecord {
                round,
                n,
                datapath: dp,
                wall_s: wall.as_secs_f64(),
                sync_ms: Some(sync.elapsed_ms),
                map_writes: Some(sync.writes),
                agent_vm_hwm_kib: a.vm_hwm_kib(),
                map_bytes: BTreeMap::new(),
                map_max_entries: BTreeMap::new(),
                error: None,
            };
            if sync.frontends != u64::from(n) || sync.errors != 0 {
                rec.error = Some(format!(
                    "agent synced {} frontends with {} errors, expected {n} and 0",
                    sync.frontends, sync.errors
                ));
            }
            let pinned = lab::pinned_programs(&bpffs);
            progs = pinned
                .iter()
                .filter(|(_, name)| name.contains("connect4"))
                .map(|(id, _)| *id)
                .collect();
            let all: Vec<u64> = pinned.iter().map(|(id, _)| *id).collect();
            for (name, (bytes, max)) in lab::map_memory(&bpffs, &all) {
                rec.map_bytes.insert(name.clone(), bytes);
                rec.map_max_entries.insert(name, max);
            }
            let bad = rec.error.clone();
            results.loads.push(rec);
            if let Some(e) = bad {
                bail!("{e}");
            }
            if progs.is_empty() {
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
            let took = lab.load_rules(loader, &file);
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
            };
            results.loads.push(rec);
            took?;
        }
    }
    // Client variants: (variant, mode). Direct has only pod IPs.
    let variants: &[(&str, &str)] = if dp == Dp::Direct {
        &[("podIP", "connect"), ("podIP", "crr")]
    } else {
        &[
            ("random", "connect"),
            ("first", "connect"),
            ("last", "connect"),
            ("podIP", "connect"),
            ("random", "crr"),
        ]
    };
    for &(variant, mode) in variants {
        check()?;
        lab.server_cpu(if mode == "crr" { lab::CLIENT_CPU } else { 0 })?;
        let (base, targets, port, pick) = if variant == "podIP" {
            (config::POD_BASE, config::PODS, config::POD_PORT, "random")
        } else {
            (config::VIP_BASE, n, config::SVC_PORT, variant)
        };
        let before: Vec<(u64, u64)> = progs.iter().map(|&p| lab::prog_stats(p)).collect();
        let in_cgroup = dp == Dp::SocketLb;
        let r = lab.client(
            in_cgroup,
            mode,
            base,
            targets,
            port,
            pick,
            plan.warmup,
            plan.iters,
        );
        let after: Vec<(u64, u64)> = progs.iter().map(|&p| lab::prog_stats(p)).collect();
        let (mut dt, mut dc) = (0u64, 0u64);
        for (b, a) in before.iter().zip(&after) {
            dt += a.0.saturating_sub(b.0);
            dc += a.1.saturating_sub(b.1);
        }
        let (result, error) = match r {
            Ok(r) => {
                let err = (r.failures > 0)
                    .then(|| format!("{} failed connects: {:?}", r.failures, r.errors));
                (Some(r), err)
            }
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        if let Some(r) = &result {
            println!(
                "bench:   {variant:6} {mode:7} p50 {:7.1} µs  p99 {:7.1} µs  mean {:7.1} µs{}",
                r.p50_us,
                r.p99_us,
                r.mean_us,
                if dc > 0 {
                    format!("  connect4 {:.0} ns/call", dt as f64 / dc as f64)
                } else {
                    String::new()
                }
            );
        }
        if let Some(e) = &error {
            println!("bench:   {variant} {mode}: {e}");
        }
        results.runs.push(RunRecord {
            round,
            n,
            datapath: dp,
            variant: variant.into(),
            mode: mode.into(),
            result,
            error,
            bpf_ns_per_call: (dc > 0).then(|| dt as f64 / dc as f64),
            bpf_calls: (dc > 0).then_some(dc),
        });
    }
    if let Some(mut a) = agent {
        let changes = if n >= 100_000 {
            plan.changes.min(3)
        } else {
            plan.changes
        };
        let r = endpoint_changes(&mut a, work, round, n, changes, rng, results, check);
        if let Some(rec) = results
            .loads
            .iter_mut()
            .rev()
            .find(|l| l.datapath == Dp::SocketLb)
        {
            rec.agent_vm_hwm_kib = a.vm_hwm_kib().or(rec.agent_vm_hwm_kib);
        }
        a.stop();
        // Leave service 0 as generated for the next round's cold start.
        fs::write(
            work.join(format!("manifests-{n}")).join("svc-0.yaml"),
            config::service_yaml(0, 0),
        )?;
        r?;
    }
    Ok(())
}

/// Marks service 0's last endpoint not ready (and ready again), timing each
/// edit from the file's atomic rename until the master entry's count in
/// LB_SERVICES changes, polled with bpf(2) every ~20 µs.
#[allow(clippy::too_many_arguments)]
fn endpoint_changes(
    agent: &mut AgentProc,
    work: &Path,
    round: u32,
    n: u32,
    count: u32,
    rng: &mut report::Rng,
    results: &mut Results,
    check: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mdir = work.join(format!("manifests-{n}"));
    let map = PinnedFd::open(&agent.bpffs.join(lb_common::maps::SERVICES))?;
    let key = lb_common::ServiceKey::new(
        lb_common::v4_mapped(u32::from_ne_bytes(config::vip(0).octets())),
        config::SVC_PORT.to_be(),
        lb_common::PROTO_TCP,
        0,
    );
    let timeout = Duration::from_secs(30 + u64::from(n) / 2000);
    for j in 0..count {
        check()?;
        let not_ready = if j % 2 == 0 { 1 } else { 0 };
        let want = config::PODS - not_ready;
        let syncs = agent.syncs();
        // A random phase against the agent's 200 ms directory poll.
        std::thread::sleep(Duration::from_millis(50 + rng.below(200)));
        let tmp = work.join("svc-0.yaml.tmp");
        fs::write(&tmp, config::service_yaml(0, not_ready))?;
        let t0 = Instant::now();
        fs::rename(&tmp, mdir.join("svc-0.yaml"))?;
        let e2e = loop {
            let v: Option<lb_common::ServiceValue> = map.lookup(&key);
            if v.is_some_and(|v| v.count == want) {
                break t0.elapsed();
            }
            if t0.elapsed() > timeout {
                bail!("the endpoint change did not reach LB_SERVICES within {timeout:?}");
            }
            std::thread::sleep(Duration::from_micros(20));
        };
        let (sync, _) = agent.wait_sync(syncs + 1, t0, timeout)?;
        results.changes.push(ChangeRecord {
            round,
            n,
            e2e_ms: e2e.as_secs_f64() * 1000.0,
            sync_ms: sync.elapsed_ms,
            map_writes: sync.writes,
        });
    }
    Ok(())
}
