//! Notices edits to a manifest directory by polling a cheap fingerprint
//! (names, sizes, mtimes). Polling works on every filesystem, including
//! bind mounts and ConfigMap volumes where inotify events are unreliable.
use std::{
    fs,
    path::Path,
    time::{Duration, SystemTime},
};

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
