//! The agent's container image under podman, started the way
//! deploy/daemonset.yaml starts it: the capabilities, security settings and
//! host mounts are read from that manifest, not restated here.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{PREFIX, run, sys};

/// Where the DaemonSet mounts the host's cgroup2 hierarchy in the container.
pub const CGROUP_MOUNT: &str = "/run/lb/cgroupv2";
/// Where the image suite mounts a lab's manifest directory.
pub const MANIFESTS: &str = "/etc/lb/manifests";

/// Flags every `podman run` of the suite and of `cargo xtask image` takes.
///
/// - runc: crun 1.8 (Debian 12's, podman's default) refuses to start any
///   container on a hybrid cgroup v1/v2 host whose v2 hierarchy lists a
///   controller ("cgroups in hybrid mode not supported"); runc does not.
/// - `--cgroup-parent`: podman (cgroupfs manager) otherwise leaves an
///   empty `libpod_parent` (and its `conmon` child) in every cgroup
///   hierarchy after its containers are gone; under a parent of the
///   suite's own they are removed by [`remove_cgroup_parent`].
/// - Resource limits no higher than this process has: podman's default
///   (1048576 open files and processes for root) needs CAP_SYS_RESOURCE,
///   which root lacks on some VMs (this project's among them), and
///   conmon caps the process limit at the kernel's pid_max.
pub fn podman_run_flags() -> Vec<String> {
    let hard = |resource| {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only the struct it is given.
        if unsafe { libc::getrlimit(resource, &mut r) } == 0 {
            r.rlim_max
        } else {
            1024
        }
    };
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let nofile = hard(libc::RLIMIT_NOFILE);
    let nproc = hard(libc::RLIMIT_NPROC).min(pid_max);
    vec![
        "--runtime=runc".into(),
        format!("--cgroup-parent=/{CGROUP_PARENT}"),
        format!("--ulimit=nofile={nofile}:{nofile}"),
        format!("--ulimit=nproc={nproc}:{nproc}"),
    ]
}

/// The cgroup, in every hierarchy, that podman puts the suite's
/// containers (and their conmon) under.
const CGROUP_PARENT: &str = "lbt-podman";

/// Removes [`CGROUP_PARENT`] from every cgroup hierarchy, children first.
/// Only empty cgroups go (rmdir): while a container of the suite still
/// runs, its cgroups stay, and the last one's removal takes them.
pub fn remove_cgroup_parent() {
    fn remove_tree(dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return;
    };
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        if let (Some(_), Some(dir), Some("cgroup" | "cgroup2")) = (f.next(), f.next(), f.next()) {
            remove_tree(&Path::new(dir).join(CGROUP_PARENT));
        }
    }
}

