//! Notices edits to a manifest directory: inotify (the `notify` crate) wakes
//! it at once; a poll of a cheap fingerprint (names, sizes, mtimes) stays as
//! the fallback, for filesystems and mounts where events are unreliable
//! (bind mounts, a ConfigMap volume swapping its `..data` symlink).
use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use notify::Watcher as _;
use tokio::{sync::Notify, time::Instant};
use tracing::{debug, error, info, warn};

/// How often the directory is checked without inotify; edits apply within
/// this plus one apply.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The fallback poll while inotify works.
pub const POLL_WITH_EVENTS: Duration = Duration::from_secs(1);
/// How long a changed directory must stay unchanged before it is read, so
/// a file caught half-written is not applied. Not waited for when inotify
/// says every write was closed (an atomic rename, a ConfigMap swap, an
/// editor that has saved): then the edit is read at once.
pub const SETTLE: Duration = Duration::from_millis(100);
/// Sustained edits never postpone a read by more than this.
pub const MAX_SETTLE: Duration = Duration::from_millis(250);

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

/// Detects edits of the manifest directory and lets them settle, with a cap.
pub struct DirWatcher {
    dir: PathBuf,
    last: Option<Fingerprint>,
    unreadable: bool,
    /// When a change was first noticed that has not been read yet (tokio's
    /// clock, so tests can run it paused).
    pending_since: Option<Instant>,
    /// inotify, while it works; dropping it stops the watch.
    events: Option<Events>,
}

/// The inotify side of a [`DirWatcher`].
struct Events {
    _watcher: notify::RecommendedWatcher,
    wake: Arc<Notify>,
    /// A file was written and not closed yet: it may be half-written.
    writing: Arc<AtomicBool>,
}

impl DirWatcher {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            last: None,
            unreadable: false,
            pending_since: None,
            events: watch_events(dir),
        }
    }

    /// Without inotify: the poll alone.
    #[cfg(test)]
    fn polling(dir: &Path) -> Self {
        Self {
            events: None,
            ..Self::new(dir)
        }
    }

    /// Waits for an inotify event or the next poll.
    pub async fn wait(&mut self) {
        match &self.events {
            Some(events) => {
                tokio::select! {
                    () = events.wake.notified() => {
                        // Two writes within one mtime tick can leave the
                        // fingerprint as it was: the event alone counts.
                        self.last = None;
                    }
                    () = tokio::time::sleep(POLL_WITH_EVENTS) => {}
                }
            }
            None => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }

    /// The directory changed since the last `true`, and then stayed
    /// unchanged for [`SETTLE`], or has kept changing for [`MAX_SETTLE`].
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
            self.pending_since = None;
            return false;
        }
        let closed = self
            .events
            .as_ref()
            .is_some_and(|e| !e.writing.load(Ordering::SeqCst));
        if closed {
            // Every write was closed: nothing is half-written.
            self.last = Some(now);
            self.pending_since = None;
            return true;
        }
        let since = *self.pending_since.get_or_insert_with(Instant::now);
        tokio::time::sleep(SETTLE).await;
        let again = fingerprint(&self.dir);
        if again.as_ref() != Some(&now) && since.elapsed() < MAX_SETTLE {
            debug!("manifest directory still changing");
            return false;
        }
        self.last = again.or(Some(now));
        self.pending_since = None;
        true
    }
}

/// An inotify watch of `dir` whose events wake [`DirWatcher::wait`];
/// `None` (polling only) where it cannot be set up.
fn watch_events(dir: &Path) -> Option<Events> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    let wake = Arc::new(Notify::new());
    let writing = Arc::new(AtomicBool::new(false));
    let (notify, write_flag) = (wake.clone(), writing.clone());
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        match event.kind {
            EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                write_flag.store(true, Ordering::SeqCst);
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                write_flag.store(false, Ordering::SeqCst);
            }
            // Opens and reads (the agent's own among them) change nothing.
            EventKind::Access(_) => return,
            _ => {}
        }
        notify.notify_one();
    })
    .and_then(|mut w| {
        w.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    match watcher {
        Ok(w) => Some(Events {
            _watcher: w,
            wake,
            writing,
        }),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "no inotify watch of the manifest directory; polling");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    /// Edits every 60 ms never let the directory settle for [`SETTLE`]; the
    /// cap still has it read, again and again (on tokio's paused clock).
    #[tokio::test(start_paused = true)]
    async fn sustained_edits_are_read_within_the_cap() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("a.yaml");
        fs::write(&path, "#").unwrap();
        let mut w = DirWatcher::polling(dir.path());
        assert!(w.changed().await, "the first look reads");
        let writer = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(60));
            loop {
                tick.tick().await;
                let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
                f.write_all(b"#").unwrap();
            }
        });
        let run = Duration::from_secs(3);
        let start = Instant::now();
        let mut reads = 0u32;
        while start.elapsed() < run {
            w.wait().await;
            if w.changed().await {
                reads += 1;
            }
        }
        writer.abort();
        // Each read waits at most a poll, the cap and one settle.
        let period = POLL_INTERVAL + MAX_SETTLE + SETTLE;
        let expected = (run.as_millis() / period.as_millis()) as u32 - 1;
        assert!(
            reads >= expected,
            "{reads} reads in {run:?}, expected at least {expected}"
        );
    }
}
