//! End-to-end: what an operator's mistakes and hostile input do to the real
//! agent. Each test runs the real lb-agent binary; the datapath ones attach
//! to a child cgroup and connect from a client namespace. Privileged: run by
//! `cargo xtask test` with `--test-threads=1`.
use std::{
    ffi::CString,
    fs,
    io::Write as _,
    net::Ipv4Addr,
    os::unix::{ffi::OsStrExt as _, fs::symlink},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lb_tests::{
    Bins, Lab, TestCgroup, back_end_manifest, endpoints, find_service, http_status, pod_ip,
    service_ip, unique_name,
};

const SYNC: Duration = Duration::from_secs(10);
const PODS: &[(&str, u8)] = &[("back-end-1", 11), ("back-end-2", 12), ("back-end-3", 13)];

fn bins() -> Bins {
    lb_tests::test_bins!()
}

/// A lab serving the textbook back-end; returns it and its ClusterIP.
fn lab_with_back_end(extra_args: &[&str]) -> (Lab, Ipv4Addr) {
    let mut lab = Lab::new(&bins(), PODS, 80).expect("lab");
    let pods: Vec<(&str, Ipv4Addr, bool)> = PODS
        .iter()
        .map(|(name, octet)| (*name, pod_ip(*octet), true))
        .collect();
    lab.write_manifest("back-end.yaml", &back_end_manifest(&pods))
        .expect("manifest");
    lab.agent
        .extra_args
        .extend(extra_args.iter().map(|a| a.to_string()));
    lab.agent.start().expect("agent start");
    let doc = lab
        .agent
        .wait_for("back-end programmed", SYNC, |d| {
            endpoints(d, "default", "back-end", 80).len() == 3
        })
        .expect("sync");
    let ip = service_ip(&doc, "default", "back-end").expect("cluster ip");
    (lab, ip)
}

/// A selectorless Service `name` with one hand-written EndpointSlice of `n`
/// endpoints (pod addresses of the lab).
fn service_with_slice(name: &str, n: usize) -> String {
    let endpoints: String = (0..n)
        .map(|i| {
            format!(
                "- addresses: [\"10.244.{}.{}\"]\n",
                2 + i / 250,
                1 + i % 250
            )
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  ports: [{{port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{port: 80}}]
endpoints:
{endpoints}"
    )
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// Peak resident memory of a process (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM")
}

/// A FIFO, a symlink to /dev/zero, a directory, a file over the size limit,
/// a file that keeps growing while it is read, an over-limit EndpointSlice
/// and a directory full of kinds the agent does not use: each is skipped
/// with a diagnostic (or quietly), the agent stays responsive and alive,
/// its memory stays bounded, and every other service keeps being served and
/// updated.
#[test]
fn hostile_manifest_directory_is_survived() {
    let (mut lab, ip) = lab_with_back_end(&["--max-manifest-size", "256Ki"]);
    let health = lab.agent.wait_health_addr(SYNC).unwrap();
    let dir = lab.manifests.clone();

    mkfifo(&dir.join("fifo.yaml"));
    symlink("/dev/zero", dir.join("zero.yaml")).unwrap();
    fs::create_dir(dir.join("dir.yaml")).unwrap();
    fs::write(dir.join("big.yaml"), vec![b'#'; 300 << 10]).unwrap();
    lab.write_manifest("slice.yaml", &service_with_slice("too-many", 1001))
        .unwrap();
    lab.write_manifest(
        "app.yaml",
        "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web}
",
    )
    .unwrap();
    // A file that keeps growing while the agent watches the directory
    // (bounded: at most 32 MiB, or until the test has its answer).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), dir.join("grow.yaml"));
        std::thread::spawn(move || {
            let mut f = fs::File::create(path).unwrap();
            let chunk = vec![b'#'; 64 << 10];
            for _ in 0..512 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                f.write_all(&chunk).unwrap();
            }
        })
    };

    // An edit made after all of that is still applied: the agent is not stuck.
    lab.write_manifest("later.yaml", &service_with_slice("later", 2))
        .unwrap();
    let doc = lab
        .agent
        .wait_for("the later service", SYNC, |d| {
            endpoints(d, "default", "later", 80).len() == 2
        })
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();

    // The over-limit slice was refused whole: its service has no endpoint.
    let too_many = find_service(&doc, "default", "too-many").expect("too-many listed");
    assert_eq!(
        endpoints(&doc, "default", "too-many", 80),
        Vec::<String>::new(),
        "{too_many}"
    );
    // Every other service keeps working.
    let report = lab.client(&format!("{ip}:80"), &["--count", "30"]).unwrap();
    assert_eq!(report.ok(), 30, "{report:?}");
    assert_eq!(http_status(health, "/healthz").unwrap(), 200);
    assert_eq!(http_status(health, "/readyz").unwrap(), 200);
    // Bounded memory: nothing was read whole (the growing file reached
    // megabytes, /dev/zero is endless).
    let pid = lab.agent.pid().unwrap();
    let peak = peak_rss_kib(pid);
    assert!(peak < 128 << 10, "peak RSS {peak} KiB");

    // The last read of grow.yaml follows its writer's close: wait for it.
    let deadline = std::time::Instant::now() + SYNC;
    while !lab
        .agent
        .log_text()
        .lines()
        .any(|l| l.contains("grow.yaml") && l.contains("limit of 262144 bytes"))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = lab.agent.log_text();
    for (file, what) in [
        ("fifo.yaml", "a FIFO is not a regular file"),
        ("zero.yaml", "a character device is not a regular file"),
        ("dir.yaml", "a directory is not a regular file"),
        ("big.yaml", "over the limit of 262144 bytes"),
        ("grow.yaml", "limit of 262144 bytes"),
    ] {
        assert!(
            log.lines().any(|l| l.contains(file) && l.contains(what)),
            "no diagnostic for {file} ({what}) in:\n{log}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("slice.yaml#2") && l.contains("1001 endpoints")),
        "{log}"
    );
    // Kinds the agent does not use are not warnings.
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("app.yaml") && (l.contains("WARN") || l.contains("ERROR")))
        .collect();
    assert!(noisy.is_empty(), "{noisy:#?}");
}

/// Another `lb-agent run` on the lab agent's pins and cgroup.
fn run_on_pins(lab: &Lab, manifests: &Path) -> std::process::Output {
    Command::new(&lab.agent.bin)
        .arg("run")
        .arg("--manifests")
        .arg(manifests)
        .arg("--bpffs")
        .arg(&lab.agent.bpffs)
        .arg("--cgroup")
        .arg(&lab.cgroup.path)
        .args(["--health-addr", "none"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// One agent per pin directory: a second `run` on it exits at once naming
/// the first one's pid, and leaves the first serving everything.
#[test]
fn second_agent_on_the_same_pins_is_refused() {
    let (mut lab, ip) = lab_with_back_end(&[]);
    let first = lab.agent.pid().unwrap();
    let empty = lab.work.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let out = run_on_pins(&lab, &empty);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("held by a running lb-agent (pid {first})")),
        "{stderr}"
    );
    // The first agent still serves, and still applies edits.
    assert!(lab.agent.is_running());
    let report = lab.client(&format!("{ip}:80"), &["--count", "30"]).unwrap();
    assert_eq!(report.ok(), 30, "{report:?}");
    lab.write_manifest("later.yaml", &service_with_slice("later", 2))
        .unwrap();
    lab.agent
        .wait_for("an edit after the refused start", SYNC, |d| {
            endpoints(d, "default", "later", 80).len() == 2
                && endpoints(d, "default", "back-end", 80).len() == 3
        })
        .unwrap();
    // `uninstall` is refused too while the first one runs.
    let err = lab.agent.uninstall().unwrap_err().to_string();
    assert!(err.contains(&format!("pid {first}")), "{err}");
    assert!(lab.agent.bpffs.join("link_connect4").exists());
}

/// `uninstall` removes exactly what `run` creates; `run` refuses a pin
/// directory holding anything else unless told to share it.
#[test]
fn foreign_pins_are_left_alone() {
    let (mut lab, ip) = lab_with_back_end(&[]);
    lab.agent.stop().unwrap();
    // Something of another tool's in the same directory (bpffs allows directories).
    let foreign = lab.agent.bpffs.join("other_tool");
    fs::create_dir(&foreign).unwrap();

    let out = lab.agent.uninstall().unwrap();
    assert!(out.contains("left"), "{out}");
    assert!(out.contains("other_tool"), "{out}");
    assert!(foreign.exists(), "a foreign entry was removed");
    assert_eq!(entries(&lab.agent.bpffs), vec!["other_tool".to_owned()]);
    // Detached: the ClusterIP is not translated any more.
    let report = lab.client(&format!("{ip}:80"), &["--count", "3"]).unwrap();
    assert_eq!(report.errors.get("ENETUNREACH"), Some(&3), "{report:?}");

    // `run` refuses the directory now, and says how to proceed.
    let out = run_on_pins(&lab, &lab.manifests);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("holds entries lb-agent did not create (other_tool)")
            && stderr.contains("--allow-foreign-pins"),
        "{stderr}"
    );
    assert_eq!(
        entries(&lab.agent.bpffs),
        vec!["other_tool".to_owned()],
        "run created pins"
    );

    // Told to share it, it runs and serves.
    lab.agent.extra_args.push("--allow-foreign-pins".into());
    lab.agent.start().unwrap();
    lab.agent
        .wait_for("back-end programmed", SYNC, |d| {
            endpoints(d, "default", "back-end", 80).len() == 3
        })
        .unwrap();
    let report = lab.client(&format!("{ip}:80"), &["--count", "10"]).unwrap();
    assert_eq!(report.ok(), 10, "{report:?}");
    lab.agent.stop().unwrap();
    lab.agent.uninstall().unwrap();
    fs::remove_dir(&foreign).unwrap();
}

/// A v1 cgroup directory of `hierarchy` (e.g. `cpu`) made for the test, if
/// this host mounts one.
struct V1Cgroup(std::path::PathBuf);

impl V1Cgroup {
    fn new(name: &str) -> Option<Self> {
        let mounts = fs::read_to_string("/proc/mounts").ok()?;
        let mount = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup")).then(|| f[1].to_owned())
        })?;
        let path = Path::new(&mount).join(name);
        fs::create_dir(&path).ok()?;
        Some(Self(path))
    }
}