/// Why podman cannot run containers here, if it cannot (the only reason
/// the image suite skips).
pub fn podman_unavailable() -> Option<String> {
    match Command::new("podman")
        .args(["info", "--format", "{{.Host.OCIRuntime.Name}}"])
        .stdin(Stdio::null())
        .output()
    {
        Err(e) => Some(format!("podman: {e}")),
        Ok(out) if !out.status.success() => Some(format!(
            "podman info: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// The OCI archive `cargo xtask image` writes: `$LB_IMAGE_ARCHIVE`, else
/// `<target>/image/lb-agent-<version>.oci.tar` next to this test's profile
/// directory.
pub fn archive() -> PathBuf {
    if let Some(p) = std::env::var_os("LB_IMAGE_ARCHIVE") {
        return p.into();
    }
    let target = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.parent()?.to_owned()))
        .expect("test executable path");
    target
        .join("image")
        .join(format!("lb-agent-{}.oci.tar", env!("CARGO_PKG_VERSION")))
}

/// The archive loaded into podman's storage under a tag of this test's own
/// (`localhost/lbt…:test`), removed again on drop.
pub struct Image {
    pub tag: String,
}

impl Image {
    pub fn load(archive: &Path, name: &str) -> anyhow::Result<Self> {
        if !archive.exists() {
            bail!(
                "{} not found: build it with `cargo xtask image` (cargo xtask test does)",
                archive.display()
            );
        }
        let out = run(Command::new("podman")
            .args(["load", "--quiet", "--input"])
            .arg(archive))?;
        // "Loaded image: localhost/lb-agent:0.1.0" (podman 4 prints one line per name).
        let loaded = out
            .lines()
            .find_map(|l| l.split_once(": ").map(|(_, n)| n.trim().to_owned()))
            .with_context(|| format!("podman load printed {out:?}"))?;
        let tag = format!("localhost/{name}:test");
        run(Command::new("podman").args(["tag", &loaded, &tag]))?;
        Ok(Self { tag })
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Named twice: `podman untag IMAGE` alone removes every name of IMAGE.
        let _ = run(Command::new("podman").args(["untag", &self.tag, &self.tag]));
    }
}

/// What `podman run` needs to start a container as the DaemonSet's agent
/// container: its capabilities and security settings, and its host mounts
/// (the host's cgroup2 hierarchy wherever this host has it).
#[derive(Debug)]
pub struct PodSpec {
    /// `securityContext.capabilities.add` of the agent container.
    pub capabilities: Vec<String>,
    /// `podman run` flags for the security context, network and mounts.
    pub flags: Vec<String>,
    /// The seccomp profile file the flags name, removed on drop.
    _seccomp: Option<tempfile::TempPath>,
}

impl PodSpec {
    /// From `deploy/daemonset.yaml`.
    pub fn from_daemonset() -> anyhow::Result<Self> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
        let text = std::fs::read_to_string(&path)?;
        let ds: serde_json::Value = serde_yaml::from_str(&text)?;
        let pod = &ds["spec"]["template"]["spec"];
        let agent = pod["containers"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "lb-agent"))
            .context("an lb-agent container")?;
        let sc = &agent["securityContext"];
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        if strings(&sc["capabilities"]["drop"]) != ["ALL"] {
            bail!("the agent container must drop ALL capabilities");
        }
        let capabilities = strings(&sc["capabilities"]["add"]);
        let mut flags = vec!["--cap-drop=all".to_owned()];
        flags.extend(capabilities.iter().map(|c| format!("--cap-add={c}")));
        if sc["privileged"] == true {
            flags.push("--privileged".into());
        }
        if let Some(uid) = sc["runAsUser"].as_u64() {
            flags.push(format!("--user={uid}"));
        }
        if sc["readOnlyRootFilesystem"] == true {
            flags.push("--read-only".into());
        }
        if sc["allowPrivilegeEscalation"] == false {
            flags.push("--security-opt=no-new-privileges".into());
        }
        let mut seccomp = None;
        match sc["seccompProfile"]["type"].as_str() {
            Some("RuntimeDefault") => {
                let path = runtime_default_seccomp()?;
                flags.push(format!("--security-opt=seccomp={}", path.display()));
                seccomp = Some(path);
            }
            Some("Unconfined") => flags.push("--security-opt=seccomp=unconfined".into()),
            None => {}
            Some(other) => bail!("seccompProfile {other} is not supported by the image suite"),
        }
        if pod["hostNetwork"] == true {
            flags.push("--network=host".into());
        }
        for m in agent["volumeMounts"].as_array().into_iter().flatten() {
            let name = &m["name"];
            let volume = pod["volumes"]
                .as_array()
                .and_then(|v| v.iter().find(|v| &v["name"] == name))
                .with_context(|| format!("volume {name}"))?;
            let host = volume["hostPath"]["path"]
                .as_str()
                .with_context(|| format!("volume {name} is not a hostPath"))?;
            let target = m["mountPath"].as_str().context("mountPath")?;
            // The manifest names /sys/fs/cgroup and says to use the v2
            // hierarchy's mount point on hybrid hosts: this host's, then.
            let source = if host == "/sys/fs/cgroup" {
                sys::cgroup2_root()?
            } else {
                PathBuf::from(host)
            };
            let propagation = match m["mountPropagation"].as_str() {
                Some("HostToContainer") => ",bind-propagation=rslave",
                Some("Bidirectional") => ",bind-propagation=rshared",
                _ => "",
            };
            let ro = if m["readOnly"] == true {
                ",readonly"
            } else {
                ""
            };
            flags.push(format!(
                "--mount=type=bind,source={},target={target}{ro}{propagation}",
                source.display()
            ));
        }
        Ok(Self {
            capabilities,
            flags,
            _seccomp: seccomp,
        })
    }
}

