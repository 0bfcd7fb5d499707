//! Builds the eBPF programs with aya-build (nightly + bpf-linker) and leaves
//! the objects in OUT_DIR for `include_bytes_aligned!`.
//!
//! `LB_EBPF_STUB=1` writes empty stand-ins instead, for lint and pure unit-test
//! runs on machines without the BPF toolchain; the agent refuses to load them.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

const STUB_ENV: &str = "LB_EBPF_STUB";
const TOOLCHAIN_ENV: &str = "LB_EBPF_TOOLCHAIN";
/// Objects (bins of lb-ebpf) the agent embeds.
const PROGRAMS: &[&str] = &["lb-sock"];

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={STUB_ENV}");
    println!("cargo:rerun-if-env-changed={TOOLCHAIN_ENV}");
    if env::var(STUB_ENV).is_ok_and(|v| v == "1" || v == "true") {
        let out = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
        for prog in PROGRAMS {
            fs::write(out.join(prog), b"").with_context(|| format!("writing stub {prog}"))?;
        }
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .context("lb-ebpf manifest has no parent")?
        .as_str()
        .to_owned();
    let package = Package {
        name: ebpf.name.as_str(),
        root_dir: &root_dir,
        ..Default::default()
    };
    let toolchain = env::var(TOOLCHAIN_ENV).ok();
    let toolchain = match toolchain.as_deref() {
        Some(t) if !t.is_empty() => Toolchain::Custom(t),
        _ => Toolchain::default(),
    };
    aya_build::build_ebpf([package], toolchain)
}
