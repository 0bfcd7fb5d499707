//! End-to-end: the container image `cargo xtask image` builds (its OCI
//! archive, loaded into podman) runs the agent as deploy/daemonset.yaml
//! does: every capability dropped but the manifest's, the host's cgroup2
//! hierarchy and bpffs mounted as the manifest mounts them, the host network.
//! The agent attaches to a child cgroup the lab creates and reads the lab's
//! manifests; a client in that cgroup and in the lab's client namespace
//! connects through the ClusterIP. Privileged: run by `cargo xtask test`
//! with `--test-threads=1`. Skipped, with a message, only where podman cannot
//! run containers at all.
use std::{net::Ipv4Addr, path::Path, process::Command, time::Duration};

use lb_tests::{
    Bins, Lab, back_end_manifest, endpoints, http_status,
    image::{self, CGROUP_MOUNT, Container, Image, MANIFESTS, PodSpec},
    run, service_ip,
};

const SYNC: Duration = Duration::from_secs(30);
const PODS: &[(&str, u8)] = &[("back-end-1", 11), ("back-end-2", 12), ("back-end-3", 13)];

fn bins() -> Bins {
    lb_tests::test_bins!()
}

/// The image loaded under this test's own tag, or `None` (and why, printed)
/// if podman cannot run here.
fn image(name: &str) -> Option<Image> {
    if let Some(why) = image::podman_unavailable() {
        eprintln!("SKIPPED: podman cannot run containers here ({why})");
        return None;
    }
    Some(Image::load(&image::archive(), name).expect("loading the image archive"))
}

/// Every pod of the textbook example answered, and nothing failed.
fn assert_balanced(report: &lb_tests::ClientReport, n: u64) {
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.ok(), n, "{report:?}");
    for (pod, _) in PODS {
        assert!(
            report.backends.get(*pod).copied().unwrap_or(0) > 0,
            "{pod}: {report:?}"
        );
    }
}

#[test]
fn image_agent_balances_from_a_container_and_its_pins_outlive_it() {
    let lab = Lab::new(&bins(), PODS, 80).expect("lab");
    let Some(image) = image(&lab.name) else {
        return;
    };
    let spec = PodSpec::from_daemonset().expect("deploy/daemonset.yaml");
    assert_eq!(spec.capabilities, ["BPF", "NET_ADMIN", "PERFMON"]);
    let pods: Vec<(&str, Ipv4Addr, bool)> = lab
        .topo
        .pods
        .iter()
        .map(|p| (p.name.as_str(), p.ip, true))
        .collect();
    lab.write_manifest("back-end.yaml", &back_end_manifest(&pods))
        .expect("manifest");
    // The lab's agent fixture is never started: its Drop only uninstalls
    // (with the host's binary) whatever a failed run of the image left.
    let bpffs = lab.agent.bpffs.clone();
    let cgroup = Path::new(CGROUP_MOUNT).join(&lab.name);
    let (bpffs_arg, cgroup_arg) = (
        format!("--bpffs={}", bpffs.display()),
        format!("--cgroup={}", cgroup.display()),
    );
    let manifests = format!(
        "--mount=type=bind,source={},target={MANIFESTS},readonly",
        lab.manifests.display()
    );
    let spawned = std::time::SystemTime::now();
    let mut agent = Container::start(
        &format!("{}-agent", lab.name),
        &image,
        &spec,
        // Plain log lines, for a failure's message.
        &[&manifests, "--env=NO_COLOR=1"],
        &[
            "run",
            &format!("--manifests={MANIFESTS}"),
            &bpffs_arg,
            &cgroup_arg,
            // Loopback of the host network (the container's): no port clash.
            "--health-addr=127.0.0.1:0",
        ],
        &lab.work.path().join("container.log"),
    )
    .expect("podman run");
    // Its bound address from its record in the pins (the host's status
    // reads them), then its initial sync from /metrics.
    let addr = lb_tests::wait_initial_sync(&lab.bins.agent, &bpffs, spawned, SYNC, || {
        agent.is_running()
    })
    .unwrap_or_else(|e| panic!("{e:#}; the container's log:\n{}", agent.log_text()));
    assert_eq!(http_status(addr, "/readyz").expect("readyz"), 200);

    // `list` from the image too, with the same capabilities.
    let doc: serde_json::Value = serde_json::from_str(
        &image::run_once(&image, &spec, &[], &["list", "-o", "json", &bpffs_arg])
            .expect("list in a container"),
    )
    .expect("list -o json");
    assert_eq!(doc["attached"], true, "{doc}");
    assert_eq!(
        endpoints(&doc, "default", "back-end", 80),
        ["10.244.1.11:80", "10.244.1.12:80", "10.244.1.13:80"],
        "{doc}"
    );
    let ip = service_ip(&doc, "default", "back-end").expect("cluster ip");
    let target = format!("{ip}:80");
    assert_balanced(&lab.client(&target, &["--count", "300"]).unwrap(), 300);

    // Stopped as kubelet stops it: the datapath stays, from the pins.
    let status = agent.stop().expect("podman stop");
    assert!(status.success(), "{status}; log:\n{}", agent.log_text());
    assert!(bpffs.join("LB_SERVICES").exists(), "pins left in place");
    assert_balanced(&lab.client(&target, &["--count", "300"]).unwrap(), 300);

    // A second run of the image removes it all.
    let out = image::run_once(&image, &spec, &[], &["uninstall", &bpffs_arg, &cgroup_arg])
        .expect("uninstall in a container");
    assert!(out.contains("detached and removed"), "{out}");
    assert!(!bpffs.exists(), "{out}");
    let attached = run(Command::new("bpftool")
        .arg("cgroup")
        .arg("show")
        .arg(&lab.cgroup.path))
    .expect("bpftool cgroup show");
    assert!(attached.trim().is_empty(), "still attached:\n{attached}");
    // Nothing rewrites the ClusterIP now, and the client namespace has no route to it.
    let after = lab.client(&target, &["--count", "5"]).unwrap();
    assert_eq!(after.errors.get("ENETUNREACH"), Some(&5), "{after:?}");
}

