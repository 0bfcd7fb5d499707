//! Index check-outs → reconciler → maps, and *when*: coalescing of bursts,
//! retries of failed frontends on a timer with backoff, and a periodic
//! resync (kube-proxy's `syncPeriod`) that repairs whatever drifted.
//!
//! Sources put what they see into an [`Input`] (the model's [`Index`] plus
//! a wake-up); one [`Driver`] checks out what changed and hands it to the
//! [`Syncer`]. Nothing here knows where objects come from.
use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{sync::Notify, time::Instant as TimerInstant};
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{Datapath, encode_backend, frontend_key, terminate::Spared},
    health::Health,
    metrics::Metrics,
    model::{DesiredService, Diagnostic, Frontend, Index, Severity},
    reconciler::{ApplyReport, Installed, Prune, Reconciler},
};

#[cfg(test)]
mod tests;

/// Default `--resync-period`.
pub const DEFAULT_RESYNC_PERIOD: Duration = Duration::from_secs(5 * 60);
/// A failed frontend is tried again after this, doubling up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// What one sync did, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub frontends: usize,
    pub writes: usize,
    pub deletes: usize,
    pub errors: usize,
    /// Frontends whose spared endpoints changed (`--terminate-sockets
    /// all`): no map write, but a termination pass is due.
    pub spared: usize,
}

impl std::ops::AddAssign for SyncStats {
    fn add_assign(&mut self, other: Self) {
        self.frontends = other.frontends;
        self.writes += other.writes;
        self.deletes += other.deletes;
        self.errors += other.errors;
        self.spared += other.spared;
    }
}

/// When a failed frontend is tried again (on tokio's clock, which tests
/// can pause and advance).
#[derive(Clone, Copy, Debug)]
struct Retry {
    due: TimerInstant,
    delay: Duration,
}

/// The reconciler, with diagnostics reported once each (a file that stays
/// broken is not re-logged on every edit elsewhere) and the frontends it
/// could not write, each with its retry timer.
pub struct Syncer<D> {
    reconciler: Reconciler<D>,
    reported: BTreeSet<Diagnostic>,
    failed: BTreeMap<Frontend, Retry>,
    /// `--terminate-sockets all`: each frontend's spared endpoints, kept
    /// for the terminator.
    spared: Option<Arc<Spared>>,
    /// Where map-full refusals are counted per map.
    metrics: Option<Arc<Metrics>>,
}

impl<D: Datapath> Syncer<D> {
    pub fn new(reconciler: Reconciler<D>) -> Self {
        Self {
            reconciler,
            reported: BTreeSet::new(),
            failed: BTreeMap::new(),
            spared: None,
            metrics: None,
        }
    }

    /// Keeps `spared` up to date with every change applied.
    pub fn with_spared(mut self, spared: Option<Arc<Spared>>) -> Self {
        self.spared = spared;
        self
    }

    /// Records each changed frontend's spared endpoints (the model's, not
    /// held back like map writes: they are never written); how many
    /// frontends' lists changed.
    fn note_spared(
        &self,
        changes: &BTreeMap<Frontend, Option<DesiredService>>,
        prune: Prune,
    ) -> usize {
        let Some(spared) = &self.spared else {
            return 0;
        };
        let mut changed = 0;
        for (fe, want) in changes {
            let set = want
                .iter()
                .flat_map(|w| &w.spared)
                .map(|a| {
                    let b = encode_backend(*a, fe.proto);
                    (b.addr, b.port)
                })
                .collect();
            changed += usize::from(spared.set(frontend_key(fe), set));
        }
        if prune == Prune::Yes {
            spared.set_complete();
        }
        changed
    }

    pub fn reconciler(&self) -> &Reconciler<D> {
        &self.reconciler
    }

    /// Frontends the maps could not be brought in line for (a full map, a
    /// refused write); each is retried on its own timer.
    pub fn failed(&self) -> BTreeSet<Frontend> {
        self.failed.keys().copied().collect()
    }

