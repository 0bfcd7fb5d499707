//! Installs what building the eBPF programs needs, idempotently: a nightly
//! with rust-src, the LLVM development package of the nightly's LLVM major,
//! and bpf-linker built against it; and what the container image needs: the
//! musl target (a static agent), musl-gcc (ring's C code), buildah and
//! podman. Takes a few seconds when all is present.
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{cmd, exec, output};

/// Used when the machine has no `nightly` channel: the date our aya set is known to build with.
const PINNED_NIGHTLY: &str = "nightly-2026-05-20";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM majors bpf-linker 0.13 has a feature for.
const BPF_LINKER_LLVM: &[u32] = &[21, 22, 23];
/// The static agent in the container image is built for this target.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// What later steps need to know about the set-up.
#[derive(Clone, Debug)]
pub struct Env {
    /// Toolchain aya-build uses for the eBPF crate (`LB_EBPF_TOOLCHAIN`).
    pub nightly: String,
}

impl Env {
    /// Sets the environment every cargo invocation of xtask inherits.
    pub fn export(&self) {
        // SAFETY: xtask is single-threaded while it sets up.
        unsafe {
            std::env::set_var("LB_EBPF_TOOLCHAIN", &self.nightly);
            std::env::set_var("DEBIAN_FRONTEND", "noninteractive");
        }
    }
}

pub fn setup() -> anyhow::Result<Env> {
    if !is_root() {
        bail!("run as root: the datapath needs CAP_BPF/CAP_NET_ADMIN and installs system packages");
    }
    let nightly = nightly_toolchain()?;
    exec(cmd("rustup").args([
        "component",
        "add",
        "--toolchain",
        &nightly,
        "rust-src",
        "clippy",
        "rustfmt",
    ]))?;
    exec(cmd("rustup").args(["component", "add", "clippy", "rustfmt"]))?;
    // A no-op when present; the image's agent is linked statically against musl.
    exec(cmd("rustup").args(["target", "add", MUSL_TARGET]))?;
    let llvm = llvm_major(&nightly)?;
    if !BPF_LINKER_LLVM.contains(&llvm) {
        bail!(
            "{nightly} uses LLVM {llvm}; bpf-linker {BPF_LINKER_VERSION} supports {BPF_LINKER_LLVM:?}"
        );
    }
    let mut packages = Vec::new();
    let llvm_prefix = format!("/usr/lib/llvm-{llvm}");
    if !Path::new(&llvm_prefix).join("lib/libLLVM.so").exists() {
        packages.push(format!("llvm-{llvm}-dev"));
    }
    // dnsmasq-base, not dnsmasq: the latter starts a host-wide DNS service.
    for (bin, package) in [
        ("ip", "iproute2"),
        ("mount", "mount"),
        ("dnsmasq", "dnsmasq-base"),
        ("dig", "bind9-dnsutils"),
        // The UDP suite and the benchmark read map and program state with it.
        ("bpftool", "bpftool"),
        // The container image: ring's C code for the musl target, the
        // image built from scratch, and the image suite's container runtime.
        ("musl-gcc", "musl-tools"),
        // jemalloc, the agent's allocator, is built from its C sources.
        ("make", "make"),
        ("buildah", "buildah"),
        ("podman", "podman"),
        // crun 1.8 (podman's default here) refuses hybrid cgroup hosts.
        ("runc", "runc"),
    ] {
        if which(bin).is_none() {
            packages.push(package.to_owned());
        }
    }
    apt_install(&packages)?;
    if !bpf_linker_ok(llvm) {
        println!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (about a minute)"
        );
        exec(
            cmd("cargo")
                .args([
                    "install",
                    "--locked",
                    "--force",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    &format!("llvm-{llvm}"),
                ])
                .env("LLVM_PREFIX", &llvm_prefix),
        )?;
    }
    let env = Env { nightly };
    env.export();
    Ok(env)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `nightly` when the machine has it (its LLVM decides the rest), else the pinned date.
fn nightly_toolchain() -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("LB_EBPF_TOOLCHAIN")
        && !t.is_empty()
    {
        return Ok(t);
    }
    if output(cmd("rustc").args(["+nightly", "-vV"])).is_ok() {
        return Ok("nightly".into());
    }
    if output(cmd("rustc").args([&format!("+{PINNED_NIGHTLY}"), "-vV"])).is_err() {
        println!("xtask: installing {PINNED_NIGHTLY}");
        exec(cmd("rustup").args([
            "toolchain",
            "install",
            PINNED_NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    Ok(PINNED_NIGHTLY.into())
}

/// The LLVM major of a toolchain, from `rustc -vV` ("LLVM version: 22.1.4").
fn llvm_major(toolchain: &str) -> anyhow::Result<u32> {
    let out = output(cmd("rustc").args([&format!("+{toolchain}"), "-vV"]))?;
    parse_llvm_major(&out).with_context(|| format!("no LLVM version in rustc +{toolchain} -vV"))
}

fn parse_llvm_major(vv: &str) -> Option<u32> {
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))?
        .split('.')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// bpf-linker is present, of our version, and linked against LLVM `major`
/// (a linker on another LLVM fails on the nightly's bitcode).
fn bpf_linker_ok(major: u32) -> bool {
    let Some(path) = which("bpf-linker") else {
        return false;
    };
    let version = output(Command::new(&path).arg("--version")).unwrap_or_default();
    if !version.contains(BPF_LINKER_VERSION) {
        return false;
    }
    let libs = output(Command::new("ldd").arg(&path)).unwrap_or_default();
    libs.contains(&format!("libLLVM.so.{major}")) || libs.contains(&format!("libLLVM-{major}"))
}

pub fn which(bin: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Installs Debian packages, refreshing the index once first.
pub fn apt_install(packages: &[String]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    println!("xtask: apt-get install {}", packages.join(" "));
    exec(cmd("apt-get").args(["update", "-qq"]))?;
    exec(
        cmd("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

#[cfg(test)]
mod tests {
    use super::parse_llvm_major;

    #[test]
    fn reads_the_llvm_major_from_rustc_vv() {
        let vv = "rustc 1.97.0-nightly\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.95.0\n"), None);
    }
}
