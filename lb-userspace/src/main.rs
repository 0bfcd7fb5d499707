//! `lb-agent`: the node agent's command line. Errors become `anyhow` only here.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::{self, CommonConfig, KubeAgentConfig, ManifestAgentConfig},
    datapath::{
        Datapath as _,
        bpf::{self, BpfDatapath, MapSizes, ProgramOptions},
    },
    health, list,
    model::{ExternalIps, TranslateOptions},
    sources::{
        kube::ClientConfig,
        manifest::{self, NodePortRange, ServiceCidr},
    },
    status, trace,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF socket-level load balancer for Kubernetes services"
)]
struct Cli {
    /// More detail: debug logging, and errors with their full cause chain and backtrace.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the datapath and keep its maps in sync with the services.
    Run(Box<RunArgs>),
    /// Show the services the pinned maps hold (works with or without a running agent).
    List {
        #[command(flatten)]
        pins: Pins,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show what is attached and where, map fill, kernel features and the running agent (works
    /// with or without a running agent).
    Status {
        #[command(flatten)]
        pins: Pins,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Stream live translations (and refusals) until Ctrl-C; the programs trace only while a
    /// tracer runs.
    Trace {
        #[command(flatten)]
        pins: Pins,
        /// Only this Service's events (NAMESPACE/NAME).
        #[arg(long, value_name = "NS/NAME", value_parser = parse_service_name)]
        service: Option<(String, String)>,
        /// Only events of this frontend (ClusterIP or node address and port).
        #[arg(long, value_name = "IP:PORT")]
        frontend: Option<SocketAddr>,
        /// `json`: one JSON object per event and line.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Detach the datapath and remove its pins.
    Uninstall {
        #[command(flatten)]
        pins: Pins,
    },
    /// Mount a bpffs at /sys/fs/bpf if none is there, and exit (needs CAP_SYS_ADMIN: the
    /// DaemonSet's init container runs it, so the agent's own container needs no such capability).
    MountBpffs,
}

/// Where an installation lives; the same on every subcommand so several
/// independent instances (tests) can coexist.
#[derive(Args, Clone)]
struct Pins {
    /// bpffs directory holding the pinned maps and link (bpffs is mounted at /sys/fs/bpf if absent).
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// cgroup v2 directory to attach to [default: the cgroup2 mount from /proc/mounts].
    #[arg(long)]
    cgroup: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    pins: Pins,
    /// Read Services, Pods, Endpoints and EndpointSlices from YAML files in DIR (watched, live)
    /// instead of watching the Kubernetes API.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kubeconfig", "api_server"])]
    manifests: Option<PathBuf>,
    /// Manifest files larger than this are skipped with a diagnostic (bytes, or with a Ki/Mi/Gi suffix).
    #[arg(long, value_name = "SIZE", default_value = "8Mi", value_parser = manifest::read::parse_size)]
    max_manifest_size: u64,
    /// kubeconfig file [default: $KUBECONFIG, ~/.kube/config, else the in-cluster service account].
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// API server URL, replacing the configured one (use an address that is not the
    /// default/kubernetes ClusterIP: the agent programs that service itself).
    #[arg(long, value_name = "URL")]
    api_server: Option<String>,
    /// Address for /healthz and /readyz ("none" to disable).
    #[arg(long, value_name = "ADDR", default_value = health::DEFAULT_ADDR, value_parser = parse_health_addr)]
    health_addr: HealthAddr,
    /// /healthz fails while one iteration of the sync loop (read the sources, write the maps)
    /// has run longer than this, e.g. 60s, 2m.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    stall_timeout: Duration,
    /// How often the maps are compared with the whole desired state and any difference
    /// repaired (logged and counted), as kube-proxy's --sync-period; e.g. 5m, 30s; 0 disables.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_period)]
    resync_period: Period,
    /// ClusterIP ranges for manifest Services: one CIDR, or an IPv4 and an IPv6 one separated
    /// by a comma, the first being the primary family (as kube-apiserver's
    /// --service-cluster-ip-range). Single-stack Services get the primary family; dual-stack
    /// ones (ipFamilyPolicy PreferDualStack/RequireDualStack) need both.
    #[arg(long, value_name = "CIDR[,CIDR]", default_value = manifest::DEFAULT_SERVICE_CIDR,
          value_parser = parse_service_cidr)]
    service_cidr: Box<ServiceCidr>,
    /// Where nodePorts are allocated for manifest Services of type NodePort (and LoadBalancer,
    /// unless allocateLoadBalancerNodePorts: false) whose ports name none, and the only nodePorts
    /// a manifest may name (as kube-apiserver's --service-node-port-range).
    #[arg(long, value_name = "FIRST-LAST", default_value = manifest::DEFAULT_NODE_PORT_RANGE)]
    node_port_range: NodePortRange,
    /// Entries of the service map `LB_SERVICES`: one per frontend (each ClusterIP family and port
    /// of a Service); allocated on use (only used when the map is created).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Slots of the backend array `LB_BACKENDS`: one per endpoint of each frontend, plus room for
    /// the new range of a frontend being changed; preallocated, 24 B per slot (only used when the
    /// map is created).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Frontends (service ports, one per ClusterIP family and port) whose names the agent keeps
    /// for `list` and restarts (only used when the map is created).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_FRONTENDS)]
    max_frontends: u32,
    /// Reverse-map entries of unconnected UDP sockets (LRU, preallocated, about 120 B each): one
    /// per socket and backend it sent to; an evicted entry shows that socket the backend's address
    /// in replies (only used when the map is created).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_REVERSE)]
    max_reverse: u32,
    /// Translated sockets open at once that keep their record in the slot array `LB_SOCK`
    /// (rounded up to a power of two; preallocated, 96 B per slot). A socket whose slot another
    /// live socket holds goes to a spill hash of as many entries (at least 4,096) instead, a little slower; the
    /// counter `sockSpilled` of `list -o json` counts them (only used when the map is created).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_SOCKETS)]
    max_sockets: u32,
    /// Session affinity entries (LRU, preallocated, about 100 B each): one per client network
    /// namespace and frontend with `sessionAffinity: ClientIP` used within its timeout; when full,
    /// the least recently used client picks anew (only used when the map is created).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_AFFINITY)]
    max_affinity: u32,
    /// Which translated sockets are destroyed when their backend leaves their service's
    /// frontend, so the application sees ECONNABORTED and reconnects: `udp`, connected UDP
    /// sockets (kube-proxy flushes their conntrack entries); `all`, TCP connections too, once
    /// their endpoint is gone from the Service or no longer serving (a terminating endpoint
    /// that still serves keeps its connections); `none`.
    #[arg(long, value_enum, default_value = "udp")]
    terminate_sockets: TerminateSockets,
    /// Log every translated connect from the eBPF program (debug level).
    #[arg(long)]
    bpf_log: bool,
    /// Use a --bpffs directory that also holds pins lb-agent did not create (refused by
    /// default: `uninstall` would leave them, and a typo such as /sys/fs/bpf is caught).
    #[arg(long)]
    allow_foreign_pins: bool,
    /// This node, for internalTrafficPolicy: Local [default: $NODE_NAME, else the hostname].
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// This node's zone, for topology hints [default: the node's topology.kubernetes.io/zone label].
    #[arg(long)]
    zone: Option<String>,
    /// This node's addresses, comma-separated (both families): a connect from the attached
    /// cgroup to one of them on a Service's nodePort is balanced like its ClusterIP [default:
    /// with the API, the InternalIP and ExternalIP addresses of the --node-name Node, followed
    /// as it changes; with --manifests, the addresses of this network namespace's interfaces,
    /// loopback and link-local left out].
    #[arg(long, value_delimiter = ',', value_name = "IP[,IP...]")]
    node_ip: Vec<std::net::IpAddr>,
    /// Which spec.externalIPs are translated: `node`, only those that are this node's addresses
    /// (a Service cannot capture connects to an arbitrary address, CVE-2020-8554); `all`,
    /// every one.
    #[arg(long, value_enum, default_value = "node")]
    external_ips: ExternalIpsArg,
    /// Also translate 127.0.0.1:nodePort and [::1]:nodePort, for sockets of the host's network
    /// namespace only (kube-proxy's iptables mode accepts localhost node ports too).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    localhost_node_ports: bool,
    /// Translate sockets of the host's network namespace only (the agent's): pods are left to
    /// another datapath, as service meshes and VM runtimes need.
    #[arg(long)]
    host_netns_only: bool,
    /// Fail with EADDRINUSE a bind() by a host-namespace socket to a NodePort (same protocol)
    /// on a wildcard address or on a node address it is served on, so a host process cannot
    /// silently shadow a Service (cgroup post_bind programs); pods are not affected.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    bind_protection: bool,
    /// Serve only services labelled service.kubernetes.io/service-proxy-name=NAME.
    #[arg(long)]
    service_proxy_name: Option<String>,
}

/// `--service-cidr`, boxed: two ranges would make `RunArgs` much larger than
/// the other subcommands.
fn parse_service_cidr(s: &str) -> Result<Box<ServiceCidr>, manifest::ServiceCidrError> {
    s.parse().map(Box::new)
}

/// A duration as Kubernetes flags write it: `500ms`, `30s`, `5m`, `1h`, or
/// plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 30s, 5m or 1h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if d.is_zero() {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(d)
}

/// `--resync-period`: a duration, or `None` for 0.
#[derive(Clone, Copy, Debug)]
struct Period(Option<Duration>);

fn parse_period(s: &str) -> Result<Period, String> {
    if s.trim() == "0" {
        return Ok(Period(None));
    }
    parse_duration(s).map(|d| Period(Some(d)))
}

/// `--health-addr`: an address, or `None` for "none".
#[derive(Clone, Copy, Debug)]
struct HealthAddr(Option<SocketAddr>);

fn parse_health_addr(s: &str) -> Result<HealthAddr, String> {
    if s == "none" || s.is_empty() {
        return Ok(HealthAddr(None));
    }
    s.parse()
        .map(|a| HealthAddr(Some(a)))
        .map_err(|e| format!("{e} (expected IP:PORT or none)"))
}

/// `--terminate-sockets`.
#[derive(Clone, Copy, ValueEnum)]
enum TerminateSockets {
    Udp,
    All,
    None,
}

impl From<TerminateSockets> for lb_userspace::datapath::terminate::Mode {
    fn from(t: TerminateSockets) -> Self {
        match t {
            TerminateSockets::Udp => Self::Udp,
            TerminateSockets::All => Self::All,
            TerminateSockets::None => Self::None,
        }
    }
}

/// `--external-ips`.
#[derive(Clone, Copy, ValueEnum)]
enum ExternalIpsArg {
    Node,
    All,
}

impl From<ExternalIpsArg> for ExternalIps {
    fn from(a: ExternalIpsArg) -> Self {
        match a {
            ExternalIpsArg::Node => Self::Node,
            ExternalIpsArg::All => Self::All,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbose = cli.verbose;
    match run_cli(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line for an operator, whatever RUST_BACKTRACE says;
            // the chain and backtrace only when asked for with -v.
            if verbose {
                eprintln!("error: {e:?}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run_cli(cli: Cli) -> anyhow::Result<()> {
    let default = if cli.verbose { "debug" } else { "info" };
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    if matches!(&cli.command, Command::Run(args) if args.bpf_log) {
        // The program's records arrive through aya-log with this target.
        filter = filter.add_directive("lb_ebpf=debug".parse()?);
    }
    // `init` also bridges `log` records (aya, aya-log) into tracing.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
    match cli.command {
        Command::Run(args) => run(*args),
        Command::List { pins, output } => list_cmd(&pins, output),
        Command::Uninstall { pins } => uninstall(&pins),
        Command::Status { pins, output } => {
            let status = status::status(&pins.bpffs);
            match output {
                Output::Table => print!("{}", status::text(&status)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
            }
            Ok(())
        }
        Command::Trace {
            pins,
            service,
            frontend,
            output,
        } => trace_cmd(
            &pins,
            trace::Filter {
                service,
                // A v4-mapped address would never match an IPv4 frontend.
                frontend: frontend.map(|f| SocketAddr::new(f.ip().to_canonical(), f.port())),
            },
            output,
        ),
        Command::MountBpffs => {
            if bpf::mount_sys_bpffs()? {
                println!("mounted bpffs at /sys/fs/bpf");
            } else {
                println!("bpffs already mounted at /sys/fs/bpf");
            }
            Ok(())
        }
    }
}

/// The agent's allocator is jemalloc, built in, with one arena. It holds
/// an index of small objects (a few million at 100,000 services) for
/// hours: glibc's malloc spent some 40 MiB in chunk headers and rounding
/// at that size (VmHWM 311 MiB against 293 with jemalloc, the same
/// manifests), and the static musl image would otherwise get musl's
/// allocator. One arena: the watch tasks build the index on the
/// runtime's workers and the sync driver reads it on the main thread;
/// an arena per thread held about 10 MiB more at 10,000 services, and
/// nothing here is allocation-bound enough to need them.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Read by jemalloc before `main`.
#[cfg(feature = "jemalloc")]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 10] = b"narenas:1\0";

fn run(args: RunArgs) -> anyhow::Result<()> {
    let RunArgs {
        pins,
        manifests,
        max_manifest_size,
        kubeconfig,
        api_server,
        health_addr,
        stall_timeout,
        resync_period,
        service_cidr,
        node_port_range,
        max_services,
        max_backends,
        max_frontends,
        max_reverse,
        max_sockets,
        max_affinity,
        terminate_sockets,
        bpf_log,
        allow_foreign_pins,
        node_name,
        zone,
        node_ip,
        external_ips,
        localhost_node_ports,
        host_netns_only,
        bind_protection,
        service_proxy_name,
    } = args;
    let node_name = node_name.or_else(hostname);
    let sizes = MapSizes {
        max_services,
        max_backends,
        max_frontends,
        max_reverse,
        max_sockets,
        max_affinity,
    };
    let translate = TranslateOptions {
        node_name,
        // A v4-mapped address would alias an IPv4 frontend in the maps.
        node_ips: node_ip.iter().map(|ip| ip.to_canonical()).collect(),
        external_ips: external_ips.into(),
        localhost_node_ports,
        zone,
        service_proxy_name,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let common = CommonConfig {
        bpffs: pins.bpffs,
        cgroup: pins.cgroup,
        sizes,
        programs: ProgramOptions {
            bpf_log,
            host_netns_only,
            bind_protection,
        },
        allow_foreign_pins,
        translate,
        health_addr: health_addr.0,
        stall_timeout,
        resync_period: resync_period.0,
        terminate: terminate_sockets.into(),
    };
    match manifests {
        Some(manifests) => {
            let cfg = ManifestAgentConfig {
                common,
                manifests,
                max_manifest_size,
                service_cidr: *service_cidr,
                node_port_range,
            };
            runtime.block_on(on_a_worker(agent::run_manifests(cfg, shutdown_signal())))?;
        }
        None => {
            let cfg = KubeAgentConfig {
                common,
                client: ClientConfig {
                    kubeconfig,
                    api_server,
                },
            };
            runtime.block_on(on_a_worker(agent::run_kube(cfg, shutdown_signal())))?;
        }
    }
    Ok(())
}

/// Runs the agent as a task on the runtime's workers rather than on the
/// thread that blocks on it: a watch event (read by a worker) then reaches
/// the sync driver on the same worker, instead of waking a second thread.
/// On this 2-vCPU VM that wake-up was a visible share of an event's time
/// to the maps (`cargo xtask bench`, API watch rows).
async fn on_a_worker<T: Send + 'static>(
    agent: impl Future<Output = Result<T, agent::AgentError>> + Send + 'static,
) -> anyhow::Result<T> {
    match tokio::spawn(agent).await {
        Ok(result) => Ok(result?),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => anyhow::bail!("the agent's task ended: {e}"),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

fn list_cmd(pins: &Pins, output: Output) -> anyhow::Result<()> {
    if !pins.bpffs.exists() {
        bail!(
            "no lb-agent installation at {} (is the agent running with this --bpffs?)",
            pins.bpffs.display()
        );
    }
    let dp = BpfDatapath::open(&pins.bpffs)
        .with_context(|| format!("opening the maps pinned in {}", pins.bpffs.display()))?;
    let snapshot = dp.snapshot()?;
    let rows = list::rows(&snapshot);
    match output {
        Output::Table => print!("{}", list::table(&rows)),
        Output::Json => {
            let counters = dp.stats()?;
            let counter = |i: u32| counters.get(i as usize).copied().unwrap_or(0);
            use lb_common::stats;
            let doc = serde_json::json!({
                "items": rows,
                "attached": bpf::attached_program(&pins.bpffs).is_some(),
                "counters": {
                    "translated": counter(stats::TRANSLATED),
                    "sendmsgTranslated": counter(stats::SENDMSG_TRANSLATED),
                    "noBackend": counter(stats::NO_BACKEND),
                    "slotFallback": counter(stats::SLOT_FALLBACK),
                    "reverseTranslated": counter(stats::REVERSE_TRANSLATED),
                    "reverseStale": counter(stats::REVERSE_STALE),
                    "reverseWriteFailed": counter(stats::REVERSE_WRITE_FAILED),
                    "mapFull": counter(stats::MAP_FULL),
                    "sockSpilled": counter(stats::SOCK_SPILLED),
                },
                "sockets": bpf::socket_occupancy(&pins.bpffs)?.map(|o| serde_json::json!({
                    "slots": o.slots,
                    "maxSlots": o.max_slots,
                    "spilled": o.spilled,
                })),
                "reverseMap": dp.reverse_occupancy()?.map(|o| serde_json::json!({
                    "entries": o.entries,
                    "maxEntries": o.max_entries,
                })),
                "affinity": dp.affinity_occupancy().map(|o| serde_json::json!({
                    "entries": o.entries,
                    "maxEntries": o.max_entries,
                })),
                "maps": bpf::map_fill(&pins.bpffs, &dp, &snapshot)?,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
    }
    Ok(())
}

/// `--service NS/NAME`.
fn parse_service_name(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(format!("{s:?}: expected NAMESPACE/NAME")),
    }
}

/// Holds the trace lease and prints events until Ctrl-C or SIGTERM; the
/// lease is cleared on the way out (and by `Tracer`'s drop on an error).
fn trace_cmd(pins: &Pins, filter: trace::Filter, output: Output) -> anyhow::Result<()> {
    use tokio::io::unix::AsyncFd;
    let dir = &pins.bpffs;
    if !dir.exists() {
        bail!("no lb-agent installation at {}", dir.display());
    }
    let mut tracer = trace::Tracer::open(dir)?;
    let ring = tracer.take_ring().context("the ring buffer")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        // SAFETY: the ring buffer owns its map fd for as long as the
        // AsyncFd owns the ring buffer, and always reports that same fd.
        let mut ring =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(std::io::Error::from)
                .context("polling the ring buffer")?;
        tracer.renew()?;
        eprintln!("tracing translations of {} (Ctrl-C to stop)", dir.display());
        let print = |events: Vec<trace::Event>| -> anyhow::Result<()> {
            for event in events {
                match output {
                    Output::Table => println!("{}", event.line()),
                    Output::Json => println!("{}", serde_json::to_string(&event)?),
                }
            }
            Ok(())
        };
        let mut renew = tokio::time::interval(trace::RENEW);
        // The programs wake a reader only when the ring is half full.
        let mut drain =
            tokio::time::interval(std::time::Duration::from_millis(lb_common::trace::DRAIN_MS));
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = renew.tick() => tracer.renew()?,
                _ = drain.tick() => print(tracer.drain(ring.get_mut(), &filter))?,
                guard = ring.readable_mut() => {
                    let mut guard = guard.context("polling the ring buffer")?;
                    print(tracer.drain(guard.get_inner_mut(), &filter))?;
                    guard.clear_ready();
                }
            }
        }
        // What was written before the signal and not yet read.
        print(tracer.drain(ring.get_mut(), &filter))
    })?;
    tracer.stop()?;
    eprintln!("tracing stopped");
    Ok(())
}

fn uninstall(pins: &Pins) -> anyhow::Result<()> {
    let dir = pins.bpffs.display();
    match bpf::uninstall(&pins.bpffs)? {
        None => println!("nothing installed at {dir}"),
        Some(u) => {
            println!("detached and removed {} pins from {dir}", u.removed);
            if u.dir_removed {
                println!("removed {dir}");
            } else if !u.left.is_empty() {
                println!(
                    "left {dir} in place: it holds {} entries lb-agent did not create: {}",
                    u.left.len(),
                    u.left.join(", ")
                );
            }
        }
    }
    Ok(())
}