    /// The problems currently reported (each logged once).
    pub fn diagnostics(&self) -> &BTreeSet<Diagnostic> {
        &self.reported
    }

    /// When the next failed frontend is due.
    pub fn next_retry(&self) -> Option<TimerInstant> {
        self.failed.values().map(|r| r.due).min()
    }

    fn due(&self, now: TimerInstant) -> Vec<Frontend> {
        self.failed
            .iter()
            .filter(|(_, r)| r.due <= now)
            .map(|(fe, _)| *fe)
            .collect()
    }

    /// Logs the problems that are new and those that went away.
    pub fn report(&mut self, now: BTreeSet<Diagnostic>) {
        for d in now.difference(&self.reported) {
            match d.severity {
                Severity::Warning => warn!("{d}"),
                Severity::Info => info!("{d}"),
            }
        }
        for d in self.reported.difference(&now) {
            info!("resolved: {d}");
        }
        self.reported = now;
    }

    /// Writes only the frontends named (`None`: the frontend is gone), so a
    /// sync costs what changed.
    pub fn apply_changes(
        &mut self,
        mut changes: BTreeMap<Frontend, Option<DesiredService>>,
        prune: Prune,
    ) -> SyncStats {
        // Held back below or not, each was looked at: one held back until
        // the sources are complete is brought in line by the first full
        // sync, not by a retry timer.
        let attempted = changes.keys().copied().collect();
        let spared = self.note_spared(&changes, prune);
        if prune == Prune::No {
            // Nothing removed until the sources are complete either.
            let installed = self.reconciler.installed();
            changes.retain(|fe, want| {
                want.as_ref()
                    .is_some_and(|w| may_install_early(installed, fe, w))
            });
        }
        let report = self.reconciler.apply_changes(&changes, prune);
        SyncStats {
            spared,
            ..self.finish(&report, attempted)
        }
    }

    fn finish(&mut self, report: &ApplyReport, attempted: BTreeSet<Frontend>) -> SyncStats {
        for e in &report.errors {
            error!("{e}");
        }
        for e in &report.other_errors {
            error!("{e}");
        }
        let mut before = BTreeMap::new();
        for fe in attempted {
            if let Some(r) = self.failed.remove(&fe) {
                before.insert(fe, r);
            }
        }
        let now = TimerInstant::now();
        let failed: BTreeSet<Frontend> = report.errors.iter().map(|e| e.frontend).collect();
        for fe in failed {
            // Failing again: wait twice as long as last time.
            let delay = before
                .get(&fe)
                .or(self.failed.get(&fe))
                .map_or(RETRY_MIN, |r| (r.delay * 2).min(RETRY_MAX));
            self.failed.insert(
                fe,
                Retry {
                    due: now + delay,
                    delay,
                },
            );
        }
        if let Some(m) = &self.metrics {
            for e in &report.errors {
                if let crate::datapath::DatapathError::MapFull { map, .. } = e.source {
                    m.map_full(map);
                }
            }
        }
        let full = report.map_full();
        if full > 0
            && let Err(e) = self.reconciler.datapath_mut().count_map_full(full as u64)
        {
            warn!(error = %e, "could not count map-full failures");
        }
        SyncStats {
            frontends: self.reconciler.installed().len(),
            writes: report.writes,
            deletes: report.deletes,
            errors: report.errors.len() + report.other_errors.len(),
            spared: 0,
        }
    }
}

/// While sources are still syncing, an empty backend list may only mean the
/// slices have not arrived yet: a new frontend that would refuse connects
/// waits; installed ones keep their backends anyway (no shrink before then).
fn may_install_early(
    installed: &BTreeMap<Frontend, Installed>,
    fe: &Frontend,
    want: &DesiredService,
) -> bool {
    !want.backends.is_empty() || installed.contains_key(fe)
}

