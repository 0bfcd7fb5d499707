//! `cargo xtask image`: the agent as an OCI image with nothing else in it.
//!
//! A static (musl) `lb-agent`, the eBPF object embedded as in every build,
//! copied into an empty image (`buildah from scratch`): no base image, no
//! shell, no dynamic loader, nothing pulled from a registry. The image is
//! tagged `localhost/lb-agent:<version>` in the local containers-storage
//! (podman sees it) and written as an OCI archive under the target
//! directory, for `podman load` or `ctr -n k8s.io images import` on nodes.
use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{cmd, exec, output, setup::MUSL_TARGET};

/// Repository part of the tag; the DaemonSet in deploy/ names it.
pub const REPOSITORY: &str = "localhost/lb-agent";

pub fn build() -> anyhow::Result<()> {
    let started = Instant::now();
    let meta = Metadata::read()?;
    let tag = format!("{REPOSITORY}:{}", meta.version);
    exec(cmd("cargo").args([
        "build",
        "--release",
        "--locked",
        "--target",
        MUSL_TARGET,
        "--package",
        "lb-userspace",
        "--bin",
        "lb-agent",
        // Symbols are for heaptrack on the development build; the image
        // ships without them (the eBPF object inside is data, untouched).
        "--config",
        "profile.release.package.lb-userspace.strip=\"symbols\"",
    ]))?;
    let bin = meta
        .target_dir
        .join(MUSL_TARGET)
        .join("release")
        .join("lb-agent");
    if let Some(interp) = elf_interpreter(&bin)? {
        bail!(
            "{} is dynamically linked (interpreter {interp}); a scratch image has no loader",
            bin.display()
        );
    }
    let dir = meta.target_dir.join("image");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let archive = dir.join(format!("lb-agent-{}.oci.tar", meta.version));
    let previous = image_id(&tag);
    let ctr = output(cmd("buildah").args(["from", "scratch"]))?
        .trim()
        .to_owned();
    let built = assemble(&ctr, &bin, &tag, &meta);
    if built.is_err() {
        let _ = output(cmd("buildah").args(["rm", &ctr]));
    }
    built?;
    // The tag moved: drop the image it named before, so rebuilds do not pile up.
    if let Some(old) = previous
        && image_id(&tag).as_ref() != Some(&old)
    {
        let _ = output(cmd("buildah").args(["rmi", &old]));
    }
    let _ = std::fs::remove_file(&archive);
    exec(cmd("buildah").args([
        "push",
        "--quiet",
        &tag,
        &format!("oci-archive:{}:{tag}", archive.display()),
    ]))?;
    // The image must start without a shell: the entrypoint is the agent.
    let version = output(
        cmd("podman")
            .args(["run", "--rm", "--network=none"])
            .args(lb_tests::image::podman_run_flags())
            .args([&tag, "--version"]),
    );
    lb_tests::image::remove_cgroup_parent();
    let version = version?;
    if version.trim() != format!("lb-agent {}", meta.version) {
        bail!("{tag} --version printed {version:?}");
    }
    let size = std::fs::metadata(&archive)?.len();
    println!(
        "xtask image: {tag} ({}), {} ({:.1} MiB) in {:.0?}",
        version.trim(),
        archive.display(),
        size as f64 / (1024.0 * 1024.0),
        started.elapsed()
    );
    Ok(())
}

