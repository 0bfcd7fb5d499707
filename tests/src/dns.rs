//! A real DNS server (Debian's dnsmasq) as backend pods, and `dig` run from
//! the client pod inside the attached cgroup, shared by the UDP suite and
//! the demo.
use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{Lab, Pod, run};

/// dnsmasq processes, one per pod, killed on drop.
pub struct Dnsmasq(Vec<(String, Child)>);

impl Dnsmasq {
    /// Serves `records` (name → address) on port 53 of every pod in `pods`,
    /// plus `whoami.<zone>` TXT naming the pod, and waits until each answers.
    pub fn start(lab: &Lab, pods: &[Pod], records: &[(&str, Ipv4Addr)]) -> anyhow::Result<Self> {
        let mut all = Self(Vec::new());
        for pod in pods {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &pod.netns, "dnsmasq"]).args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--port=53",
                "--log-facility=-",
            ]);
            for (name, ip) in records {
                cmd.arg(format!("--address=/{name}/{ip}"));
                cmd.arg(format!("--txt-record=whoami.{name},{}", pod.name));
            }
            let child = cmd
                .arg(format!("--listen-address={}", pod.ip))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context(
                    "starting dnsmasq (apt-get install dnsmasq-base; cargo xtask setup does)",
                )?;
            all.0.push((pod.name.clone(), child));
        }
        let Some((probe, want)) = records.first() else {
            return Ok(all);
        };
        // Pod IPs are not services: these queries pass the programs untouched.
        for pod in pods {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let out = dig(lab, &[&format!("@{}", pod.ip), probe]);
                if out.as_deref().is_ok_and(|o| o.trim() == want.to_string()) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("dnsmasq in {} not answering: {out:?}", pod.name);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(all)
    }

    pub fn kill(&mut self, name: &str) {
        for (n, child) in &mut self.0 {
            if n == name {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `cmd` in the client namespace and the attached cgroup, optionally
/// with its own /etc/resolv.conf.
pub fn in_client(lab: &Lab, resolv: Option<&Path>, cmd: &[&str]) -> anyhow::Result<String> {
    let mut c = lab.client_command(true);
    if let Some(r) = resolv {
        c.arg("--resolv").arg(r);
    }
    run(c.arg("--exec").args(cmd))
}

/// `dig +short` from the client pod: one try, two seconds.
pub fn dig(lab: &Lab, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = vec!["dig", "+short", "+tries=1", "+time=2"];
    cmd.extend_from_slice(args);
    in_client(lab, None, &cmd)
}