/// Compares the maps themselves with what the reconciler installed and
/// puts back what drifted (an entry deleted or changed behind the agent's
/// back); the number of entries repaired.
fn repair_maps<D: Datapath>(reconciler: &mut Reconciler<D>) -> usize {
    let report = reconciler.repair();
    for e in &report.errors {
        error!("{e}");
    }
    if report.repaired > 0 {
        warn!(%report, "the maps had drifted from what was installed");
    }
    report.repaired
}

/// Frontends per reconciler call in a full pass.
const FULL_PASS_PART: usize = 1024;

/// At most this many pending arrival times are kept between two syncs
/// (only for the latency figures; the dirty flag itself is never lost).
const MAX_PENDING_SAMPLES: usize = 100_000;

/// Where sources put what they see: the model's index, a wake-up for the
/// [`Driver`], and whether the sources are complete (before that nothing
/// is removed or shrunk).
#[derive(Debug, Default)]
pub struct Input {
    shared: Mutex<Shared>,
    notify: Notify,
    /// Every change; lets the debounce see a burst go on.
    events: AtomicU64,
    complete: AtomicBool,
}

#[derive(Debug, Default)]
struct Shared {
    index: Index,
    /// Problems the source found before the index (parse errors).
    source_diags: Vec<Diagnostic>,
    dirty: bool,
    /// Arrival of each measured change since the last sync.
    arrivals: Vec<Instant>,
    /// Arrival of the first change since the last sync.
    first_arrival: Option<Instant>,
}

impl Input {
    pub fn new(index: Index) -> Arc<Self> {
        Arc::new(Self {
            shared: Mutex::new(Shared {
                index,
                ..Shared::default()
            }),
            ..Self::default()
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the index; if it reports a change, the driver wakes.
    /// `arrived`: when the change reached the agent; `measured`: it counts
    /// in the event → map-write latency figures.
    pub fn update(
        &self,
        arrived: Instant,
        measured: bool,
        f: impl FnOnce(&mut Index) -> bool,
    ) -> bool {
        let changed = {
            let mut sh = self.lock();
            let changed = f(&mut sh.index);
            if changed {
                sh.dirty = true;
                sh.first_arrival.get_or_insert(arrived);
                if measured && sh.arrivals.len() < MAX_PENDING_SAMPLES {
                    sh.arrivals.push(arrived);
                }
            }
            changed
        };
        if changed {
            self.wake();
        }
        changed
    }

    /// Problems the source found itself (a file that does not parse); they
    /// are reported with the index's.
    pub fn set_source_diagnostics(&self, diags: Vec<Diagnostic>) {
        let changed = {
            let mut sh = self.lock();
            let changed = sh.source_diags != diags;
            sh.source_diags = diags;
            sh.dirty |= changed;
            changed
        };
        if changed {
            self.wake();
        }
    }

    /// Reads the index (tests, logs).
    pub fn with_index<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        f(&self.lock().index)
    }

    /// The sources have delivered everything once: the index is the whole
    /// truth, and what it lacks may be removed from the maps.
    pub fn set_complete(&self) {
        if !self.complete.swap(true, Ordering::SeqCst) {
            self.lock().dirty = true;
            self.wake();
        }
    }

    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::SeqCst)
    }

    pub fn is_dirty(&self) -> bool {
        self.lock().dirty
    }

    fn wake(&self) {
        self.events.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_one();
    }
}

/// How events are coalesced into syncs. An event that finds the driver
/// idle (no sync for `max_delay`) is synced at once: a lone endpoint change
/// pays no debounce. Events that arrive while syncs are frequent are
/// batched: a sync starts once no event arrived for `quiet`, or `max_delay`
/// after the first event of the burst, whichever is first.
#[derive(Clone, Copy, Debug)]
pub struct Coalesce {
    pub quiet: Duration,
    pub max_delay: Duration,
}