/// Fills the working container `ctr` and commits it as `tag`.
fn assemble(ctr: &str, bin: &Path, tag: &str, meta: &Metadata) -> anyhow::Result<()> {
    exec(
        cmd("buildah")
            .args(["copy", "--quiet", "--chmod", "0755", ctr])
            .arg(bin)
            .arg("/usr/local/bin/lb-agent"),
    )?;
    let mut config = cmd("buildah");
    config.args([
        "config",
        "--os",
        "linux",
        "--arch",
        "amd64",
        "--workingdir",
        "/",
        "--entrypoint",
        r#"["/usr/local/bin/lb-agent"]"#,
        "--cmd",
        "run",
        "--label",
        "org.opencontainers.image.title=lb-agent",
        "--label",
        &format!("org.opencontainers.image.version={}", meta.version),
        "--label",
        "org.opencontainers.image.description=eBPF socket-level load balancer for Kubernetes services",
    ]);
    if let Some(rev) = &meta.revision {
        config.args([
            "--label",
            &format!("org.opencontainers.image.revision={rev}"),
        ]);
    }
    exec(config.arg(ctr))?;
    // The commit's time, not the build's, so the image of one commit is the same image.
    let mut commit = cmd("buildah");
    commit.args(["commit", "--quiet", "--rm", "--format", "oci"]);
    if let Some(t) = &meta.commit_time {
        commit.args(["--timestamp", t]);
    }
    exec(commit.args([ctr, tag]))
}

/// The image id a tag names in the local storage, if any.
fn image_id(tag: &str) -> Option<String> {
    output(cmd("buildah").args([
        "images",
        "--noheading",
        "--no-trunc",
        "--format",
        "{{.ID}}",
        tag,
    ]))
    .ok()
    .map(|s| s.trim().to_owned())
    .filter(|s| !s.is_empty())
}

struct Metadata {
    /// lb-userspace's version: the image's tag.
    version: String,
    target_dir: PathBuf,
    /// `git rev-parse HEAD`, with `-dirty` when the tree differs.
    revision: Option<String>,
    /// HEAD's commit time (seconds since the epoch).
    commit_time: Option<String>,
}

impl Metadata {
    fn read() -> anyhow::Result<Self> {
        let doc: serde_json::Value = serde_json::from_str(&output(cmd("cargo").args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
        ]))?)?;
        let version = doc["packages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "lb-userspace")
            .and_then(|p| p["version"].as_str())
            .context("lb-userspace's version in cargo metadata")?
            .to_owned();
        let target_dir = PathBuf::from(
            doc["target_directory"]
                .as_str()
                .context("target_directory in cargo metadata")?,
        );
        let git = |args: &[&str]| {
            output(cmd("git").args(args))
                .ok()
                .map(|s| s.trim().to_owned())
        };
        let revision = git(&["rev-parse", "HEAD"]).map(|rev| {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty { format!("{rev}-dirty") } else { rev }
        });
        let commit_time = git(&["log", "-1", "--format=%ct"]).filter(|t| !t.is_empty());
        Ok(Self {
            version,
            target_dir,
            revision,
            commit_time,
        })
    }
}

/// The ELF's `PT_INTERP` (its dynamic loader), if it has one: a static
/// executable has none.
fn elf_interpreter(path: &Path) -> anyhow::Result<Option<String>> {
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    // ELF64, little-endian: the only kind the musl target makes here.
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        bail!("{} is not a little-endian ELF64 file", path.display());
    }
    let bad = || anyhow::anyhow!("{}: truncated ELF header", path.display());
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(bad)?)?;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(bad)?);
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph).ok_or_else(bad)? == PT_INTERP {
            let off = usize::try_from(u64_at(ph + 8).ok_or_else(bad)?)?;
            let len = usize::try_from(u64_at(ph + 32).ok_or_else(bad)?)?;
            let name = elf.get(off..off + len).ok_or_else(bad)?;
            return Ok(Some(
                String::from_utf8_lossy(name)
                    .trim_end_matches('\0')
                    .to_owned(),
            ));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::elf_interpreter;

    #[test]
    fn a_dynamic_executable_names_its_loader() {
        // The test binary itself is linked against glibc.
        let me = std::env::current_exe().expect("test binary");
        let interp = elf_interpreter(&me).expect("an ELF");
        assert!(
            interp.as_deref().is_some_and(|i| i.contains("ld-linux")),
            "{interp:?}"
        );
    }
}
