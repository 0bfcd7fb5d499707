//! Project tasks: `cargo xtask setup | test | demo | bench | image`.
//!
//! `test` and `demo` run `setup` first, so each is complete on a fresh
//! machine (as root) from a clean clone.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod image;
mod setup;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent, seconds when present).
    Setup,
    /// Everything CI runs: formatting, clippy on both halves, unit tests, privileged end-to-end tests.
    Test {
        /// Only the privileged end-to-end suites (skip fmt, clippy and unit tests).
        #[arg(long)]
        e2e_only: bool,
        /// Passed to the end-to-end test binary, e.g. a test name filter.
        #[arg(last = true)]
        filter: Vec<String>,
    },
    /// Build, then show ClusterIP connects balanced over three pods in isolated namespaces.
    Demo,
    /// Build the container image: a static lb-agent in an empty image, tagged
    /// localhost/lb-agent:<version>, and its OCI archive under target/image/.
    Image,
    /// Measure the socket-LB against direct, iptables and nftables datapaths and the control plane; writes bench/results/ and BENCHMARKS.md.
    Bench {
        /// Reduced run for development (N = 1 and 1,000, fewer connections, 2 rounds; under 3 minutes).
        #[arg(long)]
        quick: bool,
        /// Rounds (default 3; quick 2).
        #[arg(long)]
        rounds: Option<u32>,
        /// Measured connections per client run (default 20,000; quick 5,000).
        #[arg(long)]
        iters: Option<u64>,
        /// Largest N loaded with `nft -f` (default 10,000, loaded in round 1 only above 1,000: one transaction of 10,000 services takes over a minute here).
        #[arg(long)]
        nft_max: Option<u32>,
        /// Service counts to run, comma-separated (default 1,1000,10000,100000; quick 1,1000).
        #[arg(long, value_delimiter = ',')]
        ns: Option<Vec<u32>>,
        /// Only re-render results.md, the plot and BENCHMARKS.md from bench/results/results.json.
        #[arg(long)]
        report: bool,
        /// Only the agent's control plane: socket-LB cold starts from manifests and from the
        /// fake API server (RSS, sync time, endpoint changes, heap profile); no client runs and
        /// no other datapath, for quick memory and latency iterations.
        #[arg(long)]
        control_plane: bool,
        /// Only the socket-LB ablation (programs with parts switched off, ns/call of each) at each N.
        #[arg(long)]
        ablation_only: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::env::set_current_dir(workspace_root())?;
    match cli.task {
        Task::Setup => setup::setup().map(|_| ()),
        Task::Test { e2e_only, filter } => {
            setup::setup()?;
            test(e2e_only, &filter)
        }
        Task::Demo => {
            setup::setup()?;
            demo::run()
        }
        Task::Image => {
            setup::setup()?;
            image::build()
        }
        Task::Bench {
            quick,
            rounds,
            iters,
            nft_max,
            ns,
            report,
            control_plane,
            ablation_only,
        } => {
            if !report {
                setup::setup()?;
            }
            bench::run(bench::Opts {
                quick,
                rounds,
                iters,
                nft_max,
                ns,
                report_only: report,
                control_plane,
                ablation_only,
            })
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

pub fn cmd(program: &str) -> Command {
    let mut c = Command::new(program);
    c.stdin(Stdio::null());
    c
}

/// Runs a command with inherited output; fails on a non-zero exit.
pub fn exec(c: &mut Command) -> anyhow::Result<()> {
    println!("xtask: {}", describe(c));
    let status = c
        .status()
        .with_context(|| format!("running {}", describe(c)))?;
    if !status.success() {
        bail!("{} failed: {status}", describe(c));
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails on a non-zero exit.
pub fn output(c: &mut Command) -> anyhow::Result<String> {
    let out = c
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {}", describe(c)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}: {}",
            describe(c),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(c: &Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Passed and failed test counts, summed over every `test result:` line.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs `cargo test …`, echoing its output and counting its results.
fn cargo_test(args: &[&str], tally: &mut Tally) -> anyhow::Result<()> {
    let mut c = cmd("cargo");
    c.arg("test").args(args).stdout(Stdio::piped());
    println!("xtask: {}", describe(&c));
    let mut child = c.spawn().context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        tally.add_line(&line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo test {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn test(e2e_only: bool, filter: &[String]) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut tally = Tally::default();
    let result = (|| {
        if !e2e_only {
            exec(cmd("cargo").args(["fmt", "--all", "--", "--check"]))?;
            exec(cmd("cargo").args([
                "clippy",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            let nightly = std::env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
            exec(cmd("cargo").args([
                &format!("+{nightly}"),
                "clippy",
                "--package",
                "lb-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
                "-C",
                "panic=abort",
                "-Zpanic_abort_tests",
            ]))?;
            cargo_test(
                &[
                    "--workspace",
                    "--exclude",
                    "lb-ebpf",
                    "--exclude",
                    "lb-tests",
                ],
                &mut tally,
            )?;
        }
        // Privileged suites: fresh namespaces and cgroups per test, one at a
        // time because they share the kernel.
        exec(cmd("cargo").args(["build", "--package", "lb-userspace", "--bin", "lb-agent"]))?;
        // The image suite (tests named image_*) runs the image this builds.
        if filter.is_empty() || filter.iter().any(|f| f.contains("image")) {
            image::build()?;
        }
        let _lock = lb_tests::PrivilegedLock::acquire()?;
        lb_tests::cleanup_leftovers();
        let mut args = vec!["--package", "lb-tests", "--", "--test-threads=1"];
        args.extend(filter.iter().map(String::as_str));
        let r = cargo_test(&args, &mut tally);
        lb_tests::cleanup_leftovers();
        r
    })();
    println!(
        "xtask test: {} passed, {} failed, {} ignored in {:.0?}",
        tally.passed,
        tally.failed,
        tally.ignored,
        started.elapsed()
    );
    result
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn tally_sums_cargo_test_result_lines() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 13 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.03s");
        t.add_line(
            "test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 5 tests");
        assert_eq!((t.passed, t.failed, t.ignored), (15, 3, 1));
    }
}