impl Default for Coalesce {
    fn default() -> Self {
        Self {
            quiet: Duration::from_millis(2),
            max_delay: Duration::from_millis(10),
        }
    }
}

/// Why a sync ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// A source changed the index.
    Change,
    /// A failed frontend's retry is due.
    Retry,
    /// The periodic resync is due.
    Resync,
}

/// What one sync did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub wake: Wake,
    pub prune: Prune,
    pub stats: SyncStats,
    /// This was the first sync with complete sources: the agent is ready.
    pub first_complete: bool,
    /// Entries a resync found wrong and rewrote (0 otherwise).
    pub repaired: usize,
    /// From the first change it synced to the end of the map writes.
    pub since_change: Option<Duration>,
}

/// Event→map-write latency of measured changes (EndpointSlice events), since start.
#[derive(Debug, Default)]
pub struct Latency {
    samples_us: Vec<u32>,
    last_logged: Option<Instant>,
    logged_len: usize,
}

/// Keeps at most this many samples (a few MB at most); later ones are dropped.
const MAX_SAMPLES: usize = 1_000_000;

impl Latency {
    fn add(&mut self, arrivals: &[Instant], written: Instant) {
        for t in arrivals {
            if self.samples_us.len() >= MAX_SAMPLES {
                break;
            }
            let us = written.saturating_duration_since(*t).as_micros();
            self.samples_us.push(u32::try_from(us).unwrap_or(u32::MAX));
        }
    }

    /// (count, median, p99, max) in microseconds.
    pub fn summary(&self) -> Option<(usize, u32, u32, u32)> {
        if self.samples_us.is_empty() {
            return None;
        }
        let mut s = self.samples_us.clone();
        s.sort_unstable();
        let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
        Some((s.len(), at(0.5), at(0.99), s[s.len() - 1]))
    }

    /// Logs the figures at most once a second, and only when new ones came in.
    fn maybe_log(&mut self, syncs: u64, force: bool) {
        let due = self
            .last_logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if self.samples_us.len() == self.logged_len || !(due || force) {
            return;
        }
        if let Some((n, p50, p99, max)) = self.summary() {
            info!(
                events = n,
                syncs,
                p50_us = p50,
                p99_us = p99,
                max_us = max,
                "endpointslice event to map write latency"
            );
        }
        self.logged_len = self.samples_us.len();
        self.last_logged = Some(Instant::now());
    }
}

/// The sync loop: waits for a change or a timer, coalesces, checks the
/// index out and syncs.
pub struct Driver<D> {
    syncer: Syncer<D>,
    input: Arc<Input>,
    coalesce: Coalesce,
    resync_period: Option<Duration>,
    next_resync: Option<TimerInstant>,
    latency: Latency,
    syncs: u64,
    repaired: u64,
    /// When the last sync finished: decides between syncing at once and debouncing.
    last_sync: Option<Instant>,
    complete: bool,
    /// Sync durations and change → map-write latencies go here, if set.
    metrics: Option<Arc<Metrics>>,
}

impl<D: Datapath> Driver<D> {
    /// No periodic resync until [`Driver::set_resync_period`].
    pub fn new(syncer: Syncer<D>, input: Arc<Input>, coalesce: Coalesce) -> Self {
        Self {
            syncer,
            input,
            coalesce,
            resync_period: None,
            next_resync: None,
            latency: Latency::default(),
            syncs: 0,
            repaired: 0,
            last_sync: None,
            complete: false,
            metrics: None,
        }
    }