#[test]
fn image_holds_only_the_static_agent() {
    let name = lb_tests::unique_name();
    let Some(image) = image(&name) else {
        return;
    };
    let podman = || {
        let mut c = Command::new("podman");
        c.args(["run", "--rm", "--network=none"])
            .args(image::podman_run_flags());
        c
    };
    let version = run(podman().args([&image.tag, "--version"])).expect("lb-agent --version");
    assert_eq!(
        version.trim(),
        format!("lb-agent {}", env!("CARGO_PKG_VERSION"))
    );
    // No shell to fall back on: a scratch image holds the agent alone.
    let shell = podman()
        .args(["--entrypoint=/bin/sh", &image.tag, "-c", "true"])
        .output()
        .expect("podman run");
    assert!(!shell.status.success(), "a shell ran in the image");
    let labels = run(Command::new("podman").args([
        "image",
        "inspect",
        "--format",
        "{{index .Labels \"org.opencontainers.image.version\"}}",
        &image.tag,
    ]))
    .expect("podman image inspect");
    assert_eq!(labels.trim(), env!("CARGO_PKG_VERSION"));
}

/// The init container's job: `mount-bpffs` mounts one with CAP_SYS_ADMIN
/// alone, and fails without it. On a tmpfs over /sys/fs/bpf inside the
/// container, so the host's bpffs is never touched.
#[test]
fn image_mount_bpffs_needs_only_sys_admin() {
    let name = lb_tests::unique_name();
    let Some(image) = image(&name) else {
        return;
    };
    let podman = |caps: &[&str]| {
        Command::new("podman")
            .args(["run", "--rm", "--network=none", "--cap-drop=all"])
            .args(image::podman_run_flags())
            .args(caps)
            .args([
                "--mount=type=tmpfs,target=/sys/fs/bpf",
                &image.tag,
                "mount-bpffs",
            ])
            .output()
            .expect("podman run")
    };
    let out = podman(&["--cap-add=SYS_ADMIN"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "mounted bpffs at /sys/fs/bpf"
    );
    let denied = podman(&["--cap-add=BPF", "--cap-add=NET_ADMIN", "--cap-add=PERFMON"]);
    assert!(!denied.status.success(), "{denied:?}");
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("EPERM"),
        "{denied:?}"
    );
}
