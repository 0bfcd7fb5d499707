//! Notices edits to a manifest directory by polling a cheap fingerprint
//! (names, sizes, mtimes). Polling works on every filesystem, including
//! bind mounts and ConfigMap volumes where inotify events are unreliable.
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tracing::{debug, error, info};

/// How often the directory is checked; edits apply within this plus one apply.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Fingerprint(Vec<(String, u64, Option<SystemTime>)>);

/// `None` when the directory cannot be read; that is itself a change to report.
pub fn fingerprint(dir: &Path) -> Option<Fingerprint> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).ok()? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let meta = fs::metadata(entry.path()).ok();
        entries.push((
            name,
            meta.as_ref().map_or(0, fs::Metadata::len),
            meta.and_then(|m| m.modified().ok()),
        ));
    }
    entries.sort();
    Some(Fingerprint(entries))
}

/// Detects edits of the manifest directory and waits for them to settle, so
/// a file caught half-written is not applied (and its services not dropped).
pub struct DirWatcher {
    dir: PathBuf,
    last: Option<Fingerprint>,
    unreadable: bool,
}

/// How long a changed directory must stay unchanged before it is read.
const SETTLE: Duration = Duration::from_millis(100);

impl DirWatcher {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            last: None,
            unreadable: false,
        }
    }

    /// The directory changed since the last `true`, and has stayed
    /// unchanged for a settle period since.
    pub async fn changed(&mut self) -> bool {
        let Some(now) = fingerprint(&self.dir) else {
            // Keep the last good state: an unreadable directory (a remount, a
            // typo'd path) must not withdraw every service.
            if !self.unreadable {
                error!(dir = %self.dir.display(), "cannot read the manifest directory; keeping the current services");
                self.unreadable = true;
            }
            return false;
        };
        if self.unreadable {
            info!(dir = %self.dir.display(), "manifest directory readable again");
            self.unreadable = false;
        }
        if self.last.as_ref() == Some(&now) {
            return false;
        }
        tokio::time::sleep(SETTLE).await;
        if fingerprint(&self.dir).as_ref() != Some(&now) {
            debug!("manifest directory still changing");
            return false;
        }
        self.last = Some(now);
        true
    }
}