    /// Reports syncs, latencies, map-full refusals and the frontends'
    /// state to `metrics` from now on.
    pub fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        self.syncer.metrics = Some(metrics.clone());
        self.metrics = Some(metrics);
    }

    /// `None` or zero: never.
    pub fn set_resync_period(&mut self, period: Option<Duration>) {
        self.resync_period = period.filter(|p| !p.is_zero());
        self.next_resync = self.resync_period.map(|p| TimerInstant::now() + p);
    }

    pub fn syncer(&self) -> &Syncer<D> {
        &self.syncer
    }

    pub fn input(&self) -> &Arc<Input> {
        &self.input
    }

    /// Syncs run so far.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// Entries the periodic resyncs repaired so far.
    pub fn repaired(&self) -> u64 {
        self.repaired
    }

    pub fn latency(&self) -> &Latency {
        &self.latency
    }

    /// Waits for something to do and lets a burst settle. Cancel-safe.
    pub async fn wait(&mut self) -> Wake {
        loop {
            if self.input.is_dirty() {
                break;
            }
            let now = TimerInstant::now();
            let timer = self.next_timer();
            if let Some((at, wake)) = timer
                && at <= now
            {
                return wake;
            }
            let notified = self.input.notify.notified();
            match timer {
                Some((at, _)) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
        let idle = self
            .last_sync
            .is_none_or(|t| t.elapsed() >= self.coalesce.max_delay);
        if !idle {
            let burst = Instant::now();
            let mut seen = self.input.events.load(Ordering::SeqCst);
            loop {
                tokio::time::sleep(self.coalesce.quiet).await;
                let now = self.input.events.load(Ordering::SeqCst);
                if now == seen || burst.elapsed() >= self.coalesce.max_delay {
                    break;
                }
                seen = now;
            }
        }
        Wake::Change
    }

    /// The earliest timer: a due retry, or the resync (once complete).
    fn next_timer(&self) -> Option<(TimerInstant, Wake)> {
        let retry = self.syncer.next_retry().map(|t| (t, Wake::Retry));
        let resync = self
            .next_resync
            .filter(|_| self.complete)
            .map(|t| (t, Wake::Resync));
        [retry, resync]
            .into_iter()
            .flatten()
            .min_by_key(|(t, _)| *t)
    }

    /// [`Driver::wait`], then [`Driver::run_once`].
    pub async fn step(&mut self) -> Step {
        let wake = self.wait().await;
        self.run_once(wake)
    }

    /// One sync for `wake`.
    pub fn run_once(&mut self, wake: Wake) -> Step {
        match wake {
            Wake::Resync => self.resync_now(),
            Wake::Change | Wake::Retry => self.sync(wake, false),
        }
    }

    /// One sync of whatever changed (and is due for a retry), now.
    pub fn sync_now(&mut self) -> Step {
        self.sync(Wake::Change, false)
    }

    /// Compares the maps with the whole desired state and repairs any
    /// difference.
    pub fn resync_now(&mut self) -> Step {
        self.next_resync = self.resync_period.map(|p| TimerInstant::now() + p);
        let repaired = repair_maps(&mut self.syncer.reconciler);
        let mut step = self.sync(Wake::Resync, true);
        // Nothing changed, so a full pass that writes anything repairs a
        // difference between the maps and the desired state.
        step.repaired = repaired + step.stats.writes + step.stats.deletes;
        self.repaired += step.repaired as u64;
        if step.repaired > 0 {
            warn!(
                repaired = step.repaired,
                total = self.repaired,
                "periodic resync repaired the maps"
            );
        } else {
            debug!(
                frontends = step.stats.frontends,
                "periodic resync: maps as desired"
            );
        }
        step
    }

    fn sync(&mut self, wake: Wake, resync: bool) -> Step {
        let started = Instant::now();
        // Read before the index: complete now means complete when read below.
        let prune = if self.input.is_complete() {
            Prune::Yes
        } else {
            Prune::No
        };
        // The first sync with complete sources may prune: a full pass, so
        // whatever earlier partial syncs held back is brought in line.
        let first_complete = prune == Prune::Yes && !self.complete;
        let full = first_complete || (resync && prune == Prune::Yes);
        let (work, diags, arrivals, first_arrival, sizes) = {
            let mut sh = self.input.lock();
            sh.dirty = false;
            let arrivals = std::mem::take(&mut sh.arrivals);
            let first_arrival = sh.first_arrival.take();
            if first_complete {
                sh.index.end_seeding();
            }
            let (work, index_diags) = if full {
                let diags = sh.index.checkout_full();
                (Work::Full(sh.index.frontends()), diags)
            } else {
                let (mut changes, diags) = sh.index.checkout_frontends();
                // What failed before (a full map that since got room, say)
                // is tried again once its timer is due.
                let due = self.syncer.due(TimerInstant::now());
                if !due.is_empty() {
                    changes.extend(due);
                    changes.sort_unstable();
                    changes.dedup();
                }
                (Work::Changes(changes), diags)
            };
            let diags: BTreeSet<Diagnostic> =
                sh.source_diags.iter().cloned().chain(index_diags).collect();
            (work, diags, arrivals, first_arrival, sh.index.len())
        };
        self.syncer.report(diags);
        let changes = match &work {
            Work::Full(f) => f.len(),
            Work::Changes(c) => c.len(),
        };
        // Failed before and not tried in this sync.
        let waiting: Vec<Frontend> = match &work {
            Work::Full(_) => Vec::new(),
            Work::Changes(c) => self
                .syncer
                .failed
                .keys()
                .filter(|fe| c.binary_search(fe).is_err())
                .copied()
                .collect(),
        };
        let mut stats = match work {
            Work::Full(frontends) => self.apply_full(&frontends, prune),
            Work::Changes(changes) => self.apply_parts(&changes, prune),
        };
        if stats.deletes > 0 && !waiting.is_empty() {
            // Room was freed: what was waiting for its retry may fit now.
            let retry: BTreeMap<Frontend, Option<DesiredService>> = {
                let sh = self.input.lock();
                waiting
                    .iter()
                    .map(|fe| (*fe, sh.index.served(fe)))
                    .collect()
            };
            stats += self.syncer.apply_changes(retry, prune);
        }
        let written = Instant::now();
        self.syncs += 1;
        self.last_sync = Some(written);
        self.latency.add(&arrivals, written);
        let now = std::time::SystemTime::now();
        if let Err(e) = self.syncer.reconciler.datapath_mut().note_synced(now) {
            debug!(error = %e, "recording the sync for status");
        }
        if let Some(m) = &self.metrics {
            m.observe_sync(written - started, now, stats.writes, stats.deletes);
            // Each measured event (EndpointSlices) is one sample, as in
            // kube-proxy; changes not measured one by one (Services,
            // manifest files) give one sample from the first of them.
            if arrivals.is_empty() {
                if let Some(t) = first_arrival {
                    m.observe_programming(written.saturating_duration_since(t));
                }
            } else {
                for t in &arrivals {
                    m.observe_programming(written.saturating_duration_since(*t));
                }
            }
        }
        self.complete |= prune == Prune::Yes;
        debug!(
            wake = ?wake,
            full,
            changes,
            events = arrivals.len(),
            frontends = stats.frontends,
            writes = stats.writes,
            deletes = stats.deletes,
            errors = stats.errors,
            prune = ?prune,
            elapsed_us = (written - started).as_micros() as u64,
            "synced"
        );
        if first_complete {
            info!(
                services = sizes.0,
                slices = sizes.1,
                frontends = stats.frontends,
                writes = stats.writes,
                deletes = stats.deletes,
                errors = stats.errors,
                elapsed_ms = (written - started).as_millis() as u64,
                "initial sync complete"
            );
        }
        self.latency.maybe_log(self.syncs, false);
        Step {
            wake,
            prune,
            stats,
            first_complete,
            repaired: 0,
            since_change: first_arrival.map(|t| written.saturating_duration_since(t)),
        }
    }

    /// Brings `frontends` to what the index serves, in parts of
    /// [`FULL_PASS_PART`], each copied out of the index only for its
    /// reconciler call: a cold start changes every frontend, and one copy
    /// of them all would be the agent's peak. The index may take objects
    /// between parts; whatever they change is handed out by the next
    /// check-out, so a part never writes anything older than the last one.
    fn apply_parts(&mut self, frontends: &[Frontend], prune: Prune) -> SyncStats {
        let mut stats = SyncStats::default();
        for part in frontends.chunks(FULL_PASS_PART) {
            let changes = {
                let sh = self.input.lock();
                part.iter().map(|fe| (*fe, sh.index.served(fe))).collect()
            };
            stats += self.syncer.apply_changes(changes, prune);
        }
        stats
    }

    /// Brings the maps to the whole index (`frontends`: all it serves) in
    /// parts, then what is installed (or waiting for a retry) and served no
    /// more goes.
    fn apply_full(&mut self, frontends: &[Frontend], prune: Prune) -> SyncStats {
        let mut stats = self.apply_parts(frontends, prune);
        // Straight from what is held: a copy of every held frontend would
        // be the largest allocation of a full sync.
        let gone = {
            let sh = self.input.lock();
            self.syncer
                .reconciler
                .installed()
                .keys()
                .chain(self.syncer.failed.keys())
                .filter(|fe| !sh.index.is_served(fe))
                .map(|fe| (*fe, None))
                .collect()
        };
        stats += self.syncer.apply_changes(gone, prune);
        stats
    }

    /// Logs the latency figures now if any are new (used at shutdown).
    pub fn log_latency(&mut self) {
        self.latency.maybe_log(self.syncs, true);
    }

    /// One iteration of the loop, with `health` told about it: its
    /// progress (a sync stuck anywhere fails `/healthz`), the frontends
    /// failing and readiness.
    pub fn iterate(&mut self, wake: Wake, health: &Health) -> Step {
        health.iteration_started();
        let step = self.run_once(wake);
        health.set_failing(
            self.syncer
                .failed()
                .iter()
                .map(ToString::to_string)
                .collect(),
        );
        if step.stats.writes + step.stats.deletes + step.stats.spared > 0 {
            health.note_maps_changed();
        }
        if let Some(m) = &self.metrics {
            m.set_frontends(
                self.syncer.reconciler.programmed(),
                self.syncer.failed.len(),
            );
            let warnings = self
                .syncer
                .reported
                .iter()
                .filter(|d| d.severity == Severity::Warning)
                .count();
            m.set_diagnostics(warnings, self.syncer.reported.len() - warnings);
        }
        // After the figures above: whoever sees the initial sync complete
        // (`/metrics`, `LB_AGENT`) reads that sync's frontends with it.
        if step.first_complete {
            health.set_ready();
        }
        health.iteration_finished();
        step
    }

    /// Syncs until `shutdown`.
    pub async fn run(&mut self, health: &Health, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let wake = tokio::select! {
                () = &mut shutdown => break,
                wake = self.wait() => wake,
            };
            self.iterate(wake, health);
        }
        self.log_latency();
    }
}

/// The services that held frontends before a restart, oldest first (the
/// reconciler hands out service ids in increasing order), to seed the
/// index's first-seen order.
pub fn owners_oldest_first<D: Datapath>(reconciler: &Reconciler<D>) -> Vec<(String, String)> {
    let mut by_id: Vec<(u32, (String, String))> = reconciler
        .installed()
        .values()
        .filter(|i| !i.service.name.is_empty())
        .map(|i| {
            (
                i.svc_id,
                (i.service.namespace.to_string(), i.service.name.to_string()),
            )
        })
        .collect();
    by_id.sort();
    by_id.into_iter().map(|(_, key)| key).collect()
}

enum Work {
    /// Every frontend the index serves, for a pass over everything.
    Full(Vec<Frontend>),
    /// The frontends that changed (or whose retry is due), sorted.
    Changes(Vec<Frontend>),
}