/// podman's default seccomp profile as containerd's RuntimeDefault treats
/// bpf(2) and perf_event_open(2): allowed to a holder of CAP_BPF or
/// CAP_PERFMON respectively, not only of CAP_SYS_ADMIN. Debian 12's podman
/// (containers-common 0.50) allows them with CAP_SYS_ADMIN alone, under
/// which no BPF agent can run without SYS_ADMIN; a Kubernetes node's
/// containerd applies the former to the DaemonSet's `RuntimeDefault`.
fn runtime_default_seccomp() -> anyhow::Result<tempfile::TempPath> {
    const PODMAN_DEFAULT: &str = "/usr/share/containers/seccomp.json";
    let text = std::fs::read_to_string(PODMAN_DEFAULT)
        .with_context(|| format!("reading {PODMAN_DEFAULT}"))?;
    let mut profile: serde_json::Value = serde_json::from_str(&text)?;
    let rules = profile["syscalls"]
        .as_array_mut()
        .context("syscalls in the seccomp profile")?;
    const CALLS: [(&str, &str); 2] = [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")];
    for rule in rules.iter_mut() {
        if let Some(names) = rule["names"].as_array_mut() {
            names.retain(|n| !CALLS.iter().any(|(call, _)| n == call));
        }
    }
    rules.retain(|r| r["names"].as_array().is_some_and(|n| !n.is_empty()));
    for (call, cap) in CALLS {
        for allowed_with in ["CAP_SYS_ADMIN", cap] {
            rules.push(serde_json::json!({
                "names": [call],
                "action": "SCMP_ACT_ALLOW",
                "includes": { "caps": [allowed_with] },
            }));
        }
        rules.push(serde_json::json!({
            "names": [call],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1,
            "excludes": { "caps": ["CAP_SYS_ADMIN", cap] },
        }));
    }
    let file = tempfile::Builder::new()
        .prefix(&format!("{PREFIX}-seccomp-"))
        .suffix(".json")
        .tempfile()?;
    serde_json::to_writer(&file, &profile)?;
    Ok(file.into_temp_path())
}

/// `podman run --rm` of `image` with `spec`'s flags and `args` for the
/// agent; waits for it and returns its stdout.
pub fn run_once(
    image: &Image,
    spec: &PodSpec,
    extra: &[&str],
    args: &[&str],
) -> anyhow::Result<String> {
    let out = run(Command::new("podman")
        .args(["run", "--rm"])
        .args(podman_run_flags())
        .args(&spec.flags)
        .args(extra)
        .arg(&image.tag)
        .args(args));
    remove_cgroup_parent();
    out
}

/// A long-running agent container (`podman run --rm --name …`, attached,
/// its output in `log`), force-removed on drop.
pub struct Container {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Container {
    pub fn start(
        name: &str,
        image: &Image,
        spec: &PodSpec,
        extra: &[&str],
        args: &[&str],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let out = std::fs::File::create(log)?;
        let child = Command::new("podman")
            .args(["run", "--rm", "--name", name])
            .args(podman_run_flags())
            .args(&spec.flags)
            .args(extra)
            .arg(&image.tag)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting podman run")?;
        Ok(Self {
            name: name.to_owned(),
            log: log.to_owned(),
            child: Some(child),
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether `podman run` still runs (the container has not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `podman stop` (SIGTERM, as kubelet stops a pod) and waits for the
    /// container's exit status.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        run(Command::new("podman").args(["stop", "--time", "10", &self.name]))?;
        let mut child = self.child.take().context("not running")?;
        Ok(child.wait()?)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = run(Command::new("podman").args(["rm", "--force", "--time", "0", &self.name]));
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_cgroup_parent();
    }
}

/// Removes containers and test tags a killed run left (`lbt…` names).
pub fn cleanup_leftovers() {
    if podman_unavailable().is_some() {
        return;
    }
    if let Ok(out) = run(Command::new("podman").args(["ps", "--all", "--format", "{{.Names}}"])) {
        for name in out.lines().filter(|n| n.starts_with(PREFIX)) {
            let _ = run(Command::new("podman").args(["rm", "--force", "--time", "0", name]));
        }
    }
    let prefix = format!("localhost/{PREFIX}");
    if let Ok(out) =
        run(Command::new("podman").args(["images", "--format", "{{.Repository}}:{{.Tag}}"]))
    {
        for tag in out.lines().filter(|t| t.starts_with(&prefix)) {
            let _ = run(Command::new("podman").args(["untag", tag, tag]));
        }
    }
    remove_cgroup_parent();
}