impl Drop for V1Cgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

/// `run` checks its flags before it creates anything: a missing cgroup, a
/// cgroup v1 directory, a pin directory off bpffs and a zero map size each
/// fail with one clear line (no backtrace, whatever RUST_BACKTRACE says),
/// and leave no pin directory behind.
#[test]
fn run_validates_before_it_creates_anything() {
    let bins = bins();
    let name = unique_name();
    let cgroup = TestCgroup::new(&name).unwrap();
    let work = tempfile::tempdir().unwrap();
    let bpffs = Path::new(lb_tests::BPFFS).join(&name);
    let v1 = V1Cgroup::new(&name);
    let missing = cgroup.path.join("missing");
    let not_bpffs = work.path().join("pins");

    let mut cases: Vec<(Vec<String>, String)> = vec![
        (
            vec![
                "--cgroup".into(),
                missing.display().to_string(),
                "--bpffs".into(),
                bpffs.display().to_string(),
            ],
            format!("--cgroup {}: no such directory", missing.display()),
        ),
        (
            vec![
                "--cgroup".into(),
                cgroup.path.display().to_string(),
                "--bpffs".into(),
                not_bpffs.display().to_string(),
            ],
            format!(
                "--bpffs {}: its parent is not on a bpffs",
                not_bpffs.display()
            ),
        ),
        (
            vec![
                "--cgroup".into(),
                cgroup.path.display().to_string(),
                "--bpffs".into(),
                bpffs.display().to_string(),
                "--max-services".into(),
                "0".into(),
            ],
            "--max-services 0: must be between 1 and".into(),
        ),
    ];
    match &v1 {
        Some(v1) => cases.push((
            vec![
                "--cgroup".into(),
                v1.0.display().to_string(),
                "--bpffs".into(),
                bpffs.display().to_string(),
            ],
            format!(
                "{} is a cgroup v1 directory; pass a cgroup v2 directory",
                v1.0.display()
            ),
        )),
        None => eprintln!("no cgroup v1 hierarchy on this host: v1 case not run"),
    }
    for (args, want) in cases {
        let out = Command::new(&bins.agent)
            .arg("run")
            .arg("--manifests")
            .arg(work.path())
            .args(["--health-addr", "none"])
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line expected:\n{stderr}");
        assert!(lines[0].starts_with("error: "), "{stderr}");
        assert!(
            stderr.contains(&want),
            "{args:?}: want {want:?} in {stderr}"
        );
        assert!(!bpffs.exists(), "{args:?} left {} behind", bpffs.display());
        assert!(
            !not_bpffs.exists(),
            "{args:?} created {}",
            not_bpffs.display()
        );
    }
}
